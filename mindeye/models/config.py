"""`MindEyeConfig`: everything needed to build a MindEye2 model, frozen and JSON-safe.

A model is fully described by its config: `build_model(config)` makes it, a checkpoint stores it
beside the weights, and `from_dict(to_dict())` round-trips exactly. Defaults are the paper's
model (h = 4096, OpenCLIP ViT-bigG/14 tokens 256 x 1664); only the subjects have no default.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

_SUBJECT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")  # usable as an nn.ModuleDict key


def _check_int(where: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{where} must be an integer >= {minimum}, got {value!r}")


def _check_prob(where: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{where} must be a number in [0, 1), got {value!r}")


def _check_bool(where: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{where} must be true or false, got {value!r}")


@dataclass(frozen=True)
class LowLevelConfig:
    """Low-level head: brain latent -> SD-VAE latent (latent_channels, latent_size, latent_size).

    The latent is first a (feature_channels, s, s) map with s = latent_size / 2**(len(decoder_channels) - 1),
    then a diffusers VAE-style decoder upsamples it 2x per block after the first (paper: 64x7x7 -> 4x28x28).
    """

    enabled: bool = True
    latent_channels: int = 4  # SD VAE latent channels
    latent_size: int = 28  # 224 px image / 8 (the official code's size; the paper text says 64)
    feature_channels: int = 64
    decoder_channels: tuple[int, ...] = (32, 64, 128)  # diffusers `block_out_channels`, widest last
    norm_groups: int = 32  # GroupNorm groups inside the decoder; must divide every decoder width
    dropout: float = 0.3  # on the first feature map, as in the official head

    @property
    def feature_size(self) -> int:
        return self.latent_size // 2 ** (len(self.decoder_channels) - 1)

    def validate(self, where: str = "low_level") -> None:
        _check_bool(f"{where}.enabled", self.enabled)
        for name in ("latent_channels", "latent_size", "feature_channels", "norm_groups"):
            _check_int(f"{where}.{name}", getattr(self, name), 1)
        _check_prob(f"{where}.dropout", self.dropout)
        if not self.decoder_channels:
            raise ValueError(f"{where}.decoder_channels must list at least one width")
        for width in self.decoder_channels:
            _check_int(f"{where}.decoder_channels[]", width, 1)
            if width % self.norm_groups:
                raise ValueError(f"{where}.decoder_channels {list(self.decoder_channels)} must all be divisible "
                                 f"by norm_groups={self.norm_groups}")
        factor = 2 ** (len(self.decoder_channels) - 1)
        if self.latent_size % factor:
            raise ValueError(f"{where}.latent_size={self.latent_size} must be divisible by {factor}: "
                             f"{len(self.decoder_channels)} decoder blocks upsample {factor}x")


@dataclass(frozen=True)
class PriorConfig:
    """Diffusion prior over the image tokens; its width is the model's `clip_dim`.

    Attention projects to heads * dim_head and back (as the official prior does), so that product
    need not equal clip_dim; the paper uses 32 x 52 = 1664 all the same.
    """

    depth: int = 6
    heads: int = 32
    dim_head: int = 52
    ff_mult: int = 4  # SwiGLU inner width = ff_mult * clip_dim
    timesteps: int = 100
    schedule: str = "cosine"  # Nichol & Dhariwal; the only schedule the official prior used
    cond_drop_prob: float = 0.2  # brain tokens -> learned null tokens, for classifier-free guidance
    rotary_dim: int = 32  # leading features of each head that get rotary position embeddings
    rel_pos_buckets: int = 32  # T5-style relative position bias
    rel_pos_max_distance: int = 128

    def validate(self, where: str = "prior") -> None:
        for name in ("depth", "heads", "dim_head", "ff_mult", "rel_pos_buckets", "rel_pos_max_distance"):
            _check_int(f"{where}.{name}", getattr(self, name), 1)
        _check_int(f"{where}.timesteps", self.timesteps, 2)
        _check_int(f"{where}.rotary_dim", self.rotary_dim, 2)
        _check_prob(f"{where}.cond_drop_prob", self.cond_drop_prob)
        if self.schedule != "cosine":
            raise ValueError(f"{where}.schedule must be 'cosine', got {self.schedule!r}")
        if self.rotary_dim % 2 or self.rotary_dim > self.dim_head:
            raise ValueError(f"{where}.rotary_dim={self.rotary_dim} must be even and <= dim_head={self.dim_head}")
        if self.rel_pos_max_distance <= self.rel_pos_buckets // 2:
            raise ValueError(f"{where}.rel_pos_max_distance={self.rel_pos_max_distance} must exceed "
                             f"rel_pos_buckets / 2 = {self.rel_pos_buckets // 2}")


@dataclass(frozen=True)
class RetrievalConfig:
    """Retrieval head: `depth` x [LayerNorm, GELU, Linear(clip_dim, clip_dim)] on every token."""

    depth: int = 3

    def validate(self, where: str = "retrieval") -> None:
        _check_int(f"{where}.depth", self.depth, 1)


@dataclass(frozen=True)
class MindEyeConfig:
    """Aligner (one linear per subject) -> residual MLP backbone -> token linear -> heads and prior."""

    voxels_per_subject: dict[str, int]  # e.g. {"subj01": 15724}; order = aligner order
    hidden_dim: int = 4096
    n_blocks: int = 4
    dropout: float = 0.15
    residual_blocks: bool = True  # False: aligner -> token linear, what the official model computes
    clip_tokens: int = 256
    clip_dim: int = 1664
    low_level: LowLevelConfig = field(default_factory=LowLevelConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.voxels_per_subject, Mapping) or not self.voxels_per_subject:
            raise ValueError("voxels_per_subject must map at least one subject name to its voxel count, "
                             f"got {self.voxels_per_subject!r}")
        for name, n_voxels in self.voxels_per_subject.items():
            if not isinstance(name, str) or not _SUBJECT_NAME.match(name):
                raise ValueError(f"subject name {name!r} must be letters, digits, '_' or '-' (no dots)")
            _check_int(f"voxels_per_subject[{name!r}]", n_voxels, 1)
        object.__setattr__(self, "voxels_per_subject", dict(self.voxels_per_subject))  # a private copy
        for name in ("hidden_dim", "clip_tokens", "clip_dim"):
            _check_int(name, getattr(self, name), 1)
        _check_int("n_blocks", self.n_blocks, 0)
        _check_prob("dropout", self.dropout)
        _check_bool("residual_blocks", self.residual_blocks)
        if self.clip_dim % 2:
            raise ValueError(f"clip_dim={self.clip_dim} must be even (sinusoidal timestep embedding)")
        for sub, kind in (("low_level", LowLevelConfig), ("prior", PriorConfig), ("retrieval", RetrievalConfig)):
            if not isinstance(getattr(self, sub), kind):
                raise ValueError(f"{sub} must be a {kind.__name__}, got {type(getattr(self, sub)).__name__}")
            getattr(self, sub).validate(sub)

    @property
    def subjects(self) -> list[str]:
        return list(self.voxels_per_subject)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types only (tuples become lists)."""
        return _jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MindEyeConfig:
        """Inverse of `to_dict`; unknown or misspelled keys are an error, missing ones take defaults."""
        data = _known_fields(cls, data, "MindEyeConfig")
        for sub, kind in (("low_level", LowLevelConfig), ("prior", PriorConfig), ("retrieval", RetrievalConfig)):
            if sub in data:
                if not isinstance(data[sub], Mapping):
                    raise ValueError(f"{sub} must be a mapping, got {data[sub]!r}")
                fields = _known_fields(kind, data[sub], sub)
                if "decoder_channels" in fields:
                    fields["decoder_channels"] = tuple(fields["decoder_channels"])
                data[sub] = kind(**fields)
        if "voxels_per_subject" not in data or data["voxels_per_subject"] is None:
            raise ValueError("voxels_per_subject is not set: the model needs each subject's voxel count "
                             "(configs that leave it null expect the caller to pass voxels_per_subject=...)")
        return cls(**data)


def _known_fields(kind: type, data: Mapping[str, Any], where: str) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}; valid keys: {sorted(names)}")
    return dict(data)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
