"""benchmarks/one_session_claim.py resumes across sessions: a fresh clone has the finished runs' logs (committed)
but not their checkpoints (gitignored). A finished run is skipped, unless later runs start from its checkpoint
and the checkpoint is gone: then it is trained again from the start (not resumed), and the others still skip.
The training command is replaced by a stand-in that writes what a finished run leaves behind.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

from omegaconf import OmegaConf

from conftest import load_benchmark


def write_finished_run(out_dir: Path, epochs: int = 2) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create({"train": {"epochs": epochs}}), out_dir / "run_config.yaml")
    (out_dir / "log.jsonl").write_text("".join(json.dumps({"epoch": e, "seconds": 10.0, "test/image_top1": 0.5}) + "\n"
                                               for e in range(1, epochs + 1)))
    (out_dir / "stdout.txt").write_text("trainable 123\n")
    (out_dir / "checkpoint").mkdir(exist_ok=True)


def test_lost_checkpoint_is_retrained_only_where_needed(tmp_path, monkeypatch):
    claim = load_benchmark(monkeypatch, "one_session_claim")
    commands = []

    def fake_training(command, check, stdout):
        commands.append(command)
        write_finished_run(Path(next(a for a in command if a.startswith("out_dir=")).split("=", 1)[1]))
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(claim.subprocess, "run", fake_training)
    needed, not_needed = tmp_path / "pretrain", tmp_path / "pretrain-noblocks"
    for run in (needed, not_needed):
        write_finished_run(run)
        (run / "checkpoint").rmdir()  # as a fresh clone has it
    (needed / "train_state").mkdir()  # even with a stale training state it starts over

    assert claim.run_training(not_needed, ["model=small"], print)["trainable"] == 123
    assert commands == []  # finished, and nothing needs its checkpoint: skipped
    final = claim.run_training(needed, ["model=small"], print, keep_checkpoint=True)
    assert len(commands) == 1 and "resume=true" not in commands[0] and "model=small" in commands[0]
    assert (needed / "checkpoint").is_dir() and final["seconds"] == 20.0
    claim.run_training(needed, ["model=small"], print, keep_checkpoint=True)
    assert len(commands) == 1  # its checkpoint is back: skipped


def test_unfinished_run_resumes(tmp_path, monkeypatch):
    claim = load_benchmark(monkeypatch, "one_session_claim")
    commands = []
    monkeypatch.setattr(claim.subprocess, "run", lambda command, check, stdout: (
        commands.append(command), write_finished_run(tmp_path / "run")))
    (tmp_path / "run" / "train_state").mkdir(parents=True)
    claim.run_training(tmp_path / "run", [], print)
    assert commands and commands[0][-1] == "resume=true"
