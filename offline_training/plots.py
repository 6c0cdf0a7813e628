"""The training run at a glance: losses and test retrieval against epoch, from log.jsonl's records."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; training nodes have no display
import matplotlib.pyplot as plt  # noqa: E402

LOSSES = (("train/loss", "total (weighted)"), ("train/prior", "prior MSE"), ("train/contrastive", "contrastive"),
          ("train/low_level", "low-level L1"), ("test/prior_loss", "test prior MSE"))
RETRIEVAL = (("test/image_top1", "image top-1"), ("test/brain_top1", "brain top-1"),
             ("test/sampled_image_top1", "image top-1, prior samples"))


def plot_training_log(records: list[dict[str, Any]], path: str | Path) -> Path:
    """Two panels: losses (log scale) and test top-1 retrieval with its chance level; returns `path`."""
    fig, (ax_loss, ax_ret) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for key, label in LOSSES:
        points = [(r["epoch"], r[key]) for r in records if key in r]
        if points:
            ax_loss.plot(*zip(*points), marker="o", markersize=3, label=label)
    switch = [r["epoch"] for r in records if r.get("contrastive") == "softclip"]
    if switch and switch[0] > 1:
        for ax in (ax_loss, ax_ret):
            ax.axvline(switch[0] - 0.5, color="grey", linestyle=":", linewidth=1)
        ax_loss.text(switch[0] - 0.5, 0.02, "BiMixCo | SoftCLIP", transform=ax_loss.get_xaxis_transform(),
                     va="bottom", ha="center", fontsize=8, color="grey")
    ax_loss.set(xlabel="epoch", ylabel="loss", yscale="log", title="training losses (epoch means)")
    ax_loss.legend(fontsize=8)
    for key, label in RETRIEVAL:
        points = [(r["epoch"], 100 * r[key]) for r in records if key in r]
        if points:
            ax_ret.plot(*zip(*points), marker="o", markersize=3, label=label)
    chance = [100 * r["test/chance"] for r in records if "test/chance" in r]
    if chance:
        ax_ret.axhline(chance[-1], color="black", linestyle="--", linewidth=1, label=f"chance ({chance[-1]:.1f} %)")
    ax_ret.set(xlabel="epoch", ylabel="top-1 (%)", ylim=(0, 100),
               title="test retrieval (outputs averaged over repeats)")
    ax_ret.legend(fontsize=8)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
