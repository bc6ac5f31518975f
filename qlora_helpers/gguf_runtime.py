"""GGUF files answer the held-out prompts: the same prompt tokens the evaluation fed the 4-bit model, greedy, the
same token budget and end-of-turn tokens, so each file's row in the forms table compares with the others exactly.

Two runtimes, the one used named in every row:

* llama.cpp itself, through llama-cpp-python, when it is installed (``make gguf-llamacpp``): the code that
  llama-cli, llama-server, Ollama and LM Studio run, quantized matrix products and all. Greedy here is the
  arg-max of llama.cpp's own logits at every step.
* otherwise transformers' GGUF loader, which reads the file's tensors, dequantizes them exactly (the same
  rounded weights llama.cpp multiplies with) and runs them in PyTorch with the evaluation's own ``generate``. It
  scores the file's weights and tokenizer, not llama.cpp's kernels (which, for q8_0 and the k-quants, also round
  the activations to 8 bits).

llama.cpp also tokenizes every prompt with the file's own vocabulary and counts the prompts that give exactly
training's tokens: what llama.cpp or Ollama will feed the model when a user types the same text.
"""
from __future__ import annotations

import gc
import os
import time
from pathlib import Path
from typing import Any

LLAMA_CPP, TRANSFORMERS = "llama.cpp", "transformers GGUF loader"


def runtime_name(llama_cpp_version: str | None) -> str:
    import transformers

    return (f"{LLAMA_CPP} (llama-cpp-python {llama_cpp_version})" if llama_cpp_version
            else f"{TRANSFORMERS} (transformers {transformers.__version__}, dequantized)")


def _answer(token_ids: list[int], stop_ids: list[int], tokenizer) -> dict[str, Any]:
    """One answer as qlora_helpers.evaluate.generate reports it."""
    stopped = bool(token_ids) and token_ids[-1] in stop_ids
    kept = token_ids[:-1] if stopped else token_ids
    return {"answer": tokenizer.decode(kept, skip_special_tokens=True).strip(), "stopped": stopped,
            "new_tokens": len(kept), "token_ids": token_ids}


def llama_cpp_answers(path: Path, prompts: list[str], prompt_ids: list[list[int]], max_new_tokens: int,
                      stop_ids: list[int], tokenizer) -> tuple[list[dict[str, Any]], int]:
    """Greedy answers from llama.cpp, and on how many prompts its tokenizer gives training's tokens."""
    import numpy as np
    from llama_cpp import Llama, llama_get_logits_ith

    n_ctx = max(len(p) for p in prompt_ids) + max_new_tokens + 8
    llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=len(os.sched_getaffinity(0)), verbose=False)
    try:
        same = sum(llm.tokenize(p.encode("utf-8"), add_bos=False, special=True) == ids for p, ids in zip(prompts, prompt_ids))
        answers = []
        for ids in prompt_ids:
            llm.reset()
            llm.eval(ids)
            out: list[int] = []
            while len(out) < max_new_tokens:
                logits = np.ctypeslib.as_array(llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
                out.append(int(np.argmax(logits)))
                if out[-1] in stop_ids:
                    break
                llm.eval([out[-1]])
            answers.append(_answer(out, stop_ids, tokenizer))
    finally:
        llm.close()
    return answers, same


def transformers_answers(path: Path, prompts: list[str], prompt_ids: list[list[int]], stage, stop_ids: list[int],
                         tokenizer, dtype: str) -> tuple[list[dict[str, Any]], None]:
    """Greedy answers from the file's weights dequantized by transformers, with the evaluation's generate(). No
    count of prompts tokenized as in training (None): transformers rebuilds a tokenizer of its own from the file's
    vocabulary, which is not llama.cpp's (it misses SentencePiece's byte pieces), so its count would say nothing."""
    import torch
    from transformers import AutoModelForCausalLM

    from .evaluate import generate

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=getattr(torch, dtype))
    model.to(stage.device).eval()
    ev = stage.cfg.eval
    answers, _ = generate(model, tokenizer, prompt_ids, ev.max_new_tokens, ev.batch_size, stop_ids)
    del model
    gc.collect()
    return answers, None


def score_files(stage, files: list[dict[str, Any]], llama_cpp_version: str | None, tokenizer, examples: list[dict],
                prompts: list[str], prompt_ids: list[list[int]], stop_ids: list[int], evaluated: list[str] | None) -> dict[str, dict[str, Any]]:
    """Each file's row of the forms table (``gguf-<type>``): qlora_helpers.artifacts.score_form's numbers, the
    runtime that answered, and how many prompts the file's own tokenizer turns into training's tokens."""
    from .artifacts import score_form
    from .gguf_export import FORM_PREFIX

    runtime = runtime_name(llama_cpp_version)
    dtype = "float32" if stage.hw["device"] == "cpu" else stage.cfg.eval.export_dtype
    scores = {}
    for f in files:
        t0, path = time.time(), stage.path(f["path"])
        if llama_cpp_version:
            answers, same = llama_cpp_answers(path, prompts, prompt_ids, stage.cfg.eval.max_new_tokens, stop_ids, tokenizer)
        else:
            answers, same = transformers_answers(path, prompts, prompt_ids, stage, stop_ids, tokenizer, dtype)
        row = score_form(answers, examples, evaluated)
        row.update({"what": f"the shipped merged model as a GGUF file, {f['type']}, answered by {runtime.split(' (')[0]}",
                    "runtime": runtime, "file": f["path"],
                    "tokenized_as_trained": same, "score_s": round(time.time() - t0, 2)})
        scores[FORM_PREFIX + f["type"]] = row
    return scores
