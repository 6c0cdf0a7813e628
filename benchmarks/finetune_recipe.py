"""Choose subject 8's one-session fine-tuning recipe on held-out folds of its own session, never the test images.

Each recipe (a name and mindeye-train overrides) fine-tunes the pretrained checkpoint on session 1 with one
fold of its training images held out (validation_fold=[k, n]: every trial of those images leaves training),
once per fold. On each held-out fold (outputs averaged over an image's repeats), against the true world-CLIP
tokens: 2-way identification and cosine of the prior's tokens (DPM-Solver++, 15 steps, at each guidance
scale), the quantity the generator's pictures follow (benchmarks/decoded_token_quality.py), with a ridge
readout of the same backbone tokens at one alpha as the bar, and the run's own token readout (mindeye.models.
readout: alpha by leave-one-out, tokens norm-matched; what generate.tokens=readout draws from); then the mean over
folds. With --generator, the pictures too (offline_training.evaluate's code, the generator's default steps, blend
0.25), drawn from the prior's tokens and from each token source in --pictures-from: 2-way identification with the
world's CLIP and a random AlexNet among each fold's images, the generated and blended pictures against the
low-level image, pooled over folds with a 95 % bootstrap interval; --blends adds rows blended at other low-level
weights (from the same generated pictures), to choose that weight without the test images. Runs are cached under
--runs; a run from before the trainer fitted readouts gets its readout now, from the trainer's own code on the
same training trials, saved into its checkpoint.

    .venv/bin/python benchmarks/finetune_recipe.py --generator weights/world-tiny/student \\
        --recipe "e60=train.epochs=60" --recipe "e60 prior frozen=train.epochs=60 freeze=[prior]"
(the pretraining is the one benchmarks/reconstruction_quality.py trains; --pretrained names another)
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decoded_token_quality import RIDGE_ALPHA, ridge_readout, unit_rows  # noqa: E402

from omegaconf import OmegaConf  # noqa: E402

from mindeye.clip import clip_identity  # noqa: E402
from mindeye.config import load_config  # noqa: E402
from mindeye.evaluation import (paired_difference, two_way_identification, world_feature_extractors,  # noqa: E402
                                world_two_way_wins)
from mindeye.generator import GenerationSettings, blend_images, default_steps, load_pipeline  # noqa: E402
from mindeye.models import load_checkpoint  # noqa: E402
from mindeye.models.readout import TokenReadout, load_readouts, save_readouts  # noqa: E402
from mindeye.nsd import NSDLayout, StimulusBrick  # noqa: E402
from mindeye.targets import build_target_cache, target_clip_config  # noqa: E402
from offline_training.data import hold_out_fold, load_subject  # noqa: E402
from offline_training.evaluate import Generation, evaluate_checkpoint, predict_test_set  # noqa: E402
from offline_training.trainer import TargetTable, fit_readouts  # noqa: E402

TOKEN_SOURCES = {"ridge": "ridge from backbone", "readout": "the run's readout"}  # beside the prior's; row names
PRETRAINED = Path("runs/bench/reconstruction_quality_small/pretrain-subj1-7-e40/checkpoint")


def parse_recipe(text: str) -> tuple[str, list[str]]:
    """NAME=OVERRIDE OVERRIDE ..., e.g. "prior frozen=train.epochs=60 freeze=[prior]"."""
    name, overrides = text.split("=", 1)
    return name, overrides.split()


def fine_tune(out_dir: Path, pretrained: Path, data_root: Path, overrides: list[str], fold: int, folds: int,
              subject: int, sessions: list[int]) -> Path:
    """mindeye-train in a subprocess (its own seed and threads); reused when its checkpoint is there."""
    if not (out_dir / "checkpoint").is_dir():
        command = [sys.executable, "-m", "offline_training.train", f"data.root={data_root}", "seed=0",
                   "mode=finetune", f"subjects=[{subject}]", f"train_sessions=[{','.join(map(str, sessions))}]",
                   f"init_from={pretrained}", "train.eval.sample_every=0", "progress=false", "cpu=true",
                   f"validation_fold=[{fold},{folds}]", f"out_dir={out_dir}", *overrides]
        with open(out_dir.with_suffix(".log"), "w") as log:
            subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
    return out_dir / "checkpoint"


def run_readout(checkpoint: Path, model, data, targets) -> TokenReadout:
    """The run's token readout of `data.name`, fitted and saved now where the run predates them."""
    readouts = load_readouts(checkpoint)
    if data.name not in readouts:
        run_cfg = OmegaConf.load(checkpoint.parent / "run_config.yaml")
        readout_cfg = run_cfg.get("readout") or load_config("train").readout
        table = TargetTable(targets.rows(np.unique(data.train_image_ids)))
        readouts |= fit_readouts(model, [data], table, readout_cfg)
        save_readouts(checkpoint, readouts)
    return readouts[data.name]


def fold_tokens(checkpoint: Path, data, targets, cond_scales: list[float], seed: int
                ) -> tuple[dict[str, tuple[float, float]], dict[str, np.ndarray]]:
    """({row: (2-way, cosine)} on the held-out fold `data.test_*`, {token source: its tokens (n, L, D) there})."""
    model = load_checkpoint(checkpoint).eval()
    held_out = predict_test_set(lambda voxels, name: model(voxels, name), data, 64)
    true = targets.get(held_out.image_ids)[0]
    rows = {}
    with torch.no_grad():
        for scale in cond_scales:
            rows[f"prior, guidance {scale:g}"] = model.prior.sample(
                torch.from_numpy(held_out.backbone_tokens), steps=15, cond_scale=scale, sampler="dpmpp",
                generator=torch.Generator().manual_seed(seed)).numpy()
        train_backbone = model(torch.from_numpy(data.train_voxels), data.name).backbone_tokens.numpy()
        n_train = len(train_backbone)
        rows[TOKEN_SOURCES["ridge"]] = ridge_readout(
            train_backbone.reshape(n_train, -1), targets.get(data.train_image_ids)[0].reshape(n_train, -1),
            held_out.backbone_tokens.reshape(len(true), -1), RIDGE_ALPHA).reshape(true.shape).astype(np.float32)
        rows[TOKEN_SOURCES["readout"]] = run_readout(checkpoint, model, data, targets)(
            torch.from_numpy(held_out.backbone_tokens)).numpy()
    flat_true = true.reshape(len(true), -1)
    return ({label: (two_way_identification(tokens.reshape(len(tokens), -1), flat_true),
                     float(np.mean(np.sum(unit_rows(tokens) * unit_rows(true), axis=1))))
             for label, tokens in rows.items()},
            {source: rows[row] for source, row in TOKEN_SOURCES.items()})


def picture_wins(checkpoint: Path, data, targets, stimuli, world, generation: Generation,
                 source_tokens: dict[str, np.ndarray], blends: list[float]) -> dict[str, dict[str, np.ndarray]]:
    """{picture kind: {network: 2-way wins per held-out image}} for the low-level image ("blurry") and the
    generated and blended pictures from the prior's tokens and from each source's (`source_tokens`: {name:
    (n, L, D)}, kinds "name: generated", "name: blend"), and those blended at each weight in `blends` ("blend 0.5",
    "name: blend 0.5")."""
    _, images, outputs = evaluate_checkpoint(checkpoint, data, targets, targets.codec, stimuli,
                                             world_extractors=world, generation=generation)
    seen = stimuli[outputs.image_ids]
    prefixes = [""]
    for source, tokens_nld in source_tokens.items():
        pictures = generation.images(tokens_nld, images["blurry"], seen.shape[1])
        prefixes.append(f"{source}: ")
        images[f"{source}: generated"], images[f"{source}: blend"] = pictures.generated, pictures.images
    kinds = ["blurry", *(f"{prefix}{kind}" for prefix in prefixes for kind in ("generated", "blend"))]
    for source in prefixes:
        for weight in blends:
            kinds.append(f"{source}blend {weight:g}")
            images[kinds[-1]] = blend_images(images[f"{source}generated"], images["blurry"], weight)
    return {kind: world_two_way_wins(images[kind], seen, world) for kind in kinds}


def print_pictures(name: str, per_fold: list[dict[str, dict[str, np.ndarray]]]) -> None:
    low = {network: np.concatenate([fold["blurry"][network] for fold in per_fold]) for network in per_fold[0]["blurry"]}
    for kind in [kind for kind in per_fold[0] if kind != "blurry"]:
        cells = []
        for network, low_n in low.items():
            wins_n = np.concatenate([fold[kind][network] for fold in per_fold])
            mean, lower, upper = paired_difference(wins_n, low_n)
            cells.append(f"{network} {wins_n.mean():6.1%} vs {low_n.mean():6.1%}: {mean * 100:+.1f} "
                         f"[{lower * 100:+.1f}, {upper * 100:+.1f}]")
        print(f"{name:28s} {kind:18s} " + "   ".join(cells), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained", type=Path, default=PRETRAINED,
                        help="the pretraining run's checkpoint folder (default: reconstruction_quality.py's)")
    parser.add_argument("--recipe", type=parse_recipe, action="append", required=True,
                        help='"NAME=mindeye-train overrides" (space-separated)')
    parser.add_argument("--data-root", type=Path, default=Path("data/world/tiny"))
    parser.add_argument("--runs", type=Path, default=Path("runs/bench/finetune_recipe"))
    parser.add_argument("--subject", type=int, default=8)
    parser.add_argument("--sessions", type=int, nargs="+", default=[1])
    parser.add_argument("--folds", type=int, default=4)
    parser.add_argument("--cond-scales", type=float, nargs="+", default=[5.0])
    parser.add_argument("--generator", type=Path, default=None,
                        help="a generator folder: score pictures too (the prior guided at the last --cond-scales)")
    parser.add_argument("--guidance-scale", type=float, default=3.0, help="the generator's")
    parser.add_argument("--seed", type=int, default=0, help="the prior's and the generator's noise")
    parser.add_argument("--pictures-from", nargs="*", choices=sorted(TOKEN_SOURCES), default=["ridge"],
                        help="token sources drawn beside the prior's (ridge: one alpha, as decoded_token_quality.py; "
                             "readout: the run's own, the live path's)")
    parser.add_argument("--blends", type=float, nargs="*", default=[],
                        help="other low-level blend weights to score (the pipeline's default: 0.25)")
    args = parser.parse_args()
    if not (args.pretrained / "config.json").is_file():
        parser.error(f"no checkpoint in {args.pretrained}: run benchmarks/reconstruction_quality.py (it trains "
                     f"{PRETRAINED}) or give --pretrained <a pretraining run>/checkpoint")
    torch.set_num_threads(1)
    data_root = args.data_root.resolve()
    data_cfg = load_config("evaluate", [f"data.root={data_root}"]).data
    targets = build_target_cache(data_cfg)
    subject_data = load_subject(data_cfg, args.subject, args.sessions)
    generation = world = stimuli = None
    if args.generator is not None:
        pipe = load_pipeline(args.generator, clip_id=clip_identity(target_clip_config(data_cfg)))
        generation = Generation(pipe, GenerationSettings(steps=default_steps(pipe), guidance_scale=args.guidance_scale,
                                                         lowlevel_blend=0.25),
                                prior_cond_scale=args.cond_scales[-1], seed=args.seed)
        world, stimuli = world_feature_extractors(targets.embedder), StimulusBrick(NSDLayout(data_root).stimuli())
    print(f"# command: {' '.join(sys.argv)}")
    print(f"# subj{args.subject:02d}, sessions {args.sessions}: {len(np.unique(subject_data.train_image_ids))} "
          f"training images in {args.folds} folds; token 2-way / cosine on each held-out fold, mean over folds")
    print(f"{'recipe':28s} {'tokens':22s} {'2-way':>6s} {'cosine':>7s}   per fold", flush=True)
    pictures = {}
    for name, overrides in args.recipe:
        per_fold, pictures[name] = [], []
        for fold in range(1, args.folds + 1):
            out_dir = args.runs.resolve() / f"{name.replace(' ', '_')}-fold{fold}of{args.folds}"
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            checkpoint = fine_tune(out_dir, args.pretrained.resolve(), data_root, overrides, fold, args.folds,
                                   args.subject, args.sessions)
            held_out = hold_out_fold(subject_data, args.folds, fold)
            scores, source_tokens = fold_tokens(checkpoint, held_out, targets, args.cond_scales, args.seed)
            per_fold.append(scores)
            if generation is not None:
                pictures[name].append(picture_wins(checkpoint, held_out, targets, stimuli, world, generation,
                                                   {s: source_tokens[s] for s in args.pictures_from}, args.blends))
        for row in per_fold[0]:
            two_way = [scores[row][0] for scores in per_fold]
            cosine = np.mean([scores[row][1] for scores in per_fold])
            print(f"{name:28s} {row:22s} {np.mean(two_way):6.1%} {cosine:7.3f}   "
                  f"{' '.join(f'{v:.0%}' for v in two_way)}", flush=True)
    if generation is not None:
        sources = "".join(f'; "{source}:" from its tokens' for source in args.pictures_from)
        print(f"\n# pictures ({args.generator}, {generation.settings.steps} steps, guidance {args.guidance_scale:g}; "
              f"prior guided at {generation.prior_cond_scale:g}{sources}): 2-way "
              f"on the held-out images pooled over folds, against the low-level image, points with a 95 % "
              f"bootstrap interval")
        for name, per_fold in pictures.items():
            print_pictures(name, per_fold)


if __name__ == "__main__":
    main()
