"""The replayer's scanner-folder sink and its head-motion simulator: a run written as files reads back
(with the bridge's reader, with dicom2nifti) as the same volumes in the same place; motion is what the
truth file says; files appear atomically or visibly half-written; the CLI."""
from __future__ import annotations

import csv
import datetime
import subprocess
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mindeye.motion import rigid_matrix, volume_centre_mm
from realtime.bridge.scanner_files import IncompleteFile, probe, read_volume
from simulators.replay.head_motion import HeadMotion, MotionSpec, move_volume, session_trajectory
from simulators.replay.scanner_folder import FORMATS, FolderOptions, write_folder
from simulators.replay.sources import NiftiSource

REPO = Path(__file__).resolve().parents[1]
TR_S = 1.5
N_VOLUMES = 6
# an oblique grid (rotated 20 degrees about z and 10 about x, anisotropic voxels), and a left-handed one
OBLIQUE_44 = rigid_matrix([4.0, -7.0, 12.0, np.deg2rad(10), 0.0, np.deg2rad(20)], [0, 0, 0]) @ np.diag([2, 2.2, 3, 1])
LEFT_HANDED_44 = np.array([[-1.8, 0, 0, 40.0], [0, 1.8, 0, -30.0], [0, 0, 1.8, -20.0], [0, 0, 0, 1]])


def _run_nifti(tmp_path: Path, affine_44: np.ndarray, shape=(9, 11, 7)) -> tuple[Path, np.ndarray]:
    """A 4D int16 run with structure in every direction (so any axis mix-up shows), and its events."""
    rng = np.random.default_rng(0)
    x, y, z = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    base_xyz = 1000 + 40 * x + 7 * y + 300 * z
    run_xyzt = np.stack([base_xyz + rng.integers(-20, 20, shape) for _ in range(N_VOLUMES)], axis=-1).astype(np.int16)
    image = nib.Nifti1Image(run_xyzt, affine_44)
    image.header.set_zooms(image.header.get_zooms()[:3] + (TR_S,))
    path = tmp_path / "run.nii.gz"
    nib.save(image, path)
    (tmp_path / "events.tsv").write_text("onset\tduration\timage_id\n1.5\t3\t17\n6.0\t3\tn/a\n")
    return path, run_xyzt


def _write(tmp_path: Path, affine_44=OBLIQUE_44, **options):
    nifti, run_xyzt = _run_nifti(tmp_path, affine_44)
    source = NiftiSource(nifti, subject_id="subj01", session_id="subj01-test", run=3,
                         events_tsv=tmp_path / "events.tsv")
    summary = write_folder(source, FolderOptions(tmp_path / "out", **options), speed="max",
                           wall_clock=lambda: datetime.datetime(2026, 1, 2, 10, 0, 0))
    return summary, run_xyzt


def _in_grid(volume, affine_44: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A read volume's array and affine with its axes permuted / flipped back to `affine_44`'s."""
    image = nib.Nifti1Image(volume.data_xyz, volume.affine)
    image = image.as_reoriented(nib.orientations.ornt_transform(nib.io_orientation(volume.affine),
                                                                nib.io_orientation(affine_44)))
    return np.asanyarray(image.dataobj), image.affine


def _volumes(paths) -> list[list[Path]]:
    """The files grouped into volumes by their headers (as the bridge groups them), in volume order."""
    groups: dict[tuple[str, int], list[Path]] = {}
    for path in paths:
        key = probe(path)
        groups.setdefault((key.series_uid, key.index), []).append(path)
        assert key.parts_expected in (1, None) or key.parts_expected == 7  # the test runs' 7 slices
    return [groups[key] for key in sorted(groups, key=lambda key: key[1])]


@pytest.mark.parametrize("file_format", FORMATS)
@pytest.mark.parametrize("affine_44", [OBLIQUE_44, LEFT_HANDED_44], ids=["oblique", "left-handed"])
def test_each_volume_reads_back_as_written(tmp_path, file_format, affine_44):
    summary, run_xyzt = _write(tmp_path, affine_44, format=file_format, first_series=7)
    suffix = "nii" if file_format == "nifti" else "dcm"
    assert [path.name for path in summary.files][:2] == [f"001_000007_00000{i}.{suffix}" for i in (1, 2)]
    volumes = _volumes(summary.files)
    assert len(volumes) == N_VOLUMES and {len(files) for files in volumes} == {7 if file_format == "slices" else 1}
    acquired = []
    for index, files in enumerate(volumes):
        volume = read_volume(files[::-1])  # in any order
        assert (volume.series_number, volume.index) == (7, index)
        data_xyz, affine = _in_grid(volume, affine_44)
        np.testing.assert_array_equal(data_xyz, run_xyzt[..., index])
        np.testing.assert_allclose(affine, affine_44, atol=1e-4)
        assert volume.tr_s == pytest.approx(TR_S, abs=1e-6)
        acquired.append(volume.acquired_s)
    # acquisition starts one TR apart, from the wall clock's 10:00:00 (speed=max keeps the scanner's times)
    np.testing.assert_allclose(acquired, 36000 + TR_S * np.arange(N_VOLUMES), atol=1e-3)
    assert len({probe(path).series_uid for path in summary.files}) == 1


def _dicom2nifti(folder: Path, out: Path) -> nib.Nifti1Image:
    import dicom2nifti

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return nib.load(dicom2nifti.dicom_series_to_nifti(str(folder), str(out), reorient_nifti=False)["NII_FILE"])


def _assert_same_in_world(volume, data_xyz: np.ndarray, affine_44: np.ndarray) -> None:
    ours_xyz, ours_affine = _in_grid(volume, affine_44)
    np.testing.assert_array_equal(ours_xyz, data_xyz)
    np.testing.assert_allclose(ours_affine, affine_44, atol=1e-3)


@pytest.mark.parametrize("file_format", ["mosaic", "slices"])
def test_dicom2nifti_reads_the_series_as_the_run(tmp_path, file_format):
    summary, _ = _write(tmp_path, OBLIQUE_44, format=file_format)
    theirs = _dicom2nifti(tmp_path / "out" / "scanner", tmp_path / "d2n.nii.gz")
    assert theirs.shape[3] == N_VOLUMES  # one 4D series, volumes in acquisition-number order
    volumes = _volumes(summary.files)
    for index in (0, N_VOLUMES - 1):
        _assert_same_in_world(read_volume(volumes[index]), np.asanyarray(theirs.dataobj)[..., index], theirs.affine)


def test_dicom2nifti_reads_an_enhanced_volume_as_the_reader_does(tmp_path):
    summary, _ = _write(tmp_path, OBLIQUE_44, format="enhanced")
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / summary.files[-1].name).write_bytes(summary.files[-1].read_bytes())
    theirs = _dicom2nifti(tmp_path / "one", tmp_path / "d2n.nii.gz")  # dicom2nifti takes one multi-frame file
    _assert_same_in_world(read_volume(summary.files[-1]), np.asanyarray(theirs.dataobj), theirs.affine)


def test_events_and_truth_are_written_beside_the_run(tmp_path):
    summary, _ = _write(tmp_path, format="nifti")
    with open(tmp_path / "out" / "events" / "run-03_events.tsv") as file:
        events = list(csv.DictReader(file, delimiter="\t"))
    assert [(row["onset"], row["duration"], row["image_id"]) for row in events] == [("1.500", "3.000", "17"),
                                                                                  ("6.000", "3.000", "n/a")]
    with open(tmp_path / "out" / "truth" / "run-03_motion.tsv") as file:
        truth = list(csv.DictReader(file, delimiter="\t"))
    assert [row["file"] for row in truth] == [path.name for path in summary.files]
    assert all(float(value) == 0 for row in truth for key, value in row.items() if key.endswith(("mm", "rad")))
    assert not list((tmp_path / "out" / "scanner").glob(".*")), "no temporary files left behind"


def test_moved_volumes_are_the_simulator_s_and_the_truth_says_by_how_much(tmp_path):
    spec = MotionSpec(drift_mm_per_min=4.0, drift_deg_per_min=3.0, jerks_per_min=20.0, session_offset_mm=2.0,
                      session_offset_deg=2.0)
    summary, run_xyzt = _write(tmp_path, OBLIQUE_44, format="enhanced", motion=spec, motion_seed=5)
    expected = session_trajectory(spec, N_VOLUMES, TR_S, volume_centre_mm(run_xyzt.shape, OBLIQUE_44), seed=5)
    with open(tmp_path / "out" / "truth" / "run-03_motion.tsv") as file:
        truth = list(csv.DictReader(file, delimiter="\t"))
    within_t6 = np.array([[float(row[key]) for key in list(row)[3:9]] for row in truth])
    calibration_t6 = np.array([[float(row[key]) for key in list(row)[9:15]] for row in truth])
    np.testing.assert_allclose(within_t6, expected.within_t6, atol=1e-6)
    np.testing.assert_allclose(calibration_t6, expected.calibration_t6, atol=1e-6)
    np.testing.assert_allclose(calibration_t6[0], expected.session_offset_6, atol=1e-6)  # today's first volume
    for index in (0, N_VOLUMES - 1):
        data_xyz, _ = _in_grid(read_volume(summary.files[index]), OBLIQUE_44)
        moved_xyz = move_volume(run_xyzt[..., index], OBLIQUE_44, expected.calibration_t6[index])
        np.testing.assert_array_equal(data_xyz, np.rint(moved_xyz))
        assert np.abs(data_xyz - run_xyzt[..., index]).max() > 100  # it did move


def test_slow_writes_leave_half_written_files_the_reader_calls_incomplete(tmp_path):
    seen = []

    def sleep(seconds: float) -> None:  # called between the chunks of a file being written
        partial = max((tmp_path / "out" / "scanner").glob("*.dcm"), key=lambda path: path.stat().st_mtime_ns)
        with pytest.raises(IncompleteFile):
            probe(partial)
        seen.append(seconds)

    nifti, _ = _run_nifti(tmp_path, OBLIQUE_44)
    write_folder(NiftiSource(nifti, subject_id="subj01", run=1), FolderOptions(tmp_path / "out", "mosaic", write_s=0.3,
                                                                                chunks=3), speed="max", sleep=sleep)
    assert seen == pytest.approx([0.1] * 2 * N_VOLUMES)


# ---- head motion ------------------------------------------------------------------------------------------

def test_motion_is_deterministic_continues_across_runs_and_starts_still():
    spec = MotionSpec(drift_mm_per_min=0.5, drift_deg_per_min=0.5, jerks_per_min=3.0, session_offset_mm=3.0,
                      session_offset_deg=2.0, wobble=True)
    whole = session_trajectory(spec, 300, 1.0, [1, 2, 3], seed=7)
    head = HeadMotion(spec, [1, 2, 3], seed=7)
    parts = [head.next_volumes(n, 1.0) for n in (120, 180)]
    np.testing.assert_array_equal(np.vstack([part.within_t6 for part in parts]), whole.within_t6)
    assert not np.allclose(session_trajectory(spec, 300, 1.0, [1, 2, 3], seed=8).within_t6, whole.within_t6)
    np.testing.assert_array_equal(whole.within_t6[0], np.zeros(6))
    assert np.linalg.norm(whole.session_offset_6[:3]) == pytest.approx(3.0)
    assert np.linalg.norm(np.rad2deg(whole.session_offset_6[3:])) == pytest.approx(2.0)
    assert np.all(session_trajectory(MotionSpec(), 50, 1.0, [0, 0, 0], seed=1).calibration_t6 == 0)


def test_a_single_jerk_stays_within_its_limits():
    spec = MotionSpec(jerks_per_min=600.0, jerk_max_mm=3.0, jerk_max_deg=3.0)  # about one jerk per volume
    steps_t6 = np.diff(session_trajectory(spec, 400, 0.1, [0, 0, 0], seed=3).within_t6, axis=0)
    jumps = np.linalg.norm(steps_t6[:, :3], axis=1)
    assert jumps.max() > 1.0, "jerks happened"
    # one step can start one jerk and end spikes, so bound the largest single jerk by the commonest steps
    assert np.percentile(jumps[jumps > 0], 50) <= 3.0 + 1e-9


def test_move_volume_moves_the_head_where_the_parameters_say():
    affine_44 = np.diag([2.0, 2.0, 2.0, 1.0])
    volume_xyz = np.zeros((11, 11, 11), dtype=np.float32)
    volume_xyz[7, 5, 5] = 1.0  # 2 voxels (4 mm) right of the centre voxel (5, 5, 5)
    shifted_xyz = move_volume(volume_xyz, affine_44, [4.0, 0, 0, 0, 0, 0], order=1)  # head moves 4 mm right (+x)
    assert np.unravel_index(shifted_xyz.argmax(), shifted_xyz.shape) == (9, 5, 5)
    turned_xyz = move_volume(volume_xyz, affine_44, [0, 0, 0, 0, 0, np.pi / 2], order=1)  # +90 deg about z: +x to +y
    assert np.unravel_index(turned_xyz.argmax(), turned_xyz.shape) == (5, 7, 5)


# ---- the command ------------------------------------------------------------------------------------------

def test_cli_writes_a_folder_and_refuses_a_journal(tmp_path):
    nifti, _ = _run_nifti(tmp_path, OBLIQUE_44)
    command = [sys.executable, "-m", "simulators.replay.cli", "sink=folder", "source=nifti", f"nifti={nifti}",
               f"folder.out_dir={tmp_path / 'out'}", "folder.format=nifti", "speed=max", "motion.drift_mm_per_min=1",
               "faults.drop.indices=[1]", f"hydra.run.dir={tmp_path / 'run'}"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"wrote 1 run(s), {N_VOLUMES - 1} volume(s) in {N_VOLUMES - 1} file(s)" in done.stdout
    assert len(list((tmp_path / "out" / "scanner").glob("*.nii"))) == N_VOLUMES - 1
    assert '"fault": "drop"' in (tmp_path / "run" / "faults.jsonl").read_text()
    refused = subprocess.run(command[:4] + ["source=journal", "journal=x.mej", f"hydra.run.dir={tmp_path / 'run2'}"],
                             cwd=REPO, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "sink=folder writes volumes from source=nsd or source=nifti" in refused.stderr


# ---- file faults ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("file_format", ["mosaic", "nifti"])
def test_faults_become_file_faults_the_reader_and_the_truth_show(tmp_path, file_format):
    from realtime.bridge.scanner_files import CorruptFile
    from simulators.replay.faults import Faults

    faults = Faults.from_config({"drop": {"indices": [1]}, "duplicate": {"indices": [2]}, "delay": {"indices": [0],
                                 "delay_s": 2 * TR_S + 0.1}, "truncate": {"indices": [3]}, "corrupt": {"indices": [4]}})
    summary, run_xyzt = _write(tmp_path, format=file_format, faults=faults)
    suffix = ".nii" if file_format == "nifti" else ".dcm"
    names = [path.name for path in summary.files]
    # volume 0 arrives late (after volume 2 and its copy), volume 1 never, volume 2 twice
    assert names == [name + suffix for name in ("001_000005_000003", "copy1_001_000005_000003", "001_000005_000001",
                                                "001_000005_000004", "001_000005_000005", "001_000005_000006")]
    assert probe(summary.files[0]) == probe(summary.files[1])
    np.testing.assert_array_equal(_in_grid(read_volume(summary.files[1]), OBLIQUE_44)[0], run_xyzt[..., 2])
    with pytest.raises(IncompleteFile):
        probe(tmp_path / "out" / "scanner" / f"001_000005_000004{suffix}")
    with pytest.raises(CorruptFile):
        probe(tmp_path / "out" / "scanner" / f"001_000005_000005{suffix}")
    with open(tmp_path / "out" / "truth" / "run-03_motion.tsv") as file:
        assert [row["file"] for row in csv.DictReader(file, delimiter="\t")][:3] == [
            f"001_000005_000001{suffix}", "n/a", f"001_000005_000003{suffix}"]
    assert sorted(record["fault"] for record in summary.fault_records) == ["corrupt", "delay", "drop", "duplicate",
                                                                          "truncate"]


def test_a_series_restart_stops_the_series_and_acquires_the_run_again_as_the_next(tmp_path):
    from simulators.replay.faults import Faults

    spec = MotionSpec(drift_mm_per_min=6.0)
    faults = Faults.from_config({"restart": {"at_index": 4, "downtime_s": 10.0}})
    summary, run_xyzt = _write(tmp_path, format="enhanced", faults=faults, motion=spec)
    keys = [probe(path) for path in summary.files]
    assert [(key.series_number, key.index) for key in keys] == [(5, i) for i in range(4)] + [(6, i) for i in range(6)]
    assert keys[0].series_uid != keys[-1].series_uid
    acquired = [read_volume(path).acquired_s for path in summary.files]
    assert acquired[4] - acquired[3] == pytest.approx(TR_S + 10.0, abs=1e-3)  # the rest of the TR, then downtime
    with open(tmp_path / "out" / "truth" / "run-03_motion.tsv") as file:
        truth = list(csv.DictReader(file, delimiter="\t"))
    assert [row["series_number"] for row in truth] == ["5"] * 4 + ["6"] * 6
    # the head kept drifting: the second series starts where the first stopped
    drift = [float(row["trans_x_mm"]) ** 2 + float(row["trans_y_mm"]) ** 2 for row in truth]
    assert drift == sorted(drift) and drift[4] > drift[3]


def test_the_stimulus_log_grows_as_trials_happen_when_paced_in_real_time(tmp_path):
    nifti, _ = _run_nifti(tmp_path, OBLIQUE_44)
    events_tsv = tmp_path / "out" / "events" / "run-01_events.tsv"
    now = [0.0]
    rows_when = []  # (time, rows in the log, volume files) at every wait

    def sleep(seconds: float) -> None:
        rows = len(events_tsv.read_text().splitlines()) - 1 if events_tsv.exists() else None
        rows_when.append((now[0], rows, len(list((tmp_path / "out" / "scanner").glob("*.nii")))))
        now[0] += seconds

    source = NiftiSource(nifti, subject_id="subj01", run=1, events_tsv=tmp_path / "events.tsv", events_mode="at_onset")
    write_folder(source, FolderOptions(tmp_path / "out", "nifti"), speed="real", clock=lambda: now[0], sleep=sleep)
    # trials at 1.5 s and 6 s, volumes at (i + 1) x 1.5 s: the log has 0 rows before 1.5 s, 1 until 6 s
    assert rows_when[0] == (0.0, None, 0)
    between = [rows for t, rows, _ in rows_when if 1.5 < t < 6.0]
    assert between and set(between) == {1}
    assert len(events_tsv.read_text().splitlines()) == 3 and now[0] == pytest.approx(N_VOLUMES * TR_S)
