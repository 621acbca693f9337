"""Faiss index kinds for a gallery: which kind for how many rows, how each is built, trained and searched.

``flat`` is exact; ``hnsw`` walks a graph over 8-bit codes of each row projected on the gallery's first
`IndexSpec.hnsw_pca` uncentred principal directions and re-ranks on the exact vectors (answers stay exact);
``ivfpq`` keeps 128-byte codes in memory and re-ranks on half-precision vectors in a `VectorFile`. The
`Gallery` owns rows and persistence; this module only knows Faiss. Measured choices: docs/recognition.md
"Galleries of millions".
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from ..errors import ConfigError
from .vector_file import VectorFile


@dataclass
class IndexSpec:
    """Which Faiss index to build: exact ``flat``, graph ``hnsw``, compressed ``ivfpq``, or ``auto`` by row count."""

    type: str = "auto"
    flat_below: int = 20_000         # auto: exact flat index under this many rows (a query costs <~10 ms at dim 1280)
    hnsw_below: int = 2_000_000      # auto: HNSW under this many rows, IVF-PQ from here on
    hnsw_m: int = 32
    hnsw_storage: str = "sq8"        # what the HNSW graph walks: sq8 / fp16 codes (answers re-ranked on the exact vectors kept beside them), or flat
    hnsw_pca: int = 256              # sq8/fp16: the graph walks the rows' first this many uncentred principal directions (0 or >= dim: all)
    ef_construction: int = 128       # graph quality (Faiss default 40); at 100k rows recall@1 1.000 at ef_search 128 (docs/recognition.md)
    ef_search: int = 128
    nlist: int = 0                   # IVF lists; 0: ~sqrt(rows) rounded down to a power of two
    pq_m: int = 0                    # PQ sub-quantizers (bytes per row at 8 bits); 0: the largest divisor of dim <= dim/10
    pq_nbits: int = 8
    nprobe: int = 32
    ivfpq_vectors: str = "fp16"      # IVF-PQ: keep each row's vector in gallery.vectors (memory-mapped) to re-rank exactly; none: codes only
    refine_factor: int = 2           # IVF-PQ with vectors: fetch this many times `search_rows` rows from the codes, re-rank them exactly (10M: 2 = 4)
    search_rows: int = 128           # approximate indexes: nearest rows fetched per query (HNSW: free up to ef_search)
    exact_top: int = 2               # approximate indexes: the best this many characters get exact scores; the rest are bounds
    rebuild_fraction: float = 0.2    # HNSW cannot delete: removed rows are skipped until they exceed this share, then it is rebuilt


#: Index kinds from exact and small to compressed and huge; `auto` only ever moves a gallery up this list.
KIND_ORDER: tuple[str, ...] = ("flat", "hnsw", "ivfpq")
_TRAIN_ROWS_MAX = 200_000
#: HNSW storage -> Faiss factory suffix. Compressed codes cut the memory a graph walk reads 4x (sq8) or 2x
#: (fp16); ``RFlat`` keeps the exact vectors and re-ranks what the walk found, so answers stay exact.
_HNSW_STORAGE = {"flat": "", "sq8": ",SQ8,RFlat", "fp16": ",SQfp16,RFlat"}
_HNSW_TRAIN_ROWS = 65_536  # a scalar quantizer learns each dimension's range from this many rows
_PCA_TRAIN_ROWS = 16_384  # the walk's projection is fitted on this many of them
_IVFPQ_VECTORS = ("fp16", "none")
_RERANK_ROWS = 65_536


def resolve_kind(spec: IndexSpec, rows: int) -> str:
    """The concrete index kind for `rows` rows: `spec.type`, or by size thresholds when it is ``auto``."""
    if spec.type in KIND_ORDER:
        return spec.type
    if spec.type != "auto":
        raise ConfigError(f"gallery.index.type={spec.type!r}: choose auto, flat, hnsw or ivfpq")
    if spec.flat_below > spec.hnsw_below:
        raise ConfigError(f"gallery.index.flat_below={spec.flat_below} is above hnsw_below={spec.hnsw_below}; make flat_below <= hnsw_below")
    return "flat" if rows < spec.flat_below else "hnsw" if rows < spec.hnsw_below else "ivfpq"


def keeps_vector_file(kind: str, spec: IndexSpec) -> bool:
    """Whether a `kind` index under `spec` keeps its rows' vectors in a `VectorFile` (IVF-PQ, unless told not to)."""
    if spec.ivfpq_vectors not in _IVFPQ_VECTORS:
        raise ConfigError(f"gallery.index.ivfpq_vectors={spec.ivfpq_vectors!r}: choose {' or '.join(_IVFPQ_VECTORS)}")
    return kind == "ivfpq" and spec.ivfpq_vectors != "none"


def rerank_on_vectors(vectors: VectorFile, queries: np.ndarray, ids: np.ndarray, keep: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosines of the rows `ids` an approximate search fetched per query, best `keep` first: (scores, ids).

    Queries go in blocks of about 64k fetched rows, each block one read of the vector file (in id
    order); ids of -1 (nothing found) stay last.
    """
    sims = np.full(ids.shape, -np.inf, np.float32)
    valid = ids >= 0
    block = max(1, _RERANK_ROWS // max(1, ids.shape[1]))
    for b in range(0, len(ids), block):
        v, q = valid[b : b + block], queries[b : b + block]
        if not v.any():
            continue
        rows = vectors.get(ids[b : b + block][v])
        counts = v.sum(1)
        owner = np.repeat(np.arange(len(q)), counts)
        part = np.full(v.shape, -np.inf, np.float32)
        part[v] = np.einsum("ij,ij->i", rows, q[owner]) if len(q) > 1 else rows @ q[0]
        sims[b : b + block] = part
    order = np.argsort(-sims, axis=1, kind="stable")[:, :keep]
    return np.take_along_axis(sims, order, 1), np.take_along_axis(np.where(valid, ids, -1), order, 1)


def ivf_sizes(spec: IndexSpec, dim: int, rows: int, n_train: int) -> tuple[int, int, int]:
    """(nlist, pq_m, pq_nbits) for an IVF-PQ over `rows` rows trained on `n_train` (clamped so training suffices)."""
    nlist = int(spec.nlist) or 2 ** max(4, int(np.log2(max(2.0, float(rows) ** 0.5))))
    nlist = max(1, min(nlist, n_train // 39))
    nbits = max(1, min(int(spec.pq_nbits), int(np.log2(max(2, n_train)))))
    pq_m = int(spec.pq_m) or max(d for d in range(1, max(1, dim // 10) + 1) if dim % d == 0)
    if dim % pq_m:
        raise ConfigError(f"gallery.index.pq_m={pq_m} must divide the embedding dimension {dim} (e.g. {dim // 32 or 1}, or 0 for auto)")
    return nlist, pq_m, nbits


def train_rows(kind: str, spec: IndexSpec, dim: int, rows: int) -> int:
    """How many rows to train a new index of `kind` on (0: no training)."""
    if kind == "hnsw":
        return min(rows, _HNSW_TRAIN_ROWS) if _hnsw_suffix(spec) else 0
    if kind != "ivfpq":
        return 0
    nlist, _, _ = ivf_sizes(spec, dim, rows, rows)
    return min(rows, max(64 * nlist, 256 * 39), _TRAIN_ROWS_MAX)


def _hnsw_suffix(spec: IndexSpec) -> str:
    if spec.hnsw_storage not in _HNSW_STORAGE:
        raise ConfigError(f"gallery.index.hnsw_storage={spec.hnsw_storage!r}: choose {', '.join(_HNSW_STORAGE)}")
    return _HNSW_STORAGE[spec.hnsw_storage]


def _pca_dims(spec: IndexSpec, dim: int, n_train: int) -> int:
    """Dimensions the HNSW walk projects onto (0: none). Only under a re-ranker (sq8/fp16), so answers stay exact,
    and only when fitted on at least as many rows as dimensions and 8 rows per direction kept."""
    pca = int(spec.hnsw_pca)
    if pca < 0:
        raise ConfigError(f"gallery.index.hnsw_pca={pca}: give the dimensions the graph walks (e.g. 256), or 0 for all")
    return pca if 0 < pca < dim and _hnsw_suffix(spec) and n_train >= max(dim, 8 * pca) else 0


def _unwrapped(index: faiss.Index) -> faiss.Index:
    """The index under the gallery's id map (the index itself when it has none)."""
    return faiss.downcast_index(index.index) if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)) else index


def hnsw_of(index: faiss.Index) -> faiss.IndexHNSW | None:
    """The HNSW graph index inside a gallery index (under IDMap2, the exact re-ranker and the walk's projection), or None."""
    inner = _graph_side(index)
    if isinstance(inner, faiss.IndexPreTransform):
        inner = faiss.downcast_index(inner.index)
    return inner if isinstance(inner, faiss.IndexHNSW) else None


def _graph_side(index: faiss.Index) -> faiss.Index:
    """What the exact re-ranker wraps (the graph, or the projection before it); the index itself when it has no re-ranker."""
    inner = _unwrapped(index)
    return faiss.downcast_index(inner.base_index) if isinstance(inner, faiss.IndexRefine) else inner


def train_index(index: faiss.Index, pool: np.ndarray) -> None:
    """Train `index` on `pool`; a projection before an HNSW walk is fitted first on `pool` and its mirror image.

    The mirror makes the sample's mean exactly zero, so Faiss's PCA keeps no offset: it projects onto the
    rows' uncentred principal directions, and inner products keep their order (a centred projection would
    shift each row's score by its dot product with the mean, and miss the rows a query is nearest to).
    """
    side = _graph_side(index)
    if isinstance(side, faiss.IndexPreTransform) and not side.is_trained:
        fit = pool[:_PCA_TRAIN_ROWS]
        for i in range(side.chain.size()):
            side.chain.at(i).train(np.ascontiguousarray(np.concatenate([fit, -fit])))
    index.train(pool)


def make_index(kind: str, spec: IndexSpec, dim: int, rows: int, n_train: int | None = None) -> faiss.Index:
    """A new empty index of `kind` for about `rows` rows, ids given by the gallery (IVF-PQ sized, HNSW's projection
    allowed, for `n_train` training rows)."""
    if kind == "flat":
        return faiss.index_factory(dim, "IDMap2,Flat", faiss.METRIC_INNER_PRODUCT)
    if kind == "hnsw":
        pca = _pca_dims(spec, dim, rows if n_train is None else n_train)
        walk = f"PCA{pca}," if pca else ""
        index = faiss.index_factory(dim, f"IDMap2,{walk}HNSW{int(spec.hnsw_m)}{_hnsw_suffix(spec)}", faiss.METRIC_INNER_PRODUCT)
        hnsw = hnsw_of(index).hnsw
        hnsw.efConstruction = int(spec.ef_construction)
        hnsw.efSearch = int(spec.ef_search)
        return index
    if kind == "ivfpq":
        nlist, pq_m, nbits = ivf_sizes(spec, dim, rows, rows if n_train is None else n_train)
        index = faiss.index_factory(dim, f"IVF{nlist},PQ{pq_m}x{nbits}", faiss.METRIC_INNER_PRODUCT)
        index.do_polysemous_training = False  # the factory's default; unused by search and 50x the training time
        index.nprobe = min(int(spec.nprobe), nlist)
        return index
    raise ConfigError(f"gallery.index.type={kind!r}: choose auto, flat, hnsw or ivfpq")


def kind_of(index: faiss.Index) -> str:
    """The kind (flat / hnsw / ivfpq) of a loaded Faiss index."""
    if hnsw_of(index) is not None:
        return "hnsw"
    return "ivfpq" if isinstance(_unwrapped(index), faiss.IndexIVF) else "flat"


def search_params(index: faiss.Index, kind: str, spec: IndexSpec, n: int,
                  skip: faiss.IDSelector | None = None) -> faiss.SearchParameters | None:
    """Per-call search settings: HNSW beam at least `n` wide, IVF probes, removed rows skipped.

    Under the exact re-ranker the beam's parameters go to the graph inside it, with the removed-row
    selector translated to the graph's own ids (IDMap2 translates only the outer parameters).
    """
    extra = {"sel": skip} if skip is not None else {}
    if kind == "hnsw":
        inner = _unwrapped(index)
        if not isinstance(inner, faiss.IndexRefine):
            return faiss.SearchParametersHNSW(efSearch=max(int(spec.ef_search), n), **extra)
        sel = {"sel": faiss.IDSelectorTranslated(index.id_map, skip)} if skip is not None and inner is not index else extra
        graph = faiss.SearchParametersHNSW(efSearch=max(int(spec.ef_search), n), **sel)  # a projection before the graph passes them on
        params = faiss.IndexRefineSearchParameters(k_factor=1.0, base_index_params=graph)
        params.referenced_objects = [graph, *sel.values()]  # Faiss keeps raw pointers: hold them as long as `params`
        return params
    if kind == "ivfpq":
        return faiss.SearchParametersIVF(nprobe=int(spec.nprobe), **extra)
    return faiss.SearchParameters(**extra) if extra else None
