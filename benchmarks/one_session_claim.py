"""The paper's central claim, measured on the synthetic world: a model pretrained on 7 subjects and
fine-tuned on one session of subject 8 beats the same model trained from scratch on that session.

For each world SNR (trial-noise setting) the script generates the world, pretrains on subjects 1-7
(with and without the backbone's residual blocks), then for each seed trains subject 8:
  finetune      - from the pretrained checkpoint, session 1 only (the "1 hour")
  scratch       - the same session, no pretraining
  all sessions  - from scratch on all of subject 8's sessions (the data-rich reference)
  finetune, no residual blocks - fine-tuned from the pretraining without them (the ablation)
  finetune, LoRA r  - the parameter-efficient fine-tune the paper does not have (MindTuner, Duala): a
                      fresh aligner plus rank-r adapters on the shared backbone, the rest frozen
and reports top-1 test retrieval (image / brain; mean and spread over seeds) from each run's final
evaluation. Every run is the real command (`python -m offline_training.train ...`), logged in its
own folder, so any row can be reproduced or inspected (log.jsonl, training.png).

    python benchmarks/one_session_claim.py --world small --seeds 0 1 2 --pretrain-epochs 6 --subject-epochs 12 \
        --override model.low_level.enabled=false train.mixed_precision=bf16         # the issue's benchmark
    python benchmarks/one_session_claim.py --world tiny --out benchmarks/results/one_session_claim_tiny
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from mindeye.config import load_config
from simulators.world.generate import generate_world

CONDITIONS = ("finetune", "scratch", "all sessions", "finetune, no residual blocks", "finetune, LoRA")


def run_training(out_dir: Path, overrides: list[str], log, keep_checkpoint: bool = False) -> dict:
    """Run one training command to its last epoch (skipped if it got there; resumed if it was stopped part
    way, e.g. by the end of a session); its final log record, plus the trainable parameter count it
    printed (`trainable`) and its epochs' time, training and evaluation (`seconds`). A run whose checkpoint
    later runs start from (`keep_checkpoint`) is trained again if only its logs survived: a fresh clone
    has the committed logs but not the gitignored checkpoints."""
    done = finished(out_dir)
    if done and keep_checkpoint and not (out_dir / "checkpoint").is_dir():
        log(f"{out_dir} finished but its checkpoint is gone; training it again")
        shutil.rmtree(out_dir / "train_state", ignore_errors=True)  # the trainer refuses to start over one
        done = False
    if not done:
        resume = (out_dir / "train_state").is_dir()
        command = [sys.executable, "-m", "offline_training.train", f"out_dir={out_dir}", "progress=false", "cpu=true",
                   *overrides, *(["resume=true"] if resume else [])]
        log(" ".join(command[1:]))
        start = time.time()
        out_dir.mkdir(parents=True, exist_ok=True)
        with (out_dir / "stdout.txt").open("a" if resume else "w") as stdout:
            subprocess.run(command, check=True, stdout=stdout)
        log(f"  done in {time.time() - start:.0f} s")
    records = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().strip().splitlines()]
    stdout = out_dir / "stdout.txt"  # absent from runs made before it was kept
    trainable = re.search(r"trainable (\d+)", stdout.read_text()) if stdout.is_file() else None
    return {**records[-1], "trainable": int(trainable.group(1)) if trainable else None,
            "seconds": sum(r["seconds"] for r in records)}


def finished(out_dir: Path) -> bool:
    """Whether the run in `out_dir` logged its last epoch."""
    log, run_config = out_dir / "log.jsonl", out_dir / "run_config.yaml"
    if not (log.is_file() and run_config.is_file() and log.read_text().strip()):
        return False
    last_epoch = json.loads(log.read_text().strip().splitlines()[-1])["epoch"]
    return last_epoch >= OmegaConf.load(run_config).train.epochs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", default="small", help="world config (configs/world/<name>.yaml)")
    parser.add_argument("--trial-noise", type=float, nargs="+", default=[0.75, 1.5, 3.0],
                        help="world.snr.trial_noise_pct values: the SNR settings compared")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--pretrain-epochs", type=int, default=None, help="default: the train preset's")
    parser.add_argument("--subject-epochs", type=int, default=None, help="epochs of the subject-8 runs")
    parser.add_argument("--model", default=None, help="model config (default: the world's name)")
    parser.add_argument("--adapter-rank", type=int, default=8, help="LoRA rank of the parameter-efficient fine-tune")
    parser.add_argument("--override", nargs="*", default=[],
                        help="training overrides for every run (e.g. model.low_level.enabled=false: retrieval "
                             "does not use the blurry head, and it is the costliest part of a CPU step)")
    parser.add_argument("--data-root", type=Path, default=Path("data/bench"), help="where the worlds go")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/one_session_claim"))
    args = parser.parse_args()
    model = args.model or args.world
    runs_dir = args.out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    log_file = (args.out / "log.txt").open("a")

    def log(line: str) -> None:
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    common = [f"model={model}", f"train={args.world}", *args.override]
    results: dict[float, dict[str, list[tuple[float, float]]]] = {}
    seconds: dict[float, float] = {}  # per SNR, summed over its runs' epochs
    for noise in args.trial_noise:
        world_cfg = load_config("world_generate", [f"world={args.world}", f"world.snr.trial_noise_pct={noise}"]).world
        root = args.data_root / f"{args.world}-trialnoise{noise}"
        log(f"world {args.world}, trial noise {noise} %: {root}")
        generate_world(world_cfg, root, progress=False)
        data = [f"data.root={root}"]
        pre = [*common, *data, "mode=pretrain", "subjects=[1,2,3,4,5,6,7]", "seed=0", "train.eval.every=4"]
        if args.pretrain_epochs:
            pre.append(f"train.epochs={args.pretrain_epochs}")
        tag = f"noise{noise}"
        pretrained = runs_dir / f"{tag}-pretrain"
        pretrained_flat = runs_dir / f"{tag}-pretrain-noblocks"
        subject = [*common, *data, "subjects=[8]", "train.eval.sample_every=0"]
        if args.subject_epochs:
            subject.append(f"train.epochs={args.subject_epochs}")
        subject_runs = []  # (condition, run folder, overrides, the pretraining it starts from)
        for seed in args.seeds:
            for condition, name, extra, base in [
                ("finetune", f"finetune-s{seed}", ["mode=finetune", "train_sessions=[1]"], pretrained),
                ("scratch", f"scratch-s{seed}", ["mode=scratch", "train_sessions=[1]"], None),
                ("all sessions", f"all-s{seed}", ["mode=scratch", "train_sessions=null"], None),
                ("finetune, no residual blocks", f"finetune-noblocks-s{seed}",
                 ["mode=finetune", "train_sessions=[1]"], pretrained_flat),
                ("finetune, LoRA", f"finetune-lora{args.adapter_rank}-s{seed}",
                 ["mode=finetune", "train_sessions=[1]", f"adapter_rank={args.adapter_rank}"], pretrained),
            ]:
                init = [f"init_from={base / 'checkpoint'}"] if base else []
                subject_runs.append((condition, runs_dir / f"{tag}-{name}", [*subject, *extra, *init, f"seed={seed}"],
                                     base))
        seconds[noise] = 0.0
        for base, overrides in [(pretrained, pre), (pretrained_flat, [*pre, "model.residual_blocks=false"])]:
            needed = any(b == base and not finished(out) for _, out, _, b in subject_runs)
            seconds[noise] += run_training(base, overrides, log, keep_checkpoint=needed)["seconds"]
        scores: dict[str, list[tuple[float, float]]] = {c: [] for c in CONDITIONS}
        trainable: dict[str, int | None] = {}
        for condition, out, overrides, _ in subject_runs:
            final = run_training(out, overrides, log)
            scores[condition].append((final["test/image_top1"], final["test/brain_top1"]))
            trainable[condition] = final["trainable"]
            seconds[noise] += final["seconds"]
            chance = final["test/chance"]
        results[noise] = scores
        write_table(args, results, chance, trainable, seconds)
    log_file.close()


def write_table(args, results: dict, chance: float, trainable: dict[str, int | None],
                seconds: dict[float, float]) -> None:
    header = "| subject 8 trained on | " + " | ".join(
        f"trial noise {noise} %: image / brain top-1" for noise in results) + " |"
    lines = [f"# One-session fine-tuning vs scratch, `{args.world}` world", "",
             f"Test retrieval of subject 8 (top-1, {round(1 / chance)}-way, chance {chance:.1%}); mean +- sd over "
             f"seeds {args.seeds}. Command: `python benchmarks/one_session_claim.py --world {args.world} "
             f"--trial-noise {' '.join(map(str, args.trial_noise))} --seeds {' '.join(map(str, args.seeds))}"
             + (f" --pretrain-epochs {args.pretrain_epochs}" if args.pretrain_epochs else "")
             + (f" --subject-epochs {args.subject_epochs}" if args.subject_epochs else "")
             + (f" --adapter-rank {args.adapter_rank}" if args.adapter_rank != 8 else "")
             + (f" --override {' '.join(args.override)}" if args.override else "") + "`.", "",
             header, "| --- |" + " --- |" * len(results)]
    for condition in CONDITIONS:
        cells = []
        for scores in results.values():
            image, brain = np.array(scores[condition]).T * 100
            cells.append(f"{image.mean():.1f} +- {image.std():.1f} / {brain.mean():.1f} +- {brain.std():.1f}")
        lines.append(f"| {condition} | " + " | ".join(cells) + " |")
    lines += ["", "| image top-1 ratio | " + " | ".join(f"trial noise {noise} %" for noise in results) + " |",
              "| --- |" + " --- |" * len(results)]
    for name, denominator in (("finetune / scratch", "scratch"), ("finetune / all sessions", "all sessions")):
        cells = [f"{np.mean(np.array(s['finetune'])[:, 0]) / max(np.mean(np.array(s[denominator])[:, 0]), 1e-9):.2f}"
                 for s in results.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    counts = ", ".join(f"{condition}: {n:,}" for condition, n in trainable.items() if n is not None)
    lines += ["", f"Trainable parameters of subject 8's runs: {counts}.", "",
              "Training time (epochs, training and evaluation, summed over the runs; world generation and start-up "
              "not included): " + ", ".join(f"trial noise {noise} %: {s / 3600:.2f} h" for noise, s in seconds.items())
              + f"; in all {sum(seconds.values()) / 3600:.2f} h on this machine "
              f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores)."]
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    (args.out / "results.json").write_text(json.dumps(
        {"world": args.world, "chance": chance, "seeds": args.seeds, "trainable": trainable, "seconds": seconds,
         "results": {str(k): v for k, v in results.items()}}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
