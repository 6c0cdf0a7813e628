"""Retrieval banks: the candidate images' CLIP tokens, searched by cosine similarity live, from a visit's
few hundred images to all 73,000 of NSD.

Both kinds have one contract, which realtime's decode backends use:
`top_k(predicted_bld, k)` -> per predicted row [(image_id, cosine)], best first, k capped at the bank's
size, with `image_ids`, `token_shape` and `len()`. The cosine is between flattened tokens (L*D values).

- `ExactBank`: the unit rows in float16 on a torch device, brute force. It holds N*L*D*2 bytes: bigG's
  256 x 1664 tokens for NSD's 73k images are 62 GB, more than a 24 GB GPU has.
- `FaissBank`: a learned projection to r dims (an uncentred PCA of the bank: orthonormal, so an inner
  product there approximates the cosine), a FAISS index over the projected rows (any factory string:
  Flat, SQ8, IVF-PQ, OPQ...) searched by inner product, and optionally an exact re-rank of its best
  `rerank` candidates from the float16 unit rows, memory-mapped from disk.

`build_bank` picks the kind by size (`BankSettings`, configs/bank/); `save(folder)` and `load_bank(folder)`
move a bank into an export bundle and back (bank.json says what the folder holds). docs/retrieval_bank.md
has the measured recall, memory and query time, and how to choose.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import torch

from mindeye.errors import ConfigValueError, FormatError, MissingFileError

FORMAT, VERSION = "mindeye-retrieval-bank", 1
META_FILE, IDS_FILE, ROWS_FILE = "bank.json", "image_ids.npy", "unit_tokens_f16.npy"
PROJECTION_FILE, INDEX_FILE = "projection_f16.npy", "index.faiss"
KINDS = ("auto", "exact", "faiss")
BLOCK_BYTES = 128 * 2**20  # tokens are read, normalised and projected this many float32 bytes at a time
OVERSAMPLING = 16  # extra directions in the projection's randomized subspace iteration
FIRST_CUT_MARGIN = 32  # ExactBank re-scores its float16 search's best k + this many in float32


@dataclass(frozen=True)
class BankSettings:
    """How to build a bank (configs/bank/). `projection_dim` None: FAISS indexes the full L*D rows."""

    kind: str = "auto"  # auto | exact | faiss
    exact_max_gb: float = 8.0  # auto: exact while its float16 rows fit in this many GB of the device
    projection_dim: int | None = 1024
    index: str = "Flat"  # a faiss.index_factory string over the projected rows, e.g. "RR1024,IVF1024,PQ128"
    nprobe: int = 32  # IVF lists searched per query (ignored by an index without lists)
    rerank: int = 64  # candidates re-scored exactly from the float16 rows on disk; 0: the index's scores
    train_rows: int = 8192  # rows the projection is learned from (the index trains on every projected row)
    seed: int = 0

    @classmethod
    def from_config(cls, cfg) -> BankSettings:
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ConfigValueError(f"bank settings: unknown keys {unknown}; known: {sorted(known)}")
        return cls(**{name: cfg[name] for name in cfg}).checked()

    def checked(self) -> BankSettings:
        if self.kind not in KINDS:
            raise ConfigValueError(f"bank.kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        for name, minimum in (("exact_max_gb", 0), ("nprobe", 1), ("rerank", 0), ("train_rows", 1)):
            if not getattr(self, name) >= minimum:
                raise ConfigValueError(f"bank.{name} must be >= {minimum}, got {getattr(self, name)}")
        if self.projection_dim is not None and self.projection_dim < 1:
            raise ConfigValueError(f"bank.projection_dim must be >= 1 or null, got {self.projection_dim}")
        return self


def build_bank(image_ids_n, tokens_nld, settings: BankSettings = BankSettings(), *, folder: str | Path | None = None,
               device: str = "cpu") -> ExactBank | FaissBank:
    """The bank `settings` asks for; `auto` is exact while its float16 rows fit `exact_max_gb`.

    `tokens_nld` may be anything sliced a block of rows at a time (an array, a memmap, an h5py dataset,
    `TargetBlocks`), so a bank larger than memory is built without holding it. A FAISS bank keeps its
    files in `folder`."""
    settings = settings.checked()
    image_ids_n, token_shape = _checked_bank_input(image_ids_n, tokens_nld)
    kind = settings.kind
    if kind == "auto":
        exact_bytes = len(image_ids_n) * math.prod(token_shape) * 2
        kind = "exact" if exact_bytes <= settings.exact_max_gb * 1e9 else "faiss"
    if kind == "exact":
        return ExactBank(image_ids_n, tokens_nld, device=device)
    if folder is None:
        raise ConfigValueError(f"a FAISS bank of {len(image_ids_n)} images keeps its files in a folder: pass folder=")
    return FaissBank.build(image_ids_n, tokens_nld, folder, settings, device=device)


def load_bank(folder: str | Path, *, device: str = "cpu", nprobe: int | None = None,
              rerank: int | None = None) -> ExactBank | FaissBank:
    """A bank saved by `save(folder)` or built there; `nprobe` and `rerank` override a FAISS bank's own."""
    meta = _read_meta(Path(folder))
    if meta["kind"] == "exact":
        return ExactBank.load(folder, device=device)
    return FaissBank(folder, device=device, nprobe=nprobe, rerank=rerank)


class TargetBlocks:
    """The CLIP tokens of `image_ids` from a mindeye.targets.TargetCache, sliced a block of rows at a time
    (rows computed on first use), so `build_bank` streams a bank the size of NSD."""

    def __init__(self, targets, image_ids_n):
        self.targets, self.image_ids = targets, np.asarray(image_ids_n)
        self.shape = (len(self.image_ids), *targets.token_shape)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, rows: slice) -> np.ndarray:
        return self.targets.get(self.image_ids[rows])[0]


class ExactBank:
    """Brute-force cosine over the unit rows (N, L*D) on a torch device, float16 by default (float32 doubles
    the memory for scores exact to float32's rounding rather than ~1e-3)."""

    kind = "exact"

    def __init__(self, image_ids_n, tokens_nld, *, device: str = "cpu", dtype: torch.dtype = torch.float16):
        self.image_ids, self.token_shape = _checked_bank_input(image_ids_n, tokens_nld)
        self.device = torch.device(device)
        self.unit_rows_nf = torch.empty((len(self.image_ids), math.prod(self.token_shape)), dtype=dtype,
                                        device=self.device)
        for start, unit_nf in _unit_blocks(tokens_nld, self.unit_rows_nf.shape[1]):
            self.unit_rows_nf[start:start + len(unit_nf)] = torch.from_numpy(unit_nf).to(self.device, dtype)

    @classmethod
    def from_targets(cls, targets, image_ids_n, **kwargs) -> ExactBank:
        """The bank of `image_ids_n`, their tokens read from (or computed into) a mindeye.targets.TargetCache."""
        return cls(image_ids_n, TargetBlocks(targets, image_ids_n), **kwargs)

    def __len__(self) -> int:
        return len(self.image_ids)

    def memory_bytes(self) -> int:
        """Bytes the bank holds on its device."""
        return self.unit_rows_nf.numel() * self.unit_rows_nf.element_size()

    def top_k(self, predicted_bld, k: int) -> list[list[tuple[int, float]]]:
        """Per row of `predicted_bld` (B, L, D): the k (capped at the bank size) most cosine-similar images."""
        query_bf = _unit_queries(predicted_bld, self.token_shape, k)
        k = min(k, len(self))
        query = torch.from_numpy(query_bf).to(self.device)
        scores_bn = query.to(self.unit_rows_nf.dtype) @ self.unit_rows_nf.T  # float16: a first cut, rounded to ~1e-3
        first_cut = min(len(self), k + FIRST_CUT_MARGIN)
        best_bk = torch.topk(scores_bn.float(), first_cut, dim=1).indices.cpu().numpy()
        # re-scored in float32, so near-ties among similar images are ordered as float32 search orders them
        return [_ranked(self.image_ids, positions, self.unit_rows_nf[torch.from_numpy(positions)].float().cpu().numpy(),
                        query_f, k) for query_f, positions in zip(query_bf, best_bk)]

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / IDS_FILE, self.image_ids)
        np.save(folder / ROWS_FILE, self.unit_rows_nf.cpu().numpy().astype(np.float16))
        _write_meta(folder, "exact", self.image_ids, self.token_shape, {})
        return folder

    @classmethod
    def load(cls, folder: str | Path, *, device: str = "cpu") -> ExactBank:
        folder = Path(folder)
        meta = _read_meta(folder)
        rows_nf = np.load(_file(folder, ROWS_FILE, "the bank's float16 unit rows"), mmap_mode="r")
        image_ids = _read_ids(folder, meta, rows_nf)
        return cls(image_ids, rows_nf.reshape(len(rows_nf), *meta["token_shape"]), device=device)


class FaissBank:
    """A projection, a FAISS index over the projected rows and an optional exact re-rank (module docstring).
    Built into a folder by `build`; constructing one loads that folder."""

    kind = "faiss"

    def __init__(self, folder: str | Path, *, device: str = "cpu", nprobe: int | None = None,
                 rerank: int | None = None):
        self.folder, self.device = Path(folder), torch.device(device)
        meta = _read_meta(self.folder)
        if meta["kind"] != "faiss":
            raise FormatError(self.folder / META_FILE, "the bank's kind", "'faiss'", repr(meta["kind"]))
        self.settings = dataclasses.replace(BankSettings(**meta["settings"]),
                                            **{name: value for name, value in (("nprobe", nprobe), ("rerank", rerank))
                                               if value is not None}).checked()
        self.token_shape = tuple(meta["token_shape"])
        self.index = faiss.read_index(str(_file(self.folder, INDEX_FILE, "the bank's FAISS index")))
        ivf = faiss.try_extract_index_ivf(self.index)
        if ivf is not None:
            ivf.nprobe = self.settings.nprobe
        self.projection_fr = None
        if self.settings.projection_dim is not None:
            projection = np.load(_file(self.folder, PROJECTION_FILE, "the bank's projection"))
            dtype = torch.float32 if self.device.type == "cpu" else torch.float16  # CPUs lack fast float16 GEMV
            self.projection_fr = torch.from_numpy(projection).to(self.device, dtype)
        self.rows_nf = None
        if self.settings.rerank:
            self.rows_nf = np.load(_file(self.folder, ROWS_FILE, "the bank's float16 unit rows (for re-ranking)",
                                         "rebuild the bank with rerank > 0, or load it with rerank=0"),
                                   mmap_mode="r")
        self.image_ids = _read_ids(self.folder, meta, self.rows_nf)
        if self.index.ntotal != len(self.image_ids):
            raise FormatError(self.folder / INDEX_FILE, "the index's row count", str(len(self.image_ids)),
                              str(self.index.ntotal))

    def __len__(self) -> int:
        return len(self.image_ids)

    def memory_bytes(self) -> int:
        """Bytes the bank holds in memory: the projection and the index (the re-rank rows stay on disk)."""
        projection = 0 if self.projection_fr is None else self.projection_fr.numel() * self.projection_fr.element_size()
        return projection + int(faiss.serialize_index(self.index).nbytes)

    def top_k(self, predicted_bld, k: int) -> list[list[tuple[int, float]]]:
        """Per row of `predicted_bld` (B, L, D): the k (capped at the bank size) best images by the index,
        re-scored by their exact cosine when `rerank` > 0, else by the index's inner product."""
        query_bf = _unit_queries(predicted_bld, self.token_shape, k)
        k = min(k, len(self))
        candidates = k if self.rows_nf is None else min(max(k, self.settings.rerank), len(self))
        scores_bc, positions_bc = self.index.search(self._projected(query_bf), candidates)
        if self.rows_nf is None:
            return [[(int(self.image_ids[p]), float(s)) for p, s in zip(positions, scores) if p >= 0]
                    for positions, scores in zip(positions_bc, scores_bc)]
        ranked = []
        for query_f, positions in zip(query_bf, positions_bc):
            positions = np.sort(positions[positions >= 0])  # a few lists may hold fewer than `candidates`
            rows_cf = np.asarray(self.rows_nf[positions], np.float32)
            ranked.append(_ranked(self.image_ids, positions, rows_cf, query_f, k))
        return ranked

    def _projected(self, query_bf: np.ndarray) -> np.ndarray:
        """float32 (B, r): the unit queries in the projection's space (unchanged without a projection)."""
        if self.projection_fr is None:
            return query_bf
        query = torch.from_numpy(query_bf).to(self.device, self.projection_fr.dtype)
        return (query @ self.projection_fr).float().cpu().numpy()

    def save(self, folder: str | Path) -> Path:
        """Copy the bank's files to `folder` (an export bundle's), the re-rank rows only when used."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name in (META_FILE, IDS_FILE, INDEX_FILE, PROJECTION_FILE, ROWS_FILE):
            if (self.folder / name).is_file() and (name != ROWS_FILE or self.rows_nf is not None):
                if (self.folder / name).resolve() != (folder / name).resolve():
                    shutil.copyfile(self.folder / name, folder / name)
        return folder

    @classmethod
    def build(cls, image_ids_n, tokens_nld, folder: str | Path, settings: BankSettings = BankSettings(), *,
              device: str = "cpu", projection_fr: np.ndarray | None = None) -> FaissBank:
        """Write the bank into `folder` and load it. `projection_fr` (F, r): reuse one learned before
        (`learn_projection`) instead of learning it from this bank."""
        settings = settings.checked()
        image_ids_n, token_shape = _checked_bank_input(image_ids_n, tokens_nld)
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for stale in (META_FILE, PROJECTION_FILE):  # a half-built folder must not load as the bank it held before
            (folder / stale).unlink(missing_ok=True)
        n_features, start_s = math.prod(token_shape), time.perf_counter()
        dim = settings.projection_dim or n_features
        if dim > n_features:
            raise ConfigValueError(f"bank.projection_dim {dim} exceeds the tokens' {n_features} values")
        index = _new_index(dim, settings.index)
        rows_nf = np.lib.format.open_memmap(folder / ROWS_FILE, mode="w+", dtype=np.float16,
                                            shape=(len(image_ids_n), n_features))
        for start, unit_nf in _unit_blocks(tokens_nld, n_features):
            rows_nf[start:start + len(unit_nf)] = unit_nf
        rows_nf.flush()
        if settings.projection_dim is not None:
            if projection_fr is None:
                rng = np.random.default_rng(settings.seed)
                train = np.sort(rng.choice(len(rows_nf), min(settings.train_rows, len(rows_nf)), replace=False))
                projection_fr = learn_projection(rows_nf, train, dim, seed=settings.seed, device=device)
            if tuple(projection_fr.shape) != (n_features, dim):
                raise ValueError(f"projection_fr must be ({n_features}, {dim}), got {tuple(projection_fr.shape)}")
            projection = torch.from_numpy(np.asarray(projection_fr, np.float32)).to(device)
            np.save(folder / PROJECTION_FILE, np.asarray(projection_fr, np.float16))
        projected_nr = np.empty((len(rows_nf), dim), np.float32)  # every row, to train the index on and add
        for start, block_nf in _blocks(rows_nf, n_features):
            block_bf = np.asarray(block_nf, np.float32)
            if projection_fr is not None:
                block_bf = (torch.from_numpy(block_bf).to(device) @ projection).cpu().numpy()
            projected_nr[start:start + len(block_bf)] = block_bf
        try:
            index.train(projected_nr)
        except RuntimeError as error:
            raise ConfigValueError(f"FAISS cannot train index '{settings.index}' on {len(projected_nr)} rows: "
                                   f"{_faiss_message(error)}; choose fewer lists / centroids for a bank this small "
                                   "(or bank.kind=exact)") from None
        index.add(projected_nr)
        faiss.write_index(index, str(folder / INDEX_FILE))
        np.save(folder / IDS_FILE, image_ids_n)
        del rows_nf
        if not settings.rerank:
            (folder / ROWS_FILE).unlink()
        _write_meta(folder, "faiss", image_ids_n, token_shape,
                    {"settings": dataclasses.asdict(settings), "build_s": round(time.perf_counter() - start_s, 2)})
        return cls(folder, device=device)


def learn_projection(rows_nf, positions, dim: int, *, seed: int = 0, device: str = "cpu",
                     passes: int = 2) -> np.ndarray:
    """float32 (F, dim): the top `dim` right singular vectors of the unit rows `rows_nf[positions]`, an
    uncentred PCA, by randomized subspace iteration (Halko, Martinsson & Tropp 2011, alg. 4.4) that reads
    the rows a block at a time. Uncentred on purpose: a centred PCA (faiss.PCAMatrix) would rank by the
    inner product of centred vectors, which drops each candidate's own <row, mean> term from its cosine."""
    n_features = rows_nf.shape[1]
    if not dim <= len(positions):
        raise ConfigValueError(f"a {dim}-dim projection needs at least {dim} training rows, got {len(positions)}: "
                               "raise bank.train_rows or lower bank.projection_dim")
    width = min(dim + OVERSAMPLING, len(positions), n_features)

    def train_blocks() -> Iterator[torch.Tensor]:
        step = _block_rows(n_features)
        for start in range(0, len(positions), step):
            yield torch.from_numpy(np.asarray(rows_nf[positions[start:start + step]], np.float32)).to(device)

    basis_fq = torch.randn(n_features, width, generator=torch.Generator().manual_seed(seed)).to(device)
    for _ in range(passes + 1):  # each pass: basis <- orth(X^T X basis), converging on X's top right subspace
        power_fq = torch.zeros_like(basis_fq)
        for rows_bf in train_blocks():
            power_fq += rows_bf.T @ (rows_bf @ basis_fq)
        basis_fq = torch.linalg.qr(power_fq).Q
    gram_qq = torch.zeros(width, width, device=device)  # X^T X within the subspace: its eigenvectors are the axes
    for rows_bf in train_blocks():
        inner_bq = rows_bf @ basis_fq
        gram_qq += inner_bq.T @ inner_bq
    _, axes_qq = torch.linalg.eigh(gram_qq.double())  # ascending eigenvalues
    return (basis_fq.double() @ axes_qq[:, -dim:].flip(1)).float().cpu().numpy()


# ---- helpers ----------------------------------------------------------------------------------------------

def _checked_bank_input(image_ids_n, tokens_nld) -> tuple[np.ndarray, tuple[int, int]]:
    image_ids_n = np.asarray(image_ids_n)
    shape = tuple(getattr(tokens_nld, "shape", np.shape(tokens_nld)))
    if image_ids_n.ndim != 1 or len(shape) != 3 or shape[0] != len(image_ids_n) or not len(image_ids_n):
        raise ValueError(f"a retrieval bank needs image ids (N,) and tokens (N, L, D) with N >= 1, got ids "
                         f"{image_ids_n.shape} and tokens {shape}")
    if not np.issubdtype(image_ids_n.dtype, np.integer):
        raise ValueError(f"retrieval bank image ids must be integers, got {image_ids_n.dtype}")
    n_repeats = len(image_ids_n) - len(np.unique(image_ids_n))
    if n_repeats:
        raise ValueError(f"retrieval bank image ids must be unique; {n_repeats} are repeats")
    return image_ids_n.astype(np.int64), shape[1:]


def _block_rows(n_features: int) -> int:
    return max(1, BLOCK_BYTES // (4 * n_features))


def _blocks(rows, n_features: int) -> Iterator[tuple[int, object]]:
    step = _block_rows(n_features)
    for start in range(0, len(rows), step):
        yield start, rows[start:start + step]


def _unit_blocks(tokens_nld, n_features: int, what: str = "retrieval bank tokens") -> Iterator[tuple[int, np.ndarray]]:
    """(first row, float32 unit rows (b, F)) of `tokens_nld`, a block at a time; NaN/inf rows are refused."""
    for start, block in _blocks(tokens_nld, n_features):
        rows_bf = np.asarray(block, dtype=np.float32).reshape(-1, n_features)
        bad_b = ~np.isfinite(rows_bf).all(axis=1)
        if bad_b.any():
            raise ValueError(f"{what} hold NaN/inf values in rows "
                             f"{(start + np.flatnonzero(bad_b)[:5]).tolist()}")
        rows_bf /= np.maximum(np.linalg.norm(rows_bf, axis=1, keepdims=True), 1e-12)  # all-zero rows stay zero
        yield start, rows_bf


def _unit_queries(predicted_bld, token_shape: tuple, k: int) -> np.ndarray:
    """float32 unit rows (B, L*D) of the predicted tokens, after checking their shape, values and k."""
    predicted_bld = np.asarray(predicted_bld)
    if predicted_bld.ndim != 3 or tuple(predicted_bld.shape[1:]) != tuple(token_shape) or not len(predicted_bld):
        raise ValueError(f"predicted tokens must be (B, {', '.join(map(str, token_shape))}) like the bank's, B >= 1, "
                         f"got {predicted_bld.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n_features = math.prod(token_shape)
    return np.concatenate([unit for _, unit in _unit_blocks(predicted_bld, n_features, "predicted tokens")])


def _ranked(image_ids_n: np.ndarray, positions_c: np.ndarray, rows_cf: np.ndarray, query_f: np.ndarray,
            k: int) -> list[tuple[int, float]]:
    """The k of the candidate rows most cosine-similar to the unit query, best first, by float32 scores."""
    scores_c = rows_cf @ query_f
    best = np.argsort(-scores_c, kind="stable")[:k]
    return [(int(image_ids_n[positions_c[i]]), float(scores_c[i])) for i in best]


def _new_index(dim: int, factory: str) -> faiss.Index:
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as error:
        raise ConfigValueError(f"bank.index '{factory}' is not a FAISS factory string for {dim}-dim rows: "
                               f"{_faiss_message(error)} (e.g. 'Flat', 'SQ8', 'IVF1024,PQ64' with 64 dividing "
                               "projection_dim)") from None
    # The factory's PQ trains polysemous codes too (its 'np' suffix turns that off): 50-100x the training time
    # here, for a Hamming-distance search this bank never runs
    quantizer = faiss.try_extract_index_ivf(index) or index
    while isinstance(quantizer, faiss.IndexPreTransform):
        quantizer = quantizer.index
    quantizer = faiss.downcast_index(quantizer)
    if hasattr(quantizer, "do_polysemous_training"):
        quantizer.do_polysemous_training = False
    return index


def _faiss_message(error: RuntimeError) -> str:
    """FAISS's own reason, without the C++ function, file and line it prepends."""
    text = str(error).strip()
    return re.sub(r"^Error in .*? at \S+:\d+: ", "", text.split("' failed: ")[-1]).strip()


def _file(folder: Path, name: str, what: str, hint: str = "") -> Path:
    if not (folder / name).is_file():
        raise MissingFileError(folder / name, what, hint or "the folder is not a complete bank: rebuild or re-save it")
    return folder / name


def _write_meta(folder: Path, kind: str, image_ids_n: np.ndarray, token_shape: tuple, extra: dict) -> None:
    meta = {"format": FORMAT, "version": VERSION, "kind": kind, "n_images": len(image_ids_n),
            "token_shape": list(token_shape), "rows_dtype": "float16", "metric": "cosine", **extra}
    (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def _read_meta(folder: Path) -> dict:
    path = _file(folder, META_FILE, "retrieval bank description", "build the bank there first (mindeye.bank)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise FormatError(path, "the bank description", "JSON", f"invalid JSON ({error.msg})") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise FormatError(path, "format and version", f"{FORMAT} {VERSION}",
                          f"{meta.get('format')} {meta.get('version')}")
    if meta.get("kind") not in ("exact", "faiss"):
        raise FormatError(path, "kind", "'exact' or 'faiss'", repr(meta.get("kind")))
    return meta


def _read_ids(folder: Path, meta: dict, rows_nf) -> np.ndarray:
    image_ids = np.load(_file(folder, IDS_FILE, "the bank's image ids"))
    if image_ids.shape != (meta["n_images"],) or (rows_nf is not None and len(rows_nf) != meta["n_images"]):
        raise FormatError(folder / IDS_FILE, "the image ids and rows", f"{meta['n_images']} of each",
                          f"{image_ids.shape} ids, {None if rows_nf is None else len(rows_nf)} rows")
    return image_ids
