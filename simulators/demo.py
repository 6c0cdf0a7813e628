"""mindeye-demo: the main job on the built-in default, the synthetic NSD world.

Generates the world (or reuses it), prints its summary and shows it is decodable: ridge
regression from each subject's betas to the CLIP tokens against chance and the ground-truth
ceiling. Later stages (training, the realtime service) extend this into the live demo.
"""
from __future__ import annotations

from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig

from mindeye.config import CONFIG_DIR
from simulators.world.generate import format_summary, generate_world
from simulators.world.learnability import check_learnability


@hydra.main(config_path=str(CONFIG_DIR), config_name="demo", version_base="1.3")
def main(cfg: DictConfig) -> None:
    root = Path(cfg.out_dir)
    summary = generate_world(cfg.world, root, overwrite=cfg.overwrite, progress=cfg.progress)
    print(format_summary(summary, root))
    reports = [check_learnability(root, subject) for subject in cfg.decode_subjects]
    for report in reports:
        print(" ", report)
    if len(reports) > 1:
        mean = lambda key: np.mean([getattr(r, key) for r in reports])  # noqa: E731
        print(f"  mean over {len(reports)} subjects: image top-1 {mean('image_top1'):.1%} "
              f"(ceiling {mean('ceiling_image_top1'):.1%}), brain top-1 {mean('brain_top1'):.1%} "
              f"(ceiling {mean('ceiling_brain_top1'):.1%}), chance {mean('chance'):.1%}")


if __name__ == "__main__":
    main()
