"""The LoRA / QLoRA fine-tuning recipe: setup, train loop, cleanup, read top to bottom.

The same code runs on CPU (tests, the demo) and CUDA. Everything it does is reported through
`emit(event)` with protocol events, and written under `<output_dir>/<run_id>/`:

    config.json            the resolved TrainConfig and the equivalent command line
    metrics.jsonl          one line per logged step and per eval
    checkpoints/step-<n>/  adapter + trainer_state.pt (optimizer, scheduler, RNG, step)
    adapter/               the final adapter in PEFT format

Checkpoints and the final adapter are written and read by engine/train/checkpoints.py.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core import protocol as P
from ..core.config import TrainConfig, to_command
from ..core.errors import Cancelled, UserError
from ..core.estimate import qlora_sharding_note
from ..core.metrics_log import MetricsLog, start_metrics, truncate_metrics
from ..core.step_clock import StepClock, first_step_note
from ..models.blocks import stop_before_each
from .adapter import (
    attach_lora,
    moves_base_into_adapter,
    optimizer_groups,
    save_initial_adapter,
    use_attention_kernel,
)
from .checkpoints import (
    find_checkpoint,
    load_adapter_weights,
    load_checkpoint,
    remove_unfinished_writes,
    save_adapter_atomically,
    save_checkpoint,
    writing_run,
)
from .distributed import (
    Ranks,
    agree_step,
    current_ranks,
    data_parallel,
    full_adapter_state,
    full_optimizer_state,
    process_group,
    shard_model,
    shard_optimizer_state,
)
from .plain import plain_path
from .resume import (
    continued_note,
    data_changed_warning,
    dataset_hashes,
    logged_seconds,
    new_run_dir,
    read_run_config,
    recorded_config,
    refuse_finished_run,
    resume_changes,
    write_run_config,
)
from .schedule import build_plan, loss_tokens, lr_lambda, micro_batches_per_step, steps_per_epoch
from .trackers import open_tracker
from .types import RunPaths, TrainPath

if TYPE_CHECKING:
    from ..models.loading import LoadedModel

# Mixed sample lengths fragment the CUDA caching allocator; growable segments keep the reserved
# memory close to the allocated. Read when CUDA first allocates, so set before any GPU work
# (engine/core/memory_sampler.py sets it as well, for the engine process).
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

Emit = Callable[[P.Event], None]


class StopSignal:
    """Set from another thread (or a signal handler) to stop training: graceful saves, abort does not."""

    def __init__(self) -> None:
        self._mode = ""
        self._lock = threading.Lock()
        # Set by any stop: before the first step there is nothing to save, so reading and
        # tokenising the data end at once either way.
        self.requested = threading.Event()

    def request(self, mode: str = "graceful") -> None:
        with self._lock:
            # An abort may upgrade a pending graceful stop, never the other way round.
            if self._mode != "abort":
                self._mode = mode
        self.requested.set()

    @property
    def mode(self) -> str:
        return self._mode


def select_path(cfg: TrainConfig, device, model_config: Any = None, longest: int | None = None) -> TrainPath:
    """The CUDA fast path on a GPU (its plan chosen for `model_config` and the data's `longest`
    sample, in tokens), else the plain path."""
    if device.type == "cuda":
        try:
            from ..cuda.path import cuda_path
        except ImportError:
            return plain_path(cfg)
        return cuda_path(cfg, device, model_config, longest)
    return plain_path(cfg)


@dataclass
class _Setup:
    """What the train loop needs, made by `_setup`: the run's folder, the model with its LoRA
    adapter, the optimizer and schedule, the tokenised data and the step plan."""

    run: RunPaths
    model: Any
    tokenizer: Any
    device: Any
    path: TrainPath
    params: list[Any]
    optimizer: Any
    scheduler: Any
    plan: list[list[list[int]]]
    train_set: list[Any]
    eval_set: list[Any]
    start_step: int
    ranks: Ranks = field(default_factory=Ranks)
    # the loss tokens of each training sample: every rank knows a whole step's, to normalise by
    targets: list[int] = field(default_factory=list)
    micro_batches_per_step: int = 1
    sharded: bool = False  # FSDP2 (--deepspeed zero2 / zero3 under torchrun)
    # data parallel over several ranks: DDP around the path's loss (distributed.data_parallel)
    ddp: Any = None
    # time the run's earlier attempts logged up to the checkpoint it resumes from, so that its
    # elapsed time and "took" count the whole run, not the resumed part alone
    earlier_s: float = 0.0
    load_s: float = 0.0  # the model's load
    loaded_at: float = 0.0  # time.perf_counter() when it had loaded

    @property
    def total_steps(self) -> int:
        return len(self.plan)


@dataclass
class _Progress:
    """The loop's running state, and how it ended.

    Logged losses are token-weighted means over the steps since the last log; the final loss is the
    last such window, the same number a person saw on the last progress line."""

    step: int
    status: str = "completed"
    window_loss: float = 0.0
    window_tokens: int = 0
    logged_loss: float = float("nan")
    grad_norm: float = 0.0
    # speed and time left over this loop's recent steps (a resumed run's earlier steps not counted)
    clock: StepClock = field(default_factory=StepClock)
    step_tokens: int = 0
    stage_s: dict[str, float] = field(default_factory=dict)  # TrainFinished.stage_s, so far
    # the stop every rank agreed on at the end of the last step (several processes only)
    stop_mode: str = ""

    def take_window(self) -> float:
        """The loss of the steps since the last log; starts the next window."""
        self.logged_loss = self.window_loss / self.window_tokens
        self.window_loss, self.window_tokens = 0.0, 0
        return self.logged_loss

    @property
    def final_loss(self) -> float:
        return self.window_loss / self.window_tokens if self.window_tokens else self.logged_loss


# ====================================================================== recipe


def run_training(cfg: TrainConfig, emit: Emit, stop: StopSignal | None = None) -> P.TrainFinished:
    """Fine-tune per `cfg`; blocks until done, stopped or aborted. Raises UserError for bad input.

    Events go to `emit`; those worth keeping (steps, evals, checkpoints, the end) also go to the
    run's metrics.jsonl. Started by torchrun (engine/train/distributed.py), this process is one
    rank of several: each trains on its share of every step, and rank 0 alone emits and writes."""
    stop = stop or StopSignal()
    ranks = current_ranks()
    with process_group(ranks) as device:
        return _run(cfg, emit if ranks.is_main else _discard, stop, ranks, device)


def _discard(_event: P.Event) -> None:
    """The events of ranks other than 0: rank 0 reports the run."""


def _run(cfg: TrainConfig, emit: Emit, stop: StopSignal, ranks: Ranks, device: Any) -> P.TrainFinished:
    started = time.perf_counter()
    try:
        setup = _setup(cfg, emit, stop, ranks, device)
    except Cancelled:
        finished = stopped_before_training(started)
        emit(finished)
        return finished
    with contextlib.ExitStack() as files:
        log = emit
        if ranks.is_main:
            files.enter_context(writing_run(setup.run.root))
            metrics = files.enter_context(MetricsLog(setup.run.root))
            tracker = files.enter_context(open_tracker(cfg, setup.run.root))

            def log(event: P.Event) -> None:
                emit(event)
                record = event.to_dict()
                metrics.append(record)
                tracker.log(record)

        started -= setup.earlier_s
        progress = _train_loop(cfg, setup, stop, emit, log, started)
        return _finish(setup, progress, log, started)


# ----------------------------------------------------------------------- setup


def _setup(cfg: TrainConfig, emit: Emit, stop: StopSignal, ranks: Ranks, device: Any) -> _Setup:
    """Load the model and data, attach LoRA, build the optimizer, then open the run (a new folder,
    or the checkpoint it resumes from) and announce it with TrainStarted."""
    import torch

    resume_dir = find_checkpoint(cfg.resume_from_checkpoint) if cfg.resume_from_checkpoint else None
    run = RunPaths(resume_dir.parent.parent if resume_dir else new_run_dir(cfg))
    recorded_run = read_run_config(run) if resume_dir else {}  # its config.json, read once
    # a setting the checkpoint cannot take (its LoRA shape, model, template) fails here, before the load
    changes = (
        resume_changes(recorded_config(recorded_run, run.config), cfg, str(resume_dir)) if resume_dir else []
    )
    for folder in {Path(cfg.output_dir).expanduser(), run.root.parent} if ranks.is_main else ():
        for leftover in remove_unfinished_writes(folder):
            emit(P.Log(message=f"removed {leftover}, left by a run stopped while it wrote a checkpoint"))
    _seed_everything(cfg.seed)
    loaded = _load_model(cfg, emit, device, stop.requested)
    loaded_at = time.perf_counter()
    train_set, eval_set = _load_data(cfg, loaded.tokenizer, emit, stop.requested)

    sharded = bool(cfg.deepspeed) and ranks.launched and not cfg.is_qlora
    if cfg.deepspeed and ranks.launched and cfg.is_qlora:
        emit(P.Log(message=qlora_sharding_note(cfg.deepspeed)))
    if cfg.deepspeed and not ranks.launched:
        emit(
            P.Log(
                message=f"--deepspeed {cfg.deepspeed} shards over several processes and this run "
                "is one: nothing is sharded (start it with NPROC_PER_NODE=N to shard over N GPUs)"
            )
        )
    # FSDP2 takes the plain path: the fast path packs each rank's samples into its own number of
    # forwards, and the ranks' per-layer all-gathers must pair up
    longest = max((len(s.input_ids) for s in train_set), default=None)
    path = plain_path(cfg) if sharded else select_path(cfg, loaded.device, loaded.model.config, longest)
    for note in path.notes:
        emit(P.Log(message=note))
    model = attach_lora(path.prepare_base(loaded.model), cfg, path.gradient_checkpointing)
    if loaded.device.type != "cuda" and ranks.world == 1:
        # not with several ranks: one rank leaving a step halfway would leave the others waiting
        # Every module, in backward as well (recomputed layers run forward again), so an abort
        # waits for one layer at most. Not on CUDA, where a step takes seconds.
        stop_before_each(model.modules(), lambda: stop.mode == "abort")
    if sharded:
        if resume_dir:  # into the whole weights, before each rank keeps its shard of them
            load_adapter_weights(resume_dir, model, loaded.device)
        emit(P.Log(message=shard_model(model, cfg.deepspeed)))
    params = [p for p in model.parameters() if p.requires_grad]
    ddp = None if sharded else data_parallel(model, path.loss_sum, ranks)
    optimizer = torch.optim.AdamW(
        optimizer_groups(model, cfg),
        lr=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        fused=loaded.device.type == "cuda" and not sharded,
    )
    per_step = micro_batches_per_step(cfg, ranks.world, recorded_run)
    plan = build_plan(len(train_set), cfg, per_step)
    if resume_dir and (completed := refuse_finished_run(run.root, cfg, len(plan), resume_dir)):
        emit(P.Log(message=continued_note(completed, len(plan), resume_dir)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, len(plan)))
    setup = _Setup(
        run=run,
        model=model,
        tokenizer=loaded.tokenizer,
        device=loaded.device,
        path=path,
        params=params,
        optimizer=optimizer,
        scheduler=scheduler,
        plan=plan,
        train_set=train_set,
        eval_set=eval_set,
        start_step=0,
        load_s=loaded.seconds,
        loaded_at=loaded_at,
        ranks=ranks,
        targets=[loss_tokens(sample) for sample in train_set],
        micro_batches_per_step=per_step,
        sharded=sharded,
        ddp=ddp,
    )

    _open_run(cfg, setup, resume_dir, recorded_run, changes, loaded.resolved.path, emit)
    if ranks.world > 1:
        # dropout draws its own masks on each rank (the same seed gave every rank the same adapter)
        torch.manual_seed(cfg.seed + 1_000_003 * (ranks.rank + 1) + setup.start_step)
    return setup


def _open_run(
    cfg: TrainConfig,
    setup: _Setup,
    resume_dir: Path | None,
    recorded_run: dict[str, Any],
    changes: list[str],
    base_path: Path,
    emit: Emit,
) -> None:
    """Resume from the checkpoint (its metrics cut back to it, the settings it resumes with
    recorded over `recorded_run`, the run's config.json as read) or start the run's folder, then
    announce the run with TrainStarted."""
    run = setup.run
    main = setup.ranks.is_main
    if resume_dir:
        setup.start_step = load_checkpoint(
            resume_dir,
            setup.model,
            setup.optimizer,
            setup.scheduler,
            setup.device,
            shard_optimizer=shard_optimizer_state if setup.sharded else None,
        )
        if main:
            truncate_metrics(run.root, setup.start_step)
        setup.earlier_s = logged_seconds(run.root)
        emit(P.Log(message=f"resumed from {resume_dir} at step {setup.start_step}"))
        if changes:
            emit(P.Log(message="resumed with changed settings: " + ", ".join(changes)))
        if note := ranks_changed_note(recorded_run, setup, cfg):
            emit(P.Log(message=note))
        warning = data_changed_warning(recorded_run.get("dataset_sha256") or {}, dataset_hashes(cfg))
        if warning:
            emit(P.Log(message=warning))
        if main:  # the next resume starts from these settings and this data
            created = recorded_run.get("created")
            write_run_config(run, cfg, base_path, setup.micro_batches_per_step, setup.ranks.world, created)
    elif main:
        run.root.mkdir(parents=True, exist_ok=True)
        write_run_config(run, cfg, base_path, setup.micro_batches_per_step, setup.ranks.world)
        start_metrics(run.root)
        if moves_base_into_adapter(setup.model):
            save_initial_adapter(setup.model, run.initial_adapter)
    if setup.ranks.world > 1 and not resume_dir:
        emit(P.Log(message=data_parallel_note(cfg, setup)))
    emit(
        P.TrainStarted(
            run_id=run.root.name,
            run_dir=str(run.root),
            total_steps=setup.total_steps,
            start_step=setup.start_step,
            trainable_parameters=sum(p.numel() for p in setup.params),
            command=to_command(cfg),
        )
    )


def _load_model(cfg: TrainConfig, emit: Emit, device: Any = None, cancel: Any = None) -> LoadedModel:
    from ..models.loading import load_model

    emit(P.Progress(stage="load", message=f"loading model {cfg.model}"))
    loaded = load_model(
        cfg.model,
        torch_dtype=cfg.torch_dtype,
        quantize_4bit=cfg.is_qlora,
        trust_remote_code=cfg.trust_remote_code,
        device=device,  # this rank's GPU under torchrun; else the loader's choice
        cancel=cancel,
    )
    use_attention_kernel(loaded.model, cfg.attn_impl)
    found_type = getattr(loaded.model.config, "model_type", "")
    if cfg.model_type and cfg.model_type != found_type:
        emit(
            P.Log(
                message=f"--model_type {cfg.model_type}: the model's config.json says {found_type!r}; "
                "TuneBench reads the architecture from config.json, so --model_type changes nothing"
            )
        )
    emit(
        P.ModelLoaded(
            model=loaded.resolved.label,
            path=str(loaded.resolved.path),
            parameters=loaded.parameters,
            seconds=round(loaded.seconds, 3),
            device=str(loaded.device),
            dtype=str(loaded.dtype).replace("torch.", ""),
        )
    )
    return loaded


def _load_data(cfg: TrainConfig, tokenizer: Any, emit: Emit, cancel: Any) -> tuple[list[Any], list[Any]]:
    """The tokenised train and eval sets, reported in a DataReport; UserError if no sample is left,
    Cancelled once `cancel` is set."""
    from ..core.data import load_dataset_for, split_eval
    from ..core.encoding import tokenize_samples

    emit(P.Progress(stage="tokenize", message="reading and tokenising the data"))
    samples, problems = load_dataset_for(cfg, cfg.dataset, cancel)
    if cfg.val_dataset:
        eval_samples, eval_problems = load_dataset_for(cfg, cfg.val_dataset, cancel)
        problems = problems + eval_problems
    else:
        samples, eval_samples = split_eval(samples, cfg.val_ratio, cfg.seed)
        if cfg.val_ratio > 0 and not eval_samples:
            emit(P.Log(message=no_eval_note(cfg.val_ratio, len(samples))))
    train_set, report = tokenize_samples(samples, tokenizer, cfg.max_length, cfg.template, cancel)
    eval_set, eval_report = tokenize_samples(eval_samples, tokenizer, cfg.max_length, cfg.template, cancel)
    all_problems = [str(p) for p in problems + report.problems + eval_report.problems]
    emit(
        P.DataReport(
            samples=len(train_set),
            eval_samples=len(eval_set),
            tokens=report.tokens,
            truncated=report.truncated + eval_report.truncated,
            dropped=report.dropped + eval_report.dropped,
            problems=all_problems[:200],
            skipped=len(problems),
        )
    )
    if not train_set:
        raise no_sample_left(all_problems, cfg.max_length)
    read = len(train_set) + len(eval_set) + report.dropped + eval_report.dropped
    if len(problems) >= read:  # most of the data is not training: a format mistake, more likely than not
        emit(P.Log(message=mostly_skipped_note(len(problems), len(problems) + read)))
    emit(P.Log(message=f"chat template: {report.template}"))
    return train_set, eval_set


# ------------------------------------------------------------------ train loop


def _train_loop(
    cfg: TrainConfig, s: _Setup, stop: StopSignal, emit: Emit, log: Emit, started: float
) -> _Progress:
    """Steps until the plan ends or a stop: each step logged, evaluated and saved as `cfg` says."""
    progress = _Progress(step=s.start_step, stage_s={"load": round(s.load_s, 3)})
    epoch_steps = max(1, steps_per_epoch(len(s.train_set), cfg, s.micro_batches_per_step))
    main = s.ranks.is_main
    noted = len(s.path.notes)
    if s.path.compiles:
        emit(P.Progress(stage="compile", message="compiling the decoder layers (the first step)"))
    while progress.step < s.total_steps:
        try:
            if not _train_step(cfg, s, progress, stop):
                progress.status = "aborted"
                break
        except Cancelled:  # an abort inside the step (stop_before_each)
            s.optimizer.zero_grad(set_to_none=True)
            progress.status = "aborted"
            break
        step = progress.step
        if step == s.start_step + 1:
            emit(P.Log(message=_first_step_done(s, progress)))
        for note in s.path.notes[noted:]:  # what the path learnt on the first forwards
            emit(P.Log(message=note))
        noted = len(s.path.notes)
        if step == s.start_step + 2 and (note := progress.clock.warm_up_note()):
            emit(P.Log(message=note))

        if step % cfg.logging_steps == 0 or step == s.total_steps or step == s.start_step + 1:
            log(_step_event(s, progress, epoch_steps, started))
        # rank 0 evaluates alone, the others wait for it in the next step's all-reduce; sharded,
        # every rank runs the forwards (each holds a shard of every layer)
        if (main or s.sharded) and s.eval_set and (step % cfg.eval_steps == 0 or step == s.total_steps):
            try:
                eval_loss = evaluate(s.model, s.eval_set, cfg, s.tokenizer, s.device, s.path)
            except Cancelled:
                progress.status = "aborted"
                break
            log(P.EvalResult(step=step, eval_loss=eval_loss))
        # the last step is saved too, so a finished run resumed with more steps goes on from its
        # end (the optimizer's moments and the RNG as they were) instead of training steps again
        if step % cfg.save_steps == 0 or step == s.total_steps:
            _save_checkpoint(cfg, s, step, log)
        mode = _stop_mode(s, progress, stop)
        if mode == "graceful":
            progress.status = "stopped"
            if step < s.total_steps and step % cfg.save_steps != 0:
                _save_checkpoint(cfg, s, step, log)
            break
        if mode == "abort":
            progress.status = "aborted"
            break
    if "to_first_step" in progress.stage_s:
        after_first = time.perf_counter() - s.loaded_at - progress.stage_s["to_first_step"]
        progress.stage_s["steps"] = round(after_first, 3)
    return progress


def _first_step_done(s: _Setup, progress: _Progress) -> str:
    """Record the time to the first step (from the model loaded) and its compile; the note saying so."""
    after_load = time.perf_counter() - s.loaded_at
    compile_s, cache = s.path.compile_report()
    progress.stage_s.update(
        to_first_step=round(after_load, 3), first_step=round(progress.clock.first_step_s or 0.0, 3)
    )
    if s.path.compiles:
        progress.stage_s["compile"] = round(compile_s, 3)
    return first_step_note(after_load, compile_s, cache)


def _stop_mode(s: _Setup, progress: _Progress, stop: StopSignal) -> str:
    """The stop to act on: as asked, in one process; with several, the one all ranks agreed on at
    the step's all-reduce (a stop asked later waits for the next step, or one rank would leave)."""
    return progress.stop_mode if s.ranks.world > 1 else stop.mode


def _train_step(cfg: TrainConfig, s: _Setup, progress: _Progress, stop: StopSignal) -> bool:
    """One optimizer step over the plan's next micro-batches; False if an abort cut it short."""
    import torch

    # In eval mode a step would recompute no layer and keep every activation and dequantised
    # weight (a 7B QLoRA needed ~16 GiB more). Set every step, whatever the top module says:
    # PeftModel starts in training mode around a model that from_pretrained left in eval mode.
    s.model.train()
    step = s.plan[progress.step]
    mine = s.ranks.share(step)
    # The step's last backward reduces the gradients over the ranks (DDP's all-reduce, FSDP2's
    # reduce-scatter), so every rank runs one: a rank short of micro-batches repeats one with its
    # loss times zero. Sharded, every rank runs as many forwards as the busiest: FSDP2 gathers
    # the weights in each, and the gathers must pair up.
    fewest = math.ceil(len(step) / s.ranks.world) if s.sharded else 1
    idle = max(0, fewest - len(mine))
    forwards = s.path.group(mine, s.train_set) if mine else []
    padding = s.path.group([step[0]] * idle, s.train_set) if idle else []
    micro_batches = [
        s.path.collate([s.train_set[i] for i in idx], s.tokenizer.pad_token_id, s.device)
        for idx in forwards + padding
    ]
    # Normalise by the loss tokens of the whole step (all ranks' share), not per micro-batch, so
    # accumulation and ranks give the same gradient as one big batch. DDP and FSDP2 average over
    # the ranks: the loss is scaled by their number to make that average the sum.
    step_targets = sum(s.targets[i] for idx in step for i in idx)
    # The step's loss stays on the device: reading it per micro-batch would make the host wait for
    # the GPU before it may launch the next forward.
    loss_total = torch.zeros((), dtype=torch.float32, device=s.device)
    step_tokens = 0
    last = len(micro_batches) - 1
    for n, batch in enumerate(micro_batches):
        # an abort skips the rest of the step, but for the collectives the other ranks wait in
        # (DDP's in the last backward, FSDP2's in every forward and backward)
        if stop.mode == "abort" and not s.sharded and not (s.ddp is not None and n == last):
            continue
        with _gradients_reduced_if(s, n == last):
            loss_sum = s.path.loss_sum(s.model, batch) if s.ddp is None else s.ddp(batch)
            if n >= len(forwards):
                (loss_sum * 0.0).backward()
                continue
            (loss_sum * s.ranks.world / step_targets).backward()
        loss_total += loss_sum.detach().float()
        step_tokens += batch.tokens
    loss_total, step_tokens, progress.stop_mode = agree_step(s.ranks, loss_total, step_tokens, stop.mode)
    if progress.stop_mode == "abort":
        s.optimizer.zero_grad(set_to_none=True)
        return False
    norm = torch.nn.utils.clip_grad_norm_(s.params, cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
    if norm is not None and s.sharded:
        norm = norm.full_tensor()  # the norm over every rank's shard
    s.optimizer.step()
    s.scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)
    # The one CPU-GPU sync point of a step: its loss and gradient norm, read together.
    if norm is None:
        step_loss = loss_total.item()
    else:
        step_loss, progress.grad_norm = torch.stack([loss_total, norm.float()]).tolist()
    progress.step += 1
    progress.clock.step_done(step_tokens)
    progress.window_loss += step_loss
    progress.window_tokens += step_targets
    return True


def _gradients_reduced_if(s: _Setup, last: bool) -> Any:
    """Gradients cross the ranks in the step's last backward only, overlapped with it: the others
    accumulate on each rank without communicating (DDP's no_sync, FSDP2's gradient sync off)."""
    if s.sharded:
        s.model.set_requires_gradient_sync(last)
    return s.ddp.no_sync() if s.ddp is not None and not last else contextlib.nullcontext()


def _step_event(s: _Setup, progress: _Progress, epoch_steps: int, started: float) -> P.TrainStep:
    """The TrainStep for the step just taken, with the loss of the window it closes."""
    step = progress.step
    return P.TrainStep(
        step=step,
        total_steps=s.total_steps,
        epoch=round(step / epoch_steps, 4),
        loss=progress.take_window(),
        lr=s.scheduler.get_last_lr()[0],
        grad_norm=round(progress.grad_norm, 6),
        tokens_per_s=round(progress.clock.tokens_per_s(), 1),
        eta_s=round(progress.clock.eta_s(s.total_steps - step), 1),
        elapsed_s=round(time.perf_counter() - started, 1),
    )


def _save_checkpoint(cfg: TrainConfig, s: _Setup, step: int, log: Emit) -> None:
    """Rank 0 writes the checkpoint; sharded, every rank first gives its shards to the whole."""
    adapter = optimizer = None
    if s.sharded:
        adapter, optimizer = full_adapter_state(s.model), full_optimizer_state(s.optimizer)
    if not s.ranks.is_main:
        return
    saved = save_checkpoint(
        s.run, step, s.model, s.optimizer, s.scheduler, cfg.save_total_limit, adapter, optimizer
    )
    log(P.CheckpointSaved(step=step, path=str(saved)))


# --------------------------------------------------------------------- cleanup


def _finish(s: _Setup, progress: _Progress, log: Emit, started: float) -> P.TrainFinished:
    """Save the adapter (not after an abort) and log the run's TrainFinished."""
    adapter_dir = ""
    state = full_adapter_state(s.model) if s.sharded and progress.status != "aborted" else None
    if progress.status != "aborted" and s.ranks.is_main:
        saving = time.perf_counter()
        initial = s.run.initial_adapter if moves_base_into_adapter(s.model) else None
        save_adapter_atomically(s.model, s.run.adapter, initial, state)
        adapter_dir = str(s.run.adapter)
        progress.stage_s["save"] = round(time.perf_counter() - saving, 3)
    if "compile" in progress.stage_s:  # the whole run's: evals compile the layers without grad again
        progress.stage_s["compile"] = round(s.path.compile_report()[0], 3)
    finished = P.TrainFinished(
        run_id=s.run.root.name,
        status=progress.status,
        adapter_dir=adapter_dir,
        final_loss=progress.final_loss,
        steps=progress.step,
        seconds=round(time.perf_counter() - started, 1),
        stage_s=progress.stage_s,
    )
    log(finished)
    return finished


# ===================================================================== pieces


def stopped_before_training(started: float) -> P.TrainFinished:
    """How a run ends when it is stopped while its data is read or tokenised: nothing was trained
    or written, so there is nothing to resume."""
    return P.TrainFinished(status="aborted", seconds=round(time.perf_counter() - started, 1))


def _seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def no_eval_note(val_ratio: float, samples: int) -> str:
    """Why a run asked for an eval split has none: split_eval never holds out the only sample."""
    return (
        f"--val_ratio {val_ratio} holds out nothing from {samples} sample(s) (one must stay "
        "to train on), so this run has no eval; add samples, or give --val_dataset"
    )


def mostly_skipped_note(skipped: int, records: int) -> str:
    return (
        f"{skipped} of {records} records could not be read and are skipped (the reasons are listed "
        "with the data line): if that is not what you meant, stop the run and fix the data"
    )


def no_sample_left(problems: list[str], max_length: int) -> UserError:
    """The error for a dataset of which tokenising (and --max_length) leaves nothing to train on."""
    shown = "\n  ".join(problems[:10])
    return UserError(
        f"no training sample is left after tokenising:\n  {shown}",
        f"each line above says what to change (--max_length is {max_length})",
        code="data",
    )


def ranks_changed_note(recorded_run: dict[str, Any], s: _Setup, cfg: TrainConfig) -> str:
    """What a resume on another number of processes changed ("" when the same)."""
    before = recorded_run.get("processes", 1)
    if before == s.ranks.world:
        return ""
    per, world = s.micro_batches_per_step, s.ranks.world
    share = f"{per // world}" if per % world == 0 else f"{per // world} or {per // world + 1}"
    idle = f"; {world - per} process(es) idle, more than the step's micro-batches" if per < world else ""
    return (
        f"resumed on {world} process(es); the run trained on {before}: each step still takes "
        f"{per} micro-batch(es) of {cfg.per_device_train_batch_size} (global batch "
        f"{per * cfg.per_device_train_batch_size} samples), now {share} per process{idle}, so the "
        "run continues its step plan"
    )


def data_parallel_note(cfg: TrainConfig, s: _Setup) -> str:
    bs, per = cfg.per_device_train_batch_size, s.micro_batches_per_step
    return (
        f"data parallel on {s.ranks.world} processes: global batch {bs} per device x "
        f"{cfg.gradient_accumulation_steps} accumulation x {s.ranks.world} = {bs * per} samples per "
        + (
            "step; gradients reduce-scattered by FSDP2 in each step's last backward"
            if s.sharded
            else "step; PyTorch DDP all-reduces only the adapter's gradients, overlapped with each "
            "step's last backward"
        )
    )


def evaluate(model, eval_set: list, cfg: TrainConfig, tokenizer, device, path: TrainPath) -> float:
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        bs = cfg.per_device_eval_batch_size
        for i in range(0, len(eval_set), bs):
            batch = path.collate(eval_set[i : i + bs], tokenizer.pad_token_id, device)
            total += path.loss_sum(model, batch).item()
            count += batch.target_tokens
    return total / max(count, 1)
