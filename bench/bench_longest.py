"""The longest sample that trains (batch 1, one optimizer step) within a memory budget, by search.
bench_train.py's `search` mode runs it, on the stacks and model bench_train.py sets up:

    python bench/bench_train.py search --size 7b --budget-gib 22 \
        --runs tb-lean:qlora,unsloth:qlora,tb-lean:lora,unsloth:lora --out results/

Each stack loads its model once, in its own process capped at the budget
(torch.cuda.set_per_process_memory_fraction), then doubles the sample's length from --start until
a step runs out of memory, and bisects between the last length that trained and the first that did
not, to within --resolution. A stack stops early when its next try would not finish within
--search-seconds (predicted from the last length that trained, by the square of the length); its
result then says the longest length that trained and that it stopped on time. The table also
gives the peak as a line in the length, fitted to the lengths that trained, and where that line
reaches 80 GiB: an extrapolation (marked so) where the search itself would need steps longer than
a call allows (attention's cost grows with the square of the length). One step at --start
runs first, untimed by the search: it holds TuneBench's compile. A new MLP slice count (a fourfold
length) compiles again inside a try, so such a try's seconds include a compile.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from bench_train import (
    IGNORE,
    SEED,
    SIZES,
    Sample,
    hf_trainer,
    import_engine,
    install_synthetic_data,
    load_hf_stack,
    run_record,
    tunebench_config,
)

# each stack's search runs in a process of its own, as bench_train.py's search-child mode
BENCH_TRAIN = Path(__file__).with_name("bench_train.py")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The search's flags, on bench_train.py's command line."""
    search = parser.add_argument_group("search: the longest sample that trains within a memory budget")
    search.add_argument(
        "--budget-gib", default="22", help="GiB a stack may allocate; several comma-separated"
    )
    search.add_argument("--start", type=int, default=16384, help="the first length tried")
    search.add_argument("--cap", type=int, default=1 << 20, help="the longest length tried")
    search.add_argument("--resolution", type=float, default=1 / 16, help="bisect until within this fraction")
    search.add_argument(
        "--search-seconds", type=float, default=240, help="a stack's search time after its load"
    )
    search.add_argument(
        "--lengths",
        default="",
        help="comma-separated lengths tried in this order instead of a search (where the peak goes)",
    )
    search.add_argument(
        "--mlp-chunk-tokens",
        type=int,
        default=0,
        help="TuneBench's MLP slices: this many tokens each (0: the path's own), and at most 16 slices "
        "(MLP_MAX_CHUNKS): past that the slices grow longer",
    )
    search.add_argument(
        "--snapshot",
        action="store_true",
        help="record the allocator's history during each try and print what is alive at its peak",
    )
    search.add_argument(
        "--static-shapes",
        action="store_true",
        help="TuneBench's layers compiled for each length tried, not once for any length",
    )


def try_lengths(fits, lengths: list[int], clock=time.perf_counter) -> dict:
    """Each length tried once, in order (no search): search_longest's result for them."""
    tries = []
    for length in lengths:
        t = clock()
        tries.append((length, bool(fits(length)), clock() - t))
    failed = [n for n, fitted, _ in tries if not fitted]
    longest = max((n for n, fitted, _ in tries if fitted), default=0)
    failed_first = min(failed) if failed else None
    return {"longest": longest, "failed": failed_first, "tries": tries, "stopped": "lengths"}


def search_longest(
    fits,
    *,
    start: int,
    cap: int,
    granule: int = 1024,
    resolution: float = 1 / 16,
    seconds: float | None = None,
    failed_at: int | None = None,
    clock=time.perf_counter,
) -> dict:
    """The longest length (a multiple of `granule`, at most `cap`) for which `fits(length)` is
    true, taking a length that fits to mean every shorter one does.

    Doubles from `start` until a try fails (or `cap` fits), then bisects between the longest
    length that fitted and the shortest that did not until they are within `resolution` of the
    first (or one granule). With `seconds`, a try is not started if it would end past them:
    its time is predicted from the last length that fitted, scaled by the square of the length
    (attention's cost). `failed_at`: a length known not to fit (the warm-up's), never tried again,
    nor any longer one. Returns the longest length that fitted (0: none), the shortest that did
    not (None: none failed), every try as (length, fitted, seconds), and why the search stopped
    early ("time", "cap", or "").
    """
    began = clock()
    tries: list[tuple[int, bool, float]] = []

    def attempt(length: int) -> bool | None:
        if failed_at is not None and length >= failed_at:
            return False
        if seconds is not None and tries:
            ref = next((t for t in reversed(tries) if t[1]), tries[-1])
            predicted = ref[2] * (length / ref[0]) ** 2
            if clock() - began + predicted > seconds:
                return None
        t = clock()
        fitted = bool(fits(length))
        tries.append((length, fitted, clock() - t))
        return fitted

    def result(longest: int, failed: int | None, stopped: str) -> dict:
        return {"longest": longest, "failed": failed, "tries": tries, "stopped": stopped}

    granule = max(1, min(granule, cap))
    cap = cap // granule * granule
    longest, length = 0, max(granule, min(start, cap) // granule * granule)
    while True:
        fitted = attempt(length)
        if fitted is None:
            return result(longest, None, "time")
        if not fitted:
            failed = min(length, failed_at or length)
            break
        longest = length
        if length >= cap:
            return result(longest, None, "cap")
        length = min(cap, length * 2) // granule * granule
    while failed - longest > max(granule, longest * resolution):
        middle = (longest + failed) // 2 // granule * granule
        if middle <= longest:
            break
        fitted = attempt(middle)
        if fitted is None:
            return result(longest, failed, "time")
        if fitted:
            longest = middle
        else:
            failed = middle
    return result(longest, failed, "")


def long_sample(length: int, vocab: int, seed: int = SEED) -> Sample:
    """One sample of `length` random tokens: a tenth prompt (no loss), the rest answer."""
    rng = random.Random(seed + length)
    ids = [rng.randrange(16, vocab) for _ in range(length)]
    prompt = max(1, length // 10)
    return Sample(ids, [IGNORE] * prompt + ids[prompt:])


class TuneBenchSteps:
    """TuneBench's recipe, set up once (model, LoRA, optimizer, the GPU path), then one optimizer
    step (the recipe's own `_train_step`) per sample length asked for."""

    def __init__(self, args, longest: int):
        import_engine()
        self.vocab = SIZES[args.size]["vocab_size"]
        # two lengths: the path compiles its layers for any forward size from the start; one
        # (--static-shapes): compiled again for each length tried, as a run of one length is
        self.spare = long_sample(32, self.vocab)
        if args.static_shapes:  # dynamo would otherwise make the token dims dynamic at the second length
            import torch._dynamo

            torch._dynamo.config.automatic_dynamic_shapes = False
        install_synthetic_data(([] if args.static_shapes else [long_sample(16, self.vocab)]) + [self.spare])
        from tunebench.engine.core import protocol as P
        from tunebench.engine.train import recipe

        self.recipe, self.notes = recipe, []

        def emit(event):
            if isinstance(event, P.Log):
                self.notes.append(event.message)
                print("  note:", event.message, flush=True)

        self.cfg = tunebench_config(args, 1, 1, longest, 1)
        # one process, as run_training sets it up when torchrun did not start it (device: the loader's)
        self.setup = recipe._setup(self.cfg, emit, recipe.StopSignal(), recipe.Ranks(), None)
        self.fast = getattr(self.setup.path.collate, "__self__", None)  # the CUDA path, if taken
        if args.mlp_chunk_tokens and self.fast is not None:
            self.fast.mlp_chunk_tokens = args.mlp_chunk_tokens

    def step(self, length: int) -> None:
        s, fast = self.setup, self.fast
        s.train_set = [long_sample(length, self.vocab), self.spare]
        s.plan = [[[0]]]
        if fast is not None and fast._model is not None:
            # Attention's bound (the path's first plan sets it otherwise), an int the compiled
            # layers are specialised on: rounded up to a power of two, a try compiles again only
            # past a doubling. With the length itself the 65,536-token try took 102 s where
            # 32,768 took 5: a compile's worth, with the same MLP slice count.
            fast._longest = 1 << (length - 1).bit_length()
        hooks = _saved_hooks_top()
        try:
            if not self.recipe._train_step(
                self.cfg, s, self.recipe._Progress(step=0), self.recipe.StopSignal()
            ):
                raise RuntimeError("the step was cut short")
        except BaseException:
            s.optimizer.zero_grad(set_to_none=True)
            if fast is not None and fast.host_inputs is not None:
                fast.host_inputs.saved = []
            _pop_saved_hooks_to(hooks)
            raise

    def modelled_gib(self) -> float | None:
        modelled = [n for n in self.notes if n.startswith("memory model: peak ")]
        return float(modelled[-1].split()[3]) if modelled else None


class TrainerSteps:
    """HF + PEFT or Unsloth, loaded once, then one Trainer step per sample length asked for."""

    def __init__(self, args, longest: int):
        self.args = args
        self.vocab = SIZES[args.size]["vocab_size"]
        self.model, self.tokenizer = load_hf_stack(args, args.stack == "unsloth", longest)

    def step(self, length: int) -> None:
        trainer = hf_trainer(
            self.args, self.model, self.tokenizer, [long_sample(length, self.vocab)], 1, 1, 1
        )
        try:
            trainer.train()
        finally:
            self.model.zero_grad(set_to_none=True)
            del trainer

    def modelled_gib(self) -> None:
        return None


def _saved_hooks_top():
    import torch

    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top(False) if top else None


def _pop_saved_hooks_to(expected) -> None:
    """A step that ran out of memory inside a checkpoint can leave its saved-tensor hooks installed."""
    import torch

    pop = getattr(torch._C._autograd, "_pop_saved_tensors_default_hooks", None)
    for _ in range(64):
        if pop is None or _saved_hooks_top() == expected:
            return
        pop()


def search_child(args) -> None:
    """One stack's longest-sample search within --budget-gib, written to --result."""
    import gc

    import torch

    gib = 1024**3
    record = run_record(args, budget_gib=args.budget_gib)
    started = time.perf_counter()
    try:
        if torch.cuda.is_available():
            total = torch.cuda.get_device_properties(0).total_memory
            record["card_gib"] = total / gib
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.budget_gib * gib / total))
        steps = (TuneBenchSteps if args.stack.startswith("tb-") else TrainerSteps)(args, args.cap)
        record["load_seconds"] = time.perf_counter() - started
        peaks: dict[int, dict] = {}
        loaded = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
        record["loaded_gib"] = loaded / gib
        print(f"  loaded: {loaded / gib:.2f} GiB on the GPU before the first try", flush=True)

        def fits(length: int) -> bool:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                # pinned host blocks the last try cached (offloaded layer inputs): another length
                # needs other sizes, and long ones fill the host's memory
                getattr(torch._C, "_host_emptyCache", lambda: None)()
                left = torch.cuda.memory_allocated() - loaded
                if left > gib // 2:  # an earlier try's tensors outlived it: this try's peak is not its own
                    print(f"  note: {left / gib:.2f} GiB held from earlier tries:", held_tensors())
            if args.snapshot:
                torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
            t = time.perf_counter()
            try:
                steps.step(length)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
            except torch.OutOfMemoryError as exc:
                # the whole first line: it goes on to say what PyTorch holds and what is reserved
                print(f"  {length} tokens: out of memory ({str(exc).splitlines()[0][:600]})", flush=True)
                return False
            finally:
                if args.snapshot:
                    print(alive_at_peak(torch.cuda.memory._snapshot(), loaded), flush=True)
                    torch.cuda.memory._record_memory_history(enabled=None)
            seconds = time.perf_counter() - t
            peak = torch.cuda.max_memory_allocated() / gib if torch.cuda.is_available() else 0.0
            peaks[length] = {"seconds": seconds, "peak_gib": peak, "model_gib": steps.modelled_gib()}
            print(f"  {length} tokens: trained in {seconds:.1f} s, peak {peak:.2f} GiB", flush=True)
            return True

        if args.lengths:  # where the peak goes at given lengths, no search
            found = try_lengths(fits, [int(n) for n in args.lengths.split(",")])
        else:
            # a first step at the first length compiles (TuneBench's layers): timed again by the
            # search, so that its predictions of later tries' times are not inflated by the compile
            t = time.perf_counter()
            record["warm_up"] = {"length": args.start, "fitted": fits(args.start)}
            record["warm_up"]["seconds"] = time.perf_counter() - t
            found = search_longest(
                fits,
                start=args.start,
                cap=args.cap,
                resolution=args.resolution,
                seconds=args.search_seconds,
                failed_at=None if record["warm_up"]["fitted"] else args.start,
            )
        record |= found
        record["at_longest"] = peaks.get(found["longest"])
        record["per_token"] = linear_peak(peaks)
    except Exception as exc:  # noqa: BLE001 - one stack failing must not lose the others' results
        import traceback

        traceback.print_exc()
        record["error"] = f"{type(exc).__name__}: {exc}"[:2000]
    record["wall_seconds"] = time.perf_counter() - started
    Path(args.result).write_text(json.dumps(record, indent=1))


def alive_at_peak(snapshot: dict, loaded: int, top: int = 24) -> str:
    """What was allocated at the highest point of an allocator history (torch.cuda.memory._snapshot
    with the history recorded), grouped by where each block was allocated: the innermost frame
    outside torch's own Python, with its source line (a compiled graph's buffer names its op)."""
    import linecache

    events = snapshot["device_traces"][0]

    def replay(until: int) -> tuple[dict[int, dict], int, int]:
        """The blocks alive after event `until`, and the event at which the most were."""
        alive: dict[int, dict] = {}
        total = most = at = 0
        for i, e in enumerate(events[: until + 1]):
            if e["action"] == "alloc":
                alive[e["addr"]] = e
                total += e["size"]
                if total > most:
                    most, at = total, i
            elif e["action"] in ("free_requested", "free_completed") and e["addr"] in alive:
                total -= alive.pop(e["addr"])["size"]
        return alive, most, at

    _, most, at = replay(len(events) - 1)
    at_most = list(replay(at)[0].values())
    groups: dict[str, list[int]] = {}
    for e in at_most:
        frames = e.get("frames") or []
        # a compiled graph's own code lives under /tmp, not in torch
        own = next((f for f in frames if "/torch/" not in f["filename"]), None)
        f = own or (frames[0] if frames else {"filename": "?", "line": 0, "name": "?"})
        text = linecache.getline(f["filename"], f["line"]).strip()[:110]
        key = f"{Path(f['filename']).name}:{f['line']} {f['name']}: {text}"
        groups.setdefault(key, []).append(e["size"])
    gib = 1024**3
    lines = [
        f"  alive at the step's peak: {most / gib:.2f} GiB in {len(at_most)} blocks recorded during the step "
        f"(plus {loaded / gib:.2f} GiB loaded before it)"
    ]
    for key, sizes in sorted(groups.items(), key=lambda kv: -sum(kv[1]))[:top]:
        lines.append(f"    {sum(sizes) / gib:6.3f} GiB  x{len(sizes):<4d} {key}")
    return "\n".join(lines)


def held_tensors(top: int = 6) -> str:
    """The largest CUDA tensors the garbage collector can reach, with what refers to each."""
    import gc

    import torch
    from torch._subclasses.fake_tensor import FakeTensor

    found = []
    for obj in gc.get_objects():
        try:
            # compile's fake tensors have symbolic sizes and no memory of their own
            if isinstance(obj, torch.Tensor) and obj.is_cuda and not isinstance(obj, FakeTensor):
                found.append(obj)
        except Exception:  # noqa: BLE001,S112 - some objects fail isinstance (lazy modules)
            continue
    found.sort(key=lambda t: t.untyped_storage().nbytes(), reverse=True)
    parts = []
    for t in found[:top]:
        owners = sorted({type(r).__name__ for r in gc.get_referrers(t) if r is not found})
        mib = t.untyped_storage().nbytes() / 1024**2
        parts.append(f"{tuple(t.shape)} {t.dtype} {mib:.0f} MiB <- {owners}")
    return f"{len(found)} tensors; " + "; ".join(parts)


def linear_peak(peaks: dict[int, dict]) -> dict | None:
    """Peak memory as a line in the length, fitted to the lengths that trained (least squares):
    bytes per token and at zero, and the length it reaches 80 GiB at. An extrapolation, for
    budgets whose search would take steps longer than a call allows; None below two lengths."""
    points = sorted((n, p["peak_gib"]) for n, p in peaks.items() if p.get("peak_gib"))
    if len(points) < 2:
        return None
    mean_n = sum(n for n, _ in points) / len(points)
    mean_p = sum(p for _, p in points) / len(points)
    spread = sum((n - mean_n) ** 2 for n, _ in points)
    if spread == 0:
        return None
    slope = sum((n - mean_n) * (p - mean_p) for n, p in points) / spread
    base = mean_p - slope * mean_n
    return {
        "kib_per_token": slope * 1024**2,
        "gib_at_zero": base,
        "length_at_80_gib": int((80 - base) / slope) if slope > 0 else None,
    }


def search_parent(args, model_dir: Path) -> None:
    """Every --runs stack's search, one process each, within each of --budget-gib's budgets."""
    out = Path(args.out)
    results = []
    for budget in (float(b) for b in str(args.budget_gib).split(",")):
        for run in args.runs.split(","):
            stack, method = run.split(":")
            accel = ""
            if "+accel=" in method:
                method, accel = method.split("+accel=")
            part = out / f".search_{args.size}_{budget:g}_{stack}_{method}.json"
            env = dict(os.environ, TUNEBENCH_ACCEL=accel.replace("/", ","))
            cmd = [sys.executable, str(BENCH_TRAIN), "search-child", "--size", args.size, "--stack", stack]
            cmd += ["--method", method, "--model-dir", str(model_dir), "--result", str(part)]
            cmd += ["--budget-gib", f"{budget:g}", "--start", str(args.start), "--cap", str(args.cap)]
            cmd += ["--resolution", str(args.resolution), "--search-seconds", str(args.search_seconds)]
            cmd += ["--static-shapes"] if args.static_shapes else []
            cmd += ["--lengths", args.lengths] if args.lengths else []
            cmd += ["--mlp-chunk-tokens", str(args.mlp_chunk_tokens)] if args.mlp_chunk_tokens else []
            cmd += ["--snapshot"] if args.snapshot else []
            print(f"\n=== longest sample: {args.size} {stack} {method} within {budget:g} GiB", flush=True)
            t = time.perf_counter()
            try:
                subprocess.run(cmd, env=env, timeout=args.timeout)
            except subprocess.TimeoutExpired:
                pass
            record = json.loads(part.read_text()) if part.exists() else {
                "stack": stack,
                "method": method,
                "budget_gib": budget,
                "error": f"no result (timeout {args.timeout} s or crash)",
            }  # fmt: skip
            record["process_seconds"] = time.perf_counter() - t
            results.append(record)
            part.unlink(missing_ok=True)
            (out / f"longest_{args.size}{args.tag}.json").write_text(json.dumps(results, indent=1))
            print(search_table([record]).splitlines()[-1], flush=True)
    print()
    print(search_table(results))


def search_table(results: list[dict]) -> str:
    lines = [
        "| budget GiB | stack | method | longest sample | first that failed | peak at longest GiB | "
        "model GiB | tokens/s at longest | vs Unsloth | stopped | KiB per token | 80 GiB at (line) | "
        "tries (length: ok/OOM, s) |",
        "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | --- |",
    ]
    for r in results:
        if "error" in r:
            budget = float(r.get("budget_gib", 0))
            lines.append(f"| {budget:g} | {r['stack']} | {r['method']} | error: {r['error'][:80]} |")
            continue
        at = r.get("at_longest") or {}
        line = r.get("per_token")
        unsloth = next(
            (
                o
                for o in results
                if o["stack"] == "unsloth" and o["method"] == r["method"]
                and o.get("budget_gib") == r.get("budget_gib") and o.get("longest")
            ),
            None,
        )  # fmt: skip
        tries = ", ".join(f"{n}: {'ok' if ok else 'OOM'} {sec:.0f}" for n, ok, sec in r["tries"])
        cells = [
            f"{r['budget_gib']:g}", r["stack"], r["method"], f"{r['longest']:,}",
            f"{r['failed']:,}" if r.get("failed") else "-",
            f"{at['peak_gib']:.2f}" if at else "-",
            f"{at['model_gib']:.2f}" if at.get("model_gib") else "-",
            f"{r['longest'] / at['seconds']:,.0f}" if at else "-",
            f"{r['longest'] / unsloth['longest']:.2f}x" if unsloth else "-",
            r.get("stopped") or "-",
            f"{line['kib_per_token']:.0f}" if line else "-",
            f"{line['length_at_80_gib']:,}" if line and line.get("length_at_80_gib") else "-",
            tries,
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
