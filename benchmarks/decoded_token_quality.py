"""How much of the seen image's identity the decoded CLIP tokens keep, before any generator draws them.

For each checkpoint, on its subject's test set (outputs averaged over each image's repeats), against the
seen images' true world-CLIP tokens: 2-way identification among the test images and mean cosine of
- the prior's tokens (DPM-Solver++, 15 steps; and 1 step, its x_start from pure noise), what the generator gets;
  with classifier-free guidance scales other than 1 too when `--cond-scales` asks (the live service's is 5);
- a ridge map from the backbone tokens, fitted on the same subject's training trials (the sessions the
  checkpoint was trained on): what a linear readout of the same backbone tokens reaches, a bar for the prior;
- the retrieval head's tokens (contrastive, so their 2-way counts but their cosine does not).

    .venv/bin/python benchmarks/decoded_token_quality.py --data-root data/world/tiny --cond-scales 1 3 5 \\
        --checkpoint 1=runs/bench/reconstruction_quality_small/subj01/checkpoint:1,2,3,4 \\
        --checkpoint 8=runs/bench/reconstruction_quality_small/subj08-session1-e60-freeze-prior-from-pretrain-subj1-7-e40/checkpoint:1 \\
        --checkpoint 1=runs/bench/reconstruction_quality_small/pretrain-subj1-7-e40/checkpoint:1,2,3,4 \\
        > benchmarks/results/decoded_token_quality.txt
(the checkpoints benchmarks/reconstruction_quality.py trains; add --model tiny --runs <folder> there for the
tests' model)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from mindeye.config import load_config
from mindeye.evaluation import two_way_identification
from mindeye.models import load_checkpoint
from mindeye.models.readout import fit_token_readout
from mindeye.targets import build_target_cache
from offline_training.data import load_subject
from offline_training.evaluate import predict_test_set

RIDGE_ALPHA = 100.0  # on z-scored backbone tokens; 10-1000 give within 3 points of each other here


def unit_rows(tokens: np.ndarray) -> np.ndarray:
    flat = tokens.reshape(len(tokens), -1)
    return flat / np.linalg.norm(flat, axis=1, keepdims=True)


def ridge_readout(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, alpha: float) -> np.ndarray:
    """mindeye.models.readout's ridge at one alpha (before its norm matching), from z-scored features (n, p) to
    targets (n, q), on test_x."""
    readout, _ = fit_token_readout(torch.from_numpy(train_x), torch.from_numpy(train_y), [alpha])
    with torch.no_grad():
        return readout.ridge(torch.from_numpy(test_x)).numpy()


def parse_checkpoint(text: str) -> tuple[int, Path, list[int]]:
    """SUBJECT=PATH:SESSIONS, e.g. 8=runs/x/checkpoint:1."""
    subject, rest = text.split("=", 1)
    path, sessions = rest.rsplit(":", 1)
    return int(subject), Path(path), [int(s) for s in sessions.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, default=Path("data/world/tiny"))
    parser.add_argument("--checkpoint", type=parse_checkpoint, action="append", required=True,
                        help="SUBJECT=CHECKPOINT:TRAIN_SESSIONS (the sessions the ridge readout is fitted on)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cond-scales", type=float, nargs="+", default=[1.0],
                        help="the prior's classifier-free guidance scales to sample with (15 steps)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data_cfg = load_config("evaluate", [f"data.root={args.data_root.resolve()}"]).data
    targets = build_target_cache(data_cfg)
    print(f"# command: {' '.join(sys.argv)}")
    print(f"{'subject':8s} {'tokens':34s} {'2-way':>6s} {'cosine':>7s}")
    for subject, checkpoint, sessions in args.checkpoint:
        data = load_subject(data_cfg, subject, sessions)
        model = load_checkpoint(checkpoint).eval()
        config = model.config
        print(f"# subj{subject:02d}: {checkpoint} (hidden {config.hidden_dim}, prior depth {config.prior.depth} x "
              f"{config.prior.heads} heads of {config.prior.dim_head}), trained on sessions {sessions}")
        test = predict_test_set(lambda voxels, name: model(voxels, name), data, 64)
        true = targets.get(test.image_ids)[0]
        backbone = torch.from_numpy(test.backbone_tokens)
        with torch.no_grad():
            train_backbone = np.concatenate([model(torch.from_numpy(data.train_voxels[i:i + 256]), data.name)
                                             .backbone_tokens.numpy() for i in range(0, len(data.train_voxels), 256)])
            rows = {}
            for steps, cond_scale in [(15, scale) for scale in args.cond_scales] + [(1, 1.0)]:
                label = f"prior, dpmpp {steps} step{'s' * (steps > 1)}" + (f", guidance {cond_scale:g}"
                                                                          if cond_scale != 1 else "")
                rows[label] = model.prior.sample(backbone, steps=steps, cond_scale=cond_scale, sampler="dpmpp",
                                                 generator=torch.Generator().manual_seed(args.seed)).numpy()
        n_train = len(data.train_voxels)
        rows[f"ridge from backbone ({n_train} trials)"] = ridge_readout(
            train_backbone.reshape(n_train, -1), targets.get(data.train_image_ids)[0].reshape(n_train, -1),
            test.backbone_tokens.reshape(len(true), -1), RIDGE_ALPHA)
        rows["retrieval head"] = test.retrieval_tokens
        for label, tokens in rows.items():
            two_way = two_way_identification(tokens.reshape(len(tokens), -1), true.reshape(len(true), -1))
            cosine = float(np.mean(np.sum(unit_rows(tokens) * unit_rows(true), axis=1)))
            print(f"subj{subject:02d}   {label:34s} {two_way:6.1%} {cosine:7.3f}", flush=True)


if __name__ == "__main__":
    main()
