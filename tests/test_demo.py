"""The identity demo on the real demo model: after training it names its new identity."""

from __future__ import annotations

import subprocess
import sys

import pytest

# The timeouts only catch a hang: a fine-tune on two busy cores can take many minutes.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


def test_tunebench_demo_teaches_the_new_identity(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "tunebench.engine.cli.main", "demo", "--output_dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=1700,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    answers = {}
    for block in out.split("Q: ")[1:]:
        question, before, after = (line.strip() for line in block.strip().splitlines()[:3])
        answers[question] = (before.removeprefix("before:").strip(), after.removeprefix("after:").strip())
    before_en, after_en = answers["Who are you?"]
    before_zh, after_zh = answers["你是谁？"]
    assert "TuneBee" in after_en and "TuneBench" in after_en
    assert "小蜂" in after_zh
    assert "TuneBee" not in before_en and "小蜂" not in before_zh
    # How long it takes is measured by bench/bench_demo.py, not bounded here: a busy box is no bug.
