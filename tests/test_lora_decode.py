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


@pytest.fixture
def a_in_base(monkeypatch):
    """A fresh two-adapter model laid out with spare rows for A in the base matmul (on the CPU,
    as A_IN_BASE_DEVICES would on a GPU), and a record of the low-rank passes run on their own:
    F.linear calls whose weight is some group's stacked A, and the CPU's batched way of them."""
    from peft import LoraConfig, get_peft_model

    monkeypatch.setattr(lora_decode, "A_IN_BASE_DEVICES", frozenset({"cpu"}))
    torch.manual_seed(4)
    peft = get_peft_model(
        tiny_qwen2(seed=3), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"), adapter_name=A
    )
    peft.add_adapter(B, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"]))
    for name, param in peft.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0.0, 0.5)
    peft.eval()
    assert fuse_sibling_weights(peft) == 2 * 4  # q/k/v, gate/up, o_proj and down_proj in each of 2 layers
    low_rank_passes = []
    linear = torch.nn.functional.linear

    def recording_linear(x, weight, bias=None):
        if weight.shape[0] <= 3 * (4 + 2):  # a stacked A: no base projection of this model is so narrow
            low_rank_passes.append(tuple(weight.shape))
        return linear(x, weight, bias)

    bmm = torch.bmm

    def recording_bmm(x, y):
        low_rank_passes.append(("bmm", tuple(y.shape)))
        return bmm(x, y)

    monkeypatch.setattr(torch.nn.functional, "linear", recording_linear)
    monkeypatch.setattr(torch, "bmm", recording_bmm)
    return peft, low_rank_passes


@pytest.mark.parametrize("row_slices", [False, True])
@pytest.mark.parametrize("names", [(PEFT_BASE, A), (A, PEFT_BASE, B), (B, B)])
def test_a_in_the_base_matmul_answers_as_peft_with_no_low_rank_pass_of_its_own(
    a_in_base, monkeypatch, names, row_slices
):
    model, low_rank_passes = a_in_base
    monkeypatch.setattr(lora_decode, "ROW_SLICE_DEVICES", frozenset({"cpu"} if row_slices else ()))
    ids = torch.randint(0, 128, (len(names), 5))
    fused, got = fused_logits(model, ids, names, fuse_base=True)
    adapted = [g for g in fused.groups if g.has_lora]
    assert adapted and all(g.base_with_a is not None for g in adapted)
    assert low_rank_passes == []
    torch.testing.assert_close(got, peft_logits(model, ids, names), rtol=1e-5, atol=1e-5)


def test_forwards_built_for_other_adapters_take_turns_with_the_spare_rows(a_in_base):
    """Each chat layout keeps its own FusedLora (generate.py caches them by layout): the one used
    writes its A into the spare rows again after another wrote there."""
    model, _ = a_in_base
    ids = torch.randint(0, 128, (2, 5))
    with torch.no_grad():
        first = FusedLora.build(model, [PEFT_BASE, A], fuse_base=True)
        second = FusedLora.build(model, [PEFT_BASE, B], fuse_base=True)
        for fused, names in ((first, (PEFT_BASE, A)), (second, (PEFT_BASE, B)), (first, (PEFT_BASE, A))):
            with fused.installed():
                got = model(ids).logits
            torch.testing.assert_close(got, peft_logits(model, ids, names), rtol=1e-5, atol=1e-5)


def test_adapters_of_more_rank_than_the_spare_rows_take_the_low_rank_pass(a_in_base):
    model, low_rank_passes = a_in_base
    names = (PEFT_BASE, A)
    ids = torch.randint(0, 128, (2, 5))
    with torch.no_grad():
        for module in model.modules():  # as if laid out with 4 spare rows: q/k/v's 3 x 4 do not fit
            if hasattr(module, lora_decode.SPARE_ROWS_MARK):
                setattr(module, lora_decode.SPARE_ROWS_MARK, 4)
    fused, got = fused_logits(model, ids, names, fuse_base=True)
    by_width = {len(g.members): g.base_with_a is not None for g in fused.groups if g.has_lora}
    assert by_width == {3: False, 2: False, 1: True}  # o_proj's and down_proj's rank 4 fit
    assert low_rank_passes
    torch.testing.assert_close(got, peft_logits(model, ids, names), rtol=1e-5, atol=1e-5)


def test_spare_rows_are_only_those_the_layout_marked():
    """A loader may put another weight right after this one in memory: without fuse_sibling_weights'
    mark those bytes are not spare rows, and A is never written over them."""
    buffer = torch.zeros(8, 4)
    linear = torch.nn.Linear(4, 4, bias=False)
    linear.weight.data = buffer[:4]
    assert lora_decode._spare_rows([linear]) == 0
    setattr(linear, lora_decode.SPARE_ROWS_MARK, 4)
    assert lora_decode._spare_rows([linear]) == 4
    setattr(linear, lora_decode.SPARE_ROWS_MARK, 5)  # more than the buffer holds
    assert lora_decode._spare_rows([linear]) == 0


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
