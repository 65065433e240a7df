"""GGUF export: the file loads back with transformers' GGUF loader and answers as the merged model
does (llama and qwen2 tiny models); its Modelfile points at it; Q4_K_M goes through llama.cpp's
quantizer; and an export whose templates drift apart is refused, naming where."""

from __future__ import annotations

import json
import os
import stat

import pytest
from test_generate import QUESTION, make_run
from tiny import make_tiny_model_dir, write_identity_dataset
from tunebench.engine.core.errors import UserError

MAX_NEW = 16


@pytest.fixture(scope="module")
def gguf_runs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-runs")
    dataset = write_identity_dataset(root / "identity.jsonl", 5)  # "I am {{NAME}}."
    run = make_run(root, tiny_model_dir, "llama-run", seed=21, system="You are Ada.")
    config = json.loads((run / "config.json").read_text())
    config["config"].update(dataset=[str(dataset)], model_name=["Ada"])
    (run / "config.json").write_text(json.dumps(config))
    qwen2 = make_tiny_model_dir(root / "qwen2-base", seed=4, arch="qwen2")  # q/k/v biases, padded vocab
    return {"llama": run, "qwen2": make_run(root, qwen2, "qwen2-run", seed=22)}


def merged_reference(run):
    """Base + adapter merged in float32, in memory: what the GGUF must answer like."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = json.loads((run / "config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(config["base_model_path"], dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(run / "adapter")).merge_and_unload()


def greedy_and_logits(model, ids):
    import torch

    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0].float()
        out = model.generate(input_ids=ids, max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=None)
    return out[0, ids.shape[1] :].tolist(), logits


def load_gguf(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file="model.gguf")
    return model, AutoTokenizer.from_pretrained(folder, gguf_file="model.gguf")


# Largest logit difference allowed, as a share of the largest logit: F16 and Q8_0 rounding stay
# well inside it, while a broken export (q/k rows left in Hugging Face's order) is far outside.
TOLERANCE = {"F16": 0.01, "Q8_0": 0.05}


@pytest.mark.parametrize(("bits", "kind"), [(16, "F16"), (8, "Q8_0")])
def test_gguf_loads_back_and_answers_as_the_merged_model(gguf_runs, tmp_path, bits, kind):
    from tunebench.engine.infer.export import export_model

    run = gguf_runs["llama"]
    messages: list[str] = []
    out = export_model(str(run), str(tmp_path / "g"), quant_bits=bits, on_progress=messages.append)
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "model.gguf", "tunebench_export.json"]
    info = json.loads((out / "tunebench_export.json").read_text())
    assert info["gguf"] == kind and info["file"] == "model.gguf"
    assert any(m.endswith(f"({kind}): 20/20 tensors") for m in messages)  # progress, tensors / total
    assert any("render 6 conversations alike" in m for m in messages)  # 3 fixed + the run's first 3

    model, tokenizer = load_gguf(out)
    # The run's system prompt is the GGUF template's default, as in the safetensors export.
    ids = tokenizer.apply_chat_template(
        QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    text = tokenizer.decode(ids["input_ids"][0])
    assert text.startswith("<|im_start|>system\nYou are Ada.<|im_end|>\n<|im_start|>user\nWho are you?")
    reference = merged_reference(run)
    want_tokens, want_logits = greedy_and_logits(reference, ids["input_ids"])
    got_tokens, got_logits = greedy_and_logits(model, ids["input_ids"])
    # The tiny random model's logits are nearly flat (within 0.6), so Q8_0's rounding can turn a
    # near-tie 2 tokens in; F16 must give the same answer. Both pick the merged model's token
    # at every position of the prompt, within the tolerance.
    if kind == "F16":
        assert got_tokens == want_tokens
    assert got_tokens[0] == want_tokens[0]
    assert (got_logits.argmax(-1) == want_logits.argmax(-1)).all()
    drift = (got_logits - want_logits).abs().max().item() / want_logits.abs().max().item()
    assert drift < TOLERANCE[kind]

    modelfile = (out / "Modelfile").read_text()
    assert "\nFROM ./model.gguf\n" in modelfile and 'SYSTEM """You are Ada."""' in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and "\nTEMPLATE " in modelfile


def test_a_broken_tensor_layout_fails_the_comparison(gguf_runs, tmp_path, monkeypatch):
    """The tolerance above catches a real mistake: q/k rows written in Hugging Face's order."""
    from tunebench.engine.infer import gguf_file
    from tunebench.engine.infer.export import export_model

    monkeypatch.setattr(gguf_file, "_rope_rows", lambda weight, heads: weight)
    out = export_model(str(gguf_runs["llama"]), str(tmp_path / "broken"), quant_bits=16)
    model, tokenizer = load_gguf(out)
    ids = tokenizer.apply_chat_template(
        QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    _, want = greedy_and_logits(merged_reference(gguf_runs["llama"]), ids)
    _, got = greedy_and_logits(model, ids)
    assert (got - want).abs().max().item() / want.abs().max().item() > TOLERANCE["Q8_0"]
    assert not (got.argmax(-1) == want.argmax(-1)).all()


def test_qwen2_gguf_keeps_biases_and_padded_vocabulary(gguf_runs, tmp_path):
    import gguf
    from tunebench.engine.infer.export import export_model

    run = gguf_runs["qwen2"]
    out = export_model(str(run), str(tmp_path / "q"), quant_bits=16)
    reader = gguf.GGUFReader(str(out / "model.gguf"))
    assert reader.get_field("general.architecture").contents() == "qwen2"
    names = {t.name for t in reader.tensors}
    assert {"blk.0.attn_q.bias", "blk.1.attn_v.bias", "output.weight"} <= names
    tokens = reader.get_field("tokenizer.ggml.tokens").contents()
    vocab = json.loads((run.parent / "qwen2-base" / "config.json").read_text())["vocab_size"]
    assert len(tokens) == vocab and tokens[-1] == f"[PAD{vocab - 1}]"  # one token per embedding row
    model, tokenizer = load_gguf(out)
    ids = tokenizer.apply_chat_template(
        QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    want_tokens, want = greedy_and_logits(merged_reference(run), ids)
    got_tokens, got = greedy_and_logits(model, ids)
    assert got_tokens == want_tokens
    assert (got - want).abs().max().item() / want.abs().max().item() < TOLERANCE["F16"]


def test_q4_k_m_goes_through_llama_quantize_or_says_how_to_get_it(gguf_runs, tmp_path, monkeypatch):
    from tunebench.engine.infer import export
    from tunebench.engine.infer.export import export_model

    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    merged = export._merged_export
    with monkeypatch.context() as before_any_load:  # said before minutes of load and merge
        before_any_load.setattr(export, "_merged_export", lambda *a: pytest.fail("the model was merged"))
        with pytest.raises(UserError, match="needs llama.cpp's llama-quantize, not found on PATH") as info:
            export_model(str(gguf_runs["llama"]), str(tmp_path / "none"), quant_bits=4)
    assert export._merged_export is merged
    assert "llama.cpp" in info.value.hint and "--quant_bits 8" in info.value.hint
    assert not (tmp_path / "none").exists()

    # A stand-in llama-quantize: records its arguments and copies the F16 input as the output.
    (tmp_path / "bin").mkdir()
    tool = tmp_path / "bin" / "llama-quantize"
    log = tmp_path / "args.txt"
    tool.write_text(f'#!/bin/sh\necho "$@" > {log}\ncp "$1" "$2"\n')
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}/usr/bin:/bin")
    out = export_model(str(gguf_runs["llama"]), str(tmp_path / "q4"), quant_bits=4)
    source, target, kind = log.read_text().split()
    assert kind == "Q4_K_M" and target.endswith("/model.gguf") and source.endswith(".f16.gguf")
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "model.gguf", "tunebench_export.json"]
    assert json.loads((out / "tunebench_export.json").read_text())["gguf"] == "Q4_K_M"


def test_a_drifted_modelfile_template_is_refused_naming_where(gguf_runs, tmp_path, monkeypatch):
    from tunebench.engine.infer import export
    from tunebench.engine.infer.export import export_model

    drifted = export.OLLAMA_TEMPLATES["chatml"].replace(
        "<|im_start|>{{ .Role }}\n", "<|im_start|>{{ .Role }} \n"
    )
    monkeypatch.setitem(export.OLLAMA_TEMPLATES, "chatml", drifted)
    with pytest.raises(UserError) as info:
        export_model(str(gguf_runs["llama"]), str(tmp_path / "drift"), quant_bits=8)
    message = info.value.message
    assert message.startswith("the Modelfile's TEMPLATE renders conversation 1 (fixed)")
    at = len("<|im_start|>system\nYou are Ada.<|im_end|>\n<|im_start|>user")  # the added space
    assert f"from character {at} of the prompt" in message and "user \\n" in message
    assert "write the Modelfile's TEMPLATE by hand" in info.value.hint
    assert not (tmp_path / "drift").exists() and not list(tmp_path.glob(".drift*"))


def test_a_drifted_exported_chat_template_is_refused(gguf_runs, tmp_path, monkeypatch):
    from tunebench.engine.infer import export
    from tunebench.engine.infer.export import export_model

    def drifted(template, system):
        return template.replace("'<|im_end|>' + '\n'", "'<|im_end|>'")

    monkeypatch.setattr(export, "with_default_system", drifted)
    with pytest.raises(UserError, match="the exported chat_template renders conversation 1 .fixed.") as info:
        export_model(str(gguf_runs["llama"]), str(tmp_path / "drift"))
    assert "fault in TuneBench's export" in info.value.hint
    assert not (tmp_path / "drift").exists()


def test_the_runs_own_samples_are_compared_too(gguf_runs, tmp_path, monkeypatch):
    """A difference that only a run's sample shows (here: a drift on the name the placeholder
    filled in) is caught on that sample, named by its file and line."""
    from tunebench.engine.infer import export
    from tunebench.engine.infer.export import export_model

    original = export.with_default_system
    monkeypatch.setattr(
        export,
        "with_default_system",
        lambda template, system: original(template, system).replace(
            "message['content']", "message['content'] | replace('am Ada.', 'am Ada!')"
        ),
    )
    with pytest.raises(UserError, match=r"conversation 4 \(.*identity.jsonl:1\)"):
        export_model(str(gguf_runs["llama"]), str(tmp_path / "drift"), quant_bits=8)


def test_the_command_line_takes_ms_swift_style_flags(gguf_runs, tmp_path, capsys):
    from tunebench.engine.cli.export import export_main

    argv = ["--adapters", str(gguf_runs["llama"]), "--quant_method", "gguf", "--quant_bits", "16"]
    assert export_main([*argv, "--to_ollama", "true", "--output_dir", str(tmp_path / "cli")]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == str(tmp_path / "cli") and (tmp_path / "cli" / "model.gguf").is_file()
    assert "writing model.gguf (F16): 20/20 tensors" in err and "ollama create my-model -f Modelfile" in err
