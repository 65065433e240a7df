"""The plain train path: padded batches and the loss from the model's own forward. It runs on every
device; the CUDA path falls back on it for what it does not pack."""

from __future__ import annotations

from ..core.config import TrainConfig
from .types import IGNORE, Batch, TrainPath


def plain_path(cfg: TrainConfig) -> TrainPath:
    notes = []
    if cfg.max_memory > 0:
        notes.append(f"--max_memory {cfg.max_memory:g} GiB is for GPU memory: no GPU here, so it is not used")
    return TrainPath("plain", cfg.gradient_checkpointing, collate, forward_loss_sum, notes=notes)


def collate(samples: list, pad_id: int, device) -> Batch:
    import torch

    width = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, s in enumerate(samples):
        n = len(s.input_ids)
        ids[row, :n] = torch.tensor(s.input_ids)
        labels[row, :n] = torch.tensor(s.labels)
        mask[row, :n] = 1
    targets = int((labels[:, 1:] != IGNORE).sum())
    tokens = int(mask.sum())
    return Batch(ids.to(device), labels.to(device), mask.to(device), tokens, targets)


def forward_loss_sum(model, batch: Batch):
    """Summed cross-entropy over the assistant tokens of one micro-batch.

    Logits are computed only at positions that predict a trained token (`logits_to_keep`): with
    a 50k-150k vocabulary the output head is a large share of the compute and of the memory.
    """
    import torch
    import torch.nn.functional as F

    shifted = batch.labels[:, 1:]
    keep = (shifted != IGNORE).any(dim=0).nonzero().squeeze(-1)  # positions t predicting t+1
    out = model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, logits_to_keep=keep, use_cache=False
    )
    logits = out.logits.float()
    targets = shifted[:, keep]
    return (
        F.cross_entropy(
            logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
        )
        if keep.numel()
        else torch.zeros((), device=batch.input_ids.device, requires_grad=True)
    )
