"""The one config tree (`configs/` at the repository root) and how code outside hydra reads it."""
from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"
# `${repo:}` in a config: the repository root, for files that ship with the code (the world's generator weights)
OmegaConf.register_new_resolver("repo", lambda: str(REPO_ROOT), replace=True)


def load_config(config_name: str, overrides: list[str] | None = None) -> DictConfig:
    """Compose `configs/<config_name>.yaml` with hydra overrides, as the command line would."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides or [])
