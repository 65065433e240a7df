"""torch.compile for the fast path's decoder layers: one compiled region per layer, its artefacts
kept in TuneBench's cache across runs, and torch's own account of the seconds and graphs that
compiling took (the progress line's "compiling the decoder layers" stage)."""

from __future__ import annotations

import os
from dataclasses import astuple, dataclass
from types import MethodType

import torch

from .lora_train import probe_mm_out_dtype


def keep_compiled_code() -> None:
    """Keep what torch.compile produces (inductor's and AOTAutograd's caches) in TuneBench's cache
    folder, where it outlives /tmp: the next run of the same model shape skips most of the compile
    (about 21 s for a 7B). Also picks kernels the same way in every process, so that a resumed run
    is exact. TORCHINDUCTOR_CACHE_DIR set by the user wins."""
    import torch._inductor.config
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    from torch._inductor.utils import clear_caches

    from ..core.model_files import cache_root

    # torch writes its default (/tmp/torchinductor_<user>) into the variable the first time it
    # asks for the folder, and importing transformers asks: that value is not the user's choice.
    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    ours = str(cache_root() / "compiled")
    if chosen != ours and (chosen is None or os.path.abspath(chosen) == os.path.abspath(default_cache_dir())):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = ours
        clear_caches()  # folders torch worked out from the old value (as its temporary_cache_dir does)
    torch._inductor.config.fx_graph_cache = True
    # The same kernels in every process: inductor otherwise picks some kernel configurations by
    # timing them on the device, so a fresh process (a resumed run) may sum in another order and
    # its losses drift from the 4th digit on (bench/check_determinism.py, bench/RESULTS.md).
    # TORCHINDUCTOR_DETERMINISTIC=0 set by the user wins.
    if os.environ.get("TORCHINDUCTOR_DETERMINISTIC") != "0" and hasattr(
        torch._inductor.config, "deterministic"
    ):
        torch._inductor.config.deterministic = True


@dataclass(frozen=True)
class CompileTally:
    """torch.compile's own account of its work: seconds compiling (dynamo's timers: the forward's
    trace with AOTAutograd and inductor, and the backward, compiled at its first call) and the
    graphs AOTAutograd's cache served (`reused`), compiled afresh and stored (`compiled`), or could
    not cache (`uncached`). `since` gives the work between two tallies."""

    seconds: float = 0.0
    reused: int = 0
    compiled: int = 0
    uncached: int = 0

    @classmethod
    def now(cls) -> CompileTally:
        from torch._dynamo.utils import compilation_time_metrics, counters

        aot = counters["aot_autograd"]
        return cls(
            seconds=sum(sum(compilation_time_metrics.get(name, ())) for name in _COMPILE_TIMERS),
            reused=aot["autograd_cache_hit"],
            compiled=aot["autograd_cache_miss"],
            uncached=aot["autograd_cache_bypass"],
        )

    def since(self, start: CompileTally) -> CompileTally:
        # max: a test's torch._dynamo.reset() or counters.clear() between the two tallies
        return CompileTally(*(max(0, a - b) for a, b in zip(astuple(self), astuple(start), strict=True)))

    def describe(self) -> str:
        """What the cache did, in words ("" when nothing was compiled)."""
        where = os.environ.get("TORCHINDUCTOR_CACHE_DIR", "torch's cache")
        parts = []
        if self.reused:
            parts.append(f"{self.reused} compiled graph{'s' * (self.reused != 1)} reused from {where}")
        if self.compiled:
            parts.append(
                f"{self.compiled} graph{'s' * (self.compiled != 1)} compiled afresh, kept in {where} "
                "for the next run of this model shape"
            )
        if self.uncached:
            parts.append(f"{self.uncached} graph{'s' * (self.uncached != 1)} torch cannot cache")
        return "; ".join(parts)


# dynamo's timers around a frame's compile (forward, AOTAutograd and inductor included) and around
# the backward's compile, which inductor runs at the first backward
_COMPILE_TIMERS = ("_compile.compile_inner", "backward._backward_impl")


def compile_layers(
    layers: list, device, recompute_in_graph: bool = False, dynamic_tokens: bool = False, **options
) -> list[str]:
    """torch.compile each decoder layer as one region (all share one compiled graph).

    Fuses the layer's elementwise work (norms, RoPE, residuals, SwiGLU) and takes most of the
    per-op Python and launch cost out of the forward, which otherwise leaves the GPU waiting.
    `recompute_in_graph` compiles the checkpoint with the layer: the forward graph keeps only the
    layer's inputs and the backward graph replays the forward itself, so the replay costs no
    second call into the compiled code and its elementwise work fuses with the backward's.
    Otherwise the checkpoint stays outside and replays the compiled forward. `dynamic_tokens`:
    the packed forwards vary in size (`_token_dims_dynamic`).
    """
    if not layers:
        return []
    keep_compiled_code()
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
    # fullgraph: a layer dynamo cannot take whole raises instead of running as eager pieces, so
    # the path can switch the technique off and say so (`FastPath._switch_off`).
    options = {"fullgraph": True} | options
    for layer in layers:
        if recompute_in_graph or not hasattr(layer, "_tb_forward"):
            layer.compile(**options)
            if dynamic_tokens:  # nn.Module.__call__ calls this when set
                layer._compiled_call_impl = _token_dims_dynamic(layer._compiled_call_impl)
        else:
            layer._tb_eager_forward = layer._tb_forward
            layer._tb_forward = torch.compile(layer._tb_forward, **options)
            if dynamic_tokens:
                layer._tb_forward = _token_dims_dynamic(layer._tb_forward)
    where = ", recompute inside the graph" if recompute_in_graph else ""
    sizes = ", one graph for every forward size" if dynamic_tokens else ""
    return [f"torch.compile x{len(layers)} layers{where}{sizes}"]


def uncompile_layers(layers: list) -> None:
    """Undo `compile_layers`: every layer runs its eager forward again."""
    for layer in layers:
        layer._compiled_call_impl = None
        if hasattr(layer, "_tb_eager_forward"):
            layer._tb_forward = layer.__dict__.pop("_tb_eager_forward")


def call_module_forwards_directly(layers: list) -> int:
    """Bypass the `kernels` package's routing wrapper on the layers' modules; how many.

    transformers wraps some modules (Qwen2's attention, for its RoPE) with `use_kernelized_func`
    so that a hub kernel chosen by `kernels.kernelize` can stand in. The wrapper sets a
    module-level variable around every forward, a side effect dynamo refuses inside a checkpoint:
    each decoder layer would break its graph. Nothing here kernelizes (no hub downloads), so the
    wrapper only routes back to the module's own forward, which is called directly instead."""
    count = 0
    for layer in layers:
        for module in layer.modules():
            routed = type(module).forward
            own = "forward" in module.__dict__  # already replaced on this instance: leave it
            if "_kernel_funcs" in module.__dict__ and hasattr(routed, "__wrapped__") and not own:
                module.forward = MethodType(routed.__wrapped__, module)
                count += 1
    return count


def _token_dims_dynamic(compiled):
    """Call `compiled` (a packed decoder layer) with its token and sample-count dimensions marked
    dynamic: compiled once for every forward size, all other sizes static.

    dynamo otherwise compiles for the first size and again as sizes change (two recompiles, 8 and
    11 s, in the mixed bench's first steps on an H200). `dynamic=True` makes every size symbolic:
    no result within 100 s on the same bench, where this compiles in 15 s."""

    def call(*args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        tokens = hidden.shape[1]  # packed: [1, tokens, hidden]
        for value in (*args, *kwargs.values()):
            for t in value if isinstance(value, tuple) else (value,):
                if not isinstance(t, torch.Tensor):
                    continue
                if t.dim() == 1 and not t.is_floating_point():  # sample bounds: [samples + 1]
                    torch._dynamo.maybe_mark_dynamic(t, 0)
                for dim, size in enumerate(t.shape):
                    if size == tokens and dim > 0:
                        torch._dynamo.maybe_mark_dynamic(t, dim)
        return compiled(*args, **kwargs)

    return call
