"""The LoRA adapter on the loaded model: attached as the config says (targets, init, QLoRA's
preparation, recompute), its optimizer groups, and the initial copy that PiSSA and OLoRA need
when the run ends."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..core.config import TrainConfig
from ..core.errors import UserError
from .checkpoints import save_adapter_atomically


def attach_lora(model, cfg: TrainConfig, recompute: bool):
    """`model` as a PEFT model with the run's LoRA on --target_modules, its base frozen, and
    activation checkpointing on when `recompute` (the train path's choice)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from ..models.loading import linear_module_names

    available = linear_module_names(model)
    if cfg.target_modules != ["all-linear"]:
        unknown = [m for m in cfg.target_modules if m not in available]
        if unknown:
            raise UserError(
                f"--target_modules: this model has no linear layer named {', '.join(unknown)}",
                f"choose from all-linear, {', '.join(available)}",
                code="config",
            )
        targets: Any = cfg.target_modules
    else:
        targets = available  # explicit list: PEFT's "all-linear" shortcut misses some archs' heads
    if cfg.is_qlora and _keeps_float32_copies(model):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=recompute)
    else:
        # bf16 QLoRA skips PEFT's preparation: it would upcast every frozen weight that is not
        # 4-bit (embeddings, head, norms) to float32, which only float16 training needs; for a
        # 150k vocabulary that is 2 GiB more and a float32 residual stream. Its other steps
        # (freeze the base, recompute) are the same as for LoRA.
        for p in model.parameters():
            p.requires_grad_(False)
        _enable_recompute(model, recompute)
    lora = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
        init_lora_weights=peft_init_weights(cfg.init_weights),
        modules_to_save=cfg.modules_to_save or None,
        ensure_weight_tying=bool(cfg.modules_to_save),  # a tied head trained in full stays tied
        task_type="CAUSAL_LM",
        bias="none",
    )
    return get_peft_model(model, lora)


def use_attention_kernel(model, attn_impl: str) -> None:
    """--attn_impl (ms-swift's names) on the loaded model; auto leaves the loader's choice."""
    if attn_impl == "auto":
        return
    name = "flash_attention_2" if attn_impl == "flash_attn" else attn_impl
    try:
        model.set_attn_implementation(name)
    except (ImportError, ValueError) as exc:
        raise UserError(
            f"--attn_impl {attn_impl}: this model cannot use it here ({str(exc).splitlines()[0]})",
            "flash attention needs a CUDA GPU and `pip install flash-attn`; or use --attn_impl sdpa "
            "(or leave it out)",
            code="config",
        ) from None


def moves_base_into_adapter(model) -> bool:
    """PiSSA and OLoRA start the adapter from the base's own weights and subtract it there."""
    return str(model.peft_config["default"].init_lora_weights) in ("pissa", "olora")


def save_initial_adapter(model, target: Path) -> None:
    """The adapter as initialised, saved as PEFT's conversion at the end reads it: marked as a
    plain LoRA init, else loading it would subtract the decomposition from the base again."""
    config = model.peft_config["default"]
    init, config.init_lora_weights = config.init_lora_weights, True
    try:
        save_adapter_atomically(model, target)
    finally:
        config.init_lora_weights = init


def peft_init_weights(init_weights: str) -> bool | str:
    """ms-swift's --init_weights text as PEFT's init_lora_weights (true/false are booleans there)."""
    return {"true": True, "false": False}.get(init_weights, init_weights)


def optimizer_groups(model, cfg: TrainConfig) -> list[dict[str, Any]]:
    """The trainable parameters as AdamW groups: one at --learning_rate, and with LoRA+
    (--lorap_lr_ratio R) the B matrices in a second group at R times it."""
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not cfg.lorap_lr_ratio:
        return [{"params": [p for _, p in params], "lr": cfg.learning_rate}]
    is_b = [".lora_B." in name for name, _ in params]
    return [
        {"params": [p for (_, p), b in zip(params, is_b, strict=True) if not b], "lr": cfg.learning_rate},
        {
            "params": [p for (_, p), b in zip(params, is_b, strict=True) if b],
            "lr": cfg.learning_rate * cfg.lorap_lr_ratio,
        },
    ]


def _keeps_float32_copies(model) -> bool:
    """Whether QLoRA needs PEFT's float32 upcast of the unquantised weights: float16 training does
    (its norms and head overflow), bfloat16 does not."""
    import torch

    for module in model.modules():  # bitsandbytes' 4-bit layers carry the compute dtype
        compute = getattr(module, "compute_dtype", None)
        if isinstance(compute, torch.dtype):
            return compute != torch.bfloat16
    return getattr(model, "dtype", None) != torch.bfloat16


def _enable_recompute(model, recompute: bool) -> None:
    """Non-reentrant activation checkpointing on the decoder layers, when asked for."""
    if not recompute:
        return
    # Newer transformers renamed the switch (and its kwargs); the old name still works but warns.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
