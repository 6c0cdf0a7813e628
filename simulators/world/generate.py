"""Generate the synthetic NSD world: an NSD-layout dataset for 8 subjects with a known ground truth.

Writes, under `out_dir`, the very files NSD has (experiment design, stimuli, ROI masks,
pre-processed time series, per-run design files, single-trial betas, MindEye2's hdf5 betas)
and, beside them in `ground_truth/`, what made them (CLIP tokens, the shared code, each
subject's encoding maps and true responses). Deterministic from `world.seed`.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

from mindeye.cli import command
from mindeye.errors import OutDirInUse

if TYPE_CHECKING:
    import numpy as np

    from mindeye.nsd import NSDLayout

WORLD_FORMAT_VERSION = 1
log = logging.getLogger(__name__)


def config_hash(world_cfg) -> str:
    resolved = OmegaConf.to_container(world_cfg, resolve=True) if isinstance(world_cfg, DictConfig) else world_cfg
    return hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()[:16]


def generate_world(world_cfg, out_dir: Path, *, overwrite: bool = False, progress: bool = True) -> dict:
    """Write the world to `out_dir` and return its summary (also saved as ground_truth/world.json).

    An existing world made from the same config is reused; one from another config is an
    error unless `overwrite`.
    """
    # numpy, h5py, scipy, the CLIP encoder (torch) load here, not when mindeye-world answers --help
    import h5py
    import numpy as np
    from tqdm.auto import tqdm

    from mindeye.clip import build_clip_embedder
    from mindeye.nsd import NSDLayout
    from mindeye.nsd.files import write_stimuli
    from mindeye.scenes import render_stimuli
    from simulators.world.design import make_design, volumes_per_run
    from simulators.world.encoding import shared_code

    out_dir = Path(out_dir)
    summary_path = out_dir / "ground_truth" / "world.json"
    if summary_path.is_file():
        existing = json.loads(summary_path.read_text())
        if existing.get("config_hash") == config_hash(world_cfg) and not overwrite:
            log.info("world %s already generated from this config: %s", world_cfg.name, out_dir)
            return existing
        if not overwrite:
            raise OutDirInUse(f"{out_dir} holds a world made from another config; pass overwrite=true "
                              f"or choose another out_dir")

    seeds = np.random.SeedSequence(world_cfg.seed).spawn(4)
    design_rng, code_rng = np.random.default_rng(seeds[0]), np.random.default_rng(seeds[1])
    layout = NSDLayout(out_dir)
    truth_dir = out_dir / "ground_truth"
    truth_dir.mkdir(parents=True, exist_ok=True)

    design = make_design(world_cfg, design_rng)
    design.write(layout.expdesign(), doubles=irregular(world_cfg).get("expdesign_doubles", False))
    n_images = int(design.subject_images.max()) + 1
    images = render_stimuli(n_images, world_cfg.image_size, seed=world_cfg.seed, progress=progress)
    write_stimuli(layout.stimuli(), images)

    embedder = build_clip_embedder(world_cfg.clip)
    tokens_nld = embedder.embed_array(images, progress=progress)
    code_nk = shared_code(tokens_nld, world_cfg.code, code_rng)
    with h5py.File(truth_dir / "image_tokens.hdf5", "w") as f:
        f.create_dataset("tokens", data=tokens_nld)
        f.attrs["clip"] = json.dumps(OmegaConf.to_container(world_cfg.clip, resolve=True))
    with h5py.File(truth_dir / "code.hdf5", "w") as f:
        f.create_dataset("code", data=code_nk.astype(np.float32))

    subjects = []
    subject_seeds = seeds[2].spawn(world_cfg.n_subjects)
    for subject in tqdm(range(1, world_cfg.n_subjects + 1), desc="subjects", disable=not progress):
        rng = np.random.default_rng(subject_seeds[subject - 1])
        subjects.append(_generate_subject(world_cfg, subject, design, code_nk, layout, truth_dir, rng, progress))

    summary = {"format_version": WORLD_FORMAT_VERSION, "name": world_cfg.name, "config_hash": config_hash(world_cfg),
               "config": OmegaConf.to_container(world_cfg, resolve=True), "tr": world_cfg.tr,
               "n_images": n_images, "n_shared_images": int(len(design.shared_images)),
               "trials_per_session": design.trials_per_session, "volumes_per_run": volumes_per_run(world_cfg),
               "clip_tokens": [embedder.n_tokens, embedder.dim], "subjects": subjects}
    summary_path.write_text(json.dumps(summary, indent=2))
    return summary


def irregular(world_cfg) -> dict:
    """The world's `irregular` options (absent: none, and the config hash of older worlds is kept):
    `rest_run_sessions` (sessions with an all-zero-design rest run first and last, as NSD's 14-run
    sessions), `short_design` (design files one row short, as NSD's manual describes them) and
    `expdesign_doubles` (nsd_expdesign.mat stored as MATLAB doubles)."""
    options = world_cfg.get("irregular")
    return {} if options is None else dict(options)


def _generate_subject(cfg, subject: int, design, code_nk, layout: NSDLayout, truth_dir: Path,
                      rng: np.random.Generator, progress: bool) -> dict:
    import h5py
    import numpy as np
    from scipy.ndimage import gaussian_filter
    from tqdm.auto import tqdm

    from mindeye.glm import drift_basis, fit_lsa, trial_regressors
    from mindeye.nsd import RoiMask, design_vector
    from mindeye.nsd.design import IMAGE_SECONDS
    from mindeye.nsd.files import write_betas, write_design, write_mindeye_betas, write_roi, write_timeseries
    from simulators.world.anatomy import make_anatomy
    from simulators.world.design import volumes_per_run
    from simulators.world.encoding import subject_encoding
    from simulators.world.scanner import run_timeseries
    from simulators.world.stats import rowwise_corr, standardise

    anatomy = make_anatomy(subject, cfg.brain, rng)
    write_roi(layout.roi(subject), anatomy.roi_xyz, anatomy.affine, brain_xyz=anatomy.brain_xyz)
    write_roi(layout.brainmask(subject), anatomy.brain_xyz, anatomy.affine)
    brain = RoiMask(anatomy.brain_xyz, anatomy.affine)
    roi_in_brain = anatomy.roi_xyz[anatomy.brain_xyz]  # (V_brain,) bool, ROI voxels in the brain's order

    encoding = subject_encoding(anatomy, cfg.code.dim, cfg.brain.smoothness_vox[subject - 1], cfg.snr, rng)
    sessions = range(1, cfg.sessions_per_subject[subject - 1] + 1)
    trials = design.trials(subject, sessions)
    subject_images = design.subject_images[subject - 1]  # (n_subject_images,) the images it ever sees
    image_response_nv = encoding.response_pct(code_nk[subject_images], cfg.snr.signal_pct)  # ROI voxels
    row_of_image = np.full(len(code_nk), -1)
    row_of_image[subject_images] = np.arange(len(subject_images))
    trial_response_nv = image_response_nv[row_of_image[trials.image_id]]
    trial_response_nv = trial_response_nv + cfg.snr.trial_noise_pct * rng.standard_normal(trial_response_nv.shape)

    smooth = gaussian_filter(rng.standard_normal(anatomy.shape), sigma=2.0)
    baseline_v = cfg.snr.baseline * (1 + 0.1 * smooth[anatomy.brain_xyz] / smooth.std())
    hrf_shift_v = np.zeros(brain.n_voxels)
    hrf_shift_v[roi_in_brain] = encoding.hrf_shift_v
    n_volumes = volumes_per_run(cfg)

    quirks = irregular(cfg)
    rest_sessions = set(quirks.get("rest_run_sessions", []))

    def write_run(session: int, file_run: int, run_trials, response_brain_nv) -> np.ndarray:
        ts_tv = run_timeseries(run_trials.onset_s, response_brain_nv, hrf_shift_v, baseline_v, n_volumes, cfg.tr,
                               cfg.snr, rng)
        write_timeseries(layout.timeseries(subject, session, file_run), brain.unmask(ts_tv.T), anatomy.affine, cfg.tr)
        image_id_t = design_vector(run_trials, n_volumes, cfg.tr)
        if quirks.get("short_design", False):
            if image_id_t[-1] >= 0:
                raise ValueError("short_design: a trial starts at a run's last volume, so its row cannot be dropped")
            image_id_t = image_id_t[:-1]
        write_design(layout.design(subject, session, file_run), image_id_t)
        return ts_tv

    def write_rest_run(session: int, file_run: int) -> None:
        no_trials = trials.select(np.zeros(len(trials), dtype=bool))
        write_run(session, file_run, no_trials, np.zeros((0, brain.n_voxels)))

    glm_betas_nv = np.empty_like(trial_response_nv, dtype=np.float32)  # ROI voxels, every trial
    runs = [(session, run) for session in sessions for run in range(1, design.runs_per_session + 1)]
    session_betas: list[np.ndarray] = []
    for session, run in tqdm(runs, desc=f"subj{subject:02d} runs", leave=False, disable=not progress):
        rest = session in rest_sessions  # design run k is then file k + 1, after the first rest run
        if rest and run == 1:
            write_rest_run(session, 1)
        in_run = (trials.session == session) & (trials.run == run)
        run_trials = trials.select(in_run)
        response_brain_nv = np.zeros((len(run_trials), brain.n_voxels))
        response_brain_nv[:, roi_in_brain] = trial_response_nv[in_run]
        ts_tv = write_run(session, run + rest, run_trials, response_brain_nv)
        if rest and run == design.runs_per_session:
            write_rest_run(session, run + 2)

        fit = fit_lsa(ts_tv.astype(np.float64), trial_regressors(run_trials.onset_s, IMAGE_SECONDS, n_volumes, cfg.tr),
                      drift_basis(n_volumes, cfg.tr))
        betas_pct_nv = fit.percent_signal_change()
        session_betas.append(betas_pct_nv)
        glm_betas_nv[in_run] = betas_pct_nv[:, roi_in_brain]
        if run == design.runs_per_session:
            write_betas(layout.betas(subject, session), np.concatenate(session_betas), brain)
            session_betas = []

    # MindEye2's release: ROI voxels, global trial rows, z-scored per session ("renorm").
    renorm_nv = np.concatenate([standardise(glm_betas_nv[trials.session == s], eps=1e-6) for s in sessions])
    write_mindeye_betas(layout.mindeye_betas(subject), renorm_nv)  # written as float32

    with h5py.File(truth_dir / f"subj{subject:02d}.hdf5", "w") as f:
        f.create_dataset("maps_vk", data=encoding.maps_vk.astype(np.float32))
        f.create_dataset("gain_v", data=encoding.gain_v.astype(np.float32))
        f.create_dataset("hrf_shift_v", data=encoding.hrf_shift_v.astype(np.float32))
        f.create_dataset("image_ids", data=subject_images)
        f.create_dataset("image_response_pct", data=image_response_nv.astype(np.float32))  # (image_ids, V)
        f.create_dataset("trial_response_pct", data=trial_response_nv.astype(np.float32))  # (trials, V)
        f.create_dataset("global_trial", data=trials.global_trial)

    # Per signal voxel, over trials: how well the GLM recovers what the brain did on each trial
    # (scanner noise, HRF mismatch), and how much of the image-driven response survives (plus trial noise).
    signal_voxels = encoding.gain_v > 0
    noiseless_nv = image_response_nv[row_of_image[trials.image_id]]
    glm_fidelity = rowwise_corr(glm_betas_nv[:, signal_voxels].T, trial_response_nv[:, signal_voxels].T)
    reliability = rowwise_corr(glm_betas_nv[:, signal_voxels].T, noiseless_nv[:, signal_voxels].T)
    return {"subject": subject, "grid": list(anatomy.shape), "brain_voxels": brain.n_voxels,
            "roi_voxels": int(anatomy.roi_xyz.sum()), "signal_voxels": int(signal_voxels.sum()),
            "sessions": len(sessions), "trials": len(trials), "test_trials": int(trials.is_test.sum()),
            "beta_vs_trial_response_r": float(np.median(glm_fidelity)),
            "beta_vs_image_response_r": float(np.median(reliability))}


@command("world_generate", "mindeye-world")
def main(cfg: DictConfig) -> None:
    summary = generate_world(cfg.world, Path(cfg.out_dir), overwrite=cfg.overwrite, progress=cfg.progress)
    print(format_summary(summary, Path(cfg.out_dir)))


def format_summary(summary: dict, root: Path) -> str:
    lines = [f"synthetic NSD world '{summary['name']}' at {root}",
             f"  {summary['n_images']} images ({summary['n_shared_images']} shared test images), CLIP tokens "
             f"{summary['clip_tokens'][0]} x {summary['clip_tokens'][1]}; TR {summary['tr']:.4f} s, "
             f"{summary['volumes_per_run']} volumes a run, {summary['trials_per_session']} trials a session",
             "  subject  grid          brain   ROI  signal  sessions  trials  test  r(beta,trial)  r(beta,image)"]
    for s in summary["subjects"]:
        lines.append(f"  subj{s['subject']:02d}   {'x'.join(map(str, s['grid'])):12s} {s['brain_voxels']:6d} "
                     f"{s['roi_voxels']:5d} {s['signal_voxels']:7d} {s['sessions']:9d} {s['trials']:7d} "
                     f"{s['test_trials']:5d}  {s['beta_vs_trial_response_r']:13.2f}  {s['beta_vs_image_response_r']:13.2f}")
    lines.append("  r(beta,trial): median over signal voxels of corr(GLM beta, the trial's true response);"
                 " r(beta,image): the same against the noiseless response to the image")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
