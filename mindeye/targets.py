"""Training targets for every stimulus: CLIP image tokens and low-level latents, computed once.

The cache is one hdf5 file per (stimuli, encoder, codec): rows are filled on demand the first
time an image is asked for, so full NSD (73k images; ~62 GB of bigG tokens in fp16) is only
ever computed for the images a run uses, and a second run reads what the first computed.
`build_target_cache(data_cfg)` makes the cache of a dataset config; training, evaluation and
the realtime retrieval bank all use it.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import h5py
import numpy as np
from tqdm.auto import tqdm

from mindeye.clip import ClipImageEmbedder, build_clip_embedder
from mindeye.errors import MissingFileError
from mindeye.latents import build_latent_codec
from mindeye.nsd import NSDLayout, StimulusBrick
from mindeye.nsd.files import read_rows

CACHE_FORMAT_VERSION = 1
LOCK_WAIT_S = 600.0  # how long to wait for another process computing into the same cache


class TargetCache:
    def __init__(self, stimuli: StimulusBrick, embedder: ClipImageEmbedder, codec, cache_dir: Path,
                 codec_spec: dict, batch_size: int = 64):
        self.stimuli, self.embedder, self.codec, self.batch_size = stimuli, embedder, codec, batch_size
        key = json.dumps({"version": CACHE_FORMAT_VERSION, "stimuli": str(stimuli.path.resolve()),
                          "stimuli_shape": list(stimuli.shape), "clip": embedder.spec.__dict__, "codec": codec_spec},
                         sort_keys=True, default=str)
        self.path = Path(cache_dir) / f"targets-{hashlib.sha256(key.encode()).hexdigest()[:16]}.hdf5"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self._is_initialised():
            with self._open("a") as f:
                if "computed" not in f:
                    f.attrs["key"] = key
                    f.create_dataset("computed", data=np.zeros(len(stimuli), bool))
                    f.create_dataset("tokens", shape=(len(stimuli), embedder.n_tokens, embedder.dim),
                                     dtype=np.float16, chunks=(1, embedder.n_tokens, embedder.dim))
                    shape = (codec.channels, codec.latent_size, codec.latent_size)
                    f.create_dataset("low_level", shape=(len(stimuli), *shape), dtype=np.float16, chunks=(1, *shape))

    @property
    def token_shape(self) -> tuple[int, int]:
        return self.embedder.n_tokens, self.embedder.dim

    @property
    def low_level_shape(self) -> tuple[int, int, int]:
        return self.codec.channels, self.codec.latent_size, self.codec.latent_size

    def get(self, image_ids: np.ndarray, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """float32 tokens (n, L, D) and low-level latents (n, C, S, S) for `image_ids` (any order), computing
        the rows no run has computed yet."""
        self.compute(image_ids, progress)
        with self._open("r") as f:
            return read_targets(f, np.asarray(image_ids))

    def compute(self, image_ids: np.ndarray, progress: bool = False) -> None:
        """Fill the rows of `image_ids` that no run has computed yet. Checks with the file opened read-only
        (several processes may read at once, and a cache on a read-only share works); opens it for writing
        only to compute."""
        with self._open("r") as f:
            missing = np.setdiff1d(np.unique(image_ids), np.flatnonzero(f["computed"][:]))
        if len(missing):
            with self._open("a") as f:
                missing = np.setdiff1d(missing, np.flatnonzero(f["computed"][:]))  # another process may have filled some
                for start in tqdm(range(0, len(missing), self.batch_size), desc="targets", disable=not progress):
                    ids = missing[start:start + self.batch_size]
                    images = self.stimuli[ids]
                    f["tokens"][ids] = self.embedder.embed_array(images, batch_size=self.batch_size)
                    f["low_level"][ids] = self.codec.encode(images)
                    f["computed"][ids] = True

    def rows(self, image_ids: np.ndarray) -> "TargetRows":
        """A reader of the (computed) rows of `image_ids`, batch by batch."""
        return TargetRows(self.path, image_ids, self._open)

    def _is_initialised(self) -> bool:
        if not self.path.is_file():
            return False
        with self._open("r") as f:
            return "computed" in f

    def _open(self, mode: str) -> h5py.File:
        """The cache file; while another process holds HDF5's lock (it is computing rows), wait for it."""
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                return h5py.File(self.path, mode)
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.path}: locked by another process for over {LOCK_WAIT_S:.0f} s "
                                       f"(is a run computing targets there?)") from None
                time.sleep(0.2)


class TargetRows:
    """The targets of a set of images, read from the cache file batch by batch: a process holds the rows of
    one batch (float32), never the whole set (full NSD's bigG tokens are ~50 GB in float16). The file is
    opened for each read, so no reader holds HDF5's lock while a run computes rows into the same cache."""

    def __init__(self, path: Path, image_ids: np.ndarray, opener=None):
        self.path = Path(path)
        self.image_ids = np.unique(np.asarray(image_ids))  # int64 (n_images,), sorted
        self._open = opener or (lambda mode: h5py.File(self.path, mode))
        with self._open("r") as f:
            not_computed = self.image_ids[~f["computed"][:][self.image_ids]]
        if len(not_computed):
            raise ValueError(f"{self.path}: the targets of images {not_computed[:5].tolist()} are not computed "
                             "(TargetCache.compute them first)")

    def read(self, image_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """float32 tokens (n, L, D) and low-level latents (n, C, S, S) for `image_ids` (any order, repeats)."""
        image_ids = np.asarray(image_ids)
        self.positions(image_ids)
        with self._open("r") as f:
            return read_targets(f, image_ids)

    def positions(self, image_ids: np.ndarray) -> np.ndarray:
        """Where each of `image_ids` is in `self.image_ids` (and `read_all`'s rows); KeyError for others."""
        at = np.minimum(np.searchsorted(self.image_ids, image_ids), len(self.image_ids) - 1)
        if np.any(self.image_ids[at] != image_ids):
            raise KeyError(f"images {np.setdiff1d(image_ids, self.image_ids)[:5]} are not in this target set")
        return at

    def stored_bytes(self) -> int:
        """What the rows take as stored (float16 in the cache): the memory `read_all` needs."""
        with self._open("r") as f:
            return len(self.image_ids) * sum(f[name].dtype.itemsize * math.prod(f[name].shape[1:])
                                             for name in ("tokens", "low_level"))

    def read_all(self) -> tuple[np.ndarray, np.ndarray]:
        """Every row, in `image_ids` order and the cache's dtype: tokens (n, L, D), low-level (n, C, S, S)."""
        with self._open("r") as f:
            return f["tokens"][self.image_ids], f["low_level"][self.image_ids]


def read_targets(f: h5py.File, image_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 tokens (n, L, D) and low-level latents (n, C, S, S) of `image_ids` from an open cache file."""
    return read_rows(f["tokens"], image_ids).astype(np.float32), read_rows(f["low_level"], image_ids).astype(np.float32)


def target_clip_config(data_cfg):
    """The CLIP encoder whose tokens are the targets: the config's, or the world's own (`clip: world`)."""
    if data_cfg.clip != "world":
        return data_cfg.clip
    summary = Path(data_cfg.root) / "ground_truth/world.json"
    if not summary.is_file():
        raise MissingFileError(summary, "synthetic world summary (data.clip: world reads the world's encoder from it)")
    return json.loads(summary.read_text())["config"]["clip"]


def build_target_cache(data_cfg) -> TargetCache:
    """The target cache for the dataset's stimuli (`data_cfg.root`): CLIP tokens and low-level latents."""
    layout = NSDLayout(Path(data_cfg.root))
    codec_spec = dict(data_cfg.low_level)
    return TargetCache(StimulusBrick(layout.stimuli()), build_clip_embedder(target_clip_config(data_cfg)),
                       build_latent_codec(codec_spec), Path(data_cfg.cache_dir), codec_spec)
