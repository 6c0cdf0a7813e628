"""Import a checkpoint saved by the official MindEyeV2 code (github.com/MedARC-AI/MindEyeV2).

The official script saves `torch.save({'epoch', 'model_state_dict', 'optimizer_state_dict',
'lr_scheduler', ...})` of a module with `ridge.linears.N` (one Linear per subject, in the order
of its training subject list), `backbone.*` (`BrainNetwork`) and `diffusion_prior.*`
(`BrainDiffusionPrior` around dalle2-pytorch's prior layout). What carries over:

- ridge -> aligner; backbone_linear -> token linear; clip_proj -> retrieval head;
  blin1 / bnorm / bupsampler -> low-level head (the same diffusers decoder);
  every prior weight except the null image embedding -> prior, one to one.
- mixer_blocks2: with a length-1 sequence each block only adds a constant C_k to every feature,
  so sum(C_k) is folded into the biases of the token linear and of blin1.
- mixer_blocks1: their output is discarded by the official forward (the LayerNorm over a length-1
  axis in mixer_blocks2 returns only its bias; their gradient is zero up to float rounding), so they are not imported; our residual blocks
  start as the identity (output layer zeroed).
Together the imported model computes what the official model computed (eval mode), and its
residual blocks can then be trained. Everything else is listed in the report with the reason.
Settings that leave every weight shape unchanged cannot be read off the checkpoint, so the config must
give them the official values (`OFFICIAL_SETTINGS`); a config that does not is refused.
"""
from __future__ import annotations

import pickle
import re
import warnings
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from mindeye.errors import MissingFileError
from mindeye.models.config import MindEyeConfig
from mindeye.models.factory import load_config
from mindeye.models.mindeye2 import MindEye2
from mindeye.models.prior import cosine_alphas_cumprod

_PRIOR = r"diffusion_prior\.net\."
_LAYER = _PRIOR + r"causal_transformer\.layers\.(\d+)\."
# (official key pattern, our key template): weights that are copied unchanged.
_RENAMES: list[tuple[str, str]] = [
    (r"backbone\.backbone_linear\.(weight|bias)", r"backbone.to_tokens.\1"),
    (r"backbone\.clip_proj\.(.+)", r"retrieval_head.\1"),
    (r"backbone\.blin1\.(weight|bias)", r"low_level_head.to_features.\1"),
    (r"backbone\.bnorm\.(.+)", r"low_level_head.norm.\1"),
    (r"backbone\.bupsampler\.(.+)", r"low_level_head.upsampler.\1"),
    (_PRIOR + r"to_time_embeds\.0\.1\.net\.0\.0\.(.+)", r"prior.time_mlp.0.\1"),
    (_PRIOR + r"to_time_embeds\.0\.1\.net\.1\.0\.(.+)", r"prior.time_mlp.2.\1"),
    (_PRIOR + r"to_time_embeds\.0\.1\.net\.2\.(.+)", r"prior.time_mlp.4.\1"),
    (_PRIOR + r"learned_query", "prior.image_pos_emb"),
    (_PRIOR + r"null_brain_embeds", "prior.null_brain_tokens"),
    (_PRIOR + r"causal_transformer\.rel_pos_bias\.relative_attention_bias\.weight", "prior.rel_pos_bias.weight"),
    (_LAYER + r"0\.norm\.g", r"prior.blocks.\1.attn_norm.weight"),
    (_LAYER + r"0\.null_kv", r"prior.blocks.\1.null_kv"),
    (_LAYER + r"0\.to_q\.weight", r"prior.blocks.\1.to_q.weight"),
    (_LAYER + r"0\.to_kv\.weight", r"prior.blocks.\1.to_kv.weight"),
    (_LAYER + r"0\.to_out\.0\.weight", r"prior.blocks.\1.to_out.weight"),
    (_LAYER + r"0\.to_out\.1\.g", r"prior.blocks.\1.attn_out_norm.weight"),
    (_LAYER + r"1\.0\.g", r"prior.blocks.\1.ff_norm.weight"),
    (_LAYER + r"1\.1\.weight", r"prior.blocks.\1.ff_in.weight"),
    (_LAYER + r"1\.5\.weight", r"prior.blocks.\1.ff_out.weight"),
    (_PRIOR + r"causal_transformer\.norm\.g", "prior.final_norm.weight"),
    (_PRIOR + r"causal_transformer\.project_out\.weight", "prior.project_out.weight"),
]
# (official key pattern, why nothing takes it).
_NOT_IMPORTED: list[tuple[str, str]] = [
    (r"backbone\.mixer_blocks1\..+", "official residual block whose output the forward discards (LayerNorm over "
     "a length-1 axis in mixer_blocks2): no effect on the official model; our blocks start as the identity"),
    (r"backbone\.b_maps_projector\..+", "auxiliary head for the ConvNeXt-feature contrastive loss, used only in "
     "training; not part of this model"),
    (_PRIOR + r"null_image_embed", "official training also swaps the noisy image tokens for this embedding "
     "(p = 0.2) and its guidance branch drops them; this prior drops only the brain tokens, so it has no use"),
    (_PRIOR + r"to_time_embeds\.0\.weight", "learned per-timestep embedding table; this prior embeds the "
     "timestep sinusoidally + MLP, as the paper's prior did"),
]


_NOT_IN_CHECKPOINT = "not in the official checkpoint"


class OfficialSetting(NamedTuple):
    """A setting's official value, which weights it affects and where the value comes from."""

    value: Any
    governs: str  # official key prefix of the weights it applies to: checked only when those are imported
    recorded_in: str | None  # a checkpoint buffer that records it; if present, `_derived` checks against that
    source: str


# Config settings that change what the official weights compute but not their shapes, with the values the
# official code used (MedARC-AI/MindEyeV2; src/setup.sh pins diffusers==0.23.0, dalle2-pytorch unpinned).
# Not listed: the rotary width (official min(32, dim_head), FlaggedCausalTransformer) is recorded in
# rotary_emb.freqs and checked by `_derived`; non-causal attention (Train: causal=False), rotary use, the
# cosine-sim scale 16 and LayerNorm eps 1e-5 (dalle2_pytorch.py Attention, LayerNorm) are fixed in our prior,
# not settings; dropouts and cond_drop_prob change only training, not what the imported model computes.
OFFICIAL_SETTINGS: dict[str, OfficialSetting] = {
    # src/models.py BrainNetwork: bupsampler = Decoder(..., block_out_channels=[32, 64, 128], layers_per_block=1)
    # passes no norm_num_groups, so diffusers' default 32 applies (models/vae.py in 0.23.0)
    "low_level.norm_groups": OfficialSetting(32, "backbone.bupsampler.", None,
                                             "diffusers Decoder default norm_num_groups"),
    # src/models.py FlaggedCausalTransformer: RelPosBias(heads=heads), so dalle2_pytorch.py's defaults
    # num_buckets=32 (visible as the embedding's shape) and max_distance=128 (visible nowhere)
    "prior.rel_pos_max_distance": OfficialSetting(128, "diffusion_prior.net.causal_transformer.", None,
                                                  "DALLE2-pytorch RelPosBias default max_distance"),
    # src/Train.ipynb (src/Train.py until Feb 2024): timesteps = 100 -> BrainDiffusionPrior(timesteps=...);
    # the checkpoint's own noise_scheduler buffer, when present, is checked instead
    "prior.timesteps": OfficialSetting(100, "diffusion_prior.net.", "diffusion_prior.noise_scheduler.alphas_cumprod",
                                       "MindEyeV2 Train timesteps"),
}


@dataclass
class ImportReport:
    """Per official key what happened to it, and per our key what was not filled from the checkpoint."""

    mapped: dict[str, str] = field(default_factory=dict)  # official key -> our key, copied exactly
    folded: dict[str, str] = field(default_factory=dict)  # official key -> how it entered our weights
    derived: dict[str, str] = field(default_factory=dict)  # official key -> recomputed from the config (checked)
    unmapped: dict[str, str] = field(default_factory=dict)  # official key -> why nothing takes it
    fresh: dict[str, str] = field(default_factory=dict)  # our key -> why it keeps its initial value

    def summary(self) -> str:
        lines = []
        for title, entries in (("mapped", self.mapped), ("folded", self.folded), ("derived", self.derived),
                               ("unmapped", self.unmapped), ("fresh (ours)", self.fresh)):
            lines.append(f"{title}: {len(entries)} tensors")
            if title == "mapped":
                continue
            by_reason: dict[str, list[str]] = defaultdict(list)
            for key, reason in entries.items():
                by_reason[reason].append(key)
            for reason, keys in by_reason.items():
                more = f" (+{len(keys) - 2} more)" if len(keys) > 2 else ""
                lines.append(f"  {', '.join(keys[:2])}{more}: {reason}")
        return "\n".join(lines)


def import_official_checkpoint(path: str | Path, subjects: Sequence[str],
                               config: MindEyeConfig | Mapping[str, Any] | str, *,
                               trust_pickle: bool = False) -> tuple[MindEye2, ImportReport]:
    """Read an official `.pth` file and import its `model_state_dict` (see `import_official_state_dict`).

    The official file also pickles Python objects (its lr_scheduler state); torch then refuses it
    under `weights_only`. Pass `trust_pickle=True` only for a file from a source you trust.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(path, "official MindEyeV2 checkpoint")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as error:
        raise ValueError(f"{path} holds pickled Python objects besides tensors, which torch.load refuses to run "
                         f"by default; if the file comes from a source you trust, pass trust_pickle=True "
                         f"({error})") from error
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{path}: expected a dict with 'model_state_dict' (or a state dict), got "
                         f"{type(checkpoint).__name__}")
    return import_official_state_dict(checkpoint, subjects, config)


def import_official_state_dict(state_dict: Mapping[str, torch.Tensor], subjects: Sequence[str],
                               config: MindEyeConfig | Mapping[str, Any] | str) -> tuple[MindEye2, ImportReport]:
    """A MindEye2 built from `config` holding every official weight that corresponds, and the report.

    `subjects` names the official `ridge.linears.N` in order (the training subject list); each must be
    in the config with the same voxel count. Parameters the checkpoint does not provide keep their
    initial values, are listed in `report.fresh` and, beyond the identity residual blocks and the
    aligners of other subjects, trigger a warning.
    """
    config = load_config(config)
    state = dict(state_dict.get("model_state_dict", state_dict))  # the whole official checkpoint dict also works
    _check_official_settings(state, config)
    model = MindEye2(config)
    ours = model.state_dict()
    report = ImportReport()
    filled: set[str] = set()

    def put(our_key: str, value: torch.Tensor) -> None:
        with torch.no_grad():
            ours[our_key].copy_(value)
        filled.add(our_key)

    ridge = _ridge_targets(state, subjects, config)
    offset = _folded_constant(state, report)
    for key, value in state.items():
        if key in ridge:
            put(ridge[key], value)
            report.mapped[key] = ridge[key]
        elif key.startswith("backbone.mixer_blocks2.") and offset is not None:
            continue  # already in report.folded
        elif (derived := _derived(key, value, config)) is not None:
            report.derived[key] = derived
        elif (target := _rename(key)) is None:
            report.unmapped[key] = next((why for pattern, why in _NOT_IMPORTED if re.fullmatch(pattern, key)),
                                        "no counterpart in MindEye2 known to this importer")
        elif target not in ours:
            report.unmapped[key] = f"would be {target}, which a model built from this config does not have"
        elif tuple(ours[target].shape) != tuple(value.shape):  # the config describes another model: refuse
            raise ValueError(f"{key} has shape {tuple(value.shape)} but {target} of a model built from this config "
                             f"has {tuple(ours[target].shape)}: the config does not describe this checkpoint; use "
                             "configs/model/paper.yaml or match its sizes to the checkpoint")
        elif key in ("backbone.backbone_linear.bias", "backbone.blin1.bias") and offset is not None:
            weight = state[key.removesuffix("bias") + "weight"]  # Linear(x + C) = W x + (b + C * row sums of W)
            put(target, (value.double() + offset * weight.double().sum(dim=1)).to(value.dtype))
            report.folded[key] = f"-> {target} + (sum of the mixer_blocks2 constants) x row sums of the weight"
        else:
            put(target, value)
            report.mapped[key] = target

    _record_fresh(model, filled, subjects, offset is not None, report)
    surprising = [key for key, why in report.fresh.items() if why == _NOT_IN_CHECKPOINT]
    if surprising:
        warnings.warn(f"{len(surprising)} parameter tensors were not in the official checkpoint and keep their "
                      f"random initial values: {surprising[:5]}{' ...' if len(surprising) > 5 else ''}",
                      stacklevel=2)
    return model, report


def _check_official_settings(state: Mapping[str, torch.Tensor], config: MindEyeConfig) -> None:
    """Refuse a config whose shape-neutral settings differ from the official ones the weights were trained with."""
    for setting, official in OFFICIAL_SETTINGS.items():
        part, name = setting.split(".")
        ours = getattr(getattr(config, part), name)
        imported = any(key.startswith(official.governs) for key in state)
        if part == "low_level" and not config.low_level.enabled:
            imported = False  # no low-level head: its decoder weights are not imported
        if ours != official.value and imported and official.recorded_in not in state:
            raise ValueError(f"{setting}={ours!r} but the official model used {official.value!r} "
                             f"({official.source}); the weights cannot show this, so the imported model would "
                             f"compute something else: use configs/model/paper.yaml or set "
                             f"{setting}={official.value!r}")


def _ridge_targets(state: Mapping[str, torch.Tensor], subjects: Sequence[str], config: MindEyeConfig) -> dict[str, str]:
    """official ridge key -> our aligner key, after checking subject order and voxel counts."""
    indices = sorted({int(m.group(1)) for k in state if (m := re.fullmatch(r"ridge\.linears\.(\d+)\.weight", k))})
    if indices != list(range(len(subjects))):
        raise ValueError(f"the checkpoint has {len(indices)} ridge linears (indices {indices}) but "
                         f"{len(subjects)} subjects were named: {list(subjects)}")
    targets = {}
    for index, subject in enumerate(subjects):
        if subject not in config.voxels_per_subject:
            raise ValueError(f"subject {subject!r} is not in the config's voxels_per_subject {config.subjects}")
        n_voxels = state[f"ridge.linears.{index}.weight"].shape[1]
        if n_voxels != config.voxels_per_subject[subject]:
            raise ValueError(f"ridge.linears.{index} takes {n_voxels} voxels but the config gives {subject!r} "
                             f"{config.voxels_per_subject[subject]}: is `subjects` in the training order?")
        for part in ("weight", "bias"):
            targets[f"ridge.linears.{index}.{part}"] = f"aligner.linears.{subject}.{part}"
    return targets


def _folded_constant(state: Mapping[str, torch.Tensor], report: ImportReport) -> torch.Tensor | None:
    """sum_k C_k, the constant the official mixer_blocks2 add to every feature (eval mode); None if absent.

    Block k sees a length-1 axis: LayerNorm returns its bias beta_k, and the MLP maps that to
    C_k = W2 GELU(W1 beta_k + b1) + b2, the same for every input.
    """
    blocks = sorted({int(m.group(1)) for k in state if (m := re.match(r"backbone\.mixer_blocks2\.(\d+)\.", k))})
    if not blocks:
        return None
    total = torch.zeros((), dtype=torch.float64)
    for k in blocks:
        p = f"backbone.mixer_blocks2.{k}."
        beta, w1, b1, w2, b2 = (state[p + name].double() for name in ("0.bias", "1.0.weight", "1.0.bias",
                                                                        "1.3.weight", "1.3.bias"))
        if beta.numel() != 1:
            raise ValueError(f"{p}0.bias has {beta.numel()} entries: only the seq_len=1 BrainNetwork of MindEye2 "
                             "can be imported (its mixer_blocks2 reduce to constants)")
        total = total + (w2 @ F.gelu(w1 @ beta + b1) + b2).squeeze()
    for key in state:
        if key.startswith("backbone.mixer_blocks2."):
            report.folded[key] = (f"each block adds a constant to every feature; their sum, {total.item():+.6g}, "
                                  "is folded into the token-linear and blin1 biases")
    return total


def _derived(key: str, value: torch.Tensor, config: MindEyeConfig) -> str | None:
    """A note if `key` is a buffer our prior recomputes from its config; raises if the config disagrees."""
    if key.startswith("diffusion_prior.noise_scheduler."):
        if key.endswith(".alphas_cumprod"):
            ours = cosine_alphas_cumprod(config.prior.timesteps).float()
            if value.shape != ours.shape or not torch.allclose(value.float(), ours, atol=1e-6):
                raise ValueError(f"{key} ({value.numel()} steps) is not the cosine schedule of "
                                 f"prior.timesteps={config.prior.timesteps}: set the config to the official schedule")
            return "noise schedule; recomputed from prior.timesteps and checked equal"
        return "noise schedule term, computed from alpha-bar"
    if ".rotary_emb." in key:
        if key.endswith(".freqs"):
            r = config.prior.rotary_dim
            ours = 1.0 / 10000 ** (torch.arange(0, r, 2).float() / r)
            if value.shape != ours.shape or not torch.allclose(value.float(), ours):
                raise ValueError(f"{key} has {value.numel()} frequencies, not those of prior.rotary_dim={r} "
                                 "(official: min(32, dim_head))")
            return "rotary frequencies; recomputed from prior.rotary_dim and checked equal"
        return "rotary embedding cache, recomputed"
    return None


def _rename(key: str) -> str | None:
    for pattern, template in _RENAMES:
        if (match := re.fullmatch(pattern, key)) is not None:
            return match.expand(template)
    return None


def _record_fresh(model: MindEye2, filled: set[str], subjects: Sequence[str], official_backbone: bool,
                  report: ImportReport) -> None:
    """Zero the residual blocks' output layers (identity blocks) and list every parameter not filled."""
    if official_backbone:
        with torch.no_grad():
            for block in model.backbone.blocks:
                block.fc2.weight.zero_()
                block.fc2.bias.zero_()
    for key in model.state_dict():
        if key in filled:
            continue
        if key.startswith("backbone.blocks.") and official_backbone:
            report.fresh[key] = "identity at import (output layer zeroed), as the official blocks effectively were"
        elif (m := re.match(r"aligner\.linears\.([^.]+)\.", key)) and m.group(1) not in subjects:
            report.fresh[key] = "subject not in the official checkpoint"
        else:
            report.fresh[key] = _NOT_IN_CHECKPOINT
