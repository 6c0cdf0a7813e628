"""benchmarks/kill9_session.py on the tiny world: SIGKILL the service at 5 random points across a
two-run session, restart it (and the replayer) each time; every trial is published exactly once,
the betas equal an uninterrupted run's, and a subscriber connected throughout receives every trial.

Slow (a few minutes on 2 cores: each of the 7 service starts imports torch and loads the model).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks/kill9_session.py"


@pytest.mark.slow
def test_kill_9_across_a_session_loses_nothing_counts_nothing_twice_and_the_subscriber_sees_all(tiny_world, tmp_path):
    root = tiny_world[0]
    figures = tmp_path / "kill9.json"
    command = [sys.executable, str(BENCHMARK), "--kills", "5", "--runs", "2", "--speed", "20", "--seed", "1",
               "--data-root", str(root), "--work-dir", str(tmp_path / "work"), "--output", str(tmp_path / "kill9.txt"),
               "--json", str(figures)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1200, cwd=BENCHMARK.parents[1],
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    got = json.loads(figures.read_text())
    report = (tmp_path / "kill9.txt").read_text()
    assert got["kills"] == 5 and got["exit_codes"] == [0, 0], report
    assert got["reference_subscriber_missed"] == 0, report  # without kills the subscriber sees everything
    assert got["published_once"], report  # results.jsonl: each trial once, across the 6 lives
    assert got["betas_identical"] or got["betas_within_1e-6"], report
    assert got["subscriber_missed"] == 0 and got["subscriber_twice"] == 0, report
