"""The CUDA fast path: padding-free packing, a loss over the loss tokens only, fused kernels, profiles.

`train.select_path()` calls `cuda_path(cfg, device)` on CUDA. The recipe stays the same; what
changes is how a micro-batch is laid out and how its summed loss is computed:

- **Packing.** A micro-batch's samples are concatenated into one row with no padding. Position
  ids restart at 0 for each sample and attention is per document: a registered attention function
  ("tunebench_varlen") calls PyTorch's variable-length flash-attention kernel with the samples'
  cumulative lengths, so no token attends across a sample boundary and no time goes to pads.
- **Loss.** The decoder's last hidden states are taken only at positions that predict a trained
  token and fed to a fused linear + cross-entropy (liger-kernel) that never builds the
  [tokens x vocabulary] logits; without liger, a chunked loss that recomputes each chunk's logits
  in backward. The result is the SUM over loss tokens, as the recipe expects.
- **LoRA.** PEFT's LoRA forward casts every input to float32 for the adapter (a float32 copy of
  each projection's input is kept for backward). Here the adapter runs in the compute dtype
  against its float32 master weights, and the base and adapter products share one saved input.
- **Recompute in the graph.** Each decoder layer is compiled with its checkpoint inside
  (`ingraph`): the forward graph keeps only the layer's input and the backward graph replays the
  forward itself, fused with the backward's own work. Inside such a layer nothing is an
  autograd.Function (the LoRA and 4-bit products are plain ops, attention is the aten flash op):
  torch 2.11 kept what a Function saves instead of recomputing it. Lean LoRA on a 7B: 7,155
  tokens/s with the checkpoint around the compiled layer, 10,531 to 11,240 with it inside (H200,
  bench/RESULTS.md session 4).
- **Kernels.** liger's fused RMSNorm and SwiGLU on Llama / Qwen / Mistral families (they keep
  fewer and smaller tensors for backward); fused AdamW is the recipe's own.
- **Merged forwards.** A step's samples are regrouped (in order, never split) into forwards of
  at most the profile's token count from the memory model (engine/gpu_memory.py): fast packs as
  many as keep every layer's activations on the card (the whole step, for 4 x 2048 tokens on a
  7B and an 80 GB card), lean as many as fit a small fixed allowance. The loss is summed and
  normalised by the step's loss tokens, so the gradient is the configured micro-batches'.
- **Profiles.** `fast` recomputes no layer whose activations fit: before each micro-batch it
  works out, from free memory and a per-token memory model calibrated on the first micro-batch,
  how many decoder layers can keep their activations, and recomputes only the rest. `lean`
  recomputes every layer, keeps the input embedding matrix in host memory (its rows are
  gathered on the CPU: it is frozen and only indexed) and the recomputed layers' inputs too
  (engine/offload.py). `auto` picks lean when little memory is left after the model is loaded.

Techniques: pack, merge, flce, lora, selective (fast), offload and hostinputs (lean), compile
(each decoder layer as one torch.compile region, bitsandbytes' 4-bit layers included) and
ingraph are on; liger is off because it measured slower here (bench/RESULTS.md). For measuring,
`TUNEBENCH_ACCEL` adjusts the set, e.g. `TUNEBENCH_ACCEL=+liger,-merge` or `-ingraph` (the
checkpoint around the compiled layer); `tokens=4096` sets the tokens per forward instead of
the memory model.
"""

from __future__ import annotations

import logging
import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from types import MethodType
from typing import Any

import torch
import torch.nn.functional as F

from .config import TrainConfig
from .gpu_memory import (  # noqa: F401 - the memory model, re-exported for callers and tests
    FAST_MAX_TOKENS,
    GIB,
    HEADROOM,
    LEAN_BELOW_FREE,
    REPLAY_LAYERS_IN_GRAPH,
    choose_profile,
    estimate_peak_bytes,
    layer_activation_bytes,
    layers_to_keep,
    tokens_per_forward,
)
from .offload import HostEmbedding, HostInputs
from .train import IGNORE, Batch, TrainPath

log = logging.getLogger(__name__)

ATTENTION_NAME = "tunebench_varlen"
LIGER_FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "smollm3", "granite", "olmo2")


DEFAULT_TECHNIQUES = frozenset(
    {"pack", "merge", "flce", "lora", "selective", "offload", "compile", "ingraph", "hostinputs"}
)


def techniques(spec: str | None = None) -> set[str]:
    """The techniques in use: the defaults, adjusted by `+name` / `-name` items (from TUNEBENCH_ACCEL)."""
    spec = os.environ.get("TUNEBENCH_ACCEL", "") if spec is None else spec
    use = set(DEFAULT_TECHNIQUES)
    for item in (t.strip() for t in spec.split(",")):
        if item.startswith("-"):
            use.discard(item[1:])
        elif item:
            use.add(item.lstrip("+"))
    return use


# ===================================================================== entry


def cuda_path(cfg: TrainConfig, device) -> TrainPath:
    free, _total = torch.cuda.mem_get_info(device)
    profile, why = choose_profile(cfg.profile, free)
    fast = FastPath(cfg, device, profile)
    notes = [f"GPU path: profile {profile} ({why})"] + fast.describe()
    fast.notes = notes  # the path adds the memory model's numbers once it has seen a forward
    return TrainPath(
        name=f"cuda-{profile}",
        # Layers are wrapped for recompute in both profiles; the fast profile switches it off per
        # micro-batch for as many layers as memory allows. gradient_checkpointing=false means never.
        gradient_checkpointing=cfg.gradient_checkpointing,
        collate=fast.collate,
        loss_sum=fast.loss_sum,
        prepare_base=fast.prepare_base,
        group=fast.group,
        notes=notes,
    )


# =================================================================== packing


@dataclass
class PackedBatch(Batch):
    """One row holding a micro-batch's samples back to back, with what attention and loss need."""

    position_ids: Any = None
    cu_seqlens: Any = None  # int32 [samples + 1] on the device
    max_len: int = 0
    loss_index: Any = None  # positions that predict a trained token
    loss_targets: Any = None  # the token each of them predicts
    host_ids: Any = None  # input ids on the CPU, for an embedding kept in host memory


def pack(samples: list, device) -> PackedBatch:
    """Concatenate samples into one row; each one's last token predicts nothing (no cross-sample loss)."""
    ids: list[int] = []
    positions: list[int] = []
    targets: list[int] = []
    bounds = [0]
    for s in samples:
        n = len(s.input_ids)
        ids.extend(s.input_ids)
        positions.extend(range(n))
        targets.extend(s.labels[1:n])
        targets.append(IGNORE)
        bounds.append(bounds[-1] + n)
    host_ids = torch.tensor(ids, dtype=torch.long)
    target_t = torch.tensor(targets, dtype=torch.long)
    loss_index = (target_t != IGNORE).nonzero().squeeze(-1)
    pin = device.type == "cuda"

    def put(t):
        return (t.pin_memory() if pin else t).to(device, non_blocking=pin)

    return PackedBatch(
        input_ids=put(host_ids).unsqueeze(0),
        labels=None,
        attention_mask=None,
        tokens=len(ids),
        target_tokens=int(loss_index.numel()),
        position_ids=put(torch.tensor(positions, dtype=torch.long)).unsqueeze(0),
        cu_seqlens=put(torch.tensor(bounds, dtype=torch.int32)),
        max_len=max(len(s.input_ids) for s in samples),
        loss_index=put(loss_index),
        loss_targets=put(target_t[loss_index]),
        host_ids=host_ids,
    )


def repartition(step: list[list[int]], length, max_tokens: int) -> list[list[int]]:
    """A step's samples, in their order, regrouped into forwards of at most `max_tokens` tokens
    (a longer sample goes alone). The loss is summed and normalised by the step's loss tokens, so
    the gradient is the same however a step's samples are grouped."""
    forwards: list[list[int]] = []
    current: list[int] = []
    used = 0
    for index in (i for micro in step for i in micro):
        n = length(index)
        if current and used + n > max_tokens:
            forwards.append(current)
            current, used = [], 0
        current.append(index)
        used += n
    if current:
        forwards.append(current)
    return forwards


# ================================================================= attention


def flash_varlen(q, k, v, cu, max_len: int, scale):
    """Causal attention over packed documents through PyTorch's variable-length flash kernel.

    q [T, Hq, D], k and v [T, Hkv, D] (the kernel handles grouped KV heads itself). The aten op
    has its own backward; a custom autograd.Function here kept its saved tensors out of the
    recompute that torch 2.11 compiles into a layer's graph (bench/RESULTS.md, session 4)."""
    out, *_ = torch.ops.aten._flash_attention_forward(
        q, k, v, cu, cu, max_len, max_len, 0.0, True, False, scale=scale
    )
    return out


def _segment_attention(q, k, v, cu, scale):
    """Reference per-document causal attention (CPU, or dtypes flash does not take): one SDPA per sample."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1) if groups > 1 else k
    v = v.repeat_interleave(groups, dim=1) if groups > 1 else v
    outs = []
    bounds = cu.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        seg = [t[start:end].transpose(0, 1) for t in (q, k, v)]  # [H, L, D]
        outs.append(F.scaled_dot_product_attention(*seg, is_causal=True, scale=scale).transpose(0, 1))
    return torch.cat(outs, dim=0)


def _masked_attention(q, k, v, cu, scale):
    """Per-document causal attention as one SDPA with a block-diagonal mask: traceable, O(T^2) memory."""
    t = q.shape[0]
    doc = torch.searchsorted(cu[1:].long(), torch.arange(t, device=q.device), right=True)
    pos = torch.arange(t, device=q.device)
    mask = (doc[:, None] == doc[None, :]) & (pos[:, None] >= pos[None, :])
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1) if groups > 1 else k
    v = v.repeat_interleave(groups, dim=1) if groups > 1 else v
    seg = [x.transpose(0, 1) for x in (q, k, v)]  # [H, T, D]
    return F.scaled_dot_product_attention(*seg, attn_mask=mask, scale=scale).transpose(0, 1)


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: per-document attention when packed, SDPA otherwise."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None or query.shape[0] != 1:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    max_len = int(kwargs.get("max_length_q") or query.shape[2])
    # [1, H, T, D] -> [T, H, D]; the projections were laid out [T, H*D], so this is usually a view.
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256:
        out = flash_varlen(q, k, v, cu, max_len, scaling)
    elif torch.compiler.is_compiling():
        out = _masked_attention(q, k, v, cu, scaling)  # the per-sample loop reads cu on the host
    else:
        out = _segment_attention(q, k, v, cu, scaling)
    return out.unsqueeze(0), None


def register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, varlen_attention)


def use_attention(model, name: str) -> None:
    setter = getattr(model, "set_attn_implementation", None)
    try:
        if setter is None:
            raise AttributeError
        setter(name)
    except Exception:  # noqa: BLE001 - older transformers: set it on the config directly
        model.config._attn_implementation = name


# ====================================================================== loss


def chunked_ce_sum(hidden, weight, targets, chunk: int = 0):
    """Summed cross-entropy of `hidden @ weight.T` against targets, one chunk of logits at a time.

    Each chunk's logits are recomputed in backward instead of kept: peak memory is one chunk."""
    from torch.utils.checkpoint import checkpoint

    n = hidden.shape[0]
    chunk = chunk or max(256, int(GIB // (weight.shape[0] * 4)))
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, n, chunk):
        part = checkpoint(
            _ce_chunk,
            hidden[start : start + chunk],
            weight,
            targets[start : start + chunk],
            use_reentrant=False,
        )
        total = total + part
    return total


def _ce_chunk(h, w, t):
    return F.cross_entropy(F.linear(h, w).float(), t, reduction="sum")


def _liger_ce_sum(chunk_budget: int = 1):
    """liger's fused linear + cross-entropy (sum), or None where it is not installed.

    `chunk_budget` bounds each chunk's logits to about budget x tokens x hidden elements; liger's
    default (1) means chunks of ~64 tokens on a 152k vocabulary, each reading the whole head."""
    try:
        from liger_kernel.ops import LigerFusedLinearCrossEntropyFunction
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    module = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction="sum")
    fields = (None, None, IGNORE, 0.0, 0.0, "sum", None, False, None, False, False, False, None, None)

    def loss(hidden, weight, targets):
        try:
            out = LigerFusedLinearCrossEntropyFunction.apply(hidden, weight, targets, *fields, chunk_budget)
        except TypeError:  # another liger version: its own default chunking
            return module(weight, hidden, targets)
        return out[0] if isinstance(out, tuple) else out

    return loss


# ====================================================================== LoRA


class _LoRALinear(torch.autograd.Function):
    """y = x W^T + b + s (x A^T) B^T for a frozen dense W, the adapter in the compute dtype.

    Saves x once for both products (PEFT keeps a float32 copy of x for the adapter as well) and
    skips the input gradient where nothing upstream needs it."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale):
        x2 = x.reshape(-1, x.shape[-1])
        a, b = lora_a.to(x.dtype), lora_b.to(x.dtype)
        out = F.linear(x2, weight, bias)
        xa = x2 @ a.t()
        out.addmm_(xa, b.t(), alpha=scale)
        ctx.save_for_backward(x, weight, a, b, xa)
        ctx.scale = scale
        ctx.a_dtype, ctx.b_dtype = lora_a.dtype, lora_b.dtype
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x, weight, a, b, xa = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        gb = g @ b
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = g @ weight
            grad_x.addmm_(gb, a, alpha=ctx.scale)
            grad_x = grad_x.view_as(x)
        grad_a = _mm_f32(gb.t(), x2).mul_(ctx.scale).to(ctx.a_dtype)
        grad_b = _mm_f32(g.t(), xa).mul_(ctx.scale).to(ctx.b_dtype)
        return grad_x, None, None, grad_a, grad_b, None


class _LoRADelta(torch.autograd.Function):
    """s (x A^T) B^T alone, for bases this path does not fuse (4-bit, or dropout on the adapter)."""

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, scale):
        x2 = x.reshape(-1, x.shape[-1])
        a, b = lora_a.to(x.dtype), lora_b.to(x.dtype)
        xa = x2 @ a.t()
        out = (xa @ b.t()).mul_(scale)
        ctx.save_for_backward(x, a, b, xa)
        ctx.scale = scale
        ctx.a_dtype, ctx.b_dtype = lora_a.dtype, lora_b.dtype
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x, a, b, xa = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        gb = g @ b
        grad_x = (gb @ a).mul_(ctx.scale).view_as(x) if ctx.needs_input_grad[0] else None
        grad_a = _mm_f32(gb.t(), x2).mul_(ctx.scale).to(ctx.a_dtype)
        grad_b = _mm_f32(g.t(), xa).mul_(ctx.scale).to(ctx.b_dtype)
        return grad_x, grad_a, grad_b, None


# Whether torch.mm takes out_dtype (bf16 in, fp32 out) on this GPU: probed once, eagerly, before
# anything is compiled. Traced code only reads it: a lookup that fills a cache inside the LoRA
# backward made dynamo break the graph at every LoRA layer (bench/RESULTS.md, call D).
_MM_OUT_DTYPE_OK: bool | None = None


def _mm_f32(a, b):
    """a @ b with float32 output (the adapter's gradients), accumulating in float32 either way."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda and _MM_OUT_DTYPE_OK:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def probe_mm_out_dtype(device) -> bool:
    """Find out (once) whether torch.mm takes out_dtype on `device`; call outside compiled code."""
    global _MM_OUT_DTYPE_OK
    if _MM_OUT_DTYPE_OK is None and torch.device(device).type == "cuda":
        try:
            x = torch.ones(2, 2, device=device, dtype=torch.bfloat16)
            _MM_OUT_DTYPE_OK = torch.mm(x, x, out_dtype=torch.float32).dtype == torch.float32
        except (TypeError, RuntimeError):
            _MM_OUT_DTYPE_OK = False
    return bool(_MM_OUT_DTYPE_OK)


def _dequantized(base, dtype):
    """A bitsandbytes 4-bit weight as the dense [out, in] matrix its products use."""
    import bitsandbytes.functional as bnb_functional

    return bnb_functional.dequantize_4bit(base.weight.data, base.weight.quant_state).to(dtype)


def _lora_plain(self, x, lora_a, lora_b, scale, dropout):
    """The base product and the adapter's in plain differentiable ops, no autograd.Function.

    For layers whose recompute is compiled into their graph: torch 2.11 kept what an
    autograd.Function saves (the adapters' inputs, bitsandbytes' product outputs) for backward
    instead of recomputing it, 5 to 10 GiB more on a 7B (bench/RESULTS.md, session 4). The
    adapter's gradients come out of a compute-dtype product here, as under autocast."""
    base = self.base_layer
    bias = None if base.bias is None else base.bias.to(x.dtype)
    if type(base) is torch.nn.Linear and base.weight.dtype == x.dtype:
        out = F.linear(x, base.weight, bias)
    elif "4bit" in type(base).__name__ and getattr(base.weight, "quant_state", None) is not None:
        out = F.linear(x, _dequantized(base, x.dtype), bias)  # one dequantisation: replay and backward
    else:
        out = base(x)
    xa = F.linear(x if isinstance(dropout, torch.nn.Identity) else dropout(x), lora_a.to(x.dtype))
    return out + (F.linear(xa, lora_b.to(x.dtype)) * scale).to(out.dtype)


def _lora_forward(self, x, *args, **kwargs):
    """Replacement forward for PEFT's LoRA Linear layers; anything unusual goes to PEFT's own."""
    active = self.active_adapters
    name = active[0] if len(active) == 1 else None
    if (
        args
        or kwargs
        or name is None
        or self.disable_adapters
        or self.merged
        or name not in self.lora_A
        or name in getattr(self, "lora_variant", {})
        or self.lora_B[name].bias is not None
    ):
        return self._tb_peft_forward(x, *args, **kwargs)
    lora_a, lora_b = self.lora_A[name].weight, self.lora_B[name].weight
    scale = self.scaling[name]
    dropout = self.lora_dropout[name]
    if self._tb_plain:
        return _lora_plain(self, x, lora_a, lora_b, scale, dropout if self.training else torch.nn.Identity())
    base = self.base_layer
    no_dropout = isinstance(dropout, torch.nn.Identity) or not self.training
    if no_dropout and type(base) is torch.nn.Linear and base.weight.dtype == x.dtype:
        return _LoRALinear.apply(x, base.weight, base.bias, lora_a, lora_b, scale)
    result = base(x)
    return result + _LoRADelta.apply(x if no_dropout else dropout(x), lora_a, lora_b, scale).to(result.dtype)


def patch_lora_layers(model, plain: bool = False) -> int:
    """Route every PEFT LoRA Linear (dense or 4-bit) through `_lora_forward`; returns how many.

    `plain`: the products in plain ops (`_lora_plain`), for layers that recompute in their graph."""
    from peft.tuners.lora import LoraLayer

    count = 0
    for module in model.modules():
        if (
            isinstance(module, LoraLayer)
            and hasattr(module, "base_layer")
            and not hasattr(module, "_tb_peft_forward")
        ):
            if (
                not isinstance(module.base_layer, torch.nn.Linear)
                and "4bit" not in type(module.base_layer).__name__
            ):
                continue
            module._tb_peft_forward = module.forward
            module._tb_plain = plain
            module.forward = MethodType(_lora_forward, module)
            count += 1
    return count


# =================================================================== kernels


def patch_liger(model) -> list[str]:
    """liger's fused RMSNorm and SwiGLU on this model's modules (instances only); what was patched."""
    if getattr(model.config, "model_type", "") not in LIGER_FAMILIES:
        return []
    try:
        from liger_kernel.transformers.monkey_patch import _patch_rms_norm_module, _patch_swiglu_module
        from liger_kernel.transformers.swiglu import LigerSwiGLUMLP
    except ImportError:
        return []
    norms = mlps = 0
    act = getattr(model.config, "hidden_act", "silu")
    for module in model.modules():
        name = type(module).__name__
        if name.endswith("RMSNorm") and hasattr(module, "weight") and module.weight is not None:
            eps = getattr(module, "variance_epsilon", None) or getattr(module, "eps", 1e-6)
            _patch_rms_norm_module(module, offset=0.0, eps=eps, casting_mode="llama", in_place=True)
            norms += 1
        elif act in ("silu", "swish") and all(
            hasattr(module, p) for p in ("gate_proj", "up_proj", "down_proj")
        ):
            _patch_swiglu_module(module, LigerSwiGLUMLP)
            mlps += 1
    return [f"liger RMSNorm x{norms}", f"liger SwiGLU x{mlps}"] if norms or mlps else []


def _recomputed_forward(self, *args, **kwargs):
    """A decoder layer's forward, replayed in backward when `_tb_recompute` is set (training only)."""
    if self._tb_recompute and self.training and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(self._tb_forward, *args, use_reentrant=False, **kwargs)
    return self._tb_forward(*args, **kwargs)


def own_recompute(layers: list, recompute: bool) -> None:
    """This path decides, per layer and per forward, which decoder layers are recomputed.

    transformers puts its checkpoint around the layer's call in some versions and around its
    forward in others, so whether a compiled layer had the recompute inside its graph or outside
    depended on the version. Here HF's switch stays off and each layer's forward is wrapped in a
    non-reentrant checkpoint of our own (PEFT's QLoRA preparation leaves the reentrant kind; the
    non-reentrant one needs no input that requires grad, so layer 0 skips its input-gradient
    products), switched by `layer._tb_recompute`.
    """
    for layer in layers:
        if hasattr(layer, "_tb_forward"):
            continue
        layer.gradient_checkpointing = False
        layer._tb_forward = layer.forward  # HF's forward (its own checkpoint wrapper, now idle)
        layer._tb_recompute = recompute
        layer.forward = MethodType(_recomputed_forward, layer)


def compile_layers(layers: list, device, recompute_in_graph: bool = False, **options) -> list[str]:
    """torch.compile each decoder layer as one region (all share one compiled graph).

    Fuses the layer's elementwise work (norms, RoPE, residuals, SwiGLU) and takes most of the
    per-op Python and launch cost out of the forward, which otherwise leaves the GPU waiting.
    `recompute_in_graph` compiles the checkpoint with the layer: the forward graph keeps only the
    layer's inputs and the backward graph replays the forward itself, so the replay costs no
    second call into the compiled code and its elementwise work fuses with the backward's.
    Otherwise the checkpoint stays outside and replays the compiled forward.
    """
    if not layers:
        return []
    if device.type == "cuda":
        probe_mm_out_dtype(device)  # before tracing: compiled code must only read the answer
    # Each layer may get its own compiled variant (its index is a constant in its code), and
    # recompute replays it under other grad modes: past the recompile limit dynamo silently runs
    # a layer eagerly in small pieces, so the limits grow with the number of layers.
    limit = max(64, 8 * len(layers))
    dynamo = torch._dynamo.config
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(dynamo, name):
            setattr(dynamo, name, max(getattr(dynamo, name), limit))
    for name in ("accumulated_cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(dynamo, name):
            setattr(dynamo, name, max(getattr(dynamo, name), 4 * limit))
    torch._dynamo.config.suppress_errors = True  # a layer dynamo cannot take runs eagerly instead
    for layer in layers:
        if recompute_in_graph or not hasattr(layer, "_tb_forward"):
            layer.compile(**options)
        else:
            layer._tb_forward = torch.compile(layer._tb_forward, **options)
    where = ", recompute inside the graph" if recompute_in_graph else ""
    return [f"torch.compile x{len(layers)} layers{where}"]


# ================================================================= the path


@dataclass
class _Model:
    """What the loss needs from the PEFT-wrapped model, found once."""

    decoder: Any
    head_weight: Any
    layers: list
    per_token_layer: int
    per_token_fixed: int
    scale: float = 1.0  # measured / modelled activation memory, from the first micro-batch
    calibrated: bool = False


@dataclass
class FastPath:
    cfg: TrainConfig
    device: Any
    profile: str
    use: set[str] = field(default_factory=techniques)
    host_embedding: HostEmbedding | None = None
    host_inputs: HostInputs | None = None  # the recomputed layers' inputs in host memory (lean)
    compute_dtype: Any = None
    applied: list[str] = field(default_factory=list)
    compile_options: dict = field(default_factory=dict)  # torch.compile's, e.g. a test's backend
    notes: list[str] = field(default_factory=list)  # the TrainPath's notes: the recipe logs new ones
    _model: _Model | None = None
    _ce: Any = None
    _kept: int = 0  # layers that keep their activations in the current micro-batch
    _config: Any = None  # the base model's config, for the memory model
    _max_tokens: int = 0  # tokens per forward, from the memory model (0: not worked out yet)
    _lengths_vary: bool = False  # the samples differ in length: forwards will too
    _modelled_peak: int = 0  # the largest peak the memory model gave for a forward so far

    @property
    def compiles(self) -> bool:
        return "compile" in self.use

    @property
    def recompiles_in_graph(self) -> bool:
        return self.compiles and "ingraph" in self.use

    def describe(self) -> list[str]:
        on = [
            ("pack", "padding-free packing with per-document flash attention"),
            ("flce", "fused linear + cross-entropy on loss tokens only"),
            ("liger", "liger RMSNorm / SwiGLU"),
            ("lora", "LoRA in the compute dtype, one saved input"),
            ("compile", "each decoder layer compiled as one region"),
            ("ingraph", "recompute compiled into each layer's graph"),
            ("merge", "a step's samples packed into as few forwards as the profile's memory allows"),
        ]
        use = self.use - (set() if self.compiles else {"compile", "ingraph"})
        notes = [f"GPU path: {text}" for key, text in on if key in use]
        if self.profile == "fast" and self.cfg.gradient_checkpointing and "selective" in self.use:
            notes.append("GPU path: recompute only the layers whose activations do not fit")
        if self.profile == "lean" and "offload" in self.use:
            notes.append("GPU path: input embeddings kept in host memory")
        if self.profile == "lean" and "hostinputs" in self.use and self.recompiles_in_graph:
            notes.append("GPU path: recomputed layers' inputs kept in host memory")
        return notes

    # ---------------------------------------------------------- before LoRA

    def prepare_base(self, model):
        register_attention()
        if "pack" in self.use:
            use_attention(model, ATTENTION_NAME)
        if "liger" in self.use:
            self.applied += patch_liger(model)
        self.compute_dtype = _compute_dtype(model)
        self._config = model.config
        if self.profile == "lean" and "offload" in self.use:
            emb, head = model.get_input_embeddings(), model.get_output_embeddings()
            if head is None or emb.weight is not head.weight:
                self.host_embedding = HostEmbedding(emb.weight, self.compute_dtype)
                emb.weight.data = torch.empty(0, dtype=emb.weight.dtype, device=emb.weight.device)
                self.applied.append("embedding in host memory")
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        # Only a checkpoint compiled into the graph saves its inputs where hooks can move them.
        if self.profile == "lean" and "hostinputs" in self.use and self.recompiles_in_graph:
            if self.device.type == "cuda" and self.cfg.gradient_checkpointing:
                self.host_inputs = HostInputs(self.device, model.config.hidden_size, self.compute_dtype)
                self.applied.append("recomputed layers' inputs in host memory")
        return model

    # -------------------------------------------------------------- batches

    def group(self, step: list[list[int]], samples: list) -> list[list[int]]:
        """The step's forwards: its samples regrouped to the profile's tokens per forward (CUDA only)."""
        if self._model is None:  # before the layers are compiled: will the forwards' shapes vary?
            self._lengths_vary = len({len(s.input_ids) for s in samples}) > 1
        if "pack" not in self.use or "merge" not in self.use or self.device.type != "cuda":
            return step
        forced = [int(t.split("=", 1)[1]) for t in self.use if t.startswith("tokens=")]
        if forced and not self._max_tokens:  # measuring: a forward size other than the memory model's
            self._max_tokens = forced[0]
            self.notes.append(f"GPU path: forwards of up to {self._max_tokens} tokens (set by tokens=)")
        if not self._max_tokens:
            free, _total = torch.cuda.mem_get_info(self.device)
            self._max_tokens = tokens_per_forward(
                self._config,
                profile=self.profile,
                card_bytes=free + torch.cuda.memory_reserved(self.device),
                lora_rank=self.cfg.lora_rank,
                quantized=self.cfg.is_qlora,
                embedding_on_host=self.host_embedding is not None,
                compiled=self.compiles,
                inputs_on_host=self.host_inputs is not None,
                in_graph=self.recompiles_in_graph,
            )
            self.notes.append(
                f"GPU path: forwards of up to {self._max_tokens} tokens ({self.profile} profile)"
            )
        return repartition(step, lambda i: len(samples[i].input_ids), self._max_tokens)

    def collate(self, samples: list, pad_id: int, device) -> Batch:
        if "pack" not in self.use:
            from .train import collate

            return collate(samples, pad_id, device)
        return pack(samples, device)

    def loss_sum(self, model, batch: Batch):
        m = self._model or self._setup(model)
        if not isinstance(batch, PackedBatch):
            from .train import forward_loss_sum

            return forward_loss_sum(model, batch)
        if batch.target_tokens == 0:
            return torch.zeros((), device=self.device, requires_grad=torch.is_grad_enabled())
        training = torch.is_grad_enabled() and model.training
        if training:
            self._plan_recompute(m, batch.tokens)
        before = torch.cuda.memory_allocated(self.device) if training and self.device.type == "cuda" else 0
        kwargs = dict(
            position_ids=batch.position_ids,
            cu_seq_lens_q=batch.cu_seqlens,
            cu_seq_lens_k=batch.cu_seqlens,
            max_length_q=batch.max_len,
            max_length_k=batch.max_len,
            use_cache=False,
        )
        if self.host_embedding is not None:
            kwargs["inputs_embeds"] = self.host_embedding(batch.host_ids, self.device)
        else:
            kwargs["input_ids"] = batch.input_ids
        with self.host_inputs.around(batch.tokens) if training and self.host_inputs else nullcontext():
            out = m.decoder(**kwargs)
        hidden = out[0][0]
        if batch.target_tokens != hidden.shape[0]:
            hidden = hidden.index_select(0, batch.loss_index)
        loss = self._ce(hidden, m.head_weight, batch.loss_targets)
        if training and self.device.type == "cuda":
            if not m.calibrated:
                self._calibrate(m, batch.tokens, torch.cuda.memory_allocated(self.device) - before)
            self._note_memory_model(m, batch.tokens)
        return loss

    # ---------------------------------------------------------------- setup

    def _setup(self, model) -> _Model:
        causal = model.get_base_model() if hasattr(model, "get_base_model") else model
        decoder = getattr(causal, causal.base_model_prefix)
        if self.device.type == "cuda":
            probe_mm_out_dtype(self.device)
        head = causal.get_output_embeddings()
        if "lora" in self.use:
            n = patch_lora_layers(model, plain=self.recompiles_in_graph)
            if n:
                self.applied.append(f"LoRA layers x{n}")
        self._restore_dtype(causal)
        try:
            from transformers.modeling_layers import GradientCheckpointingLayer

            layers = [mod for mod in decoder.modules() if isinstance(mod, GradientCheckpointingLayer)]
        except ImportError:
            layers = []
        if layers:
            own_recompute(layers, self.cfg.gradient_checkpointing)
            if hasattr(causal, "_require_grads_hook") or getattr(causal, "_require_grads_hooks", None):
                causal.disable_input_require_grads()
        if self.compiles:
            # Samples of many lengths give every forward a new token count: compiled for any size
            # from the start, instead of for the first size and then again as dynamo sees sizes
            # change (two recompiles, 8 and 11 s, in the mixed bench's first steps; H200, session 4).
            options = {"dynamic": True} if self._lengths_vary else {}
            self.applied += compile_layers(
                layers,
                self.device,
                recompute_in_graph=self.recompiles_in_graph,
                **(options | self.compile_options),
            )
        # Larger loss chunks read the [vocab x hidden] head fewer times; lean keeps them small.
        chunk_budget = 4 if self.profile == "lean" else 16
        ce = None if "flce" not in self.use or self.device.type != "cuda" else _liger_ce_sum(chunk_budget)
        self._ce = ce or chunked_ce_sum
        c = causal.config
        hidden = c.hidden_size
        self._model = _Model(
            decoder=decoder,
            head_weight=head.weight,
            layers=layers,
            per_token_layer=layer_activation_bytes(
                c, fused=any("liger" in a for a in self.applied), compiled=self.compiles
            )
            + (0 if "lora" in self.use else (6 * hidden + c.intermediate_size) * 4),
            per_token_fixed=hidden * 2 * 6,
        )
        log.info("GPU path applied: %s", ", ".join(self.applied) or "nothing")
        return self._model

    def _restore_dtype(self, causal) -> None:
        """Undo PEFT's float32 upcast of the frozen non-4-bit weights (embeddings, head, norms) under QLoRA.

        The upcast only matters for float16 training; in bfloat16 it doubles those weights and
        turns the whole residual stream float32."""
        if not self.cfg.is_qlora or self.compute_dtype not in (torch.bfloat16,):
            return
        for p in causal.parameters():
            if not p.requires_grad and p.dtype == torch.float32 and p.__class__.__name__ != "Params4bit":
                p.data = p.data.to(self.compute_dtype)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -------------------------------------------------------------- memory

    def _plan_recompute(self, m: _Model, tokens: int) -> None:
        """Switch recompute off for as many layers as this micro-batch's activations fit (fast profile)."""
        if not m.layers or not self.cfg.gradient_checkpointing:
            return
        if self.profile == "lean" or "selective" not in self.use or self.device.type != "cuda":
            keep = 0
        else:
            free, total = torch.cuda.mem_get_info(self.device)
            cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
            # Mixed lengths fragment the allocator's cache: count half of it, and keep a tenth of
            # the card (at least HEADROOM) free for transients.
            per_layer = m.per_token_layer * m.scale * 1.1
            keep = layers_to_keep(
                budget=free + cached // 2 - max(HEADROOM, total // 10),
                tokens=tokens,
                layers=len(m.layers),
                per_layer=per_layer,
                stub=self._hidden_bytes(),
                fixed=m.per_token_fixed,
                replay=per_layer * (REPLAY_LAYERS_IN_GRAPH if self.recompiles_in_graph else 1),
            )
        for index, layer in enumerate(m.layers):
            layer._tb_recompute = index >= keep
        self._kept = keep

    def _note_memory_model(self, m: _Model, tokens: int) -> None:
        """Say what the memory model expects for the largest forward so far (the bench checks it)."""
        recomputed = len(m.layers) - self._kept if self.cfg.gradient_checkpointing and m.layers else 0
        parts = estimate_peak_bytes(
            self._config,
            tokens=tokens,
            lora_rank=self.cfg.lora_rank,
            quantized=self.cfg.is_qlora,
            recomputed_layers=recomputed,
            embedding_on_host=self.host_embedding is not None,
            compiled=self.compiles,
            inputs_on_host=self.host_inputs is not None,
            in_graph=self.recompiles_in_graph,
        )
        if parts["total"] > self._modelled_peak * 1.02:
            self._modelled_peak = parts["total"]
            self.notes.append(
                f"memory model: peak {parts['total'] / GIB:.2f} GiB for a forward of {tokens} tokens, "
                f"{recomputed} of {len(m.layers)} layers recomputed"
            )

    def _hidden_bytes(self) -> int:
        return self._model.decoder.config.hidden_size * 2 if self._model else 0

    def _calibrate(self, m: _Model, tokens: int, used: int) -> None:
        kept = self._kept
        stub = self._hidden_bytes()
        modelled = tokens * (kept * m.per_token_layer + (len(m.layers) - kept) * stub + m.per_token_fixed)
        if kept and modelled > 0:
            m.scale = min(2.0, max(0.7, used / modelled))
            m.calibrated = True
            log.info("activation memory: %.2f GiB measured, %.2f modelled", used / GIB, modelled / GIB)


def _compute_dtype(model):
    for module in model.modules():
        dtype = getattr(module, "compute_dtype", None)
        if isinstance(dtype, torch.dtype):
            return dtype
    return getattr(model, "dtype", torch.float32)
