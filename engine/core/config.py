"""Training and generation settings: one dataclass each, whose fields carry their own help.

The TUI's parameter form, the CLI flags (ms-swift names) and validation are all generated from
the field metadata here, so the three cannot disagree. This module needs only the standard
library: the TUI imports it without pulling in torch.

Metadata keys a field may carry:
  help     one line shown in --help and the form
  group    form section ("model", "lora", "data", "optim", "schedule", "output")
  min/max  inclusive numeric bounds;  gt: exclusive lower bound
  choices  allowed values
  aliases  other flag names accepted on the command line (ms-swift / HF spellings)
  nargs    "+" for list fields
  blank    the value an empty field stands for (the form shows it as empty)
  resume   "fixed": a resume cannot change it (the checkpoint's weights were trained with it);
           every other setting a resume may change (engine/train/resume.py)
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import shlex
from dataclasses import dataclass, field
from typing import Any, get_args, get_origin, get_type_hints

from .limits import MAX_STEPS
from .record_formats import column_map


class ConfigError(ValueError):
    """One or more invalid settings; `problems` maps field name to message."""

    def __init__(self, problems: dict[str, str]):
        self.problems = problems
        lines = [f"--{name}: {message}" for name, message in problems.items()]
        super().__init__("invalid settings:\n  " + "\n  ".join(lines))


def _f(default: Any, help: str, group: str = "other", **meta: Any) -> Any:
    """A dataclass field with metadata; mutable defaults go through default_factory."""
    meta = {"help": help, "group": group, **meta}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


TRAIN_TYPES = ("lora", "qlora")
DTYPES = ("auto", "bfloat16", "float16", "float32")
SCHEDULERS = ("cosine", "linear", "constant")
PROFILES = ("auto", "fast", "lean")
LOSS_SCALES = ("default", "last_round")  # ms-swift's --loss_scale values TuneBench trains
# ms-swift's --init_weights values, PEFT's init_lora_weights (true/false as text: one field, one type)
INIT_WEIGHTS = ("true", "false", "gaussian", "pissa", "olora")
# --report_to value -> the package it needs (not dependencies of TuneBench: installed by who wants them)
TRACKER_PACKAGES = {"none": "", "tensorboard": "tensorboard", "swanlab": "swanlab", "wandb": "wandb"}
# ms-swift's --deepspeed stages TuneBench runs, with FSDP2 (engine/train/distributed.py)
DEEPSPEED_STAGES = ("zero2", "zero3")
ATTN_IMPLS = ("auto", "sdpa", "eager", "flash_attn", "flash_attention_2")
# Every numeric field has both bounds, so a value out of range is a message where it is parsed
# (CLI flag, form, engine request), never an overflow deep inside numpy or torch.
MAX_SEED = 2**32 - 1  # numpy's seed range (torch's is wider)
MAX_COUNT = 2**31 - 1  # steps and counts: torch indexes with int32 in places; past this is a typo


@dataclass
class TrainConfig:
    # model
    model: str = _f(
        "demo",
        "base model: 'demo', a local HF folder, a cached hub id or a .gguf file",
        "model",
        aliases=("model_id_or_path",),
        resume="fixed",
    )
    train_type: str = _f(
        "lora",
        "lora, or qlora (4-bit NF4 base with double quantisation; CUDA only)",
        "model",
        choices=TRAIN_TYPES,
        resume="fixed",
    )
    quant_bits: int = _f(
        0,
        "4 turns lora into qlora (ms-swift spelling); 0 = no quantisation",
        "model",
        choices=(0, 4),
        resume="fixed",
    )
    torch_dtype: str = _f(
        "auto",
        "compute dtype; auto = bfloat16 on a GPU that has it, else float32",
        "model",
        choices=DTYPES,
        aliases=("dtype",),
    )
    template: str = _f(
        "",
        "chat template: empty = the tokenizer's own, as is ms-swift's name for it (qwen2_5, ...); "
        "or chatml, qwen, llama3",
        "model",
        resume="fixed",
    )
    trust_remote_code: bool = _f(False, "allow model code from the model folder to run", "model")
    profile: str = _f(
        "auto",
        "GPU plan: auto (the fastest that fits max_memory or the card), fast (spend memory on "
        "speed), lean (least memory)",
        "model",
        choices=PROFILES,
    )
    max_memory: float = _f(
        0.0,
        "GPU memory for training's peak, in GiB: the fastest plan that fits (layers recomputed, "
        "inputs in host memory, tokens per forward); empty = the card's",
        "model",
        min=0.0,
        max=65536.0,
        blank=0.0,
    )
    gradient_checkpointing: bool = _f(True, "recompute activations in backward to save memory", "model")
    attn_impl: str = _f(
        "auto",
        "attention kernel: auto (the path's choice), sdpa, eager, flash_attn",
        "model",
        choices=ATTN_IMPLS,
        aliases=("attn_implementation",),
    )
    model_type: str = _f(
        "", "ms-swift's model type, e.g. qwen2_5; informational: the model folder's config decides", "model"
    )
    deepspeed: str = _f(
        "",
        "ms-swift's DeepSpeed stage, run as PyTorch FSDP2 over the torchrun processes: zero3 shards "
        "the base weights, zero2 keeps them gathered from forward to backward; empty = none",
        "model",
    )
    nproc_per_node: int = _f(
        1,
        "training processes on this machine, one per GPU, started with torchrun (ms-swift's "
        "NPROC_PER_NODE sets it too); the global batch is per-device x accumulation x processes",
        "model",
        min=1,
        max=1024,
    )
    gpus: str = _f(
        "",
        "GPUs to train on, numbered as this machine shows them: 0,1,3 or all, one torchrun "
        "process each (sets nproc_per_node and CUDA_VISIBLE_DEVICES); empty = the first GPU, or "
        "nproc_per_node of them",
        "model",
    )
    # lora
    lora_rank: int = _f(8, "LoRA rank r", "lora", min=1, max=1024, aliases=("lora_r",), resume="fixed")
    lora_alpha: int = _f(32, "LoRA alpha (scale = alpha / rank)", "lora", min=1, max=8192, resume="fixed")
    lora_dropout: float = _f(0.05, "dropout on the LoRA input", "lora", min=0.0, max=0.9)
    target_modules: list[str] = _f(
        ["all-linear"],
        "modules to adapt: all-linear or names like q_proj",
        "lora",
        nargs="+",
        resume="fixed",
    )
    use_rslora: bool = _f(False, "rank-stabilised LoRA: scale = alpha / sqrt(rank)", "lora", resume="fixed")
    use_dora: bool = _f(
        False,
        "DoRA: LoRA plus a trained magnitude per output feature (PEFT's layers, slower)",
        "lora",
        resume="fixed",
    )
    init_weights: str = _f(
        "true",
        "LoRA init: true (B = 0), false (random, for tests), gaussian, pissa or olora",
        "lora",
        choices=INIT_WEIGHTS,
        resume="fixed",
    )
    modules_to_save: list[str] = _f(
        [],
        "modules trained in full beside the adapter, e.g. embed_tokens lm_head",
        "lora",
        nargs="+",
        resume="fixed",
    )
    lorap_lr_ratio: float = _f(
        0.0,
        "LoRA+: the B matrices learn this many times faster (0 = off; 16 is typical)",
        "lora",
        min=0.0,
        max=1e4,
        resume="fixed",  # the optimizer's state has one group per learning rate
    )
    # data
    dataset: list[str] = _f(
        [],
        "training data: json/jsonl/csv/parquet/arrow files, save_to_disk folders or cached hub "
        "ids; name#N takes N samples",
        "data",
        nargs="+",
    )
    val_dataset: list[str] = _f([], "evaluation data files; path#N takes N samples", "data", nargs="+")
    val_ratio: float = _f(
        0.0,
        "fraction of the training data held out for eval",
        "data",
        min=0.0,
        max=0.5,
        aliases=("split_dataset_ratio",),
    )
    system: str = _f("", "default system prompt for samples that have none", "data")
    loss_scale: str = _f(
        "default",
        "which answers the loss learns: default = every one; last_round = a conversation's last only",
        "data",
        choices=LOSS_SCALES,
    )
    columns: str = _f(
        "",
        'rename dataset fields, as ms-swift\'s --columns: JSON such as {"text1": "query", '
        '"text2": "response"}',
        "data",
    )
    model_name: list[str] = _f(
        [], "name for {{NAME}} in self-cognition data: one, or Chinese English", "data", nargs="+"
    )
    model_author: list[str] = _f([], "author for {{AUTHOR}}: one, or Chinese English", "data", nargs="+")
    max_length: int = _f(2048, "tokens per sample; longer ones are truncated", "data", min=16, max=1 << 20)
    # optimisation
    learning_rate: float = _f(1e-4, "peak learning rate", "optim", gt=0.0, max=1.0, aliases=("lr",))
    weight_decay: float = _f(0.1, "AdamW weight decay", "optim", min=0.0, max=1.0)
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0 = off)", "optim", min=0.0, max=1e6)
    num_train_epochs: float = _f(
        3.0, "passes over the training data", "optim", gt=0.0, max=10000, aliases=("epochs",)
    )
    max_steps: int = _f(-1, "optimizer steps; overrides epochs when > 0", "optim", min=-1, max=MAX_STEPS)
    per_device_train_batch_size: int = _f(
        1, "micro-batch size", "optim", min=1, max=4096, aliases=("batch_size",)
    )
    per_device_eval_batch_size: int = _f(1, "eval micro-batch size", "optim", min=1, max=4096)
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimizer step", "optim", min=1, max=4096)
    # schedule
    warmup_ratio: float = _f(0.0, "fraction of steps spent warming the lr up", "schedule", min=0.0, max=1.0)
    warmup_steps: int = _f(
        0,
        "steps spent warming the lr up; over warmup_ratio when more than 0",
        "schedule",
        min=0,
        max=MAX_STEPS,
    )
    lr_scheduler_type: str = _f("cosine", "lr decay after warm-up", "schedule", choices=SCHEDULERS)
    logging_steps: int = _f(5, "log train loss every N optimizer steps", "schedule", min=1, max=MAX_COUNT)
    eval_steps: int = _f(
        50, "evaluate every N optimizer steps (needs an eval split)", "schedule", min=1, max=MAX_COUNT
    )
    save_steps: int = _f(50, "checkpoint every N optimizer steps", "schedule", min=1, max=MAX_COUNT)
    save_total_limit: int = _f(
        2, "keep only the newest N checkpoints (0 = keep all)", "schedule", min=0, max=MAX_COUNT
    )
    seed: int = _f(
        42, "random seed for shuffling, splits, dropout and LoRA init", "schedule", min=0, max=MAX_SEED
    )
    # output
    output_dir: str = _f("runs", "folder that receives runs/<run-id>/", "output")
    run_name: str = _f("", "run id; default: a timestamp", "output")
    resume_from_checkpoint: str = _f("", "checkpoint folder (or run folder) to resume from exactly", "output")
    report_to: str = _f(
        "none",
        "also write the curves for tensorboard (under the run folder), swanlab or wandb (offline)",
        "output",
        choices=tuple(TRACKER_PACKAGES),
    )
    dataloader_num_workers: int = _f(
        0,
        "accepted for ms-swift compatibility; data is tokenised once up front, so workers are not needed",
        "output",
        min=0,
        max=1024,
    )

    def __post_init__(self) -> None:
        if self.quant_bits == 4:
            self.train_type = "qlora"
        if isinstance(self.init_weights, str):
            self.init_weights = self.init_weights.lower()  # "True" as people write it
        problems = validate(self)
        if problems:
            raise ConfigError(problems)

    @property
    def is_qlora(self) -> bool:
        return self.train_type == "qlora"


@dataclass
class GenerationConfig:
    max_new_tokens: int = _f(512, "most tokens to generate per answer", "generate", min=1, max=32768)
    temperature: float = _f(
        0.0, "0 = greedy (repeatable A/B); higher = more random", "generate", min=0.0, max=5.0
    )
    top_p: float = _f(1.0, "nucleus sampling mass", "generate", gt=0.0, max=1.0)
    top_k: int = _f(0, "sample from the k most likely tokens (0 = off)", "generate", min=0, max=MAX_COUNT)
    repetition_penalty: float = _f(1.0, "penalise repeated tokens (1 = off)", "generate", gt=0.0, max=10.0)
    seed: int = _f(0, "seed for sampling", "generate", min=0, max=MAX_SEED)
    stop_words: list[str] = _f(
        [], "texts that end an answer where they appear, besides its end-of-turn token", "generate"
    )

    def __post_init__(self) -> None:
        problems = validate(self)
        if problems:
            raise ConfigError(problems)


# ---------------------------------------------------------------- validation


_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")


def check_value(f: dataclasses.Field, value: Any) -> str | None:
    """What is wrong with one field's value (its choices and bounds), None when nothing is."""
    meta = f.metadata
    if "choices" in meta and value not in meta["choices"]:
        return f"{value!r} is not one of {', '.join(map(str, meta['choices']))}"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value != value:  # NaN
            return "must be a number"
        if "min" in meta and value < meta["min"]:
            return f"must be at least {meta['min']} (got {value})"
        if "gt" in meta and value <= meta["gt"]:
            return f"must be greater than {meta['gt']} (got {value})"
        if "max" in meta and value > meta["max"]:
            return f"must be at most {meta['max']} (got {value})"
    return None


def validate(cfg: Any) -> dict[str, str]:
    """Every problem with a config, field name -> message (empty when valid)."""
    problems: dict[str, str] = {}
    hints = get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        expected = _base_type(hints[f.name])
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
            setattr(cfg, f.name, value)
        if not _is_instance(value, hints[f.name]):
            problems[f.name] = f"must be {_type_word(hints[f.name])} (got {value!r})"
            continue
        message = check_value(f, value)
        if message:
            problems[f.name] = message
    if isinstance(cfg, TrainConfig):
        problems.update(_cross_checks(cfg))
    return problems


def _cross_checks(cfg: TrainConfig) -> dict[str, str]:
    problems: dict[str, str] = {}
    try:
        column_map(cfg.columns)
    except ValueError as exc:
        problems["columns"] = str(exc)
    if not cfg.target_modules:
        problems["target_modules"] = "name at least one module, or all-linear"
    for name in cfg.target_modules:
        if name != "all-linear" and not _MODULE_NAME.match(name):
            problems["target_modules"] = f"{name!r} is not a module name (try all-linear or q_proj)"
    if "all-linear" in cfg.target_modules and len(cfg.target_modules) > 1:
        problems["target_modules"] = "all-linear already covers every linear layer; give it alone"
    if cfg.val_dataset and cfg.val_ratio > 0:
        problems["val_ratio"] = "give either --val_dataset or --val_ratio, not both"
    for key in ("model_name", "model_author"):
        values = getattr(cfg, key)
        if len(values) > 2:
            problems[key] = "give one value, or two (Chinese then English)"
        elif any(not v.strip() for v in values):
            problems[key] = "must not be empty"
    if cfg.run_name and not is_plain_name(cfg.run_name):
        problems["run_name"] = (
            f"{cfg.run_name!r} is not a plain folder name: give one folder name such as my-run "
            "(no '/', '..' or absolute path); the run is made inside --output_dir"
        )
    for name in cfg.modules_to_save:
        if not _MODULE_NAME.match(name):
            problems["modules_to_save"] = f"{name!r} is not a module name (try embed_tokens or lm_head)"
    if cfg.use_dora and cfg.init_weights in ("pissa", "olora"):
        problems["init_weights"] = (
            f"{cfg.init_weights} moves part of the base into the adapter, and the adapter is turned "
            "back into plain LoRA for the unchanged base at the end, which DoRA's magnitudes cannot "
            "follow: drop --use_dora, or use --init_weights true"
        )
    package = TRACKER_PACKAGES.get(cfg.report_to)
    if package and importlib.util.find_spec(package) is None:
        problems["report_to"] = (
            f"{cfg.report_to} is not installed here: `pip install {package}`, or leave --report_to "
            "out (the run's metrics.jsonl has the curves either way)"
        )
    if cfg.deepspeed and cfg.deepspeed not in DEEPSPEED_STAGES:
        problems["deepspeed"] = (
            f"{cfg.deepspeed!r}: TuneBench runs ms-swift's zero2 and zero3 as PyTorch FSDP2 "
            "sharding; DeepSpeed itself, its json files and its CPU offload are not used: give "
            "zero2 or zero3, or leave --deepspeed out (data parallel, the adapter's gradients "
            "all-reduced)"
        )
    elif cfg.deepspeed and cfg.init_weights in ("pissa", "olora"):
        problems["deepspeed"] = (
            f"{cfg.deepspeed} with --init_weights {cfg.init_weights}: the adapter's conversion "
            "back to plain LoRA at the end needs the whole base in one process; use --init_weights "
            "true, or leave --deepspeed out"
        )
    elif cfg.deepspeed and cfg.modules_to_save:
        problems["deepspeed"] = (
            f"{cfg.deepspeed} with --modules_to_save: FSDP2 reduces one gradient dtype per layer, and "
            "modules trained in full keep the base's dtype beside the float32 adapter; leave "
            "--modules_to_save out, or --deepspeed (data parallel takes both)"
        )
    if not cfg.model.strip():
        problems["model"] = "name a model: demo, a folder, a hub id or a .gguf file"
    try:
        listed = gpu_list(cfg.gpus)
    except ValueError as exc:
        problems["gpus"] = str(exc)
    else:
        if listed and cfg.nproc_per_node not in (1, len(listed)):
            problems["nproc_per_node"] = (
                f"{cfg.nproc_per_node} processes, but gpus lists {len(listed)} GPU(s), one process "
                "each: leave nproc_per_node at 1 (gpus decides), or leave gpus empty"
            )
    return problems


def gpu_list(text: str) -> list[int] | None:
    """The gpus setting read: the listed GPU numbers, [] for none given (empty), None for all.
    ValueError says what is wrong with the text; which numbers exist is for core/launch.py."""
    text = text.strip().lower()
    if text in ("", "all"):
        return None if text else []
    numbers: list[int] = []
    for part in text.replace(" ", ",").split(","):
        if not part:
            continue
        if not part.isdigit():
            raise ValueError(f"{part!r} is not a GPU number: write them like 0,1,3, or all")
        if int(part) in numbers:
            raise ValueError(f"GPU {int(part)} is listed twice: name each GPU once")
        numbers.append(int(part))
    return numbers


def is_plain_name(name: str) -> bool:
    """One path segment that stays where it is put: no separator, not '.' or '..', not blank."""
    return bool(name.strip()) and name not in (".", "..") and not any(c in name for c in "/\\\0")


def _base_type(tp: Any) -> Any:
    return get_origin(tp) or tp


def _is_instance(value: Any, tp: Any) -> bool:
    origin = get_origin(tp)
    if origin is list:
        (item,) = get_args(tp)
        return isinstance(value, list) and all(isinstance(v, item) for v in value)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, tp)


def _type_word(tp: Any) -> str:
    if get_origin(tp) is list:
        return "a list of " + _type_word(get_args(tp)[0])
    return {int: "a whole number", float: "a number", str: "text", bool: "true or false"}.get(tp, str(tp))


# ------------------------------------------------------- text <-> field values


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def parse_value(cls: type, name: str, raw: str | list[str]) -> Any:
    """Turn command-line / form text into a typed field value; ValueError says what is wrong."""
    tp = get_type_hints(cls)[name]
    if get_origin(tp) is list:
        items = raw if isinstance(raw, list) else shlex.split(raw)
        # ms-swift accepts "a,b" as well as "a b" for module lists.
        if name in ("target_modules", "modules_to_save"):
            items = [part for item in items for part in item.split(",") if part]
        return list(items)
    if isinstance(raw, list):
        if len(raw) != 1:
            raise ValueError("takes one value")
        raw = raw[0]
    text = raw.strip()
    blank = _metadata(cls, name).get("blank", dataclasses.MISSING)
    if not text and blank is not dataclasses.MISSING:
        return blank
    if tp is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ValueError(f"{raw!r} is not true or false")
    if tp is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{raw!r} is not a whole number") from None
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{raw!r} is not a number") from None
    return raw


def _metadata(cls: type, name: str) -> Any:
    return next(f.metadata for f in dataclasses.fields(cls) if f.name == name)


def field_text(f: dataclasses.Field, value: Any) -> str:
    """A field's value as the form shows it: empty for the value an empty field stands for."""
    if "blank" in f.metadata and value == f.metadata["blank"]:
        return ""
    return format_value(value)


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return " ".join(shlex.quote(str(v)) for v in value)
    return str(value)


def field_specs(cls: type) -> list[dataclasses.Field]:
    return list(dataclasses.fields(cls))


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def changed_fields(cfg: Any) -> dict[str, Any]:
    """Fields whose value differs from the default, in declaration order."""
    out = {}
    for f in dataclasses.fields(cfg):
        base = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        value = getattr(cfg, f.name)
        if value != base:
            out[f.name] = value
    return out


def to_command(cfg: TrainConfig, program: str = "tunebench train") -> str:
    """The equivalent `tunebench train ...` command line (only non-default settings)."""
    return " ".join([program, *map(shlex.quote, to_argv(cfg))])


def to_argv(cfg: TrainConfig, joined: bool = False) -> list[str]:
    """The flags of `tunebench train` that give `cfg` (only non-default settings), one list item
    per argument. A list emptied from a non-empty default has no flag form and is left out.
    `joined` writes one-value flags as --name=value, which a program handing them on needs: a
    value such as a system prompt starting with "-" would otherwise read as a flag."""
    parts: list[str] = []
    for name, value in changed_fields(cfg).items():
        if name == "train_type" and cfg.quant_bits == 4:
            continue
        if isinstance(value, list):
            if value:
                parts += [f"--{name}", *map(str, value)]
        elif joined:
            parts.append(f"--{name}={format_value(value)}")
        else:
            parts += [f"--{name}", format_value(value)]
    return parts
