"""Table 1 of the MindEye2 paper for our models: scores, the markdown/JSON table, image grids.

A result row is a dict keyed by `METRIC_COLUMNS` (in the paper's order) holding raw scores -
correlations, SSIM, fractions correct, correlation distances - or None where a metric could not
be computed, plus `NOTES_KEY`: {column: why it is missing}. On a synthetic world a row may also hold
`WORLD_COLUMNS`, 2-way identification with networks that need no downloaded weights (shown after
the paper's columns, in tables where some row has them). The table shows PixCorr, SSIM, Eff and
SwAV to 3 decimals and 2-way identification and retrieval as percentages to 1 decimal.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mindeye.evaluation.features import FeatureExtractor, MetricUnavailable, build_feature_extractor
from mindeye.evaluation.image_metrics import (
    PAPER_DOWNSAMPLE_ANTIALIAS,
    correlation_distance,
    images_to_nchw,
    pixcorr,
    resize_nchw,
    ssim,
    two_way_identification,
    two_way_wins,
)
from mindeye.metrics import RetrievalScore

METRIC_COLUMNS = ("PixCorr", "SSIM", "Alex(2)", "Alex(5)", "Incep", "CLIP", "Eff", "SwAV",
                  "Image retrieval", "Brain retrieval")
FEATURE_COLUMNS = {"Alex(2)": "alexnet2", "Alex(5)": "alexnet5", "Incep": "inception", "CLIP": "clip",
                   "Eff": "efficientnet", "SwAV": "swav"}
# 2-way identification with the weightless extractors of a synthetic world (features.world_feature_extractors)
WORLD_COLUMNS = {"World CLIP": "world_clip", "Rand. AlexNet": "random_alexnet"}
ALL_COLUMNS = (*METRIC_COLUMNS, *WORLD_COLUMNS)
LOWER_IS_BETTER = ("Eff", "SwAV")
PERCENT_COLUMNS = ("Alex(2)", "Alex(5)", "Incep", "CLIP", "Image retrieval", "Brain retrieval", *WORLD_COLUMNS)
NOTES_KEY = "notes"
PAPER_EVAL_SIZE = 256  # px: the official evaluation resizes seen images and reconstructions to this first


def evaluate_reconstructions(recon_nhwc: np.ndarray, target_nhwc: np.ndarray, *, weights_dir: Path | None = None,
                             retrieval: RetrievalScore | None = None, eval_size: int | None = PAPER_EVAL_SIZE,
                             world_extractors: Sequence[FeatureExtractor] = (),
                             device: str = "cpu") -> dict[str, float | None | dict[str, str]]:
    """One Table 1 row for reconstructions and the images that were seen, row i with row i.

    Both sets are first resized to `eval_size` (square, bilinear, not antialiased; None keeps
    them as they are), as the paper does. Retrieval comes from `mindeye.metrics.retrieval_top1`.
    The paper's 'enhanced' rows score 0.75 * reconstruction + 0.25 * blurry reconstruction:
    blend before calling this. `world_extractors` (features.world_feature_extractors) add their
    WORLD_COLUMNS.
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
    for column, wins_n in world_two_way_wins(recon, target, world_extractors, eval_size=None).items():
        row[column] = float(np.mean(wins_n))  # = two_way_identification
    row[NOTES_KEY] = notes
    return row


def world_two_way_wins(recon_nhwc: np.ndarray, target_nhwc: np.ndarray, world_extractors: Sequence[FeatureExtractor],
                       *, eval_size: int | None = PAPER_EVAL_SIZE) -> dict[str, np.ndarray]:
    """{WORLD_COLUMNS column: (n,) per-image 2-way wins} (image_metrics.two_way_wins), at `eval_size` as the table."""
    recon, target = _at_size(recon_nhwc, eval_size, "reconstructions"), _at_size(target_nhwc, eval_size, "seen images")
    column_of = {name: column for column, name in WORLD_COLUMNS.items()}
    wins = {}
    for extractor in world_extractors:
        if extractor.name not in column_of:
            raise ValueError(f"no table column for feature extractor '{extractor.name}'; known: {list(column_of)}")
        wins[column_of[extractor.name]] = two_way_wins(extractor(recon), extractor(target))
    return wins


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


def write_table(results: dict[str, dict], path_md: Path, path_json: Path, *,
                columns: Sequence[str] | None = None) -> None:
    """`results`: {model or condition: row from `evaluate_reconstructions`} -> markdown table and JSON.

    The table shows `columns` (default: METRIC_COLUMNS, then the WORLD_COLUMNS some row has); the JSON
    holds every column. Unavailable scores print as 'n/a (k)', footnote k giving the reason; identical
    reasons share a footnote.
    """
    rows = {model: _checked_row(model, row) for model, row in results.items()}
    if columns is None:
        columns = (*METRIC_COLUMNS, *(c for c in WORLD_COLUMNS if any(c in row for row in results.values())))
    unknown = [column for column in columns if column not in ALL_COLUMNS]
    if unknown:
        raise ValueError(f"unknown columns {unknown}; known: {', '.join(ALL_COLUMNS)}")
    header = [f"{c} {'↓' if c in LOWER_IS_BETTER else '↑'}" for c in columns]
    lines = ["| model | " + " | ".join(header) + " |", "|" + " --- |" * (len(columns) + 1)]
    columns_by_reason: dict[str, list[str]] = {}  # footnote order = first appearance
    for model, (scores, notes) in rows.items():
        cells = []
        for column in columns:
            if scores.get(column) is not None:
                cells.append(format_score(column, scores[column]))
                continue
            reason = notes.get(column, "not computed")
            same_reason = columns_by_reason.setdefault(reason, [])
            if column not in same_reason:
                same_reason.append(column)
            cells.append(f"n/a ({list(columns_by_reason).index(reason) + 1})")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    lines += ["", "2-way identification and retrieval: percent correct. Eff, SwAV: correlation distance."]
    if any(column in WORLD_COLUMNS for column in columns):
        lines[-1] += (" World CLIP: 2-way with the world's own CLIP tokens; Rand. AlexNet: with a seeded "
                      "random-weight AlexNet's conv5 (a network the generator was not conditioned on).")
    if columns_by_reason:
        lines += ["", "Not available:"] + [f"({k}) {', '.join(same)}: {reason}"
                                           for k, (reason, same) in enumerate(columns_by_reason.items(), start=1)]
    Path(path_md).write_text("\n".join(lines) + "\n")
    as_json = {model: {**scores, NOTES_KEY: notes} for model, (scores, notes) in rows.items()}
    Path(path_json).write_text(json.dumps(as_json, indent=2, allow_nan=False) + "\n")


def _checked_row(model: str, row: dict) -> tuple[dict[str, float | None], dict[str, str]]:
    """(scores as floats or None for the paper's columns and the world columns the row has, a reason for each None)."""
    unknown = set(row) - set(ALL_COLUMNS) - {NOTES_KEY}
    if unknown:
        raise ValueError(f"row '{model}': unknown columns {sorted(unknown)}; known: {', '.join(ALL_COLUMNS)}")
    notes = dict(row.get(NOTES_KEY) or {})
    scores: dict[str, float | None] = {}
    for column in (*METRIC_COLUMNS, *(c for c in WORLD_COLUMNS if c in row)):
        value = row.get(column)
        if value is None:
            notes.setdefault(column, "not computed")
        elif not np.isfinite(value):
            raise ValueError(f"row '{model}': {column} is {value}")
        scores[column] = None if value is None else float(value)
    return scores, {column: reason for column, reason in notes.items() if scores.get(column) is None}


GRID_PAD_PX = 4


def save_image_grid(rows: Sequence[np.ndarray], row_labels: Sequence[str], path: Path, *, cell_px: int = 128,
                    label_px: int = 160, max_columns: int | None = None,
                    column_labels: Sequence[str] | None = None, header_px: int = 40) -> tuple[int, int]:
    """A labelled PNG grid: row r shows the images of `rows[r]` ((N_r, H, W, 3), uint8 or [0, 1] float).

    Each image is resized to a cell_px square; the row's label sits in a label_px wide strip on the
    left, and with `column_labels` each column's label (may span lines) in a header_px high strip on top.
    Size: width = label_px + n_columns * (cell_px + GRID_PAD_PX) + GRID_PAD_PX,
    height = [header_px +] n_rows * (cell_px + GRID_PAD_PX) + GRID_PAD_PX. Returns (width, height).
    """
    if len(rows) != len(row_labels):
        raise ValueError(f"{len(rows)} rows of images for {len(row_labels)} labels")
    if not rows:
        raise ValueError("no rows to draw")
    n_columns = max(len(images) for images in rows)
    n_columns = min(n_columns, max_columns) if max_columns is not None else n_columns
    if column_labels is not None and len(column_labels) != n_columns:
        raise ValueError(f"{len(column_labels)} column labels for {n_columns} columns")
    header = header_px if column_labels is not None else 0
    width = label_px + n_columns * (cell_px + GRID_PAD_PX) + GRID_PAD_PX
    height = header + len(rows) * (cell_px + GRID_PAD_PX) + GRID_PAD_PX
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=max(10, cell_px // 9))
    left = label_px + GRID_PAD_PX
    for c, label in enumerate(column_labels or []):
        draw.multiline_text((left + c * (cell_px + GRID_PAD_PX) + cell_px // 2, header // 2),
                            _wrap_to_width(label, draw, font, cell_px), fill="black", font=font, anchor="mm",
                            align="center")
    for r, (images, label) in enumerate(zip(rows, row_labels)):
        top = header + GRID_PAD_PX + r * (cell_px + GRID_PAD_PX)
        draw.multiline_text((GRID_PAD_PX, top + cell_px // 2), label, fill="black", font=font, anchor="lm")
        images_uint8 = _as_uint8_nhwc(images, f"grid row '{label}'")
        for c, image_hw3 in enumerate(images_uint8[:n_columns]):
            cell = Image.fromarray(image_hw3).resize((cell_px, cell_px), Image.Resampling.BICUBIC)
            canvas.paste(cell, (left + c * (cell_px + GRID_PAD_PX), top))
    canvas.save(path, format="PNG")
    return width, height


def _wrap_to_width(label: str, draw: ImageDraw.ImageDraw, font, width_px: int) -> str:
    """`label` with each of its lines broken between words where it would be wider than `width_px`."""
    wrapped = []
    for line in label.split("\n"):
        words = line.split(" ")
        current = words[0]
        for word in words[1:]:
            if draw.textlength(f"{current} {word}", font=font) <= width_px:
                current = f"{current} {word}"
            else:
                wrapped.append(current)
                current = word
        wrapped.append(current)
    return "\n".join(wrapped)


def _as_uint8_nhwc(images_nhwc: np.ndarray, what: str) -> np.ndarray:
    images_nchw = images_to_nchw(images_nhwc, what)  # validates shape, dtype and range
    return (images_nchw.permute(0, 2, 3, 1).numpy() * 255.0).round().astype(np.uint8)
