"""ms-swift's LoRA variant flags (--use_dora, --use_rslora, --init_weights, --modules_to_save,
--lorap_lr_ratio) reach PEFT's LoraConfig and the optimizer, and train on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch
from test_train import make_cfg, run
from tiny import write_identity_dataset
from tunebench.engine.cli.flags import flag_values
from tunebench.engine.cli.train import build_train_parser
from tunebench.engine.core.config import ConfigError, TrainConfig
from tunebench.engine.train.adapter import attach_lora, optimizer_groups


@pytest.fixture
def identity_file(tmp_path):
    return write_identity_dataset(tmp_path / "identity.jsonl", 12)


def parsed(*argv: str) -> TrainConfig:
    return TrainConfig(**flag_values(build_train_parser().parse_args(list(argv))))


def test_the_variant_flags_parse_as_ms_swift_writes_them():
    cfg = parsed(
        "--use_dora", "true", "--use_rslora", "True", "--init_weights", "Gaussian",
        "--modules_to_save", "embed_tokens,lm_head", "--lorap_lr_ratio", "16",
    )  # fmt: skip
    assert (cfg.use_dora, cfg.use_rslora, cfg.init_weights) == (True, True, "gaussian")
    assert cfg.modules_to_save == ["embed_tokens", "lm_head"] and cfg.lorap_lr_ratio == 16.0
    assert parsed("--init_weights", "PiSSA").init_weights == "pissa"
    with pytest.raises(ConfigError, match="init_weights: 'kaiming' is not one of true, false, gaussian"):
        TrainConfig(init_weights="kaiming")


def test_dora_rslora_gaussian_and_modules_to_save_reach_peft_and_train(
    tiny_model_dir, identity_file, tmp_path
):
    cfg = make_cfg(
        tiny_model_dir,
        identity_file,
        tmp_path,
        max_steps=2,
        use_dora=True,
        use_rslora=True,
        init_weights="gaussian",
        modules_to_save=["lm_head"],
        run_name="dora",
    )
    result, events = run(cfg)
    assert result.status == "completed" and result.steps == 2
    saved = json.loads((tmp_path / "dora" / "adapter" / "adapter_config.json").read_text())
    assert saved["use_dora"] is True and saved["use_rslora"] is True
    assert saved["init_lora_weights"] == "gaussian"
    # the tiny model's head is tied to its embeddings: PEFT trains the pair as one, kept tied
    assert saved["modules_to_save"] == ["model.embed_tokens"] and saved["ensure_weight_tying"] is True


def test_pissa_init_changes_the_base_weights_peft_way(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    cfg = TrainConfig(model=str(tiny_model_dir), init_weights="pissa", target_modules=["q_proj"])
    peft_model = attach_lora(model, cfg, recompute=False)
    assert peft_model.peft_config["default"].init_lora_weights == "pissa"
    b = next(p for n, p in peft_model.named_parameters() if "lora_B" in n)
    assert b.abs().sum() > 0  # PiSSA starts B from the principal singular vectors, not zeros


def test_lora_plus_puts_the_b_matrices_in_a_faster_group(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = attach_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), TrainConfig(), recompute=False)
    (plain,) = optimizer_groups(model, TrainConfig(learning_rate=1e-4))
    assert plain["lr"] == 1e-4
    slow, fast = optimizer_groups(model, TrainConfig(learning_rate=1e-4, lorap_lr_ratio=16))
    names = {id(p): n for n, p in model.named_parameters()}
    assert fast["lr"] == pytest.approx(1.6e-3) and slow["lr"] == 1e-4
    assert fast["params"] and all("lora_B" in names[id(p)] for p in fast["params"])
    assert slow["params"] and all("lora_A" in names[id(p)] for p in slow["params"])
    assert len(slow["params"]) + len(fast["params"]) == len(plain["params"])


def test_lora_plus_trains_with_two_learning_rates(tiny_model_dir, identity_file, tmp_path):
    result, events = run(make_cfg(tiny_model_dir, identity_file, tmp_path, max_steps=2, lorap_lr_ratio=16))
    assert result.status == "completed"
    assert all(e.loss == e.loss for e in events if e.type == "TrainStep")


def test_the_fast_path_hands_dora_to_peft_and_says_what_it_costs():
    from tunebench.engine.cuda.path import FastPath

    plain = FastPath(TrainConfig(), torch.device("cpu"), "fast")
    assert "lora" in plain.use and not any("DoRA" in n for n in plain.describe())
    dora = FastPath(TrainConfig(use_dora=True), torch.device("cpu"), "fast")
    assert "lora" not in dora.use
    (note,) = [n for n in dora.describe() if "DoRA" in n]
    assert "PEFT's LoRA layers" in note and "more memory" in note and "slower" in note


@pytest.mark.parametrize("dora", [False, True])
def test_the_memory_model_counts_what_peft_trains(tiny_model_dir, dora):
    """DoRA's magnitude vectors (one per output feature of each adapted layer) are counted."""
    from transformers import AutoModelForCausalLM
    from tunebench.engine.core.memory_model import lora_parameters

    model = attach_lora(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), TrainConfig(use_dora=dora), False
    )
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert lora_parameters(model.config, 8, ("all-linear",), dora=dora) == trained


def test_attn_impl_sets_the_kernel_and_a_missing_one_says_how_to_get_it(tiny_model_dir):
    from transformers import AutoModelForCausalLM
    from tunebench.engine.core.errors import UserError
    from tunebench.engine.train.adapter import use_attention_kernel

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    use_attention_kernel(model, "eager")
    assert model.config._attn_implementation == "eager"
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="--attn_impl flash_attn") as caught:
            use_attention_kernel(model, "flash_attn")
        assert "pip install flash-attn" in caught.value.hint
    assert parsed("--attn_implementation", "sdpa").attn_impl == "sdpa"  # the HF spelling too


def test_model_type_is_informational_and_noted_when_it_disagrees(tiny_model_dir, identity_file, tmp_path):
    cfg = make_cfg(
        tiny_model_dir, identity_file, tmp_path, max_steps=1, model_type="llama3", attn_impl="eager"
    )
    result, events = run(cfg)
    assert result.status == "completed"
    (note,) = [e.message for e in events if e.type == "Log" and "--model_type" in e.message]
    assert "--model_type llama3" in note and "changes nothing" in note


def test_a_named_attention_kernel_turns_packing_off_and_says_so():
    from tunebench.engine.cuda.path import FastPath

    path = FastPath(TrainConfig(attn_impl="sdpa"), torch.device("cpu"), "fast")
    assert "pack" not in path.use
    assert any("--attn_impl sdpa: samples are padded" in n for n in path.describe())


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_pissa_or_olora_adapter_applies_to_the_unchanged_base(
    tiny_model_dir, identity_file, tmp_path, init
):
    """Those inits move part of the base into the adapter; the adapter the run saves must be plain
    LoRA (PEFT would otherwise redo the decomposition at every load, and servers that read LoRA
    files, such as vLLM, would apply it to the wrong base), giving the trained model's output on
    the base as it is on disk."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from tunebench.engine.train import recipe

    trained = {}
    attach = recipe.attach_lora

    def keep(model, cfg, recompute):
        trained["model"] = attach(model, cfg, recompute)
        return trained["model"]

    # float32 on any device: the comparison below is to 1e-4, past what a 16-bit residual keeps
    cfg = make_cfg(
        tiny_model_dir,
        identity_file,
        tmp_path,
        max_steps=2,
        init_weights=init,
        run_name="r",
        torch_dtype="float32",
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(recipe, "attach_lora", keep)
        result, _ = run(cfg)
    model = trained["model"].eval()
    device = next(model.parameters()).device  # the GPU where the run trained on one
    ids = torch.tensor([[5, 17, 42, 99, 3]], device=device)
    with torch.no_grad():
        expected = model(ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).to(device)
        base_logits = base(ids).logits
        loaded = PeftModel.from_pretrained(base, result.adapter_dir).eval()
        got = loaded(ids).logits
    assert not torch.allclose(expected, base_logits, atol=1e-4)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    saved = json.loads((tmp_path / "r" / "adapter" / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] is True and saved["r"] == 2 * cfg.lora_rank


def test_pissa_with_dora_is_refused_with_the_way_out():
    with pytest.raises(ConfigError, match="drop --use_dora, or use --init_weights true"):
        TrainConfig(use_dora=True, init_weights="pissa")


def test_report_to_tensorboard_writes_the_curves_under_the_run_folder(
    tiny_model_dir, identity_file, tmp_path
):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install tensorboard)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = make_cfg(
        tiny_model_dir,
        identity_file,
        tmp_path,
        max_steps=4,
        val_ratio=0.2,
        run_name="tb",
        report_to="tensorboard",
    )
    result, events = run(cfg)
    assert result.status == "completed"
    board = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    board.Reload()
    steps = [(e.step, e.loss) for e in events if e.type == "TrainStep"]
    written = [(s.step, s.value) for s in board.Scalars("train/loss")]
    assert [s for s, _ in written] == [s for s, _ in steps]
    assert [v for _, v in written] == pytest.approx([v for _, v in steps])
    assert [s.step for s in board.Scalars("eval/loss")] == [e.step for e in events if e.type == "EvalResult"]


def test_no_tracker_writes_nothing_but_metrics(tiny_model_dir, identity_file, tmp_path):
    result, _ = run(make_cfg(tiny_model_dir, identity_file, tmp_path, max_steps=1, run_name="plain"))
    assert result.status == "completed"
    assert not (tmp_path / "plain" / "tensorboard").exists()
