"""benchmarks/finetune_recipe.py chooses a fine-tuning recipe without the test images: every fold's run
trains without that fold's images and with the recipe's overrides, is scored on exactly those images
(tokens and pictures), and is reused on the next call instead of trained again; a run without token readouts
gets the one its trainer would have fitted."""
from __future__ import annotations

import re
import sys

import numpy as np
import pytest
from omegaconf import OmegaConf

from conftest import load_benchmark
from mindeye.clip import clip_identity
from mindeye.models import load_checkpoint
from mindeye.models.readout import READOUT_FILE, load_readouts
from mindeye.targets import target_clip_config
from test_evaluate import save_generator, world_data_cfg

pytestmark = pytest.mark.usefixtures("one_thread")


def test_each_fold_trains_without_its_images_is_scored_on_them_and_is_reused(tiny_world, checkpoint, tmp_path,
                                                                              monkeypatch, capsys,
                                                                              small_generator_cfg):
    recipe = load_benchmark(monkeypatch, "finetune_recipe")
    root = tiny_world[0]
    save_generator(tmp_path / "generator", small_generator_cfg, clip_identity(target_clip_config(world_data_cfg(root))))
    monkeypatch.setattr(sys, "argv", [
        "finetune_recipe.py", "--pretrained", str(checkpoint), "--data-root", str(root), "--runs",
        str(tmp_path / "runs"), "--folds", "2", "--cond-scales", "1", "3", "--generator", str(tmp_path / "generator"),
        "--recipe", "prior frozen=train.epochs=2 freeze=[prior]", "--blends", "0.5", "--pictures-from", "readout"])
    recipe.main()
    out = capsys.readouterr().out

    pretrained = load_checkpoint(checkpoint).state_dict()
    for fold in (1, 2):
        run = tmp_path / "runs" / f"prior_frozen-fold{fold}of2"
        config = OmegaConf.load(run / "run_config.yaml")
        assert list(config.validation_fold) == [fold, 2] and list(config.freeze) == ["prior"]
        assert list(config.train_sessions) == [1] and list(config.subjects) == [8]
        tuned = load_checkpoint(run / "checkpoint").state_dict()
        assert all(np.array_equal(tuned[k], pretrained[k]) for k in tuned if k.startswith("prior."))
    for row in ("prior, guidance 1", "prior, guidance 3", "ridge from backbone", "the run's readout"):
        line = next(line for line in out.splitlines() if line.startswith("prior frozen") and row in line)
        scores = re.search(r" (\d+\.\d)%\s+(-?\d\.\d{3})\s+(\d+)% (\d+)%$", line)  # 2-way, cosine, per fold
        assert scores and 0 <= float(scores[1]) <= 100 and -1 <= float(scores[2]) <= 1
        assert float(scores[1]) == pytest.approx((float(scores[3]) + float(scores[4])) / 2, abs=1)
    for kind in ("generated", "blend", "readout: generated", "readout: blend", "blend 0.5", "readout: blend 0.5"):
        line = next(line for line in out.splitlines() if line.startswith(f"{'prior frozen':28s} {kind:18s} "))
        assert line.count("vs") == 2 and line.count("[") == 2  # both networks against the low-level image

    fold1 = tmp_path / "runs" / "prior_frozen-fold1of2" / "checkpoint"
    trainers = load_readouts(fold1)["subj08"]
    (fold1 / READOUT_FILE).unlink()  # as a run from before the trainer fitted readouts
    monkeypatch.setattr(recipe.subprocess, "run", lambda *a, **k: pytest.fail("a finished fold was trained again"))
    monkeypatch.setattr(sys, "argv", sys.argv[:sys.argv.index("--generator")] + sys.argv[sys.argv.index("--recipe"):])
    recipe.main()  # tokens only: the same figures from the cached runs
    assert capsys.readouterr().out.splitlines()[3:] == out.splitlines()[3:out.splitlines().index("")]
    refitted = load_readouts(fold1)["subj08"]
    assert refitted.alpha == trainers.alpha and refitted.n_trials == trainers.n_trials
    assert np.allclose(refitted.coef, trainers.coef, rtol=1e-4, atol=1e-6)
