"""Training reads its targets batch by batch from the hdf5 cache: memory per process is one batch, not the
table (full NSD's bigG tokens are ~50 GB in float16, ~100 GB transiently in float32)."""
from __future__ import annotations

import tracemalloc

import h5py
import numpy as np
import pytest
import torch

from mindeye.targets import TargetRows
from offline_training.trainer import TargetTable

N_IMAGES, TOKENS, WIDTH, LOW = 3000, 256, 64, (4, 8, 8)  # 98 MB of float16 tokens: 196 MB in float32


@pytest.fixture(scope="module")
def large_cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache") / "targets.hdf5"
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        computed = np.ones(N_IMAGES, bool)
        computed[7] = False  # a row no run has computed
        f.create_dataset("computed", data=computed)
        tokens = f.create_dataset("tokens", shape=(N_IMAGES, TOKENS, WIDTH), dtype=np.float16, chunks=(1, TOKENS, WIDTH))
        low = f.create_dataset("low_level", shape=(N_IMAGES, *LOW), dtype=np.float16, chunks=(1, *LOW))
        for start in range(0, N_IMAGES, 500):
            tokens[start:start + 500] = rng.standard_normal((500, TOKENS, WIDTH)).astype(np.float16)
            low[start:start + 500] = rng.standard_normal((500, *LOW)).astype(np.float16)
    return path


def test_a_batch_costs_the_memory_of_a_batch_whatever_the_number_of_images(large_cache):
    ids = np.setdiff1d(np.arange(N_IMAGES), [7])
    batch = np.random.default_rng(1).choice(ids, 64)
    tracemalloc.start()
    table = TargetTable(TargetRows(large_cache, ids))
    tokens, low = table.get(batch)
    _, peak_bytes = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    batch_bytes = 64 * TOKENS * WIDTH * (2 + 4)  # read in float16, returned in float32
    table_bytes = N_IMAGES * TOKENS * WIDTH * 4  # what holding the table in float32 would take
    assert peak_bytes < 3 * batch_bytes < table_bytes / 5
    with h5py.File(large_cache) as f:
        for i in (0, 3, 63):
            np.testing.assert_array_equal(tokens[i].numpy(), f["tokens"][batch[i]].astype(np.float32))
            np.testing.assert_array_equal(low[i].numpy(), f["low_level"][batch[i]].astype(np.float32))
    assert str(tokens.dtype) == str(low.dtype) == "torch.float32"


def test_uncomputed_rows_and_images_outside_the_set_are_refused(large_cache):
    with pytest.raises(ValueError, match=r"images \[7\] are not computed"):
        TargetRows(large_cache, np.array([3, 7, 9]))
    rows = TargetRows(large_cache, np.array([3, 9]))
    with pytest.raises(KeyError, match="not in this target set"):
        rows.read(np.array([3, 4]))


def test_a_table_within_its_memory_budget_is_held_and_gives_the_same_rows(large_cache):
    ids = np.setdiff1d(np.arange(N_IMAGES), [7])
    stored_mb = TargetRows(large_cache, ids).stored_bytes() / 2**20  # ~98 MB of float16 tokens
    assert 90 < stored_mb < 110
    held = TargetTable(TargetRows(large_cache, ids), memory_budget_mb=stored_mb + 1)
    too_small = TargetTable(TargetRows(large_cache, ids), memory_budget_mb=stored_mb - 1)
    assert held.held is not None and too_small.held is None
    batch = np.random.default_rng(2).choice(ids, 64)  # repeats and any order
    for from_memory, from_file in zip(held.get(batch), too_small.get(batch)):
        assert from_memory.dtype == from_file.dtype == torch.float32
        torch.testing.assert_close(from_memory, from_file, rtol=0, atol=0)
    with pytest.raises(KeyError, match="not in this target set"):
        held.get(np.array([3, 7]))
