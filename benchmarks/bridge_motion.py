"""The bridge's motion correction on the synthetic world with injected head motion: parameter error, betas
after correction against betas of the motion-free run, and the per-volume cost at NSD size on one core.

1. Motion recovery (`--world`, default the small world, subject 1). The calibration reference is the mean
   of session 1's run 1 (realtime.bridge.registration.CalibrationReference). Today's session is the
   world's last; its motion-free run (`--run`) is what NSD's preprocessed files hold, in the model grid.
   The scanner sees that head moved by simulators/replay/head_motion.py (scipy, no code shared with the
   SimpleITK estimator): a session offset, a drift, jerks up to `--jerk-mm` / `--jerk-deg` (spikes that
   return and jerks that stay), and a per-volume wobble; the scanner's grid is the model grid padded by
   `--pad` voxels a side, as a scanner's field of view holds the whole head. The bridge's path then runs
   volume by volume: the session alignment on today's first volume, then MotionCorrector.correct.
   Reported: error of the session offset and of each volume's parameters (median, max); the error that
   matters, how far each ROI voxel's centre is sent from where it should be (the estimated against the
   true composed transform), median and max over volumes of the ROI's mean and max.
2. Betas: the reference single-trial GLM (mindeye.glm.fit_lsa, canonical HRF, Legendre drift) on the ROI
   voxels of (a) the motion-free run, (b) the corrected run, (c) the uncorrected run (the scanner's
   volumes cropped to the model grid, as if nobody corrected), (d) the true motion undone with one linear
   resampling (scipy), and (e) with one cubic one: ceilings for (b), what interpolation alone costs. (b) is
   the bridge's default, cubic B-spline at the ROI's voxels; (b') is linear everywhere. Correlation over
   ROI voxels per trial with (a): median and 5th percentile.
3. Cost at NSD size (81 x 104 x 83, 1.8 mm): the world's anatomy generator makes subject 1's brain in
   NSD's grid (30 % of the grid), moved along the same kind of trajectory for `--nsd-volumes` volumes with
   1 % noise; SimpleITK and BLAS limited to one thread. Per volume, by stage (register, resample, total):
   median and 95th percentile. Times are this machine's under its load (printed); compare to the TR.

4. With --checkpoint (a model trained on --retrieval-world, default the tiny world): single-trial top-1
   retrieval among the shared images, from the service's live GLM (realtime.glm, configs/glm/live.yaml)
   fed the motion-free, the corrected and the uncorrected volumes of every session (each session its own
   offset and motion; shared images are never trained on), decoded by the checkpoint's model.

    .venv/bin/python benchmarks/bridge_motion.py [--world data/world/small] [--run 1] [--nsd-volumes 80]
        [--checkpoint runs/demo/tiny-subj1-e100-lr0.001/checkpoint]
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import affine_transform, gaussian_filter
from threadpoolctl import threadpool_limits

from mindeye.glm import drift_basis, fit_lsa, trial_regressors
from mindeye.motion import rigid_matrix, volume_centre_mm
from mindeye.nsd import NSDLayout, read_design, read_roi, read_timeseries
from mindeye.nsd.design import IMAGE_SECONDS
from realtime.bridge.registration import CalibrationReference, MotionCorrector, SessionAlignment
from simulators.replay.head_motion import HeadMotion, MotionSpec, move_volume
from simulators.world.anatomy import NSD_GRIDS, make_anatomy


def padded_grid(shape, affine, pad: int):
    """(shape, affine) of the grid `shape` grown by `pad` voxels on every side (same voxels, same centre)."""
    affine = np.asarray(affine, dtype=float).copy()
    affine[:3, 3] -= affine[:3, :3] @ np.full(3, pad)
    return tuple(n + 2 * pad for n in shape), affine


def resample(volume_xyz, from_affine, to_shape, to_affine, world_44=np.eye(4), order=1) -> np.ndarray:
    """`volume_xyz` sampled on the `to` grid at world_44(x) (scipy): the model-grid volume of a head moved by
    world_44."""
    voxel_44 = np.linalg.inv(from_affine) @ world_44 @ to_affine
    return affine_transform(volume_xyz, voxel_44[:3, :3], voxel_44[:3, 3], output_shape=to_shape, order=order)


def motion_spec(args) -> MotionSpec:
    return MotionSpec(drift_mm_per_min=0.5, drift_deg_per_min=0.5, jerks_per_min=args.jerks_per_min,
                      jerk_max_mm=args.jerk_mm, jerk_max_deg=args.jerk_deg, session_offset_mm=args.offset_mm,
                      session_offset_deg=args.offset_deg, wobble=True)


def correct_run(scanner_xyzt, scanner_affine, reference: CalibrationReference, roi_xyz=None):
    """The bridge's path over one run: (alignment, corrected (T, X, Y, Z) in the model grid, params (T, 6),
    timings (T,) of dicts); cubic interpolation at `roi_xyz`'s voxels if given."""
    alignment = SessionAlignment.create(scanner_xyzt[..., 0], scanner_affine, reference)
    corrector = MotionCorrector(alignment.reference_xyz, alignment.reference_affine, reference.volume_xyz.shape,
                                reference.affine, alignment, roi_xyz=roi_xyz)
    outputs = [corrector.correct(scanner_xyzt[..., t], scanner_affine) for t in range(scanner_xyzt.shape[3])]
    return (alignment, np.stack([o.data_xyz for o in outputs]), np.stack([o.params_6 for o in outputs]),
            [o.timings_ms for o in outputs])


def voxel_error_mm(true_44s, estimated_44s, points_n3) -> np.ndarray:
    """(T, 2) mean and max over points of |true(p) - estimated(p)| per volume."""
    points_n4 = np.c_[points_n3, np.ones(len(points_n3))]
    errors = [np.linalg.norm((points_n4 @ (t - e).T)[:, :3], axis=1) for t, e in zip(true_44s, estimated_44s)]
    return np.array([[e.mean(), e.max()] for e in errors])


def corr_per_trial(a_nv, b_nv) -> np.ndarray:
    a_nv = a_nv - a_nv.mean(1, keepdims=True)
    b_nv = b_nv - b_nv.mean(1, keepdims=True)
    return (a_nv * b_nv).sum(1) / np.sqrt((a_nv ** 2).sum(1) * (b_nv ** 2).sum(1))


def summary(values) -> str:
    return f"median {np.median(values):.3f}, 5th pct {np.percentile(values, 5):.3f}"


def world_recovery(args) -> None:
    layout = NSDLayout(args.world)
    roi = read_roi(layout.roi(args.subject))
    reference = CalibrationReference.make(layout.root, args.subject, session=1)
    session = max(s for s in range(1, 100) if layout.timeseries(args.subject, s, args.run).is_file())
    series = read_timeseries(layout.timeseries(args.subject, session, args.run))
    clean_xyzt = np.asarray(series.data_xyzt, dtype=np.float32)
    n_volumes = series.n_volumes
    scanner_shape, scanner_affine = padded_grid(roi.shape, series.affine, args.pad)
    centre_mm = volume_centre_mm(scanner_shape, scanner_affine)  # the model grid's centre too
    trajectory = HeadMotion(motion_spec(args), centre_mm, seed=args.seed).next_volumes(n_volumes, series.tr)
    padded_xyzt = np.pad(clean_xyzt, [(args.pad, args.pad)] * 3 + [(0, 0)])
    scanner_xyzt = np.stack([move_volume(padded_xyzt[..., t], scanner_affine, trajectory.calibration_t6[t])
                             for t in range(n_volumes)], axis=-1)
    print(f"(1) world {args.world}, subject {args.subject}: model grid {roi.shape} (ROI {roi.n_voxels} voxels), "
          f"scanner grid {scanner_shape}; calibration reference: mean of session 1 run 1; today: session "
          f"{session} run {args.run}, {n_volumes} volumes at TR {series.tr:.3f} s")
    within_t6 = trajectory.within_t6
    print(f"    injected: session offset {np.linalg.norm(trajectory.session_offset_6[:3]):.2f} mm / "
          f"{np.rad2deg(np.linalg.norm(trajectory.session_offset_6[3:])):.2f} deg; within the run up to "
          f"{np.abs(within_t6[:, :3]).max():.2f} mm / {np.rad2deg(np.abs(within_t6[:, 3:])).max():.2f} deg a "
          f"parameter, framewise displacement max {_fd_max(within_t6):.2f} mm")

    started = time.perf_counter()
    alignment, corrected_txyz, params_t6, _ = correct_run(scanner_xyzt, scanner_affine, reference, roi.mask_xyz)
    print(f"    bridge path over the run: {time.perf_counter() - started:.1f} s")
    linear_txyz = correct_run(scanner_xyzt, scanner_affine, reference)[1]
    offset_error_6 = alignment.params_6 - trajectory.session_offset_6
    error_t6 = params_t6 - within_t6
    print(f"    session offset error: {np.abs(offset_error_6[:3]).max():.3f} mm, "
          f"{np.rad2deg(np.abs(offset_error_6[3:])).max():.3f} deg (largest parameter)")
    print(f"    per-volume parameter error, translations (mm): median {np.median(np.abs(error_t6[:, :3])):.3f}, "
          f"max {np.abs(error_t6[:, :3]).max():.3f}; rotations (deg): median "
          f"{np.rad2deg(np.median(np.abs(error_t6[:, 3:]))):.3f}, max {np.rad2deg(np.abs(error_t6[:, 3:]).max()):.3f}")
    true_44s = [rigid_matrix(p, centre_mm) for p in trajectory.calibration_t6]
    estimated_44s = [rigid_matrix(p, centre_mm) @ alignment.matrix() for p in params_t6]
    roi_points_n3 = (roi.affine @ np.c_[np.argwhere(roi.mask_xyz), np.ones(roi.n_voxels)].T).T[:, :3]
    error_t2 = voxel_error_mm(true_44s, estimated_44s, roi_points_n3)
    print(f"    ROI voxels sent astray (offset and motion composed), mm: mean over the ROI, median over volumes "
          f"{np.median(error_t2[:, 0]):.3f} (max {error_t2[:, 0].max():.3f}); worst voxel, median "
          f"{np.median(error_t2[:, 1]):.3f} (max {error_t2[:, 1].max():.3f})")

    uncorrected_txyz = scanner_xyzt[args.pad:-args.pad, args.pad:-args.pad, args.pad:-args.pad].transpose(3, 0, 1, 2)
    oracle_txyz = np.stack([resample(scanner_xyzt[..., t], scanner_affine, roi.shape, roi.affine, true_44s[t])
                            for t in range(n_volumes)])
    oracle3_txyz = np.stack([resample(scanner_xyzt[..., t], scanner_affine, roi.shape, roi.affine, true_44s[t], order=3)
                            for t in range(n_volumes)])
    design_t = read_design(layout.design(args.subject, session, args.run), n_volumes)
    onsets_s = np.flatnonzero(design_t >= 0) * series.tr
    regressors_tn = trial_regressors(onsets_s, IMAGE_SECONDS, n_volumes, series.tr)
    nuisance_tk = drift_basis(n_volumes, series.tr)

    def betas(volumes_txyz) -> np.ndarray:
        ts_tv = volumes_txyz[:, roi.mask_xyz].astype(np.float64)
        return fit_lsa(ts_tv, regressors_tn, nuisance_tk).betas_nv  # raw units: no baseline division near 0

    clean_nv = betas(clean_xyzt.transpose(3, 0, 1, 2))
    print(f"(2) betas ({len(onsets_s)} trials, ROI voxels), correlation per trial with the motion-free run's:")
    for name, volumes_txyz in (("corrected by the bridge (cubic in the ROI)", corrected_txyz),
                               ("corrected, linear resampling everywhere", linear_txyz),
                               ("not corrected", uncorrected_txyz),
                               ("true motion undone, one linear resampling", oracle_txyz),
                               ("true motion undone, one cubic resampling", oracle3_txyz)):
        print(f"    {name + ':':44s} {summary(corr_per_trial(betas(volumes_txyz), clean_nv))}")


def nsd_cost(args) -> None:
    brain_cfg = SimpleNamespace(roi_scale=1.0, brain_per_roi=0.3 * np.prod(NSD_GRIDS[0]) / 15724,
                                grid_per_brain=1 / 0.3, voxel_mm=1.8)
    rng = np.random.default_rng(args.seed)
    anatomy = make_anatomy(1, brain_cfg, rng)
    smooth_xyz = gaussian_filter(rng.standard_normal(anatomy.shape), sigma=2.0)
    head_xyz = (1000 * anatomy.brain_xyz * (1 + 0.1 * smooth_xyz / smooth_xyz.std())).astype(np.float32)
    reference = CalibrationReference(head_xyz, anatomy.affine, subject=1, source="NSD-size synthetic head")
    centre_mm = volume_centre_mm(anatomy.shape, anatomy.affine)
    trajectory = HeadMotion(motion_spec(args), centre_mm, seed=args.seed).next_volumes(args.nsd_volumes, 4 / 3)
    scanner_xyzt = np.stack([move_volume(head_xyz, anatomy.affine, p) + rng.normal(0, 10, anatomy.shape)
                             for p in trajectory.calibration_t6], axis=-1).astype(np.float32)
    _, _, params_t6, timings = correct_run(scanner_xyzt, anatomy.affine, reference, anatomy.roi_xyz)
    error_t6 = params_t6 - trajectory.within_t6
    print(f"(3) NSD size {anatomy.shape} (ROI {anatomy.roi_xyz.sum()} voxels, cubic), {args.nsd_volumes} volumes, "
          "one thread; ms per volume:")
    for stage in ("register", "resample"):
        ms = np.array([t[stage] for t in timings])
        print(f"    {stage:9s} median {np.median(ms):7.1f}, p95 {np.percentile(ms, 95):7.1f}")
    total_ms = np.array([sum(t.values()) for t in timings])
    print(f"    {'total':9s} median {np.median(total_ms):7.1f}, p95 {np.percentile(total_ms, 95):7.1f} "
          f"(TR 1333 ms: {np.percentile(total_ms, 95) / 1333:.0%} of it at p95)")
    print(f"    parameter error at this size: translations max {np.abs(error_t6[:, :3]).max():.3f} mm, rotations max "
          f"{np.rad2deg(np.abs(error_t6[:, 3:]).max()):.3f} deg")


def live_retrieval(args) -> None:
    """Single-trial top-1 retrieval among the shared images, from the service's live GLM betas of the
    motion-free, the corrected and the uncorrected runs of every session (shared images are never trained on)."""
    import torch

    from mindeye.config import load_config
    from mindeye.models import load_calibration, load_checkpoint
    from mindeye.nsd import ExpDesign
    from mindeye.targets import build_target_cache

    root = args.retrieval_world.resolve()
    cfg = load_config("realtime", [f"bundle={args.checkpoint}", f"data.root={root}"])  # its data and glm groups
    layout = NSDLayout(root)
    roi = read_roi(layout.roi(args.subject))
    shared_ids = ExpDesign.read(layout.expdesign()).shared_images
    shared_tokens_nf = build_target_cache(cfg.data).get(shared_ids)[0].reshape(len(shared_ids), -1)
    model = load_checkpoint(args.checkpoint)
    mean_v, std_v = load_calibration(args.checkpoint)[f"subj{args.subject:02d}"]
    reference = CalibrationReference.make(root, args.subject, session=1)
    scanner_shape, scanner_affine = padded_grid(roi.shape, roi.affine, args.pad)
    centre_mm = volume_centre_mm(scanner_shape, scanner_affine)
    betas = {"motion-free": [], "corrected by the bridge": [], "not corrected": []}
    image_ids, session = [], 1
    while layout.timeseries(args.subject, session, 1).is_file():
        runs = []
        while layout.timeseries(args.subject, session, len(runs) + 1).is_file():
            runs.append(read_timeseries(layout.timeseries(args.subject, session, len(runs) + 1)))
        clean_xyzt = np.concatenate([np.asarray(r.data_xyzt, dtype=np.float32) for r in runs], axis=-1)
        # one session: its own offset, the head moving on from run to run, one alignment, one corrector
        trajectory = HeadMotion(motion_spec(args), centre_mm, seed=args.seed + session).next_volumes(
            clean_xyzt.shape[-1], runs[0].tr)
        padded_xyzt = np.pad(clean_xyzt, [(args.pad, args.pad)] * 3 + [(0, 0)])
        scanner_xyzt = np.stack([move_volume(padded_xyzt[..., t], scanner_affine, trajectory.calibration_t6[t])
                                 for t in range(clean_xyzt.shape[-1])], axis=-1)
        versions = {"motion-free": clean_xyzt.transpose(3, 0, 1, 2),
                    "corrected by the bridge": correct_run(scanner_xyzt, scanner_affine, reference, roi.mask_xyz)[1],
                    "not corrected": scanner_xyzt[args.pad:-args.pad, args.pad:-args.pad, args.pad:-args.pad]
                    .transpose(3, 0, 1, 2)}
        first = 0
        for run, series in enumerate(runs, start=1):
            design_t = read_design(layout.design(args.subject, session, run), series.n_volumes)
            image_ids += design_t[design_t >= 0].tolist()
            for name, volumes_txyz in versions.items():
                betas[name] += live_betas(volumes_txyz[first:first + series.n_volumes][:, roi.mask_xyz], design_t,
                                          series.tr, cfg.glm)
            first += series.n_volumes
        session += 1
    image_ids = np.array(image_ids)
    test = np.isin(image_ids, shared_ids)
    print(f"(4) live top-1 retrieval among the {len(shared_ids)} shared images ({args.retrieval_world}, sessions "
          f"1-{session - 1}, {int(test.sum())} test trials; checkpoint {args.checkpoint}; chance "
          f"{1 / len(shared_ids):.3f}; +- binomial s.e.), betas from the service's live GLM:")
    for name, rows in betas.items():
        betas_nv = np.stack(rows)[test]
        with torch.inference_mode():
            tokens_nf = model(torch.from_numpy(((betas_nv - mean_v) / std_v).astype(np.float32)),
                              f"subj{args.subject:02d}").retrieval_tokens.numpy().reshape(len(betas_nv), -1)
        hits = shared_ids[(_unit(tokens_nf) @ _unit(shared_tokens_nf).T).argmax(1)] == image_ids[test]
        print(f"    {name + ':':26s} {hits.mean():.3f} +- {np.sqrt(hits.mean() * (1 - hits.mean()) / len(hits)):.3f} "
              f"({hits.sum()}/{len(hits)})")


def live_betas(volumes_tv: np.ndarray, design_t: np.ndarray, tr: float, glm_settings) -> list[np.ndarray]:
    """(V,) percent-signal-change betas of a run's trials in onset order, from the service's incremental GLM fed
    volume by volume (NaN where one was unestimable)."""
    from realtime.glm import IncrementalGLM, OnlineGLMSettings

    glm = IncrementalGLM(volumes_tv.shape[1], OnlineGLMSettings(tr, **glm_settings))
    for trial, volume in enumerate(np.flatnonzero(design_t >= 0)):
        glm.add_trial(trial, float(volume * tr))
    reports = [r for t, values_v in enumerate(volumes_tv) for r in glm.add_volume(t, values_v)] + glm.finish()
    return [r.beta_pct_v if r.beta_pct_v is not None else np.full(volumes_tv.shape[1], np.nan)
            for r in sorted(reports, key=lambda r: r.trial_id)]


def _unit(rows_nf: np.ndarray) -> np.ndarray:
    return rows_nf / np.linalg.norm(rows_nf, axis=1, keepdims=True)


def _fd_max(params_t6) -> float:
    from mindeye.motion import framewise_displacement

    return float(framewise_displacement(params_t6).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=Path, default=Path("data/world/small"), help="an NSD-layout world")
    parser.add_argument("--subject", type=int, default=1)
    parser.add_argument("--run", type=int, default=1, help="run of the world's last session used as today's")
    parser.add_argument("--pad", type=int, default=4, help="voxels the scanner's grid adds on each side")
    parser.add_argument("--offset-mm", type=float, default=3.0, help="session offset's translation")
    parser.add_argument("--offset-deg", type=float, default=3.0, help="session offset's rotation")
    parser.add_argument("--jerk-mm", type=float, default=3.0)
    parser.add_argument("--jerk-deg", type=float, default=3.0)
    parser.add_argument("--jerks-per-min", type=float, default=2.0)
    parser.add_argument("--nsd-volumes", type=int, default=80, help="volumes timed at NSD size (0: skip)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="a trained checkpoint of --retrieval-world: adds live top-1 retrieval (section 4)")
    parser.add_argument("--retrieval-world", type=Path, default=Path("data/world/tiny"),
                        help="the world the checkpoint was trained on; its last session is held out")
    args = parser.parse_args()
    print(f"uptime: {os.popen('uptime').read().strip()}")
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    with threadpool_limits(limits=1):
        world_recovery(args)
        if args.nsd_volumes:
            nsd_cost(args)
        if args.checkpoint is not None:
            live_retrieval(args)


if __name__ == "__main__":
    main()
