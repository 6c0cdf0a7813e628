"""mindeye-bridge: build the bridge from configs/bridge.yaml and run it until Ctrl-C."""
from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

from mindeye.cli import command, log_to, require_data_root
from mindeye.protocol import CurveClient

if TYPE_CHECKING:  # SimpleITK and pydicom load in build_bridge: --help answers without them
    from realtime.bridge.bridge import Bridge

log = logging.getLogger(__name__)


def build_bridge(cfg: DictConfig, *, context=None) -> Bridge:
    """The bridge `cfg` (configs/bridge.yaml) describes."""
    from mindeye.nsd import NSDLayout, read_roi, subject_name
    from realtime.bridge import scanner_files
    from realtime.bridge.bridge import Bridge, BridgeSettings, ModelSpace
    from realtime.bridge.watcher import ExportWatcher

    root = require_data_root(cfg.data_root, "data_root")
    watcher = ExportWatcher(cfg.export_dir, probe=scanner_files.probe, incomplete=scanner_files.IncompleteFile,
                            corrupt=scanner_files.CorruptFile, patterns=tuple(cfg.files.patterns),
                            polling=cfg.files.polling, poll_interval_s=cfg.files.poll_interval_s,
                            settle_s=cfg.files.settle_s, incomplete_timeout_s=cfg.files.incomplete_timeout_s)
    out_dir = Path(cfg.out_dir)
    roi = read_roi(NSDLayout(root).roi(cfg.subject))  # its grid is the model's
    space = ModelSpace(roi.shape, roi.affine, out_dir, calibration_reference(cfg, root, out_dir), roi.mask_xyz)
    runs = cfg.runs
    by_series = {int(number): int(run) for number, run in OmegaConf.to_container(runs.by_series).items()}
    settings = BridgeSettings(out_dir=out_dir, session=cfg.session, subject=subject_name(cfg.subject),
                              endpoint=cfg.endpoint, first_run=runs.first, runs_by_series=by_series,
                              run_volumes=runs.volumes, run_idle_s=runs.idle_s, gap_wait_s=runs.gap_wait_s,
                              tr_s=runs.tr_s, events_file=runs.events_file, resend_after_s=cfg.resend_after_s)
    curve = CurveClient.from_settings(cfg.curve.secret_key_file, cfg.curve.server_public_key_file)
    return Bridge(settings, watcher, scanner_files.read_volume, space, context=context, curve=curve)


def calibration_reference(cfg: DictConfig, root: Path, out_dir: Path):
    """The calibration session's mean EPI in the model grid (None when motion correction is off): from
    motion.reference_dir, else made once from the calibration session and kept in out_dir."""
    if not cfg.motion.correct:
        return None
    from realtime.bridge.registration import CalibrationReference

    if cfg.motion.reference_dir is not None:
        return CalibrationReference.load(cfg.motion.reference_dir, cfg.subject)
    if CalibrationReference.paths(out_dir, cfg.subject)[0].is_file():
        return CalibrationReference.load(out_dir, cfg.subject)
    reference = CalibrationReference.make(root, cfg.subject, cfg.motion.calibration_session)
    log.info("calibration reference made from %s; saved in %s", reference.source, reference.save(out_dir))
    return reference


@command("bridge", "mindeye-bridge")
def main(cfg: DictConfig) -> None:
    require_data_root(cfg.data_root, "data_root")
    log_to(Path(cfg.out_dir) / "bridge.log", cfg.log_level)
    bridge = build_bridge(cfg)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    bridge.run(stop)
    log.info("stopped: %s", ", ".join(f"{name} {n}" for name, n in bridge.counters.items()))


if __name__ == "__main__":
    main()
