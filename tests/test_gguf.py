"""GGUF export (qlora_helpers.gguf_export) on the reference model's architecture: a tiny Phi-3 with random weights
and a real SentencePiece tokenizer trained here on Alpaca text, Phi-3's special tokens and chat template (Phi-3's
own weights cannot be downloaded here). llama.cpp's converter turns it into GGUF files whose metadata, weights and
tokenizer are checked through the gguf library and transformers' GGUF loader; the bad requests are one line.
The embedded model's files and scores are checked on the embedded run in test_shipped_scores.py."""
import io
import json
import shutil

import pytest

from conftest import SHARED_DATA, run_cli, stage_for

PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")


@pytest.fixture(scope="module")
def tiny_phi3(tmp_path_factory):
    """A Phi3ForCausalLM folder as save_pretrained writes it, plus tokenizer.model as Phi-3's hub folder has it."""
    import sentencepiece as spm
    import torch
    from transformers import LlamaTokenizer, Phi3Config, Phi3ForCausalLM

    out = tmp_path_factory.mktemp("tiny-phi3") / "Phi-3-tiny"
    out.mkdir()
    rows = json.loads(SHARED_DATA.read_text())[:400]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(r["instruction"] + " " + r["output"] for r in rows),
                                   model_writer=model, vocab_size=400, model_type="bpe", byte_fallback=True,
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    (out / "tokenizer.model").write_bytes(model.getvalue())
    tok = LlamaTokenizer.from_pretrained(str(out))
    tok.add_special_tokens({"additional_special_tokens": ["<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>", "<|system|>"]})
    tok.eos_token, tok.chat_template = "<|endoftext|>", PHI3_TEMPLATE
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    config = Phi3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                        original_max_position_embeddings=512, bos_token_id=1, eos_token_id=eos, pad_token_id=eos)
    torch.manual_seed(0)
    Phi3ForCausalLM(config).to(torch.float16).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _stage(tmp_path, model_dir, types="f16,q8_0"):
    stage = stage_for(tmp_path / "run", overrides={"model.name": str(model_dir), "eval.export_gguf": types})
    shutil.copytree(model_dir, stage.path("export", "merged"))  # what the merge writes
    return stage


def test_a_phi3_model_becomes_gguf_files_with_its_chat_template_end_token_and_weights(tmp_path, tiny_phi3):
    import torch
    from transformers import AutoModelForCausalLM

    from qlora_helpers.data import Formatter, load_tokenizer
    from qlora_helpers.gguf_export import check_request, make_files, read_metadata

    stage = _stage(tmp_path, tiny_phi3)
    plan = check_request(stage)
    assert plan["architecture"] == "Phi3ForCausalLM" and plan["gguf_architecture"] == "phi3"
    tokenizer = load_tokenizer(stage)
    formatter = Formatter(tokenizer, "chat")
    files = make_files(stage, plan, tokenizer, formatter)
    assert [f["type"] for f in files] == ["f16", "q8_0"]
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    for f in files:
        path = stage.path(f["path"])
        assert path.name == f"Phi-3-tiny-qlora-{f['type']}.gguf" and f["bytes"] == path.stat().st_size <= f["estimated_bytes"]
        meta = read_metadata(path)
        assert meta["architecture"] == "phi3" and meta["tokenizer_model"] == "llama"
        assert meta["chat_template"] == PHI3_TEMPLATE  # llama.cpp formats turns as training did
        assert meta["eos_token_id"] == end and meta["add_bos_token"] is False  # stops at <|end|>, adds no BOS
        modelfile = stage.path(f["modelfile"]).read_text()
        assert f"FROM ./{path.name}\n" in modelfile and 'PARAMETER stop "<|end|>"' in modelfile
        assert '{{ if eq .Role "user" }}<|user|>\n{{ .Content }}<|end|>\n' in modelfile
    assert not stage.path("export", "gguf", ".source").exists()

    # The f16 file holds the merged weights: transformers' GGUF loader reads back the same logits.
    gguf = stage.path(files[0]["path"])
    prompt = formatter.prompt_text([{"role": "user", "content": "Give three tips for staying healthy.\n\nBe brief."}])
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    x = torch.tensor([ids])
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(str(tiny_phi3), dtype=torch.float32)(x).logits
        got = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)(x).logits
    assert (got - want).abs().max().item() < 1e-3, (got - want).abs().max().item()


def test_bad_requests_are_one_line_before_any_work(tmp_path, tiny_phi3, monkeypatch):
    from qlora_helpers.config import UserError
    from qlora_helpers.gguf_export import check_request, gguf_architecture, llama_cpp_version

    proc = run_cli("run", "--profile", "test", "-p", "eval.export_gguf=f16,q4_x", "--run-dir", str(tmp_path / "r"))
    assert proc.returncode != 0 and proc.stderr.strip().count("\n") == 0
    assert "'q4_x' is not a GGUF type this project makes" in proc.stderr and not (tmp_path / "r").exists()

    with pytest.raises(UserError, match="does not support the architecture NotARealModelForCausalLM"):
        gguf_architecture("NotARealModelForCausalLM")

    stage = _stage(tmp_path, tiny_phi3, "f16,q8_0,q4_k_m")
    if llama_cpp_version() is None:
        with pytest.raises(UserError, match="q4_k_m is made by llama.cpp's quantizer.*make gguf-llamacpp"):
            check_request(stage)
    stage.cfg.eval.export_gguf = ["f16", "q8_0"]
    import shutil as sh

    monkeypatch.setattr(sh, "disk_usage", lambda path: sh._ntuple_diskusage(10**12, 10**12 - 2**20, 2**20))
    with pytest.raises(UserError, match=r"GiB are needed in .* GiB are free"):
        check_request(stage)
    assert not stage.path("export", "gguf").exists()


def test_llama_cpp_reads_the_phi3_file_as_training_did(tmp_path, tiny_phi3):
    """With llama.cpp installed (make gguf-llamacpp): it loads the files and <|end|> ends a turn."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from qlora_helpers.data import Formatter, load_tokenizer
    from qlora_helpers.gguf_export import check_request, make_files

    stage = _stage(tmp_path, tiny_phi3, "f16,q4_k_m")
    tokenizer = load_tokenizer(stage)
    formatter = Formatter(tokenizer, "chat")
    files = make_files(stage, check_request(stage), tokenizer, formatter)
    prompt = formatter.prompt_text([{"role": "user", "content": "Give three tips for staying healthy.\n\nBe brief."}])
    for f in files:
        llm = llama_cpp.Llama(str(stage.path(f["path"])), verbose=False, n_ctx=256)
        try:
            # Not asserted: llama.cpp's SentencePiece tokenizer puts a "▁" piece after <|user|> that transformers does
            # not (measured here; llama.cpp issue 23840), so typed prompts differ from training's tokens there.
            assert llm.tokenize(prompt.encode(), add_bos=False, special=True)[0] == tokenizer.convert_tokens_to_ids("<|user|>")
            vocab = llama_cpp.llama_model_get_vocab(llm.model)
            assert llama_cpp.llama_vocab_is_eog(vocab, tokenizer.convert_tokens_to_ids("<|end|>"))
        finally:
            llm.close()
