"""Shared fixtures. The tiny synthetic world is generated once per test session."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a failed hub look-up would otherwise retry for minutes

import pytest  # noqa: E402
import torch  # noqa: E402

from mindeye.config import load_config  # noqa: E402


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """(root, summary, world_cfg) of the tiny world, written through the NSD writers."""
    from simulators.world.generate import generate_world

    cfg = load_config("world_generate").world
    root = tmp_path_factory.mktemp("world") / "tiny"
    summary = generate_world(cfg, root, progress=False)
    return root, summary, cfg


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one intra-op thread, and do not stall when other processes share the cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
