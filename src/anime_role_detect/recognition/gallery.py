"""Character gallery: a Faiss inner-product index of unit embeddings plus row metadata, saved atomically.

Files: ``gallery.faiss`` (the index, any type) and ``gallery.json`` (embedder id/dim/config, index
spec, one row per vector: character, series, source; checksum of the index file). Each character
keeps several prototypes (all samples, k-means centres, or one mean) and search aggregates rows to
one score per character. A gallery refuses embeddings of another embedder or dimension.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import faiss
import numpy as np
from PIL import Image

from ..errors import ConfigError, GalleryError
from ..fsutil import atomic_write_bytes, atomic_write_json, read_json
from ..log import get_logger

INDEX_FILE = "gallery.faiss"
META_FILE = "gallery.json"
FORMAT_VERSION = 1
_log = get_logger("system")


@dataclass
class IndexSpec:
    """Which Faiss index to build: exact ``flat`` (small), ``hnsw`` (large, fast) or ``ivfpq`` (huge, compressed)."""

    type: str = "flat"
    hnsw_m: int = 32
    ef_search: int = 128
    nlist: int = 256
    pq_m: int = 16
    pq_nbits: int = 8
    nprobe: int = 16


@dataclass
class PrototypeSpec:
    """How a character's images become gallery rows: ``all`` samples, ``kmeans`` centres (``k`` each) or one ``mean``."""

    method: str = "all"
    k: int = 8


@dataclass
class Row:
    """Metadata of one gallery vector."""

    id: int
    character: str
    series: str = ""
    source: str = ""


def _make_index(spec: IndexSpec, dim: int, n_train: int) -> faiss.Index:
    """A new empty index of `spec` (IVF-PQ sizes clamped so the training sample suffices)."""
    if spec.type == "flat":
        return faiss.index_factory(dim, "IDMap2,Flat", faiss.METRIC_INNER_PRODUCT)
    if spec.type == "hnsw":
        index = faiss.index_factory(dim, f"IDMap2,HNSW{int(spec.hnsw_m)}", faiss.METRIC_INNER_PRODUCT)
        faiss.downcast_index(index.index).hnsw.efSearch = int(spec.ef_search)
        return index
    if spec.type == "ivfpq":
        nlist = max(1, min(int(spec.nlist), n_train // 39))
        nbits = max(1, min(int(spec.pq_nbits), int(np.log2(max(2, n_train)))))
        pq_m = int(spec.pq_m)
        if dim % pq_m:
            raise ConfigError(f"gallery.index.pq_m={pq_m} must divide the embedding dimension {dim} (e.g. {dim // 32 or 1})")
        index = faiss.index_factory(dim, f"IVF{nlist},PQ{pq_m}x{nbits}", faiss.METRIC_INNER_PRODUCT)
        index.nprobe = min(int(spec.nprobe), nlist)
        return index
    raise ConfigError(f"gallery.index.type={spec.type!r}: choose flat, hnsw or ivfpq")


def _prototypes(vectors: np.ndarray, spec: PrototypeSpec, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """A character's sample vectors -> its prototype rows and a label per row (which samples it stands for)."""
    if spec.method == "all" or len(vectors) <= 1:
        return vectors, [""] * len(vectors)
    if spec.method == "mean":
        m = vectors.mean(0, keepdims=True)
        return m / max(float(np.linalg.norm(m)), 1e-12), [f"mean of {len(vectors)}"]
    if spec.method == "kmeans":
        k = max(1, min(int(spec.k), len(vectors)))
        if k == len(vectors):
            return vectors, [""] * len(vectors)
        km = faiss.Kmeans(vectors.shape[1], k, niter=20, seed=seed, spherical=True, verbose=False, min_points_per_centroid=1)
        km.train(np.ascontiguousarray(vectors, dtype=np.float32))
        _, assign = km.index.search(np.ascontiguousarray(vectors, dtype=np.float32), 1)
        counts = np.bincount(assign[:, 0], minlength=k)
        keep = counts > 0
        c = km.centroids[keep]
        c = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
        return c.astype(np.float32), [f"kmeans centre of {n}" for n in counts[keep]]
    raise ConfigError(f"gallery.prototypes.method={spec.method!r}: choose all, kmeans or mean")


class Gallery:
    """Faiss index + metadata for known characters; one embedder per gallery."""

    def __init__(self, embedder_id: str, dim: int, embedder_config: Mapping[str, Any] | None = None,
                 index: IndexSpec | Mapping[str, Any] | None = None, prototypes: PrototypeSpec | Mapping[str, Any] | None = None,
                 aggregate: str = "max") -> None:
        self.embedder_id = str(embedder_id)
        self.dim = int(dim)
        self.embedder_config = dict(embedder_config or {})
        self.index_spec = index if isinstance(index, IndexSpec) else IndexSpec(**dict(index or {}))
        self.prototype_spec = prototypes if isinstance(prototypes, PrototypeSpec) else PrototypeSpec(**dict(prototypes or {}))
        if aggregate not in AGGREGATORS:
            raise ConfigError(f"gallery.aggregate={aggregate!r}: choose one of {sorted(AGGREGATORS)}")
        self.aggregate = aggregate
        self.rows: dict[int, Row] = {}
        self.next_id = 0
        self.index: faiss.Index | None = None
        self._chars: tuple[int, int, list[dict]] | None = None

    # -- compatibility ------------------------------------------------------------------------
    def check_embedder(self, embedder_id: str, dim: int, where: str = "this gallery") -> None:
        """Raise `GalleryError` unless vectors come from the embedder the gallery was built with."""
        if int(dim) != self.dim or embedder_id != self.embedder_id:
            raise GalleryError(
                f"{where} was built with embedder {self.embedder_id} (dim {self.dim}) but got {embedder_id} (dim {dim}); "
                "rebuild it with `python -m anime_role_detect.recognition.gallery_cli build` or configure the same embedder"
            )

    # -- building -----------------------------------------------------------------------------
    @classmethod
    def build(cls, items: Iterable[tuple[str, str, Image.Image | Callable[[], Image.Image], str]], embedder: Any,
              index: IndexSpec | Mapping[str, Any] | None = None, prototypes: PrototypeSpec | Mapping[str, Any] | None = None,
              aggregate: str = "max", embedder_config: Mapping[str, Any] | None = None,
              progress: Callable[[int, int], None] | None = None) -> "Gallery":
        """Gallery from ``(character, series, image or loader, source)`` items, embedded in batches per character."""
        by_char: dict[str, list[tuple[str, Any, str]]] = defaultdict(list)
        for character, series, img, source in items:
            by_char[character].append((series, img, source))
        if not by_char:
            raise GalleryError("no images to build a gallery from; give a dataset folder with <character>/<image> files")
        g = cls(embedder.model_id, embedder.dim, embedder_config, index, prototypes, aggregate)
        total = sum(len(v) for v in by_char.values())
        done = 0
        vecs: list[np.ndarray] = []
        meta: list[tuple[str, str, str]] = []
        bs = max(1, int(getattr(embedder, "batch_size", 32)))
        for character in sorted(by_char):
            entries = by_char[character]
            emb = []
            kept: list[tuple[str, Any, str]] = []
            for i in range(0, len(entries), bs):
                chunk = [(s, im() if callable(im) else im, src) for s, im, src in entries[i : i + bs]]
                chunk = [c for c in chunk if c[1] is not None]  # a loader returns None for an unreadable file
                if chunk:
                    emb.append(embedder.embed([im for _, im, _ in chunk]))
                    kept.extend(chunk)
                done += len(entries[i : i + bs])
                if progress:
                    progress(done, total)
            if not emb:
                continue
            e = np.concatenate(emb)
            protos, labels = _prototypes(e, g.prototype_spec)
            series = next((s for s, _, _ in kept if s), "")
            for j, lab in enumerate(labels):
                meta.append((character, series, lab or kept[j][2]))
            vecs.append(protos)
        if not vecs:
            raise GalleryError("none of the images could be read; check the dataset folder")
        g._add_rows(np.concatenate(vecs), meta)
        return g

    def _add_rows(self, vectors: np.ndarray, meta: Sequence[tuple[str, str, str]]) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise GalleryError(f"embeddings of shape {vectors.shape} do not fit this gallery (dim {self.dim}); use the gallery's embedder {self.embedder_id}")
        if self.index is None:
            self.index = _make_index(self.index_spec, self.dim, len(vectors))
        if not self.index.is_trained:
            self.index.train(vectors)
        ids = np.arange(self.next_id, self.next_id + len(vectors), dtype=np.int64)
        self.index.add_with_ids(vectors, ids)
        for i, (c, s, src) in zip(ids.tolist(), meta):
            self.rows[i] = Row(i, c, s, src)
        self.next_id += len(vectors)

    def add(self, character: str, series: str, embeddings: np.ndarray, sources: Sequence[str] | None = None,
            embedder_id: str | None = None) -> int:
        """Enroll `character` from its sample embeddings (prototypes per the gallery's spec); returns rows added."""
        if not character or not character.strip():
            raise GalleryError("character name is empty; give the name to enroll")
        embeddings = np.asarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2 or len(embeddings) == 0:
            raise GalleryError(f"no embeddings given for {character!r}; enroll at least one image")
        if embedder_id is not None or embeddings.shape[1] != self.dim:
            self.check_embedder(embedder_id or "<unknown>", embeddings.shape[1], "the gallery")
        protos, labels = _prototypes(embeddings, self.prototype_spec)
        srcs = list(sources or [""] * len(embeddings))
        meta = [(character, series, lab or (srcs[j] if j < len(srcs) else "")) for j, lab in enumerate(labels)]
        self._add_rows(protos, meta)
        return len(protos)

    def remove(self, character: str) -> int:
        """Delete every row of `character`; returns how many were removed (0 if unknown)."""
        ids = np.array([i for i, r in self.rows.items() if r.character == character], dtype=np.int64)
        if len(ids) == 0 or self.index is None:
            return 0
        try:
            self.index.remove_ids(ids)
        except RuntimeError:  # HNSW cannot delete: rebuild from the stored vectors
            keep = np.array(sorted(set(self.rows) - set(ids.tolist())), dtype=np.int64)
            vecs = np.stack([self.index.reconstruct(int(i)) for i in keep]) if len(keep) else np.zeros((0, self.dim), np.float32)
            self.index = _make_index(self.index_spec, self.dim, len(keep))
            if len(keep):
                self.index.add_with_ids(vecs, keep)
        for i in ids.tolist():
            del self.rows[i]
        return len(ids)

    # -- querying -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.rows)

    def _char_cache(self) -> list[dict]:
        if self._chars is None or self._chars[0] != self.next_id or self._chars[1] != len(self.rows):
            self._chars = (self.next_id, len(self.rows), self._characters())
        return self._chars[2]

    def characters(self) -> list[dict]:
        """``[{name, series, prototypes}]`` sorted by name."""
        return [dict(c) for c in self._char_cache()]

    def _characters(self) -> list[dict]:
        out: dict[str, dict] = {}
        for r in self.rows.values():
            d = out.setdefault(r.character, {"name": r.character, "series": r.series, "prototypes": 0})
            d["prototypes"] += 1
        return [out[k] for k in sorted(out)]

    def series_of(self) -> dict[str, str]:
        """character -> series."""
        return {c["name"]: c["series"] for c in self._char_cache()}

    def search(self, queries: np.ndarray, k: int = 5) -> list[list[tuple[str, str, float]]]:
        """Best `k` characters per query as ``(character, series, cosine score)``, best first."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if queries.shape[1] != self.dim:
            raise GalleryError(f"query dimension {queries.shape[1]} does not match the gallery's {self.dim} (embedder {self.embedder_id})")
        if not self.rows or self.index is None:
            return [[] for _ in range(len(queries))]
        per_char = max(1, max(d["prototypes"] for d in self._char_cache()))
        n = min(len(self.rows), max(64, k * min(per_char, 64)))
        scores, ids = self.index.search(queries, n)
        agg = AGGREGATORS[self.aggregate]
        series = self.series_of()
        out = []
        for srow, irow in zip(scores, ids):
            hits: dict[str, list[float]] = defaultdict(list)
            for s, i in zip(srow.tolist(), irow.tolist()):
                if i >= 0 and i in self.rows:
                    hits[self.rows[i].character].append(s)
            ranked = sorted(((c, agg(v)) for c, v in hits.items()), key=lambda t: -t[1])[:k]
            out.append([(c, series.get(c, ""), float(s)) for c, s in ranked])
        return out

    # -- persistence --------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write ``gallery.faiss`` then ``gallery.json`` (each write-then-rename; the json checks the index's hash)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        index = self.index if self.index is not None else _make_index(IndexSpec("flat"), self.dim, 0)
        blob = faiss.serialize_index(index).tobytes()
        atomic_write_bytes(d / INDEX_FILE, blob)
        atomic_write_json(d / META_FILE, {
            "format": FORMAT_VERSION,
            "embedder": {"id": self.embedder_id, "dim": self.dim, "config": self.embedder_config},
            "index": asdict(self.index_spec),
            "prototypes": asdict(self.prototype_spec),
            "aggregate": self.aggregate,
            "index_sha256": hashlib.sha256(blob).hexdigest(),
            "next_id": self.next_id,
            "characters": self.characters(),
            "rows": [asdict(r) for r in sorted(self.rows.values(), key=lambda r: r.id)],
        })
        return d

    @classmethod
    def load(cls, directory: str | Path, embedder_id: str | None = None, dim: int | None = None) -> "Gallery":
        """Read a saved gallery; with `embedder_id`/`dim` given, refuse one built by another embedder."""
        d = Path(directory)
        meta_p, index_p = d / META_FILE, d / INDEX_FILE
        if not meta_p.is_file() or not index_p.is_file():
            raise GalleryError(f"no gallery in {d} ({META_FILE} + {INDEX_FILE} expected); build one with `python -m anime_role_detect.recognition.gallery_cli build`")
        try:
            meta = read_json(meta_p)
            emb = meta["embedder"]
            blob = index_p.read_bytes()
        except (ValueError, KeyError, TypeError) as exc:
            raise GalleryError(f"{meta_p} is corrupt ({exc}); rebuild the gallery") from None
        if meta.get("index_sha256") and hashlib.sha256(blob).hexdigest() != meta["index_sha256"]:
            raise GalleryError(f"{index_p} does not match {meta_p} (interrupted save or edited file); rebuild the gallery")
        try:
            index = faiss.deserialize_index(np.frombuffer(blob, dtype=np.uint8))
        except RuntimeError as exc:
            raise GalleryError(f"{index_p} is not a readable Faiss index ({str(exc).splitlines()[0][:120]}); rebuild the gallery") from None
        g = cls(emb["id"], int(emb["dim"]), emb.get("config"), meta.get("index"), meta.get("prototypes"), meta.get("aggregate", "max"))
        if embedder_id is not None or dim is not None:
            g.check_embedder(embedder_id or g.embedder_id, dim if dim is not None else g.dim, f"gallery {d}")
        g.index = index  # deserialize_index already returns the concrete type; re-downcasting would drop the owning wrapper
        g.rows = {int(r["id"]): Row(int(r["id"]), r["character"], r.get("series", ""), r.get("source", "")) for r in meta["rows"]}
        g.next_id = int(meta.get("next_id", max(g.rows, default=-1) + 1))
        if index.ntotal != len(g.rows):
            raise GalleryError(f"{index_p} holds {index.ntotal} vectors but {meta_p} lists {len(g.rows)} rows; rebuild the gallery")
        if g.index_spec.type == "hnsw":
            faiss.downcast_index(index.index).hnsw.efSearch = int(g.index_spec.ef_search)
        return g


def _topm_mean(scores: list[float], m: int = 3) -> float:
    top = sorted(scores, reverse=True)[:m]
    return float(sum(top) / len(top))


#: Row scores of one character -> its score.
AGGREGATORS: dict[str, Callable[[list[float]], float]] = {
    "max": lambda s: float(max(s)),
    "top3_mean": _topm_mean,
    "top5_mean": lambda s: _topm_mean(s, 5),
}
