"""How many training processes to start, and where: --nproc_per_node and ms-swift's environment.

ms-swift starts torchrun when NPROC_PER_NODE or NNODES is set, and hands NPROC_PER_NODE,
MASTER_PORT, NNODES, NODE_RANK and MASTER_ADDR to it as torchrun's flags of the same names in
lower case. TuneBench reads them the same way, with --nproc_per_node (a TrainConfig field, so it
is checked like every flag) taking the place of NPROC_PER_NODE when both are given. The torch side
(engine/train/distributed.py) hands the result to torchrun. Standard library only.

The gpus setting (the Parameters form's, and --gpus) names the GPUs instead of counting them:
`choose_gpus` checks it against the GPUs this process sees, and `visible_devices` turns the choice
into the CUDA_VISIBLE_DEVICES the ranks get, one process per GPU.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from .config import ConfigError, TrainConfig, check_value, gpu_list, parse_value
from .errors import UserError

# ms-swift's order (swift/cli/main.py), each passed to torchrun as --<name in lower case>
LAUNCH_ENV = ("NPROC_PER_NODE", "MASTER_PORT", "NNODES", "NODE_RANK", "MASTER_ADDR")
# set by torchrun in each process it starts: such a process trains, it does not launch again
WORKER_ENV = ("LOCAL_RANK", "WORLD_SIZE")
MAX_NODES = 4096


@dataclass(frozen=True)
class Launch:
    """torchrun's settings for this machine's share of the run."""

    nproc_per_node: int
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = ""
    master_port: int = 0

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    def torchrun_args(self) -> list[str]:
        """torchrun's flags, as ms-swift writes them. Without MASTER_PORT on one node torchrun
        picks a free port itself, so two runs on one machine do not collide."""
        args = ["--nproc_per_node", str(self.nproc_per_node)]
        if self.master_port:
            args += ["--master_port", str(self.master_port)]
        args += ["--nnodes", str(self.nnodes), "--node_rank", str(self.node_rank)]
        if self.master_addr:
            args += ["--master_addr", self.master_addr]
        return args


def is_worker(environ: Mapping[str, str]) -> bool:
    """Whether this process was started by torchrun (it trains as one rank)."""
    return all(name in environ for name in WORKER_ENV)


def launch_from(nproc_flag: int | None, environ: Mapping[str, str]) -> Launch | None:
    """The processes to start, from --nproc_per_node (None: not given) and the environment; None
    when training runs in this process: nothing asked for torchrun, or this is one of its
    workers. ConfigError / UserError name the variable or flag and what to write instead."""
    if is_worker(environ):
        return None
    given = {name: environ[name].strip() for name in LAUNCH_ENV if environ.get(name, "").strip()}
    if nproc_flag is None and "NPROC_PER_NODE" not in given and "NNODES" not in given:
        return None
    nproc = nproc_flag if nproc_flag is not None else _nproc_from_env(given.get("NPROC_PER_NODE", "1"))
    nnodes = _whole("NNODES", given.get("NNODES", "1"), 1, MAX_NODES)
    node_rank = _whole("NODE_RANK", given.get("NODE_RANK", "0"), 0, MAX_NODES - 1)
    if node_rank >= nnodes:
        raise UserError(
            f"NODE_RANK={node_rank} with NNODES={nnodes}: node ranks run from 0 to {nnodes - 1}",
            "give each machine its own NODE_RANK, 0 on the one whose address is MASTER_ADDR",
            code="config",
        )
    port = _whole("MASTER_PORT", given["MASTER_PORT"], 1, 65535) if "MASTER_PORT" in given else 0
    addr = given.get("MASTER_ADDR", "")
    if nnodes > 1 and not addr:
        raise UserError(
            f"NNODES={nnodes} needs MASTER_ADDR: the address the other machines reach the first "
            "one (NODE_RANK=0) at",
            "set MASTER_ADDR (and MASTER_PORT) to the same values on every machine",
            code="config",
        )
    return Launch(nproc, nnodes, node_rank, addr, port)


def _nproc_from_env(text: str) -> int:
    """NPROC_PER_NODE read like the --nproc_per_node flag, its bounds from the config field."""
    try:
        value = parse_value(TrainConfig, "nproc_per_node", text)
    except ValueError as exc:
        raise ConfigError({"nproc_per_node": f"NPROC_PER_NODE: {exc}"}) from None
    field = next(f for f in dataclasses.fields(TrainConfig) if f.name == "nproc_per_node")
    problem = check_value(field, value)
    if problem:
        raise ConfigError({"nproc_per_node": f"NPROC_PER_NODE: {problem}"})
    return value


def _whole(name: str, text: str, low: int, high: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        raise UserError(
            f"{name}={text!r}: must be a whole number from {low} to {high}",
            f"set {name} as ms-swift documents it, or unset it",
            code="config",
        )
    return value


def gpus_chosen_here(gpus: str) -> list[int]:
    """choose_gpus against the GPUs this process sees (NVML's, after CUDA_VISIBLE_DEVICES)."""
    from .memory_sampler import gpu_stats

    found, _note = gpu_stats()
    return choose_gpus(gpus, [int(g["index"]) for g in found])


def choose_gpus(gpus: str, visible: list[int]) -> list[int]:
    """The GPUs the gpus setting picks, numbered as this process sees them (`visible`: 0..n-1,
    after CUDA_VISIBLE_DEVICES); [] when it picks none (empty: train as before). ConfigError
    names a GPU that is not there, and which ones are."""
    try:
        listed = gpu_list(gpus)
    except ValueError as exc:
        raise ConfigError({"gpus": str(exc)}) from None
    if listed == []:
        return []
    if not visible:
        raise ConfigError(
            {
                "gpus": f"{gpus!r}, but this machine shows no NVIDIA GPU: leave gpus empty (training "
                "runs on the CPU; nproc_per_node starts several CPU processes)"
            }
        )
    if listed is None:
        return list(visible)
    missing = [n for n in listed if n not in visible]
    if missing:
        shown = ",".join(map(str, visible))
        raise ConfigError(
            {
                "gpus": f"GPU {missing[0]} is not one of this machine's GPUs ({shown}): list some of "
                f"{shown}, or write all"
            }
        )
    return listed


def gpu_environment(chosen: list[int], environ: Mapping[str, str]) -> dict[str, str]:
    """The environment that puts ranks on the `chosen` GPUs: CUDA_VISIBLE_DEVICES, and CUDA's
    PCI bus order (NVML's, in which the GPU pane and the gpus setting count), unless set."""
    return {
        "CUDA_VISIBLE_DEVICES": visible_devices(chosen, environ),
        "CUDA_DEVICE_ORDER": environ.get("CUDA_DEVICE_ORDER", "PCI_BUS_ID"),
    }


def visible_devices(chosen: list[int], environ: Mapping[str, str]) -> str:
    """CUDA_VISIBLE_DEVICES for ranks on the `chosen` GPUs: this process's own list, narrowed
    (its entries may be physical numbers or UUIDs), so a rank's GPU 0 is the first one chosen."""
    own = [part.strip() for part in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if part.strip()]
    if "CUDA_VISIBLE_DEVICES" not in environ:
        own = [str(n) for n in range(max(chosen, default=-1) + 1)]
    return ",".join(own[n] for n in chosen if n < len(own))
