"""Evaluation metrics as the MindEye2 paper computes them.

Retrieval: for each of `repeats` draws of `pool_size` random test items, cosine similarity
between predicted and true embeddings (flattened); image retrieval counts a brain sample as
correct when its own image is the most similar of the pool, brain retrieval the converse.
The paper uses pools of 300 images and 30 draws; with fewer test items the pool is all of
them (k-way, chance = 1/k) and one draw is exact.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RetrievalScore:
    image_top1: float  # brain -> the right image among the pool
    brain_top1: float  # image -> the right brain sample among the pool
    pool_size: int
    repeats: int

    @property
    def chance(self) -> float:
        return 1.0 / self.pool_size


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = x.reshape(len(x), -1).astype(np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def retrieval_top1(predicted: np.ndarray, target: np.ndarray, pool_size: int = 300, repeats: int = 30,
                   seed: int = 0) -> RetrievalScore:
    """`predicted`, `target`: (n, ...) row i of one belongs with row i of the other."""
    if predicted.shape[0] != target.shape[0]:
        raise ValueError(f"{predicted.shape[0]} predictions for {target.shape[0]} targets")
    n = predicted.shape[0]
    if n < 2:
        raise ValueError("retrieval needs at least 2 test items")
    pred_u, target_u = _unit_rows(predicted), _unit_rows(target)
    if pool_size >= n:
        pool_size, repeats = n, 1
    rng = np.random.default_rng(seed)
    image_hits, brain_hits = [], []
    for _ in range(repeats):
        pool = rng.choice(n, size=pool_size, replace=False) if pool_size < n else np.arange(n)
        sim_pp = pred_u[pool] @ target_u[pool].T  # (brain, image)
        diagonal = np.arange(pool_size)
        image_hits.append(np.mean(sim_pp.argmax(axis=1) == diagonal))
        brain_hits.append(np.mean(sim_pp.argmax(axis=0) == diagonal))
    return RetrievalScore(float(np.mean(image_hits)), float(np.mean(brain_hits)), pool_size, repeats)
