"""Model resolution: clear errors for everything a person can get wrong, and the demo model."""

from __future__ import annotations

import shutil

import pytest
from tunebench.engine.core.errors import ModelError
from tunebench.engine.models.loading import load_model, resolve_model


def test_missing_path(tmp_path):
    with pytest.raises(ModelError, match="model not found"):
        resolve_model(str(tmp_path / "missing"))


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_file_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ModelError, match="is a file, not a model folder"):
        resolve_model(str(tmp_path / "notes.txt"))


def test_pickle_weights_are_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="no safetensors weights") as info:
        resolve_model(str(tmp_path))
    assert "pickle" in info.value.hint


def test_hub_id_not_in_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelError, match="not in the local Hugging Face cache"):
        resolve_model("nobody/such-model")


def test_unsupported_gguf_architecture(tmp_path, monkeypatch):
    gguf = pytest.importorskip("gguf")
    monkeypatch.setenv("TUNEBENCH_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "fancyformer")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelError) as info:
        resolve_model(str(path))
    assert "fancyformer" in str(info.value) or "GGUF" in str(info.value)
    assert not list((tmp_path / "cache" / "models").glob("odd*"))  # nothing half-converted left


def test_local_folder_loads(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir))
    assert loaded.resolved.kind == "folder" and loaded.tokenizer.pad_token is not None
    # No layer swapped for a kernel from the hub (transformers' default where `kernels` is
    # installed): on a GPU box that would fetch code from the network, and fail offline.
    assert not getattr(loaded.model, "use_kernels", False)


@pytest.mark.slow
def test_demo_model_loads_from_its_cached_copy_once_converted(monkeypatch):
    """Once converted, the demo loads from the safetensors copy: the GGUF is never read again.
    (How fast that is, bench/bench_demo.py reports: a time bound here would fail on a busy box.)"""
    from tunebench.engine.core.model_files import cached_model_dir
    from tunebench.engine.models import loading as models

    first = resolve_model("demo")  # converts once (cached for later runs)

    def no_second_conversion(*args, **kwargs):
        raise AssertionError("the demo model was converted again")

    monkeypatch.setattr(models, "_convert_gguf", no_second_conversion)
    loaded = load_model("demo", torch_dtype="bfloat16")
    assert loaded.resolved.path == first.path == cached_model_dir("demo")
    assert (first.path / "config.json").is_file() and list(first.path.glob("*.safetensors"))
    assert loaded.parameters > 100e6 and loaded.tokenizer.chat_template


def test_hub_id_found_in_the_local_cache(tiny_model_dir, tmp_path, monkeypatch):
    # Lay out a Hugging Face cache entry by hand: models--org--name/{refs/main, snapshots/<rev>/...}
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--tiny-org--tiny-chat"
    snapshot = repo / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    for f in tiny_model_dir.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abc")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    resolved = resolve_model("tiny-org/tiny-chat")
    assert resolved.kind == "hub" and resolved.path == snapshot
    assert load_model("tiny-org/tiny-chat").parameters > 0


@pytest.mark.parametrize(
    "layout",
    [
        "hub/models/Qwen/Qwen2.5-0.5B-Instruct",  # modelscope download --model, current releases
        "hub/Qwen/Qwen2___5-0___5B-Instruct",  # older releases: no models/, every "." stored as "___"
    ],
)
def test_hub_id_found_in_the_modelscope_cache(tiny_model_dir, tmp_path, monkeypatch, layout):
    """Searched after the Hugging Face cache, which here has nothing."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms"))
    folder = tmp_path / "ms" / layout
    shutil.copytree(tiny_model_dir, folder)
    resolved = resolve_model("Qwen/Qwen2.5-0.5B-Instruct")
    assert resolved.kind == "hub" and resolved.path == folder
    from tunebench.engine.core.model_files import cached_model_dir

    assert cached_model_dir("Qwen/Qwen2.5-0.5B-Instruct") == folder  # the TUI finds its tokenizer there


def test_hub_id_in_neither_cache_names_both_download_commands(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms"))
    (tmp_path / "ms" / "hub" / "models" / "Qwen" / "Other").mkdir(parents=True)
    with pytest.raises(ModelError, match="nor in ModelScope's") as info:
        resolve_model("Qwen/Qwen2.5-7B-Instruct")
    assert "hf download Qwen/Qwen2.5-7B-Instruct" in info.value.hint
    assert "modelscope download --model Qwen/Qwen2.5-7B-Instruct" in info.value.hint


def test_a_modelscope_folder_without_weights_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms"))
    folder = tmp_path / "ms" / "hub" / "models" / "Qwen" / "Qwen2.5-7B-Instruct"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "qwen2"}')
    with pytest.raises(ModelError, match="no safetensors weights") as info:
        resolve_model("Qwen/Qwen2.5-7B-Instruct")
    assert str(folder) in str(info.value)
