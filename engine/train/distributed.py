"""Training on several processes with PyTorch's own distributed engine: torchrun starts them, gloo
(CPU) or NCCL (CUDA) joins them.

    launch_ranks   the `tunebench train` a person ran: hands --nproc_per_node and ms-swift's
                   environment (core/launch.py) to torchrun's own launcher, which starts one
                   `tunebench train` per rank and ends the others when one fails; a failure
                   becomes one message naming the rank, its error and the last checkpoint.
    as_rank        each rank's `tunebench train`: its errors go to torchrun's error file, not
                   the terminal, so the launcher says them once.
    Ranks          which process this is, read from torchrun's environment.
    data_parallel  DistributedDataParallel over the train path's loss: the adapter's gradients
                   all-reduced in buckets while backward runs, in the step's last backward only.
    agree_step     the step's loss, tokens and any rank's stop request, summed after it.

Why DDP wraps the loss and not the model: the CUDA fast path (engine/cuda/path.py) runs the
decoder's layers itself (packed rows, compiled layers, a fused loss from the hidden states)
rather than the model's forward. DDP needs its own forward to run around whatever builds the
graph it reduces, so its module is a thin one whose forward is the path's `loss_sum`: the same
forward on every path and device, and DDP's reducer as PyTorch ships it. Only the adapter trains:
the frozen base and the buffers are left out of DDP, so its buckets (25 MiB) hold the adapter's
gradients alone (about 20M numbers for a 7B model at rank 8), each all-reduced as soon as
backward has filled it. A rank the step gives no micro-batch (a short last step) runs one with
its loss times zero, so its last backward still joins the others'.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.config import ConfigError
from ..core.errors import UserError
from ..core.launch import Launch, is_worker
from ..core.workspace import list_checkpoints
from ..models.blocks import decoder_layers

# Where rank 0 tells the launcher its run folder and how the run ended (a JSON file).
RUN_NOTE_ENV = "TUNEBENCH_RUN_NOTE"
EXIT_CODES = {"completed": 0, "stopped": 0, "aborted": 130}


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: rank 0 of 1, in-process, unless torchrun started it."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    launched: bool = False  # started by torchrun (a world of 1 included: the same code path)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, micro_batches: list) -> list:
        """This rank's micro-batches of a step: every world-th one, so no sample is seen twice."""
        return micro_batches[self.rank :: self.world]


def current_ranks(environ: Mapping[str, str] = os.environ) -> Ranks:
    if not is_worker(environ):
        return Ranks()
    return Ranks(
        rank=int(environ.get("RANK", "0")),
        world=int(environ["WORLD_SIZE"]),
        local_rank=int(environ["LOCAL_RANK"]),
        launched=True,
    )


@contextlib.contextmanager
def process_group(ranks: Ranks) -> Iterator[Any]:
    """Join the run's processes (NCCL on CUDA, gloo on the CPU) when torchrun started this one;
    yields the device this rank trains on (None: the loader's choice, in-process)."""
    if not ranks.launched:
        yield None
        return
    import datetime

    import torch
    import torch.distributed as dist

    # The others wait in the next step's all-reduce while rank 0 evaluates or saves, which may take
    # longer than NCCL's default 10 minutes; a rank that dies is found by torchrun at once anyway.
    timeout = datetime.timedelta(hours=2)
    if torch.cuda.is_available():
        shared = ranks_share_one_gpu()
        device = torch.device("cuda", 0 if shared else ranks.local_rank)
        torch.cuda.set_device(device)
        if shared:  # NCCL refuses two ranks on one GPU
            dist.init_process_group("gloo", timeout=timeout)
        else:
            dist.init_process_group("nccl", device_id=device, timeout=timeout)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timeout)
    try:
        yield device
        dist.barrier()  # no rank leaves while rank 0 still writes the adapter
    finally:
        dist.destroy_process_group()


def data_parallel(model: Any, loss_sum: Callable[[Any, Any], Any], ranks: Ranks) -> Any:
    """`model` wrapped for data parallel training: a DistributedDataParallel module whose forward
    takes a micro-batch and returns `loss_sum(model, batch)`; None in a world of one (nothing to
    reduce: no DDP, no overhead). Building it broadcasts rank 0's adapter to the others.

    DDP averages the ranks' gradients; the recipe scales each loss by the ranks to get their sum.
    No `static_graph`: with `no_sync` accumulation it stops reducing after the first step in some
    torch versions (pytorch/pytorch#187732); nor `find_unused_parameters`: every adapter weight
    takes part in every forward."""
    if ranks.world == 1:
        return None
    import torch
    from torch.nn.parallel import DistributedDataParallel

    class PathLoss(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, batch: Any) -> Any:
            return loss_sum(self.model, batch)

    wrapper = PathLoss()
    frozen = [name for name, p in wrapper.named_parameters() if not p.requires_grad]
    buffers = [name for name, _ in wrapper.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(wrapper, frozen + buffers)
    # Each compiled decoder layer is a graph of its own, so the reducer already gets the gradients
    # layer by layer; dynamo's DDP optimizer would cut those graphs again at the bucket sizes,
    # compiling other layers than a world of one runs.
    torch._dynamo.config.optimize_ddp = False
    return DistributedDataParallel(wrapper, gradient_as_bucket_view=True)


def agree_step(ranks: Ranks, loss_total: Any, tokens: int, stop_mode: str) -> tuple:
    """Sum the step's loss and tokens over the ranks and agree on a stop: returns (loss_total,
    tokens, stop mode all ranks take). The gradients were reduced in backward (DDP, FSDP2)."""
    if ranks.world == 1:
        return loss_total, tokens, stop_mode
    import torch
    import torch.distributed as dist

    device = loss_total.device
    tail = torch.tensor(
        [0.0, float(tokens), float(stop_mode == "graceful"), float(stop_mode == "abort")],
        dtype=torch.float64,
        device=device,
    )
    tail[0] = loss_total.double()
    dist.all_reduce(tail)
    loss, tokens_all, graceful, abort = tail.tolist()
    agreed = "abort" if abort else ("graceful" if graceful else "")
    return torch.tensor(loss, dtype=torch.float32, device=device), int(tokens_all), agreed


# ------------------------------------------------------------------ launcher


def launch_ranks(launch: Launch, argv: list[str]) -> int:
    """Start this machine's ranks of `tunebench train <argv>` with torchrun and wait for them;
    the exit code the run would have had in one process, or UserError naming the failed rank."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    device_note = check_devices(launch)
    print(
        f"starting {launch.nproc_per_node} training process(es) with torchrun {device_note}"
        + (f", node {launch.node_rank} of {launch.nnodes}" if launch.nnodes > 1 else ""),
        file=sys.stderr,
        flush=True,
    )
    args = get_args_parser().parse_args(
        [*launch.torchrun_args(), "--module", "tunebench.engine.cli.main", "train", *argv]
    )
    with tempfile.TemporaryDirectory(prefix="tunebench-launch-") as folder:
        note = Path(folder) / "run.json"
        os.environ[RUN_NOTE_ENV] = str(note)
        try:
            run(args)
        except ChildFailedError as exc:
            run_dir = _read_note(note).get("run_dir", "")
            raise failure_error(exc.failures, launch.world_size, run_dir) from None
        except SignalException as exc:
            # Ctrl-C or SIGTERM reached torchrun's agent: it passed the signal on to the ranks, which
            # stop after the same step with a checkpoint (ended if not done in 30 seconds).
            from .resume import stopped_by_signal

            run_dir = _read_note(note).get("run_dir", "")
            print(stopped_by_signal(exc.sigval, run_dir, launch.nproc_per_node), file=sys.stderr)
            return 128 + exc.sigval  # the shell's convention for a stop by a signal, as in one process
        finally:
            os.environ.pop(RUN_NOTE_ENV, None)
        return EXIT_CODES.get(_read_note(note).get("status", ""), 0)


def ranks_share_one_gpu(environ: Mapping[str, str] = os.environ) -> bool:
    """TUNEBENCH_RANKS_ON_ONE_GPU=1: every rank on the first GPU, through gloo. It checks the
    data-parallel CUDA code on a box of one GPU (bench_multi_gpu.py --ranks-on-one-gpu); no speed-up."""
    return environ.get("TUNEBENCH_RANKS_ON_ONE_GPU") == "1"


def check_devices(launch: Launch) -> str:
    """Refuse more ranks than GPUs; says where the ranks run."""
    import torch

    if not torch.cuda.is_available():
        return "on the CPU (gloo)"
    if ranks_share_one_gpu():
        return f"on one GPU shared by {launch.nproc_per_node} processes (gloo: a check, not a speed-up)"
    visible = torch.cuda.device_count()
    if launch.nproc_per_node > visible:
        listed = os.environ.get("CUDA_VISIBLE_DEVICES")
        shown = f" (CUDA_VISIBLE_DEVICES={listed})" if listed is not None else ""
        raise ConfigError(
            {
                "nproc_per_node": f"{launch.nproc_per_node} processes, one per GPU, but this machine "
                f"shows {visible} GPU(s){shown}: give at most {visible}, or list more GPUs in "
                "CUDA_VISIBLE_DEVICES"
            }
        )
    return f"on {launch.nproc_per_node} of {visible} GPU(s) (NCCL)"


def failure_error(failures: Mapping[int, Any], world: int, run_dir: str) -> UserError:
    """One message for a run whose rank failed: the rank that failed first, not those it took
    down with it (their collectives fail as its connection closes), and the checkpoint kept."""

    def order(item: tuple[int, Any]) -> tuple:
        rank, failure = item
        peer = _extra(failure).get("peer", False)
        return (bool(peer), failure.timestamp, rank)

    rank, failure = min(failures.items(), key=order)
    if failure.exitcode < 0:
        try:
            what = f"was killed by {signal.Signals(-failure.exitcode).name}"
        except ValueError:
            what = f"was killed by signal {-failure.exitcode}"
    else:
        message = failure.message.get("message", "") if isinstance(failure.message, dict) else failure.message
        what = f"failed: {message}" if message else f"exited with code {failure.exitcode}"
    others = f"; the other {world - 1} rank(s) were ended" if world > 1 else ""
    checkpoints = list_checkpoints(Path(run_dir)) if run_dir else []
    if checkpoints:
        kept = f"the last checkpoint is kept: {checkpoints[-1]}"
        hint = f"resume with --resume_from_checkpoint {run_dir} (on any number of processes)"
    else:
        kept = "no checkpoint had been written yet"
        hint = "fix what the error says and start the run again"
    if _extra(failure).get("hint"):  # the rank's own advice (out of memory, bad data) comes first
        hint = f"{_extra(failure)['hint']}; then {hint}"
    code = _extra(failure).get("code") or "internal"
    return UserError(f"rank {rank} of {world} {what}{others}; {kept}", hint, code=code)


def _extra(failure: Any) -> dict[str, Any]:
    data = failure.error_file_data.get("message") if isinstance(failure.error_file_data, dict) else None
    extra = data.get("extraInfo") if isinstance(data, dict) else None
    return extra if isinstance(extra, dict) else {}


def _read_note(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# --------------------------------------------------------------------- ranks


def as_rank(train: Callable[[], Any], ranks: Ranks) -> int:
    """Run one rank's training; an error goes to torchrun's error file (the launcher says it, once),
    and the exit code tells torchrun whether this rank failed."""
    try:
        result = train()
    except BaseException as exc:  # every way a rank can end badly is the launcher's to report
        _record(exc)
        if isinstance(exc, (UserError, ConfigError)):
            return 2
        if ranks.is_main and not isinstance(exc, KeyboardInterrupt) and not _is_peer_failure(exc):
            traceback.print_exc()  # a bug's trace, for its report (another rank's end is not one)
        return 1
    if ranks.is_main:
        write_note({"status": result.status})
    return 0


def write_note(data: dict[str, Any]) -> None:
    """Rank 0's run folder and ending, for the launcher (it names the checkpoint kept)."""
    note = os.environ.get(RUN_NOTE_ENV)
    if note:
        Path(note).write_text(json.dumps({**_read_note(Path(note)), **data}))


def _record(exc: BaseException) -> None:
    """torchrun's error file, in the format its launcher reads (message, timestamp), with whether
    this error is only the echo of another rank's end (a collective whose peer went away)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    if isinstance(exc, UserError):
        message = exc.message
    elif isinstance(exc, ConfigError):
        message = str(exc)
    else:
        message = f"{type(exc).__name__}: {exc}"
    data = {
        "message": {
            "message": message or type(exc).__name__,
            "extraInfo": {
                "py_callstack": traceback.format_exc(),
                "timestamp": str(int(time.time())),
                "peer": _is_peer_failure(exc),
                "code": getattr(exc, "code", "") if isinstance(exc, UserError) else "",
                "hint": exc.hint if isinstance(exc, UserError) else "",
            },
        }
    }
    with contextlib.suppress(OSError):
        Path(path).write_text(json.dumps(data))


def _is_peer_failure(exc: BaseException) -> bool:
    import torch.distributed as dist

    text = str(exc).lower()
    return isinstance(exc, dist.DistError) or any(
        words in text for words in ("connection closed by peer", "connection reset", "broken pipe")
    )


# ------------------------------------------------------------------ sharding


def shard_model(model: Any, stage: str) -> str:
    """ms-swift's --deepspeed zero2 / zero3 as FSDP2's fully_shard over all ranks: each decoder
    layer a unit, then the rest. zero3 frees a layer's gathered weights after its forward (and
    gathers them again for backward); zero2 keeps them from forward to backward, ZeRO-2's trade of
    memory for fewer all-gathers. The frozen base keeps its dtype (bf16 on a GPU) and the adapter
    trains in full precision: FSDP2 asks a uniform dtype of the trained weights only. Returns the
    log line that says so."""
    from torch.distributed.fsdp import fully_shard

    keep = stage == "zero2"
    units = decoder_layers(model)
    for layer in units:
        fully_shard(layer, reshard_after_forward=not keep)
    fully_shard(model, reshard_after_forward=not keep)
    held = "kept gathered from forward to backward" if keep else "gathered per layer and freed after use"
    return (
        f"--deepspeed {stage}: PyTorch FSDP2 (fully_shard) over the ranks instead of DeepSpeed: the "
        f"base and adapter weights, gradients and optimizer state are sharded, {len(units)} "
        f"decoder layers one unit each; weights are {held}"
    )


def is_sharded(param: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(param, DTensor)


def _full(value: Any) -> Any:
    """A sharded tensor gathered whole (a collective: every rank calls it, in the same order)."""
    return value.full_tensor() if is_sharded(value) else value


def full_adapter_state(model: Any) -> dict[str, Any]:
    """The trained weights, gathered from the shards: what save_pretrained writes as the adapter."""
    return {name: _full(p.detach()).cpu() for name, p in model.named_parameters() if p.requires_grad}


def full_optimizer_state(optimizer: Any) -> dict[str, Any]:
    """optimizer.state_dict() with its sharded tensors gathered: the format of one process, so a
    checkpoint resumes sharded or not, on any number of ranks."""
    state = optimizer.state_dict()
    state["state"] = {
        index: {key: _full(value).cpu() if hasattr(value, "dim") else value for key, value in slot.items()}
        for index, slot in state["state"].items()
    }
    return state


def shard_optimizer_state(state: dict[str, Any], optimizer: Any) -> dict[str, Any]:
    """A whole optimizer state (every rank read it from the checkpoint) cut to this rank's shards."""
    from torch.distributed.tensor import distribute_tensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    out = dict(state)
    out["state"] = {}
    for index, slot in state["state"].items():
        param = params[int(index)]
        out["state"][index] = {
            key: distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
            if is_sharded(param) and hasattr(value, "dim") and value.dim() > 0
            else value
            for key, value in slot.items()
        }
    return out
