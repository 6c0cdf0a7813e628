"""Table 1 of the MindEye2 paper for our models: scores, the markdown/JSON table, image grids.

A result row is a dict keyed by `METRIC_COLUMNS` (in the paper's order) holding raw scores -
correlations, SSIM, fractions correct, correlation distances - or None where a metric could not
be computed, plus `NOTES_KEY`: {column: why it is missing}. The table shows PixCorr, SSIM, Eff and
SwAV to 3 decimals and 2-way identification and retrieval as percentages to 1 decimal.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mindeye.evaluation.features import MetricUnavailable, build_feature_extractor
from mindeye.evaluation.image_metrics import (
    PAPER_DOWNSAMPLE_ANTIALIAS,
    correlation_distance,
    images_to_nchw,
    pixcorr,
    resize_nchw,
    ssim,
    two_way_identification,
)
from mindeye.metrics import RetrievalScore

METRIC_COLUMNS = ("PixCorr", "SSIM", "Alex(2)", "Alex(5)", "Incep", "CLIP", "Eff", "SwAV",
                  "Image retrieval", "Brain retrieval")
FEATURE_COLUMNS = {"Alex(2)": "alexnet2", "Alex(5)": "alexnet5", "Incep": "inception", "CLIP": "clip",
                   "Eff": "efficientnet", "SwAV": "swav"}
LOWER_IS_BETTER = ("Eff", "SwAV")
PERCENT_COLUMNS = ("Alex(2)", "Alex(5)", "Incep", "CLIP", "Image retrieval", "Brain retrieval")
NOTES_KEY = "notes"
PAPER_EVAL_SIZE = 256  # px: the official evaluation resizes seen images and reconstructions to this first


def evaluate_reconstructions(recon_nhwc: np.ndarray, target_nhwc: np.ndarray, *, weights_dir: Path | None = None,
                             retrieval: RetrievalScore | None = None, eval_size: int | None = PAPER_EVAL_SIZE,
                             device: str = "cpu") -> dict[str, float | None | dict[str, str]]:
    """One Table 1 row for reconstructions and the images that were seen, row i with row i.

    Both sets are first resized to `eval_size` (square, bilinear, not antialiased; None keeps
    them as they are), as the paper does. Retrieval comes from `mindeye.metrics.retrieval_top1`.
    The paper's 'enhanced' rows score 0.75 * reconstruction + 0.25 * blurry reconstruction:
    blend before calling this.
    """
    recon, target = _at_size(recon_nhwc, eval_size, "reconstructions"), _at_size(target_nhwc, eval_size, "seen images")
    if recon.shape != target.shape:
        raise ValueError(f"reconstructions {recon.shape} and seen images {target.shape} differ in shape")
    row: dict[str, float | None | dict[str, str]] = {"PixCorr": pixcorr(recon, target), "SSIM": ssim(recon, target)}
    notes: dict[str, str] = {}
    for column, name in FEATURE_COLUMNS.items():
        try:
            extractor = build_feature_extractor(name, weights_dir, device=device)
        except MetricUnavailable as unavailable:
            row[column], notes[column] = None, unavailable.reason
            continue
        score = two_way_identification if extractor.metric == "two_way" else correlation_distance
        row[column] = score(extractor(recon), extractor(target))
    if retrieval is None:
        row["Image retrieval"] = row["Brain retrieval"] = None
        notes["Image retrieval"] = notes["Brain retrieval"] = "no retrieval scores were given"
    else:
        row["Image retrieval"], row["Brain retrieval"] = retrieval.image_top1, retrieval.brain_top1
    row[NOTES_KEY] = notes
    return row


def _at_size(images_nhwc: np.ndarray, size: int | None, what: str) -> np.ndarray:
    if size is None:
        return images_nhwc
    images_nchw = resize_nchw(images_to_nchw(images_nhwc, what), size, antialias=PAPER_DOWNSAMPLE_ANTIALIAS)
    images_nchw.clamp_(0.0, 1.0)  # float rounding may pass 1 by an ulp
    return images_nchw.permute(0, 2, 3, 1).numpy()


def format_score(column: str, value: float) -> str:
    """The paper's style: '96.1' for percentages, '.322' for correlations, SSIM and distances."""
    if column in PERCENT_COLUMNS:
        return f"{100.0 * value:.1f}"
    text = f"{value:.3f}"
    return text.replace("0.", ".", 1) if text.lstrip("-").startswith("0.") else text


def write_table(results: dict[str, dict], path_md: Path, path_json: Path) -> None:
    """`results`: {model or condition: row from `evaluate_reconstructions`} -> markdown table and JSON.

    Unavailable scores print as 'n/a (k)', footnote k giving the reason; identical reasons share a footnote.
    """
    rows = {model: _checked_row(model, row) for model, row in results.items()}
    header = [f"{c} {'↓' if c in LOWER_IS_BETTER else '↑'}" for c in METRIC_COLUMNS]
    lines = ["| model | " + " | ".join(header) + " |", "|" + " --- |" * (len(METRIC_COLUMNS) + 1)]
    columns_by_reason: dict[str, list[str]] = {}  # footnote order = first appearance
    for model, (scores, notes) in rows.items():
        cells = []
        for column in METRIC_COLUMNS:
            if scores[column] is not None:
                cells.append(format_score(column, scores[column]))
                continue
            columns = columns_by_reason.setdefault(notes[column], [])
            if column not in columns:
                columns.append(column)
            cells.append(f"n/a ({list(columns_by_reason).index(notes[column]) + 1})")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    lines += ["", "2-way identification and retrieval: percent correct. Eff, SwAV: correlation distance."]
    if columns_by_reason:
        lines += ["", "Not available:"] + [f"({k}) {', '.join(columns)}: {reason}"
                                           for k, (reason, columns) in enumerate(columns_by_reason.items(), start=1)]
    Path(path_md).write_text("\n".join(lines) + "\n")
    as_json = {model: {**scores, NOTES_KEY: notes} for model, (scores, notes) in rows.items()}
    Path(path_json).write_text(json.dumps(as_json, indent=2, allow_nan=False) + "\n")


def _checked_row(model: str, row: dict) -> tuple[dict[str, float | None], dict[str, str]]:
    """(scores as floats or None for every column, a reason for each None)."""
    unknown = set(row) - set(METRIC_COLUMNS) - {NOTES_KEY}
    if unknown:
        raise ValueError(f"row '{model}': unknown columns {sorted(unknown)}; known: {', '.join(METRIC_COLUMNS)}")
    notes = dict(row.get(NOTES_KEY) or {})
    scores: dict[str, float | None] = {}
    for column in METRIC_COLUMNS:
        value = row.get(column)
        if value is None:
            notes.setdefault(column, "not computed")
        elif not np.isfinite(value):
            raise ValueError(f"row '{model}': {column} is {value}")
        scores[column] = None if value is None else float(value)
    return scores, {column: reason for column, reason in notes.items() if scores.get(column) is None}


GRID_PAD_PX = 4


def save_image_grid(rows: Sequence[np.ndarray], row_labels: Sequence[str], path: Path, *, cell_px: int = 128,
                    label_px: int = 160, max_columns: int | None = None) -> tuple[int, int]:
    """A labelled PNG grid: row r shows the images of `rows[r]` ((N_r, H, W, 3), uint8 or [0, 1] float).

    Each image is resized to a cell_px square; the row's label sits in a label_px wide strip on the
    left. Size: width = label_px + n_columns * (cell_px + GRID_PAD_PX) + GRID_PAD_PX,
    height = n_rows * (cell_px + GRID_PAD_PX) + GRID_PAD_PX. Returns (width, height).
    """
    if len(rows) != len(row_labels):
        raise ValueError(f"{len(rows)} rows of images for {len(row_labels)} labels")
    if not rows:
        raise ValueError("no rows to draw")
    n_columns = max(len(images) for images in rows)
    n_columns = min(n_columns, max_columns) if max_columns is not None else n_columns
    width = label_px + n_columns * (cell_px + GRID_PAD_PX) + GRID_PAD_PX
    height = len(rows) * (cell_px + GRID_PAD_PX) + GRID_PAD_PX
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=max(10, cell_px // 9))
    for r, (images, label) in enumerate(zip(rows, row_labels)):
        top = GRID_PAD_PX + r * (cell_px + GRID_PAD_PX)
        draw.multiline_text((GRID_PAD_PX, top + cell_px // 2), label, fill="black", font=font, anchor="lm")
        images_uint8 = _as_uint8_nhwc(images, f"grid row '{label}'")
        for c, image_hw3 in enumerate(images_uint8[:n_columns]):
            cell = Image.fromarray(image_hw3).resize((cell_px, cell_px), Image.Resampling.BICUBIC)
            canvas.paste(cell, (label_px + GRID_PAD_PX + c * (cell_px + GRID_PAD_PX), top))
    canvas.save(path, format="PNG")
    return width, height


def _as_uint8_nhwc(images_nhwc: np.ndarray, what: str) -> np.ndarray:
    images_nchw = images_to_nchw(images_nhwc, what)  # validates shape, dtype and range
    return (images_nchw.permute(0, 2, 3, 1).numpy() * 255.0).round().astype(np.uint8)
