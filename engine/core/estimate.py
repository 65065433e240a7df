"""An estimate of what a training run needs on the GPU, answered before anything is loaded.

`estimate_training_memory(cfg)` answers "will this form fit?" from the model's config.json alone,
with the CUDA path's own memory model (engine/core/memory_model.py, calibrated against the
bench's measured peaks): the same profile, packed forwards and recompute that
engine/cuda/path.py will choose.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import memory_model as gm
from . import protocol as P
from .memory_sampler import gpu_stats
from .model_files import DEMO_NAME, cache_root, workspace_model

GIB = gm.GIB

# ================================================================== estimation

# The CUDA context, cuBLAS workspaces and the allocator's cache come on top of the estimate (it is
# the allocator's peak, what the bench measures); this much is said in the notes.
CUDA_CONTEXT_BYTES = int(0.5 * GIB)

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
    def linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.linear_shapes().values())

    @property
    def embedding_params(self) -> int:
        """Input embeddings, the output head (unless tied) and the norms."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + (2 * self.layers + 1) * self.hidden

    @property
    def parameters(self) -> int:
        return self.linear_params + self.embedding_params


@dataclass(frozen=True)
class TrainingLayout:
    """What the GPU path will do with a config on a card: the memory model's inputs."""

    profile: gm.Profile
    why: str
    tokens: int  # the largest forward, packed
    recomputed_layers: int
    quantized: bool
    embedding_on_host: bool
    lora_params: int
    inputs_on_host: bool = False  # the recomputed layers' inputs (lean)


def training_layout(shape: ModelShape, cfg: Any, card_bytes: int | None) -> TrainingLayout:
    """The profile, the largest forward and the recomputed layers the CUDA path (engine/cuda/path.py)
    will pick for `cfg` on a card of `card_bytes` (None: unknown, no GPU here)."""
    model = shape.as_config()
    quantized = cfg.train_type == "qlora" or cfg.quant_bits == 4
    targets = tuple(cfg.target_modules)
    trainable = gm.lora_parameters(model, cfg.lora_rank, targets)
    weights = gm.estimate_peak_bytes(model, tokens=0, quantized=quantized, recomputed_layers=0)["weights"]
    free = card_bytes - weights - CUDA_CONTEXT_BYTES if card_bytes else None
    profile, why = gm.choose_profile(cfg.profile, free)
    lean = profile == gm.Profile.LEAN
    on_host = lean and not shape.tied
    inputs_on_host = lean and bool(cfg.gradient_checkpointing)
    kw: dict[str, Any] = dict(
        quantized=quantized,
        embedding_on_host=on_host,
        inputs_on_host=inputs_on_host,
        lora_rank=cfg.lora_rank,
        target_modules=targets,
    )
    step_tokens = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * cfg.max_length
    if lean or card_bytes:
        limit = gm.tokens_per_forward(model, profile=profile, card_bytes=card_bytes or 0, **kw)
        tokens = min(step_tokens, max(cfg.max_length, limit))  # a sample is never split
    else:
        tokens = cfg.per_device_train_batch_size * cfg.max_length
    recomputed = 0
    if cfg.gradient_checkpointing:
        if lean:
            recomputed = shape.layers
        elif card_bytes:
            fixed = gm.estimate_peak_bytes(model, tokens=0, recomputed_layers=0, **kw)["total"]
            per_layer = gm.layer_activation_bytes(model)
            keep = gm.layers_to_keep(
                budget=card_bytes - max(gm.HEADROOM, card_bytes // 10) - fixed,
                tokens=tokens,
                layers=shape.layers,
                per_layer=per_layer,
                stub=shape.hidden * 2,
                fixed=gm.loss_bytes_per_token(model),
                replay=per_layer * gm.REPLAY_LAYERS_IN_GRAPH,
            )
            recomputed = shape.layers - keep
    return TrainingLayout(profile, why, tokens, recomputed, quantized, on_host, trainable, inputs_on_host)


def estimate_training_memory(
    cfg: Any, model_info: dict[str, Any] | None = None, card_bytes: int | None = -1
) -> P.MemoryEstimate:
    """GPU memory a TrainConfig will need at its peak (the allocator's), from the model's
    config.json (read without torch); `model_info` is that config.json as a dict, when the caller
    has it; `card_bytes` the GPU's memory (-1: ask NVML; None: no GPU). The numbers are the CUDA
    path's own memory model (engine/core/memory_model.py). Raises ValueError when the model's sizes
    cannot be found."""
    info = model_info if model_info is not None else read_model_info(cfg.model)
    if info is None:
        raise ValueError(f"cannot find config.json for model {cfg.model!r} to estimate its memory")
    shape = ModelShape.from_config(info)
    if card_bytes == -1:
        gpus, _note = gpu_stats()
        card_bytes = gpus[0]["total"] if gpus else None
    layout = training_layout(shape, cfg, card_bytes)
    parts = gm.estimate_peak_bytes(
        shape.as_config(),
        tokens=layout.tokens,
        quantized=layout.quantized,
        recomputed_layers=layout.recomputed_layers,
        embedding_on_host=layout.embedding_on_host,
        lora_rank=cfg.lora_rank,
        target_modules=tuple(cfg.target_modules),
        inputs_on_host=layout.inputs_on_host,
    )
    total = parts.pop("total")
    notes = [
        f"profile {layout.profile} ({layout.why})",
        f"largest forward {layout.tokens} tokens, packed without padding",
        f"{layout.recomputed_layers} of {shape.layers} layers recomputed in backward",
        f"plus about {CUDA_CONTEXT_BYTES / GIB:.1f} GiB of CUDA context and the allocator's cache",
    ]
    if layout.quantized:
        notes.append("QLoRA: NF4 linear layers with double quantisation")
    if layout.embedding_on_host:
        notes.append("input embeddings kept in host memory")
    if layout.inputs_on_host:
        notes.append("recomputed layers' inputs kept in host memory")
    return P.MemoryEstimate(
        total_gib=round(total / GIB, 3),
        parts={name: round(value / GIB, 3) for name, value in parts.items()},
        model=cfg.model,
        parameters=shape.parameters,
        trainable=layout.lora_params,
        notes=notes,
    )


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
