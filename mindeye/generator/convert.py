"""Import MindEye2's published unCLIP (`unclip6_epoch0_step110000.ckpt`) as a generator folder.

The checkpoint is a Lightning checkpoint of Stability's `generative-models` (sgm) DiffusionEngine. Its
state dict holds the UNet under `model.diffusion_model.` (LDM `openaimodel` layout: `input_blocks`,
`middle_block`, `output_blocks`; the vector-conditioning MLP is `label_emb.0.{0,2}`) and SDXL's VAE under
`first_stage_model.` (LDM layout). The renaming into diffusers' `UNet2DConditionModel` / `AutoencoderKL`
is diffusers' own (`convert_ldm_unet_checkpoint`, which maps `label_emb` onto the `text_time`
`add_embedding`, and `convert_ldm_vae_checkpoint`). They run here on stand-ins that remember which key
each tensor came from, so the report names every parameter's source, and the result is checked against
the target config (`configs/generator/paper.yaml` by default) before anything is loaded: every UNet/VAE
parameter filled, every shape equal, no UNet/VAE tensor of the checkpoint left without a place. Anything
short of that is refused (`ConversionError`), never loaded partially.

What it cannot map, and why (each such key is listed in the report with its reason):
- `conditioner.embedders.N.*`: the frozen encoders of sgm's conditioner. For the unCLIP that is the
  OpenCLIP ViT-bigG/14 image tower; this project computes the tokens with `mindeye.clip`, outside the
  generator. The size and crop embedders have no weights: the UNet's `text_time` embedding does their work.
- `model_ema.*`: `decay` / `num_updates` are EMA bookkeeping; the other keys are an EMA copy of the
  UNet, converted instead of `model.diffusion_model.*` only when asked (`ema=True`, `--ema`).
- `denoiser.*`: the training noise schedule (sigmas); the pipeline's scheduler is built from the config's
  `schedule` (the report says whether the two agree). Sampler settings are not in the checkpoint either.
- `first_stage_model.*` when the config has no VAE (a pixel-space generator), and its `loss.*` (training
  losses); anything else: not part of the sampler.

    python -m mindeye.generator.convert --checkpoint unclip6_epoch0_step110000.ckpt --out generators/unclip6
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
EMA_PREFIX = "model_ema."
EMA_BOOKKEEPING = ("model_ema.decay", "model_ema.num_updates")
DTYPES = ("float32", "float16", "bfloat16")


class ConversionError(ValueError):
    """The checkpoint does not fill the target config exactly (missing keys, shapes, leftovers)."""


@dataclass
class ConversionReport:
    """`sources`: component -> {diffusers parameter: checkpoint key}; `unmapped`: checkpoint key -> why not."""

    sources: dict[str, dict[str, str]] = field(default_factory=dict)
    unmapped: dict[str, str] = field(default_factory=dict)
    ema: bool = False

    def counts(self) -> dict[str, int]:
        return {component: len(mapping) for component, mapping in self.sources.items()}

    def by_reason(self) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {}
        for key, reason in self.unmapped.items():
            groups.setdefault(reason, []).append(key)
        return groups

    def summary(self, examples: int = 3) -> str:
        lines = []
        for component, n in self.counts().items():
            ema = " (its EMA copy)" if component == "unet" and self.ema else ""
            lines.append(f"{component}: {n} tensors mapped{ema}")
        for reason, keys in self.by_reason().items():
            shown = ", ".join(keys[:examples]) + (f", ... (+{len(keys) - examples})" if len(keys) > examples else "")
            lines.append(f"not mapped, {len(keys)} key(s): {reason}\n    {shown}")
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps({"counts": self.counts(), "ema": self.ema, "unmapped": self.unmapped,
                           "sources": self.sources}, indent=1)


class _Source:
    """A checkpoint tensor's stand-in while diffusers renames keys: its key, shape and any indexing applied
    (the VAE's 1x1-conv attention weights (C, C, 1, 1) become linear ones (C, C) by [:, :, 0, 0])."""

    __slots__ = ("key", "shape", "index")

    def __init__(self, key: str, shape, index: tuple = ()):
        self.key, self.shape, self.index = key, tuple(shape), index

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, index) -> "_Source":
        import torch

        return _Source(self.key, torch.empty(self.shape, device="meta")[index].shape, self.index + (index,))

    def take(self, tensors: Mapping):
        tensor = tensors[self.key]
        for index in self.index:
            tensor = tensor[index]
        return tensor


def ema_key(key: str) -> str:
    """sgm's LitEma name of a UNet tensor: model.diffusion_model.a.0.w -> model_ema.diffusion_modela0w."""
    return EMA_PREFIX + key[len("model."):].replace(".", "")


def default_clip_id() -> str:
    """The identity of the paper's encoder (configs/clip/bigG.yaml), whose tokens the unCLIP reads."""
    from omegaconf import OmegaConf

    from mindeye.clip import clip_identity
    from mindeye.config import CONFIG_DIR

    return clip_identity(OmegaConf.load(CONFIG_DIR / "clip" / "bigG.yaml"))


def guess_source(target: str, sources: Mapping[str, str]) -> str | None:
    """The checkpoint key a parameter would come from, inferred from how its neighbours were renamed:
    each (parameter, key) pair gives a prefix rename (their names minus the longest common tail that does
    not start with an index); the longest unambiguous one that applies to `target` wins."""
    renames: dict[str, set[str]] = {}
    for name, key in sources.items():
        a, b = name.split("."), key.split(".")
        tail = 0
        while tail < min(len(a), len(b)) - 1 and a[-1 - tail] == b[-1 - tail]:
            tail += 1
        while tail and a[-tail].isdigit():  # keep indices in the prefix: resnets.1 is not resnets.0
            tail -= 1
        renames.setdefault(".".join(a[:len(a) - tail]), set()).add(".".join(b[:len(b) - tail]))
    parts = target.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        candidates = renames.get(".".join(parts[:cut]), set())
        if len(candidates) == 1:
            return ".".join([*candidates, *parts[cut:]])
    return None


def _schedule_note(sigmas, scheduler) -> str:
    alphas_bar = getattr(scheduler, "alphas_cumprod", None)
    if alphas_bar is None or tuple(sigmas.shape) != tuple(alphas_bar.shape):
        return "cannot compare with the config's schedule"
    ours = ((1 - alphas_bar) / alphas_bar).sqrt()
    error = ((sigmas.float().cpu() - ours) / ours).abs().max().item()
    return "it matches the config's schedule" if error < 1e-3 else (
        f"it DIFFERS from the config's schedule (max rel. {error:.2g})")


def _reason(key: str, tensors: Mapping, *, ema: bool, has_vae: bool, scheduler) -> str | None:
    """Why a checkpoint key is not converted; None when it should have been (a refusal)."""
    if key.startswith(UNET_PREFIX):
        return "superseded by its EMA copy (ema=True)" if ema else None
    if key in EMA_BOOKKEEPING:
        return "EMA bookkeeping"
    if key.startswith(EMA_PREFIX):
        return ("an EMA tensor with no model.diffusion_model counterpart" if ema else
                "the UNet's EMA copy; ema=True (--ema) converts it instead of model.diffusion_model")
    if key.startswith("conditioner.embedders."):
        return (f"conditioner embedder {key.split('.')[2]}'s frozen encoder (for the unCLIP, the OpenCLIP "
                "ViT-bigG image tower): the generator takes its tokens from mindeye.clip")
    if key.startswith(VAE_PREFIX + "loss."):
        return "the autoencoder's training loss, not needed to sample"
    if key.startswith(VAE_PREFIX):
        return "the VAE, but this generator config has none (pixel space)" if not has_vae else None
    if key.startswith("denoiser."):
        note = _schedule_note(tensors[key], scheduler) if key == "denoiser.sigmas" else ""
        return "the training noise schedule; the pipeline's scheduler comes from the config" + (
            f" ({note})" if note else "")
    return "not part of the UNet or the VAE"


def _problems_text(problems: list[str], shown: int = 5) -> str:
    more = f"\n  ... and {len(problems) - shown} more" if len(problems) > shown else ""
    return "\n  " + "\n  ".join(problems[:shown]) + more


def convert_sgm_state_dict(state_dict: Mapping, generator_config="paper", *, clip_id: str | None = None,
                           clip_tokens: int = 256, ema: bool = False, dtype=None):
    """An sgm state dict -> (MindEyeUnCLIPPipeline, ConversionReport).

    `generator_config`: a name in configs/generator/, a .yaml path or a mapping; `clip_id`: the identity of
    the encoder whose tokens the generator reads (default: the paper's bigG, `mindeye.clip.clip_identity`);
    `ema`: convert the UNet's EMA copy (`model_ema.*`); `dtype`: of the converted weights (default float32).
    The pipeline's tensors are the checkpoint's own (no copy when the dtype already agrees). Raises
    ConversionError when a UNet/VAE parameter is left unfilled, a shape disagrees or a UNet/VAE tensor
    of the checkpoint has no place in the config."""
    import torch
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    from mindeye.generator import build_pipeline

    dtype = dtype or torch.float32
    pipe = build_pipeline(generator_config, clip_id=clip_id or default_clip_id(), clip_tokens=clip_tokens,
                          device="meta")
    tensors = {key: value for key, value in state_dict.items() if isinstance(value, torch.Tensor)}
    report = ConversionReport(ema=ema, unmapped={key: "not a tensor" for key in state_dict if key not in tensors})
    problems: list[str] = []

    unet_in = {}  # LDM key -> stand-in (with ema: for its EMA copy)
    for key in tensors:
        if key.startswith(UNET_PREFIX):
            source = ema_key(key) if ema else key
            if source in tensors:
                unet_in[key] = _Source(source, tensors[source].shape)
            else:
                problems.append(f"{key}: no EMA copy {source} in the checkpoint")
    vae_in = {key: _Source(key, tensors[key].shape) for key in tensors
              if key.startswith(VAE_PREFIX) and not key.startswith(VAE_PREFIX + "loss.")}
    components = {"unet": (pipe.unet, convert_ldm_unet_checkpoint, unet_in, UNET_PREFIX)}
    if pipe.vae is not None:
        components["vae"] = (pipe.vae, convert_ldm_vae_checkpoint, vae_in, VAE_PREFIX)

    states, used = {}, set()
    for name, (model, convert, stand_ins, prefix) in components.items():
        if not stand_ins:
            problems.append(f"{name}: the checkpoint has no {prefix}* tensors")
            continue
        try:
            converted = convert(dict(stand_ins), dict(model.config))  # diffusers name -> _Source | None
        except KeyError as error:  # diffusers indexes label_emb (the vector-conditioning MLP) without .get
            problems.append(f"{name}: {prefix}{error.args[0]} is not in the checkpoint")
            continue
        expected = model.state_dict()  # meta tensors: the config's names and shapes
        filled, seen = {}, set()
        for target, source in converted.items():
            if source is None:  # diffusers' .get of an absent key
                continue
            used.add(source.key)
            seen.add(target)
            if target not in expected:
                problems.append(f"{source.key} -> {name}.{target}: no such parameter in this config")
            elif tuple(source.shape) != tuple(expected[target].shape):
                problems.append(f"{source.key} -> {name}.{target}: shape {tuple(source.shape)} in the checkpoint, "
                                f"{tuple(expected[target].shape)} in the config")
            else:
                filled[target] = source
        sources = {target: source.key for target, source in filled.items()}
        for target in expected:
            if target not in seen:
                guess = guess_source(target, sources)
                problems.append(f"{name}.{target} is unfilled: " + (
                    f"{guess} is not in the checkpoint" if guess else "no checkpoint key maps to it"))
        problems += [f"{source.key}: a {name} tensor with no place in this config (a checkpoint for another "
                     "config?)" for source in stand_ins.values() if source.key not in used]
        states[name] = filled
        report.sources[name] = sources

    if problems:
        label = repr(str(generator_config)) if isinstance(generator_config, (str, Path)) else "(mapping)"
        raise ConversionError(f"the checkpoint does not fit generator config {label} "
                              f"({len(problems)} problem(s)):" + _problems_text(problems))
    for key in tensors:
        if key not in used:
            report.unmapped[key] = _reason(key, tensors, ema=ema, has_vae=pipe.vae is not None,
                                           scheduler=pipe.scheduler)
    for name, filled in states.items():  # (C, C, 1, 1) conv views -> (C, C) linear: .contiguous() copies none
        weights = {target: source.take(tensors).to(dtype).contiguous() for target, source in filled.items()}
        getattr(pipe, name).load_state_dict(weights, strict=True, assign=True)
    return pipe, report


def load_checkpoint(path: str | Path) -> Mapping:
    """The state dict of a Lightning/torch checkpoint (its 'state_dict', or the file itself) or a .safetensors."""
    import pickle
    import re
    import zipfile

    import torch

    from mindeye.errors import FormatError

    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    mmap = zipfile.is_zipfile(path)  # torch's zip format: tensors stay on disk until used
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if found is None:  # not a pickled Python object: a damaged or foreign file
            raise
        print(f"note: {path.name} pickles Python objects besides tensors ({found.group(1)}), which a weights-only "
              "load refuses; loading it with weights_only=False, which runs code from the file: do this only for "
              "a file you trust", file=sys.stderr)
        loaded = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    state = loaded.get("state_dict", loaded) if isinstance(loaded, Mapping) else None
    if not isinstance(state, Mapping):
        raise FormatError(path, "checkpoint", "a dict with a 'state_dict' (or a state dict)", type(loaded).__name__)
    return state


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mindeye.generator.convert", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Convert MindEye2's unCLIP checkpoint (Stability generative-models format, e.g. "
                    "unclip6_epoch0_step110000.ckpt) into a generator folder that mindeye.generator.load_pipeline "
                    "reads. Prints which tensors went where and every key left out, with the reason; refuses a "
                    "checkpoint that does not fill the config exactly.",
        epilog="Example:\n  python -m mindeye.generator.convert --checkpoint unclip6_epoch0_step110000.ckpt "
               "--out generators/unclip6")
    parser.add_argument("--checkpoint", required=True, type=Path, metavar="PATH",
                        help="the sgm checkpoint (.ckpt/.pt from torch.save, or .safetensors)")
    parser.add_argument("--out", required=True, type=Path, metavar="FOLDER", help="where to write the generator")
    parser.add_argument("--config", default="paper", metavar="NAME|YAML",
                        help="generator config: a name in configs/generator/ or a .yaml path (default: paper)")
    parser.add_argument("--clip", default="bigG", metavar="NAME",
                        help="configs/clip/ encoder whose tokens the generator reads (default: bigG)")
    parser.add_argument("--clip-id", metavar="ID", help="record this encoder identity instead of --clip's")
    parser.add_argument("--clip-tokens", type=int, default=256, help="tokens per image (default: 256)")
    parser.add_argument("--ema", action="store_true", help="convert the UNet's EMA copy (model_ema.*)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="weights' dtype (default: float32)")
    parser.add_argument("--overwrite", action="store_true", help="replace a generator already in --out")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.checkpoint.is_file():
        print(f"error: no checkpoint file at {args.checkpoint}", file=sys.stderr)
        return 2
    if (args.out / "model_index.json").exists() and not args.overwrite:
        print(f"error: {args.out} already holds a generator (--overwrite replaces it)", file=sys.stderr)
        return 2
    import torch  # heavy imports only once the arguments are known

    from omegaconf import OmegaConf

    from mindeye.config import CONFIG_DIR
    from mindeye.generator import generator_config

    try:
        generator_config(args.config)  # a missing config fails here, before the checkpoint loads
        clip_id = args.clip_id
        if clip_id is None:
            from mindeye.clip import clip_identity

            clip_id = clip_identity(OmegaConf.load(CONFIG_DIR / "clip" / f"{args.clip}.yaml"))
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        state = load_checkpoint(args.checkpoint)
    except Exception as error:  # noqa: BLE001 - any unreadable file: one line, no traceback
        detail = (str(error).splitlines() or [""])[0][:160]
        print(f"error: cannot read {args.checkpoint} as a checkpoint ({type(error).__name__}: {detail})",
              file=sys.stderr)
        return 2
    try:
        pipe, report = convert_sgm_state_dict(state, args.config, clip_id=clip_id, clip_tokens=args.clip_tokens,
                                              ema=args.ema, dtype=getattr(torch, args.dtype))
    except ConversionError as error:
        print(f"error: {args.checkpoint}: {error}", file=sys.stderr)
        return 1
    pipe.save_pretrained(args.out)
    (args.out / "conversion_report.json").write_text(report.to_json())
    print(report.summary())
    print(f"wrote {args.out} (generator for {clip_id} tokens; full report in {args.out / 'conversion_report.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
