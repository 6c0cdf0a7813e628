"""How good the world's reconstructions are: from the seen images' true CLIP tokens (the generator's ceiling)
and from brain-decoded tokens, with the full-step teacher and the few-step student.

Images: the world's shared test images (every subject sees them 3 times; the generator was trained on an
endless stream of other scenes, never on the world's stimuli): the tiny world's 30 by default, the small
world's 150 with --world small (NSD's session structure: 750 trials a session). For each generator given:
- true tokens: the images' own CLIP tokens (the world's encoder) -> generator (target: 2-way >= 95 %);
- brain-decoded: a subject's test-set outputs averaged over each image's repeats, the diffusion prior's
  image tokens sampled from the backbone tokens (dpmpp, 15 steps) -> generator; alone, and blended 0.25
  with the low-level head's blurry image (MindEye2's final images); the blurry images alone too. With
  --tokens readout, rows from the subject's ridge readout of the backbone tokens as well (fitted by
  mindeye-train on its training trials, mindeye.models.readout).
  Decoding models: `--model` (configs/model/small by default). Subject 1: from scratch on sessions 1-4,
  100 epochs, lr 1e-3. Subject 8: pretrained on subjects 1-7 (40 epochs, lr 1e-3: at the default 3e-4
  and 20 epochs the prior's test loss stalls at 0.37 and its tokens lose identity), fine-tuned on its
  session 1 only (60 epochs), the paper's 1-hour setting, with its prior kept at the pretrained weights
  (freeze=[prior]: better tokens and images on held-out folds of session 1, benchmarks/finetune_recipe.py).
Metrics (mindeye.evaluation, on the paper's 256 px): PixCorr, SSIM and 2-way identification among the 30
test images (chance 50 %) with the world's own CLIP encoder (flattened tokens) and with a seeded random
AlexNet (conv5), a network the generator was not conditioned on. All of it is offline_training.evaluate's
code (evaluate_checkpoint, Generation); the models are trained once and cached in --runs.

    .venv/bin/python benchmarks/reconstruction_quality.py --teacher runs/generator/tiny-world/generator \\
        --student runs/distill/tiny-world/student --out benchmarks/results/reconstruction_quality

Writes <out>/table.md (the command line on top; target (b) below it: every brain-decoded row's 2-way minus
its subject's low-level image's, with a bootstrap interval over the test images), table.json (every score,
with the reasons for n/a), versus_low_level.json (those differences), grid.png (one row per test image; columns:
seen | from true tokens | from brain-decoded tokens | low-level | blend, every generator and token source) and
grid_live.png (the same images in fewer columns: seen | from true tokens | per subject its low-level image, the
generated picture and the blend, from the last generator given, drawn from noise, with the last --tokens: the
demo's path when those are the student and the readout), and prints the table.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from one_session_claim import run_training  # noqa: E402

from mindeye.clip import clip_identity  # noqa: E402
from mindeye.config import load_config  # noqa: E402
from mindeye.evaluation import (WORLD_COLUMNS, evaluate_reconstructions, paired_difference,  # noqa: E402
                                save_image_grid, world_feature_extractors, world_two_way_wins, write_table)
from mindeye.generator import GenerationSettings, default_steps, load_pipeline  # noqa: E402
from mindeye.nsd import NSDLayout, StimulusBrick  # noqa: E402
from mindeye.targets import build_target_cache, target_clip_config  # noqa: E402
from offline_training.data import load_subject  # noqa: E402
from offline_training.evaluate import Generation, evaluate_checkpoint  # noqa: E402
from simulators.world.generate import generate_world  # noqa: E402

COLUMNS = ("PixCorr", "SSIM", *WORLD_COLUMNS)
LOW_LEVEL = "low-level"
TARGET_TWO_WAY = 0.95  # from true tokens, both 2-way columns


def subject1_overrides(model: str) -> list[str]:
    return [f"model={model}", "mode=scratch", "subjects=[1]", "train_sessions=[1,2,3,4]", "train.epochs=100",
            "train.lr=1e-3"]


def subject1_checkpoint(root: Path, runs: Path, model: str, common: list[str], log) -> Path:
    """Subject 1 from scratch on sessions 1-4 (cached)."""
    run_training(runs / "subj01", [f"data.root={root}", *subject1_overrides(model), *common], log)
    return runs / "subj01" / "checkpoint"


def subject8_checkpoint(root: Path, runs: Path, model: str, pretrain_epochs: int, subject_epochs: int,
                        sessions: list[int], recipe: list[str], common: list[str], log) -> Path:
    """Pretrain on subjects 1-7, fine-tune subject 8 on `sessions` with the `recipe` overrides (cached)."""
    data = [f"data.root={root}", "seed=0"]
    pretrained = runs / f"pretrain-subj1-7-e{pretrain_epochs}"
    run_training(pretrained, [*data, f"model={model}", "mode=pretrain", "subjects=[1,2,3,4,5,6,7]",
                              f"train.epochs={pretrain_epochs}", "train.lr=1e-3", *common], log, keep_checkpoint=True)
    tag = "".join(f"-{o.replace('=', '-').replace('[', '').replace(']', '').replace(',', '+')}" for o in recipe)
    finetuned = runs / (f"subj08-session{'+'.join(map(str, sessions))}-e{subject_epochs}{tag}"
                        f"-from-{pretrained.name}")  # a new pretraining or recipe, a new run
    run_training(finetuned, [*data, "mode=finetune", "subjects=[8]", f"train_sessions=[{','.join(map(str, sessions))}]",
                             f"init_from={pretrained / 'checkpoint'}", f"train.epochs={subject_epochs}",
                             "train.eval.sample_every=0", *recipe, *common], log)
    return finetuned / "checkpoint"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path, default=None, help="a full-step generator folder")
    parser.add_argument("--student", type=Path, default=None, help="a distilled few-step generator folder")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/reconstruction_quality"))
    parser.add_argument("--world", default="tiny",
                        help="the world (configs/world/<name>.yaml), generated when absent; its training preset "
                             "(configs/train/<name>.yaml) trains the decoding models")
    parser.add_argument("--data-root", type=Path, default=None, help="default: data/world/<world>")
    parser.add_argument("--override", nargs="*", default=[],
                        help="mindeye-train overrides for every decoding model, e.g. train.mixed_precision=bf16")
    parser.add_argument("--runs", type=Path, default=Path("runs/bench/reconstruction_quality_small"),
                        help="where the models are trained (reused when there)")
    parser.add_argument("--model", default="small",
                        help="the decoding models' config (configs/model/); `tiny`, the tests' smallest model, has a "
                             "one-layer prior whose tokens lose to the low-level image on 2-way")
    parser.add_argument("--checkpoint-subj1", type=Path, default=None, help="default: train one into <runs>/subj01")
    parser.add_argument("--checkpoint-subj8", type=Path, default=None,
                        help="default: pretrain 1-7 and fine-tune on session 1 in <runs>")
    parser.add_argument("--pretrain-epochs", type=int, default=40)
    parser.add_argument("--subject-epochs", type=int, default=60, help="subject 8's fine-tuning epochs")
    parser.add_argument("--subject8-sessions", type=int, nargs="+", default=[1],
                        help="subject 8's fine-tuning sessions (1: the one-session setting; a tiny-world session "
                             "holds 77 trials, an NSD session 750)")
    parser.add_argument("--subject8-recipe", nargs="*", default=["freeze=[prior]"],
                        help="subject 8's fine-tuning overrides, chosen on validation folds of session 1 "
                             "(benchmarks/finetune_recipe.py)")
    parser.add_argument("--teacher-steps", type=int, default=None, help="default: 38")
    parser.add_argument("--student-steps", type=int, default=None, help="default: 4")
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    parser.add_argument("--lowlevel-blend", type=float, default=0.25)
    parser.add_argument("--img2img-strengths", type=float, nargs="+", default=[1.0],
                        help="where each generator starts: 1.0 from pure noise; below 1, that much of its schedule "
                             "from the low-level image (MindEye1's img2img start); one row per value")
    parser.add_argument("--tokens", nargs="+", default=["prior"], choices=["prior", "readout"],
                        help="the generator's image tokens: the prior's samples, and/or the subject's ridge readout of "
                             "the backbone tokens (saved in its checkpoint by mindeye-train); one row per value")
    parser.add_argument("--subjects", type=int, nargs="+", default=[1, 8], choices=[1, 8])
    parser.add_argument("--prior-steps", type=int, default=15)
    parser.add_argument("--prior-sampler", default="dpmpp")
    parser.add_argument("--prior-cond-scale", type=float, default=5.0,
                        help="the prior's classifier-free guidance (1: none; benchmarks/decoded_token_quality.py)")
    parser.add_argument("--seed", type=int, default=0, help="the prior's and the generators' noise")
    parser.add_argument("--grid-images", type=int, default=8)
    args = parser.parse_args()
    if args.teacher is None and args.student is None:
        parser.error("give --teacher and/or --student (generator folders)")
    started_s = time.monotonic()
    command = " ".join([os.path.relpath(sys.executable), *sys.argv])
    print("command:", command, flush=True)

    args.data_root = args.data_root or Path("data/world") / args.world
    root = args.data_root.resolve()
    generate_world(load_config("world_generate", [f"world={args.world}"]).world, root, progress=False)  # or reused
    common = [f"train={args.world}", *args.override]
    runs = args.runs.resolve()
    checkpoints = {}
    if 1 in args.subjects:
        checkpoints[1] = args.checkpoint_subj1 or subject1_checkpoint(root, runs, args.model, common, print)
    if 8 in args.subjects:
        checkpoints[8] = args.checkpoint_subj8 or subject8_checkpoint(
            root, runs, args.model, args.pretrain_epochs, args.subject_epochs, args.subject8_sessions,
            args.subject8_recipe, common, print)
    data_cfg = load_config("evaluate", [f"data.root={root}"]).data
    clip_id = clip_identity(target_clip_config(data_cfg))
    generations, folders = {}, {}
    for role, folder, steps in (("teacher", args.teacher, args.teacher_steps),
                                ("student", args.student, args.student_steps)):
        if folder is not None:
            pipe = load_pipeline(folder, clip_id=clip_id)  # refuses a generator of another encoder
            for strength, tokens in itertools.product(args.img2img_strengths, args.tokens):
                settings = GenerationSettings(steps=steps or default_steps(pipe), guidance_scale=args.guidance_scale,
                                              lowlevel_blend=args.lowlevel_blend, img2img_strength=strength)
                label = (f"{role} ({settings.steps} steps{f', from low-level {strength:g}' if strength < 1 else ''}"
                         f"{', readout tokens' if tokens == 'readout' else ''})")
                generations[label] = Generation(pipe, settings, args.prior_steps, args.prior_sampler, args.seed,
                                                args.prior_cond_scale, tokens=tokens)
                folders[label] = folder
    targets = build_target_cache(data_cfg)
    world = world_feature_extractors(targets.embedder)
    stimuli = StimulusBrick(NSDLayout(root).stimuli())

    # table rows, and the grid's columns {label: images (n, H, W, 3)} by kind
    rows: dict[str, dict] = {}
    true, decoded, low, blend = {}, {}, {}, {}
    subject_images: dict[str, dict[str, np.ndarray]] = {}  # {subjNN: {table row: images}}, for target (b)
    image_ids = seen = None
    for subject, checkpoint in checkpoints.items():
        data = load_subject(data_cfg, subject)
        name = f"subj{subject:02d}"
        for label, generation in generations.items():
            print(f"{name}, {label}: {checkpoint}", flush=True)
            scores, images, outputs = evaluate_checkpoint(checkpoint, data, targets, targets.codec, stimuli,
                                                          world_extractors=world, generation=generation)
            if image_ids is None:  # the generators' ceiling: the same images' true tokens
                image_ids, seen = outputs.image_ids, stimuli[outputs.image_ids]
                for true_label, true_generation in generations.items():
                    if true_generation.settings.img2img_strength < 1 or true_generation.tokens != "prior":
                        continue  # no low-level image to start from, no decoded tokens: rows alike
                    print(f"true tokens, {true_label}", flush=True)
                    made = true_generation.images(targets.get(image_ids)[0], None, seen.shape[1]).generated
                    rows[f"true tokens, {true_label}"] = evaluate_reconstructions(made, seen, world_extractors=world)
                    true[f"true tokens\n{true_label}"] = made
            if not np.array_equal(outputs.image_ids, image_ids):
                raise RuntimeError(f"{name}'s test images differ from the first subject's")
            if f"{name} low-level" not in rows:
                rows[f"{name} low-level"], low[f"{name}\nlow-level"] = scores["blurry"], images["blurry"]
            rows[f"{name}, {label}"], rows[f"{name}, {label} + blend"] = scores["generated"], scores["blend"]
            subject_images.setdefault(name, {LOW_LEVEL: images["blurry"]}).update(
                {label: images["generated"], f"{label} + blend": images["blend"]})
            decoded[f"{name}\n{label}"], blend[f"{name} blend\n{label}"] = images["generated"], images["blend"]
    columns = {"seen": seen, **true, **decoded, **low, **blend}
    live = ([label for label, generation in generations.items() if generation.settings.img2img_strength == 1]
            or list(generations))[-1]
    live_columns = ["seen", *list(true)[-1:], *itertools.chain.from_iterable(
        (f"{name}\nlow-level", f"{name}\n{live}", f"{name} blend\n{live}") for name in subject_images)]
    versus = {name: versus_low_level(images, seen, world) for name, images in subject_images.items()}
    write_outputs(args, command, rows, columns, live_columns, versus, image_ids, checkpoints, folders, generations,
                  time.monotonic() - started_s)


def versus_low_level(images: dict[str, np.ndarray], seen: np.ndarray, world) -> dict[str, dict[str, list[float]]]:
    """Target (b): each brain-decoded row's 2-way minus the low-level image's, per world network, on the same
    test images: {row: {column: [mean, low, high]}} with a 95 % bootstrap interval over the images."""
    wins = {label: world_two_way_wins(made, seen, world) for label, made in images.items()}
    return {label: {column: list(paired_difference(wins_n, wins[LOW_LEVEL][column]))
                    for column, wins_n in by_column.items()}
            for label, by_column in wins.items() if label != LOW_LEVEL}


def versus_lines(versus: dict[str, dict[str, dict[str, list[float]]]]) -> list[str]:
    """The footer's target (b): per subject, every decoded row against its low-level image, and a verdict."""
    lines = ["", "Target (b), above the low-level image alone on the semantic metrics: 2-way of a row minus its "
             "subject's low-level image, points, with a 95 % bootstrap interval over the test images (10,000 "
             "resamples; the distractors stay fixed). Clearly above: the interval's lower end above 0 with both "
             "networks.", ""]
    for name, rows in versus.items():
        clear = [label for label, by_column in rows.items() if all(low > 0 for _, low, _ in by_column.values())]
        lines += [f"| {name} | " + " | ".join(WORLD_COLUMNS) + " |", "| --- |" + " --- |" * len(WORLD_COLUMNS)]
        lines += [f"| {label} | " + " | ".join(f"{mean * 100:+.1f} [{low * 100:+.1f}, {high * 100:+.1f}]"
                                              for mean, low, high in by_column.values()) + " |"
                  for label, by_column in rows.items()]
        lines += ["", f"{name}: " + (f"clearly above its low-level image: {'; '.join(clear)}" if clear
                                     else "NOT clearly above its low-level image in any row"), ""]
    return lines


def write_outputs(args, command: str, rows: dict, columns: dict, live_columns: list[str], versus: dict,
                  image_ids: np.ndarray, checkpoints: dict, folders: dict, generations: dict, elapsed_s: float) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    md, js = args.out / "table.md", args.out / "table.json"
    write_table(rows, md, js, columns=COLUMNS)
    (args.out / "versus_low_level.json").write_text(json.dumps(versus, indent=2) + "\n")
    common = " ".join([f"train={args.world}", *args.override])
    trained = {1: f"{' '.join(subject1_overrides(args.model))} {common}" if args.checkpoint_subj1 is None else "given",
               8: (f"model={args.model}, pretrained on subjects 1-7, {args.pretrain_epochs} epochs, lr 1e-3; "
                   f"fine-tuned on session(s) {args.subject8_sessions}, {args.subject_epochs} epochs"
                   f"{', ' + ' '.join(args.subject8_recipe) if args.subject8_recipe else ''}; {common}")
               if args.checkpoint_subj8 is None
               else "given"}
    first = next(iter(generations.values()))
    header = [f"# Reconstructions on the `{args.data_root}` world", "", f"Command: `{command}`", "",
              f"{len(image_ids)} shared test images (2-way chance 50 %), scored at 256 px. Prior: "
              f"{first.prior_sampler}, {first.prior_steps} steps, guidance {first.prior_cond_scale:g}; generator "
              f"guidance scale {first.settings.guidance_scale}; "
              f"blend: {first.settings.lowlevel_blend} x low-level; seed {args.seed}.",
              *(f"- {label}: `{os.path.relpath(folder)}`" for label, folder in folders.items()),
              *(f"- subject {s}: `{os.path.relpath(c)}` ({trained[s]})" for s, c in checkpoints.items()), ""]
    lowest = {label: min(row[c] for c in WORLD_COLUMNS) for label, row in rows.items() if label.startswith("true")}
    footer = ["", f"Target from true tokens, 2-way >= {TARGET_TWO_WAY:.0%} with both networks: " + "; ".join(
        f"{label}: {'met' if v >= TARGET_TWO_WAY else 'NOT met'} (lower {v:.1%})" for label, v in lowest.items()),
        *versus_lines(versus), f"Total {elapsed_s:.0f} s."]
    md.write_text("\n".join(header) + "\n" + md.read_text() + "\n".join(footer) + "\n")
    shown = range(min(args.grid_images, len(image_ids)))
    for name, labels, cell_px in (("grid.png", list(columns), 96), ("grid_live.png", live_columns, 128)):
        save_image_grid([np.stack([columns[label][i] for label in labels]) for i in shown],
                        [f"image {image_ids[i]}" for i in shown], args.out / name, cell_px=cell_px, label_px=80,
                        column_labels=labels, header_px=80)
    print(md.read_text())
    print(f"wrote {md}, {js}, {args.out / 'grid.png'} and {args.out / 'grid_live.png'}")


if __name__ == "__main__":
    main()
