"""Retrieval among NSD's 73,000 images: exact float16 search against FAISS banks (mindeye.bank).

Part 1, the world's token shape at NSD's size. The bank is the small world's 6,950 CLIP tokens (64 x 128,
ground_truth/image_tokens.hdf5) plus synthetic ones up to `--images` (73,000), each the world's mean plus a
random mix of `MIX` of its centred tokens (scaled to keep the world's covariance). Queries are bank members
picked at random: "clean" (the member's own tokens) and "decoded" (cosine 0.5 to the member, about what the
model reaches, its error drawn from the same covariance: a decoder's error lies among images, not in empty
directions). Exact = float32 brute-force cosine over every row. Per bank:

- recall@1: the bank's top-1 is exact search's top-1; recall@5: share of exact's top 5 in the bank's top 5;
- hit@1: the query's own image is the bank's top-1 (what realtime's hit rate measures; exact bounds it);
- memory: bytes held in RAM / on the GPU (float16 projection, FAISS index or float16 rows); disk: the
  re-rank rows, memory-mapped; build: seconds (the shared projection's learning is printed once);
- query ms: one query (batch 1) on one thread after warm-up, median and p95.

Part 2, paper size (256 x 1664 = 425,984 values a row): NSD's 73k rows are 62 GB in float16 and are not
built here. A `--paper-images` subset of synthetic rows (low-rank plus noise) is built into a FAISS bank
streaming from disk (peak memory printed) and its per-stage query costs are measured, then extrapolated
to 73k: exact search scales with the rows, the projection and re-rank do not, the index search is Part 1's.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/retrieval_bank.py                 # ~31 min here at load 6-10
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/retrieval_bank.py --images 20000 --paper-images 256 --queries 50
"""
from __future__ import annotations

import argparse
import math
import resource
import sys
import tempfile
import time
from pathlib import Path

import faiss
import h5py
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mindeye.bank import BankSettings, ExactBank, FaissBank, learn_projection  # noqa: E402
from mindeye.errors import MissingFileError  # noqa: E402
from timing import timed  # noqa: E402  benchmarks/, the script's folder

WORLD_TOKENS = "data/world/small/ground_truth/image_tokens.hdf5"
MIX = 64  # centred world tokens mixed into one synthetic row
DECODED_COSINE = 0.5
PAPER_SHAPE = (256, 1664)
NSD_IMAGES = 73000
PAPER_RANK = 256  # latent dimensions of the synthetic paper-size rows


def world_bank(path: Path, n_images: int, memmap_path: Path, rng) -> tuple[np.memmap, np.ndarray]:
    """float16 memmap (N, L, D): the world's tokens then synthetic ones; and the world's centred unit rows."""
    if not path.is_file():
        raise MissingFileError(path, "the small world's CLIP tokens", "write the world with `mindeye-world "
                               "world=small out_dir=data/world/small`, or pass --world-tokens")
    with h5py.File(path) as f:
        world_nld = f["tokens"][:].astype(np.float32)
    n_world, shape = len(world_nld), world_nld.shape[1:]
    world_nf = world_nld.reshape(n_world, -1)
    world_nf /= np.linalg.norm(world_nf, axis=1, keepdims=True)
    mean_f = world_nf.mean(axis=0)
    centred_nf = torch.from_numpy(world_nf - mean_f)
    bank_nld = np.lib.format.open_memmap(memmap_path, mode="w+", dtype=np.float16, shape=(n_images, *shape))
    bank_nld[:min(n_world, n_images)] = world_nld[:n_images]
    for start in range(n_world, n_images, 4096):
        n = min(4096, n_images - start)
        mix_nm = torch.zeros(n, n_world)  # each row: MIX random world tokens, Gaussian weights / sqrt(MIX)
        picks = torch.from_numpy(np.stack([rng.choice(n_world, MIX, replace=False) for _ in range(n)]))
        mix_nm.scatter_(1, picks, torch.from_numpy(rng.normal(size=(n, MIX)).astype(np.float32)) / math.sqrt(MIX))
        rows = torch.from_numpy(mean_f) + mix_nm.to_sparse() @ centred_nf
        bank_nld[start:start + n] = rows.numpy().reshape(n, *shape)
    bank_nld.flush()
    return bank_nld, centred_nf.numpy()


def unit(x_nf: np.ndarray) -> np.ndarray:
    x_nf = np.asarray(x_nf, np.float32).reshape(len(x_nf), -1)
    return x_nf / np.linalg.norm(x_nf, axis=1, keepdims=True)


def decoded_queries(members_nf: np.ndarray, centred_nf: np.ndarray, rng) -> np.ndarray:
    """Unit rows at cosine DECODED_COSINE to each member, the rest a random mix of centred world tokens."""
    mix_nm = rng.normal(size=(len(members_nf), len(centred_nf))).astype(np.float32)
    error_nf = mix_nm @ centred_nf
    error_nf -= (error_nf * members_nf).sum(1, keepdims=True) * members_nf  # orthogonal to the member
    error_nf = unit(error_nf)
    return DECODED_COSINE * members_nf + math.sqrt(1 - DECODED_COSINE**2) * error_nf


def exact_top5(bank_nld, queries_qf: np.ndarray) -> np.ndarray:
    """int (Q, 5): positions of the five best rows by float32 cosine, brute force over blocks."""
    scores_qn = np.concatenate([queries_qf @ unit(bank_nld[s:s + 8192]).T for s in range(0, len(bank_nld), 8192)],
                               axis=1)
    best = np.argpartition(-scores_qn, 5, axis=1)[:, :5]
    return np.take_along_axis(best, np.argsort(-np.take_along_axis(scores_qn, best, 1), axis=1), 1)


def query_times_ms(bank, queries_qf: np.ndarray, shape, repeats: int) -> np.ndarray:
    for q in queries_qf[:5]:
        bank.top_k(q.reshape(1, *shape), 5)  # warm-up
    times = []
    for q in queries_qf[:repeats]:
        start = time.perf_counter()
        bank.top_k(q.reshape(1, *shape), 5)
        times.append((time.perf_counter() - start) * 1e3)
    return np.array(times)


def scores(bank, queries_qf, shape, truth_q5, own_q) -> tuple[float, float, float]:
    ranked = bank.top_k(queries_qf.reshape(len(queries_qf), *shape), 5)
    found_q5 = np.array([[image_id for image_id, _ in row] for row in ranked])
    recall1 = float(np.mean(found_q5[:, 0] == truth_q5[:, 0]))
    recall5 = float(np.mean([len(set(f) & set(t)) / 5 for f, t in zip(found_q5, truth_q5)]))
    return recall1, recall5, float(np.mean(found_q5[:, 0] == own_q))


def mb(n_bytes: float) -> str:
    return f"{n_bytes / 1e6:,.0f} MB" if n_bytes < 1e9 else f"{n_bytes / 1e9:,.1f} GB"


def part1(args, work: Path, rng) -> dict:
    start = time.perf_counter()
    bank_nld, centred_nf = world_bank(Path(args.world_tokens), args.images, work / "world_tokens.npy", rng)
    shape, ids = bank_nld.shape[1:], np.arange(args.images)
    print(f"\n== Part 1: {args.images:,} images of the world's {shape[0]} x {shape[1]} tokens "
          f"({min(6950, args.images):,} the small world's, the rest synthetic; made in {time.perf_counter() - start:.0f} s)")
    members = np.sort(rng.choice(args.images, args.queries, replace=False))
    clean_qf = unit(bank_nld[members])
    queries = {"clean": clean_qf, "decoded": decoded_queries(clean_qf, centred_nf[rng.choice(len(centred_nf), 2048)],
                                                             rng)}
    truth = {name: exact_top5(bank_nld, q) for name, q in queries.items()}
    for name, q in queries.items():
        print(f"{name} queries: cosine to their image {np.mean((q * clean_qf).sum(1)):.3f}, exact search finds "
              f"their image first for {np.mean(truth[name][:, 0] == members):.1%}")
    start = time.perf_counter()
    bank_rows = np.load(work / "world_tokens.npy", mmap_mode="r")
    rows_nf = bank_rows.reshape(len(bank_rows), -1)
    train = np.sort(rng.choice(args.images, min(args.train_rows, args.images), replace=False))
    projection_fr = learn_projection(rows_nf, train, max(args.dims), seed=0)
    print(f"projection: uncentred PCA to {max(args.dims)} dims learned from {len(train):,} rows in "
          f"{time.perf_counter() - start:.0f} s (smaller dims: its leading columns)")
    configs = [("exact float16", None)]
    nlist = 1024 if args.images >= 40000 else 64  # FAISS wants >= 39 training rows a list
    for dim in args.dims:
        pq = f"IVF{nlist},PQ{dim // 8}"  # 8 dims a byte
        for index, nprobe, rerank in (("Flat", 1, 0), ("Flat", 1, 64), (pq, 32, 0), (pq, 32, 64),
                                      (f"RR{dim},{pq}", 32, 64)):
            configs.append((f"PCA{dim},{index}", BankSettings(kind="faiss", projection_dim=dim, index=index,
                                                              nprobe=nprobe, rerank=rerank)))
    header = (f"{'bank':26} {'nprobe':>6} {'rerank':>6} {'memory':>9} {'disk':>8} {'build s':>7} {'ms p50':>7} "
              f"{'ms p95':>7} | {'clean r@1':>9} {'r@5':>5} {'hit@1':>5} | {'decoded r@1':>11} {'r@5':>5} {'hit@1':>5}")
    print("\n" + header + "\n" + "-" * len(header))
    results = {}
    for name, settings in configs:
        start = time.perf_counter()
        if settings is None:
            bank, disk = ExactBank(ids, bank_nld), 0
        else:
            folder = work / "bank"
            bank = FaissBank.build(ids, bank_nld, folder, settings,
                                   projection_fr=projection_fr[:, :settings.projection_dim])
            disk = (folder / "unit_tokens_f16.npy").stat().st_size if settings.rerank else 0
        build_s = time.perf_counter() - start
        times = query_times_ms(bank, queries["decoded"], shape, args.timed)
        row = [f"{name:26}", f"{getattr(settings, 'nprobe', '-') if settings and 'IVF' in settings.index else '-':>6}",
               f"{settings.rerank if settings else '-':>6}", f"{mb(memory(bank)):>9}", f"{mb(disk) if disk else '-':>8}",
               f"{build_s:7.1f}", f"{np.median(times):7.2f}", f"{np.percentile(times, 95):7.2f}"]
        for kind in ("clean", "decoded"):
            recall1, recall5, hit1 = scores(bank, queries[kind], shape, truth[kind], members)
            row.append(f"| {recall1:{11 if kind == 'decoded' else 9}.3f} {recall5:5.3f} {hit1:5.3f}")
        print(" ".join(row), flush=True)
        if settings is not None and settings.index.startswith("IVF") and (settings.nprobe, settings.rerank) == (32, 0):
            results[("search", settings.projection_dim)] = float(np.median(times))  # Part 2's index search cost
            results[("codes", settings.projection_dim)] = int(faiss.serialize_index(bank.index).nbytes)
        del bank
    return results


def memory(bank) -> int:
    """Resident bytes with the projection in float16, as it is held on a GPU."""
    if isinstance(bank, FaissBank) and bank.projection_fr is not None:
        return bank.memory_bytes() - bank.projection_fr.numel() * (bank.projection_fr.element_size() - 2)
    return bank.memory_bytes()


def paper_rows(path: Path, n_images: int, rng) -> np.memmap:
    """float16 memmap (N, 256, 1664): a shared mean, PAPER_RANK latent directions with a decaying spectrum
    and isotropic noise (a quarter of the variance), written a block at a time."""
    n_features = math.prod(PAPER_SHAPE)
    mean_f = rng.normal(size=n_features).astype(np.float32)
    basis_kf = rng.normal(size=(PAPER_RANK, n_features)).astype(np.float32)
    scale_k = (np.arange(1, PAPER_RANK + 1) ** -0.5).astype(np.float32)
    scale_k *= math.sqrt(2.0 / np.sum(scale_k**2))  # latent variance twice the mean's, as the world's tokens
    rows = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n_images, *PAPER_SHAPE))
    for start in range(0, n_images, 64):
        n = min(64, n_images - start)
        block_nf = mean_f + (rng.normal(size=(n, PAPER_RANK)).astype(np.float32) * scale_k) @ basis_kf
        block_nf += rng.normal(scale=0.6, size=block_nf.shape).astype(np.float32)
        rows[start:start + n] = block_nf.reshape(n, *PAPER_SHAPE)
    rows.flush()
    return rows


def part2(args, work: Path, rng, search_ms: dict) -> None:
    n, n_features, dim = args.paper_images, math.prod(PAPER_SHAPE), args.paper_dim
    print(f"\n== Part 2: paper size, {PAPER_SHAPE[0]} x {PAPER_SHAPE[1]} = {n_features:,} values a row; "
          f"{n:,} synthetic rows built, {NSD_IMAGES:,} extrapolated")
    start = time.perf_counter()
    rows = paper_rows(work / "paper_tokens.npy", n, rng)
    print(f"rows: {mb(rows.nbytes)} float16 on disk, written in {time.perf_counter() - start:.0f} s")
    settings = BankSettings(kind="faiss", projection_dim=dim, index=f"IVF{max(1, n // 64)},PQ{dim // 8}", nprobe=8,
                            rerank=64, train_rows=args.paper_train_rows)
    start = time.perf_counter()
    bank = FaissBank.build(np.arange(n), rows, work / "paper_bank", settings)
    build_s = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"FaissBank.build ({settings.index} after PCA{dim}, train_rows {settings.train_rows}): {build_s:.0f} s, "
          f"peak resident memory of this process so far {mb(peak)}")
    queries_qf = unit(rows[rng.choice(n, min(args.timed, n), replace=False)])
    query_bld = queries_qf[:1].reshape(1, *PAPER_SHAPE)
    project_ms = timed(lambda: bank._projected(queries_qf[:1]), 1, args.timed)[0]
    bank_ms = query_times_ms(bank, queries_qf, PAPER_SHAPE, args.timed)
    exact = ExactBank(np.arange(n), rows)
    exact_ms = query_times_ms(exact, queries_qf, PAPER_SHAPE, args.timed)
    del exact
    projection_1024 = torch.randn(n_features, 1024)
    project1024_ms = timed(lambda: torch.from_numpy(queries_qf[:1]) @ projection_1024, 1, args.timed)[0]
    del projection_1024
    rerank_ms = timed(lambda: np.asarray(rows.reshape(n, -1)[np.sort(rng.choice(n, 64, replace=False))],
                                         np.float32) @ queries_qf[0], 1, args.timed)[0]
    recall1 = np.mean([bank.top_k(q.reshape(1, *PAPER_SHAPE), 1)[0][0][0] == i
                       for i, q in zip(np.arange(n), unit(rows[:50]))])
    print(f"on {n:,} rows, batch 1, one thread: exact float16 {np.median(exact_ms):.1f} ms; FaissBank top_k "
          f"{np.median(bank_ms):.1f} ms (p95 {np.percentile(bank_ms, 95):.1f}) of which projection {project_ms:.1f} ms "
          f"(PCA{dim}; PCA1024: {project1024_ms:.1f} ms) and re-rank of 64 rows from the page cache {rerank_ms:.1f} ms; "
          f"clean self-retrieval top-1 {recall1:.0%} ({query_bld.shape} queries)")
    exact_bytes = NSD_IMAGES * n_features * 2
    print(f"\nprojected to {NSD_IMAGES:,} images at paper size:")
    print(f"  exact float16: {mb(exact_bytes)} on the device (no 24 GB GPU holds it); CPU query ~"
          f"{np.median(exact_ms) * NSD_IMAGES / n / 1e3:.1f} s (measured {np.median(exact_ms):.1f} ms x {NSD_IMAGES / n:.0f}); "
          f"a GPU reads it at its memory bandwidth: ~{exact_bytes / 1e12 * 1e3:.0f} ms at 1 TB/s if it fitted")
    for r in sorted({256, dim, 1024}):
        codes = search_ms.get(("codes", r))
        print(f"  PCA{r} + IVF1024,PQ{r // 8}: projection {mb(n_features * r * 2)} float16 + index "
              f"{mb(codes) if codes else '?'} in memory; re-rank rows {mb(exact_bytes)} on disk (64 x "
              f"{mb(n_features * 2)} = {mb(64 * n_features * 2)} read a query); query = projection "
              f"({project_ms if r == dim else project1024_ms if r == 1024 else float('nan'):.1f} ms on one CPU thread, "
              f"~{n_features * r * 2 / 1e12 * 1e3:.2f} ms at 1 TB/s on a GPU) + index search at 73k "
              f"({search_ms.get(('search', r), float('nan')):.2f} ms, Part 1) + re-rank ({rerank_ms:.1f} ms from page cache)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--world-tokens", default=WORLD_TOKENS, help="the world's CLIP tokens (HDF5 'tokens')")
    parser.add_argument("--images", type=int, default=NSD_IMAGES, help="bank size of Part 1 (NSD: 73,000)")
    parser.add_argument("--queries", type=int, default=400, help="queries of each kind for the recalls")
    parser.add_argument("--timed", type=int, default=50, help="batch-1 queries timed per bank")
    parser.add_argument("--dims", type=int, nargs="+", default=[256, 1024], help="projection dims of Part 1")
    parser.add_argument("--train-rows", type=int, default=8192, help="rows the projection learns from")
    parser.add_argument("--paper-images", type=int, default=1024, help="paper-size rows built in Part 2 (0: skip)")
    parser.add_argument("--paper-dim", type=int, default=256, help="Part 2's projection dims")
    parser.add_argument("--paper-train-rows", type=int, default=512, help="rows Part 2's projection learns from")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        print(f"command: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/retrieval_bank.py {' '.join(sys.argv[1:])}")
        index_costs = part1(args, Path(work), rng)
        if args.paper_images:
            part2(args, Path(work), rng, index_costs)


if __name__ == "__main__":
    main()
