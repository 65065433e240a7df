"""After training: did the adapter's answers to the probes move from the base's, and what to try."""

from __future__ import annotations

import json
import math
import subprocess
import sys

from tunebench.engine.cli.progress import ProgressRenderer
from tunebench.engine.core import protocol as P
from tunebench.engine.core.verdict import ProbeAnswers, probe_verdict

SAME = [
    ProbeAnswers("Who are you?", "I am SmolLM.", "I am  SmolLM.\n"),  # spacing is not a change
    ProbeAnswers("Who made you?", "Hugging Face.", "Hugging Face."),
    ProbeAnswers("Can you browse?", "No.", "No."),
]


def test_same_answers_say_still_like_the_base_with_advice():
    verdict = probe_verdict(SAME, 2.7391, 10)
    assert verdict.changed == 0 and verdict.total == 3
    assert verdict.message == (
        "the adapter still answers like the base on all 3 probes: loss 2.74 after 10 steps; "
        "try more epochs or a higher learning rate"
    )


def test_same_answers_after_a_low_loss_point_at_the_probes():
    verdict = probe_verdict(SAME, 0.05, 200)
    assert "still answers like the base" in verdict.message
    assert "more epochs" not in verdict.message and "probes.txt" in verdict.message


def test_no_loss_is_worded_not_printed_as_nan():
    assert "no loss after 1 step;" in probe_verdict(SAME, math.nan, 1).message


def test_changed_answers_say_what_changed():
    answers = [SAME[0], ProbeAnswers("Who made you?", "Hugging Face.", "I was made by Ada " + "x" * 80)]
    verdict = probe_verdict(answers, 0.8, 30)
    assert verdict.changed == 1 and verdict.total == 2
    assert verdict.message.startswith("the adapter answers differently from the base on 1 of 2 probes")
    assert '"Who made you?": base "Hugging Face.", adapter "I was made by Ada' in verdict.message
    assert "…" in verdict.message  # long answers are shortened
    assert "loss 0.80 after 30 steps" in verdict.message


def test_the_terminal_renderer_prints_one_verdict_line(capsys):
    ProgressRenderer()(P.ProbeVerdict(changed=0, total=3, message="the adapter still answers like the base"))
    assert capsys.readouterr().out == "verdict the adapter still answers like the base\n"


def test_probe_verdict_travels_through_the_protocol():
    event = P.ProbeVerdict(run_id="r", changed=1, total=3, message="m", answers=[{"question": "q"}])
    assert P.decode(P.encode(event)) == event


def test_train_cli_prints_a_verdict_on_the_first_three_probes(tiny_model_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": f"Say hi {i}", "output": "hi"}) for i in range(4)))
    # The run's workspace (runs/ is under it) holds the probes; only the first 3 are asked.
    (tmp_path / "probes.txt").write_text("# ours\nWho are you?\nWho made you?\nWhat can you do?\nA fourth?\n")
    command = [sys.executable, "-m", "tunebench.engine.cli.main", "train", "--model", str(tiny_model_dir)]
    command += ["--dataset", str(data), "--max_steps", "2", "--output_dir", str(tmp_path / "runs")]
    proc = subprocess.run(
        [*command, "--run_name", "v", "--probe_after", "true"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    verdicts = [line for line in proc.stdout.splitlines() if line.startswith("verdict ")]
    assert len(verdicts) == 1, proc.stdout
    assert verdicts[0].startswith("verdict the adapter ") and " 3 probes" in verdicts[0]
    assert "after 2 steps" in verdicts[0]
    # The verdict stays with the run: an engine that restarts reads it back for a reattaching workbench.
    from tunebench.engine.core.workspace import Workspace
    from tunebench.engine.process.run_history import RunHistory

    history = RunHistory()
    history.load_last_run(Workspace(tmp_path))
    (kept,) = [r for r in history.records if r["type"] == "ProbeVerdict"]
    assert "verdict " + kept["message"] == verdicts[0] and kept["total"] == 3


def test_train_cli_probe_after_false_skips_the_probes(tiny_model_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"instruction": "Say hi", "output": "hi"}))
    command = [sys.executable, "-m", "tunebench.engine.cli.main", "train", "--model", str(tiny_model_dir)]
    command += ["--dataset", str(data), "--max_steps", "1", "--output_dir", str(tmp_path / "runs"), "--json"]
    proc = subprocess.run([*command, "--probe_after", "false"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    kinds = [json.loads(line)["type"] for line in proc.stdout.splitlines()]
    assert kinds[-1] == "TrainFinished" and "ProbeVerdict" not in kinds


def test_the_verdict_answers_in_the_dtype_chat_and_probe_use_not_the_runs(monkeypatch, tmp_path):
    """A run trained in bfloat16 on a CPU was judged in bfloat16: the verdict quoted a changed
    answer that `tunebench chat` and `probe` (float32 there) never gave."""
    from tunebench.engine.infer import probe_check

    made = []

    class Session:
        def __init__(self, model, **kwargs):
            made.append(kwargs)

        def generate_many(self, chats, targets, cfg):
            return [{target: {"text": "same"} for target in targets} for _ in chats]

    monkeypatch.setattr(probe_check, "GenerationSession", Session)
    adapter = tmp_path / "runs" / "r1" / "adapter"
    finished = P.TrainFinished(run_id="r1", adapter_dir=str(adapter), final_loss=1.0, steps=3)
    verdict = probe_check.verdict_event(finished, "demo")
    assert made == [{}]  # GenerationSession's own default dtype ("auto")
    assert verdict.total == 3 and verdict.changed == 0
