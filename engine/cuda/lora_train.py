"""LoRA products for the CUDA training path (engine/cuda/path.py): PEFT's LoRA Linear layers routed
through an adapter in the compute dtype with one saved input, or plain ops for layers whose
recompute is compiled into their graph."""

from __future__ import annotations

import math
from types import MethodType

import torch
import torch.nn.functional as F


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


def _dequantized(base, dtype, fused: bool = True):
    """A bitsandbytes 4-bit weight as the dense [out, in] matrix its products use."""
    state = base.weight.quant_state
    if fused and nf4_fusable(state):
        return dequantize_nf4(base.weight.data, state, dtype)
    import bitsandbytes.functional as bnb_functional

    return bnb_functional.dequantize_4bit(base.weight.data, state).to(dtype)


def nf4_fusable(state) -> bool:
    """Whether `dequantize_nf4` covers this bitsandbytes quant state: NF4 whose blocks tile the
    weight exactly (and, with double quant, whose scales tile the second level's blocks)."""
    n = math.prod(state.shape)
    if state.quant_type != "nf4" or n % state.blocksize:
        return False
    return not state.nested or (n // state.blocksize) % state.state2.blocksize == 0


def dequantize_nf4(packed: torch.Tensor, state, dtype: torch.dtype) -> torch.Tensor:
    """bitsandbytes' NF4 dequantisation (double quant included) in plain tensor ops.

    Inside a compiled layer inductor fuses this into one memory-bound kernel per weight, where
    bitsandbytes' own takes three kernels and allocations for the scales; a 7B's 196 weights are
    dequantised twice in every forward and backward (forward, replay). Same values: each code
    times its block's float32 scale, rounded once to `dtype`; bytes hold two codes, the high
    nibble first."""
    codes = packed.reshape(-1)
    codes = torch.stack((codes >> 4, codes & 15), dim=-1).reshape(-1).long()
    scales = state.absmax
    if state.nested:
        inner = state.state2
        scales = inner.code[scales.long()].view(-1, inner.blocksize) * inner.absmax.view(-1, 1)
        scales = scales.reshape(-1) + state.offset
    values = state.code[codes].view(-1, state.blocksize) * scales.float().view(-1, 1)
    return values.to(dtype).view(state.shape)


def _lora_plain(self, x, lora_a, lora_b, scale, dropout):
    """The base product and the adapter's in plain differentiable ops, no autograd.Function.

    For layers whose recompute is compiled into their graph: torch 2.11 keeps what an
    autograd.Function saves (the adapters' inputs, bitsandbytes' product outputs) for backward
    instead of recomputing it, 5 to 10 GiB more on a 7B (bench/RESULTS.md). The
    adapter's gradients come out of a compute-dtype product here, as under autocast."""
    base = self.base_layer
    bias = None if base.bias is None else base.bias.to(x.dtype)
    if type(base) is torch.nn.Linear and base.weight.dtype == x.dtype:
        out = F.linear(x, base.weight, bias)
    elif "4bit" in type(base).__name__ and getattr(base.weight, "quant_state", None) is not None:
        # one dequantisation for the replay and the backward
        out = F.linear(x, _dequantized(base, x.dtype, self._tb_fused_nf4), bias)
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


def patch_lora_layers(model, plain: bool = False, fused_nf4: bool = True) -> int:
    """Route every PEFT LoRA Linear (dense or 4-bit) through `_lora_forward`; returns how many.

    `plain`: the products in plain ops (`_lora_plain`), for layers that recompute in their graph;
    `fused_nf4`: there, NF4 weights dequantised by `dequantize_nf4` rather than bitsandbytes."""
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
            module._tb_fused_nf4 = fused_nf4
            module.forward = MethodType(_lora_forward, module)
            count += 1
    return count
