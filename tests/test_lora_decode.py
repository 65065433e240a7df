"""The mixed-adapter decode forward (engine/infer/lora_decode.py) against PEFT's own mixed batch:
each way of running the low-rank pass gives PEFT's logits for every row layout."""

from __future__ import annotations

import pytest
import torch
from test_accel import tiny_qwen2
from tunebench.engine.infer import lora_decode
from tunebench.engine.infer.lora_decode import PEFT_BASE, FusedLora, fuse_sibling_weights

A, B = "first", "second"


@pytest.fixture(scope="module")
def two_adapters():
    """A tiny Qwen2 with adapter `first` on every linear and `second` on q_proj and down_proj only (so some
    of a group's members have no block of `second`), both with random B."""
    from peft import LoraConfig, get_peft_model

    model = tiny_qwen2(seed=3)
    torch.manual_seed(4)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"), adapter_name=A)
    peft.add_adapter(B, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"]))
    for name, param in peft.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0.0, 0.5)
    return peft.eval()


def peft_logits(peft, ids, names):
    with torch.no_grad():
        return peft(ids, adapter_names=list(names)).logits


def fused_logits(peft, ids, names, **build):
    with torch.no_grad():  # as the engine builds it, inside inference_mode
        fused = FusedLora.build(peft, list(names), **build)
        assert fused is not None
        with fused.installed():
            return fused, peft(ids).logits


@pytest.mark.parametrize("fuse_base", [False, True])
@pytest.mark.parametrize(
    ("names", "one_run"),
    [
        ((PEFT_BASE, A), True),  # the chat's two columns
        ((A, A), True),  # a lone column beside its ghost
        ((PEFT_BASE, B, B, PEFT_BASE), True),
        ((B, PEFT_BASE, B), False),  # one adapter, two runs
        ((A, PEFT_BASE, B), False),  # two adapters
        ((PEFT_BASE, PEFT_BASE), False),  # nothing adapted
    ],
)
def test_row_slice_pass_matches_peft_where_one_run_holds_every_adapted_row(
    two_adapters, monkeypatch, names, one_run, fuse_base
):
    monkeypatch.setattr(lora_decode, "ROW_SLICE_DEVICES", frozenset({"cpu"}))
    if fuse_base:
        fuse_sibling_weights(two_adapters)
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (len(names), 5))
    expected = peft_logits(two_adapters, ids, names)
    fused, got = fused_logits(two_adapters, ids, names, fuse_base=fuse_base)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    runs = [g.row_run for g in fused.groups if g.has_lora]
    assert all((run is not None) == one_run for run in runs)
    assert runs or not one_run
    # The mask way gives the same logits for the same layout.
    monkeypatch.setattr(lora_decode, "ROW_SLICE_DEVICES", frozenset())
    _, masked = fused_logits(two_adapters, ids, names, fuse_base=fuse_base)
    torch.testing.assert_close(got, masked, rtol=1e-5, atol=1e-5)


def test_a_layout_set_later_keeps_the_mask_way(two_adapters, monkeypatch):
    """The serving batcher builds once with `adapters=` and moves rows in place under captured
    graphs: its forward never bakes a run of rows in."""
    monkeypatch.setattr(lora_decode, "ROW_SLICE_DEVICES", frozenset({"cpu"}))
    names = (PEFT_BASE, A)
    ids = torch.randint(0, 128, (2, 5))
    with torch.no_grad():
        fused = FusedLora.build(two_adapters, [PEFT_BASE] * 2, adapters=[A, B])
        fused.set_rows(names)
        with fused.installed():
            got = two_adapters(ids).logits
    assert all(g.row_run is None for g in fused.groups if g.has_lora)
    torch.testing.assert_close(got, peft_logits(two_adapters, ids, names), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def query_value_adapter():
    """PEFT's default LoRA for Qwen2 (q_proj and v_proj only): k_proj, gate_proj and up_proj stay
    plain nn.Linear inside groups whose other members are LoRA layers."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(5)
    peft = get_peft_model(tiny_qwen2(seed=6), LoraConfig(r=4, lora_alpha=8), adapter_name=A)
    for name, param in peft.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0.0, 0.5)
    return peft.eval()


@pytest.mark.parametrize("row_slices", [False, True])
def test_plain_projections_beside_lora_ones_answer_as_peft(query_value_adapter, monkeypatch, row_slices):
    """Without the fused base matmul a plain k_proj computes its own output inside the group
    (it used to call itself, whose forward is the group's, and recurse)."""
    monkeypatch.setattr(lora_decode, "ROW_SLICE_DEVICES", frozenset({"cpu"} if row_slices else ()))
    names = (PEFT_BASE, A)
    ids = torch.randint(0, 128, (2, 5))
    _, got = fused_logits(query_value_adapter, ids, names)
    torch.testing.assert_close(got, peft_logits(query_value_adapter, ids, names), rtol=1e-5, atol=1e-5)


def test_rows_set_again_on_a_fixed_layout_leave_the_row_slice_pass(two_adapters, monkeypatch):
    """Every projection reads the layout per call: rows moved so that no single run holds them
    take the mask way, single projections (o_proj, down_proj) included."""
    monkeypatch.setattr(lora_decode, "ROW_SLICE_DEVICES", frozenset({"cpu"}))
    ids = torch.randint(0, 128, (3, 5))
    with torch.no_grad():
        fused = FusedLora.build(two_adapters, [PEFT_BASE, A, PEFT_BASE])
        with fused.installed():
            fused.set_rows([A, PEFT_BASE, A])
            assert not any(g.runs_rows for g in fused.groups)
            got = two_adapters(ids).logits
    expected = peft_logits(two_adapters, ids, (A, PEFT_BASE, A))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
