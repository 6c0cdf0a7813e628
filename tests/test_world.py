"""The synthetic world: deterministic, tunable, learnable and not trivial."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import scipy.io
from omegaconf import OmegaConf

from mindeye.config import load_config
from mindeye.nsd import ExpDesign, NSDLayout, read_betas, read_design, read_roi, read_timeseries, task_runs
from simulators.world.anatomy import make_anatomy
from simulators.world.design import make_design
from simulators.world.encoding import shared_code
from simulators.world.generate import generate_world
from simulators.world.learnability import check_learnability


def test_components_are_deterministic_from_the_seed():
    cfg = load_config("world_generate").world
    a, b = make_design(cfg, np.random.default_rng(1)), make_design(cfg, np.random.default_rng(1))
    np.testing.assert_array_equal(a.master_order, b.master_order)
    np.testing.assert_array_equal(a.stim_pattern, b.stim_pattern)
    assert not np.array_equal(a.master_order, make_design(cfg, np.random.default_rng(2)).master_order)
    np.testing.assert_array_equal(make_anatomy(3, cfg.brain, np.random.default_rng(0)).roi_xyz,
                                  make_anatomy(3, cfg.brain, np.random.default_rng(0)).roi_xyz)


def test_subjects_differ_in_grid_and_voxels(tiny_world):
    _, summary, _ = tiny_world
    subjects = summary["subjects"]
    assert len({tuple(s["grid"]) for s in subjects}) >= 4
    assert len({s["roi_voxels"] for s in subjects}) == 8
    # Voxel counts keep NSD's order: subject 6 has the most nsdgeneral voxels, subject 7 the fewest.
    counts = [s["roi_voxels"] for s in subjects]
    assert np.argmax(counts) == 5 and np.argmin(counts) == 6


def test_code_nonlinearity_is_a_real_knob():
    """At nonlinearity 0 the code is a rotation of the tokens' principal components (linear in
    the tokens); at 1 a linear read-out of the tokens explains much less of it."""
    cfg = load_config("world_generate").world
    tokens = np.random.default_rng(0).standard_normal((400, 16, 8))
    tokens[:, :, :4] *= 5  # a few dominant directions, as real tokens have

    def linear_r2(nonlinearity: float) -> float:
        code = shared_code(tokens, OmegaConf.merge(cfg.code, {"nonlinearity": nonlinearity, "dim": 8}),
                           np.random.default_rng(0))
        x = np.c_[tokens.reshape(400, -1), np.ones(400)]
        fit = x @ np.linalg.lstsq(x[:300], code[:300], rcond=None)[0]
        return 1 - ((fit[300:] - code[300:]) ** 2).sum() / ((code[300:] - code[300:].mean(0)) ** 2).sum()

    assert linear_r2(0.0) > 0.95
    assert linear_r2(1.0) < 0.7


def _one_subject_world(tmp_path, name: str, *overrides: str) -> dict:
    cfg = load_config("world_generate", ["world.n_subjects=1", "world.images.unique_per_subject=50",
                                          "world.images.shared=10", "world.sessions_per_subject=[2]",
                                          *overrides]).world
    return generate_world(cfg, tmp_path / name, progress=False)["subjects"][0]


def test_noise_knobs_act_where_they_should(tmp_path):
    """Trial noise lowers how much of the image response betas carry, not how well the GLM recovers
    each trial; scanner (time-series) noise lowers the GLM's recovery."""
    base = _one_subject_world(tmp_path, "base")
    trial_noisy = _one_subject_world(tmp_path, "trial", "world.snr.trial_noise_pct=4.0")
    scanner_noisy = _one_subject_world(tmp_path, "scanner", "world.snr.ts_noise_pct=4.0")
    assert trial_noisy["beta_vs_image_response_r"] < base["beta_vs_image_response_r"] - 0.2
    assert trial_noisy["beta_vs_trial_response_r"] > base["beta_vs_trial_response_r"] - 0.05
    assert scanner_noisy["beta_vs_trial_response_r"] < base["beta_vs_trial_response_r"] - 0.2


def test_existing_world_is_reused_and_a_different_one_refused(tiny_world):
    root, summary, cfg = tiny_world
    before = (root / "ground_truth/world.json").stat().st_mtime_ns
    assert generate_world(cfg, root, progress=False) == summary
    assert (root / "ground_truth/world.json").stat().st_mtime_ns == before
    other = cfg.copy()
    other.seed = 1
    with pytest.raises(FileExistsError, match="another config"):
        generate_world(other, root, progress=False)


def test_world_is_learnable_and_not_trivial(tiny_world):
    """Ridge from betas to CLIP tokens retrieves test images far above chance, yet clearly below
    what the noiseless ground-truth responses allow (averaged over the 8 subjects)."""
    root, _, _ = tiny_world
    reports = [check_learnability(root, subject) for subject in range(1, 9)]
    chance = reports[0].chance
    ridge = np.mean([(r.image_top1 + r.brain_top1) / 2 for r in reports])
    ceiling = np.mean([(r.ceiling_image_top1 + r.ceiling_brain_top1) / 2 for r in reports])
    assert chance == pytest.approx(1 / 30)
    assert ridge > 6 * chance, f"ridge top-1 {ridge:.1%} vs chance {chance:.1%}"
    assert ceiling > ridge + 0.1, f"ceiling {ceiling:.1%} vs ridge {ridge:.1%}"
    assert ceiling < 0.98  # the ground truth itself is not trivially decodable


def test_world_json_records_what_made_it(tiny_world):
    root, summary, cfg = tiny_world
    saved = json.loads((root / "ground_truth/world.json").read_text())
    assert saved["config"]["seed"] == cfg.seed and saved["config"]["clip"]["name"] == "tiny_vit"
    assert saved["clip_tokens"] == [16, 64]


def test_world_help_explains_the_command():
    out = subprocess.run([sys.executable, "-m", "simulators.world.generate", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "synthetic NSD world" in out and "world: tiny | small" in out and "overwrite" in out


def test_generation_is_deterministic(tmp_path):
    """Two generations from one config hold the same data, file by file (decoded: gzip stamps times)."""
    import h5py
    import nibabel as nib

    summaries = [_one_subject_world(tmp_path, name) for name in ("a", "b")]
    assert summaries[0] == summaries[1]
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) > 20
    for rel in files:
        a, b = tmp_path / "a" / rel, tmp_path / "b" / rel
        if rel.name.endswith(".nii.gz"):
            np.testing.assert_array_equal(np.asanyarray(nib.load(a).dataobj), np.asanyarray(nib.load(b).dataobj))
        elif rel.suffix == ".hdf5":
            with h5py.File(a) as fa, h5py.File(b) as fb:
                assert sorted(fa) == sorted(fb)
                for key in fa:
                    np.testing.assert_array_equal(fa[key][()], fb[key][()])
        elif rel.suffix == ".mat":
            import scipy.io

            ma, mb = scipy.io.loadmat(a), scipy.io.loadmat(b)
            for key in ("subjectim", "masterordering", "sharedix", "stimpattern"):
                np.testing.assert_array_equal(ma[key], mb[key])
        else:
            assert a.read_bytes() == b.read_bytes(), rel


def test_irregular_world_writes_nsds_irregular_files(irregular_world):
    """Rest runs first and last (all-zero design), design files one row short, the expdesign as doubles,
    a subject with fewer sessions; the readers map the design's run k to the k-th task run file."""
    root, summary, _ = irregular_world
    layout = NSDLayout(root)
    assert scipy.io.loadmat(layout.expdesign())["subjectim"].dtype == np.float64
    design = ExpDesign.read(layout.expdesign())
    runs, n_volumes = design.runs_per_session, summary["volumes_per_run"]
    assert [s["sessions"] for s in summary["subjects"]] == [2, 1]
    assert task_runs(layout, 1, 1) == task_runs(layout, 2, 1) == list(range(1, runs + 1))
    assert task_runs(layout, 1, 2) == list(range(2, runs + 2))  # NSD: runs 2-13 of 14
    assert not layout.design(1, 2, runs + 3).is_file()
    for rest in (1, runs + 2):
        assert read_timeseries(layout.timeseries(1, 2, rest)).n_volumes == n_volumes
        assert (read_design(layout.design(1, 2, rest), n_volumes) == -1).all()
    trials = design.trials(1, [2])
    for k, file_run in enumerate(task_runs(layout, 1, 2), start=1):
        assert len(np.loadtxt(layout.design(1, 2, file_run))) == n_volumes - 1
        onsets = read_design(layout.design(1, 2, file_run), n_volumes)
        np.testing.assert_array_equal(onsets[onsets >= 0], trials.for_run(2, k).image_id)
    assert read_betas(layout.betas(1, 2), read_roi(layout.roi(1))).shape[0] == design.trials_per_session
    seen = design.trials(2, [1]).image_id  # subject 2's one session of two
    assert min((seen == image).sum() for image in design.shared_images) < 3
