"""mindeye-replay: stream runs to the realtime service with faults injected, or write them into a folder as
a scanner would (sink=folder; configs/replay.yaml)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from mindeye.cli import command
from mindeye.errors import ConfigValueError
from mindeye.nsd import NSDLayout, subject_name
from mindeye.protocol import CurveClient
from simulators.replay.faults import Faults
from simulators.replay.head_motion import MotionSpec
from simulators.replay.scanner_folder import FolderOptions, write_folder
from simulators.replay.sender import Source, replay
from simulators.replay.sources import JournalSource, NiftiSource, NSDSource


def build_source(cfg: DictConfig) -> Source:
    """The source `cfg.source` names, from the config's source options."""
    if cfg.source == "nsd":
        runs = cfg.runs if isinstance(cfg.runs, str) else list(cfg.runs)
        try:
            return NSDSource(NSDLayout(cfg.data_root), cfg.subject, cfg.session, runs, session_id=cfg.session_id,
                             dtype=cfg.dtype, events_mode=cfg.events_mode, run_gap_s=cfg.run_gap_s)
        except ValueError as error:
            raise ConfigValueError(str(error)) from None
    if cfg.source == "nifti":
        if cfg.nifti is None:
            raise ConfigValueError("source=nifti needs nifti=PATH (a 4D NIfTI)")
        return NiftiSource(Path(cfg.nifti), subject_id=cfg.subject_id or subject_name(cfg.subject),
                           session_id=cfg.session_id, run=cfg.run, tr_s=cfg.tr_s,
                           events_tsv=None if cfg.events_tsv is None else Path(cfg.events_tsv), dtype=cfg.dtype,
                           events_mode=cfg.events_mode)
    if cfg.source == "journal":
        if cfg.journal is None:
            raise ConfigValueError("source=journal needs journal=PATH (a session journal)")
        return JournalSource(Path(cfg.journal))
    raise ConfigValueError(f"source must be nsd, nifti or journal, got {cfg.source!r}")


def build_folder_options(cfg: DictConfig, run_dir: Path) -> FolderOptions:
    """The scanner-folder sink's options from `cfg.folder`, `cfg.motion` and `cfg.faults`."""
    try:
        motion = MotionSpec(**{key: cfg.motion[key] for key in cfg.motion if key not in ("seed", "order")})
        return FolderOptions(Path(cfg.folder.out_dir or run_dir / "scanner_folder"), format=cfg.folder.format,
                             first_series=cfg.folder.first_series, write_s=cfg.folder.write_s,
                             chunks=cfg.folder.chunks, motion=motion, motion_seed=cfg.motion.seed,
                             motion_order=cfg.motion.order, faults=Faults.from_config(cfg.faults),
                             fault_seed=cfg.seed)
    except (TypeError, ValueError) as error:
        raise ConfigValueError(str(error)) from None


@command("replay", "mindeye-replay")
def main(cfg: DictConfig) -> None:
    if cfg.sink not in ("wire", "folder"):
        raise ConfigValueError(f"sink must be wire or folder, got {cfg.sink!r}")
    fault_log = Path(cfg.fault_log or Path(HydraConfig.get().runtime.output_dir) / "faults.jsonl")
    if cfg.sink == "folder":
        if cfg.source == "journal":
            raise ConfigValueError("sink=folder writes volumes from source=nsd or source=nifti; a journal holds "
                                   "wire frames already (replay it with sink=wire)")
        options = build_folder_options(cfg, Path(HydraConfig.get().runtime.output_dir))
        summary = write_folder(build_source(cfg), options, speed=cfg.speed)
        if summary.fault_records:
            fault_log.parent.mkdir(parents=True, exist_ok=True)
            fault_log.write_text("".join(json.dumps(record) + "\n" for record in summary.fault_records))
        print(summary.format() + (f"\n  fault log: {fault_log}" if summary.fault_records else ""))
        return
    curve = CurveClient.from_settings(cfg.curve.secret_key_file, cfg.curve.server_public_key_file)
    summary = replay(build_source(cfg), cfg.endpoint, faults=Faults.from_config(cfg.faults), seed=cfg.seed,
                     speed=cfg.speed, curve=curve, fault_log=fault_log, ack_wait_s=cfg.ack_wait_s,
                     first_ack_wait_s=cfg.first_ack_wait_s)
    print(summary.format())
    if summary.unacked:
        sys.exit(f"mindeye-replay: {summary.unacked} message(s) were never acked by {cfg.endpoint}: the service "
                 f"stopped or fell behind (raise ack_wait_s to wait longer for the last ones)")


if __name__ == "__main__":
    main()
