"""The NSD data layer: real paths, each format read back from the tiny world, and clear errors."""
from __future__ import annotations

import logging

import h5py
import nibabel as nib
import numpy as np
import pytest
import scipy.io

from mindeye.errors import FormatError, MissingFileError
from mindeye.nsd import (ExpDesign, NSDLayout, StimulusBrick, onset_volume, read_betas, read_design,
                         read_mindeye_betas, read_roi, read_timeseries)
from mindeye.nsd.files import (from_nsd_int16, read_expdesign_arrays, to_nsd_int16, write_expdesign_arrays,
                               write_timeseries)

TR = 4 / 3


def test_layout_uses_nsd_paths(tmp_path):
    layout = NSDLayout(tmp_path)
    rel = lambda p: str(p.relative_to(tmp_path))  # noqa: E731
    assert rel(layout.timeseries(1, 1, 1)) == \
        "nsddata_timeseries/ppdata/subj01/func1pt8mm/timeseries/timeseries_session01_run01.nii.gz"
    assert rel(layout.design(8, 30, 12)) == \
        "nsddata_timeseries/ppdata/subj08/func1pt8mm/design/design_session30_run12.tsv"
    assert rel(layout.roi(2)) == "nsddata/ppdata/subj02/func1pt8mm/roi/nsdgeneral.nii.gz"
    assert rel(layout.betas(3, 7)) == \
        "nsddata_betas/ppdata/subj03/func1pt8mm/betas_fithrf_GLMdenoise_RR/betas_session07.nii.gz"
    assert rel(layout.expdesign()) == "nsddata/experiments/nsd/nsd_expdesign.mat"
    assert rel(layout.stimuli()) == "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5"
    assert rel(layout.mindeye_betas(5)) == "mindeyev2/betas_all_subj05_fp32_renorm.hdf5"


def test_expdesign_split_and_shared_test_set(tiny_world):
    root, summary, cfg = tiny_world
    design = ExpDesign.read(NSDLayout(root).expdesign())
    n_shared, n_unique = cfg.images.shared, cfg.images.unique_per_subject
    assert design.subject_images.shape == (8, n_shared + n_unique)
    assert design.trials_per_session == summary["trials_per_session"] == 90
    # Every subject's list starts with the same shared images, which are the test set; the rest are its own.
    np.testing.assert_array_equal(design.subject_images[:, :n_shared], np.tile(design.shared_images, (8, 1)))
    unique = design.subject_images[:, n_shared:]
    assert len(np.unique(unique)) == unique.size
    for subject in range(1, 9):
        trials = design.trials(subject, range(1, 6))
        assert len(trials) == 450
        np.testing.assert_array_equal(trials.is_test, np.isin(trials.image_id, design.shared_images))
        ids, counts = np.unique(trials.image_id, return_counts=True)
        assert (counts == 3).all() and len(ids) == n_shared + n_unique  # 3 repeats of each of its images
        assert trials.is_test.sum() == 3 * n_shared
    # The first session holds test images too, as NSD's does (the 1-hour fine-tuning set removes them).
    assert design.trials(8, [1]).is_test.any()


def test_timeseries_design_and_betas_read_back(tiny_world):
    root, summary, _ = tiny_world
    layout = NSDLayout(root)
    design = ExpDesign.read(layout.expdesign())
    n_volumes = summary["volumes_per_run"]
    for info in summary["subjects"]:
        subject = info["subject"]
        roi = read_roi(layout.roi(subject))
        brain = read_roi(layout.brainmask(subject), what="brain mask")
        assert roi.n_voxels == info["roi_voxels"] and tuple(roi.shape) == tuple(info["grid"])
        assert not (roi.mask_xyz & ~brain.mask_xyz).any()
        trials = design.trials(subject, range(1, info["sessions"] + 1))
        session, run = 1 + subject % info["sessions"], 1 + subject % design.runs_per_session
        ts = read_timeseries(layout.timeseries(subject, session, run), expected_tr=TR, expected_shape=roi.shape)
        assert ts.data_xyzt.dtype == np.int16 and ts.n_volumes == n_volumes == 73
        assert abs(ts.tr - TR) < 1e-4
        assert (ts.data_xyzt[~brain.mask_xyz] == 0).all() and ts.data_xyzt[brain.mask_xyz].mean() > 500
        # The design file marks each trial's onset volume (slot x 3 at TR 4/3 s) with its image.
        onsets = read_design(layout.design(subject, session, run), n_volumes=n_volumes)
        run_trials = trials.for_run(session, run)
        np.testing.assert_array_equal(np.flatnonzero(onsets >= 0), onset_volume(run_trials.slot, ts.tr))
        np.testing.assert_array_equal(onsets[onsets >= 0], run_trials.image_id)
        assert onsets[:9].max() == -1  # three lead blank slots: the first image comes 12 s in
        betas = read_betas(layout.betas(subject, session), roi)
        assert betas.shape == (90, roi.n_voxels) and betas.dtype == np.float32
        released = read_mindeye_betas(layout.mindeye_betas(subject), trials=trials.global_trial[trials.session == session],
                                      n_voxels=roi.n_voxels)
        # MindEye2's release is the same betas z-scored per session (up to NSD's int16 rounding).
        zscored = (betas - betas.mean(0)) / betas.std(0)
        np.testing.assert_allclose(released, zscored, atol=0.01)


def test_betas_follow_the_ground_truth(tiny_world):
    root, summary, _ = tiny_world
    # Median over signal voxels of corr(GLM beta, true trial response): betas are real estimates, not copies.
    fidelity = [s["beta_vs_trial_response_r"] for s in summary["subjects"]]
    assert 0.6 < min(fidelity) and max(fidelity) < 0.97


def test_stimuli_brick(tiny_world):
    root, summary, cfg = tiny_world
    brick = StimulusBrick(NSDLayout(root).stimuli())
    assert brick.shape == (summary["n_images"], cfg.image_size, cfg.image_size, 3)
    picked = brick[[5, 2, 5]]
    np.testing.assert_array_equal(picked[0], picked[2])
    with pytest.raises(IndexError, match="image ids must be in"):
        brick[[len(brick)]]


def test_mindeye_betas_any_order(tiny_world):
    root, _, _ = tiny_world
    path = NSDLayout(root).mindeye_betas(1)
    every = read_mindeye_betas(path)
    np.testing.assert_array_equal(read_mindeye_betas(path, trials=np.array([7, 3, 7])), every[[7, 3, 7]])
    with pytest.raises(FormatError, match="trial indices"):
        read_mindeye_betas(path, trials=np.array([len(every)]))


def test_nsd_int16_round_trip_within_half_a_step():
    pct = np.random.default_rng(6).uniform(-100, 100, size=10_000)
    stored = to_nsd_int16(pct)
    assert stored.dtype == np.int16
    assert np.abs(from_nsd_int16(stored, dtype=np.float64) - pct).max() <= 1 / 600
    with pytest.warns(RuntimeWarning, match="2 of 3 values lie beyond"):
        clipped = to_nsd_int16(np.array([200.0, -200.0, 1.0]))
    np.testing.assert_array_equal(clipped, [32767, -32768, 300])
    with pytest.raises(ValueError, match="NaN or inf"):
        to_nsd_int16(np.array([np.nan]))
    with pytest.raises(TypeError, match="expects int16"):
        from_nsd_int16(np.array([300], dtype=np.int32))


# -- errors: each names the file and what was wrong ---------------------------------------------

def test_missing_file_names_path_and_what(tmp_path):
    layout = NSDLayout(tmp_path)
    with pytest.raises(MissingFileError) as err:
        read_timeseries(layout.timeseries(1, 1, 1))
    assert "timeseries_session01_run01.nii.gz" in str(err.value) and "time series" in str(err.value)
    with pytest.raises(MissingFileError, match="nsd_expdesign.mat"):
        ExpDesign.read(layout.expdesign())
    with pytest.raises(MissingFileError, match="nsdgeneral ROI mask"):
        read_roi(layout.roi(3))


def test_bad_tr_is_reported(tmp_path):
    path = tmp_path / "ts.nii.gz"
    write_timeseries(path, np.zeros((4, 5, 6, 10), np.int16), np.eye(4), tr=2.0)
    with pytest.raises(FormatError) as err:
        read_timeseries(path, expected_tr=TR)
    assert "TR" in str(err.value) and "1.3333" in str(err.value) and "2.0000" in str(err.value)
    # A header in milliseconds is read as seconds.
    img = nib.Nifti1Image(np.zeros((4, 5, 6, 10), np.int16), np.eye(4))
    img.header.set_xyzt_units(xyz="mm", t="msec")
    img.header.set_zooms((1.0, 1.0, 1.0, 1333.3333))
    nib.save(img, tmp_path / "ms.nii.gz")
    assert abs(read_timeseries(tmp_path / "ms.nii.gz", expected_tr=TR).tr - TR) < 1e-4


def test_bad_shapes_are_reported(tiny_world, tmp_path):
    root, _, _ = tiny_world
    roi = read_roi(NSDLayout(root).roi(1))
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), np.int16), np.eye(4)), tmp_path / "3d.nii.gz")
    with pytest.raises(FormatError, match=r"should be 4D"):
        read_timeseries(tmp_path / "3d.nii.gz")
    write_timeseries(tmp_path / "grid.nii.gz", np.zeros((4, 5, 6, 3), np.int16), np.eye(4), tr=TR)
    with pytest.raises(FormatError, match=r"volume grid should be \(13, 16, 13\)"):
        read_timeseries(tmp_path / "grid.nii.gz", expected_shape=roi.shape)
    nib.save(nib.Nifti1Image(np.zeros(roi.shape + (3,), np.float32), roi.affine), tmp_path / "f32.nii.gz")
    with pytest.raises(FormatError, match="stored dtype should be int16, found float32"):
        read_betas(tmp_path / "f32.nii.gz", roi)
    np.savetxt(tmp_path / "design.tsv", np.zeros(70, int), fmt="%d")
    with pytest.raises(FormatError, match="number of rows should be 73 or 72"):
        read_design(tmp_path / "design.tsv", n_volumes=73)
    (tmp_path / "junk.tsv").write_text("1\nfoo\n")
    with pytest.raises(FormatError, match="one integer per row"):
        read_design(tmp_path / "junk.tsv")
    with h5py.File(tmp_path / "betas.hdf5", "w") as f:
        f["wrong"] = np.zeros((2, 2))
    with pytest.raises(FormatError, match="a dataset 'betas'"):
        read_mindeye_betas(tmp_path / "betas.hdf5")
    with h5py.File(tmp_path / "betas2.hdf5", "w") as f:
        f["betas"] = np.zeros((2, 5), np.float32)
    with pytest.raises(FormatError, match=f"voxels should be {roi.n_voxels}"):
        read_mindeye_betas(tmp_path / "betas2.hdf5", n_voxels=roi.n_voxels)


def test_expdesign_inconsistency_is_reported(tiny_world, tmp_path):
    root, _, _ = tiny_world
    design = ExpDesign.read(NSDLayout(root).expdesign())
    with pytest.raises(FormatError, match="masterordering length"):
        ExpDesign(design.subject_images, design.master_order[:-1], design.shared_images, design.stim_pattern)
    pattern = design.stim_pattern.copy()
    pattern[0, 0, 0] = True  # an extra trial in session 1 only
    with pytest.raises(FormatError, match="same number of trials in every session"):
        ExpDesign(design.subject_images, design.master_order, design.shared_images, pattern)


def test_design_one_row_short_reads_with_no_event_at_the_last_volume(tmp_path, caplog):
    """NSD's manual: 225 design rows for 226 volumes. Both lengths read alike; a note says which it was."""
    ids = np.zeros(73, int)
    ids[[9, 30]] = [5, 7]
    np.savetxt(tmp_path / "full.tsv", ids, fmt="%d")
    np.savetxt(tmp_path / "short.tsv", ids[:-1], fmt="%d")
    with caplog.at_level(logging.INFO, logger="mindeye.nsd.files"):
        full = read_design(tmp_path / "full.tsv", n_volumes=73)
        assert "rows for" not in caplog.text
        short = read_design(tmp_path / "short.tsv", n_volumes=73)
    assert "72 rows for 73 volumes" in caplog.text and "short.tsv" in caplog.text
    np.testing.assert_array_equal(short, full)
    assert len(short) == 73 and short[-1] == -1 and list(np.flatnonzero(short >= 0)) == [9, 30]
    np.savetxt(tmp_path / "shorter.tsv", ids[:-2], fmt="%d")
    with pytest.raises(FormatError, match="number of rows should be 73 or 72"):
        read_design(tmp_path / "shorter.tsv", n_volumes=73)


def test_expdesign_stored_as_doubles_reads_and_non_integral_is_refused(tiny_world, tmp_path):
    root, _, _ = tiny_world
    design = ExpDesign.read(NSDLayout(root).expdesign())
    design.write(tmp_path / "doubles.mat", doubles=True)
    assert scipy.io.loadmat(tmp_path / "doubles.mat")["masterordering"].dtype == np.float64  # as MATLAB writes it
    again = ExpDesign.read(tmp_path / "doubles.mat")
    for name in ("subject_images", "master_order", "shared_images", "stim_pattern"):
        np.testing.assert_array_equal(getattr(again, name), getattr(design, name))
        assert getattr(again, name).dtype == getattr(design, name).dtype
    raw = {k: v.astype(np.float64) for k, v in read_expdesign_arrays(tmp_path / "doubles.mat").items()}
    raw["masterordering"][0, 3] += 0.5
    write_expdesign_arrays(tmp_path / "bad.mat", raw)
    with pytest.raises(FormatError, match=r"bad.mat: 'masterordering' should be integral values .*1 non-integral"):
        ExpDesign.read(tmp_path / "bad.mat")
