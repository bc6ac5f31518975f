"""The profile's training objects built from the config alone, for the benchmarks and for tests that train outside
a notebook: the same ``LoraConfig`` and ``TrainingArguments`` notebooks 02 and 03 build in their cells (the
notebooks are the definition; tests/test_model.py and tests/test_train.py check these agree with the objects a real
run of the notebooks saved), the same ``Trainer`` with the project's collator and callbacks, the same
resume-train-save sequence as notebook 03's training cell, and notebook 04's export cells.

Not part of the package: the pipeline never builds these objects outside the notebooks' cells.
"""
from __future__ import annotations

import math
import os

from qlora_helpers.callbacks import training_callbacks
from qlora_helpers.hardware import resolve_optim
from qlora_helpers.inspect_model import meta_model, profile_lora_config, profile_quantization_config
from qlora_helpers.model import load_base_model, load_model_config, save_model_configs
from qlora_helpers.packing import make_collator
from qlora_helpers.stage import Stage
from qlora_helpers.train import (check_training_arguments, connect_callbacks, finished_training, resume_checkpoint,
                                 save_training, total_steps, training_datasets, while_training)

DYNAMO_ENV = ("ACCELERATE_DYNAMO_BACKEND", "ACCELERATE_DYNAMO_MODE", "ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION")


def save_profile_configs(stage: Stage) -> None:
    """What notebook 02 saves for this profile (model/quantization_config.json, model/lora/), from config.json alone."""
    model = meta_model(stage, load_model_config(stage))
    save_model_configs(stage, profile_quantization_config(stage), profile_lora_config(stage, model))


def load_base(stage: Stage):
    """Notebook 02's from_pretrained with the BitsAndBytesConfig it builds for this profile."""
    return load_base_model(stage, quantization=profile_quantization_config(stage))


def attach_lora(stage: Stage, model):
    """Notebook 03's ``set_seed`` + ``get_peft_model`` with the LoraConfig notebook 02 builds for this profile."""
    from peft import get_peft_model
    from transformers import set_seed

    set_seed(stage.cfg.train.seed)
    return get_peft_model(model, profile_lora_config(stage, model))


def training_arguments(stage: Stage, n_train: int, world: int | None = None):
    """Notebook 03's TrainingArguments cell, argument for argument."""
    from transformers import TrainingArguments

    t, device = stage.cfg.train, stage.hw["device"]
    world = world or max(1, int(os.environ.get("WORLD_SIZE") or 1))
    steps = total_steps(stage, n_train, world)
    if t.torch_compile:
        os.environ["ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION"] = "1"
    else:  # TrainingArguments(torch_compile=True) sets these for the process: an earlier config must not leak
        for key in DYNAMO_ENV:
            os.environ.pop(key, None)
    args = TrainingArguments(
        output_dir=str(stage.path("train", "checkpoints")), max_steps=steps,
        per_device_train_batch_size=t.micro_batch_size, per_device_eval_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.grad_accum, learning_rate=t.learning_rate, lr_scheduler_type=t.lr_scheduler,
        warmup_steps=math.ceil(t.warmup_ratio * steps), weight_decay=t.weight_decay, optim=resolve_optim(t.optim, device),
        bf16=stage.compute_dtype == "bfloat16", fp16=stage.compute_dtype == "float16",
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        use_liger_kernel=t.use_liger,
        liger_kernel_config={"rms_norm": False, "swiglu": False, "rope": False} if t.use_liger and t.torch_compile else None,
        torch_compile=t.torch_compile, ddp_find_unused_parameters=False, logging_steps=t.logging_steps,
        eval_strategy="steps", eval_steps=t.eval_steps, save_strategy="steps", save_steps=t.save_steps,
        save_total_limit=t.save_total_limit, load_best_model_at_end=True, metric_for_best_model="eval_loss",
        greater_is_better=False, include_num_input_tokens_seen="non_padding", report_to="none", seed=t.seed,
        data_seed=t.seed, remove_unused_columns=False, dataloader_num_workers=0,
        dataloader_pin_memory=device == "cuda", disable_tqdm=True, use_cpu=device == "cpu")
    check_training_arguments(stage, args, n_train, world)
    return args


def build_trainer(stage: Stage, model, tokenizer):
    """Notebook 03's Trainer cell."""
    from transformers import Trainer

    train_ds, val_ds = training_datasets(stage)
    model.config.use_cache = False
    trainer = Trainer(model=model, args=training_arguments(stage, len(train_ds)), train_dataset=train_ds,
                      eval_dataset=val_ds, data_collator=make_collator(stage, tokenizer), processing_class=tokenizer,
                      callbacks=training_callbacks(stage))
    connect_callbacks(trainer)
    return trainer


def train(stage: Stage, trainer) -> dict:
    """Notebook 03's training cell: report a finished run, else resume from the newest complete checkpoint, train,
    and save the best adapter and the whole run's numbers."""
    done = finished_training(stage, len(trainer.train_dataset), trainer.args.world_size)
    if done is not None:
        return done
    resume_from = resume_checkpoint(stage)
    with while_training(stage):
        trainer.train(resume_from_checkpoint=resume_from)
    return save_training(stage, trainer, resume_from)


def export(stage: Stage) -> dict:
    """Notebook 04's export cells: check first, merge into eval.merge_into's 16-bit weights and save, then check the
    merged model, score every form and push if asked (export/metrics.json)."""
    import gc

    from peft import PeftModel

    from qlora_helpers.export import adapter_dir, check_before_export, finish_export, merge_base, save_merged

    check_before_export(stage)
    merged_info = None
    if stage.cfg.eval.export_merged:
        merged = PeftModel.from_pretrained(merge_base(stage), str(adapter_dir(stage))).merge_and_unload(safe_merge=True)
        merged_info = save_merged(stage, merged)
        del merged
        gc.collect()
    return finish_export(stage, merged_info)
