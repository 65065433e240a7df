"""GPU and process memory right now, for the gauge: NVML, this process's torch allocator, its RSS.

`sample_memory()` reads NVML (each GPU CUDA_VISIBLE_DEVICES lets this process use: name, used,
total, utilisation), this engine's torch allocator (only when torch is already imported and CUDA
initialised: sampling must never be what pulls torch in or creates a CUDA context) and the
process RSS.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Mapping
from typing import Any

from . import protocol as P

# Mixed sample lengths fragment the CUDA caching allocator; growable segments keep reserved memory
# close to allocated. The engine process imports this module before torch, so it is set in time.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

_nvml_lock = threading.Lock()
_nvml_state: dict[str, Any] = {"ready": False, "note": ""}


def _nvml() -> Any:
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


def gpu_stats(environ: Mapping[str, str] = os.environ) -> tuple[list[dict[str, Any]], str]:
    """One dict per GPU this process may use (index: its number as CUDA and the gpus setting
    count, after CUDA_VISIBLE_DEVICES; nvml_index: the physical one; name; used and total bytes;
    util percent, -1 where unknown), and a note that says why the list is empty, if it is."""
    nvml = _nvml()
    if nvml is None:
        return [], _nvml_state["note"]
    gpus = []
    try:
        for index, physical in enumerate(_visible(nvml, environ)):
            handle = nvml.nvmlDeviceGetHandleByIndex(physical)
            name = nvml.nvmlDeviceGetName(handle)
            info = nvml.nvmlDeviceGetMemoryInfo(handle)
            try:
                util = int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            except nvml.NVMLError:  # some virtualised GPUs do not report it
                util = -1
            gpus.append(
                {
                    "index": index,
                    "nvml_index": physical,
                    "name": name.decode() if isinstance(name, bytes) else str(name),
                    "used": int(info.used),
                    "total": int(info.total),
                    "util": util,
                }
            )
    except nvml.NVMLError as exc:
        return [], f"NVML failed: {exc}"
    if gpus:
        return gpus, ""
    count = nvml.nvmlDeviceGetCount()
    if count and "CUDA_VISIBLE_DEVICES" in environ:
        listed = environ["CUDA_VISIBLE_DEVICES"]
        return [], f"NVML sees {count} GPU(s), but CUDA_VISIBLE_DEVICES={listed!r} names none of them"
    return [], "no NVIDIA GPU found"


def _visible(nvml: Any, environ: Mapping[str, str]) -> list[int]:
    """NVML's numbers of the GPUs CUDA shows this process, in CUDA's order: all of them, or those
    CUDA_VISIBLE_DEVICES lists (by number or UUID). As CUDA does, the list ends at the first entry
    that names no GPU. (NVML counts in PCI bus order; CUDA does too with CUDA_DEVICE_ORDER=PCI_BUS_ID,
    which core/launch.py sets for the ranks it places, and on a box of identical GPUs anyway.)"""
    count = nvml.nvmlDeviceGetCount()
    listed = environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return list(range(count))
    uuids: dict[str, int] = {}
    chosen: list[int] = []
    for entry in (part.strip() for part in listed.split(",")):
        if entry.isdigit() and int(entry) < count:
            physical = int(entry)
        else:
            if not uuids:
                for n in range(count):
                    uuid = nvml.nvmlDeviceGetUUID(nvml.nvmlDeviceGetHandleByIndex(n))
                    uuids[uuid.decode() if isinstance(uuid, bytes) else str(uuid)] = n
            # CUDA accepts a unique prefix of the UUID ("GPU-8f3a")
            found = [n for uuid, n in uuids.items() if entry and uuid.startswith(entry)]
            if len(found) != 1:
                break
            physical = found[0]
        if physical in chosen:
            break
        chosen.append(physical)
    return chosen


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
