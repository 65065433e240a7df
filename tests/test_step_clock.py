"""Speed and time left come from the steps after the first, whose compile and warm-up would
otherwise stretch every estimate (issue 17: eta 7,444 s at step 1 of a 66 s run)."""

from tunebench.engine.cli.progress import stage_times
from tunebench.engine.core import protocol as P
from tunebench.engine.core.step_clock import StepClock, first_step_note
from tunebench.tui.widgets.train.run_state import RunState
from tunebench.tui.widgets.train.run_stats import stats_text


class FakeTime:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_the_first_step_is_left_out_of_speed_and_time_left():
    now = FakeTime()
    clock = StepClock(now=now)
    now.t += 21.0  # compile + step 1
    clock.step_done(tokens=4000)
    assert not clock.measured and clock.eta_s(98) == 0 and clock.tokens_per_s() == 0
    now.t += 0.5
    clock.step_done(tokens=4000)
    # 98 steps left at 0.5 s: 49 s, where the mean since the start would say 21.5 / 2 * 98 = 1,053 s.
    assert clock.eta_s(98) == 49.0
    assert clock.tokens_per_s() == 8000.0
    assert "20.5s of it once-only start-up" in clock.warm_up_note()


def test_speed_follows_the_recent_window():
    now = FakeTime()
    clock = StepClock(window=4, now=now)
    for seconds in [5.0] + [1.0] * 10 + [2.0] * 4:
        now.t += seconds
        clock.step_done(tokens=100)
    assert clock.seconds_per_step() == 2.0 and clock.tokens_per_s() == 50.0
    assert clock.eta_s(3) == 6.0


def test_no_note_when_the_first_step_cost_nothing_extra():
    now = FakeTime()
    clock = StepClock(now=now)
    for _ in range(3):
        now.t += 0.4
        clock.step_done(tokens=10)
    assert clock.warm_up_note() == ""


def test_the_train_pane_shows_compiling_then_measuring_then_the_eta():
    run = RunState()
    run.apply(P.TrainStarted(run_id="r", run_dir="/r", total_steps=10))
    assert run.apply(P.Progress(stage="compile", message="compiling the decoder layers"))
    assert "compiling the decoder layers…" in stats_text(run).plain
    run.apply(P.TrainStep(step=1, total_steps=10, loss=2.0))
    shown = stats_text(run).plain
    assert "compiling" not in shown and "tok/s measuring" in shown and "ETA measuring" in shown
    run.apply(P.TrainStep(step=2, total_steps=10, loss=2.0, tokens_per_s=900.0, eta_s=80.0))
    assert "ETA 1:20" in stats_text(run).plain


def test_time_to_first_step_names_the_compile_and_the_cache_and_the_cli_sums_up_the_stages():
    assert first_step_note(2.04) == "time to first step: 2.0s after the model loaded"
    note = first_step_note(23.4, 21.26, "1 compiled graph reused from /c")
    assert note == (
        "time to first step: 23.4s after the model loaded, 21.3s of it compiling the decoder layers "
        "(1 compiled graph reused from /c)"
    )
    stages = {"load": 2.0, "to_first_step": 3.4, "first_step": 3.0, "compile": 2.9}
    stages |= {"steps": 40.2, "save": 0.3}
    assert stage_times(stages) == (
        "model load 2.0s, to the first step 3.4s, later steps 40.2s, adapter save 0.3s "
        "(compiling the decoder layers: 2.9s of these)"
    )
    assert stage_times({"load": 1.0}) == "model load 1.0s"  # stopped before its first step


def test_a_measured_last_step_and_a_slow_cpu_read_as_numbers_not_measuring_or_zero(capsys):
    """The last step's ETA is 0 and measured; 0.3 tokens a second is not 0."""
    from tunebench.engine.cli.progress import ProgressRenderer

    run = RunState()
    run.apply(P.TrainStarted(run_id="r", run_dir="/r", total_steps=4))
    run.apply(P.TrainStep(step=4, total_steps=4, loss=2.0, tokens_per_s=0.34, eta_s=0.0))
    shown = stats_text(run).plain
    assert "tok/s 0.3" in shown and "ETA 0:00" in shown and "measuring" not in shown
    renderer = ProgressRenderer()
    renderer(P.TrainStarted(run_id="r", run_dir="/r", total_steps=4))
    renderer(P.TrainStep(step=4, total_steps=4, loss=2.0, tokens_per_s=0.34, eta_s=0.0))
    renderer(P.TrainStep(step=4, total_steps=4, loss=2.0, tokens_per_s=1234.0, eta_s=0.0))
    renderer.close()
    out = capsys.readouterr().out  # not a terminal: one plain line a step
    assert "0.3 tok/s eta 0:00" in out and "1,234 tok/s eta 0:00" in out and "measuring" not in out
