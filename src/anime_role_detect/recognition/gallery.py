"""Character gallery: a Faiss inner-product index of unit embeddings plus row metadata, saved atomically.

Files: ``gallery.faiss`` (the index, any kind), ``gallery.rows.npz`` (per row id: character,
series, source, as columns: `RowTable`) and ``gallery.json`` (embedder id/dim/config, index spec and
built kind, characters, HNSW tombstones, checksums of the index and row files), written in that
order. Each character keeps several prototypes (all samples, k-means centres, or one mean) and
search aggregates rows to one score per character. A gallery refuses embeddings of
another embedder or dimension.

Index kinds (`KIND_ORDER`): exact ``flat``, graph ``hnsw`` (walks 8-bit codes, re-ranks on the exact
vectors it keeps; fast), compressed ``ivfpq`` (128-byte codes in memory, for galleries that do not fit
in it; the rows the codes fetch are re-ranked on half-precision vectors kept in ``gallery.vectors``,
memory-mapped, `VectorFile`). ``auto`` picks by row count
(`IndexSpec.flat_below`, `hnsw_below`) and moves a growing gallery up a kind, rebuilt from its
stored vectors. How each kind is built, trained and searched lives in `faiss_index`, how rows become a character's
score in `aggregate`, the files' bytes and checks in `gallery_files`; this module owns the rows and applies the rest.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import faiss
import numpy as np
from PIL import Image

from ..errors import ConfigError, GalleryError
from ..fsutil import atomic_write_json
from ..log import get_logger
from .aggregate import (
    AGGREGATE_DEPTH,
    AGGREGATES,
    BALANCED_TOP,
    DEFAULT_AGGREGATE,
    PrototypeSpec,
    prototype_rows,
    topm_mean,
)
from .faiss_index import (
    KIND_ORDER,
    IndexSpec,
    hnsw_of,
    keeps_vector_file,
    kind_of,
    make_index,
    rerank_on_vectors,
    resolve_kind,
    search_params,
    train_index,
    train_rows,
)
from .gallery_files import (
    FORMAT_VERSION,
    INDEX_FILE,
    META_FILE,
    read_index,
    read_meta,
    read_rows,
    write_index,
)
from .rows import FILE as ROWS_FILE
from .rows import RowTable
from .vector_file import VectorFile

_log = get_logger("system")


#: Kinds that keep every vector exactly (exact re-scoring, rebuilds and migrations read them back).
_EXACT_KINDS = frozenset({"flat", "hnsw"})
#: A row this close to a query is the query's own picture (or a byte-identical copy of it): `scores_without_copies`.
COPY_COSINE = 0.9999
_RESCORE_ROWS_MAX = 8192


@dataclass
class _DepthMemo:
    """`Gallery._rank`'s depths for one gallery state (`key`: its version and aggregate), so `balanced`'s per-character
    depths are not worked out again every query."""

    key: tuple[int, str]
    needed: dict[str, int] = field(default_factory=dict)  # character -> min(depth, row count): rows its score averages
    deepest: int | None = None  # the deepest character's depth (how many rows a query fetches per character)


class Gallery:
    """Faiss index + metadata for known characters; one embedder per gallery."""

    def __init__(self, embedder_id: str, dim: int, embedder_config: Mapping[str, Any] | None = None,
                 index: IndexSpec | Mapping[str, Any] | None = None, prototypes: PrototypeSpec | Mapping[str, Any] | None = None,
                 aggregate: str = DEFAULT_AGGREGATE) -> None:
        self.embedder_id = str(embedder_id)
        self.dim = int(dim)
        self.embedder_config = dict(embedder_config or {})
        self.index_spec = index if isinstance(index, IndexSpec) else _index_spec(index)
        resolve_kind(self.index_spec, 0)  # a bad type is a ConfigError now, not at the first add
        keeps_vector_file("ivfpq", self.index_spec)
        self.prototype_spec = prototypes if isinstance(prototypes, PrototypeSpec) else PrototypeSpec(**dict(prototypes or {}))
        if aggregate not in AGGREGATES:
            raise ConfigError(f"gallery.aggregate={aggregate!r}: choose one of {sorted(AGGREGATES)}")
        self.aggregate = aggregate
        self.reference_rows: int | None = None  # `balanced`: n_ref, fixed at build (None: the smallest character's now)
        self.depths: dict[str, int] = {}  # `balanced`: depth per character, fixed at build (others: from their rows now)
        self.rows = RowTable()  # row id -> character, series, source (columns; `Row` objects on demand)
        self.index: faiss.Index | None = None
        self.vectors: VectorFile | None = None  # IVF-PQ: every row's vector, by id (the codes alone lose the order of near rows)
        self.spill_dir: str | Path | None = None  # where a big build's vector file waits until saved (best: the folder it is saved to)
        self.kind: str | None = None  # the built index's kind (flat / hnsw / ivfpq); `index_spec.type` may say auto
        self.tombstones: set[int] = set()  # ids still in an HNSW index whose rows were removed
        self._version = 0
        self._chars: tuple[int, list[dict]] | None = None
        self._counts: tuple[int, int, int] | None = None
        self._memo: _DepthMemo | None = None  # `_rank`'s depths, until the gallery or its aggregate changes
        self._skip: tuple[int, faiss.IDSelector | None, Any] | None = None

    # -- compatibility ------------------------------------------------------------------------
    def check_embedder(self, embedder_id: str, dim: int, where: str = "this gallery") -> None:
        """Raise `GalleryError` unless vectors come from the embedder the gallery was built with."""
        if int(dim) != self.dim or embedder_id != self.embedder_id:
            raise GalleryError(
                f"{where} was built with embedder {self.embedder_id} (dim {self.dim}) but got {embedder_id} (dim {dim}); "
                "rebuild it with `ard-gallery build` or configure the same embedder"
            )

    # -- building -----------------------------------------------------------------------------
    @classmethod
    def build(cls, items: Iterable[tuple[str, str, Image.Image | Callable[[], Image.Image], str]], embedder: Any,
              index: IndexSpec | Mapping[str, Any] | None = None, prototypes: PrototypeSpec | Mapping[str, Any] | None = None,
              aggregate: str = DEFAULT_AGGREGATE, embedder_config: Mapping[str, Any] | None = None,
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
            protos, labels = prototype_rows(e, g.prototype_spec)
            series = next((s for s, _, _ in kept if s), "")
            for j, lab in enumerate(labels):
                meta.append((character, series, lab or kept[j][2]))
            vecs.append(protos)
        if not vecs:
            raise GalleryError("none of the images could be read; check the dataset folder")
        g._add_rows(np.concatenate(vecs), meta)
        g.fix_reference()
        return g

    def add_rows(self, vectors: np.ndarray, characters: Sequence[str], series: Sequence[str] | None = None,
                 sources: Sequence[str] | None = None, expected_rows: int | None = None,
                 train_sample: np.ndarray | None = None) -> None:
        """Add one row per vector as is (no prototypes): the bulk path for big galleries built in chunks.

        `expected_rows` (the gallery's size once every chunk is in) sizes a new index and its `auto`
        kind, so the first chunk of a million-row build does not start as a small flat index;
        `train_sample` (rows drawn from the whole gallery) trains it instead of the first chunk, which
        may hold only the first few characters.
        """
        if len(characters) != len(vectors):
            raise GalleryError(f"{len(vectors)} vectors but {len(characters)} character names; give one name per vector")
        if any(not c or not str(c).strip() for c in characters):
            raise GalleryError("a character name is empty; give the name of every row")
        ser = list(series) if series is not None else [""] * len(vectors)
        src = list(sources) if sources is not None else [""] * len(vectors)
        self._add_rows(np.asarray(vectors, dtype=np.float32), list(zip(characters, ser, src)), expected_rows, train_sample)

    def _add_rows(self, vectors: np.ndarray, meta: Sequence[tuple[str, str, str]], expected_rows: int | None = None,
                  train_sample: np.ndarray | None = None) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise GalleryError(f"embeddings of shape {vectors.shape} do not fit this gallery (dim {self.dim}); use the gallery's embedder {self.embedder_id}")
        if len(vectors) == 0:
            return
        rows = max(len(self.rows) + len(vectors), int(expected_rows or 0))
        want = resolve_kind(self.index_spec, rows)
        if self.index is None:
            self.index, self.kind = self._new_index(want, rows, [vectors if train_sample is None else train_sample]), want
            if keeps_vector_file(want, self.index_spec):
                self.vectors = VectorFile(self.dim, spill_dir=self.spill_dir)
        elif KIND_ORDER.index(want) > KIND_ORDER.index(self.kind or "flat"):
            _log.info(f"gallery grows to {rows} rows: moving its index from {self.kind} to {want}")
            self._rebuild(want, rows, extra=vectors)
        ids = np.arange(self.next_id, self.next_id + len(vectors), dtype=np.int64)
        self.index.add_with_ids(vectors, ids)
        if self.vectors is not None:
            self.vectors.append(vectors)
        self.rows.add(self.next_id, meta)
        self._version += 1

    def _new_index(self, kind: str, rows: int, samples: Sequence[np.ndarray]) -> faiss.Index:
        """An empty index of `kind` for `rows` rows, trained (IVF-PQ) on a random sample of `samples`."""
        need = train_rows(kind, self.index_spec, self.dim, rows)
        if need == 0:
            return make_index(kind, self.index_spec, self.dim, rows)
        pool = np.concatenate([np.asarray(s, np.float32) for s in samples])
        if len(pool) > need:
            pool = pool[np.sort(np.random.default_rng(0).choice(len(pool), need, replace=False))]
        index = make_index(kind, self.index_spec, self.dim, rows, n_train=len(pool))
        train_index(index, np.ascontiguousarray(pool))
        return index

    def _live_ids(self) -> np.ndarray:
        return self.rows.live_ids()

    def _has_vectors(self) -> bool:
        return self.kind in _EXACT_KINDS or self.vectors is not None

    def _vectors(self, ids: np.ndarray) -> np.ndarray:
        """Stored vectors of row `ids` (exact for flat/HNSW; IVF-PQ: half precision, from its vector file)."""
        if self.kind not in _EXACT_KINDS:
            if self.vectors is not None:
                return self.vectors.get(ids)
            raise GalleryError(f"a {self.kind} index keeps compressed codes, not vectors; rebuild the gallery from its images")
        return self.index.reconstruct_batch(np.ascontiguousarray(ids, dtype=np.int64)) if len(ids) else np.zeros((0, self.dim), np.float32)

    def live_rows(self) -> tuple[np.ndarray, list[str], list[str]]:
        """Every live row's vector, character and source, in id order (what a build fits on its rows)."""
        ids = self._live_ids()
        rows = [self.rows[int(i)] for i in ids]
        return self._vectors(ids), [r.character for r in rows], [r.source for r in rows]

    def _rebuild(self, kind: str, rows: int, extra: np.ndarray | None = None, chunk: int = 65_536) -> None:
        """Replace the index by a fresh one of `kind` holding the live rows (read back from the stored vectors)."""
        live = self._live_ids()
        rng = np.random.default_rng(0)
        need = train_rows(kind, self.index_spec, self.dim, rows)
        sample_ids = np.sort(rng.choice(live, min(need, len(live)), replace=False)) if need else live[:0]
        samples = [self._vectors(sample_ids)] + ([extra] if extra is not None else [])
        new = self._new_index(kind, rows, samples)
        store = VectorFile(self.dim, spill_dir=self.spill_dir) if keeps_vector_file(kind, self.index_spec) else None
        for start in range(0, self.next_id, chunk):  # each live row read back once, for the new index and its vector file
            ids = np.arange(start, min(start + chunk, self.next_id), dtype=np.int64)
            alive = self.rows.owner[ids] >= 0
            vecs = self._vectors(ids[alive])
            if len(vecs):
                new.add_with_ids(vecs, ids[alive])
            if store is not None:  # row i = id i: a removed row's vector is zeros
                part = np.zeros((len(ids), self.dim), np.float32)
                part[alive] = vecs
                store.append(part)
        self.index, self.kind, self.vectors = new, kind, store
        self.tombstones.clear()
        self._skip = None

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
        protos, labels = prototype_rows(embeddings, self.prototype_spec)
        srcs = list(sources or [""] * len(embeddings))
        meta = [(character, series, lab or (srcs[j] if j < len(srcs) else "")) for j, lab in enumerate(labels)]
        self._add_rows(protos, meta)
        return len(protos)

    def remove(self, character: str) -> int:
        """Delete every row of `character`; returns how many were removed (0 if unknown).

        Flat and IVF-PQ delete in place. HNSW cannot delete: the rows become tombstones that every
        search skips, and the graph is rebuilt from its stored vectors once they pass
        `index.rebuild_fraction` of it.
        """
        if character not in self.rows.members or self.index is None:
            return 0
        ids = self.rows.remove(character)
        self.depths.pop(character, None)
        self._version += 1
        if self.kind == "hnsw":
            self.tombstones.update(ids.tolist())
            self._skip = None
            if len(self.tombstones) > float(self.index_spec.rebuild_fraction) * self.index.ntotal:
                kind = resolve_kind(self.index_spec, len(self.rows)) if self.index_spec.type == "auto" else self.kind
                self._rebuild(kind, len(self.rows))
        else:
            self.index.remove_ids(ids)
        return len(ids)

    # -- querying -----------------------------------------------------------------------------
    @property
    def next_id(self) -> int:
        """The id the next row gets (ids are never reused: removed rows keep theirs)."""
        return self.rows.next_id

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def n_characters(self) -> int:
        """How many characters have rows (cheap: no list is built)."""
        return len(self.rows.members)

    def _char_cache(self) -> list[dict]:
        if self._chars is None or self._chars[0] != self._version:
            chars = [{"name": c, "series": self.rows.series.get(c, ""), "prototypes": len(ids)} for c, ids in self.rows.members.items()]
            self._chars = (self._version, sorted(chars, key=lambda d: d["name"]))
        return self._chars[1]

    def characters(self) -> list[dict]:
        """``[{name, series, prototypes}]`` sorted by name."""
        return [dict(c) for c in self._char_cache()]

    def series_of(self) -> dict[str, str]:
        """character -> series."""
        return dict(self.rows.series)

    def _skip_selector(self) -> faiss.IDSelector | None:
        """A cached selector that hides HNSW tombstones from searches (None when there are none)."""
        if not self.tombstones:
            return None
        if self._skip is None or self._skip[0] != len(self.tombstones):
            batch = faiss.IDSelectorBatch(np.fromiter(self.tombstones, dtype=np.int64, count=len(self.tombstones)))
            self._skip = (len(self.tombstones), faiss.IDSelectorNot(batch), batch)  # keep `batch` alive with its wrapper
        return self._skip[1]

    def depth(self, character: str | None = None) -> int:
        """How many of `character`'s best rows its score averages (none given: the deepest character's)."""
        fixed = AGGREGATE_DEPTH.get(self.aggregate)
        if fixed is not None:
            return fixed
        if character is not None:
            return self.depths.get(character) or self._balanced_depth(len(self.rows.members[character]))
        memo = self._depth_memo()  # the deepest character's, once per gallery state (not a pass over every depth per query)
        if memo.deepest is None:
            memo.deepest = max(self._balanced_depth(self._row_count_range()[1]), max(self.depths.values(), default=1))
        return memo.deepest

    def _balanced_depth(self, n: int) -> int:
        """`balanced`'s depth for a character of `n` rows: ``max(1, round(3 n / n_ref))``."""
        return max(1, round(BALANCED_TOP * n / max(1, self.reference_rows or self._row_count_range()[0])))

    def fix_reference(self) -> None:
        """Fix `balanced`'s n_ref (the smallest character's row count, once) and the depth of every character now in the
        gallery: enrolling moves no other score, and rows added later to a character do not deepen it."""
        if not self.rows:
            return
        if self.reference_rows is None:
            self.reference_rows = self._row_count_range()[0]
        for c, ids in self.rows.members.items():  # whatever `aggregate` says now: the depths are `balanced`'s
            if c not in self.depths:
                self.depths[c] = self._balanced_depth(len(ids))
        self._version += 1  # scores may change: `_rank`'s memo starts again

    def _row_count_range(self) -> tuple[int, int]:
        """(fewest, most) rows of one character, cached until the gallery changes."""
        if self._counts is None or self._counts[0] != self._version:
            sizes = [c["prototypes"] for c in self._char_cache()] or [1]
            self._counts = (self._version, min(sizes), max(sizes))
        return self._counts[1], self._counts[2]

    def _rows_per_query(self, k: int) -> int:
        """How many nearest rows to fetch for `k` characters: all that matter for exact flat, `search_rows` otherwise."""
        depth = min(self.depth(), 64)  # `balanced`: deeper characters are re-scored on all their rows
        if self.kind == "flat":
            per_char = max((c["prototypes"] for c in self._char_cache()), default=1)
            n = max(64, k * min(per_char, 64), k * depth)
        else:
            n = min(max(int(self.index_spec.search_rows), k * depth), 8 * max(int(self.index_spec.search_rows), depth))
        return max(1, min(len(self.rows), n))

    def search(self, queries: np.ndarray, k: int = 5) -> list[list[tuple[str, str, float]]]:
        """Best `k` characters per query as ``(character, series, score)``, best first.

        A character's score aggregates its best rows (`aggregate`). Rows are found by the index; a
        character with fewer of its rows among them than the aggregate needs is re-scored on all
        its stored rows (flat, HNSW), so its score is the exact one, not inflated by missing rows
        (IVF-PQ stores no vectors: missing rows count as the weakest row fetched, an upper bound).
        Approximate indexes look at `index.search_rows` rows, so they may name fewer than `k`, and
        re-score only the best `index.exact_top` characters: the others' scores are upper bounds from
        the fetched rows (re-scoring every one of `k` characters costs 3-4x the search at 1M rows).
        """
        queries = self._queries(queries)
        if not self.rows or self.index is None:
            return [[] for _ in range(len(queries))]
        n = self._rows_per_query(k)
        scores, ids = self._fetch_rows(queries, n)
        return [self._rank(q, s, i, k, n) for q, s, i in zip(queries, scores, ids)]

    def nearest_rows(self, queries: np.ndarray, k: int = 1) -> list[list[tuple[str, float]]]:
        """Each query's `k` most similar stored rows as ``(character, cosine)``, best first (approximate kinds: the
        index's rows). Near-duplicate checks compare against these, not against a character's aggregate score."""
        queries = self._queries(queries)
        if not self.rows or self.index is None:
            return [[] for _ in range(len(queries))]
        scores, ids = self._fetch_rows(queries, max(1, min(len(self.rows), k + 8)))  # slack for rows removed since
        out = []
        for s, i in zip(scores, ids):
            owners = self.rows.owner[i[i >= 0]]
            live = [(self.rows.names[c], float(v)) for c, v in zip(owners.tolist(), s[i >= 0].tolist()) if c >= 0]
            out.append(live[:k])
        return out

    def _queries(self, queries: np.ndarray) -> np.ndarray:
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if queries.shape[1] != self.dim:
            raise GalleryError(f"query dimension {queries.shape[1]} does not match the gallery's {self.dim} (embedder {self.embedder_id})")
        return queries

    def _fetch_rows(self, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The index's best `n` rows per query as (cosines, ids), best first (IVF-PQ: re-ranked on the stored vectors)."""
        fetch = n if self.vectors is None else min(len(self.rows), n * max(1, int(self.index_spec.refine_factor)))
        params = search_params(self.index, self.kind or "flat", self.index_spec, fetch, self._skip_selector())
        scores, ids = self.index.search(queries, fetch, params=params) if params is not None else self.index.search(queries, fetch)
        if self.vectors is not None:  # IVF-PQ codes fetched the rows; their order comes from the vectors
            scores, ids = rerank_on_vectors(self.vectors, queries, ids, n)
        return scores, ids

    def _rank(self, query: np.ndarray, scores: np.ndarray, ids: np.ndarray, k: int, n: int) -> list[tuple[str, str, float]]:
        """One query's fetched rows -> its top `k` characters, the best `exact_top` (flat: all) with exact scores."""
        keep = ids >= 0
        ids, scores = ids[keep], scores[keep]
        codes = self.rows.owner[ids]
        live = codes >= 0
        codes, scores = codes[live], scores[live].tolist()
        depth = AGGREGATE_DEPTH.get(self.aggregate, 0)
        coded = self.vectors is not None  # IVF-PQ codes chose the rows: a character's best may be missing
        if depth == 1 and not coded:  # `max`: rows come best first, so each character's first row is its score (no re-scoring)
            best: dict[int, float] = {}
            for c, s in zip(codes.tolist(), scores):
                if c not in best:
                    best[c] = s
                    if len(best) == k:
                        break
            names, series = self.rows.names, self.rows.series
            return [(names[c], series.get(names[c], ""), float(s)) for c, s in best.items()]
        floor = scores[-1] if (scores and n < len(self.rows)) else float("-inf")
        hits: dict[int, list[float]] = {}
        for c, s in zip(codes.tolist(), scores):
            hits.setdefault(c, []).append(s)
        entries: list[tuple[float, str, bool]] = []
        needs = self._depth_memo().needed
        for c, ss in hits.items():
            name = self.rows.names[c]
            need = needs.get(name)
            if need is None:
                need = needs[name] = min(self.depth(name), len(self.rows.members[name]))
            exact = len(ss) >= need and not coded
            entries.append((-topm_mean(ss if exact else ss + [floor] * (need - len(ss)), need), name, exact))
        sure = k if self.kind == "flat" else max(1, min(k, int(self.index_spec.exact_top)))
        while True:  # re-score the bounded characters among the best `sure` until those are all exact
            head = heapq.nsmallest(k, entries)
            stale = [name for _, name, exact in head[:sure] if not exact and self._rescorable(name)]
            if not stale:
                return [(name, self.rows.series.get(name, ""), float(-neg)) for neg, name, _ in head]
            fixed = self._exact_scores(query, stale)
            entries = [(-fixed[e[1]], e[1], True) if e[1] in fixed else e for e in entries]

    def _depth_memo(self) -> _DepthMemo:
        """The memo of depths for the gallery as it is now (rows, n_ref, depths: `_version`) and its aggregate."""
        key = (self._version, self.aggregate)
        if self._memo is None or self._memo.key != key:
            self._memo = _DepthMemo(key)
        return self._memo

    def _rescorable(self, name: str) -> bool:
        return self._has_vectors() and len(self.rows.members[name]) <= _RESCORE_ROWS_MAX

    def scores_without_copies(self, query: np.ndarray, names: Sequence[str], copy_cosine: float = COPY_COSINE) -> dict[str, float]:
        """Each of `names`' aggregate over its stored rows, leaving out rows at cosine >= `copy_cosine` to `query` (the
        query's own row and exact copies of it): how a gallery that holds a picture scores that picture as if it did not,
        e.g. a version's held-out pictures after they joined it (`build.refit_gallery_weight`). A character left with no
        row scores -1; a gallery that keeps no vectors (IVF-PQ codes alone) cannot leave rows out and returns nothing."""
        query = self._queries(query)[0]
        names = [n for n in names if n in self.rows.members]
        return self._exact_scores(query, names, below=float(copy_cosine)) if names and self._has_vectors() else {}

    def _exact_scores(self, query: np.ndarray, names: Sequence[str], below: float | None = None) -> dict[str, float]:
        """Each character's aggregate over all its stored rows (what an exhaustive search gives), read in few batches;
        rows at cosine >= `below` left out when given."""
        out: dict[str, float] = {}
        batch: list[str] = []
        members = self.rows.members
        for i, name in enumerate(names):
            batch.append(name)
            if i + 1 < len(names) and sum(len(members[b]) for b in batch) + len(members[names[i + 1]]) <= _RESCORE_ROWS_MAX:
                continue
            sizes = [len(members[b]) for b in batch]
            sims = self._vectors(np.concatenate([self.rows.member_ids(b) for b in batch])) @ query
            for b, part in zip(batch, np.split(sims, np.cumsum(sizes)[:-1])):
                if below is not None:
                    part = part[part < below]
                    if not len(part):
                        out[b] = -1.0
                        continue
                depth = self.depth(b)
                top = part if len(part) <= depth else np.partition(part, len(part) - depth)[-depth:]
                out[b] = topm_mean(top.tolist(), depth)
            batch = []
        return out

    # -- persistence --------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write the vectors, ``gallery.faiss``, ``gallery.rows.npz``, then ``gallery.json`` (each write-then-rename;
        the json, written last, checks the index's and the rows' hashes)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        index = self.index if self.index is not None else make_index("flat", self.index_spec, self.dim, 0)
        vectors = self.vectors.save(d) if self.vectors is not None else None  # first: the json written last names it
        index_sha256 = write_index(index, d / INDEX_FILE)
        _, rows_sha256 = self.rows.save(d)
        rows = {"file": ROWS_FILE, "rows": len(self.rows), "sha256": rows_sha256}
        atomic_write_json(d / META_FILE, {
            "format": FORMAT_VERSION,
            "embedder": {"id": self.embedder_id, "dim": self.dim, "config": self.embedder_config},
            "index": asdict(self.index_spec),
            "index_kind": kind_of(index),
            "prototypes": asdict(self.prototype_spec),
            "aggregate": self.aggregate,
            "reference_rows": self.reference_rows,
            "depths": dict(sorted(self.depths.items())),
            "index_sha256": index_sha256,
            "vectors": vectors,
            "next_id": self.next_id,
            "tombstones": sorted(self.tombstones),
            "characters": self.characters(),
            "rows": rows,
        })
        return d

    @classmethod
    def load(cls, directory: str | Path, embedder_id: str | None = None, dim: int | None = None) -> "Gallery":
        """Read a saved gallery; with `embedder_id`/`dim` given, refuse one built by another embedder."""
        d = Path(directory)
        meta, meta_p, index_p = read_meta(d)
        emb = meta["embedder"]
        index = read_index(index_p, meta_p, meta.get("index_sha256"))
        g = cls(emb["id"], int(emb["dim"]), emb.get("config"), meta.get("index"), meta.get("prototypes"), meta.get("aggregate", "max"))
        if embedder_id is not None or dim is not None:
            g.check_embedder(embedder_id or g.embedder_id, dim if dim is not None else g.dim, f"gallery {d}")
        g.index, g.kind = index, kind_of(index)
        g.rows = read_rows(d, meta, meta_p)
        try:  # hand-edited or damaged counts: a one-line error, not a ValueError from int()
            g.tombstones = {int(i) for i in meta.get("tombstones", [])}
            g.reference_rows = int(meta["reference_rows"]) if meta.get("reference_rows") else None
            g.depths = {str(c): max(1, int(d)) for c, d in (meta.get("depths") or {}).items()}
        except (ValueError, TypeError, AttributeError) as exc:
            raise GalleryError(f"{meta_p} is corrupt (tombstones / reference_rows / depths: {exc}); rebuild the gallery") from None
        if meta.get("vectors"):
            g.vectors = VectorFile.open(d, meta["vectors"], g.dim)
            if len(g.vectors) != g.next_id:
                raise GalleryError(f"{d / meta['vectors'].get('file', '')} holds {len(g.vectors)} vectors for {g.next_id} row ids; rebuild the gallery")
        elif g.kind == "ivfpq":
            g.index_spec.ivfpq_vectors = "none"  # saved before IVF-PQ kept vectors: codes only, as it was built
        if index.ntotal != len(g.rows) + len(g.tombstones):
            raise GalleryError(f"{index_p} holds {index.ntotal} vectors but {meta_p} lists {len(g.rows)} rows; rebuild the gallery")
        if g.kind == "hnsw":
            hnsw_of(index).hnsw.efSearch = int(g.index_spec.ef_search)
        g._version += 1
        return g


def _index_spec(cfg: Mapping[str, Any] | None) -> IndexSpec:
    """`IndexSpec` from a config mapping; an unknown key is a one-line `ConfigError`."""
    cfg = dict(cfg or {})
    unknown = sorted(set(cfg) - {f.name for f in fields(IndexSpec)})
    if unknown:
        raise ConfigError(f"gallery index option(s) {unknown} unknown; use {[f.name for f in fields(IndexSpec)]}")
    return IndexSpec(**cfg)
