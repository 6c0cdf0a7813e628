"""Evaluate checkpoints as the MindEye2 paper does and write its table and an image grid.

For each test image, the model's outputs on its repeats are averaged (as the paper does);
retrieval compares the averaged retrieval tokens with the images' CLIP tokens (300-way x 30,
or k-way with fewer test images); the low-level head's averaged latent is decoded into the
blurry reconstruction, scored with PixCorr, SSIM and the feature metrics (reported as
unavailable where their weights are absent; a synthetic world adds two 2-way columns that need
no weights). With a generator (`generator.path`), the diffusion prior samples image tokens from
the averaged backbone tokens and the unCLIP generator turns them into images, scored alone and
blended with the blurry ones; the seen images' own CLIP tokens through the same generator give
its ceiling.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from mindeye.cli import command, require_checkpoint, require_data_root
from mindeye.errors import ConfigValueError

if TYPE_CHECKING:  # numpy, torch and the model stack load where they are used: --help answers without them
    import numpy as np
    import torch

    from mindeye.evaluation import FeatureExtractor
    from mindeye.generator import GenerationSettings, MindEyeUnCLIPPipeline, Refinement, UnCLIPOutput
    from mindeye.metrics import RetrievalScore
    from mindeye.models import MindEye2, MindEyeOutput
    from mindeye.nsd import StimulusBrick
    from offline_training.data import SubjectData

    Encoder = Callable[[torch.Tensor, str], MindEyeOutput]


@dataclass(frozen=True)
class TestOutputs:
    """Model outputs on a subject's test set, averaged over each image's repeats."""

    image_ids: np.ndarray  # (n_images,)
    retrieval_tokens: np.ndarray  # (n_images, L, D)
    backbone_tokens: np.ndarray  # (n_images, L, D)
    low_level: np.ndarray | None  # (n_images, C, S, S)


def predict_test_set(encode: Encoder, data: SubjectData, batch_size: int = 256,
                     device: torch.device | str = "cpu") -> TestOutputs:
    """`encode` maps (voxels, subject) to a MindEyeOutput: a MindEye2 in eval mode, or a training wrapper."""
    import numpy as np
    import torch

    from offline_training.data import average_by_image

    parts: dict[str, list[np.ndarray]] = {"retrieval": [], "backbone": [], "low": []}
    with torch.no_grad():
        for start in range(0, len(data.test_voxels), batch_size):
            out = encode(torch.from_numpy(data.test_voxels[start:start + batch_size]).to(device), data.name)
            parts["retrieval"].append(out.retrieval_tokens.float().cpu().numpy())
            parts["backbone"].append(out.backbone_tokens.float().cpu().numpy())
            if out.low_level_latent is not None:
                parts["low"].append(out.low_level_latent.float().cpu().numpy())
    ids, retrieval = average_by_image(np.concatenate(parts["retrieval"]), data.test_image_ids)
    _, backbone = average_by_image(np.concatenate(parts["backbone"]), data.test_image_ids)
    low = average_by_image(np.concatenate(parts["low"]), data.test_image_ids)[1] if parts["low"] else None
    return TestOutputs(ids, retrieval, backbone, low)


def test_retrieval(outputs: TestOutputs, targets, seed: int = 0) -> RetrievalScore:
    """Top-1 retrieval of the averaged retrieval tokens against the test images' CLIP tokens."""
    from mindeye.metrics import retrieval_top1

    tokens, _ = targets.get(outputs.image_ids)
    return retrieval_top1(outputs.retrieval_tokens, tokens, seed=seed)


@dataclass(frozen=True)
class Generation:
    """How reconstructions are made: the prior's sampling, then the generator's."""

    pipe: MindEyeUnCLIPPipeline
    settings: GenerationSettings
    prior_steps: int = 15
    prior_sampler: str = "dpmpp"
    seed: int = 0
    prior_cond_scale: float = 1.0  # the prior's classifier-free guidance (uncond: its learned null brain tokens)
    refinement: Refinement | None = None  # MindEye2's optional img2img refinement, rows "<name> (refined)"
    tokens: str = "prior"  # the generator's image tokens: the prior's samples, or the subject's linear readout's

    def images(self, image_tokens_nld: np.ndarray, blurry: np.ndarray | None, size: int) -> UnCLIPOutput:
        """`reconstruct`'s output (.generated, .images blended with `blurry`) at size x size pixels."""
        from mindeye.generator import reconstruct

        return reconstruct(self.pipe, image_tokens_nld, low_level_nhwc=blurry, settings=self.settings, seed=self.seed,
                           output_size=size)

    def image_tokens(self, model: MindEye2, checkpoint: Path, subject: str, backbone_nld: np.ndarray) -> np.ndarray:
        """What the generator draws from backbone tokens: `sample_tokens`, or the readout saved in `checkpoint`."""
        if self.tokens == "prior":
            return self.sample_tokens(model, backbone_nld)
        import torch

        from mindeye.models.readout import require_readout

        with torch.no_grad():
            return require_readout(checkpoint, subject)(torch.from_numpy(backbone_nld)).numpy()

    def sample_tokens(self, model: MindEye2, backbone_nld: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Image tokens the prior samples from backbone tokens, noise drawn batch after batch from `seed`."""
        import numpy as np
        import torch

        generator = torch.Generator().manual_seed(self.seed)
        with torch.no_grad():
            return np.concatenate([model.prior.sample(torch.from_numpy(backbone_nld[start:start + batch_size]),
                                                      steps=self.prior_steps, sampler=self.prior_sampler,
                                                      cond_scale=self.prior_cond_scale,
                                                      generator=generator).float().numpy()
                                   for start in range(0, len(backbone_nld), batch_size)])


def load_generation(cfg: DictConfig, data_cfg: DictConfig) -> Generation | None:
    """The `generator` config block's Generation (None without a path); an EncoderMismatch if the generator
    was trained on another CLIP encoder than the data's."""
    if cfg.path is None:
        return None
    from mindeye.clip import clip_identity
    from mindeye.generator import GenerationSettings, Refinement, default_steps, load_pipeline
    from mindeye.models.prior import check_sampler
    from mindeye.models.readout import check_token_source
    from mindeye.targets import target_clip_config

    check_sampler(cfg.prior_sampler, "generator.prior_sampler")
    check_token_source(cfg.tokens, "generator.tokens")
    encoder = clip_identity(target_clip_config(data_cfg))
    pipe = load_pipeline(cfg.path, clip_id=encoder)
    base = None if cfg.refine.path is None else load_pipeline(cfg.refine.path, clip_id=encoder)
    settings = GenerationSettings(steps=int(cfg.steps or default_steps(pipe)), guidance_scale=float(cfg.guidance_scale),
                                  lowlevel_blend=float(cfg.lowlevel_blend))
    refinement = None
    if base is not None:
        refinement = Refinement(base, GenerationSettings(int(cfg.refine.steps or default_steps(base)),
                                                         float(cfg.refine.guidance_scale), float(cfg.lowlevel_blend),
                                                         float(cfg.refine.strength)))
    return Generation(pipe, settings, int(cfg.prior_steps), str(cfg.prior_sampler), int(cfg.seed),
                      float(cfg.prior_cond_scale), refinement, str(cfg.tokens))


def evaluate_checkpoint(checkpoint: Path, data: SubjectData, targets, codec, stimuli: StimulusBrick, *,
                        weights_dir: Path | None = None, seed: int = 0,
                        world_extractors: Sequence[FeatureExtractor] = (), generation: Generation | None = None
                        ) -> tuple[dict[str, dict], dict[str, np.ndarray], TestOutputs]:
    """Table rows and images (uint8 (n, H, W, 3)) by kind - "blurry" (the low-level head), "generated" and
    "blend" (with `generation`) - and the averaged outputs; without images, one row "" of retrieval alone."""
    import numpy as np
    import torch

    from mindeye.evaluation import evaluate_reconstructions
    from mindeye.generator import refine
    from mindeye.models import load_checkpoint

    model = load_checkpoint(checkpoint)
    outputs = predict_test_set(model, data)
    retrieval = test_retrieval(outputs, targets, seed=seed)
    seen = stimuli[outputs.image_ids]
    images = {}
    if outputs.low_level is not None:
        blurry = codec.decode(torch.from_numpy(outputs.low_level), image_size=seen.shape[1])
        images["blurry"] = (blurry.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    if generation is not None:
        tokens = generation.image_tokens(model, checkpoint, data.name, outputs.backbone_tokens)
        made = generation.images(tokens, images.get("blurry"), seen.shape[1])
        images["generated"] = made.generated
        if "blurry" in images:
            images["blend"] = made.images
        if generation.refinement is not None:
            images["refined"] = refine(generation.refinement, tokens, made.images, low_level_nhwc=images.get("blurry"),
                                       seed=generation.seed)
    if not images:
        return {"": {"Image retrieval": retrieval.image_top1, "Brain retrieval": retrieval.brain_top1}}, images, outputs
    return {kind: evaluate_reconstructions(recon, seen, weights_dir=weights_dir, retrieval=retrieval,
                                           world_extractors=world_extractors)
            for kind, recon in images.items()}, images, outputs


def check_subject(checkpoint: Path, subject: int) -> None:
    """A ConfigValueError, naming the subjects it knows, unless the model in `checkpoint` has an aligner for
    `subject` (the docs' finetuned model is subj08's, the demo's subj01's)."""
    from mindeye.models import read_checkpoint_config
    from mindeye.nsd import subject_name

    known = read_checkpoint_config(checkpoint)[0].subjects
    if subject_name(subject) not in known:
        numbers = [str(int(name.removeprefix("subj"))) for name in known]
        choice = numbers[0] + (f" (or {', '.join(numbers[1:])})" if len(numbers) > 1 else "")
        raise ConfigValueError(f"the model in {checkpoint} has no aligner for {subject_name(subject)} "
                               f"(subject={subject}); this model knows {', '.join(known)}: pass subject={choice}")


@command("evaluate", "mindeye-evaluate")
def main(cfg: DictConfig) -> None:
    checkpoints = cfg.checkpoints if isinstance(cfg.checkpoints, DictConfig) else {"model": cfg.checkpoints}
    for path in checkpoints.values():  # the usual mistakes first, before anything heavy loads
        require_checkpoint(path, "checkpoints")
    require_data_root(cfg.data.root)
    for path in checkpoints.values():
        check_subject(Path(path), cfg.subject)
    from mindeye.evaluation import evaluate_reconstructions, save_image_grid, world_feature_extractors, write_table
    from mindeye.nsd import NSDLayout, StimulusBrick
    from mindeye.targets import build_target_cache
    from offline_training.data import load_subject

    generation = load_generation(cfg.generator, cfg.data)  # before the data: refuses another encoder's generator
    data = load_subject(cfg.data, cfg.subject)
    targets = build_target_cache(cfg.data)
    world = world_feature_extractors(targets.embedder) if cfg.data.clip == "world" else ()
    stimuli = StimulusBrick(NSDLayout(Path(cfg.data.root)).stimuli())
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, grid = {}, {}
    for name, path in checkpoints.items():
        checkpoint_rows, images, outputs = evaluate_checkpoint(
            Path(path), data, targets, targets.codec, stimuli, weights_dir=cfg.weights_dir, seed=cfg.seed,
            world_extractors=world, generation=generation)
        rows.update({f"{name} ({kind})" if kind else name: row for kind, row in checkpoint_rows.items()})
        grid.setdefault("seen", stimuli[outputs.image_ids])
        grid.update({f"{name}: {kind}": kind_images for kind, kind_images in images.items()})
    if generation is not None:  # the generator's ceiling: the seen images' own tokens
        seen = grid["seen"]
        grid["true tokens: generated"] = generation.images(targets.get(outputs.image_ids)[0], None,
                                                           seen.shape[1]).generated
        rows["true tokens (generated)"] = evaluate_reconstructions(grid["true tokens: generated"], seen,
                                                                   weights_dir=cfg.weights_dir, world_extractors=world)
    write_table(rows, out_dir / "eval.md", out_dir / "eval.json")
    save_image_grid(list(grid.values()), list(grid), out_dir / "grid.png", max_columns=cfg.grid_images)
    print((out_dir / "eval.md").read_text())
    print(f"wrote {out_dir / 'eval.md'}, {out_dir / 'eval.json'} and {out_dir / 'grid.png'}")


if __name__ == "__main__":
    main()
