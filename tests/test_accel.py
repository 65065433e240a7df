"""The CUDA fast path's math on CPU: packing, per-document attention, loss and LoRA equal the plain path."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from tiny import QWEN25_7B
from torch.utils._python_dispatch import TorchDispatchMode
from tunebench.engine.core.config import TrainConfig
from tunebench.engine.core.memory_model import (
    LOSS_SLICE_TOKENS,
    MLP_CHUNK_TOKENS,
    REPLAY_LAYERS_IN_GRAPH,
    estimate_peak_bytes,
    layer_activation_bytes,
    loss_bytes,
    mlp_chunks,
)
from tunebench.engine.cuda import compiling, fused_loss, packing
from tunebench.engine.cuda import lora_train as lora_ops
from tunebench.engine.cuda import path as accel
from tunebench.engine.train.adapter import attach_lora
from tunebench.engine.train.plain import collate, forward_loss_sum
from tunebench.engine.train.types import IGNORE

GIB = 1024**3


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]


def make_samples(lengths, vocab=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        prompt = max(1, n // 3)
        out.append(Sample(ids, [IGNORE] * prompt + ids[prompt:]))
    return out


def tiny_qwen2(seed=0, intermediate_size=128):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    return Qwen2ForCausalLM(config).float()


def lora_model(path: accel.FastPath | None, recompute=False, seed=0, intermediate_size=128):
    cfg = TrainConfig(lora_rank=4, lora_alpha=8, lora_dropout=0.0, gradient_checkpointing=recompute)
    model = tiny_qwen2(seed, intermediate_size)
    if path is not None:
        model = path.prepare_base(model)
    torch.manual_seed(1)
    model = attach_lora(model, cfg, recompute)
    with torch.no_grad():  # a non-zero B so the adapter changes the output and gets gradients everywhere
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    model.train()
    return model, cfg


def fast_path(recompute=False):
    cfg = TrainConfig(gradient_checkpointing=recompute)
    path = accel.FastPath(cfg, torch.device("cpu"), "fast")
    path.use.discard("compile")  # compiling takes a minute on a CPU; the math is the same
    return path


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_pack_layout():
    samples = [
        Sample([5, 6, 7], [IGNORE, 6, 7]),
        Sample([8, 9], [IGNORE, IGNORE]),
        Sample([1, 2, 3, 4], [1, 2, 3, 4]),
    ]
    b = packing.pack(samples, torch.device("cpu"))
    assert b.input_ids.tolist() == [[5, 6, 7, 8, 9, 1, 2, 3, 4]]
    assert b.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    assert b.cu_seqlens.tolist() == [0, 3, 5, 9]
    assert b.max_len == 4 and b.tokens == 9
    # each position predicts the next token of its own sample; a sample's last token predicts nothing
    assert b.loss_index.tolist() == [0, 1, 5, 6, 7]
    assert b.loss_targets.tolist() == [6, 7, 2, 3, 4]
    assert b.target_tokens == collate(samples, 0, torch.device("cpu")).target_tokens


@pytest.mark.parametrize("recompute", [False, True])
def test_packed_loss_and_grads_equal_the_padded_plain_path(recompute):
    samples = make_samples([37, 5, 64, 20])
    plain, _ = lora_model(None, recompute)
    loss_plain = forward_loss_sum(plain, collate(samples, 0, torch.device("cpu")))
    loss_plain.backward()

    path = fast_path(recompute)
    fast, _ = lora_model(path, recompute)
    batch = path.collate(samples, 0, torch.device("cpu"))
    assert isinstance(batch, packing.PackedBatch)
    loss_fast = path.loss_sum(fast, batch)
    loss_fast.backward()

    assert any("LoRA" in a for a in path.applied)
    assert math.isclose(loss_fast.item(), loss_plain.item(), rel_tol=1e-5)
    g_plain, g_fast = grads(plain), grads(fast)
    assert g_plain.keys() == g_fast.keys() and g_plain
    for name in g_plain:
        torch.testing.assert_close(g_fast[name], g_plain[name], rtol=1e-4, atol=1e-6, msg=name)


def test_no_attention_across_samples():
    """Changing one sample must not change the loss of the others in the same packed row."""
    path = fast_path()
    model, _ = lora_model(path)
    a = make_samples([30, 40], seed=1)
    b = [make_samples([30], seed=2)[0], a[1]]
    model.eval()
    with torch.no_grad():
        ba, bb = path.collate(a, 0, torch.device("cpu")), path.collate(b, 0, torch.device("cpu"))
        m = path.prepared(model)
        ha = m.decoder(
            input_ids=ba.input_ids,
            position_ids=ba.position_ids,
            cu_seq_lens_q=ba.cu_seqlens,
            cu_seq_lens_k=ba.cu_seqlens,
            max_length_q=ba.max_len,
            max_length_k=ba.max_len,
        )[0]
        hb = m.decoder(
            input_ids=bb.input_ids,
            position_ids=bb.position_ids,
            cu_seq_lens_q=bb.cu_seqlens,
            cu_seq_lens_k=bb.cu_seqlens,
            max_length_q=bb.max_len,
            max_length_k=bb.max_len,
        )[0]
    torch.testing.assert_close(ha[0, 30:], hb[0, 30:])
    assert not torch.allclose(ha[0, :30], hb[0, :30])


def test_fused_lora_matches_peft_in_bfloat16():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(64, 96, bias=True)).to(torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=32, target_modules=["0"]))
    with torch.no_grad():
        model.base_model.model[0].lora_B["default"].weight.normal_(0, 0.05)
    x = torch.randn(2, 10, 64, dtype=torch.bfloat16, requires_grad=True)
    ref = model(x)
    ref.float().square().sum().backward()
    ref_grads = grads(model) | {"x": x.grad.clone()}
    model.zero_grad()
    x.grad = None
    assert lora_ops.patch_lora_layers(model) == 1
    out = model(x)
    out.float().square().sum().backward()
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    for name, g in (grads(model) | {"x": x.grad}).items():
        assert g.dtype == ref_grads[name].dtype
        rel = (g.float() - ref_grads[name].float()).norm() / ref_grads[name].float().norm()
        assert rel < 2e-2, name


def test_chunked_loss_equals_full_cross_entropy():
    torch.manual_seed(0)
    h = torch.randn(50, 16, requires_grad=True)
    w = torch.randn(300, 16, requires_grad=True)
    t = torch.randint(0, 300, (50,))
    full = torch.nn.functional.cross_entropy(h @ w.t(), t, reduction="sum")
    gh, gw = torch.autograd.grad(full, (h, w))
    chunked = fused_loss.chunked_ce_sum(h, w, t, chunk=7)
    ch, cw = torch.autograd.grad(chunked, (h, w))
    torch.testing.assert_close(chunked, full)
    torch.testing.assert_close(ch, gh)
    torch.testing.assert_close(cw, gw)
    # a long forward's loss in slices (the fused loss's calls): the same sum and gradients
    calls = []

    def whole(h, w, t):
        calls.append(h.shape[0])
        return fused_loss.chunked_ce_sum(h, w, t)

    sliced = fused_loss.in_slices(whole, 16)(h, w, t)
    assert calls == [16, 16, 16, 2]
    with FullSizeTensors(h.shape) as made:  # a long sample's hidden states are GiBs
        sh, sw = torch.autograd.grad(sliced, (h, w))
    assert len(made.ops) == 1, made.ops  # the gradient itself (slicing made 7: one per slice, and sums)
    torch.testing.assert_close(sliced, full)
    torch.testing.assert_close(sh, gh)
    torch.testing.assert_close(sw, gw)


class FullSizeTensors(TorchDispatchMode):
    """Records the ops that make a tensor of `shape` while it is entered."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.ops = tuple(shape), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and tuple(out.shape) == self.shape and "detach" not in str(func):
            self.ops.append(str(func))
        return out


def test_technique_switches():
    assert accel.techniques("") == set(accel.DEFAULT_TECHNIQUES)
    assert "liger" not in accel.techniques("")  # measured slower on the H100 (bench/RESULTS.md)
    assert "compile" in accel.techniques("")
    use = accel.techniques("+liger,-flce")
    assert "liger" in use and "flce" not in use and "pack" in use


def test_memory_model_on_the_7b_architecture():
    lora = estimate_peak_bytes(QWEN25_7B, tokens=2048)  # every layer recomputed, nothing on the host
    assert 15.0e9 < lora["weights"] < 15.5e9  # 7.6B parameters in bfloat16
    assert 15 * GIB < lora["total"] < 16.2 * GIB
    # lean, recompute in the graph: measured 14.84 GiB with the embedding on the host (H200, session 4)
    lean = estimate_peak_bytes(QWEN25_7B, tokens=2048, embedding_on_host=True)["total"]
    assert 14.6 * GIB < lean < 15 * GIB
    # ... and the recomputed layers' inputs too: 28 x 2048 x 7 KB less
    host = estimate_peak_bytes(QWEN25_7B, tokens=2048, embedding_on_host=True, inputs_on_host=True)
    assert 0.3 * GIB < lean - host["total"] < 0.4 * GIB
    # the replay in the graph holds ~2.75 layers (measured); the eager replay one
    eager_replay = estimate_peak_bytes(QWEN25_7B, tokens=2048, embedding_on_host=True, in_graph=False)
    assert 0.5 * GIB < lean - eager_replay["total"] < 0.65 * GIB
    fast = estimate_peak_bytes(QWEN25_7B, tokens=2048, recomputed_layers=0)
    # measured 8.8 GiB (164 KB per token and layer, layers compiled whole; H200, session 3)
    assert 8.5 * GIB < fast["activations"] < 9.5 * GIB
    eager = estimate_peak_bytes(QWEN25_7B, tokens=2048, recomputed_layers=0, compiled=False)
    assert 10 * GIB < eager["activations"] < 13 * GIB  # measured 10.8-11.6 GiB eager (session 1)
    qlora = estimate_peak_bytes(
        QWEN25_7B, tokens=2048, quantized=True, embedding_on_host=True, inputs_on_host=True
    )
    assert qlora["weights"] < 5.0e9 and qlora["total"] < 6 * GIB and qlora["dequantised"] > 0
    assert layer_activation_bytes(QWEN25_7B, fused=False, compiled=False) > layer_activation_bytes(
        QWEN25_7B, fused=True, compiled=False
    )


def test_repartition_keeps_order_and_never_splits_a_sample():
    lengths = {0: 100, 1: 300, 2: 50, 3: 700, 4: 20, 5: 1000}
    step = [[0, 1, 2], [3, 4, 5]]
    assert packing.repartition(step, lengths.get, 500) == [[0, 1, 2], [3], [4], [5]]
    assert packing.repartition(step, lengths.get, 10_000) == [[0, 1, 2, 3, 4, 5]]
    assert packing.repartition(step, lengths.get, 1) == [[0], [1], [2], [3], [4], [5]]


def test_regrouped_forwards_give_the_same_gradient():
    """The fast path's merged forwards: same summed loss and LoRA gradients as the micro-batches."""
    samples = make_samples([37, 5, 64, 20, 11, 50])
    results = []
    for groups in ([[0, 1], [2, 3], [4, 5]], [[0, 1, 2, 3, 4, 5]]):
        path = fast_path()
        model, _ = lora_model(path)
        total = 0.0
        batches = [path.collate([samples[i] for i in g], 0, torch.device("cpu")) for g in groups]
        targets = sum(b.target_tokens for b in batches)
        for b in batches:
            loss = path.loss_sum(model, b)
            (loss / targets).backward()
            total += loss.item()
        results.append((total, grads(model)))
    (l1, g1), (l2, g2) = results
    assert math.isclose(l1, l2, rel_tol=1e-5)
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=1e-4, atol=1e-6, msg=name)


def test_lora_function_traces_without_graph_breaks():
    """The LoRA autograd function must trace whole (forward and backward) inside a compiled layer:
    a cache filled from inside its backward once broke every decoder layer into eager pieces. This
    guards the CPU branch; `bench/bench_train.py check` checks the CUDA one (out_dtype products)."""
    torch._dynamo.reset()
    x = torch.randn(6, 16, requires_grad=True)
    w = torch.randn(12, 16)
    a = (torch.randn(4, 16) * 0.1).requires_grad_()
    b = (torch.randn(12, 4) * 0.1).requires_grad_()

    def step(x, a, b):
        return lora_ops._LoRALinear.apply(x, w, None, a, b, 2.0).square().sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)  # fullgraph: a break raises
    compiled(x, a, b).backward()
    got = (x.grad.clone(), a.grad.clone(), b.grad.clone())
    x.grad = a.grad = b.grad = None
    step(x, a, b).backward()
    for g, want in zip(got, (x.grad, a.grad, b.grad), strict=True):
        torch.testing.assert_close(g, want)


def _train_once(recompute: bool, in_graph: bool | None, backend="aot_eager", change_layers=None):
    """One packed forward and backward of the tiny model: loss, LoRA grads, graph breaks and the
    bytes autograd kept for backward that are not parameters (activations), and the path."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    path = fast_path(recompute)
    if in_graph is not None:
        path.use |= {"compile", "ingraph"}
        if not in_graph:
            path.use.discard("ingraph")
        path.compile_options = {"backend": backend}
    model, _ = lora_model(path, recompute)
    if change_layers:
        change_layers(model)
    path.prepared(model)
    params = {p.data_ptr() for p in model.parameters()}
    kept = {}  # by storage: every layer saves the same RoPE tables

    def pack(t):
        if t.data_ptr() not in params:
            kept[t.data_ptr()] = t.numel() * t.element_size()
        return t

    batch = path.collate(make_samples([37, 5, 64, 20]), 0, torch.device("cpu"))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = path.loss_sum(model, batch)
    loss.backward()
    return loss.item(), grads(model), dict(counters["graph_break"]), sum(kept.values()), path


@pytest.mark.parametrize("in_graph", [False, True])
def test_compiled_layers_recompute_with_the_same_math_and_keep_only_their_inputs(in_graph):
    """Recompute compiled inside each layer's graph (`ingraph`) or around it: no graph break, the
    gradients of the eager path without recompute, and only the layers' inputs kept for backward."""
    ref_loss, ref_grads, _, kept_all, _ = _train_once(recompute=False, in_graph=None)
    _, _, _, kept_eager_ckpt, _ = _train_once(recompute=True, in_graph=None)
    loss, got, breaks, kept, path = _train_once(recompute=True, in_graph=in_graph)
    assert not breaks, breaks
    assert {"compile", "ingraph"} & path.use == ({"compile", "ingraph"} if in_graph else {"compile"})
    assert not [n for n in path.notes if "switched off" in n], path.notes
    assert math.isclose(loss, ref_loss, rel_tol=1e-5)
    assert path.compile_tally().seconds > 0  # the time the first step's note names
    for name in ref_grads:
        torch.testing.assert_close(got[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert kept_eager_ckpt < kept_all / 2  # the checkpoint does keep less
    # The eager checkpoint keeps its inputs out of the hooks' sight; a compiled one saves them as
    # its graph's inputs: each layer's hidden states [126 x 64], the RoPE tables [126 x 16] twice
    # (shared by the layers) and the sample bounds. Nothing else.
    inputs = 2 * 126 * 64 * 4 + 2 * 126 * 16 * 4 + 2 * 5 * 4
    assert kept <= kept_eager_ckpt + (inputs if in_graph else 0), (kept, kept_eager_ckpt, kept_all)


class _Tally:
    """An object whose attribute a layer sets on every forward: a side effect dynamo refuses inside
    a checkpoint, as the `kernels` package's routing wrapper does with its module-level variable."""

    def __init__(self):
        self.calls = 0


_TALLY = _Tally()


def _bump_in_every_attention(model):
    for module in model.modules():
        if type(module).__name__ == "Qwen2Attention":
            forward = module.forward

            def counted(*args, _forward=forward, **kwargs):
                _TALLY.calls = _TALLY.calls + 1
                return _forward(*args, **kwargs)

            module.forward = counted


def _break_every_attention(model):
    for module in model.modules():
        if type(module).__name__ == "Qwen2Attention":
            forward = module.forward

            def broken(*args, _forward=forward, **kwargs):
                torch._dynamo.graph_break()
                return _forward(*args, **kwargs)

            module.forward = broken


@pytest.mark.parametrize("change", [_bump_in_every_attention, _break_every_attention])
def test_a_layer_dynamo_cannot_take_whole_switches_its_technique_off_and_says_so(change):
    """A side effect inside the checkpoint costs the in-graph recompute (and the compile too where
    this torch cannot trace the side effect at all, as 2.11 cannot); an op dynamo cannot trace
    costs both. Either way the run goes on with the same math, and a note names each technique
    switched off, the reason and the cost, instead of a silent slowdown."""
    ref_loss, ref_grads, _, _, _ = _train_once(recompute=True, in_graph=None)
    loss, got, _, _, path = _train_once(recompute=True, in_graph=True, change_layers=change)
    off = [n.split(":")[1].split()[0] for n in path.notes if "switched off" in n]
    assert off in (["ingraph"], ["ingraph", "compile"]), path.notes
    if change is _break_every_attention:
        assert off == ["ingraph", "compile"]
    assert all("tokens/s" in n for n in path.notes if "switched off" in n)  # what it costs
    assert not {"compile", "ingraph"} & path.use & set(off)
    assert math.isclose(loss, ref_loss, rel_tol=1e-5)
    for name in ref_grads:
        torch.testing.assert_close(got[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_kernels_routing_wrapper_is_bypassed_for_the_modules_own_forward():
    """transformers' `use_kernelized_func` wrapper (package `kernels`) sets a module-level variable
    around the forward; the path calls the module's own forward, with the same result."""
    kernels = pytest.importorskip("kernels")

    @kernels.use_kernel_forward_from_hub("TunebenchTestRope")
    def rope_like(x):
        return x + 1

    @kernels.use_kernelized_func(rope_like)
    class Scaled(torch.nn.Module):
        def forward(self, x):
            return rope_like(x) * 2

    module = Scaled()
    layer = torch.nn.Sequential(module)
    x = torch.randn(3, 4)
    want = layer(x)
    assert compiling.call_module_forwards_directly([layer]) == 1
    assert module.forward.__func__ is type(module).forward.__wrapped__
    torch.testing.assert_close(layer(x), want)
    assert compiling.call_module_forwards_directly([torch.nn.Sequential(torch.nn.Linear(4, 4))]) == 0


@pytest.mark.parametrize("lengths_vary", [False, True])
def test_layers_compile_once_for_every_size_when_sample_lengths_vary(lengths_vary):
    """Mixed lengths: one compiled graph serves every forward size (no recompile per new size)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    path = fast_path(recompute=True)
    path.use |= {"compile", "ingraph"}
    path.compile_options = {"backend": "aot_eager"}
    samples = make_samples([37, 5, 64, 20, 50, 13, 7, 100, 3] if lengths_vary else [32] * 9)
    path.group([[0, 1, 2, 3]], samples)  # the recipe plans a step before its first forward
    model, _ = lora_model(path, recompute=True)
    graphs = []
    for batch in ([0, 1, 2, 3], [4, 5, 6], [7, 8]) if lengths_vary else ([0, 1], [2, 3, 4], [5]):
        path.loss_sum(model, path.collate([samples[i] for i in batch], 0, torch.device("cpu"))).backward()
        graphs.append(counters["stats"]["unique_graphs"])
    if lengths_vary:
        assert graphs[0] == graphs[-1] > 0, graphs  # compiled once, for any size
    else:
        assert graphs[-1] > graphs[0], graphs  # equal lengths: static, so another size recompiles


def test_packed_attention_bound_is_the_datasets_longest_sample_when_lengths_vary():
    """The longest-sample bound given to attention is an int the compiled layers would be
    specialised on: with varying lengths it is the same for every forward."""
    path = fast_path()
    samples = make_samples([37, 5, 64, 20])
    path.group([[0, 1], [2, 3]], samples)
    assert path.collate(samples[:2], 0, torch.device("cpu")).max_len == 64
    assert path.collate(samples[1:2], 0, torch.device("cpu")).max_len == 64
    same = fast_path()
    equal = make_samples([16, 16])
    same.group([[0, 1]], equal)
    assert same.collate(equal, 0, torch.device("cpu")).max_len == 16


def _peak_bytes(gm) -> int:
    """The most bytes a graph's tensors hold at once when its nodes run in order (each freed after
    its last use; views and the graph's inputs held by the caller count as they arrive)."""
    aliasing = {torch.ops.aten._unsafe_view.default}

    def size(node) -> int:
        schema = getattr(node.target, "_schema", None)
        if node.target in aliasing or (schema and schema.returns and schema.returns[0].alias_info):
            return 0
        vals = node.meta.get("val")
        vals = vals if isinstance(vals, (list, tuple)) else [vals]
        return sum(v.numel() * v.element_size() for v in vals if isinstance(v, torch.Tensor))

    nodes = list(gm.graph.nodes)
    last = {a: i for i, n in enumerate(nodes) for a in n.all_input_nodes}
    live: dict = {}
    held = peak = 0
    for i, node in enumerate(nodes):
        if node.op == "output":
            break
        live[node] = size(node)
        held += live[node]
        peak = max(peak, held)
        for gone in [a for a in node.all_input_nodes if last.get(a) == i] + (
            [node] if node not in last else []
        ):
            held -= live.pop(gone, 0)
    return peak


def _train_long(chunk_tokens: int, compiled: bool = True, tokens: int = 384, intermediate_size=128):
    """One forward and backward of one long sample through the recompute-in-graph path, the MLP in
    slices of `chunk_tokens` (0: whole); loss, LoRA grads, the backward graph's peak bytes, the
    path and the model."""
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd

    backward_graphs = []

    def keep(gm, _inputs):
        backward_graphs.append(gm)
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    path = fast_path(recompute=True)
    if compiled:
        path.use |= {"compile", "ingraph"}
        path.compile_options = {
            "backend": aot_autograd(
                fw_compiler=lambda gm, _: make_boxed_func(gm.forward),
                bw_compiler=keep,
                partition_fn=min_cut_rematerialization_partition,  # as inductor's
            )
        }
    path.mlp_chunk_tokens = chunk_tokens
    if not chunk_tokens:
        path.use.discard("mlpchunk")
    model, _ = lora_model(path, recompute=True, intermediate_size=intermediate_size)
    loss = path.loss_sum(model, path.collate(make_samples([tokens]), 0, torch.device("cpu")))
    loss.backward()
    peak = max((_peak_bytes(gm) for gm in backward_graphs), default=0)
    return loss.item(), grads(model), peak, path, model


@pytest.mark.parametrize("compiled", [False, True])
def test_mlp_in_slices_gives_the_same_loss_and_gradients_and_a_smaller_replay(compiled):
    """The MLP over slices: the same loss and LoRA gradients. With the recompute in the graph, the
    backward graph replays each slice just before that slice's backward: its peak drops by about
    the MLP intermediates of all but one slice."""
    ref_loss, ref_grads, whole, _, _ = _train_long(0, compiled, intermediate_size=1024)
    loss, got, sliced, path, model = _train_long(100, compiled, intermediate_size=1024)  # 4 x 96 tokens
    assert any("MLPs in slices" in a for a in path.applied)
    layers = path.prepared(model).layers
    assert [layer.mlp._tb_chunks for layer in layers] == [4, 4]
    assert math.isclose(loss, ref_loss, rel_tol=1e-5)
    assert ref_grads.keys() == got.keys() and got
    for name in ref_grads:
        torch.testing.assert_close(got[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    if compiled:
        intermediates = 3 * 384 * 1024 * 4  # gate, up and their product, float32, the whole forward
        assert whole - sliced > 0.5 * intermediates, (whole, sliced)
        return
    # a forward no longer than a slice runs each MLP whole
    path.loss_sum(model, path.collate(make_samples([100]), 0, torch.device("cpu"))).backward()
    assert [layer.mlp._tb_chunks for layer in layers] == [1, 1]


def test_memory_model_counts_the_mlp_slices_at_32k_tokens():
    """Lean QLoRA on the 7B at 32,768 tokens (measured 20.03 GiB before slices, model 20.79): the
    slices take the replayed layer's MLP intermediates from 32k to 2k tokens' worth."""
    lean = dict(quantized=True, embedding_on_host=True, inputs_on_host=True)
    whole = estimate_peak_bytes(QWEN25_7B, tokens=32768, mlp_chunk_tokens=0, **lean)
    sliced = estimate_peak_bytes(QWEN25_7B, tokens=32768, **lean)
    assert 20 * GIB < whole["total"] < 21.5 * GIB
    saved = REPLAY_LAYERS_IN_GRAPH * (32768 - 32768 // mlp_chunks(32768)) * 3 * 18944 * 2
    assert whole["activations"] - sliced["activations"] == pytest.approx(saved, rel=1e-6)
    assert sliced["total"] < 12 * GIB
    # no change where a forward fits one slice, nor for an eager replay (it recomputes every slice)
    for kw in (dict(tokens=MLP_CHUNK_TOKENS), dict(tokens=32768, in_graph=False)):
        assert estimate_peak_bytes(QWEN25_7B, **kw) == estimate_peak_bytes(
            QWEN25_7B, mlp_chunk_tokens=0, **kw
        )
    # the loss's logits are one slice's however long the forward
    assert loss_bytes(QWEN25_7B, 4 * LOSS_SLICE_TOKENS) - loss_bytes(QWEN25_7B, 2 * LOSS_SLICE_TOKENS) == (
        2 * LOSS_SLICE_TOKENS * 3584 * 8
    )
    assert [mlp_chunks(n) for n in (4096, 4097, 16384, 16385, 32768, 65536, 65537, 1 << 20)] == [
        1,
        4,
        4,
        16,
        16,
        16,
        16,  # longer slices, not more: 64 held more memory at 86,016 tokens than 16 (bench/RESULTS.md)
        16,
    ]
    assert mlp_chunks(9, 0) == 1


# One long sample, lean QLoRA on the 7B (bench/RESULTS.md: sessions 27 and 31): tokens -> GiB
# allocated at the step's peak; 86,016 with its MLP in 16 slices (MLP_MAX_CHUNKS).
MEASURED_LONG_SAMPLE_PEAKS = {32768: 10.66, 65536: 16.49, 86016: 19.98}


@pytest.mark.parametrize("tokens", sorted(MEASURED_LONG_SAMPLE_PEAKS))
def test_memory_model_predicts_a_long_samples_peak_within_10_percent(tokens):
    lean = dict(quantized=True, embedding_on_host=True, inputs_on_host=True)
    modelled = estimate_peak_bytes(QWEN25_7B, tokens=tokens, **lean)["total"] / GIB
    assert abs(modelled / MEASURED_LONG_SAMPLE_PEAKS[tokens] - 1) < 0.10, modelled


def compile_one_step_and_tally() -> None:
    """In a child process: one training step of the tiny model through the fast path, its decoder
    layers compiled by inductor as on the GPU (mixed sample lengths, recompute in the graph); prints
    the path's compile tally as JSON."""
    path = fast_path(recompute=True)
    path.use |= {"compile", "ingraph"}
    samples = make_samples([37, 5, 64, 20])
    path.group([[0, 1, 2, 3]], samples)
    model, _ = lora_model(path, recompute=True)
    path.loss_sum(model, path.collate(samples, 0, torch.device("cpu"))).backward()
    print(json.dumps(dataclasses.asdict(path.compile_tally())))


@pytest.mark.slow
def test_a_second_run_reuses_the_compiled_decoder_layers_from_tunebenchs_cache(tmp_path):
    """The compiled layers outlive the process: a second run of the same shape takes every graph
    from the cache under TuneBench's cache folder (AOTAutograd's cache, inductor's inside it) and
    compiles none. Two processes, the first compiling with inductor (about a minute on 2 cores)."""
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env["TUNEBENCH_CACHE"] = str(tmp_path)
    child = [sys.executable, "-c", "import test_accel; test_accel.compile_one_step_and_tally()"]
    tallies = []
    for _ in range(2):
        try:  # a child that hangs fails with what it printed, not with the suite's time limit
            done = subprocess.run(
                child, cwd=Path(__file__).parent, env=env, capture_output=True, text=True, timeout=240
            )
        except subprocess.TimeoutExpired as late:
            pytest.fail(f"the child ran past 240 s; its stderr ends:\n{(late.stderr or '')[-3000:]}")
        assert done.returncode == 0, done.stderr[-3000:]
        tallies.append(json.loads(done.stdout.strip().splitlines()[-1]))
    first, second = tallies
    assert first["compiled"] > 0 and first["reused"] == 0 and first["uncached"] == 0, first
    assert second["reused"] == first["compiled"] and second["compiled"] == 0, second
    assert second["uncached"] == 0, second
    assert any((tmp_path / "compiled").iterdir())


def _attention_inputs(lengths, device, heads=4, kv_heads=2, dim=128, dtype=torch.bfloat16):
    """HF's layout ([1, heads, tokens, dim]) for a packed row of documents, and its bounds."""
    total = sum(lengths)
    g = torch.Generator().manual_seed(0)

    def leaf(h):
        t = torch.randn(1, total, h, dim, generator=g).to(device, dtype).transpose(1, 2)
        return t.detach().requires_grad_()

    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)
    return leaf(heads), leaf(kv_heads), leaf(kv_heads), {"cu_seq_lens_q": cu, "max_length_q": max(lengths)}


def _attend(fn, q, k, v, kwargs):
    out, _ = fn(None, q, k, v, None, scaling=q.shape[-1] ** -0.5, **kwargs)
    out.float().square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    return out.detach(), grads


def test_off_the_gpu_the_cudnn_attention_function_is_the_packed_one():
    """On the CPU, in float32, for one sample or several: the packed attention itself."""
    for lengths in ([40], [24, 16]):
        q, k, v, kwargs = _attention_inputs(lengths, "cpu", dtype=torch.float32)
        plain = _attend(packing.varlen_attention, q, k, v, kwargs)
        with_cudnn = _attend(packing.varlen_attention_cudnn, q, k, v, kwargs)
        assert torch.equal(plain[0], with_cudnn[0])
        assert all(torch.equal(a, b) for a, b in zip(plain[1], with_cudnn[1], strict=True))


@pytest.mark.gpu
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_cudnn_attention_of_one_sample_matches_the_flash_kernel(compiled):
    if not packing.cudnn_attention_runs(torch.device("cuda"), 4, 2, 128):
        pytest.skip("no cuDNN fused attention on this card or build")
    q, k, v, kwargs = _attention_inputs([1000], "cuda")
    fn = packing.varlen_attention_cudnn
    if compiled:
        fn = torch.compile(fn, fullgraph=True)
    out, grads = _attend(fn, q, k, v, kwargs)
    ref_out, ref_grads = _attend(packing.varlen_attention, q, k, v, kwargs)
    assert out.shape == ref_out.shape == (1, 1000, 4, 128)
    torch.testing.assert_close(out, ref_out, atol=2e-2, rtol=2e-2)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, atol=5e-2, rtol=5e-2)
    # several samples: the flash kernel's own answer, exactly
    q, k, v, kwargs = _attention_inputs([600, 400], "cuda")
    several, _ = _attend(fn, q, k, v, kwargs)
    assert torch.equal(several, _attend(packing.varlen_attention, q, k, v, kwargs)[0])


def test_cudnn_attention_is_chosen_only_where_every_forward_holds_one_sample(monkeypatch):
    """Its compiled layers would otherwise guard on which kind each forward is and compile twice."""
    monkeypatch.setattr(accel, "cudnn_attention_runs", lambda device, heads, kv_heads, head_dim: True)
    monkeypatch.setenv("TUNEBENCH_ACCEL", "")
    cuda = torch.device("cuda")  # the path's choices only: nothing runs on it here
    config = {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 128}

    def chosen(step, lengths, tokens=4096, use="", batch=2):
        monkeypatch.setenv("TUNEBENCH_ACCEL", use)
        path = accel.FastPath(TrainConfig(per_device_train_batch_size=batch), cuda, "lean")
        path._max_tokens, path._config = tokens, config  # the plan's tokens per forward
        forwards = path.group(step, make_samples(lengths))
        path.group([step[0][:1]], make_samples(lengths))  # a later call (an idle rank's padding)
        return path._uses_cudnn_attention(), forwards

    # merged forwards: no two samples fit in one (the two shortest, as repartition groups them)
    assert chosen([[0, 1]], [3000, 5000]) == (True, [[0], [1]])
    assert chosen([[0, 1]], [3000, 1000, 5000]) == (False, [[0, 1]])
    assert chosen([[0, 2]], [3000, 1200, 5000]) == (True, [[0], [2]])
    # a step of one sample, whatever the forward size
    assert chosen([[0]], [30, 20]) == (True, [[0]])
    # forwards are the micro-batches themselves where nothing merges
    assert chosen([[0], [1]], [30, 20], use="-merge", batch=1)[0]
    assert not chosen([[0, 1]], [30, 20], use="-merge")[0]
    assert not chosen([[0]], [30], use="-cudnn")[0]


def test_a_run_of_one_sample_forwards_attends_through_the_cudnn_function(monkeypatch):
    """The choice lands on the model at the first forward (the PEFT-wrapped model's base config):
    here on the CPU, where the cuDNN function hands every forward to the packed one."""
    calls = []
    original = packing.varlen_attention_cudnn
    monkeypatch.setattr(
        packing, "varlen_attention_cudnn", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    samples = make_samples([30])
    losses = {}
    for chosen in (False, True):
        path = fast_path()
        monkeypatch.setattr(path, "_uses_cudnn_attention", lambda chosen=chosen: chosen)
        model, _ = lora_model(path)
        losses[chosen] = path.loss_sum(model, path.collate(samples, 0, torch.device("cpu")))
        name = model.get_base_model().config._attn_implementation
        assert name == (packing.CUDNN_ATTENTION_NAME if chosen else packing.ATTENTION_NAME)
        assert ("cuDNN attention (one sample per forward)" in path.applied) is chosen
    assert len(calls) == 2  # one call per decoder layer, in the chosen run only
    assert torch.equal(losses[True], losses[False])
