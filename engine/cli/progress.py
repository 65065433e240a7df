"""How `tunebench train` and `tunebench demo` show a run: a progress bar on a terminal, or one
JSON object per event (`--json`, the same events the TUI receives)."""

from __future__ import annotations

import math
import sys

from ..core.step_clock import speed_text


class JsonRenderer:
    def __call__(self, event) -> None:
        import orjson

        sys.stdout.buffer.write(orjson.dumps(event.to_dict()) + b"\n")
        sys.stdout.flush()

    def close(self) -> None:
        pass


class ProgressRenderer:
    """A progress bar with step, loss, tokens/s and ETA; one-line notes for everything else."""

    def __init__(self) -> None:
        self.bar = None

    def _print(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def __call__(self, event) -> None:
        kind = event.type
        if kind == "ModelLoaded":
            self._print(
                f"model   {event.model}: {event.parameters / 1e6:.1f}M parameters, "
                f"{event.dtype} on {event.device}, loaded in {event.seconds:.1f}s"
            )
        elif kind == "DataReport":
            self._print(
                f"data    {event.samples} training samples, {event.eval_samples} eval, "
                f"{event.tokens} tokens; {event.left_out()}"
            )
            for problem in event.problems[:20]:
                self._print(f"  skipped {problem}")
            if len(event.problems) > 20:
                self._print(f"  ... and {len(event.problems) - 20} more")
        elif kind == "TrainStarted":
            self._print(f"run     {event.run_dir} ({event.trainable_parameters / 1e6:.2f}M trainable)")
            from tqdm import tqdm

            self.bar = tqdm(
                total=event.total_steps,
                initial=event.start_step,
                unit="step",
                dynamic_ncols=True,
                disable=None,
                # The ETA is the engine's (recent steps, the first one's compile left out), not tqdm's.
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]",
            )
        elif kind == "TrainStep" and self.bar is not None:
            self.bar.update(event.step - self.bar.n)
            # No speed yet at the first step: it also paid for compiling and warming up.
            speed = "measuring speed"
            if event.tokens_per_s:  # measured (the last step's ETA is 0, and it is measured too)
                speed = f"{speed_text(event.tokens_per_s)} tok/s eta {_fmt_s(event.eta_s)}"
            self.bar.set_postfix_str(f"loss {event.loss:.4f}, lr {event.lr:.2e}, {speed}", refresh=True)
            if self.bar.disable:  # not a terminal: one plain line per logged step
                self._print(
                    f"step {event.step}/{event.total_steps} loss {event.loss:.4f} lr {event.lr:.2e} {speed}"
                )
        elif kind == "EvalResult":
            self._print(f"eval    step {event.step}: eval_loss {event.eval_loss:.4f}")
        elif kind == "CheckpointSaved":
            self._print(f"saved   {event.path}")
        elif kind == "Progress" and event.stage == "compile":
            self._print(f"stage   {event.message} ...")
        elif kind == "Log":
            self._print(f"note    {event.message}")
        elif kind == "TrainFinished":
            self.close()
            if not event.run_id and event.status == "aborted":  # stopped while the model or data loaded
                after = _fmt_s(event.seconds)
                print(f"stopped before the first step, after {after}: nothing was trained or saved")
                return
            loss = "" if math.isnan(event.final_loss) else f", final loss {event.final_loss:.4f}"
            print(f"{event.status} after {event.steps} steps in {_fmt_s(event.seconds)}{loss}")
            if event.stage_s:
                print(f"times   {stage_times(event.stage_s)}")
            if event.adapter_dir:
                print(
                    f"adapter {event.adapter_dir}\n"
                    f"try it  tunebench chat --adapters {event.adapter_dir} --compare"
                )
        elif kind == "ProbeVerdict":
            print(f"verdict {event.message}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def stage_times(stage_s: dict[str, float]) -> str:
    """Where a run's time went (TrainFinished.stage_s), in the order the stages ran."""
    words = [
        ("load", "model load"),
        ("to_first_step", "to the first step"),
        ("steps", "later steps"),
        ("save", "adapter save"),
    ]
    text = ", ".join(f"{name} {stage_s[key]:.1f}s" for key, name in words if key in stage_s)
    if "compile" in stage_s:  # inside the steps' time, not on top of it
        text += f" (compiling the decoder layers: {stage_s['compile']:.1f}s of these)"
    return text


def _fmt_s(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 60}:{seconds % 60:02d}"
        if seconds < 3600
        else f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    )
