"""Scanner files -> mindeye-bridge -> the realtime service, on the tiny world.

A run of the world is written to an export folder as a scanner would (one NIfTI per volume, the
head moved by a known trajectory and the session displaced from the calibration session, with
the simulator's scipy resampling), with its events.tsv beside it; the bridge aligns the session to
the calibration reference, corrects each volume (SimpleITK), resamples it into the model grid and
sends it to the service, which decodes every trial (untrained tiny model: the path, not its quality).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import zmq

from mindeye.motion import framewise_displacement, volume_centre_mm
from mindeye.nsd import NSDLayout, read_design, read_roi, read_timeseries
from realtime.backends import TorchBackend
from realtime.bridge import scanner_files
from realtime.bridge.bridge import Bridge, BridgeSettings, ModelSpace
from realtime.bridge.registration import CalibrationReference
from realtime.bridge.watcher import ExportWatcher
from realtime.latency import read_volumes_csv, write_report
from realtime.pipeline import SubjectRois
from realtime.service import RealtimeService, ServiceSettings
from simulators.replay.head_motion import MotionSpec, move_volume, session_trajectory
from simulators.replay.sources import design_events

BIN = Path(sys.executable).parent
SUBJECT, SESSION, RUN = 1, 5, 1
MOTION = MotionSpec(drift_mm_per_min=1.0, drift_deg_per_min=0.5, jerks_per_min=2.0, jerk_max_mm=1.5,
                    jerk_max_deg=1.0, session_offset_mm=2.0, session_offset_deg=2.0)


def write_scanner_run(root: Path, export: Path) -> tuple[np.ndarray, int]:
    """Session 5's run 1 as the scanner writes it, head moved; returns the true motion relative to today's
    first volume (what the bridge estimates), (T, 6), and the run's number of trials."""
    layout = NSDLayout(root)
    series = read_timeseries(layout.timeseries(SUBJECT, SESSION, RUN))
    n_volumes = series.data_xyzt.shape[3]
    trajectory = session_trajectory(MOTION, n_volumes, series.tr, volume_centre_mm(series.data_xyzt.shape,
                                                                                     series.affine), seed=5)
    folder = export / "scanner"  # the layout of mindeye-replay sink=folder: files in scanner/, schedules in events/
    (export / "events").mkdir(parents=True)
    folder.mkdir()
    events = design_events(read_design(layout.design(SUBJECT, SESSION, RUN), n_volumes), series.tr)
    (export / "events" / f"run-{RUN:02d}_events.tsv").write_text("onset\tduration\timage_id\ttrial_type\n" + "".join(
        f"{e.onset_s}\t{e.duration_s}\t{e.image_id}\t{e.label}\n" for e in events))
    for t in range(n_volumes):
        moved_xyz = move_volume(series.data_xyzt[..., t].astype(np.float32), series.affine,
                                trajectory.calibration_t6[t])
        image = nib.Nifti1Image(moved_xyz[..., None], series.affine)  # 4D of one volume: the TR in pixdim[4]
        image.header.set_xyzt_units("mm", "sec")
        image.header["pixdim"][4] = series.tr
        nib.save(image, folder / f"series-011_vol-{t + 1:06d}.nii")
    return trajectory.within_t6, len(events)


@contextmanager
def running_service(root: Path, checkpoint: Path, folder: Path):
    """The realtime service on free ports, in a thread, for subj01: (service, its zmq context); stopped after."""
    context = zmq.Context()
    service = RealtimeService(ServiceSettings(folder, "tcp://127.0.0.1:*", "tcp://127.0.0.1:*", journal_fsync="never"),
                              TorchBackend.from_checkpoint(checkpoint, bank=None, prior_steps=2),
                              SubjectRois.from_layout(root, ["subj01"]), context=context)
    stop_service = threading.Event()
    service_thread = threading.Thread(target=service.run, args=(stop_service,), daemon=True)
    service_thread.start()
    try:
        assert service.ready.wait(30)
        yield service, context
    finally:
        stop_service.set()
        service_thread.join(60)
        context.term()


def test_a_moving_head_through_bridge_and_service(tiny_world, checkpoint, tmp_path):
    root = tiny_world[0]
    truth_t6, n_trials = write_scanner_run(root, tmp_path / "export")
    with running_service(root, checkpoint, tmp_path / "service") as (service, context):
        roi = read_roi(NSDLayout(root).roi(SUBJECT))
        space = ModelSpace(roi.shape, roi.affine, tmp_path / "bridge", CalibrationReference.make(root, SUBJECT, 1),
                           roi.mask_xyz)
        watcher = ExportWatcher(tmp_path / "export" / "scanner", probe=scanner_files.probe,
                                incomplete=scanner_files.IncompleteFile, corrupt=scanner_files.CorruptFile,
                                settle_s=0.01)
        bridge = Bridge(BridgeSettings(tmp_path / "bridge", "subj01-nsd05", "subj01", service.volumes_endpoint,
                                       run_volumes=len(truth_t6), gap_wait_s=1.0), watcher, scanner_files.read_volume,
                        space, context=context)
        stop_bridge = threading.Event()
        bridge_thread = threading.Thread(target=bridge.run, args=(stop_bridge,), daemon=True)
        bridge_thread.start()
        try:
            deadline = time.monotonic() + 120
            results = tmp_path / "service" / "results.jsonl"
            while time.monotonic() < deadline and (not results.is_file() or
                                                   len(results.read_text().splitlines()) < n_trials):
                time.sleep(0.2)
        finally:
            stop_bridge.set()
            bridge_thread.join(30)

    assert len(results.read_text().splitlines()) == n_trials  # every trial decoded once
    assert bridge.counters["rejected"] == 0 and bridge.counters["missing"] == 0
    rows = read_volumes_csv(tmp_path / "service" / "volumes.csv")
    assert [int(row["index"]) for row in rows] == list(range(len(truth_t6)))
    estimated_t6 = np.array([[row[name] for name in ("trans_x_mm", "trans_y_mm", "trans_z_mm", "rot_x_rad",
                                                     "rot_y_rad", "rot_z_rad")] for row in rows])
    translation_error_mm = np.abs(estimated_t6[:, :3] - truth_t6[:, :3])
    print(f"motion recovery on the tiny world: translation error median {np.median(translation_error_mm):.3f} mm, "
          f"max {translation_error_mm.max():.3f} mm; true FD max {framewise_displacement(truth_t6).max():.2f} mm")
    assert np.median(translation_error_mm) < 0.3 and translation_error_mm.max() < 1.0
    true_fd, sent_fd = framewise_displacement(truth_t6), np.array([row["fd_mm"] for row in rows])
    assert np.corrcoef(true_fd, sent_fd)[0, 1] > 0.8  # the jerks show in the FD the viewer plots
    report = write_report(tmp_path / "service" / "latency.csv")
    assert set(report.bridge_stages) == {"file_read", "register", "send", "transit", "scanner_to_service"}
    assert report.motion["volumes"] == len(truth_t6)
    assert (tmp_path / "bridge" / "session_alignment.json").is_file()


@pytest.mark.slow
def test_the_documented_commands_with_file_faults_and_a_killed_bridge(tiny_world, checkpoint, tmp_path):
    """docs/bridge.md's commands: `mindeye-replay sink=folder` writes a run as Siemens mosaic DICOMs with a
    moving head, a dropped volume, a duplicated one, a truncated one and a restarted series; `mindeye-bridge`
    sends it, is killed (SIGKILL) mid-run and started again; the service decodes every trial once."""
    root, scanner = tiny_world[0], tmp_path / "scanner_folder"
    with running_service(root, checkpoint, tmp_path / "service") as (service, _):
        environment = {**os.environ, "MINDEYE_DATA": str(root.parent)}
        replay = subprocess.Popen(
            [str(BIN / "mindeye-replay"), "sink=folder", f"folder.out_dir={scanner}", f"data_root={root}", "session=5",
             "runs=[1,2]", "speed=8", "motion.drift_mm_per_min=0.5", "motion.jerks_per_min=1",
             "motion.session_offset_mm=2", "motion.session_offset_deg=2", "faults.drop.indices=[7]",
             "faults.duplicate.indices=[9]", "faults.truncate.indices=[11]", "faults.restart.at_index=30",
             "faults.restart.runs=[2]"], env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        (scanner / "scanner").mkdir(parents=True, exist_ok=True)
        bridge_command = [str(BIN / "mindeye-bridge"), f"export_dir={scanner / 'scanner'}", "session=subj01-nsd05",
                          f"data_root={root}", f"out_dir={tmp_path / 'bridge'}", f"endpoint={service.volumes_endpoint}",
                          "runs.volumes=73", "runs.gap_wait_s=2", "runs.idle_s=20", "files.incomplete_timeout_s=5"]
        bridge = subprocess.Popen(bridge_command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True)
        time.sleep(15)  # mid-run 1 at 8x: 73 volumes take 12 s
        bridge.kill()
        first_log = bridge.communicate()[0]
        bridge = subprocess.Popen(bridge_command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True)
        assert replay.wait(120) == 0, replay.stdout.read()
        results = tmp_path / "service" / "results.jsonl"
        n_trials = 2 * 18 + 18  # runs 1 and 2, and run 2 acquired again after its restart
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (not results.is_file()
                                               or len(results.read_text().splitlines()) < n_trials):
            time.sleep(0.5)
        bridge.send_signal(signal.SIGINT)
        second_log = bridge.communicate(timeout=30)[0]
    log_text = first_log + second_log
    assert "resuming session subj01-nsd05" in second_log
    assert "missing volume: 7 of series" in log_text and "duplicate file" in log_text
    assert "series restart: series" in log_text and "gave up on" in log_text
    published = [json.loads(line) for line in results.read_text().splitlines()]
    keys = [(r["run"], r["trial"]) for r in published]
    assert len(keys) == len(set(keys)) == n_trials  # every trial of the 3 series once
    rows = read_volumes_csv(tmp_path / "service" / "volumes.csv")
    indices = [(int(row["run"]), int(row["index"])) for row in rows]
    assert len(indices) == len(set(indices))  # no volume taken twice as new
    assert {index for run, index in indices if run == 1} == set(range(73)) - {7, 11}  # dropped, truncated
    assert all(row["fd_mm"] is not None for row in rows)
