"""One torchrun rank of tests/test_distributed.py's gradient probe: trains as a rank of `tunebench
train` does (the recipe's run_training), and records this rank's adapter gradients as each
backward returns, and each optimizer step.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/rank_probe.py CONFIG OUT

CONFIG is a TrainConfig as JSON; each rank writes OUT/rank<R>.json: a list of events, ["backward",
[gradient numbers]] or ["step"].
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from tunebench.engine.core.config import TrainConfig
from tunebench.engine.train import recipe


def record_gradients(events: list[list], patch) -> Any:
    """From now on, append to `events` the trainable gradients as each backward returns, and a
    mark at each optimizer step (`patch`: monkeypatch's in a test, the builtin in a rank).
    Returns the step hook's handle (.remove() ends the marks)."""
    models: list = []
    attach = recipe.attach_lora

    def attach_and_keep(*args, **kwargs):
        model = attach(*args, **kwargs)
        models.append(model)
        return model

    backward = torch.Tensor.backward

    def backward_and_record(self, *args, **kwargs):
        backward(self, *args, **kwargs)
        params = [p for p in models[-1].parameters() if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        events.append(["backward", torch.cat([g.detach().reshape(-1).double() for g in grads]).tolist()])

    def step(optimizer, args, kwargs):
        events.append(["step"])

    patch(recipe, "attach_lora", attach_and_keep)
    patch(torch.Tensor, "backward", backward_and_record)
    return register_optimizer_step_pre_hook(step)


def main() -> None:
    config, out = Path(sys.argv[1]), Path(sys.argv[2])
    events: list[list] = []
    record_gradients(events, setattr)
    cfg = TrainConfig(**json.loads(config.read_text()))
    result = recipe.run_training(cfg, lambda _event: None)
    assert result.status == "completed", result
    (out / f"rank{os.environ['RANK']}.json").write_text(json.dumps(events))


if __name__ == "__main__":
    main()
