"""Side-by-side generation on a tiny model: batching, streaming, stopping, cancel, run settings."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from tunebench.engine.core.config import GenerationConfig
from tunebench.engine.core.errors import UserError

QUESTION = [{"role": "user", "content": "Who are you?"}]


def make_run(
    root: Path,
    model_dir: Path,
    run_id: str,
    seed: int,
    *,
    system: str = "",
    template: str = "",
    train_type: str = "lora",
    final: bool = True,
    checkpoints: tuple[int, ...] = (),
) -> Path:
    """A run folder as the training recipe lays it out, with a LoRA whose B is random (so the
    adapter changes the output) instead of trained."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0.0, 0.5)
    run = root / run_id
    run.mkdir(parents=True)
    if final:
        peft_model.save_pretrained(run / "adapter")
    for step in checkpoints:
        peft_model.save_pretrained(run / "checkpoints" / f"step-{step}")
        (run / "checkpoints" / f"step-{step}" / "trainer_state.pt").write_bytes(b"")
    config = {
        "model": str(model_dir),
        "train_type": train_type,
        "torch_dtype": "float32",
        "template": template,
        "system": system,
    }
    payload = {
        "run_id": run_id,
        "config": config,
        "command": f"tunebench train --model {model_dir}",
        "base_model_path": str(model_dir),
    }
    (run / "config.json").write_text(json.dumps(payload))
    return run


@pytest.fixture(scope="session")
def runs(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    return {
        "plain": make_run(root, tiny_model_dir, "plain", seed=1),
        "bob": make_run(
            root, tiny_model_dir, "bob", seed=2, system="You are Bob, made by the TuneBench team."
        ),
        "training": make_run(root, tiny_model_dir, "training", seed=3, final=False, checkpoints=(2, 10)),
    }


@pytest.fixture(scope="session")
def session(tiny_model_dir):
    from tunebench.engine.infer.generate import GenerationSession

    return GenerationSession(str(tiny_model_dir), torch_dtype="float32")


def greedy(max_new_tokens: int = 24, **overrides) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=max_new_tokens, **overrides)


def answers(result: dict[str, dict]) -> dict[str, tuple]:
    """What a generation said, without its timings."""
    return {t: (r["text"], r["tokens"], r["finish_reason"]) for t, r in result.items()}


# ------------------------------------------------------------------ targets


def test_targets_resolve_to_adapters_and_run_settings(runs, tiny_model_dir):
    from tunebench.engine.core.targets import BASE, adapters_base, resolve_target

    run = resolve_target(str(runs["bob"]))
    assert run.adapter_dir == runs["bob"] / "adapter"
    assert run.run_dir == runs["bob"] and run.label == "bob"
    assert run.train_config["system"].startswith("You are Bob")
    assert resolve_target(str(runs["bob"] / "adapter")).run_dir == runs["bob"]
    # A run still training has no adapter/: its newest checkpoint (by step number) stands in.
    training = resolve_target(str(runs["training"]))
    assert training.adapter_dir == runs["training"] / "checkpoints" / "step-10"
    assert training.run_dir == runs["training"] and training.label == "training/step-10"
    step_2 = resolve_target(str(runs["training"] / "checkpoints" / "step-2"))
    assert adapters_base([resolve_target(BASE), step_2]) == str(tiny_model_dir)
    assert adapters_base([resolve_target(BASE)]) is None


def test_bad_targets_are_clear_user_errors(tmp_path, tiny_model_dir):
    from tunebench.engine.core.targets import resolve_target

    with pytest.raises(UserError, match="does not exist"):
        resolve_target(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="is a model, not an adapter") as given_a_model:
        resolve_target(str(tiny_model_dir))
    assert f"--model {tiny_model_dir}" in given_a_model.value.hint
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no adapter"):
        resolve_target(str(tmp_path / "empty"))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "adapter_config.json").write_text("{}")
    with pytest.raises(UserError, match="no adapter_model.safetensors"):
        resolve_target(str(tmp_path / "half"))


def test_a_folder_of_runs_names_its_runs(runs):
    """ms-swift's --output_dir given where one of its runs goes: said as such, with a run to pass."""
    from tunebench.engine.core.targets import resolve_target

    with pytest.raises(UserError, match="is a folder of runs, not a run: it holds 3") as err:
        resolve_target(str(runs["bob"].parent))
    assert str(runs["training"]) in err.value.message
    assert err.value.hint == f"pass one of them, e.g. --adapters {runs['training']} (the last by name)"


@pytest.mark.parametrize("damage", ["config-not-json", "config-a-list", "header-cut", "empty", "data-cut"])
def test_a_damaged_adapter_is_named_before_anything_loads(damage, runs, tmp_path):
    import shutil

    from tunebench.engine.core.targets import resolve_target

    adapter = tmp_path / "adapter"
    shutil.copytree(runs["plain"] / "adapter", adapter)
    config, weights = adapter / "adapter_config.json", adapter / "adapter_model.safetensors"
    size = weights.stat().st_size
    if damage == "config-not-json":
        config.write_text("{not json")
    elif damage == "config-a-list":
        config.write_text("[]")
    elif damage == "header-cut":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "empty":
        weights.write_bytes(b"")
    else:
        weights.write_bytes(weights.read_bytes()[: size - 16])  # a copy cut short in the tensors
    with pytest.raises(UserError, match="is not valid JSON|is not a JSON object|not a complete safetensors"):
        resolve_target(str(adapter))


# ------------------------------------------------------------------ decoding


def test_mixed_batch_gives_each_column_its_separate_greedy_answer(session, runs):
    targets = ["base", str(runs["plain"]), str(runs["bob"])]  # bob's system prompt: rows need padding
    together = session.generate(QUESTION, targets, greedy())
    texts = {t: r["text"] for t, r in together.items()}
    assert len(set(texts.values())) == 3, "the adapters should change the answers"
    for target in targets:
        alone = session.generate(QUESTION, [target], greedy())[target]
        assert alone["text"] == together[target]["text"]
        assert alone["tokens"] == together[target]["tokens"]


def test_fused_and_peft_mixed_batches_match_plain_peft_generate(
    session, runs, tiny_model_dir, monkeypatch, recwarn
):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from tunebench.engine.infer.lora_decode import FusedLora

    tokenizer = session.tokenizer
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    reference = PeftModel.from_pretrained(model, runs["plain"] / "adapter").eval()
    inputs = tokenizer.apply_chat_template(
        QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = reference.generate(
        **inputs, max_new_tokens=24, do_sample=False, eos_token_id=list(session.stop_ids)
    )
    expected = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    targets = ["base", str(runs["plain"])]
    fused = session.generate(QUESTION, targets, greedy())
    assert session._fused_cache, "the fused forward served that batch"
    monkeypatch.setattr(FusedLora, "build", classmethod(lambda cls, model, names, **kw: None))
    monkeypatch.setattr(session, "_fused_cache", {})  # else the batch above's fused forward is reused
    via_peft = session.generate(QUESTION, targets, greedy())
    assert fused[str(runs["plain"])]["text"] == expected
    assert via_peft[str(runs["plain"])]["text"] == expected
    assert via_peft["base"]["text"] == fused["base"]["text"]
    # On CUDA PEFT's batch decodes eagerly by choice (its row indices come from the host), and
    # the fused one is captured: no capture is tried and failed.
    assert not [w for w in recwarn if "CUDA graph capture failed" in str(w.message)]


def test_streamed_pieces_equal_the_non_streaming_answer(session, runs):
    targets = ["base", str(runs["plain"])]
    pieces: dict[str, list[str]] = {t: [] for t in targets}
    streamed = session.generate(QUESTION, targets, greedy(40), on_chunk=lambda t, p: pieces[t].append(p))
    plain = session.generate(QUESTION, targets, greedy(40))
    for target in targets:
        assert "".join(pieces[target]) == streamed[target]["text"] == plain[target]["text"]
        assert len(pieces[target]) > 1
        stats = streamed[target]
        assert stats["tokens"] == 40 and stats["finish_reason"] == "length"
        assert stats["ttft_s"] > 0 and stats["tokens_per_s"] > 0


def test_incremental_detokenizer_never_splits_a_character(tiny_tokenizer):
    from tunebench.engine.infer.prompts import IncrementalDetokenizer

    text = "你好，世界！I am 小蜂 🐝, made by TuneBench团队。"
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text) // 2  # most of these characters are split into several byte tokens
    detok = IncrementalDetokenizer(tiny_tokenizer)
    pieces = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)


def test_each_row_stops_at_its_own_end_of_turn(session, runs, monkeypatch):
    targets = ["base", str(runs["plain"])]
    first = session.generate(QUESTION, targets, greedy(1))
    base_first = session.tokenizer(first["base"]["text"], add_special_tokens=False)["input_ids"][0]
    monkeypatch.setattr(session, "stop_ids", session.stop_ids | {base_first})
    result = session.generate(QUESTION, targets, greedy(24))
    assert result["base"]["finish_reason"] == "stop" and result["base"]["text"] == ""
    assert result[str(runs["plain"])]["tokens"] > 0  # the other column went on


def test_stop_words_end_each_answer_where_they_appear_and_are_not_shown(session, runs):
    """chat's and probe's --stop_words (a `swift infer` flag): the answer ends before the stop
    text, in the stream too; the other column goes on to its own end."""
    targets = ["base", str(runs["plain"])]
    full = session.generate(QUESTION, targets, greedy(40))
    text = full["base"]["text"]
    stop = text[len(text) // 2 : len(text) // 2 + 3]  # three characters from the middle
    assert len(stop) == 3 and stop not in full[targets[1]]["text"]
    pieces: list[str] = []
    on_chunk = lambda t, p: t == "base" and pieces.append(p)  # noqa: E731
    cut = session.generate(QUESTION, targets, greedy(40, stop_words=[stop]), on_chunk=on_chunk)
    assert cut["base"]["text"] == text[: text.index(stop)] == "".join(pieces)
    assert cut["base"]["finish_reason"] == "stop"
    assert answers(cut)[targets[1]] == answers(full)[targets[1]]


def test_cancel_stops_within_one_decode_step(session, runs, monkeypatch):
    model = session.loaded.model
    forward = model.forward
    calls: list[int] = []
    monkeypatch.setattr(model, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    cancel = threading.Event()
    at_cancel: list[int] = []

    def on_chunk(target: str, piece: str) -> None:
        if not cancel.is_set():
            cancel.set()
            at_cancel.append(len(calls))

    result = session.generate(
        QUESTION, ["base", str(runs["plain"])], greedy(200), on_chunk=on_chunk, cancel=cancel
    )
    assert at_cancel and len(calls) == at_cancel[0], "no forward pass may start after cancel"
    assert {r["finish_reason"] for r in result.values()} == {"cancelled"}
    assert all(r["tokens"] < 200 for r in result.values())


@pytest.mark.parametrize("decode", ["dynamic", "static"])
def test_cancel_during_the_prefill_stops_at_the_next_layer(tiny_model_dir, runs, session, decode):
    """A long prompt's prefill takes many seconds on a CPU: Escape must not wait for all of it."""
    from tunebench.engine.infer.generate import GenerationSession
    from tunebench.engine.models.blocks import decoder_layers

    chat = GenerationSession(str(tiny_model_dir), torch_dtype="float32", decode=decode)
    targets = ["base", str(runs["plain"])]
    expected = answers(chat.generate(QUESTION, targets, greedy(24)))
    layers = decoder_layers(chat.loaded.model)
    assert len(layers) == chat.loaded.model.config.num_hidden_layers > 1
    cancel = threading.Event()
    ran: list[int] = []
    hooks = [
        layer.register_forward_hook(lambda *_, i=i: ran.append(i) or cancel.set())
        for i, layer in enumerate(layers)
    ]
    try:
        result = chat.generate(QUESTION, targets, greedy(24), cancel=cancel)
    finally:
        for hook in hooks:
            hook.remove()
    assert ran == [0], "the cancel came during the first layer: no later layer may run"
    assert {(r["finish_reason"], r["tokens"]) for r in result.values()} == {("cancelled", 0)}
    # Nothing half-done is kept: the next request answers as before.
    assert answers(chat.generate(QUESTION, targets, greedy(24))) == expected


def test_seeded_sampling_is_repeatable_and_batch_independent(session, runs):
    cfg = greedy(16, temperature=0.9, top_p=0.9, top_k=40, repetition_penalty=1.3, seed=7)
    targets = ["base", str(runs["plain"])]
    first = session.generate(QUESTION, targets, cfg)
    assert answers(session.generate(QUESTION, targets, cfg)) == answers(first)
    alone = session.generate(QUESTION, [str(runs["plain"])], cfg)
    assert alone[str(runs["plain"])]["text"] == first[str(runs["plain"])]["text"]
    other_seed = session.generate(QUESTION, targets, greedy(16, temperature=0.9, seed=8))
    assert other_seed["base"]["text"] != first["base"]["text"]


def test_sampling_knobs_mean_what_they_say(session, runs, tiny_model_dir):
    """top_k 1 or a tiny top_p leave only the likeliest token, so sampling is greedy; the repetition
    penalty is transformers' own (prompt and answer so far), checked against plain PEFT generate."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    plain = str(runs["plain"])
    targets = ["base", plain]
    expected = answers(session.generate(QUESTION, targets, greedy(16)))
    for narrow in (dict(top_k=1), dict(top_p=1e-6)):
        sampled = session.generate(QUESTION, targets, greedy(16, temperature=1.5, seed=3, **narrow))
        assert answers(sampled) == expected, narrow

    penalised = session.generate(QUESTION, targets, greedy(16, repetition_penalty=1.8))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    reference = PeftModel.from_pretrained(model, runs["plain"] / "adapter").eval()
    tokenizer = session.tokenizer
    inputs = tokenizer.apply_chat_template(
        QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.inference_mode():
        out = reference.generate(
            **inputs,
            max_new_tokens=16,
            do_sample=False,
            repetition_penalty=1.8,
            eos_token_id=list(session.stop_ids),
        )
    hf_text = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert penalised[plain]["text"] == hf_text
    assert penalised[plain]["text"] != expected[plain][0], "the penalty should change this answer"


def test_a_turn_ends_at_the_templates_end_token_even_when_eos_is_another(tiny_tokenizer):
    import copy

    from tunebench.engine.infer.prompts import stop_token_ids

    tokenizer = copy.deepcopy(tiny_tokenizer)  # the fixture is shared
    tokenizer.eos_token = "<|endoftext|>"  # base models often end documents, not turns, with EOS
    stops = stop_token_ids(tokenizer)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in stops
    assert tokenizer.convert_tokens_to_ids("<|endoftext|>") in stops
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") not in stops


# ------------------------------------------------------------------ chats and settings


def test_system_prompt_comes_from_the_argument_else_the_run(session, runs):
    from tunebench.engine.infer.prompts import encode_prompt

    bob = str(runs["bob"])
    run_system = "You are Bob, made by the TuneBench team."
    from_run = session.generate(QUESTION, [bob], greedy())[bob]["text"]
    explicit = session.generate(QUESTION, [bob], greedy(), system=run_system)[bob]["text"]
    other = session.generate(QUESTION, [bob], greedy(), system="You are Alice.")[bob]["text"]
    assert from_run == explicit != other
    # The base column is asked with the adapter run's system prompt too.
    side_by_side = session.generate(QUESTION, ["base", bob], greedy())
    assert (
        side_by_side["base"]["text"]
        == session.generate(QUESTION, ["base"], greedy(), system=run_system)["base"]["text"]
    )
    prompt = session.tokenizer.decode(encode_prompt(session.tokenizer, QUESTION, "", run_system))
    assert prompt.startswith(f"<|im_start|>system\n{run_system}<|im_end|>")
    assert prompt.endswith("<|im_start|>assistant\n")


def test_multi_turn_history_per_target(session, runs):
    plain = str(runs["plain"])
    first = session.generate(QUESTION, ["base", plain], greedy(8))
    follow_up = {"role": "user", "content": "And who made you?"}
    histories = {
        target: [*QUESTION, {"role": "assistant", "content": first[target]["text"]}, follow_up]
        for target in ("base", plain)
    }
    together = session.generate(histories, ["base", plain], greedy(12))
    for target in ("base", plain):
        assert (
            together[target]["text"]
            == session.generate(histories[target], [target], greedy(12))[target]["text"]
        )


def test_probe_batches_match_single_chats(session, runs):
    questions = [[{"role": "user", "content": q}] for q in ("Who are you?", "你是谁？", "Hello")]
    targets = ["base", str(runs["plain"])]
    many = session.generate_many(questions, targets, greedy(10))
    assert len(many) == 3
    for conversation, result in zip(questions, many, strict=True):
        assert answers(result) == answers(session.generate(conversation, targets, greedy(10)))


def test_adapter_of_another_base_is_refused(session, tmp_path_factory):
    from tiny import make_tiny_model_dir

    other = make_tiny_model_dir(tmp_path_factory.mktemp("other") / "model", seed=5)
    run = make_run(tmp_path_factory.mktemp("other-runs"), other, "other", seed=4)
    with pytest.raises(UserError, match="was trained on"):
        session.generate(QUESTION, [str(run)], greedy(4))


# ------------------------------------------------------------------ demo model


@pytest.mark.slow
def test_demo_model_two_columns_stream_chinese_and_agree(tmp_path):
    from tunebench.engine.infer.generate import GenerationSession
    from tunebench.engine.models.loading import resolve_model

    demo = resolve_model("demo").path
    run = make_run(tmp_path, demo, "demo-run", seed=0)
    session = GenerationSession("demo")
    targets = ["base", str(run)]
    pieces: dict[str, list[str]] = {t: [] for t in targets}
    chat = [{"role": "user", "content": "Translate into Chinese: Good morning, my friend."}]
    together = session.generate(chat, targets, greedy(32), on_chunk=lambda t, p: pieces[t].append(p))
    for target in targets:
        assert "".join(pieces[target]) == together[target]["text"]
        assert not any("\ufffd" in p for p in pieces[target])
        assert session.generate(chat, [target], greedy(32))[target]["text"] == together[target]["text"]
    assert together["base"]["text"] != together[str(run)]["text"]
    assert any("\u4e00" <= ch <= "\u9fff" for ch in together["base"]["text"])


def test_static_cache_path_matches_the_dynamic_one(tiny_model_dir, runs, session, recwarn):
    from tunebench.engine.infer.generate import GenerationSession

    static = GenerationSession(str(tiny_model_dir), torch_dtype="float32", decode="static")
    targets = ["base", str(runs["plain"]), str(runs["bob"])]  # bob's system prompt: padded rows
    expected = answers(session.generate(QUESTION, targets, greedy(24)))
    assert answers(static.generate(QUESTION, targets, greedy(24))) == expected
    bob = str(runs["bob"])
    assert answers(static.generate(QUESTION, [bob], greedy(24)))[bob] == expected[bob]
    # The cache goes by the name this transformers gives it (no deprecation warning per step).
    assert not [w for w in recwarn if "past_key_values" in str(w.message)]


def test_an_adapter_saved_again_in_place_is_reloaded(session, tiny_model_dir, tmp_path):
    import shutil

    first = make_run(tmp_path / "a", tiny_model_dir, "resaved", seed=21)
    second = make_run(tmp_path / "b", tiny_model_dir, "resaved", seed=22)
    before = session.generate(QUESTION, [str(first)], greedy(12))[str(first)]["text"]
    for name in ("adapter_config.json", "adapter_model.safetensors"):  # training saves again
        shutil.copy(second / "adapter" / name, first / "adapter" / name)
    after = session.generate(QUESTION, [str(first)], greedy(12))[str(first)]["text"]
    assert after != before
    assert after == session.generate(QUESTION, [str(second)], greedy(12))[str(second)]["text"]
    live = {name for name, _ in session._adapters.values()}
    assert set(session.peft.peft_config) == live


def test_gpu_decode_options_give_the_same_answers(tiny_model_dir, runs, session, monkeypatch):
    """The CUDA defaults, run here on the CPU: fused base projections (q/k/v and gate/up weights
    laid out as one buffer), packed one-token GQA attention, each way of running the LoRA A pass,
    and a static cache whose attention window is small enough that decoding crosses several
    windows, reused by later requests."""
    import torch
    from tunebench.engine.infer import lora_decode as fused_lora
    from tunebench.engine.infer.generate import GenerationSession

    targets = ["base", str(runs["plain"]), str(runs["bob"])]  # bob's system prompt: padded rows
    expected = answers(session.generate(QUESTION, targets, greedy(24)))
    for low_rank_pass in ("bmm_ax", "mulsum", "bmm_xa", fused_lora.GPU_LOW_RANK_PASS):  # CUDA's last
        monkeypatch.setattr(fused_lora, "CPU_LOW_RANK_PASS", low_rank_pass)
        fast = GenerationSession(str(tiny_model_dir), torch_dtype="float32", decode="static")
        fast.fuse_base = fast.packed_gqa = True
        fast.attention_window = 8
        assert answers(fast.generate(QUESTION, targets, greedy(24))) == expected, low_rank_pass
    decoder = fast._decoder
    assert answers(fast.generate(QUESTION, targets, greedy(24))) == expected
    assert fast._decoder is decoder, "a request that fits reuses the static cache"
    bob = str(runs["bob"])
    assert answers(fast.generate(QUESTION, [bob], greedy(24)))[bob] == expected[bob]
    # CUDA's row-slice pass, where one run of rows holds every adapted row (base | adapter).
    monkeypatch.setattr(fused_lora, "ROW_SLICE_DEVICES", frozenset({"cpu", "cuda"}))  # on a GPU box too
    plain = str(runs["plain"])
    pair = ["base", plain]
    assert answers(fast.generate(QUESTION, pair, greedy(24))) == {t: expected[t] for t in pair}
    (fused,) = [
        f for names, f in fast._fused_cache.items() if len(names) == 2 and names[0] == "__base__" != names[1]
    ]
    assert any(g.row_run is not None for g in fused.groups)
    # Alone, the adapter's column runs beside a ghost of the base: a run of one row, as above.
    assert answers(fast.generate(QUESTION, [plain], greedy(24)))[plain] == expected[plain]

    # The fused layout keeps one copy of the weights: each projection is a view of its group's buffer.
    attention = fast.loaded.model.model.layers[0].self_attn
    q, k, v = (getattr(attention, n).base_layer.weight for n in ("q_proj", "k_proj", "v_proj"))
    assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
    assert k.data_ptr() == q.data_ptr() + q.numel() * q.element_size()
    stored = {
        p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in fast.loaded.model.parameters()
    }
    params = sum(p.numel() * p.element_size() for p in fast.loaded.model.parameters())
    assert sum(stored.values()) == params
    with torch.no_grad():
        base_only = answers(fast.generate(QUESTION, ["base"], greedy(24)))
    assert base_only["base"] == expected["base"]


def test_static_decoder_is_reused_only_for_the_same_rows(tiny_model_dir, runs, session, monkeypatch):
    """A static decoder's CUDA graphs bake in which adapter each row runs, so a batch with as many
    rows but other adapters gets its own decoder (here with PEFT's own forward, no fused one)."""
    from tunebench.engine.infer.generate import GenerationSession
    from tunebench.engine.infer.lora_decode import FusedLora

    plain, bob = str(runs["plain"]), str(runs["bob"])
    expected = {
        tuple(t): answers(session.generate(QUESTION, t, greedy(12))) for t in (["base", plain], [bob, plain])
    }
    static = GenerationSession(str(tiny_model_dir), torch_dtype="float32", decode="static")
    monkeypatch.setattr(FusedLora, "build", classmethod(lambda cls, model, names, **kw: None))
    decoders = []
    for targets in (["base", plain], [bob, plain], [bob, plain]):
        assert answers(static.generate(QUESTION, targets, greedy(12))) == expected[tuple(targets)]
        decoders.append(static._decoder)
    assert decoders[0] is not decoders[1] and decoders[1] is decoders[2]


def test_an_answer_ends_where_the_context_does(session):
    """A prompt just short of the context: the answer stops at the context's end ("length"), not
    max_new_tokens later at positions the model never saw."""
    from tunebench.engine.infer.prompts import encode_prompt

    prompt = encode_prompt(session.tokenizer, QUESTION, "", "")
    full = session.context_length
    try:
        session.context_length = len(prompt) + 5
        text, tokens, finish = answers(session.generate(QUESTION, ["base"], greedy(24)))["base"]
    finally:
        session.context_length = full
    assert (tokens, finish) == (5, "length")


def test_a_default_dtype_load_on_the_cpu_is_float32(tiny_model_dir):
    """Issue 16 item 9: bfloat16 on a CPU gave batch-dependent greedy answers (a 4-question probe,
    a 1-question probe and plain transformers disagreed), so `auto` means float32 on a CPU even
    where it multiplies bfloat16 natively (this test's CPU may well do so)."""
    import torch
    from tunebench.engine.infer.generate import GenerationSession

    if torch.cuda.is_available():
        pytest.skip("a CUDA box decodes in bfloat16 by default")
    session = GenerationSession(str(tiny_model_dir))
    assert next(session.loaded.model.parameters()).dtype == torch.float32


@pytest.mark.gpu
def test_cuda_decode_speed_options_each_give_the_same_greedy_answers(tiny_model_dir, runs, monkeypatch):
    """On CUDA (graphs, fused weights, liger where installed): the row-slice LoRA pass and the
    in-place rotary embedding against each switched off, and a compiled decode step, for the
    chat's two columns and a lone adapter column."""
    from tunebench.engine.infer import lora_decode
    from tunebench.engine.infer.generate import GenerationSession
    from tunebench.engine.models import kernels

    plain = str(runs["plain"])

    def generate(**options):
        session = GenerationSession(str(tiny_model_dir), torch_dtype="float32")
        assert session.loaded.device.type == "cuda" and session.decode_mode == "graphs"
        for name, value in options.items():
            setattr(session, name, value)
        both = answers(session.generate(QUESTION, ["base", plain], greedy(24)))
        return both, answers(session.generate(QUESTION, [plain], greedy(24)))[plain]

    expected = generate()
    assert expected[0][plain] == expected[1], "alone as beside the base"
    compiled = generate(compile_step=True)
    monkeypatch.setattr(kernels, "ROPE_IN_PLACE", False)
    assert generate() == expected
    compiled_with_copies = generate(compile_step=True)
    monkeypatch.setattr(lora_decode, "ROW_SLICE_DEVICES", frozenset())
    assert generate() == expected
    assert compiled == expected, f"compiled, rotary copies instead: {compiled_with_copies == expected}"


@pytest.mark.gpu
def test_cuda_decode_with_a_in_the_base_matmul_gives_the_same_greedy_answers(
    tiny_model_dir, runs, monkeypatch
):
    """A_IN_BASE_DEVICES (the low-rank products from the base matmul) against the separate
    low-rank passes, with the row-slice pass and with the mask way, for the chat's two columns, a
    lone adapter column, and the two columns again after the lone one's forward took the spare rows."""
    from tunebench.engine.infer import lora_decode
    from tunebench.engine.infer.generate import GenerationSession

    plain = str(runs["plain"])

    def generate():
        session = GenerationSession(str(tiny_model_dir), torch_dtype="float32")
        assert session.loaded.device.type == "cuda" and session.decode_mode == "graphs"
        both = answers(session.generate(QUESTION, ["base", plain], greedy(24)))
        alone = answers(session.generate(QUESTION, [plain], greedy(24)))[plain]
        return both, alone, answers(session.generate(QUESTION, ["base", plain], greedy(24)))

    monkeypatch.setattr(lora_decode, "A_IN_BASE_DEVICES", frozenset())
    expected = generate()
    monkeypatch.setattr(lora_decode, "A_IN_BASE_DEVICES", frozenset({"cuda"}))
    assert generate() == expected
    monkeypatch.setattr(lora_decode, "ROW_SLICE_DEVICES", frozenset())
    assert generate() == expected


def test_a_in_the_base_matmul_answers_as_the_separate_passes_in_a_session(tiny_model_dir, runs, monkeypatch):
    """The session's own path to it (the base weights laid out once, forwards cached per layout)
    on this machine's device: the two columns, a lone adapter column, then the two again."""
    import torch
    from tunebench.engine.infer import lora_decode
    from tunebench.engine.infer.generate import GenerationSession

    plain = str(runs["plain"])

    def generate():
        session = GenerationSession(str(tiny_model_dir), torch_dtype="float32")
        session.fuse_base = True  # as on CUDA
        both = answers(session.generate(QUESTION, ["base", plain], greedy(16)))
        alone = answers(session.generate(QUESTION, [plain], greedy(16)))[plain]
        again = answers(session.generate(QUESTION, ["base", plain], greedy(16)))
        groups = [g for fused in session._fused_cache.values() for g in fused.groups if g.has_lora]
        return (both, alone, again), groups

    monkeypatch.setattr(lora_decode, "A_IN_BASE_DEVICES", frozenset())
    expected, groups = generate()
    assert groups and not any(g.base_with_a is not None for g in groups)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    monkeypatch.setattr(lora_decode, "A_IN_BASE_DEVICES", frozenset({device}))
    got, groups = generate()
    assert groups and all(g.base_with_a is not None for g in groups)
    assert got == expected
