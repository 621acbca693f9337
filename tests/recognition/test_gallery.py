"""Gallery on real Faiss: index types, prototypes, add/remove, atomic save/load, refusing other embedders."""

from __future__ import annotations

import json

import numpy as np
import pytest

from anime_role_detect.errors import ConfigError, GalleryError
from anime_role_detect.recognition import gallery as gallery_mod
from anime_role_detect.recognition.gallery import Gallery

DIM = 32


def clusters(n_chars: int = 6, per_char: int = 40, seed: int = 0, spread: float = 0.25):
    """Unit vectors around one random centre per character."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_chars, DIM))
    vecs, labels = [], []
    for c in range(n_chars):
        v = centres[c] + spread * rng.normal(size=(per_char, DIM))
        vecs.append(v / np.linalg.norm(v, axis=1, keepdims=True))
        labels += [f"c{c}"] * per_char
    return np.concatenate(vecs).astype(np.float32), labels, centres


def filled(index: dict | None = None, prototypes: dict | None = None) -> tuple[Gallery, np.ndarray, list[str]]:
    vecs, labels, centres = clusters()
    g = Gallery("test:emb", DIM, {"kind": "timm"}, index=index, prototypes=prototypes)
    for c in sorted(set(labels)):
        rows = np.array([i for i, y in enumerate(labels) if y == c])
        g.add(c, f"series_{c}", vecs[rows], [f"{c}/{i}.png" for i in rows])
    q = centres + 0.1 * np.random.default_rng(1).normal(size=centres.shape)
    return g, (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32), [f"c{i}" for i in range(len(centres))]


@pytest.mark.parametrize("index", [{"type": "flat"}, {"type": "hnsw", "hnsw_m": 16}, {"type": "ivfpq", "nlist": 4, "pq_m": 8}])
def test_every_index_type_finds_the_right_character(index, tmp_path):
    g, queries, truth = filled(index)
    res = g.search(queries, k=3)
    assert [r[0][0] for r in res] == truth
    assert all(r[0][1] == f"series_{r[0][0]}" for r in res)
    assert all(r[0][2] >= r[1][2] for r in res)
    g.save(tmp_path)
    loaded = Gallery.load(tmp_path)
    assert loaded.index_spec.type == index["type"]
    assert loaded.search(queries, k=3) == res


@pytest.mark.parametrize("index", [{"type": "flat"}, {"type": "hnsw"}, {"type": "ivfpq", "nlist": 4, "pq_m": 8}])
def test_remove_deletes_one_character_and_keeps_the_rest(index):
    g, queries, truth = filled(index)
    assert g.remove("c2") == 40
    assert g.remove("c2") == 0
    res = g.search(queries, k=6)
    assert all(c != "c2" for r in res for c, _, _ in r)
    assert [r[0][0] for i, r in enumerate(res) if i != 2] == [t for t in truth if t != "c2"]
    assert len(g) == 200 and "c2" not in [c["name"] for c in g.characters()]
    g.add("c2", "series_c2", queries[2:3])  # ids keep growing, no collision after a removal
    assert g.search(queries[2:3], k=1)[0][0][0] == "c2"


@pytest.mark.parametrize("method,rows_per_char", [("mean", 1), ("kmeans", 4), ("all", 40)])
def test_prototypes_per_character(method, rows_per_char):
    g, queries, truth = filled(prototypes={"method": method, "k": 4})
    assert {c["prototypes"] for c in g.characters()} == {rows_per_char}
    assert [r[0][0] for r in g.search(queries, k=1)] == truth


def test_refuses_another_embedder_or_dimension(tmp_path):
    g, queries, _ = filled()
    g.save(tmp_path)
    with pytest.raises(GalleryError, match="built with embedder test:emb .*rebuild"):
        Gallery.load(tmp_path, embedder_id="open_clip:ViT-B-32:laion", dim=DIM)
    with pytest.raises(GalleryError, match="dim 32"):
        Gallery.load(tmp_path, embedder_id="test:emb", dim=512)
    with pytest.raises(GalleryError):
        g.add("x", "", np.ones((2, 16), np.float32))
    with pytest.raises(GalleryError):
        g.add("x", "", queries[:1], embedder_id="timm:other")
    with pytest.raises(GalleryError, match="query dimension"):
        g.search(np.ones((1, 8), np.float32))


def test_corrupt_or_mismatched_files_are_clear_errors(tmp_path):
    g, _, _ = filled()
    g.save(tmp_path)
    with pytest.raises(GalleryError, match="no gallery in"):
        Gallery.load(tmp_path / "missing")
    (tmp_path / "gallery.faiss").write_bytes(b"garbage")
    with pytest.raises(GalleryError, match="does not match"):
        Gallery.load(tmp_path)
    meta = json.loads((tmp_path / "gallery.json").read_text())
    meta.pop("index_sha256")
    (tmp_path / "gallery.json").write_text(json.dumps(meta))
    with pytest.raises(GalleryError, match="not a readable Faiss index"):
        Gallery.load(tmp_path)
    (tmp_path / "gallery.json").write_text("{not json")
    with pytest.raises(GalleryError, match="corrupt"):
        Gallery.load(tmp_path)
    g.save(tmp_path)
    for key, bad in (("reference_rows", "three"), ("tombstones", ["x"]), ("tombstones", 7), ("depths", {"a": "deep"}), ("depths", [3]),
                     ("embedder", {}), ("embedder", {"id": "x", "dim": "wide"}), ("embedder", "x")):
        meta = json.loads((tmp_path / "gallery.json").read_text())
        (tmp_path / "gallery.json").write_text(json.dumps({**meta, key: bad}))
        with pytest.raises(GalleryError, match="corrupt"):
            Gallery.load(tmp_path)
        g.save(tmp_path)


def test_crash_during_save_never_leaves_a_gallery_that_loads_wrong(tmp_path, monkeypatch):
    old, queries, _ = filled()
    old.save(tmp_path)
    before = Gallery.load(tmp_path).search(queries, k=2)
    new, _, _ = filled()
    new.remove("c0")

    def crash(*a, **k):
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(gallery_mod, "atomic_write_json", crash)  # index and rows written, metadata not
    with pytest.raises(KeyboardInterrupt):
        new.save(tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(GalleryError, match="interrupted save"):
        Gallery.load(tmp_path)
    monkeypatch.undo()
    old.save(tmp_path)  # a retry of the save restores a consistent pair
    assert Gallery.load(tmp_path).search(queries, k=2) == before


def test_bad_index_config_is_a_config_error():
    with pytest.raises(ConfigError, match="flat, hnsw or ivfpq"):
        filled({"type": "lsh"})
    with pytest.raises(ConfigError, match="pq_m"):
        filled({"type": "ivfpq", "pq_m": 7})
    with pytest.raises(ConfigError, match="aggregate"):
        Gallery("e", DIM, aggregate="median")


@pytest.mark.parametrize("index", [{"type": "flat"}, {"type": "hnsw"}])
def test_a_gallery_saved_before_auto_indexes_still_loads(index, tmp_path):
    g, queries, _ = filled(index)
    g.save(tmp_path)
    meta = json.loads((tmp_path / "gallery.json").read_text())
    for key in ("index_kind", "tombstones"):
        meta.pop(key)
    meta["index"] = {k: meta["index"][k] for k in ("type", "hnsw_m", "ef_search", "nlist", "pq_m", "pq_nbits", "nprobe")}
    (tmp_path / "gallery.json").write_text(json.dumps(meta))
    old = Gallery.load(tmp_path)
    assert old.kind == index["type"] and not old.tombstones
    assert old.search(queries, k=3) == g.search(queries, k=3)


def test_the_default_index_is_auto_and_small_galleries_are_exact_flat():
    g, queries, truth = filled()
    assert g.index_spec.type == "auto" and g.kind == "flat"
    assert [r[0][0] for r in g.search(queries, k=1)] == truth


@pytest.mark.parametrize("index", [{"type": "flat"}, {"type": "hnsw", "hnsw_m": 16}, {"type": "ivfpq", "nlist": 4, "pq_m": 8}])
def test_nearest_rows_are_row_cosines_not_character_scores(index):
    """Near-duplicate checks (log fusion) read `nearest_rows`: a stored row scores 1.0 there, while its character's
    `top3_mean` score is lower; a removed character's rows are never returned."""
    g, _, _ = filled(index)
    vecs, labels, _ = clusters()
    stored = vecs[[0, 45, 90]]  # rows of c0, c1, c2
    rows = g.nearest_rows(stored, k=2)
    assert [r[0][0] for r in rows] == ["c0", "c1", "c2"]
    assert all(len(r) == 2 and r[0][1] == pytest.approx(1.0, abs=2e-2) and r[0][1] >= r[1][1] for r in rows)
    assert all(s < r[0][1] - 1e-3 for (_, _, s), r in zip((h[0] for h in g.search(stored, k=1)), rows))
    g.remove("c1")
    assert all(name != "c1" for r in g.nearest_rows(stored, k=2) for name, _ in r)


@pytest.mark.parametrize("index", [{"type": "flat"}, {"type": "hnsw", "hnsw_m": 16}])
def test_scores_without_copies_leave_a_stored_picture_out_of_its_own_score(index):
    """A version's held-out pictures join its gallery; refitting fusion on them (`build.refit_gallery_weight`) scores each
    as if its own row were not there: the character's aggregate over its other rows, the same as a brute-force
    top-depth mean, and lower than the search's score, which counts the picture's own row."""
    g, _, _ = filled(index)
    vecs, labels, _ = clusters()
    q = vecs[45]  # a row of c1
    got = g.scores_without_copies(q, ["c0", "c1", "missing"])
    assert set(got) == {"c0", "c1"}  # a name the gallery does not hold is skipped
    for c in ("c0", "c1"):
        sims = np.sort(vecs[[i for i, y in enumerate(labels) if y == c and i != 45]] @ q)[::-1]
        assert got[c] == pytest.approx(float(sims[: g.depth(c)].mean()), abs=1e-4)
    searched = dict((n, s) for n, _, s in g.search(q, k=6)[0])
    assert got["c1"] < searched["c1"] - 1e-3 and got["c0"] == pytest.approx(searched["c0"], abs=1e-4)
    lone = Gallery("test:emb", DIM, {"kind": "timm"}, index=index)
    lone.add("solo", "s", vecs[:1], ["solo/0.png"])
    lone.add("other", "s", vecs[50:53], ["o/1.png", "o/2.png", "o/3.png"])
    assert lone.scores_without_copies(vecs[0], ["solo"]) == {"solo": -1.0}  # nothing left: scores as no match
