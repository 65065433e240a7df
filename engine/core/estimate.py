"""An estimate of what a training run needs, on the GPU or (without one) in RAM, answered before
anything is loaded.

`estimate_training_memory(cfg)` answers "will this form fit?" from the model's config.json alone,
with the CUDA path's own memory model (engine/core/memory_model.py, calibrated against the
bench's measured peaks): the same profile, packed forwards and recompute that
engine/cuda/path.py will choose. Without a GPU, `estimate_host_memory` gives the RAM the CPU
run needs next to what is free, and `check_host_memory` refuses a plan that cannot fit.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import memory_model as gm
from . import plans
from . import protocol as P
from .errors import UserError
from .memory_sampler import gpu_stats
from .model_files import DEMO_NAME, cache_root, workspace_model

GIB = gm.GIB

# ================================================================== estimation

# The CUDA context, cuBLAS workspaces and the allocator's cache come on top of the estimate (it is
# the allocator's peak, what the bench measures); this much is said in the notes.
CUDA_CONTEXT_BYTES = plans.CUDA_CONTEXT_BYTES

# The demo model (SmolLM2-135M-Instruct), for when its converted folder is not cached yet.
DEMO_MODEL_INFO = {
    "hidden_size": 576,
    "num_hidden_layers": 30,
    "intermediate_size": 1536,
    "vocab_size": 49152,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "tie_word_embeddings": True,
}


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a Llama-style decoder that memory depends on."""

    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelShape:
        # Multimodal wrappers keep the language model's sizes under text_config.
        c = config.get("text_config") or config
        try:
            hidden = int(c["hidden_size"])
            layers = int(c["num_hidden_layers"])
            vocab = int(c.get("vocab_size") or config["vocab_size"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"config.json lacks {exc}") from None
        heads = int(c.get("num_attention_heads") or max(1, hidden // 64))
        return cls(
            hidden=hidden,
            layers=layers,
            intermediate=int(c.get("intermediate_size") or 4 * hidden),
            vocab=vocab,
            heads=heads,
            kv_heads=int(c.get("num_key_value_heads") or heads),
            head_dim=int(c.get("head_dim") or hidden // heads),
            tied=bool(config.get("tie_word_embeddings", c.get("tie_word_embeddings", False))),
        )

    def as_config(self) -> dict[str, Any]:
        """The sizes in config.json's names (what engine/core/memory_model.py reads)."""
        return {
            "hidden_size": self.hidden,
            "num_hidden_layers": self.layers,
            "intermediate_size": self.intermediate,
            "vocab_size": self.vocab,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "tie_word_embeddings": self.tied,
        }

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer in one decoder layer."""
        return gm.projection_shapes(self.as_config())

    @property
    def parameters(self) -> int:
        return gm.parameter_count(self.as_config())


def training_plan(
    shape: ModelShape, cfg: Any, card_bytes: int | None, longest: int | None = None
) -> plans.Choice:
    """The plan the CUDA path (engine/cuda/path.py) will pick for `cfg` on a card of `card_bytes`
    (None: unknown, no GPU here), with the default techniques; `longest` is the data's longest
    sample in tokens, when known. NoPlanFits when nothing fits the budget."""
    model = shape.as_config()
    facts = plans.path_facts(cfg, model, plans.techniques_for(cfg))
    available = card_bytes - CUDA_CONTEXT_BYTES if card_bytes else None
    return plans.choose_plan(cfg, model, facts, plans.Workload.of(cfg, longest), available)


def card_bytes_here() -> int | None:
    """The memory of the GPU training would use (NVML's first), or None where none is seen."""
    gpus, _note = gpu_stats()
    return gpus[0]["total"] if gpus else None


def estimate_training_memory(
    cfg: Any,
    model_info: dict[str, Any] | None = None,
    card_bytes: int | None = -1,
    longest: int | None = None,
) -> P.MemoryEstimate:
    """GPU memory a TrainConfig will need at its peak (the allocator's), from the model's
    config.json (read without torch); `model_info` is that config.json as a dict, when the caller
    has it; `card_bytes` the GPU's memory (-1: card_bytes_here(); None: no GPU). The numbers are the CUDA
    path's own memory model (engine/core/memory_model.py). Where no GPU is seen, the RAM a run on
    the CPU needs instead (estimate_host_memory; `longest` is the data's longest sample in tokens,
    when known). Raises ValueError when the model's sizes cannot be found."""
    info = model_info if model_info is not None else read_model_info(cfg.model)
    if info is None:
        raise ValueError(f"cannot find config.json for model {cfg.model!r} to estimate its memory")
    shape = ModelShape.from_config(info)
    if card_bytes == -1:
        card_bytes = card_bytes_here()
    if card_bytes is None:
        return estimate_host_memory(cfg, info, longest=longest)
    try:
        choice = training_plan(shape, cfg, card_bytes, longest)
    except plans.NoPlanFits as refused:
        stage, why = sharding_stage(shape, cfg, card_bytes, longest)
        if stage or (cfg.deepspeed == "zero3" and cfg.nproc_per_node > 1 and not cfg.is_qlora):
            return _sharded_estimate(
                dataclasses.replace(cfg, deepspeed="zero3"), shape, longest, card_bytes, why
            )
        return _refused_estimate(cfg, shape, longest, refused)
    plan = choice.plan
    parts = dict(plan.parts)
    ranks_note = _per_gpu_of_ranks(parts, cfg, shape.layers)
    total = parts.pop("total")
    notes = [
        *([ranks_note] if ranks_note else []),
        f"plan chosen: {choice.why}",
        "forwards packed without padding",
        f"plus about {CUDA_CONTEXT_BYTES / GIB:.1f} GiB of CUDA context and the allocator's cache",
    ]
    if cfg.is_qlora:
        notes.append("QLoRA: NF4 linear layers with double quantisation")
    return _estimate_event(cfg, shape, parts, total, notes=notes, plan=plan.line(choice.budget))


def qlora_sharding_note(stage: str) -> str:
    """What --deepspeed does to a QLoRA run on several processes (the log and the estimate say it)."""
    return (
        f"--deepspeed {stage} with QLoRA: FSDP2 cannot shard bitsandbytes' 4-bit base, so every GPU "
        "holds all of it (4-bit); the LoRA adapter trains data parallel, its gradients all-reduced"
    )


def _estimate_event(
    cfg: Any, shape: ModelShape, parts: dict[str, int], total: int, **fields: Any
) -> P.MemoryEstimate:
    """The MemoryEstimate of `parts` and `total` (bytes) for `cfg` on `shape`, with `fields`."""
    return P.MemoryEstimate(
        total_gib=round(total / GIB, 3),
        parts={name: round(value / GIB, 3) for name, value in parts.items()},
        model=cfg.model,
        parameters=shape.parameters,
        trainable=gm.lora_parameters(
            shape.as_config(), cfg.lora_rank, tuple(cfg.target_modules), cfg.use_dora
        ),
        **fields,
    )


def sharding_stage(
    shape: ModelShape, cfg: Any, card_bytes: int | None, longest: int | None = None
) -> tuple[str, str]:
    """The --deepspeed stage a run on several processes takes when none is given, and why: data
    parallel ("") while a plan fits one card, as each GPU holds the whole base; "zero3" (FSDP2)
    when none does and a GPU's share of the sharded run fits. ("", "") where that does not apply
    (one process, a stage given, no GPU seen, settings FSDP2 refuses)."""
    from .config import ConfigError

    if cfg.nproc_per_node <= 1 or cfg.deepspeed or cfg.is_qlora or card_bytes is None:
        return "", ""
    try:
        training_plan(shape, cfg, card_bytes, longest)
        return "", ""
    except plans.NoPlanFits:
        whole = smallest_plan_of(cfg, shape, longest).peak
    try:
        sharded = dataclasses.replace(cfg, deepspeed="zero3")
    except ConfigError:  # QLoRA, --modules_to_save, pissa: FSDP2 refuses them
        return "", ""
    share = sharded_peak(sharded, shape, longest)
    if share > card_bytes - CUDA_CONTEXT_BYTES:
        return "", ""
    return "zero3", (
        f"the base does not fit one GPU for data parallel (about {whole / GIB:.1f} GiB each): "
        f"sharded over the {cfg.nproc_per_node} processes with FSDP2, as --deepspeed zero3, about "
        f"{share / GIB:.1f} GiB per GPU; --deepspeed zero2 or zero3 chooses"
    )


def smallest_plan_of(cfg: Any, shape: ModelShape, longest: int | None = None) -> plans.Plan:
    """The plan of `cfg` with the smallest peak on `shape` (the planner's lean end)."""
    model = shape.as_config()
    facts = plans.path_facts(cfg, model, plans.techniques_for(cfg))
    return plans.smallest_plan(model, facts, plans.Workload.of(cfg, longest))


def sharded_peak(cfg: Any, shape: ModelShape, longest: int | None = None) -> int:
    """Each GPU's peak bytes in a zero3 run of `cfg` (CUDA context not included)."""
    return _sharded_parts(cfg, shape, longest)[0]["total"]


def _sharded_parts(cfg: Any, shape: ModelShape, longest: int | None) -> tuple[dict[str, int], str]:
    """Per-GPU parts of a zero3 run, from the smallest plan (FSDP2 runs the plain path, whose
    recompute the lean end models), and the note that says how they are shared."""
    parts = dict(smallest_plan_of(cfg, shape, longest).parts)
    note = _per_gpu_of_ranks(parts, cfg, shape.layers)
    return parts, note


def _sharded_estimate(
    cfg: Any, shape: ModelShape, longest: int | None, card_bytes: int, why: str
) -> P.MemoryEstimate:
    """A zero3 run whose base is too big for one card: each GPU's share, or why even that fails."""
    parts, shared = _sharded_parts(cfg, shape, longest)
    total = parts.pop("total")
    fits = total <= card_bytes - CUDA_CONTEXT_BYTES
    notes = [*([why] if why else []), shared]
    return _estimate_event(
        cfg,
        shape,
        parts,
        total,
        notes=notes,
        plan="",
        sharding=f"zero3: {why}" if why else "",
        refused=""
        if fits
        else (
            f"even sharded over {cfg.nproc_per_node} GPUs, each needs about {total / GIB:.1f} GiB of "
            f"{(card_bytes - CUDA_CONTEXT_BYTES) / GIB:.1f}"
        ),
        advice=[] if fits else ["more GPUs (--nproc_per_node), a shorter max_length, or a smaller model"],
    )


def _refused_estimate(
    cfg: Any, shape: ModelShape, longest: int | None, refused: plans.NoPlanFits
) -> P.MemoryEstimate:
    """The smallest plan's numbers, with why training would be refused and what would fit."""
    smallest = smallest_plan_of(cfg, shape, longest)
    parts = dict(smallest.parts)
    total = parts.pop("total")
    notes = [f"the smallest plan: {smallest.line()}"]
    return _estimate_event(
        cfg, shape, parts, total, notes=notes, refused=refused.message, advice=[refused.hint]
    )


def _per_gpu_of_ranks(parts: dict[str, int], cfg: Any, layers: int) -> str:
    """The peak per GPU of a run on several (--nproc_per_node): data parallel, each holds all of
    it; --deepspeed zero3 (FSDP2) shards the weights and the trained state, and holds two layers
    whole at a time (the one running, the next being gathered). zero2 keeps every layer gathered
    from forward to backward, so its peak holds the whole base. Changes `parts` in place."""
    ranks = int(getattr(cfg, "nproc_per_node", 1) or 1)
    stage = getattr(cfg, "deepspeed", "")
    if ranks <= 1:
        return ""
    if stage and cfg.is_qlora:
        return f"per GPU, each of {ranks} holding the whole base: {qlora_sharding_note(stage)}"
    if stage != "zero3":
        what = "zero2 gathers every layer from forward to backward" if stage else "data parallel"
        return f"per GPU, each of {ranks} holding the whole base ({what})"
    gathered = 2 * parts["weights"] // max(layers, 1)
    parts["weights"] = parts["weights"] // ranks + gathered
    parts["lora_and_optimizer"] //= ranks
    parts["total"] = sum(v for k, v in parts.items() if k != "total")
    return (
        f"per GPU of {ranks}: --deepspeed zero3 (FSDP2) shards the weights, 1/{ranks} each plus "
        "two layers gathered at a time; FSDP2 runs the plain path, which this model estimates "
        "by the fast path's"
    )


# ================================================================== host memory (no GPU)


def host_available_bytes() -> int:
    """RAM that can be taken without swapping now (the kernel's MemAvailable)."""
    import psutil

    return int(psutil.virtual_memory().available)


@dataclass(frozen=True)
class HostPlan:
    """What sets a CPU run's peak: its largest padded micro-batch and how each layer keeps it."""

    batch: int
    width: int  # tokens of the longest sample a micro-batch is padded to
    dtype_bytes: int
    recompute: bool
    lora_rank: int
    targets: tuple[str, ...]
    lora_dropout: float
    dora: bool

    @classmethod
    def of(cls, cfg: Any, longest: int | None = None) -> HostPlan:
        return cls(
            batch=cfg.per_device_train_batch_size,
            width=min(cfg.max_length, longest) if longest else cfg.max_length,
            dtype_bytes=2 if cfg.torch_dtype in ("bfloat16", "float16") else 4,  # auto: float32 on a CPU
            recompute=bool(cfg.gradient_checkpointing),
            lora_rank=cfg.lora_rank,
            targets=tuple(cfg.target_modules),
            lora_dropout=cfg.lora_dropout,
            dora=cfg.use_dora,
        )

    def parts(self, shape: ModelShape) -> dict[str, int]:
        return gm.estimate_host_peak_bytes(
            shape.as_config(),
            tokens=self.batch * self.width,
            dtype_bytes=self.dtype_bytes,
            recompute=self.recompute,
            lora_rank=self.lora_rank,
            target_modules=self.targets,
            lora_dropout=self.lora_dropout,
            dora=self.dora,
        )


def estimate_host_memory(
    cfg: Any, model_info: dict[str, Any], *, longest: int | None = None, available: int | None = None
) -> P.MemoryEstimate:
    """RAM a TrainConfig will need at its peak on a machine without a GPU, next to what is free,
    and when it does not fit, the settings that would.

    Micro-batches are padded to their longest sample, and every epoch one holds the data's longest:
    `longest` is that sample's tokens when known (else samples of max_length are assumed).
    `available` is the RAM free now (default: MemAvailable)."""
    shape, plan, parts, free = _host_need(cfg, model_info, longest, available)
    total = parts.pop("total")
    why = "the data's longest sample" if longest and plan.width < cfg.max_length else "max_length"
    notes = [
        f"no GPU: training runs on the CPU and its peak is in RAM ({free / GIB:.1f} GiB free now)",
        f"largest micro-batch {plan.batch} samples x {plan.width} tokens ({why})",
        f"{'float32' if plan.dtype_bytes == 4 else cfg.torch_dtype} weights and activations"
        + (", layers recomputed in backward" if plan.recompute else ""),
    ]
    return _estimate_event(
        cfg,
        shape,
        parts,
        total,
        notes=notes,
        memory="host",
        available_gib=round(free / GIB, 3),
        advice=[] if total <= free else host_settings_that_fit(cfg, shape, plan, free),
    )


def _host_need(
    cfg: Any, model_info: dict[str, Any], longest: int | None, available: int | None
) -> tuple[ModelShape, HostPlan, dict[str, int], int]:
    """The model's shape, the run's plan, its peak by part and the RAM free (MemAvailable if not given)."""
    shape = ModelShape.from_config(model_info)
    plan = HostPlan.of(cfg, longest)
    return shape, plan, plan.parts(shape), host_available_bytes() if available is None else available


def host_settings_that_fit(cfg: Any, shape: ModelShape, plan: HostPlan, budget: int) -> list[str]:
    """Changes of one setting each that bring the CPU run's peak within `budget` bytes."""

    def fits(**change: Any) -> bool:
        return dataclasses.replace(plan, **change).parts(shape)["total"] <= budget

    found = []
    smaller = next((b for b in range(plan.batch - 1, 0, -1) if fits(batch=b)), 0)
    if smaller:
        per_step = plan.batch * cfg.gradient_accumulation_steps
        found.append(
            f"per_device_train_batch_size {smaller} with gradient_accumulation_steps "
            f"{-(-per_step // smaller)} (the same samples per step, in smaller micro-batches)"
        )
    shortest = _smallest_max_length()
    if fits(width=shortest):
        low, high = shortest, plan.width - 1  # the longest max_length that fits: fits(low) holds
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if fits(width=middle) else (low, middle - 1)
        found.append(f"max_length {low} (longer samples are cut there)")
    if not plan.recompute and fits(recompute=True):
        found.append("gradient_checkpointing on (recompute activations in backward)")
    if plan.dtype_bytes == 4 and fits(dtype_bytes=2):
        found.append("torch_dtype bfloat16 (half the RAM of float32)")
    return found


def _smallest_max_length() -> int:
    from .config import TrainConfig

    (max_length,) = [f for f in dataclasses.fields(TrainConfig) if f.name == "max_length"]
    return int(max_length.metadata["min"])


def check_host_memory(
    cfg: Any, model_info: dict[str, Any], *, longest: int | None = None, available: int | None = None
) -> None:
    """Refuse a CPU run whose peak cannot fit in the RAM free now, naming the settings that fit."""
    shape, plan, parts, free = _host_need(cfg, model_info, longest, available)
    if parts["total"] <= free:
        return
    what = (
        f"training needs about {parts['total'] / GIB:.1f} GiB of RAM at its peak, and "
        f"{free / GIB:.1f} GiB is free (no GPU here: it trains on the CPU; micro-batches "
        f"of {plan.batch} x {plan.width} tokens, {parts['weights'] / GIB:.1f} GiB of it the model)"
    )
    advice = host_settings_that_fit(cfg, shape, plan, free)
    if advice:
        hint = "any one of these fits: " + "; or ".join(advice)
    else:
        hint = "even the smallest settings do not fit: choose a smaller model"
    raise UserError(what, hint + "; or close other programs using RAM (top lists them)", code="config")


# --------------------------------------------------------------- model config


def read_model_info(spec: str, base: str | Path | None = None) -> dict[str, Any] | None:
    """A model's config.json as a dict without loading anything heavy, or None.

    Knows the demo model, local folders (relative ones against `base`), converted GGUF files in
    TuneBench's cache, and hub ids in the local Hugging Face cache.
    """
    spec = workspace_model(spec, base)
    if spec == DEMO_NAME:
        return _cached_conversion("smollm2-135m-instruct") or dict(DEMO_MODEL_INFO)
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf":
        return _cached_conversion(path.stem) if path.is_file() else None
    if (path / "config.json").is_file():
        return _read_json(path / "config.json")
    parts = spec.split("/")
    if len(parts) == 2 and all(parts):
        return _from_hf_cache(spec)
    return None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _cached_conversion(prefix: str) -> dict[str, Any] | None:
    for folder in sorted((cache_root() / "models").glob(f"{prefix}-*")):
        found = _read_json(folder / "config.json")
        if found:
            return found
    return None


def _from_hf_cache(repo_id: str) -> dict[str, Any] | None:
    hub = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or os.path.expanduser("~/.cache/huggingface"), "hub"
    )
    repo = Path(hub) / ("models--" + repo_id.replace("/", "--"))
    try:
        ref = (repo / "refs" / "main").read_text().strip()
        snapshots = [repo / "snapshots" / ref]
    except OSError:
        snapshots = sorted((repo / "snapshots").glob("*"))
    for snapshot in snapshots:
        found = _read_json(snapshot / "config.json")
        if found:
            return found
    return None
