"""GPU and process memory: live samples for the gauge, and an estimate of what training needs.

`sample_memory()` reads NVML (every NVIDIA GPU: name, used, total, utilisation), this engine's
torch allocator (only when torch is already imported and CUDA initialised: sampling must never
be what pulls torch in or creates a CUDA context) and the process RSS.

`estimate_training_memory(cfg)` answers "will this form fit?" before anything is loaded, from
the model's config.json alone. The whole memory model is `training_memory_parts()`; its
constants are named below so that calibrating it against measurements means editing numbers,
not code.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import protocol as P

GIB = 1024**3

# ==================================================================== sampling

_nvml_lock = threading.Lock()
_nvml_state: dict[str, Any] = {"ready": False, "note": ""}


def _nvml():
    """pynvml, initialised once; None (with the reason in _nvml_state) where there is no GPU."""
    with _nvml_lock:
        if _nvml_state["ready"]:
            import pynvml

            return pynvml
        if _nvml_state["note"]:  # failed before: do not pay for a failing init twice a second
            return None
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception as exc:  # noqa: BLE001 - missing library, no driver, container without GPU
            _nvml_state["note"] = f"no NVIDIA GPU found (NVML: {exc or type(exc).__name__})"
            return None
        _nvml_state["ready"] = True
        return pynvml


def gpu_stats() -> tuple[list[dict[str, Any]], str]:
    """One dict per NVIDIA GPU (index, name, used, total bytes, util percent), and a note that
    says why the list is empty, if it is."""
    nvml = _nvml()
    if nvml is None:
        return [], _nvml_state["note"]
    gpus = []
    try:
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            name = nvml.nvmlDeviceGetName(handle)
            info = nvml.nvmlDeviceGetMemoryInfo(handle)
            try:
                util = int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            except nvml.NVMLError:  # some virtualised GPUs do not report it
                util = -1
            gpus.append(
                {
                    "index": index,
                    "name": name.decode() if isinstance(name, bytes) else str(name),
                    "used": int(info.used),
                    "total": int(info.total),
                    "util": util,
                }
            )
    except nvml.NVMLError as exc:
        return [], f"NVML failed: {exc}"
    return gpus, "" if gpus else "no NVIDIA GPU found"


def torch_allocator() -> tuple[int, int, int]:
    """(allocated, reserved, peak) bytes of this process's CUDA caching allocator, or zeros."""
    torch = sys.modules.get("torch")
    if torch is None:
        return 0, 0, 0
    try:
        if not torch.cuda.is_initialized():
            return 0, 0, 0
        return (
            int(torch.cuda.memory_allocated()),
            int(torch.cuda.memory_reserved()),
            int(torch.cuda.max_memory_allocated()),
        )
    except Exception:  # noqa: BLE001 - a sampler must never take the engine down
        return 0, 0, 0


def sample_memory() -> P.MemorySample:
    """GPU, allocator and process memory right now; cheap enough to call several times a second."""
    import psutil

    gpus, note = gpu_stats()
    allocated, reserved, peak = torch_allocator()
    system = psutil.virtual_memory()
    return P.MemorySample(
        gpus=gpus,
        allocated=allocated,
        reserved=reserved,
        peak=peak,
        rss=int(psutil.Process().memory_info().rss),
        ram_total=int(system.total),
        ram_available=int(system.available),
        gpu_note=note,
    )


# ================================================================== estimation

# Bytes per element of the base weights by torch_dtype; "auto" is bf16 because the estimate is
# for a GPU (on a CPU the engine trains in float32, and memory is rarely the question there).
DTYPE_BYTES = {"auto": 2, "bfloat16": 2, "float16": 2, "float32": 4}
# NF4 stores two weights per byte. Each block of 64 weights has an absmax scale; with double
# quantisation that scale is 8-bit, plus one fp32 scale per 256 blocks.
NF4_BYTES_PER_WEIGHT = 0.5
NF4_BLOCK = 64
NF4_DOUBLE_QUANT_BLOCK = 256
NF4_CONSTANT_BYTES_PER_WEIGHT = 1 / NF4_BLOCK + 4 / (NF4_BLOCK * NF4_DOUBLE_QUANT_BLOCK)
# peft's prepare_model_for_kbit_training casts the layers that stay unquantised (embeddings,
# output head, norms) to float32: for a 150k vocabulary that alone is gigabytes.
QLORA_UNQUANTISED_BYTES = 4
# Each LoRA parameter: fp32 weight (peft upcasts adapters) + fp32 gradient + AdamW's two fp32
# moments.
TRAINABLE_BYTES_PER_PARAM = 4 + 4 + 8
# Activations kept for backward, per token and decoder layer, counted in tensors as wide as the
# hidden size and as wide as the MLP's intermediate size (elements in the compute dtype). For a
# Llama-style layer with LoRA: norm inputs/outputs, q/k/v/o, rotary copies, the attention output
# and the LoRA dropout copies give about 14 hidden-wide tensors; gate, up, act(gate), their
# product and the down projection's dropout copy about 5 intermediate-wide ones.
ACT_HIDDEN_TENSORS = 14
ACT_INTERMEDIATE_TENSORS = 5
# With recompute only each layer's input is kept, plus one layer's full set while it is redone.
RECOMPUTE_HIDDEN_TENSORS = 1
# Logits at trained positions: the head's output in the compute dtype, its float32 copy for the
# loss, and the float32 gradient. Worst case: every token of the batch is an answer token.
LOGIT_BYTES_PER_VOCAB_ENTRY = 2 + 4 + 4
LOGIT_TOKEN_FRACTION = 1.0
# The CUDA context, cuBLAS workspaces and kernels, before any tensor is allocated.
CUDA_CONTEXT_BYTES = int(0.5 * GIB)
# The caching allocator's fragmentation, on top of the tensors that come and go every step
# (activations, logits, gradients); the weights are allocated once and do not fragment.
ALLOCATOR_SLACK = 0.10

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
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer in one decoder layer."""
        h, i = self.hidden, self.intermediate
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

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
class TrainSetup:
    """The settings memory depends on, taken from a TrainConfig."""

    dtype_bytes: int
    qlora: bool
    lora_rank: int
    target_modules: tuple[str, ...]
    micro_batch: int
    max_length: int
    recompute: bool


def lora_params(shape: ModelShape, rank: int, targets: tuple[str, ...]) -> int:
    """A (rank x in) and B (out x rank) for every targeted linear layer."""
    names = LINEAR_NAMES if "all-linear" in targets else targets
    shapes = shape.linear_shapes()
    per_layer = sum(rank * (shapes[n][0] + shapes[n][1]) for n in names if n in shapes)
    return shape.layers * per_layer


def training_memory_parts(shape: ModelShape, setup: TrainSetup) -> dict[str, int]:
    """THE memory model, in bytes per part. Everything else in this file only feeds it.

    weights      base weights: dtype bytes each, or NF4 for the linear layers under QLoRA
                 (+ its quantisation constants, + fp32 copies of what stays unquantised)
    lora         trainable LoRA weights, fp32
    gradients    their fp32 gradients (the frozen base has none)
    optimizer    AdamW's two fp32 moments per trainable weight
    activations  kept for backward: per token per layer, or only layer inputs with recompute
    logits       the output head's logits at trained positions, with their fp32 loss copies
    overhead     CUDA context, plus allocator fragmentation on the per-step tensors
    """
    tokens = setup.micro_batch * setup.max_length
    h, i = shape.hidden, shape.intermediate
    act = setup.dtype_bytes
    if setup.qlora:
        weights = shape.linear_params * (NF4_BYTES_PER_WEIGHT + NF4_CONSTANT_BYTES_PER_WEIGHT)
        weights += shape.embedding_params * QLORA_UNQUANTISED_BYTES
    else:
        weights = shape.parameters * setup.dtype_bytes
    trainable = lora_params(shape, setup.lora_rank, setup.target_modules)
    one_layer = (ACT_HIDDEN_TENSORS * h + ACT_INTERMEDIATE_TENSORS * i) * act
    if setup.recompute:
        activations = tokens * (shape.layers * RECOMPUTE_HIDDEN_TENSORS * h * act + one_layer)
    else:
        activations = tokens * shape.layers * one_layer
    logits = tokens * LOGIT_TOKEN_FRACTION * shape.vocab * LOGIT_BYTES_PER_VOCAB_ENTRY
    parts = {
        "weights": weights,
        "lora": trainable * 4,
        "gradients": trainable * 4,
        "optimizer": trainable * 8,
        "activations": activations,
        "logits": logits,
    }
    transient = activations + logits + parts["gradients"]
    parts["overhead"] = CUDA_CONTEXT_BYTES + ALLOCATOR_SLACK * transient
    return {name: int(value) for name, value in parts.items()}


def setup_from_config(cfg: Any) -> TrainSetup:
    return TrainSetup(
        dtype_bytes=DTYPE_BYTES.get(cfg.torch_dtype, 2),
        qlora=cfg.train_type == "qlora" or cfg.quant_bits == 4,
        lora_rank=cfg.lora_rank,
        target_modules=tuple(cfg.target_modules),
        micro_batch=cfg.per_device_train_batch_size,
        max_length=cfg.max_length,
        recompute=bool(cfg.gradient_checkpointing) or cfg.profile == "lean",
    )


def estimate_training_memory(cfg: Any, model_info: dict[str, Any] | None = None) -> P.MemoryEstimate:
    """GPU memory a TrainConfig will need at its peak, from the model's config.json (read
    without torch); `model_info` is that config.json as a dict, when the caller has it.
    Raises ValueError when the model's sizes cannot be found."""
    info = model_info if model_info is not None else read_model_info(cfg.model)
    if info is None:
        raise ValueError(f"cannot find config.json for model {cfg.model!r} to estimate its memory")
    shape = ModelShape.from_config(info)
    setup = setup_from_config(cfg)
    parts = training_memory_parts(shape, setup)
    notes = [
        f"{setup.micro_batch} x {setup.max_length} tokens per micro-batch, padded to max_length",
        "recompute on: only layer inputs are kept"
        if setup.recompute
        else "recompute off: every layer's activations are kept",
    ]
    if setup.qlora:
        notes.append("QLoRA: NF4 linear layers; embeddings and head in float32")
    return P.MemoryEstimate(
        total_gib=round(sum(parts.values()) / GIB, 3),
        parts={name: round(value / GIB, 3) for name, value in parts.items()},
        model=cfg.model,
        parameters=shape.parameters,
        trainable=lora_params(shape, setup.lora_rank, setup.target_modules),
        notes=notes,
    )


# --------------------------------------------------------------- model config


def read_model_info(spec: str, base: str | Path | None = None) -> dict[str, Any] | None:
    """A model's config.json as a dict without loading anything heavy, or None.

    Knows the demo model, local folders (relative ones against `base`), converted GGUF files in
    TuneBench's cache, and hub ids in the local Hugging Face cache.
    """
    spec = spec.strip()
    if spec == "demo":
        return _cached_conversion("smollm2-135m-instruct") or dict(DEMO_MODEL_INFO)
    path = Path(spec).expanduser()
    if not path.is_absolute() and base is not None and (Path(base) / path).exists():
        path = Path(base) / path
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
    base = os.environ.get("TUNEBENCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tunebench"
    )
    for folder in sorted(Path(base, "models").glob(f"{prefix}-*")):
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
