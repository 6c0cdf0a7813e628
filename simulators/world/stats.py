"""The two statistics the world's generator and its checks share."""
from __future__ import annotations

import numpy as np


def standardise(x_nk: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """Each column to mean 0, std 1 (over the rows)."""
    return (x_nk - x_nk.mean(0)) / (x_nk.std(0) + eps)


def rowwise_corr(a_nk: np.ndarray, b_nk: np.ndarray, eps: float = 0.0) -> np.ndarray:
    """(n,) Pearson correlation of row i of `a` with row i of `b`."""
    a_nk, b_nk = a_nk - a_nk.mean(1, keepdims=True), b_nk - b_nk.mean(1, keepdims=True)
    return (a_nk * b_nk).sum(1) / np.sqrt((a_nk * a_nk).sum(1) * (b_nk * b_nk).sum(1) + eps)
