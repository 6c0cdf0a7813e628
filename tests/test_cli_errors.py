"""Every command answers --help and argument errors fast, and ends a user's mistake with one line that says
what to do next and an exit code per kind (mindeye.cli), never a traceback unless asked for.

The commands run in subprocesses with torch and the model stack made unimportable: `--help` and the usual
mistakes must be answered before any of it loads, which is what makes them take about a second.
"""
from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mindeye.cli import EXIT_CODES, plain_command
from mindeye.errors import ConfigValueError, PortInUse

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "diffusers", "open_clip", "transformers", "accelerate")  # what --help must not import
COMMANDS = {  # console script -> module (pyproject.toml's [project.scripts])
    "mindeye-world": "simulators.world.generate",
    "mindeye-train": "offline_training.train",
    "mindeye-train-generator": "offline_training.train_generator",
    "mindeye-distill": "export.distill",
    "mindeye-export": "export.cli",
    "mindeye-evaluate": "offline_training.evaluate",
    "mindeye-realtime": "realtime.cli",
    "mindeye-demo": "simulators.demo",
    "mindeye-replay": "simulators.replay.cli",
    "mindeye-latency-report": "realtime.latency",
    "mindeye-calibrate": "realtime.calibrate",
    "mindeye-viewer": "realtime.viewer",
}


def run(module: str, *arguments: str, light: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m module arguments`; with `light`, importing any of HEAVY fails (ModuleNotFoundError)."""
    block = f"sys.modules.update(dict.fromkeys({HEAVY!r}))" if light else "pass"
    code = (f"import runpy, sys; {block}; sys.argv = [{module!r}, *sys.argv[1:]]; "
            f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)")
    return subprocess.run([sys.executable, "-c", code, *arguments], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


def assert_one_line(result: subprocess.CompletedProcess, app: str, kind: str) -> str:
    assert result.returncode == EXIT_CODES[kind], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{app}: "), result.stderr
    return lines[0]


@pytest.mark.parametrize("app", list(COMMANDS))
def test_help_answers_without_torch_and_names_the_command(app):
    result = run(COMMANDS[app], "--help")
    assert result.returncode == 0, result.stderr[-3000:]
    assert app in result.stdout


def test_a_missing_data_root_says_to_run_mindeye_world_or_set_data_root(tmp_path):
    result = run("offline_training.train", f"data.root={tmp_path / 'nowhere'}", f"out_dir={tmp_path / 'run'}")
    line = assert_one_line(result, "mindeye-train", "missing file")
    assert f"expected it at {tmp_path / 'nowhere'}/nsddata/experiments/nsd/nsd_expdesign.mat" in line
    assert f"run `mindeye-world out_dir={tmp_path / 'nowhere'}` first" in line and "set data.root=PATH" in line
    assert not (tmp_path / "run").exists()


def test_a_missing_bundle_says_to_export_one_and_leaves_no_run_folder(tmp_path):
    result = run("realtime.cli", f"bundle={tmp_path / 'absent'}", f"out_dir={tmp_path / 'session'}")
    line = assert_one_line(result, "mindeye-realtime", "missing file")
    assert line == (f"mindeye-realtime: missing export bundle: expected it at {tmp_path / 'absent'}/manifest.json (make "
                    f"one with mindeye-export checkpoint=... out_dir=BUNDLE, or pass bundle=PATH)")
    (tmp_path / "run" / "checkpoint").mkdir(parents=True)
    (tmp_path / "run" / "checkpoint" / "config.json").write_text("{}")
    line = assert_one_line(run("realtime.cli", f"bundle={tmp_path / 'run'}"), "mindeye-realtime", "missing file")
    assert line.endswith(f"make a bundle with mindeye-export checkpoint={tmp_path / 'run' / 'checkpoint'} out_dir=BUNDLE, "
                         "then pass bundle=BUNDLE)")
    assert not (tmp_path / "session").exists()


def test_an_unknown_subject_names_the_subjects_the_model_knows(tmp_path):
    """The docs' example evaluated subject 8 with the demo's subject-1 model."""
    from mindeye.models import build_model, save_checkpoint

    save_checkpoint(build_model("tiny", voxels_per_subject={"subj01": 12}, clip_tokens=4, clip_dim=8,
                                low_level={"enabled": False}), tmp_path / "checkpoint")
    root = tmp_path / "data"  # passes the quick look for a data root; the subject is refused before it is read
    (root / "nsddata/experiments/nsd").mkdir(parents=True)
    (root / "nsddata/experiments/nsd/nsd_expdesign.mat").touch()
    out = tmp_path / "eval"  # hydra writes its record in out/hydra: a failed run must not leave out/ behind
    result = run("offline_training.evaluate", f"checkpoints={tmp_path / 'checkpoint'}", "subject=8",
                 f"data.root={root}", f"out_dir={out}", light=False)
    line = assert_one_line(result, "mindeye-evaluate", "config")
    assert line.endswith("has no aligner for subj08 (subject=8); this model knows subj01: pass subject=1")
    assert not out.exists()


@pytest.mark.parametrize("module, app, argument, message", [
    ("offline_training.train_generator", "mindeye-train-generator", "stepz=3", "unknown key 'stepz'; did you mean 'steps'?"),
    ("realtime.cli", "mindeye-realtime", "viewer.prot=8081", "unknown key 'viewer.prot'; did you mean 'viewer.port'?"),
    ("offline_training.evaluate", "mindeye-evaluate", "data=nds", "unknown data 'nds'; choose one of"),
    ("offline_training.train", "mindeye-train", "init_from=<run>", "cannot parse 'init_from=<run>' as key=value"),
])
def test_a_misspelt_key_gets_a_suggestion(tmp_path, module, app, argument, message):
    result = run(module, argument, f"out_dir={tmp_path / 'run'}")
    assert assert_one_line(result, app, "config").startswith(f"{app}: {message}")
    assert not (tmp_path / "run").exists()


def test_debug_true_and_hydra_full_error_show_the_traceback(tmp_path):
    arguments = (f"bundle={tmp_path / 'absent'}", f"out_dir={tmp_path / 'session'}")
    for result in (run("realtime.cli", *arguments, "debug=true"),
                   run("realtime.cli", *arguments, env={"HYDRA_FULL_ERROR": "1"})):
        assert result.returncode != 0 and "Traceback" in result.stderr
        assert "MissingFileError: missing export bundle" in result.stderr
    assert not (tmp_path / "session").exists()


def test_a_busy_port_names_the_setting_that_moves_it(capsys):
    """mindeye-realtime raises PortInUse for its viewer (test_realtime_service runs it); mindeye-viewer, whose
    LiveViewer.start re-raises the bind's error with the address, gets its own flag in the advice."""
    from realtime.viewer import LiveViewer

    assert str(PortInUse("the viewer's port 127.0.0.1:8080", "viewer.port=8081")) == (
        "the viewer's port 127.0.0.1:8080 is already in use (another program, perhaps another mindeye command, "
        "listens there): stop it or choose another port, e.g. viewer.port=8081")

    @plain_command("mindeye-viewer", ports="pass --port 8081 (--port 0 picks a free one)")
    def serve(port: int) -> None:
        LiveViewer("127.0.0.1", port).start()

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as exit_info:
            serve(port)
    assert exit_info.value.code == EXIT_CODES["busy port"]
    assert capsys.readouterr().err == (f"mindeye-viewer: LiveViewer: cannot listen on 127.0.0.1:{port}: [Errno "
                                       f"{errno.EADDRINUSE}] Address already in use: another program (perhaps another "
                                       f"mindeye command) holds that port; stop it or pass --port 8081 (--port 0 "
                                       f"picks a free one)\n")


def test_an_unknown_prior_sampler_is_a_config_error_naming_the_setting():
    from mindeye.models.prior import check_sampler

    with pytest.raises(ConfigValueError, match=r"^decode.prior_sampler: unknown prior sampler 'euler'; choose one of "
                                               r"ddim, dpmpp$"):
        check_sampler("euler", "decode.prior_sampler")
