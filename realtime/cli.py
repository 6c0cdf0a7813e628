"""mindeye-realtime: build the service from configs/realtime.yaml and an export bundle, and run it until Ctrl-C."""
from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from mindeye.cli import command, log_to, port_taken, require_data_root
from mindeye.errors import ConfigValueError, MissingFileError, PortInUse

if TYPE_CHECKING:  # torch and the model stack load in build_service: --help answers without them
    from mindeye.generator import Refinement
    from realtime.service import RealtimeService

log = logging.getLogger(__name__)


def build_service(cfg: DictConfig, *, context=None) -> RealtimeService:
    """The service `cfg` (configs/realtime.yaml) describes: the bundle's backend, ROIs, viewer, sockets' settings."""
    import torch

    from mindeye.bundle import read_manifest
    from mindeye.clip import clip_identity
    from mindeye.generator import GenerationSettings
    from mindeye.latents import build_latent_codec
    from mindeye.models.prior import check_sampler
    from mindeye.models.readout import check_token_source
    from mindeye.nsd import NSDLayout, StimulusBrick
    from mindeye.protocol.transport import CurveServer
    from mindeye.targets import build_target_cache, target_clip_config
    from mindeye.bank import BankSettings, TargetBlocks, build_bank, load_bank
    from realtime.backends import LIVE_TOKEN_SOURCES, candidate_image_ids, load_backend
    from realtime.pipeline import SubjectRois
    from realtime.service import RealtimeService, ServiceSettings

    check_sampler(cfg.decode.prior_sampler, "decode.prior_sampler")  # clear errors before anything loads
    check_token_source(cfg.generate.tokens, "generate.tokens", LIVE_TOKEN_SOURCES)
    bundle = read_manifest(require_bundle(cfg.bundle))
    root = require_data_root(cfg.data.root)
    data_clip = clip_identity(target_clip_config(cfg.data))
    if bundle.manifest["clip"]["identity"] != data_clip:
        raise ConfigValueError(f"the bundle {cfg.bundle} predicts tokens of CLIP encoder "
                               f"{bundle.manifest['clip']['identity']!r}, the data's retrieval candidates are "
                               f"{data_clip!r}'s: serve the data the model was trained on (data=..., data.root=...)")
    subjects = list(cfg.subjects or bundle.subjects)
    stimuli = StimulusBrick(NSDLayout(root).stimuli())
    targets = build_target_cache(cfg.data)
    if cfg.decode.bank_dir:  # a bank built once offline (a FAISS bank at NSD scale is not rebuilt per session)
        bank = load_bank(cfg.decode.bank_dir, device=cfg.decode.device)
    else:
        candidates = candidate_image_ids(root, cfg.decode.candidates, subjects)
        bank = build_bank(candidates, TargetBlocks(targets, candidates), BankSettings.from_config(cfg.bank),
                          folder=Path(cfg.out_dir) / "bank", device=cfg.decode.device)
    log.info("retrieval bank: %s, %d images", bank.kind, len(bank))
    torch.set_num_threads(cfg.decode.torch_threads)
    if not cfg.generate.enabled or bundle.generator_dir is None:
        log.warning("no generator (%s): results carry no reconstruction",
                    "generate.enabled=false" if not cfg.generate.enabled else "the bundle has none")
    backend = load_backend(bundle.root, cfg.decode.backend, device=cfg.decode.device,
                           threads=cfg.decode.torch_threads, int8=cfg.decode.int8, precision=cfg.decode.precision,
                           with_generator=cfg.generate.enabled, max_batch=cfg.decode.max_batch,
                           bank=bank, codec=build_latent_codec(dict(cfg.data.low_level)),
                           image_size=stimuli.shape[1], top_k=cfg.decode.top_k, prior_steps=cfg.decode.prior_steps,
                           prior_sampler=cfg.decode.prior_sampler, prior_cond_scale=cfg.decode.prior_cond_scale,
                           generation=GenerationSettings(cfg.generate.steps, cfg.generate.guidance_scale,
                                                         cfg.generate.lowlevel_blend, cfg.generate.img2img_strength),
                           refinement=load_refinement(cfg),
                           tokens=cfg.generate.tokens if cfg.generate.enabled else "prior")
    log.info("decode backend: %s on %s (bundle %s), image tokens from the %s", backend.name, cfg.decode.device,
             bundle.root, "readouts" if backend.readouts else "prior")
    viewer = None
    if cfg.viewer.enabled:
        from realtime.viewer import LiveViewer

        viewer = LiveViewer(cfg.viewer.host, cfg.viewer.port, stimuli=stimuli,
                            fd_threshold_mm=cfg.viewer.fd_threshold_mm)
    curve = None
    if cfg.curve.secret_key_file or cfg.curve.allowed_clients_dir:
        if not (cfg.curve.secret_key_file and cfg.curve.allowed_clients_dir):
            raise ConfigValueError("CURVE needs both curve.secret_key_file and curve.allowed_clients_dir")
        import zmq

        context = context or zmq.Context.instance()
        curve = CurveServer(context, cfg.curve.secret_key_file, cfg.curve.allowed_clients_dir)
    settings = ServiceSettings(out_dir=Path(cfg.out_dir), volumes_endpoint=cfg.endpoints.volumes,
                               results_endpoint=cfg.endpoints.results, journal_fsync=cfg.journal_fsync,
                               gap_wait_s=cfg.gap_wait_s, glm=dict(cfg.glm),
                               max_pending=cfg.decode.max_pending, max_batch=cfg.decode.max_batch,
                               late_after_ms=cfg.decode.late_after_ms, resume_hold_s=cfg.resume_hold_s,
                               allow_insecure=cfg.allow_insecure)
    return RealtimeService(settings, backend, SubjectRois.from_layout(root, subjects), viewer=viewer, context=context,
                           curve=curve)


def require_bundle(path, setting: str = "bundle") -> Path:
    """`path` if it holds an export bundle, else a MissingFileError saying how to make one (answered before
    torch loads: mindeye.bundle.MANIFEST_FILE, named here)."""
    path = Path(str(path))
    if (path / "manifest.json").is_file():
        return path
    if (path / "config.json").is_file() or (path / "checkpoint" / "config.json").is_file():
        checkpoint = path if (path / "config.json").is_file() else path / "checkpoint"
        raise MissingFileError(path / "manifest.json", "export bundle", f"{path} is a checkpoint or training run: "
                               f"make a bundle with mindeye-export checkpoint={checkpoint} out_dir=BUNDLE, then pass "
                               f"{setting}=BUNDLE")
    raise MissingFileError(path / "manifest.json", "export bundle", f"make one with mindeye-export checkpoint=... "
                           f"out_dir=BUNDLE, or pass {setting}=PATH")


def load_refinement(cfg: DictConfig) -> Refinement | None:
    """The optional refinement stage (`generate.refine`; off unless its generator is set)."""
    from mindeye.generator import GenerationSettings, Refinement

    refine = cfg.generate.refine
    if refine.generator is None:
        return None
    return Refinement(_load_for_data(refine.generator, cfg),
                      GenerationSettings(refine.steps, refine.guidance_scale, cfg.generate.lowlevel_blend,
                                         refine.strength))


def _load_for_data(folder: str, cfg: DictConfig):
    """A generator folder on the decode device, refused unless trained on the data's CLIP encoder."""
    from mindeye.clip import clip_identity
    from mindeye.generator import load_pipeline
    from mindeye.targets import target_clip_config

    return load_pipeline(folder, device=cfg.decode.device, clip_id=clip_identity(target_clip_config(cfg.data)))


@command("realtime", "mindeye-realtime")
def main(cfg: DictConfig) -> None:
    require_bundle(cfg.bundle)        # the usual mistakes, answered before torch loads (build_service
    require_data_root(cfg.data.root)  # checks them again for its other callers)
    log_to(Path(cfg.out_dir) / "service.log", cfg.log_level)
    service = build_service(cfg)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    if service.viewer is not None:
        try:
            service.viewer.start()
        except OSError as error:
            if not port_taken(error):
                raise
            raise PortInUse(f"the viewer's port {cfg.viewer.host}:{cfg.viewer.port}",
                            f"viewer.port={cfg.viewer.port + 1}") from error
        log.info("live viewer at %s", service.viewer.url)
    try:
        service.run(stop)
    finally:
        if service.viewer is not None:
            service.viewer.stop()

if __name__ == "__main__":
    main()
