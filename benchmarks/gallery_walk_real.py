"""Does the HNSW walk's projection (`hnsw_pca`) find the same rows on real embeddings as the full walk?

`benchmarks/gallery_scale.py` measures speed on synthetic rows; this measures the risk of the projection
on real ones. Every picture of every set in ../shared/data is embedded by the frozen ImageNet Lite0 (1280-d,
the workflow's baseline gallery embedder) under `--views` views (view 0 the picture, the others random crops
of 60-100% of each side, mirrored half the time), so the gallery has many rows per character as a big one has.
A leak-free tenth of each set's pictures (near-duplicates kept on one side) is held out: their plain view asks
an HNSW `Gallery` (walk projected on 256 uncentred principal directions, the default, or on all 1280) and an
exact flat gallery over the other pictures' rows. Rows are fetched as the gallery fetches them (`search_rows`,
128, re-ranked on the exact vectors). Reported: build time, the share of queries whose top-1 row score equals
flat's (rows of one picture's views can tie, so scores, not ids, are compared), recall of flat's 10 nearest rows
among the first 10 fetched, the share of queries on which the gallery's answer (its top character, and all 5
characters asked for, with their scores; `max` aggregate) is flat's, and single-query time.
Table lines: the projection fitted on every set, fitted on the New Game! sets only and asked about the other
sets' pictures (characters it never saw), and a centred projection (Faiss's plain PCA) for the reason the
gallery fits an uncentred one. Embeddings are cached in `--cache` (about 110 MB at 12 views).

    python benchmarks/gallery_walk_real.py                 # 12 views (~22k rows): ~22 min to embed on 2 cores, then ~1 min
    python benchmarks/gallery_walk_real.py --views 4       # quicker, ~7k rows
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import LITE0, REPO, data_dir, quiet, real_set, seeded_splits

SETS = ["newgame_full", "newgame_faces", "faces6", "mixed5"]
K = 10


def views_of(path: Path, n: int, rng: np.random.Generator) -> list[Any]:
    """The picture, then `n - 1` random crops (60-100% of each side, mirrored half the time)."""
    from PIL import Image

    from anime_role_detect.imageio import load_image

    im = load_image(path)
    out = [im]
    for _ in range(n - 1):
        w, h = im.size
        s = rng.uniform(0.6, 1.0)
        cw, ch = max(1, int(w * s)), max(1, int(h * s))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        v = im.crop((x0, y0, x0 + cw, y0 + ch))
        out.append(v.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else v)
    return out


def embed(paths: list[Path], views: int, cache: Path) -> np.ndarray:
    """(pictures, views, 1280) frozen Lite0 embeddings, read from `cache` when it holds these pictures and views."""
    key = hashlib.sha256(("\n".join(map(str, paths)) + f"|{views}").encode()).hexdigest()[:16]
    f = cache / f"walk_real_{key}.npy"
    if f.is_file():
        return np.load(f)
    from anime_role_detect.recognition.embedder import build_embedder

    emb = build_embedder({**LITE0, "resize": "letterbox"})
    rng = np.random.default_rng(0)
    out = np.zeros((len(paths), views, 1280), np.float32)
    t = time.perf_counter()
    for i, p in enumerate(paths):
        out[i] = emb.embed(views_of(p, views, rng))
        if i % 100 == 99:
            print(f"\r  embedded {i + 1}/{len(paths)} pictures x {views} views, {time.perf_counter() - t:.0f} s", end="", file=sys.stderr)
    print(file=sys.stderr)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = f.with_suffix(".tmp.npy")
    np.save(tmp, out)
    os.replace(tmp, f)
    return out


def walk_dims(index: Any, dim: int) -> int:
    """Dimensions the graph under the gallery's re-ranker walks (a projection's output, else all)."""
    import faiss

    side = faiss.downcast_index(faiss.downcast_index(index.index).base_index)
    return faiss.downcast_VectorTransform(side.chain.at(0)).d_out if isinstance(side, faiss.IndexPreTransform) else dim


def same_answer(a: list[tuple[str, str, float]], b: list[tuple[str, str, float]]) -> bool:
    """Same characters in the same order with the same scores (to float rounding)."""
    return [c for c, _, _ in a] == [c for c, _, _ in b] and all(abs(x[2] - y[2]) < 1e-5 for x, y in zip(a, b))


def centred_walk(x: np.ndarray, fit: np.ndarray) -> Any:
    """The gallery's default graph with Faiss's own (centred) PCA: what `hnsw_pca` would be without the mirror."""
    import faiss

    index = faiss.index_factory(x.shape[1], "IDMap2,PCA256,HNSW32,SQ8,RFlat", faiss.METRIC_INNER_PRODUCT)
    hnsw = faiss.downcast_index(faiss.downcast_index(faiss.downcast_index(faiss.downcast_index(index.index).base_index).index))
    hnsw.hnsw.efConstruction, hnsw.hnsw.efSearch = 128, 128
    index.train(fit)
    index.add_with_ids(x, np.arange(len(x), dtype=np.int64))
    return index


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--views", type=int, default=12)
    ap.add_argument("--holdout", type=float, default=0.1, help="share of each set's pictures asked about (leak-free)")
    ap.add_argument("--cache", type=Path, default=REPO / "outputs" / "bench")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--search-rows", type=int, default=0, help="rows each query fetches (0: the gallery's default); ef_search follows")
    args = ap.parse_args(argv)
    quiet(args.threads)
    import faiss

    from anime_role_detect.recognition.faiss_index import search_params
    from anime_role_detect.recognition.gallery import Gallery

    faiss.omp_set_num_threads(args.threads)
    load0 = os.getloadavg()
    paths, names, sets, held = [], [], [], []
    for name in SETS:
        s = real_set(name)
        if s is None:
            continue
        _, val = seeded_splits(s, [0], args.holdout)[0]
        ask = np.zeros(len(s.records), bool)
        ask[val] = True
        paths += [s.root / r.file_name for r in s.records]
        names += [f"{name}/{r.character}" for r in s.records]
        sets += [name] * len(s.records)
        held += ask.tolist()
    if not paths:
        print(f"error: no set of {SETS} under {data_dir()}; set ARD_DATA_DIR", file=sys.stderr)
        return 2
    vecs = embed(paths, args.views, args.cache)
    held_a, sets_a, names_a = np.array(held), np.array(sets), np.array(names)
    rows = vecs[~held_a].reshape(-1, vecs.shape[2])
    row_names = np.repeat(names_a[~held_a], args.views).tolist()
    row_newgame = np.repeat(np.char.startswith(sets_a[~held_a], "newgame"), args.views)
    q, q_other = vecs[held_a, 0], ~np.char.startswith(sets_a[held_a], "newgame")
    print(f"# walk projection on real embeddings: {len(rows):,} rows ({held_a.size - held_a.sum()} pictures x {args.views} views), "
          f"{len(q)} held-out pictures asked ({q_other.sum()} outside New Game!); load average at start {load0[0]:.2f}")

    ev = np.linalg.eigvalsh(rows.T.astype(np.float64) @ rows)[::-1]
    energy = np.cumsum(ev) / ev.sum()
    print("uncentred energy in the first 64 / 128 / 256 / 512 directions: "
          + " / ".join(f"{energy[n - 1]:.3f}" for n in (64, 128, 256, 512)))
    depth = {"search_rows": args.search_rows, "ef_search": args.search_rows} if args.search_rows else {}
    flat = Gallery("bench:lite0", rows.shape[1], index={"type": "flat", **depth}, aggregate="max")
    flat.add_rows(rows, row_names)
    exact_d, exact_i = flat.index.search(q, K)
    flat_answers = flat.search(q, k=5)
    fetch = flat.index_spec.search_rows

    def measure(label: str, index: Any, params: Any, build: float, g: Any | None) -> None:
        """Rows fetched as the gallery fetches them (`search_rows`, re-ranked exactly), then its answers against flat's."""
        kw = {"params": params} if params is not None else {}
        d, i = index.search(q, fetch, **kw)
        same1 = np.abs(d[:, 0] - exact_d[:, 0]) < 1e-5
        r10 = np.array([len(set(a[:K]) & set(b)) / K for a, b in zip(i.tolist(), exact_i.tolist())])
        ms = []
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        for x in q:
            t = time.perf_counter()
            index.search(x[None], fetch, **kw)
            ms.append((time.perf_counter() - t) * 1e3)
        faiss.omp_set_num_threads(threads)
        answers = "- | -"
        if g is not None:
            got = g.search(q, k=5)
            answers = (f"{np.mean([same_answer(a[:1], b[:1]) for a, b in zip(got, flat_answers)]):.3f} | "
                       f"{np.mean([same_answer(a, b) for a, b in zip(got, flat_answers)]):.3f}")
        print(f"| {label} | {walk_dims(index, rows.shape[1])} | {build:.1f} | {same1.mean():.3f} ({same1[q_other].mean():.3f}) "
              f"| {r10.mean():.4f} ({r10[q_other].mean():.4f}) | {answers} | {np.median(ms):.3f} |", flush=True)

    print("\n| walk | dimensions walked | build s | top-1 row score = flat's (outside New Game!) | recall 10@10 (outside New Game!) | gallery's top character and score = flat's | all 5 characters and scores = flat's | single query ms (p50) |")
    print("|---|---|---|---|---|---|---|---|")
    for label, spec, fit in (("all 1280 dimensions (hnsw_pca 0)", {"hnsw_pca": 0}, None),
                             ("256 uncentred directions (default)", {}, None),
                             ("256 uncentred directions fitted on New Game! only", {}, rows[row_newgame])):
        g = Gallery("bench:lite0", rows.shape[1], index={"type": "hnsw", **spec, **depth}, aggregate="max")
        t = time.perf_counter()
        g.add_rows(rows, row_names, train_sample=fit)
        build = time.perf_counter() - t
        measure(label, g.index, search_params(g.index, "hnsw", g.index_spec, fetch), build, g)
    t = time.perf_counter()
    fit = rows[np.random.default_rng(0).permutation(len(rows))[:65_536]]
    index = centred_walk(rows, fit)
    params = faiss.IndexRefineSearchParameters(k_factor=1.0, base_index_params=faiss.SearchParametersHNSW(efSearch=fetch))
    measure("256 centred directions (Faiss's plain PCA)", index, params, time.perf_counter() - t, None)
    load1 = os.getloadavg()
    print(f"\n(load average at end {load1[0]:.2f}; rows fetched {fetch} per query, as the gallery's search does, and re-ranked on the exact vectors)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
