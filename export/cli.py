"""mindeye-export: a checkpoint (+ a generator) -> an export bundle (docs/export.md; configs/export.yaml).

    export_bundle("runs/x/checkpoint", "runs/export/x", generator="weights/world-tiny/student",
                  clip_id=..., backend="onnxruntime")

1. checks the checkpoint's calibration is live (percent signal change, what the service feeds) and the
   generator was trained on the data's CLIP encoder;
2. copies the checkpoint and the generator's model files into the bundle;
3. for onnxruntime / tensorrt, exports the graphs to ONNX (export.onnx_graphs), optionally int8 too;
4. writes manifest.json, then checks each prepared backend against eager (export.parity), records the
   figures in the manifest and fails when a backend exceeds its tolerance.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from omegaconf import DictConfig

from mindeye.cli import command, require_checkpoint
from mindeye.errors import ConfigValueError, OutDirInUse

log = logging.getLogger(__name__)
LIVE_UNITS = "percent_signal_change"  # what the realtime GLM feeds (realtime.backends.LIVE_UNITS)
CHECKPOINT_FILES = ("config.json", "model.safetensors", "calibration.safetensors")


class ParityError(ConfigValueError):
    """A backend's graphs disagree with eager PyTorch beyond their tolerance."""


def export_bundle(checkpoint: str | Path, out: str | Path, *, clip_id: str, generator: str | Path | None = None,
                  subjects: list[str] | None = None, backend: str = "onnxruntime", precision: str = "fp32",
                  quantize_int8: bool = False, check_parity: bool = True, parity_batches: tuple[int, ...] = (1, 3),
                  max_batch: int = 8, overwrite: bool = False):
    """Write the bundle; returns it as read back (mindeye.bundle.Bundle)."""
    from mindeye.bundle import BACKENDS, model_graphs, generator_graphs, read_manifest, sha256_file, sha256_folder
    from mindeye.bundle import write_manifest
    from mindeye.bundle.manifest import CHECKPOINT_DIR, GENERATOR_DIR, GRAPHS_DIR
    from mindeye.generator import load_pipeline, sampler_name
    from mindeye.models import calibration_units, load_calibration, load_checkpoint
    from mindeye.models.checkpoint import CALIBRATION_FILE
    from mindeye.models.readout import READOUT_FILE, load_readouts

    if backend not in BACKENDS:
        raise ConfigValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if precision not in ("fp32", "fp16", "bf16") or (precision != "fp32" and backend != "tensorrt"):
        raise ConfigValueError(f"precision {precision!r}: fp32 for {backend}; fp16 / bf16 / fp32 for tensorrt engines")
    checkpoint, out = Path(checkpoint), Path(out)
    units, estimator = calibration_units(checkpoint)
    if units != LIVE_UNITS:
        raise ConfigValueError(f"{checkpoint / CALIBRATION_FILE} describes betas in {units} ({estimator}); a bundle "
                               f"serves the live service, which feeds {LIVE_UNITS}. Make a live calibration first: "
                               f"mindeye-calibrate checkpoint={checkpoint} session=N")
    model = load_checkpoint(checkpoint)
    calibration = load_calibration(checkpoint)
    readouts = load_readouts(checkpoint)
    subjects = _subjects(subjects, list(model.config.voxels_per_subject), list(calibration))
    pipe = load_pipeline(generator, clip_id=clip_id) if generator is not None else None
    _clear(out, overwrite)

    try:  # a folder without its manifest is no bundle: remove what a failed export wrote
        (out / CHECKPOINT_DIR).mkdir(parents=True)
        for name in CHECKPOINT_FILES + ((READOUT_FILE,) if readouts else ()):
            shutil.copy2(checkpoint / name, out / CHECKPOINT_DIR / name)
        modules = model_graphs(model, subjects)
        if pipe is not None:
            _copy_generator(Path(generator), out / GENERATOR_DIR)
            modules.update(generator_graphs(pipe))
        interface = {name: module.spec() for name, module in modules.items()}
        graphs = {}
        if backend in ("onnxruntime", "tensorrt"):
            from export.onnx_graphs import export_graph, quantize_int8 as quantize

            for name, module in modules.items():
                graphs[name] = export_graph(module, interface[name], out / GRAPHS_DIR / f"{name}.onnx")
                if quantize_int8:
                    graphs[name]["int8"] = quantize(out / GRAPHS_DIR / f"{name}.onnx")
        manifest = {
            "created_by": "mindeye-export",
            "backend": backend,
            "precision": precision,
            "subjects": {s: {"n_voxels": model.config.voxels_per_subject[s]} for s in subjects},
            "checkpoint": {"dir": CHECKPOINT_DIR, "source": str(checkpoint),
                           "weights": {"file": f"{CHECKPOINT_DIR}/model.safetensors",
                                       "sha256": sha256_file(out / CHECKPOINT_DIR / "model.safetensors")},
                           "config": model.config.to_dict()},
            "calibration": {"file": f"{CHECKPOINT_DIR}/{CALIBRATION_FILE}",
                            "sha256": sha256_file(out / CHECKPOINT_DIR / CALIBRATION_FILE),
                            "units": units, "estimator": estimator,
                            "applied": "voxels_bv = (betas_bv - mean_v) / std_v, per subject, before its heads graph",
                            "statistics": {s: _summary(*calibration[s]) for s in subjects}},
            "readouts": None if not readouts else {
                "file": f"{CHECKPOINT_DIR}/{READOUT_FILE}", "sha256": sha256_file(out / CHECKPOINT_DIR / READOUT_FILE),
                "alphas": {s: readout.alpha for s, readout in readouts.items()},
                "trials": {s: readout.n_trials for s, readout in readouts.items()},
                "applied": "image_tokens = readout(backbone tokens) with generate.tokens=readout or auto, in torch"},
            "clip": {"identity": clip_id, "tokens": model.config.clip_tokens, "dim": model.config.clip_dim},
            "prior": {"timesteps": model.config.prior.timesteps, "prediction": "x_start",
                      "samplers": "runtime choice (mindeye.models.prior.PRIOR_SAMPLERS)"},
            "generator": None if pipe is None else {
                "dir": GENERATOR_DIR, "source": str(generator), "sha256": sha256_folder(out / GENERATOR_DIR),
                "clip_id": pipe.config.clip_id, "is_student": pipe.is_student, "image_size": pipe.image_size,
                "sampler": sampler_name(pipe.scheduler), "vae": pipe.vae is not None},
            "interface": {name: spec.to_json() for name, spec in interface.items()},
            "graphs": graphs,
            "parity": {},
        }
        write_manifest(out, manifest)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    if check_parity:
        manifest["parity"], failure = _check_parity(read_manifest(out), modules, backend, quantize_int8, precision,
                                                    parity_batches, max_batch)
        write_manifest(out, manifest)  # failed figures too: the realtime service refuses a failed backend
        if failure:
            raise ParityError(failure)
    return read_manifest(out)


def _check_parity(bundle, modules, backend: str, int8: bool, precision: str, batches, max_batch: int
                  ) -> tuple[dict, str | None]:
    """Each prepared backend against eager: figures by backend and graph, and what failed (None: nothing)."""
    from export.parity import TOLERANCES, check_parity, format_parity
    from mindeye.bundle import TorchGraphs, load_graphs

    reference = TorchGraphs(modules)
    candidates = {"compile": lambda: TorchGraphs(modules, compile=True)} if backend == "compile" else {}
    if backend in ("onnxruntime", "tensorrt"):
        candidates["onnxruntime"] = lambda: load_graphs(bundle, "onnxruntime")
    if int8:
        candidates["onnxruntime-int8"] = lambda: load_graphs(bundle, "onnxruntime", int8=True)
    if backend == "tensorrt":
        candidates[f"tensorrt-{precision}"] = lambda: load_graphs(bundle, "tensorrt", device="cuda",
                                                                  precision=precision, max_batch=max_batch)
    figures, failure = {}, None
    for name, make in candidates.items():
        try:
            graphs = make()
        except ConfigValueError as error:  # TensorRT absent on this host: the engines are built where it runs
            figures[name] = {"skipped": str(error)}
            print(f"parity {name}: skipped ({error})")
            continue
        results = check_parity(bundle, reference, graphs, TOLERANCES[name], batches=tuple(batches))
        print(format_parity(name, results))
        figures[name] = {r.graph: r.to_json() for r in results}
        failed = [r for r in results if not r.passed]
        if failed and name != "onnxruntime-int8" and failure is None:  # int8 is measured, not promised
            worst = max(failed, key=lambda r: r.error)
            failure = (f"{name} disagrees with eager on {worst.graph}: relative error {worst.error:.2e} > "
                       f"{worst.tolerance:.0e} (all figures in {bundle.root}/manifest.json's parity); export for "
                       "another backend or precision")
    return figures, failure


def _subjects(asked: list[str] | None, model_subjects: list[str], calibrated: list[str]) -> list[str]:
    servable = [s for s in model_subjects if s in calibrated]
    subjects = list(asked) if asked else servable
    unknown = sorted(set(subjects) - set(servable))
    if unknown or not subjects:
        raise ConfigValueError(f"subjects {unknown or subjects} cannot be exported: the checkpoint has aligners "
                               f"for {model_subjects} and calibration statistics for {calibrated}")
    return subjects


def _summary(mean_v, std_v) -> dict:
    """What the manifest says of a subject's calibration (the statistics themselves are in the file)."""
    import numpy as np

    return {"n_voxels": int(len(mean_v)), "mean": {"min": float(np.min(mean_v)), "median": float(np.median(mean_v)),
                                                   "max": float(np.max(mean_v))},
            "std": {"min": float(np.min(std_v)), "median": float(np.median(std_v)), "max": float(np.max(std_v))}}


def _copy_generator(source: Path, target: Path) -> None:
    """The generator's model files: model_index.json and the component folders it names (no logs, no samples)."""
    index = json.loads((source / "model_index.json").read_text())
    target.mkdir(parents=True)
    shutil.copy2(source / "model_index.json", target / "model_index.json")
    for name, value in index.items():
        if isinstance(value, list) and value[0] is not None and (source / name).is_dir():
            shutil.copytree(source / name, target / name)


def _check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse an `out` that is not free to write: a folder holding anything but a bundle, or a bundle
    without overwrite=true. Checked first by the command, so a wrong out_dir is answered at once."""
    from mindeye.bundle import MANIFEST_FILE

    if not out.exists() or not any(out.iterdir()):
        return
    if not (out / MANIFEST_FILE).is_file():
        raise OutDirInUse(f"out_dir={out} holds files that are not a bundle; choose another out_dir")
    if not overwrite:
        raise OutDirInUse(f"out_dir={out} holds a bundle already; pass overwrite=true to replace it, or choose "
                          "another out_dir")


def _clear(out: Path, overwrite: bool) -> None:
    """An empty `out` to write into: an existing bundle is replaced only with overwrite=true; a folder
    holding anything else is never touched."""
    _check_out_dir(out, overwrite)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)


@command("export", "mindeye-export")
def main(cfg: DictConfig) -> None:
    from mindeye.clip import clip_identity
    from mindeye.targets import target_clip_config

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    checkpoint = require_checkpoint(cfg.checkpoint)
    _check_out_dir(Path(cfg.out_dir), cfg.overwrite)
    bundle = export_bundle(checkpoint, cfg.out_dir, clip_id=clip_identity(target_clip_config(cfg.data)),
                           generator=cfg.generator_dir, subjects=list(cfg.subjects) if cfg.subjects else None,
                           backend=cfg.backend, precision=cfg.precision, quantize_int8=cfg.quantize_int8,
                           check_parity=cfg.parity.check, parity_batches=tuple(cfg.parity.batches),
                           max_batch=cfg.tensorrt.max_batch, overwrite=cfg.overwrite)
    print(f"bundle: {bundle.root} ({bundle.manifest['backend']}, subjects {list(bundle.subjects)}, "
          f"{len(bundle.graphs)} ONNX graphs{', generator' if bundle.generator_dir else ''}); "
          f"run it with mindeye-realtime bundle={bundle.root}")


if __name__ == "__main__":
    main()
