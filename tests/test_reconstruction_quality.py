"""benchmarks/reconstruction_quality.py writes its table, the comparison with the low-level image, and two grids:
every generator and token source, and the live path's few columns."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import load_benchmark
from mindeye.clip import clip_identity
from mindeye.targets import target_clip_config
from test_evaluate import save_generator, world_data_cfg

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


def test_table_versus_low_level_and_both_grids(tiny_world, checkpoint, tmp_path, monkeypatch, capsys,
                                               small_generator_cfg):
    benchmark = load_benchmark(monkeypatch, "reconstruction_quality")
    root = tiny_world[0]
    save_generator(tmp_path / "generator", small_generator_cfg, clip_identity(target_clip_config(world_data_cfg(root))))
    monkeypatch.setattr(sys, "argv", [
        "reconstruction_quality.py", "--data-root", str(root), "--checkpoint-subj1", str(checkpoint), "--subjects", "1",
        "--teacher", str(tmp_path / "generator"), "--teacher-steps", "2", "--img2img-strengths", "1.0", "0.6",
        "--grid-images", "2", "--out", str(tmp_path / "out")])
    benchmark.main()
    capsys.readouterr()

    table = (tmp_path / "out" / "table.md").read_text()
    for row in ("true tokens, teacher (2 steps)", "subj01 low-level", "subj01, teacher (2 steps) + blend",
                "subj01, teacher (2 steps, from low-level 0.6) + blend"):
        assert f"| {row} |" in table
    versus = json.loads((tmp_path / "out" / "versus_low_level.json").read_text())["subj01"]
    assert len(versus) == 4  # two generations, each alone and blended
    for by_network in versus.values():
        for mean, low, high in by_network.values():
            assert -1 <= low <= mean <= high <= 1

    with Image.open(tmp_path / "out" / "grid.png") as png:  # seen, true, 2 decoded, low-level, 2 blends
        assert png.size == (80 + 7 * (96 + 4) + 4, 80 + 2 * (96 + 4) + 4)
    with Image.open(tmp_path / "out" / "grid_live.png") as png:  # seen, true, low-level, from noise, its blend
        assert png.size == (80 + 5 * (128 + 4) + 4, 80 + 2 * (128 + 4) + 4)
        first_row = np.asarray(png.convert("RGB"))[80 + 4:80 + 4 + 128, 80 + 4:]
    assert first_row.std() > 10  # pictures were drawn, not blank cells
