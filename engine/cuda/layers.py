"""What the fast path does to each decoder layer before it runs: its own recompute switch, and
MLPs that run over slices of a long forward's tokens (engine/cuda/path.py sets both per forward)."""

from __future__ import annotations

from types import MethodType

import torch


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


def _sliced_mlp_forward(self, x):
    """The MLP over `_tb_chunks` slices of the tokens (each token's MLP is its own: same result).

    Compiled with the layer's recompute in its graph, the backward replays each slice just before
    that slice's backward, so one slice's intermediates are alive instead of the whole forward's."""
    chunks = self._tb_chunks
    if chunks <= 1:
        return self._tb_mlp_forward(x)
    return torch.cat([self._tb_mlp_forward(part) for part in x.tensor_split(chunks, dim=-2)], dim=-2)


def chunk_mlps(layers: list) -> int:
    """Let each decoder layer's MLP run over slices of the tokens (`set_mlp_chunks` sets how
    many per forward, 1 at first); how many MLPs."""
    count = 0
    for layer in layers:
        mlp = getattr(layer, "mlp", None)
        if mlp is None or hasattr(mlp, "_tb_mlp_forward"):
            continue
        mlp._tb_mlp_forward = mlp.forward
        mlp._tb_chunks = 1
        mlp.forward = MethodType(_sliced_mlp_forward, mlp)
        count += 1
    return count


def set_mlp_chunks(layers: list, chunks: int) -> None:
    """The slices the next forward runs each MLP in (a compiled layer recompiles once per new count)."""
    for layer in layers:
        mlp = getattr(layer, "mlp", None)
        if mlp is not None and hasattr(mlp, "_tb_chunks"):
            mlp._tb_chunks = chunks


def saved_tensor_hooks_top():
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top(False) if top else None


def pop_saved_tensor_hooks_to(expected) -> None:
    """Uninstall the saved-tensor hooks a failed forward left behind.

    torch 2.11's non-reentrant checkpoint leaves its hooks installed when the function it runs
    raises: every tensor saved afterwards would be "recomputed" in backward by that failed
    function. Pops back to the hooks that were installed before the forward."""
    pop = getattr(torch._C._autograd, "_pop_saved_tensors_default_hooks", None)
    for _ in range(64):  # a bound: each failed checkpoint leaves one pair
        if pop is None or saved_tensor_hooks_top() == expected:
            return
        pop()
