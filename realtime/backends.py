"""Decode backends: a batch of live single-trial betas -> image embeddings, top-k retrieval, blurry images.

The service hands each backend raw betas (percent signal change, ROI voxels, (B, V)); the backend
z-scores them with the calibration statistics saved beside the model (which must be in those units),
runs the model and returns a `DecodedBatch`. `ModelBackend` runs the model as named graphs on any of the
bundle backends (mindeye.bundle: eager, torch.compile, ONNX Runtime, TensorRT); `load_backend` makes one
from an export bundle (what the service loads), `TorchBackend` from a model in memory (tests, benchmarks).

Retrieval compares the retrieval head's tokens with a bank of candidate images' CLIP tokens (mindeye.bank:
exact, or FAISS at NSD scale) by cosine similarity of the flattened, unit-normalised tokens, as offline
evaluation does.

The prior's starting noise is the only randomness. Each `decode` call seeds its own
torch.Generator from sha256(seed, subject, the float32 betas), so the same batch gives the same
tokens whatever was decoded before it; a trial decoded in a different batch gets other noise.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from safetensors import safe_open

from mindeye.bank import ExactBank, FaissBank
from mindeye.bundle import PRIOR_DENOISER, GraphSet, TorchGraphs, heads_graph, load_graphs, model_graphs, read_manifest
from mindeye.bundle import resolve_backend, sample_prior
from mindeye.bundle.generator import graph_pipeline
from mindeye.errors import ConfigValueError, MissingFileError
from mindeye.generator import GenerationSettings, MindEyeUnCLIPPipeline, Refinement, reconstruct, refine
from mindeye.models import (MindEye2, MindEyeConfig, calibration_units, load_calibration, load_checkpoint,
                            read_checkpoint_config)
from mindeye.models.checkpoint import CALIBRATION_FILE, NULL_BRAIN_TOKENS, WEIGHTS_FILE
from mindeye.models.prior import check_sampler
from mindeye.models.readout import (READOUT_FILE, TOKEN_SOURCES, TokenReadout, check_token_source,
                                    how_to_get_readouts, load_readouts)
from mindeye.nsd import ExpDesign, NSDLayout, StimulusBrick


@dataclass(frozen=True)
class DecodedBatch:
    embedding_norm_b: np.ndarray  # float32 (B,): L2 norm of the predicted image embedding (see TorchBackend)
    top_k: list[list[tuple[int, float]]]  # per trial: (image id, cosine score), best first; [] without a bank
    image_tokens_bld: np.ndarray | None  # float32 (B, L, D) CLIP image tokens, the prior's or the readouts';
                                         # None if prior_steps == 0 and no readouts
    lowlevel_bhw3: np.ndarray | None  # uint8 (B, H, W, 3) blurry images; None without low-level head or codec
    decode_ms: float  # wall time: z-scoring, aligner, backbone, heads, prior, retrieval
    generate_ms: float  # wall time: low-level latents -> pixels, and the reconstructions
    reconstruction_bhw3: np.ndarray | None = None  # uint8 (B, H, W, 3) reconstructions; None without a generator


@runtime_checkable
class DecodeBackend(Protocol):
    name: str

    def subjects(self) -> list[str]: ...

    def n_voxels(self, subject: str) -> int: ...

    def decode(self, subject: str, betas_bv: np.ndarray) -> DecodedBatch:
        """`betas_bv`: float (B, V) in percent signal change, not z-scored."""
        ...


CANDIDATE_CHOICES = ("shared", "subjects", "all")
LIVE_TOKEN_SOURCES = ("auto", *TOKEN_SOURCES)  # auto: the readouts when the bundle has one for each subject
LIVE_UNITS = "percent_signal_change"  # realtime.glm's betas: percent of the local signal level


def candidate_image_ids(data_root: str | Path, which, subjects: list[str] | None = None) -> np.ndarray:
    """int64 image ids a live run's retrieval ranks. `which`: "shared" (the design's shared images),
    "subjects" (every image the design shows `subjects`, e.g. ["subj01"]: a replayed session's seen
    image is then always a candidate), "all" (the stimulus brick), a list of ids (a real visit's
    stimulus set), or the path of a text file of ids (whitespace-separated; '#' starts a comment)."""
    layout = NSDLayout(Path(data_root))
    if not isinstance(which, str):
        return _image_ids(list(which), "decode.candidates")
    if which == "shared":
        return ExpDesign.read(layout.expdesign()).shared_images.astype(np.int64)
    if which == "subjects":
        if not subjects:
            raise ConfigValueError("candidates 'subjects' needs the served subjects (e.g. ['subj01'])")
        design = ExpDesign.read(layout.expdesign())
        rows = [int(subject.removeprefix("subj")) - 1 for subject in subjects]
        if not all(0 <= row < design.n_subjects for row in rows):
            raise ConfigValueError(f"candidates 'subjects': the design has subjects 1..{design.n_subjects}, "
                                   f"got {subjects}")
        return np.unique(design.subject_images[rows]).astype(np.int64)
    if which == "all":
        return np.arange(len(StimulusBrick(layout.stimuli())), dtype=np.int64)
    path = Path(which)
    if path.suffix or path.exists():  # a file of ids, by its look: a bare word is a misspelt choice
        if not path.is_file():
            raise MissingFileError(path, "file of candidate image ids")
        words = [line.split("#", 1)[0] for line in path.read_text().splitlines()]
        return _image_ids(" ".join(words).split(), path)
    raise ConfigValueError(f"candidate images must be one of {', '.join(CANDIDATE_CHOICES)}, a list of image ids "
                           f"or a file of them, got {which!r}")


def _image_ids(values: list, where) -> np.ndarray:
    try:
        ids = np.array([int(value) for value in values], dtype=np.int64)
    except (TypeError, ValueError):
        raise ConfigValueError(f"{where}: candidate image ids must be integers, got {values[:5]}...") from None
    if not len(ids) or (ids < 0).any():
        raise ConfigValueError(f"{where}: candidate image ids must be a non-empty list of ids >= 0")
    return np.unique(ids)


def noise_seed(seed: int, subject: str, betas_bv: np.ndarray) -> int:
    """The prior's generator seed for one decode call: a hash of the backend seed, the subject and the
    betas as float32, so it depends on nothing but the call's input."""
    digest = hashlib.sha256(f"{seed}:{subject}:{betas_bv.shape}:".encode())
    digest.update(np.ascontiguousarray(betas_bv, dtype=np.float32).tobytes())
    return int.from_bytes(digest.digest()[:8], "little") & (2**63 - 1)


class ModelBackend:
    """MindEye2 as named graphs on one runner (mindeye.bundle: eager, torch.compile, ONNX Runtime, TensorRT).

    Each decode z-scores the betas with the calibration, runs the subject's heads graph (aligner, backbone,
    retrieval and low-level heads), samples the prior by stepping its denoiser graph with a diffusers
    scheduler here (`prior_steps` of `prior_sampler`, mindeye.models.prior.PRIOR_SAMPLERS), ranks the
    retrieval bank, decodes the low-level latent with `codec` and, with a `generator` (a mindeye.generator
    pipeline, on the same graphs when it comes from a bundle), makes the reconstruction as `generation`
    says (steps, guidance, blend with the low-level image, img2img start); its noise is seeded like the
    prior's. `refinement`, off by default, runs MindEye2's img2img refinement stage over that. With
    `readouts` (subject -> mindeye.models.readout.TokenReadout, one for every decodable subject), the image
    tokens are the readout's map of the backbone tokens, in torch on the device whatever the graphs run on,
    and the prior is not sampled.

    The predicted image embedding whose norm `DecodedBatch.embedding_norm_b` reports is those image tokens,
    flattened; without them (`prior_steps=0`, no readouts) it is the retrieval head's tokens. `image_size`
    (pixels) defaults to the codec's own and is required for one without (the pixel codec). Use
    `load_backend` for a bundle, `TorchBackend` for a model in memory.
    """

    def __init__(self, graphs: GraphSet, config: MindEyeConfig, calibration: dict[str, tuple[np.ndarray, np.ndarray]],
                 *, bank: ExactBank | FaissBank | None = None, codec=None, image_size: int | None = None, top_k: int = 5,
                 prior_steps: int = 20, prior_sampler: str = "ddim", prior_cond_scale: float = 1.0,
                 null_brain_ld: torch.Tensor | None = None, generator: MindEyeUnCLIPPipeline | None = None,
                 generation: GenerationSettings = GenerationSettings(), refinement: Refinement | None = None,
                 readouts: dict[str, TokenReadout] | None = None, seed: int = 0):
        self.graphs, self.config, self.name = graphs, config, graphs.backend
        self.device = graphs.device
        self.bank, self.codec, self.top_k_count, self.prior_steps, self.seed = bank, codec, top_k, prior_steps, seed
        self.prior_sampler, self.prior_cond_scale = prior_sampler, prior_cond_scale
        self.null_brain_ld = None if null_brain_ld is None else null_brain_ld.to(self.device, torch.float32)
        if prior_cond_scale != 1.0 and null_brain_ld is None:
            raise ValueError("prior_cond_scale != 1 (guided prior) needs the prior's null brain tokens")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if not 0 <= prior_steps <= config.prior.timesteps:
            raise ValueError(f"prior_steps must be in [0, {config.prior.timesteps}] (0 skips the prior), "
                             f"got {prior_steps}")
        check_sampler(prior_sampler)
        if bank is not None and bank.token_shape != (config.clip_tokens, config.clip_dim):
            raise ValueError(f"the retrieval bank's tokens are {bank.token_shape}, the model predicts "
                             f"{(config.clip_tokens, config.clip_dim)}: the bank is from another CLIP encoder")
        self.image_size = image_size if image_size is not None else getattr(codec, "image_size", None)
        if codec is not None and config.low_level.enabled:
            self._check_codec(codec)
        self.generator, self.generation, self.refinement = generator, generation, refinement
        self._zscore = self._calibration_tensors(calibration)
        self.readouts = None if readouts is None else self._checked_readouts(readouts)
        if refinement is not None and generator is None:
            raise ValueError("a refinement stage refines the generator's images: it needs a generator")
        if generator is not None:
            self._check_generator(generator, generation)

    def subjects(self) -> list[str]:
        """Subjects the model has an aligner (heads graph) for and the calibration has statistics for."""
        return list(self._zscore)

    def n_voxels(self, subject: str) -> int:
        self._check_subject(subject)
        return self.config.voxels_per_subject[subject]

    @torch.inference_mode()
    def decode(self, subject: str, betas_bv: np.ndarray) -> DecodedBatch:
        betas_bv = self._checked_betas(subject, betas_bv)
        start = time.perf_counter()
        mean_v, std_v = self._zscore[subject]
        voxels_bv = (torch.from_numpy(betas_bv).to(self.device) - mean_v) / std_v
        backbone_bld, retrieval_bld, *low_level = self.graphs(heads_graph(subject), voxels_bv)
        retrieval_bld = retrieval_bld.cpu().numpy()
        image_tokens_bld = None
        if self.readouts is not None:
            image_tokens_bld = self.readouts[subject](backbone_bld).cpu().numpy()
        elif self.prior_steps > 0:
            generator = torch.Generator(backbone_bld.device).manual_seed(noise_seed(self.seed, subject, betas_bv))
            sampled = sample_prior(lambda x, t, brain: self.graphs(PRIOR_DENOISER, x, t, brain)[0], backbone_bld,
                                   steps=self.prior_steps, sampler=self.prior_sampler,
                                   timesteps=self.config.prior.timesteps, generator=generator,
                                   cond_scale=self.prior_cond_scale, null_brain_ld=self.null_brain_ld)
            image_tokens_bld = sampled.cpu().numpy()
        embedding_bld = image_tokens_bld if image_tokens_bld is not None else retrieval_bld
        embedding_norm_b = np.linalg.norm(embedding_bld.reshape(len(embedding_bld), -1), axis=1).astype(np.float32)
        top_k = (self.bank.top_k(retrieval_bld, self.top_k_count) if self.bank is not None
                 else [[] for _ in range(len(betas_bv))])
        decoded = time.perf_counter()
        lowlevel_bhw3 = None
        if self.codec is not None and low_level:
            pixels_b3hw = self.codec.decode(low_level[0].to(self._codec_device()), image_size=self.image_size)
            lowlevel_bhw3 = (pixels_b3hw.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
        reconstruction_bhw3 = None
        if self.generator is not None:
            reconstruction_bhw3 = reconstruct(self.generator, image_tokens_bld, low_level_nhwc=lowlevel_bhw3,
                                              settings=self.generation, output_size=self.image_size,
                                              seed=noise_seed(self.seed + 1, subject, betas_bv)).images
            if self.refinement is not None:
                reconstruction_bhw3 = refine(self.refinement, image_tokens_bld, reconstruction_bhw3,
                                             low_level_nhwc=lowlevel_bhw3,
                                             seed=noise_seed(self.seed + 2, subject, betas_bv))
        generated = time.perf_counter()
        return DecodedBatch(embedding_norm_b, top_k, image_tokens_bld, lowlevel_bhw3,
                            decode_ms=(decoded - start) * 1e3, generate_ms=(generated - decoded) * 1e3,
                            reconstruction_bhw3=reconstruction_bhw3)

    def _check_codec(self, codec) -> None:
        low = self.config.low_level
        if (codec.channels, codec.latent_size) != (low.latent_channels, low.latent_size):
            raise ValueError(f"the codec decodes latents of {codec.channels} x {codec.latent_size} x "
                             f"{codec.latent_size}, the model's low-level head predicts {low.latent_channels} x "
                             f"{low.latent_size} x {low.latent_size}")
        if self.image_size is None:
            raise ValueError(f"image_size is required with a {type(codec).__name__}, "
                             "which has no image size of its own")

    def _check_generator(self, generator: MindEyeUnCLIPPipeline, generation: GenerationSettings) -> None:
        config = self.config
        if self.prior_steps == 0 and self.readouts is None:
            raise ValueError("a generator needs image tokens: prior_steps >= 1, or readouts")
        if tuple(generator.token_shape) not in ((config.clip_tokens, config.clip_dim), (None, config.clip_dim)):
            raise ValueError(f"the generator takes CLIP tokens {generator.token_shape}, the model predicts "
                             f"{(config.clip_tokens, config.clip_dim)}: they come from different CLIP encoders")
        if self.image_size is None:
            raise ValueError("image_size is required with a generator (the size of the published images)")
        generation.check()

    def _checked_readouts(self, readouts: dict[str, TokenReadout]) -> dict[str, TokenReadout]:
        """`readouts` on the device, after checking they cover every decodable subject and the model's tokens."""
        missing = [subject for subject in self.subjects() if subject not in readouts]
        if missing:
            raise ConfigValueError(f"no token readout for {missing} (readouts: {sorted(readouts)}); "
                                   f"{how_to_get_readouts('generate.tokens')}")
        tokens = (self.config.clip_tokens, self.config.clip_dim)
        for subject in self.subjects():
            if readouts[subject].token_shape != tokens:
                raise ValueError(f"{subject}'s readout predicts tokens {readouts[subject].token_shape}, the model's "
                                 f"are {tokens}")
        return {subject: readouts[subject].to(self.device) for subject in self.subjects()}

    def _codec_device(self) -> torch.device:
        """Where the codec computes: its VAE's device, the CPU for the pixel codec."""
        vae = getattr(self.codec, "vae", None)
        return next(vae.parameters()).device if vae is not None else torch.device("cpu")

    def _calibration_tensors(self, calibration) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """subject -> (mean (V,), std (V,)) float32 on the device, for the subjects the graphs also decode."""
        model_voxels = {s: n for s, n in self.config.voxels_per_subject.items() if heads_graph(s) in self.graphs}
        tensors = {}
        for subject, (mean_v, std_v) in calibration.items():
            if subject not in model_voxels:
                continue  # statistics of a subject this model cannot decode
            n = model_voxels[subject]
            if np.shape(mean_v) != (n,) or np.shape(std_v) != (n,):
                raise ValueError(f"calibration of {subject!r} has mean {np.shape(mean_v)} and std {np.shape(std_v)}; "
                                 f"the model's aligner for {subject!r} takes {n} voxels")
            if not (np.isfinite(mean_v).all() and np.isfinite(std_v).all() and (np.asarray(std_v) > 0).all()):
                raise ValueError(f"calibration of {subject!r}: mean must be finite and std finite and positive")
            tensors[subject] = tuple(torch.as_tensor(np.asarray(x, dtype=np.float32), device=self.device)
                                     for x in (mean_v, std_v))
        if not tensors:
            raise ValueError(f"the calibration has statistics for {sorted(calibration)}, none of the model's subjects "
                             f"{list(model_voxels)}")
        return tensors

    def _check_subject(self, subject: str) -> None:
        if subject in self._zscore:
            return
        if subject in self.config.voxels_per_subject:
            raise ValueError(f"subject {subject!r} has no calibration statistics; decodable subjects: "
                             f"{self.subjects()}")
        raise ValueError(f"unknown subject {subject!r}; decodable subjects: {self.subjects()}")

    def _checked_betas(self, subject: str, betas_bv: np.ndarray) -> np.ndarray:
        """`betas_bv` as float32 (B, V) after checking the subject, shape and values."""
        self._check_subject(subject)
        n = self.config.voxels_per_subject[subject]
        betas_bv = np.asarray(betas_bv)
        if betas_bv.ndim != 2 or betas_bv.shape[0] < 1 or betas_bv.shape[1] != n:
            raise ValueError(f"betas of {subject!r} must be (B >= 1, {n} voxels), got shape {betas_bv.shape}")
        if not np.issubdtype(betas_bv.dtype, np.floating):
            raise ValueError(f"betas must be floating point (percent signal change), got {betas_bv.dtype}")
        betas_bv = np.ascontiguousarray(betas_bv, dtype=np.float32)
        bad_b = (~np.isfinite(betas_bv)).sum(axis=1)
        if bad_b.any():
            raise ValueError(f"betas of {subject!r} hold {int(bad_b.sum())} NaN/inf values in trials (rows) "
                             f"{np.flatnonzero(bad_b).tolist()}")
        return betas_bv


class TorchBackend(ModelBackend):
    """A MindEye2 in memory, eager (or `compile=True`: torch.compile) on one device, in `dtype`.

    The backend takes the model over: it is moved to `device`/`dtype` and set to eval; `model` stays
    reachable as `.model`. A `generator` pipeline given here runs as it is (eager). Other arguments: ModelBackend.
    """

    def __init__(self, model: MindEye2, calibration: dict[str, tuple[np.ndarray, np.ndarray]], *,
                 device: str = "cpu", dtype: torch.dtype = torch.float32, compile: bool = False, **kwargs):
        self.model = model.to(device=device, dtype=dtype).eval()
        graphs = TorchGraphs(model_graphs(model, list(model.aligner.voxels_per_subject)), device=device, dtype=dtype,
                             compile=compile)
        super().__init__(graphs, model.config, calibration, null_brain_ld=model.prior.null_brain_tokens.detach(),
                         **kwargs)

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | Path, **kwargs) -> TorchBackend:
        """The checkpoint's model and calibration statistics (MissingFileError naming the absent file).

        The calibration must describe betas in LIVE_UNITS, what the service's GLM feeds: statistics of other
        units (MindEye2's per-session z-scored betas) would shift and scale every live input silently.
        """
        read_checkpoint_config(checkpoint_dir)  # a folder without a model is named as such, before its calibration
        units, estimator = calibration_units(checkpoint_dir)
        _require_live_units(units, estimator, Path(checkpoint_dir) / CALIBRATION_FILE,
                            f"mindeye-calibrate checkpoint={checkpoint_dir} session=N")
        model = load_checkpoint(checkpoint_dir, device=kwargs.get("device", "cpu"))
        return cls(model, load_calibration(checkpoint_dir), **kwargs)


def load_backend(bundle_dir: str | Path, backend: str = "auto", *, device: str = "cpu", threads: int | None = None,
                 int8: bool = False, precision: str = "fp16", dtype: torch.dtype = torch.float32,
                 with_generator: bool = True, tokens: str = "prior", **kwargs) -> ModelBackend:
    """The decode backend for an export bundle (mindeye.bundle; docs/export.md) on `backend` ("auto": the
    fastest present here): its graphs, calibration and, with `with_generator`, its generator on the same
    graphs, drawing from the prior's tokens or (`tokens="readout"`) the checkpoint's token readouts; "auto":
    the readouts when there is one for each of the bundle's subjects, else the prior. `dtype`:
    eager and compile's weights; `threads`, `int8`: ONNX Runtime's; `precision`: TensorRT's. Refused: a
    calibration in other units than the live service's, a backend the export's parity check failed. Other
    arguments: ModelBackend (bank, codec, image_size, prior steps, generation...)."""
    check_token_source(tokens, "tokens", LIVE_TOKEN_SOURCES)
    bundle = read_manifest(bundle_dir)
    calibration = bundle.manifest["calibration"]
    _require_live_units(calibration["units"], calibration["estimator"], bundle.root / calibration["file"],
                        "mindeye-calibrate checkpoint=<the checkpoint> session=N, then mindeye-export it again")
    backend = resolve_backend(backend, bundle, device)
    failed = [graph for key, figures in bundle.manifest.get("parity", {}).items()
              if key == backend or key.startswith(f"{backend}-") and key.endswith(precision)
              for graph, figure in figures.items() if isinstance(figure, dict) and figure.get("passed") is False]
    if failed:
        raise ConfigValueError(f"{bundle.root}: {backend} failed its parity check against eager at export on "
                               f"{failed} (manifest.json's parity); choose another decode.backend")
    graphs = load_graphs(bundle, backend, device=device, dtype=dtype, threads=threads, int8=int8, precision=precision,
                         max_batch=kwargs.pop("max_batch", 8))
    generator = None
    if with_generator and bundle.generator_dir is not None:
        generator = graph_pipeline(bundle.generator_dir, graphs)
    config, _ = read_checkpoint_config(bundle.checkpoint_dir)
    with safe_open(bundle.checkpoint_dir / WEIGHTS_FILE, "pt") as weights:  # guidance's unconditional input
        null_brain_ld = weights.get_tensor(NULL_BRAIN_TOKENS)
    readouts = None if tokens == "prior" else load_readouts(bundle.checkpoint_dir)
    if tokens == "auto" and not set(bundle.subjects) <= set(readouts):
        readouts = None
    elif tokens == "readout" and not readouts:
        raise MissingFileError(bundle.checkpoint_dir / READOUT_FILE, "token readouts",
                               f"the exported checkpoint has none, export one that has: "
                               f"{how_to_get_readouts('generate.tokens')}")
    return ModelBackend(graphs, config, load_calibration(bundle.checkpoint_dir), generator=generator,
                        null_brain_ld=null_brain_ld, readouts=readouts, **kwargs)


def _require_live_units(units: str, estimator: str, path: Path, fix: str) -> None:
    if units != LIVE_UNITS:
        raise ConfigValueError(f"{path} describes betas in {units} ({estimator}); the live service feeds {LIVE_UNITS} "
                               f"from its realtime GLM. Make a live calibration: {fix}")
