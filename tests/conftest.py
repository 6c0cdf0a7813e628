"""Shared fixtures. The tiny synthetic world is generated once per test session."""
from __future__ import annotations

import copy
import contextlib
import importlib.util
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a failed hub look-up would otherwise retry for minutes

import pytest  # noqa: E402
import torch  # noqa: E402

from mindeye.config import load_config  # noqa: E402

# A ~65 k-parameter generator UNet (8 px, token width 8): the generator and distillation tests' size
SMALL_UNET = {"sample_size": 8, "block_out_channels": [8, 16],
              "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
              "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "norm_num_groups": 4,
              "attention_head_dim": 2, "cross_attention_dim": 8, "addition_time_embed_dim": 4,
              "projection_class_embeddings_input_dim": 16}


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """(root, summary, world_cfg) of the tiny world, written through the NSD writers."""
    from simulators.world.generate import generate_world

    cfg = load_config("world_generate").world
    root = tmp_path_factory.mktemp("world") / "tiny"
    summary = generate_world(cfg, root, progress=False)
    return root, summary, cfg


@pytest.fixture(scope="session")
def irregular_world(tmp_path_factory):
    """(root, summary, world_cfg) of a two-subject world with NSD's irregular files: subject 1's session 2
    has a rest run first and last, design files are one row short, the expdesign is stored as doubles,
    and subject 2 has one session of two (so some shared images are seen fewer than 3 times)."""
    from simulators.world.generate import generate_world

    cfg = load_config("world_generate", [
        "world.n_subjects=2", "world.images.unique_per_subject=50", "world.images.shared=10",
        "world.sessions_per_subject=[2,1]",
        "+world.irregular={rest_run_sessions:[2],short_design:true,expdesign_doubles:true}"]).world
    root = tmp_path_factory.mktemp("world") / "irregular"
    return root, generate_world(cfg, root, progress=False), cfg


@pytest.fixture(scope="session")
def checkpoint(tiny_world, tmp_path_factory):
    """An untrained tiny model for the tiny world's subject 1: for tests of the path, not of decoding."""
    from simulators.world.untrained import untrained_checkpoint

    return untrained_checkpoint(tiny_world[0], tmp_path_factory.mktemp("ckpt") / "checkpoint")


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op threads set to `n` inside the block."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one intra-op thread, and do not stall when other processes share the cores."""
    with torch_threads(1):
        yield


def load_benchmark(monkeypatch, name: str):
    """benchmarks/<name>.py as a module, registered while the test runs (a dataclass in it looks its module up)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / f"benchmarks/{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


def read_log(out_dir) -> list[dict]:
    """A training run's log.jsonl records."""
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]


def unet_weights(generator_dir) -> dict[str, torch.Tensor]:
    """A saved generator folder's UNet weights."""
    from safetensors.torch import load_file

    return load_file(generator_dir / "unet" / "diffusion_pytorch_model.safetensors")


def assert_resumed_like_uninterrupted(split_dir, full_dir, saved: str, halfway: dict[str, torch.Tensor]) -> None:
    """A run interrupted and resumed (split_dir) logged the same losses and saved the same UNet (`saved`
    folder) as an uninterrupted one (full_dir); `halfway`, its weights at the interruption, differ."""
    for r_split, r_full in zip(read_log(split_dir), read_log(full_dir)):
        assert r_split["loss"] == pytest.approx(r_full["loss"], rel=1e-5)
    resumed, full = unet_weights(split_dir / saved), unet_weights(full_dir / saved)
    assert resumed.keys() == full.keys()
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], rtol=0, atol=1e-6, msg=key)
    assert any(not torch.allclose(halfway[k], full[k], atol=1e-4) for k in full)  # the later steps did change them


@pytest.fixture(scope="session")
def small_generator_cfg():
    """A factory of generator configs: configs/generator/tiny.yaml with SMALL_UNET, a fresh dict a call;
    keyword arguments override UNet keys (cross_attention_dim=64: the tiny world's tokens)."""
    from mindeye.generator import generator_config

    def make(**unet_overrides) -> dict:
        cfg = generator_config("tiny")
        cfg["unet"].update(copy.deepcopy(SMALL_UNET), **unet_overrides)
        return cfg

    return make


@pytest.fixture
def small_cfg(small_generator_cfg) -> dict:
    """configs/generator/tiny.yaml with a ~65 k-parameter UNet: 8 px, token width 8."""
    return small_generator_cfg()
