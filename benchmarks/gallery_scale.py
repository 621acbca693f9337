"""Galleries of millions: flat vs HNSW vs IVF-PQ over 100k, 1M and 10M synthetic character embeddings.

Every index is the one `recognition.gallery` builds (`Gallery.add_rows` in chunks; at 10M the bare
IVF-PQ from `faiss_index.make_index`, since ten million Python row records are not what is measured).
Vectors are unit embeddings of the default gallery's dimension (the version's Lite0 classifier:
1280 pooled features) clustered like characters: a shared mean direction, one direction per
character, a low-rank "pose/style" part shared by all characters and isotropic noise. The defaults
reproduce what frozen Lite0 features measure on ../shared/data/mixed5 (intra-character cosine 0.51,
inter 0.43, nearest-neighbour cosine about 0.77, 1-NN character agreement about 0.9 at 5
characters); the run prints the spread it generated. Rows come in chunks generated from their own
seed, so 10M x 1280 float32 (51 GB) is never in memory: IVF-PQ trains on the first chunk (classes
are drawn at random per row, so any chunk is a fair sample), adds chunk by chunk, and the exact
top-1 of every query is kept as a running best over the same chunks.

Reported per size and index: build seconds, index bytes (serialised size) and the process RSS it
added, query time at k=10 (per query in a batch, and one query at a time: mean and p50), recall@1
of rows against exact flat search, and the gallery's own search (per-character top-3 mean over the
rows, what the pipeline calls) as ms per single query and top-1 character agreement with the flat
gallery. Ratios are against the flat index measured in the same run (10M: flat is not built; its
bytes are exact and its query time is projected from 1M). Load average is printed at start and end.

IVF-PQ is measured with codes only and re-ranked on its vector file (`--ivfpq-vectors`, both by default;
`--refine-factor` sets how many rows the codes fetch, in multiples of `--search-rows`). Streamed sizes write
the fp16 vector file beside the index as the rows arrive (10M x 1280: 25.6 GB in `--vectors-dir`, removed
at the end) and time re-ranked queries twice per setting: after asking the kernel to drop the file's pages
(truly read from disk only for the first setting timed: mapped pages stay cached) and cached.

    nice -n 19 python benchmarks/gallery_scale.py                 # 100k, 1M (flat, HNSW, IVF-PQ), 10M (IVF-PQ)
    python benchmarks/gallery_scale.py --quick                    # 100k only
    python benchmarks/gallery_scale.py --sizes 200000 --hnsw-ef 64 128 --nprobe 16 32
    python benchmarks/gallery_scale.py --sizes 100000 --indexes hnsw --hnsw-storage sq8 --hnsw-ef 128 --exact-top 2 10
    python benchmarks/gallery_scale.py --sizes 10000000 --nprobe 32 64 --refine-factor 4 2 1 --threads 2
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from _common import quiet
from anime_role_detect.recognition.faiss_index import IndexSpec

DEFAULT_DIM = 1280  # EfficientNet-Lite0 num_features: the default (classifier) gallery's embedding size
K = 10


# -- synthetic characters ----------------------------------------------------------------------------
class CharacterCloud:
    """Unit vectors clustered like gallery rows of many characters, generated chunk by chunk from fixed seeds.

    row = a * shared mean direction + b * its character's offset + within-character variation,
    normalised. Offsets and variation follow one power-law spectrum (variance of component i ~ i^-alpha)
    in a random 1280-d basis: the top `rank` components are drawn exactly, the rest as isotropic noise
    of the same total energy (so a chunk costs one (n x rank) @ (rank x dim) product).
    """

    def __init__(self, rows: int, dim: int, rows_per_class: int, intra: float, inter: float, alpha: float,
                 rank: int, seed: int) -> None:
        if not 0.0 <= inter < intra < 1.0:
            raise SystemExit(f"error: need 0 <= --inter ({inter}) < --intra ({intra}) < 1")
        self.rows, self.dim, self.seed = rows, dim, seed
        self.n_classes = max(2, rows // rows_per_class)
        rank = min(rank, dim)
        rng = np.random.default_rng([seed, 0])
        g = rng.standard_normal(dim)
        self.mean_dir = (g / np.linalg.norm(g)).astype(np.float32)
        lam = np.arange(1, dim + 1, dtype=np.float64) ** -alpha
        lam /= lam.sum()
        self.sd = np.sqrt(lam[:rank]).astype(np.float32)
        self.tail = float(lam[rank:].sum())
        basis, _ = np.linalg.qr(rng.standard_normal((dim, rank)))
        self.basis = np.ascontiguousarray(basis.T, dtype=np.float32)  # rank x dim, orthonormal rows
        offsets = rng.standard_normal((self.n_classes, rank), dtype=np.float32) * self.sd
        self.offsets = offsets.astype(np.float16)  # 51 MB at 10M rows (100k characters)
        self.a = np.sqrt(inter)
        self.b = np.sqrt((intra - inter) / (1.0 - self.tail))
        self.s = np.sqrt(1.0 - intra)

    def sample(self, n: int, key: int) -> tuple[np.ndarray, np.ndarray]:
        """`n` rows (unit float32) and their character ids, reproducible from (`seed`, `key`)."""
        rng = np.random.default_rng([self.seed, 1, key])
        cls = rng.integers(0, self.n_classes, n)
        z = rng.standard_normal((n, len(self.sd)), dtype=np.float32)
        z *= self.s * self.sd
        z += self.b * self.offsets[cls].astype(np.float32)
        x = z @ self.basis
        noise = rng.standard_normal((n, self.dim), dtype=np.float32)
        noise *= self.s * np.sqrt(self.tail / self.dim)
        x += noise
        x += self.a * self.mean_dir
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x, cls.astype(np.int32)

    def chunks(self, size: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(first row id, vectors, character ids) over all rows, `size` rows at a time (chunk i has seed key i)."""
        for i, start in enumerate(range(0, self.rows, size)):
            x, c = self.sample(min(size, self.rows - start), i)
            yield start, x, c

    def queries(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Held-out query rows (new samples of the same characters, like validation images)."""
        return self.sample(n, 10**9)


def spread(cloud: CharacterCloud, n: int = 4000) -> dict[str, float]:
    """Measured on a sample of `n` rows: intra/inter-character cosine, nearest-row cosine, 1-NN character agreement."""
    x, c = cloud.sample(n, 10**9 + 1)
    s = x @ x.T
    np.fill_diagonal(s, -2.0)
    same = c[:, None] == c[None, :]
    off = s > -2.0
    nn = s.argmax(1)
    return {"intra": float(s[same & off].mean()) if (same & off).any() else float("nan"), "inter": float(s[~same].mean()),
            f"nn_cos_in_{n}": float(s.max(1).mean()), f"nn_same_character_in_{n}": float((c[nn] == c).mean())}


# -- measuring ---------------------------------------------------------------------------------------
def rss_mb() -> float:
    """Resident memory of this process (MB), after handing freed heap back to the system."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def index_bytes(index: Any) -> int:
    """Serialised size of a Faiss index, counted while streaming (no copy of a 5 GB index)."""
    import faiss

    total = 0

    def count(chunk: bytes) -> int:
        nonlocal total
        total += len(chunk)
        return len(chunk)

    faiss.write_index(index, faiss.PyCallbackIOWriter(count))
    return total


def timed_single(fn: Callable[[np.ndarray], Any], queries: np.ndarray) -> tuple[float, float]:
    """Mean and median wall ms of `fn` on one query at a time, on one Faiss thread.

    One thread is how a server answering concurrent requests runs a query; it also keeps OpenMP's
    per-call thread wake-up (milliseconds on a loaded machine) out of the figure.
    """
    import faiss

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        fn(queries[:1])  # warm-up
        ms = []
        for i in range(len(queries)):
            t = time.perf_counter()
            fn(queries[i : i + 1])
            ms.append((time.perf_counter() - t) * 1e3)
    finally:
        faiss.omp_set_num_threads(threads)
    return statistics.fmean(ms), statistics.median(ms)


@dataclass
class Result:
    """One line of the table."""

    rows: int
    index: str
    setting: str = ""
    aggregate: str = ""
    build_s: float = float("nan")
    index_mb: float = float("nan")
    rss_mb: float = float("nan")
    batch_ms: float = float("nan")
    single_ms: float = float("nan")
    single_p50_ms: float = float("nan")
    recall1: float = float("nan")
    gallery_ms: float = float("nan")
    gallery_agree: float = float("nan")
    gallery_score_exact: float = float("nan")
    notes: dict[str, Any] = field(default_factory=dict)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- one size ----------------------------------------------------------------------------------------
class SizeRun:
    """Builds and measures every index of one gallery size."""

    def __init__(self, args: argparse.Namespace, rows: int) -> None:
        self.args, self.rows = args, rows
        self.cloud = CharacterCloud(rows, args.dim, args.rows_per_class, args.intra, args.inter, args.alpha, args.rank,
                                    args.seed)
        nq = args.queries if rows <= args.full_max else args.queries_huge
        self.q, self.q_cls = self.cloud.queries(nq)
        self.names = np.array([f"c{i}" for i in range(self.cloud.n_classes)])
        self.truth: np.ndarray | None = None  # exact top-1 row id per query
        self.row_class: np.ndarray | None = None  # character of every row (streamed IVF-PQ: no Gallery keeps it)
        self.flat_top: dict[str, tuple[list[str], np.ndarray]] = {}  # aggregate -> flat gallery's top-1 character, score
        self.flat: Result | None = None
        self.vector_file: Any = None  # streamed IVF-PQ: the rows' fp16 vector file (a `VectorFile`), when kept

    def gallery(self, spec: dict[str, Any]) -> tuple[Any, float, float]:
        """A `Gallery` of every row built chunk by chunk: (gallery, build seconds, RSS it added)."""
        from anime_role_detect.recognition.gallery import Gallery

        gc.collect()
        rss0 = rss_mb()
        g = Gallery("bench:lite0-synthetic", self.args.dim, index=spec, aggregate=self.args.aggregates[0])
        build = 0.0
        for start, x, c in self.cloud.chunks(self.args.chunk):
            names = self.names[c].tolist()
            t = time.perf_counter()
            g.add_rows(x, names, expected_rows=self.rows)
            build += time.perf_counter() - t
            log(f"  {spec['type']} {start + len(x):,}/{self.rows:,} rows, {build:.0f}s in the index")
            del x, c, names
        g.fix_reference()  # as every build does: `balanced`'s n_ref and each character's depth
        return g, build, rss_mb() - rss0

    def measure_index(self, res: Result, index: Any, params: Any) -> np.ndarray:
        """Batch and single-query time at k=10 and recall@1 of rows against the exact top-1; returns the ids found."""
        kw = {"params": params} if params is not None else {}
        t = time.perf_counter()
        _, ids = index.search(self.q, K, **kw)
        res.batch_ms = (time.perf_counter() - t) * 1e3 / len(self.q)
        res.single_ms, res.single_p50_ms = timed_single(lambda x: index.search(x, K, **kw), self.q[: self.args.single])
        if self.truth is not None:
            res.recall1 = float(np.mean(ids[:, 0] == self.truth))
        return ids

    def measure_gallery(self, res: Result, g: Any) -> list[Result]:
        """The gallery's own search (what the pipeline calls), one line per aggregate: ms per single query, top-1 vs flat."""
        qs = self.q[: self.args.gallery_queries]
        out = []
        runs = [(agg, et) for agg in self.args.aggregates
                for et in (self.args.exact_top if agg != "max" and g.kind != "flat" else [g.index_spec.exact_top])]
        for agg, et in runs:
            label = agg if sum(a == agg for a, _ in runs) == 1 else f"{agg}, exact_top {et}"
            r = Result(**{**asdict(res), "aggregate": label, "notes": dict(res.notes)})
            g.aggregate, g.index_spec.exact_top = agg, et
            r.gallery_ms, _ = timed_single(lambda x: g.search(x, k=K), qs[: self.args.single])
            answers = g.search(qs, k=K)
            top = [a[0][0] if a else "" for a in answers]
            score = np.array([a[0][2] if a else np.nan for a in answers])
            if agg in self.flat_top:
                flat_chars, flat_scores = self.flat_top[agg]
                agree = np.array([a == b for a, b in zip(top, flat_chars)])
                r.gallery_agree = float(agree.mean())
                r.gallery_score_exact = float(np.mean(np.abs(score[agree] - flat_scores[agree]) < 1e-4)) if agree.any() else 0.0
            else:
                self.flat_top[agg] = (top, score)
                r.gallery_agree = r.gallery_score_exact = 1.0
            out.append(r)
        return out

    def run_flat(self) -> list[Result]:
        g, build, rss = self.gallery({"type": "flat"})
        res = Result(self.rows, "flat", "exact", "", build, index_bytes(g.index) / 2**20, rss)
        t = time.perf_counter()
        _, ids = g.index.search(self.q, K)
        res.batch_ms = (time.perf_counter() - t) * 1e3 / len(self.q)
        self.truth = ids[:, 0].copy()
        res.recall1 = 1.0
        index = g.index
        res.single_ms, res.single_p50_ms = timed_single(lambda x: index.search(x, K), self.q[: self.args.single_flat])
        out = self.measure_gallery(res, g)
        del g
        self.flat = res
        return out

    def run_hnsw(self) -> list[Result]:
        """One HNSW gallery per graph storage (`--hnsw-storage`), width (`--hnsw-m`) and walk projection (`--hnsw-pca`;
        sq8/fp16 only), each measured at every `--hnsw-ef`."""
        out = []
        for storage in self.args.hnsw_storage:
            for m in self.args.hnsw_m:
                for pca in (self.args.hnsw_pca if storage != "flat" else [0]):
                    out.extend(self._run_hnsw(storage, m, pca))
        return out

    def _run_hnsw(self, storage: str, m: int, pca: int) -> list[Result]:
        from anime_role_detect.recognition.faiss_index import search_params

        spec = {"type": "hnsw", "hnsw_m": m, "hnsw_storage": storage, "hnsw_pca": pca, "ef_construction": self.args.ef_construction,
                "search_rows": self.args.search_rows}
        g, build, rss = self.gallery(spec)
        mb = index_bytes(g.index) / 2**20
        walk = f", walk on PCA{pca}" if 0 < pca < self.args.dim else ""
        out = []
        for ef in self.args.hnsw_ef:
            raw = Result(self.rows, f"hnsw ({storage} graph{walk})", f"M{m} efC={self.args.ef_construction} efSearch={ef}", "",
                         build, mb, rss)
            g.index_spec.ef_search = ef
            self.measure_index(raw, g.index, search_params(g.index, "hnsw", g.index_spec, K))
            for res in self.measure_gallery(raw, g):
                out.append(res)
                log(f"  hnsw {storage}{walk} ef={ef} {res.aggregate}: recall@1 {res.recall1:.3f}, single {res.single_ms:.2f} ms, "
                    f"gallery {res.gallery_ms:.2f} ms, agree {res.gallery_agree:.3f}")
        del g
        return out

    def ivfpq_spec(self, vectors: str = "none") -> dict[str, Any]:
        return {"type": "ivfpq", "nlist": self.args.nlist, "pq_m": self.args.pq_m, "search_rows": self.args.search_rows,
                "ivfpq_vectors": vectors, "refine_factor": self.args.refine_factor[0]}

    def run_ivfpq(self) -> list[Result]:
        """One IVF-PQ gallery per `--ivfpq-vectors` choice: re-ranked on its vector file (fp16) or codes only (none)."""
        out = []
        for vectors in self.args.ivfpq_vectors:
            g, build, rss = self.gallery(self.ivfpq_spec(vectors))
            out.extend(self._ivfpq_results(g.index, build, rss, g))
            del g
        return out

    def _ivfpq_results(self, index: Any, build: float, rss: float, g: Any | None) -> list[Result]:
        import faiss

        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        mb = index_bytes(index) / 2**20
        out = []
        for nprobe in self.args.nprobe:
            kept = g is not None and g.vectors is not None
            name = "ivfpq (codes + fp16 vectors)" if kept else "ivfpq (codes only)"
            res = Result(self.rows, name, f"IVF{ivf.nlist},PQ{ivf.pq.M}x{ivf.pq.nbits} nprobe={nprobe}", "", build, mb, rss)
            ids = self.measure_index(res, index, faiss.SearchParametersIVF(nprobe=nprobe))
            if g is None and self.row_class is not None and self.truth is not None:
                self.character_agreement(res, ids[:, 0])
            if g is not None:
                g.index_spec.nprobe = nprobe
                out.extend(self.measure_gallery(res, g))
            else:
                out.append(res)
                if self.vector_file is not None:
                    out.extend(self.reranked(index, nprobe, res))
            log(f"  {name} nprobe={nprobe}: recall@1 {res.recall1:.3f}, single {res.single_ms:.2f} ms")
        return out

    def reranked(self, index: Any, nprobe: int, codes: Result) -> list[Result]:
        """The streamed index's rows re-ranked on the vector file, as `Gallery.search` does, per `--refine-factor`.

        Timed twice per setting: after asking the kernel to drop the file's cached pages, then again. Only the
        first setting timed is read from disk: pages this process has mapped stay cached whatever it asks, so
        later settings' first timing is mostly cached too. The character is the best re-ranked row's (`max`;
        `Gallery.search` also re-scores its best `exact_top` characters on all their rows, which needs row records
        this streamed run does not keep).
        """
        import faiss

        from anime_role_detect.recognition.faiss_index import rerank_on_vectors

        vf = self.vector_file
        out = []
        for factor in self.args.refine_factor:
            fetch = self.args.search_rows * factor
            params = faiss.SearchParametersIVF(nprobe=nprobe)

            def search(x: np.ndarray, fetch: int = fetch, params: Any = params) -> np.ndarray:
                return rerank_on_vectors(vf, x, index.search(x, fetch, params=params)[1], K)[1]

            res = Result(self.rows, "ivfpq (codes + fp16 vectors)", f"{codes.setting} refine x{factor} ({fetch} rows)", "max",
                         codes.build_s, codes.index_mb, codes.rss_mb)
            res.notes["vector_file_mb"] = len(vf) * vf.row_bytes / 2**20
            qs = self.q[: self.args.single]
            vf.evict()
            res.single_ms, res.single_p50_ms = timed_single(search, qs)
            res.notes["cached_single_ms"], _ = timed_single(search, qs)
            top = np.concatenate([search(self.q[i : i + 64])[:, 0] for i in range(0, len(self.q), 64)])
            res.recall1 = float(np.mean(top == self.truth))
            self.character_agreement(res, top)
            out.append(res)
            log(f"  ivfpq nprobe={nprobe} refine x{factor}: recall@1 {res.recall1:.3f}, character = exact "
                f"{res.gallery_agree:.3f}, single {res.single_ms:.2f} ms from disk, {res.notes['cached_single_ms']:.2f} ms cached")
        return out

    def character_agreement(self, res: Result, top_rows: np.ndarray) -> None:
        """Top-1 character of the `max` aggregate (its best row's character) against the exact scan's, and against the truth.

        What `Gallery.search` answers with `aggregate: max` (the workflow's) on a codes-only IVF-PQ gallery: the
        character of the row with the best approximate score (re-ranked rows: `reranked`).
        """
        assert self.row_class is not None and self.truth is not None
        found = np.where(top_rows >= 0, self.row_class[np.maximum(top_rows, 0)], -1)
        exact = self.row_class[self.truth]
        res.aggregate = "max"
        res.gallery_agree = float(np.mean(found == exact))
        res.notes["top1_character_right"] = float(np.mean(found == self.q_cls))
        res.notes["exact_top1_character_right"] = float(np.mean(exact == self.q_cls))

    def run_ivfpq_streamed(self) -> list[Result]:
        """IVF-PQ over rows that never fit in memory: train on chunk 0, add chunk by chunk, exact top-1 as a running best."""
        from anime_role_detect.recognition.faiss_index import IndexSpec, make_index, train_rows

        spec = IndexSpec(**self.ivfpq_spec())
        gc.collect()
        rss0 = rss_mb()
        first, _ = self.cloud.sample(min(self.args.chunk, self.rows), 0)
        need = train_rows("ivfpq", spec, self.args.dim, self.rows)
        sample = first[np.sort(np.random.default_rng(0).choice(len(first), min(need, len(first)), replace=False))]
        del first
        t = time.perf_counter()
        index = make_index("ivfpq", spec, self.args.dim, self.rows, n_train=len(sample))
        index.train(sample)
        build = time.perf_counter() - t
        log(f"  ivfpq trained on {len(sample):,} rows in {build:.0f}s")
        del sample
        best = np.full(len(self.q), -np.inf, np.float32)
        best_id = np.full(len(self.q), -1, np.int64)
        self.row_class = np.empty(self.rows, np.int32)
        keep = "fp16" in self.args.ivfpq_vectors
        vec_dir = Path(tempfile.mkdtemp(prefix="gallery_scale_vectors_", dir=self.args.vectors_dir))
        vec_fh = open(vec_dir / "gallery.vectors", "wb") if keep else None
        exact_s = 0.0
        t_all = time.perf_counter()
        for start, x, c in self.cloud.chunks(self.args.chunk):
            self.row_class[start : start + len(x)] = c
            t = time.perf_counter()
            index.add_with_ids(x, np.arange(start, start + len(x), dtype=np.int64))
            if vec_fh is not None:
                vec_fh.write(x.astype("<f2").tobytes())
            build += time.perf_counter() - t
            t = time.perf_counter()
            sims = self.q @ x.T
            arg = sims.argmax(1)
            top = sims[np.arange(len(self.q)), arg]
            better = top > best
            best[better], best_id[better] = top[better], start + arg[better]
            exact_s += time.perf_counter() - t
            done = start + len(x)
            eta = (time.perf_counter() - t_all) / done * (self.rows - done)
            log(f"  ivfpq {done:,}/{self.rows:,} rows, {build:.0f}s in the index, ETA {eta / 60:.0f} min")
            del x, sims
        self.truth = best_id
        rss = rss_mb() - rss0
        if vec_fh is not None:
            from anime_role_detect.recognition.vector_file import VectorFile

            vec_fh.close()
            self.vector_file = VectorFile.open(vec_dir, {"rows": self.rows}, self.args.dim)
        try:
            out = self._ivfpq_results(index, build, rss, None)
            for r in out:
                r.notes["exact_scan_ms_per_query"] = exact_s * 1e3 / len(self.q)
            nprobe = int(self.args.nprobe[len(self.args.nprobe) // 2])
            serve = serving_footprint(index, self.q[: self.args.single], nprobe,
                                      vec_dir if keep else None, self.args.search_rows * self.args.refine_factor[0])
            for r in out:
                r.notes.update(serve)
        finally:
            self.vector_file = None
            shutil.rmtree(vec_dir, ignore_errors=True)
        return out


def serving_footprint(index: Any, queries: np.ndarray, nprobe: int, vector_dir: Path | None = None,
                      fetch: int = 512) -> dict[str, float]:
    """RSS of a fresh process that loads the saved index and answers single queries (what a server holds).

    With `vector_dir`, the process also maps the vector file and re-ranks `fetch` rows per query, as
    `Gallery.search` does; RSS then counts the file pages those queries touched (``serve_rss_file_mb``),
    which the kernel can drop, apart from the process's own memory (``serve_rss_anon_mb``).
    """
    import faiss

    with tempfile.TemporaryDirectory(prefix="gallery_scale_") as d:
        p = Path(d) / "index.faiss"
        faiss.write_index(index, str(p))
        np.save(Path(d) / "q.npy", queries)
        rerank = (
            "from anime_role_detect.recognition.faiss_index import rerank_on_vectors\n"
            "from anime_role_detect.recognition.vector_file import VectorFile\n"
            f"vf = VectorFile.open({str(vector_dir)!r}, {{'rows': index.ntotal}}, index.d)\n"
            f"def search(x): return rerank_on_vectors(vf, x, index.search(x, {int(fetch)}, params=params)[1], 10)\n"
        ) if vector_dir is not None else "def search(x): return index.search(x, 10, params=params)\n"
        code = (
            "import faiss, numpy as np, time, json, sys\n"
            "def status(key):\n"
            "    return [int(l.split()[1]) / 1024 for l in open('/proc/self/status') if l.startswith(key + ':')][0]\n"
            f"r0 = status('VmRSS'); index = faiss.read_index({str(p)!r}); q = np.load({str(Path(d) / 'q.npy')!r})\n"
            f"params = faiss.SearchParametersIVF(nprobe={int(nprobe)})\n"
            + rerank +
            "t = time.perf_counter()\n"
            "for i in range(len(q)): search(q[i:i+1])\n"
            "ms = (time.perf_counter() - t) * 1e3 / len(q)\n"
            "print(json.dumps({'serve_rss_mb': status('VmRSS'), 'serve_rss_anon_mb': status('RssAnon'),\n"
            "                  'serve_rss_file_mb': status('RssFile'), 'serve_rss_before_load_mb': r0, 'serve_single_ms': ms}))\n"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])


# -- report ------------------------------------------------------------------------------------------
def fmt(x: float, digits: int = 1) -> str:
    return "-" if math.isnan(x) else f"{x:,.{digits}f}"


def table(results: list[Result], flats: dict[int, Result], projected_flat_ms: dict[int, float]) -> str:
    head = ("| rows | index | setting | aggregate | build s | index MB | RSS +MB | batch ms/q | single ms/q (p50) | recall@1 rows | "
            "gallery.search ms/q | top-1 char = flat | x flat: build / bytes / single |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        f = flats.get(r.rows)
        flat_bytes = r.rows * r.notes.get("dim", 0) * 4 / 2**20
        if f is not None:
            ratio = f"{r.build_s / f.build_s:.1f} / {r.index_mb / f.index_mb:.2f} / {r.single_ms / f.single_ms:.3f}"
        elif r.rows in projected_flat_ms:
            ratio = f"- / {r.index_mb / flat_bytes:.3f} / {r.single_ms / projected_flat_ms[r.rows]:.4f} (flat projected)"
        else:
            ratio = "-"
        lines.append(f"| {r.rows:,} | {r.index} | {r.setting} | {r.aggregate or '-'} | {fmt(r.build_s)} | {fmt(r.index_mb)} | {fmt(r.rss_mb)} | "
                     f"{fmt(r.batch_ms, 2)} | {fmt(r.single_ms, 2)} ({fmt(r.single_p50_ms, 2)}) | {fmt(r.recall1, 3)} | "
                     f"{fmt(r.gallery_ms, 2)} | {fmt(r.gallery_agree, 3)} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dim", type=int, default=DEFAULT_DIM, help="embedding size (default: Lite0's 1280)")
    ap.add_argument("--quick", action="store_true", help="100k rows only")
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    ap.add_argument("--full-max", type=int, default=1_000_000, help="sizes above this build only IVF-PQ (streamed)")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--queries-huge", type=int, default=500, help="queries for sizes above --full-max (exact top-1 is a full scan)")
    ap.add_argument("--single", type=int, default=200, help="queries timed one at a time")
    ap.add_argument("--single-flat", type=int, default=30, help="single queries timed on flat (slow at 1M)")
    ap.add_argument("--gallery-queries", type=int, default=500, help="queries through Gallery.search for character agreement")
    ap.add_argument("--chunk", type=int, default=100_000)
    ap.add_argument("--rows-per-class", type=int, default=100)
    ap.add_argument("--intra", type=float, default=0.60, help="mean cosine of two rows of one character")
    ap.add_argument("--inter", type=float, default=0.30, help="mean cosine of rows of two characters")
    ap.add_argument("--alpha", type=float, default=1.0, help="spectrum decay: variance of component i ~ i^-alpha")
    ap.add_argument("--rank", type=int, default=256, help="components drawn exactly (the rest: isotropic noise)")
    ap.add_argument("--aggregates", nargs="+", default=["balanced", "max"],
                    help="gallery search aggregates, one line each (balanced: every gallery's default; max: the cheapest)")
    ap.add_argument("--indexes", nargs="+", default=["hnsw", "ivfpq"], choices=["hnsw", "ivfpq"],
                    help="approximate indexes to build next to the flat baseline (sizes up to --full-max)")
    ap.add_argument("--hnsw-m", type=int, nargs="+", default=[IndexSpec.hnsw_m], help="graph width(s) (default: the gallery's)")
    ap.add_argument("--hnsw-storage", nargs="+", default=[IndexSpec.hnsw_storage, "flat"], choices=["sq8", "fp16", "flat"],
                    help="what the graph walks: 8-bit / fp16 codes re-ranked on exact vectors (default), or the float vectors")
    ap.add_argument("--hnsw-pca", type=int, nargs="+", default=[IndexSpec.hnsw_pca, 0],
                    help="sq8/fp16 graphs: dimensions the walk projects onto (0: all; default: the gallery's, then 0)")
    ap.add_argument("--ef-construction", type=int, default=IndexSpec.ef_construction, help="default: the gallery's")
    ap.add_argument("--hnsw-ef", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--nlist", type=int, default=0, help="0: the gallery's auto rule")
    ap.add_argument("--pq-m", type=int, default=0, help="0: the gallery's auto rule")
    ap.add_argument("--nprobe", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--exact-top", type=int, nargs="+", default=[IndexSpec.exact_top],
                    help="approximate galleries, top-m aggregates: characters re-scored exactly, one line each (default: the gallery's)")
    ap.add_argument("--ivfpq-vectors", nargs="+", default=["fp16", "none"], choices=["fp16", "none"],
                    help="IVF-PQ: re-rank on a vector file (fp16) and/or codes only (none); streamed sizes write the file "
                         "once and report both")
    ap.add_argument("--refine-factor", type=int, nargs="+", default=[IndexSpec.refine_factor],
                    help="IVF-PQ with vectors: rows fetched from the codes per query, in multiples of --search-rows")
    ap.add_argument("--vectors-dir", type=Path, default=None,
                    help="streamed sizes: where the vector file is written (10M rows at dim 1280: 25.6 GB; default: the temp dir)")
    ap.add_argument("--search-rows", type=int, default=IndexSpec.search_rows, help="gallery: nearest rows fetched per query (default: the gallery's)")
    ap.add_argument("--threads", type=int, default=1, help="Faiss threads for builds and batches (1: robust on a shared machine)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write every result here")
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes = [100_000]
    quiet(args.threads)
    import faiss

    faiss.omp_set_num_threads(args.threads)
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    print(f"# gallery scale: dim {args.dim}, sizes {args.sizes}, {args.rows_per_class} rows per character, k={K}, "
          f"aggregates {args.aggregates}, {args.threads} threads; load average at start {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}")
    results: list[Result] = []
    flats: dict[int, Result] = {}
    projected: dict[int, float] = {}
    for rows in args.sizes:
        run = SizeRun(args, rows)
        sp = spread(run.cloud)
        print(f"## {rows:,} rows, {run.cloud.n_classes:,} characters, {len(run.q)} queries; generated spread: "
              + ", ".join(f"{k} {v:.3f}" for k, v in sp.items()), flush=True)
        if rows <= args.full_max:
            steps: list[Callable[[], list[Result]]] = [run.run_flat, *(getattr(run, f"run_{i}") for i in args.indexes)]
        else:
            steps = [run.run_ivfpq_streamed]
            known = sorted(r for r in flats if r <= rows)
            if known:
                projected[rows] = flats[known[-1]].single_ms * rows / known[-1]
        for step in steps:
            log(f"{rows:,}: {step.__name__}")
            out = step()
            for r in out:
                r.notes["dim"] = args.dim
                r.notes["spread"] = sp
            results.extend(out)
            if run.flat is not None:
                flats[rows] = run.flat
            print(table(out, flats, projected), flush=True)
            gc.collect()
    load1 = os.getloadavg()
    print(f"\n# all results ({(time.perf_counter() - t0) / 60:.1f} min; load average at start {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}, "
          f"at end {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f})\n")
    print(table(results, flats, projected))
    for r in results:
        extra = {k: v for k, v in r.notes.items() if k.startswith(("serve", "exact", "top1", "cached", "vector"))}
        if extra:
            print(f"{r.rows:,} {r.index} {r.setting} {r.aggregate}: "
                  + ", ".join(f"{k} {v:.3f}" if k.endswith("right") else f"{k} {v:.2f}" if k.endswith("_ms") else f"{k} {v:.1f}" for k, v in extra.items()))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
