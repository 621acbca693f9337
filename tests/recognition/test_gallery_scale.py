"""Big galleries on real Faiss, at test size: `auto` index choice, edits of HNSW / IVF-PQ indexes, exact scores.

Thresholds are passed small (auto: flat under 2k rows, HNSW under 10k, IVF-PQ above) so 1k-12k rows
of dim 64 cross every tier in seconds. Each approximate gallery is compared with an exact flat gallery
holding the same rows after the same edits.
"""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest

from anime_role_detect.errors import ConfigError, GalleryError
from anime_role_detect.recognition.aggregate import AGGREGATORS
from anime_role_detect.recognition.gallery import Gallery

DIM = 64
TIERS = {"type": "auto", "flat_below": 2_000, "hnsw_below": 10_000}
#: IVF-PQ for dim 64 at test speed (4 dims per 6-bit sub-quantizer); the defaults are sized for 1280-d
IVF = {"pq_m": 16, "pq_nbits": 6, "nprobe": 16}


@pytest.fixture(autouse=True)
def one_faiss_thread():
    """Faiss on one thread: its k-means (IVF-PQ training) is many tiny parallel loops, 3x slower on 2 busy cores."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


def cloud(n_chars: int, per_char: int, seed: int = 0, spread: float = 0.6) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit rows around one centre per character: (rows, character index per row, centres)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_chars, DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.repeat(np.arange(n_chars), per_char)
    x = centres[labels] + spread / np.sqrt(DIM) * rng.standard_normal((len(labels), DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True), labels, centres


def queries_for(centres: np.ndarray, seed: int = 1, spread: float = 0.6) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q = centres + spread / np.sqrt(DIM) * rng.standard_normal(centres.shape).astype(np.float32)
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def gallery(spec: dict, x: np.ndarray, labels: np.ndarray, aggregate: str = "top3_mean") -> Gallery:
    g = Gallery("test:scale", DIM, index=spec, aggregate=aggregate)
    names = [f"char{i:04d}" for i in labels]
    g.add_rows(x, names, series=[f"series{i % 7}" for i in labels], sources=[f"{n}/{j}.png" for j, n in enumerate(names)])
    return g


def exact_scores(x: np.ndarray, names: list[str], query: np.ndarray, aggregate: str) -> dict[str, float]:
    """Brute force: every character's aggregate over all its rows."""
    sims = x @ query
    by: dict[str, list[float]] = {}
    for s, n in zip(sims.tolist(), names):
        by.setdefault(n, []).append(s)
    return {n: AGGREGATORS[aggregate](sorted(v, reverse=True)) for n, v in by.items()}


def top1(g: Gallery, q: np.ndarray, k: int = 10) -> list[str]:
    return [r[0][0] if r else "" for r in g.search(q, k=k)]


@pytest.mark.parametrize("rows,kind", [(1_000, "flat"), (5_000, "hnsw"), (12_000, "ivfpq")])
def test_auto_picks_the_index_by_size(rows, kind):
    x, labels, _ = cloud(rows // 100, 100)
    g = gallery({**TIERS, **IVF}, x, labels)
    assert g.kind == kind and g.index_spec.type == "auto"
    assert len(g) == rows and g.n_characters == rows // 100


def test_auto_moves_a_growing_gallery_up_a_tier_and_keeps_its_answers():
    x, labels, centres = cloud(30, 100)
    g = gallery(TIERS, x[:1500], labels[:1500])
    assert g.kind == "flat"
    names = [f"char{i:04d}" for i in labels[1500:]]
    g.add_rows(x[1500:], names)  # 3,000 rows: crosses flat_below
    assert g.kind == "hnsw" and g.index.ntotal == 3000
    exact = gallery({"type": "flat"}, x, labels)
    q = queries_for(centres)
    assert top1(g, q) == top1(exact, q)
    assert {i: r.character for i, r in g.rows.items()} == {i: r.character for i, r in exact.rows.items()}


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_add_remove_save_reload_agree_with_an_exact_flat_gallery(kind, tmp_path):
    n_chars = 60 if kind == "hnsw" else 120
    x, labels, centres = cloud(n_chars, 100)
    approx = gallery({**TIERS, **IVF}, x, labels)
    exact = gallery({"type": "flat"}, x, labels)
    assert approx.kind == kind and exact.kind == "flat"
    new_x, _, new_c = cloud(1, 40, seed=7)
    for g in (approx, exact):
        assert g.add("newcomer", "New Show", new_x, [f"new/{i}.png" for i in range(40)]) == 40
        assert g.remove("char0003") == 100
        assert g.remove("char0003") == 0
    approx.save(tmp_path)
    loaded = Gallery.load(tmp_path, embedder_id="test:scale", dim=DIM)
    assert loaded.kind == kind and len(loaded) == len(exact) == n_chars * 100 - 100 + 40
    assert loaded.rows == exact.rows  # same ids, characters, series and sources
    assert loaded.characters() == exact.characters()
    q = np.concatenate([queries_for(centres), queries_for(new_c, seed=3)])
    got, want = loaded.search(q, k=5), exact.search(q, k=5)
    agree = np.mean([bool(a) and bool(b) and a[0][0] == b[0][0] for a, b in zip(got, want)])
    assert agree >= 0.98, f"top-1 character agreement with exact flat {agree:.3f}"
    assert all(c != "char0003" for r in got for c, _, _ in r)
    assert got[-1][0][:2] == ("newcomer", "New Show")
    assert all(r[0][1] == exact.series_of()[r[0][0]] for r in got)
    assert loaded.search(q, k=5) == approx.search(q, k=5)  # the reloaded gallery answers as before saving


@pytest.mark.parametrize("storage", ["sq8", "flat"])
def test_hnsw_removal_skips_tombstones_then_rebuilds(storage, tmp_path):
    x, labels, centres = cloud(50, 100)
    g = gallery({**TIERS, "rebuild_fraction": 0.05, "hnsw_storage": storage}, x, labels)
    exact = gallery({"type": "flat"}, x, labels)
    assert g.kind == "hnsw"
    for gal in (g, exact):
        gal.remove("char0001")
    assert g.tombstones and g.index.ntotal == 5000  # HNSW cannot delete: row hidden, vector kept
    q = queries_for(centres)
    assert all(c != "char0001" for r in g.search(q, k=50) for c, _, _ in r)
    assert top1(g, q) == top1(exact, q)
    g.save(tmp_path)
    assert json.loads((tmp_path / "gallery.json").read_text())["tombstones"] == list(range(100, 200))
    loaded = Gallery.load(tmp_path)
    assert loaded.tombstones == g.tombstones and loaded.search(q, k=5) == g.search(q, k=5)
    for gal in (loaded, exact):
        gal.remove("char0002")
        gal.remove("char0003")  # 300 removed rows > 5% of 5,000: rebuilt from the stored vectors
    assert not loaded.tombstones and loaded.index.ntotal == len(loaded) == 4700 and loaded.kind == "hnsw"
    assert top1(loaded, q) == top1(exact, q)
    assert not {"char0001", "char0002", "char0003"} & set(top1(loaded, q))


@pytest.mark.parametrize("aggregate,storage", [("max", "sq8"), ("top3_mean", "sq8"), ("top5_mean", "sq8"), ("top3_mean", "fp16"),
                                               ("top3_mean", "flat")])
def test_approximate_search_returns_exact_character_scores(aggregate, storage):
    """Rows of the best characters missing from the fetched ones are re-scored, never counted as absent; the
    characters past `exact_top` carry upper bounds (never below their exact score), and `exact_top: k` makes all exact."""
    x, labels, centres = cloud(40, 100, spread=1.2)
    names = [f"char{i:04d}" for i in labels]
    q = queries_for(centres, spread=1.2)[:15]
    for exact_top in (2, 5):
        g = gallery({"type": "hnsw", "search_rows": 8, "hnsw_storage": storage, "exact_top": exact_top}, x, labels, aggregate)
        for query, res in zip(q, g.search(q, k=5)):
            truth = exact_scores(x, names, query, aggregate)
            best = sorted(truth, key=truth.get, reverse=True)  # a character none of whose rows were fetched is not named
            assert 1 <= len(res) <= 5
            for i, (c, _, s) in enumerate(res):
                if i < exact_top:
                    assert s == pytest.approx(truth[c], abs=1e-5)
                else:  # an upper bound from the fetched rows
                    assert s >= truth[c] - 1e-5
            assert [s for _, _, s in res] == sorted((s for _, _, s in res), reverse=True)
            assert res[0][0] == best[0]


def test_default_hnsw_walks_8_bit_codes_and_keeps_exact_vectors(tmp_path):
    """The graph reads a quarter of the bytes per visited row; the vectors beside it stay exact (rebuilds, re-scoring)."""
    x, labels, centres = cloud(40, 100)
    g = gallery({"type": "hnsw"}, x, labels)
    refine = faiss.downcast_index(g.index.index)
    graph = faiss.downcast_index(refine.base_index)
    assert isinstance(refine, faiss.IndexRefineFlat) and isinstance(graph, faiss.IndexHNSWSQ)
    assert faiss.downcast_index(graph.storage).code_size == DIM  # one byte per dimension, against 4 in the flat graph
    ids = np.array(sorted(g.rows)[:50], np.int64)
    np.testing.assert_allclose(g.index.reconstruct_batch(ids), x[:50], atol=1e-6)
    old = gallery({"type": "hnsw", "hnsw_storage": "flat"}, x, labels)  # galleries built before keep loading and answering
    old.save(tmp_path)
    loaded = Gallery.load(tmp_path)
    q = queries_for(centres)
    assert loaded.kind == "hnsw" and top1(loaded, q) == top1(g, q)


def low_rank_cloud(n_chars: int, per_char: int, rank: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows like real embeddings: a shared mean direction, characters and their variation in a `rank`-d subspace, faint noise."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((DIM, rank)))[0].T
    mean = rng.standard_normal(DIM)
    centres = 2.0 * mean / np.linalg.norm(mean) + rng.standard_normal((n_chars, rank)) @ basis
    labels = np.repeat(np.arange(n_chars), per_char)
    x = centres[labels] + 0.4 * rng.standard_normal((len(labels), rank)) @ basis + 0.03 * rng.standard_normal((len(labels), DIM))
    x, centres = (a / np.linalg.norm(a, axis=1, keepdims=True) for a in (x, centres))
    return x.astype(np.float32), labels, centres.astype(np.float32)


def test_hnsw_walks_an_uncentred_projection_and_still_answers_exactly(tmp_path):
    """`hnsw_pca`: the graph walks rows projected on their first principal directions (fewer bytes and sums per
    step); the projection keeps no offset, so inner products keep their order, and the re-ranker's scores stay exact."""
    x, labels, centres = low_rank_cloud(50, 100)
    spec = {"type": "hnsw", "hnsw_pca": 16, "rebuild_fraction": 0.05}
    g, exact = gallery(spec, x, labels, "max"), gallery({"type": "flat"}, x, labels, "max")
    walk = faiss.downcast_index(faiss.downcast_index(g.index.index).base_index)
    assert isinstance(walk, faiss.IndexPreTransform)
    pca = faiss.downcast_VectorTransform(walk.chain.at(0))
    assert (pca.d_in, pca.d_out) == (DIM, 16) and faiss.downcast_index(faiss.downcast_index(walk.index).storage).code_size == 16
    assert np.abs(faiss.vector_to_array(pca.mean)).max() < 1e-5  # fitted on the rows and their mirror image: no centring
    q = np.concatenate([queries_for(centres), low_rank_cloud(50, 1, seed=0)[0]])
    for gal in (g, exact):
        gal.remove("char0001")  # hidden by a selector handed through the projection to the graph
    got, want = g.search(q, k=5), exact.search(q, k=5)
    assert [r[0][0] for r in got] == [r[0][0] for r in want]
    assert all(a[0][2] == pytest.approx(b[0][2], abs=1e-5) for a, b in zip(got, want))
    assert all(c != "char0001" for r in g.search(q, k=50) for c, _, _ in r)
    g.save(tmp_path)
    loaded = Gallery.load(tmp_path)
    assert loaded.search(q, k=5) == got
    for gal in (loaded, exact):
        gal.remove("char0002")
        gal.remove("char0003")  # past rebuild_fraction: rebuilt from the stored vectors, projection re-fitted
    assert not loaded.tombstones and isinstance(faiss.downcast_index(faiss.downcast_index(loaded.index.index).base_index),
                                                faiss.IndexPreTransform)
    assert top1(loaded, q) == top1(exact, q)
    for few in ({"hnsw_pca": DIM}, {"hnsw_pca": 16, "n": 100}):  # as many dimensions as the rows have / too few rows to fit it
        small = gallery({"type": "hnsw", "hnsw_pca": few["hnsw_pca"]}, x[: few.get("n", 500)], labels[: few.get("n", 500)])
        assert not isinstance(faiss.downcast_index(faiss.downcast_index(small.index.index).base_index), faiss.IndexPreTransform)
    with pytest.raises(ConfigError, match="hnsw_pca=-1"):
        gallery({"type": "hnsw", "hnsw_pca": -1}, x[:500], labels[:500])


def test_flat_search_scores_are_exact_for_every_returned_character():
    x, labels, centres = cloud(20, 150, spread=1.5)
    g = gallery({"type": "flat"}, x, labels, "top5_mean")
    names = [f"char{i:04d}" for i in labels]
    for query, res in zip(queries_for(centres, spread=1.5), g.search(queries_for(centres, spread=1.5), k=10)):
        truth = exact_scores(x, names, query, "top5_mean")
        assert [c for c, _, _ in res] == sorted(truth, key=truth.get, reverse=True)[:10]
        assert all(s == pytest.approx(truth[c], abs=1e-5) for c, _, s in res)


def test_bad_tier_settings_are_config_errors():
    with pytest.raises(ConfigError, match="flat_below"):
        Gallery("e", DIM, index={"type": "auto", "flat_below": 10, "hnsw_below": 5})
    with pytest.raises(ConfigError, match="unknown"):
        Gallery("e", DIM, index={"type": "auto", "ef_serch": 64})
    with pytest.raises(ConfigError, match="hnsw_storage='pq'"):
        gallery({"type": "hnsw", "hnsw_storage": "pq"}, *cloud(2, 10)[:2])


def _coarse_ivfpq(**extra) -> dict:
    """IVF-PQ with 4-byte codes over dim 64: codes alone confuse near characters, as 128-byte codes do at 10M rows."""
    return {"type": "ivfpq", "nlist": 16, "pq_m": 4, "pq_nbits": 6, "nprobe": 8, "search_rows": 32, **extra}


def test_ivfpq_reranks_the_rows_its_codes_fetch_on_stored_vectors():
    """The vector file puts the right row first where codes alone do not; the best characters' scores are exact."""
    x, labels, centres = cloud(150, 60, spread=1.0)
    names = [f"char{i:04d}" for i in labels]
    q = np.concatenate([queries_for(centres, seed=s, spread=1.0) for s in (1, 2)])
    want = top1(gallery({"type": "flat"}, x, labels, "max"), q)
    codes = gallery(_coarse_ivfpq(ivfpq_vectors="none"), x, labels, "max")
    kept = gallery(_coarse_ivfpq(), x, labels, "max")
    assert codes.vectors is None and len(kept.vectors) == len(x)
    agree_codes = np.mean([a == b for a, b in zip(top1(codes, q), want)])
    agree_kept = np.mean([a == b for a, b in zip(top1(kept, q), want)])
    assert agree_kept >= 0.97 and agree_kept - agree_codes >= 0.1, (agree_codes, agree_kept)
    for query, res in zip(q[:20], kept.search(q[:20], k=5)):
        truth = exact_scores(x, names, query, "max")
        assert res[0][2] == pytest.approx(truth[res[0][0]], abs=2e-3)  # half-precision vectors
        alone = kept.search(query, k=5)[0]  # one query at a time (the pipeline's path) answers as in a batch
        assert [c for c, _, _ in alone] == [c for c, _, _ in res]
        np.testing.assert_allclose([s for _, _, s in alone], [s for _, _, s in res], atol=1e-6)


def test_ivfpq_vector_file_appends_in_place_survives_a_killed_save_and_never_edits_a_linked_copy(tmp_path):
    x, labels, centres = cloud(120, 100)
    g = gallery({**TIERS, **IVF}, x, labels)
    assert g.kind == "ivfpq" and g.vectors is not None
    a = tmp_path / "a"
    g.save(a)
    vec = a / "gallery.vectors"
    assert vec.stat().st_size == len(x) * DIM * 2
    first = vec.read_bytes()
    loaded = Gallery.load(a)
    new_x, _, new_c = cloud(1, 30, seed=9)
    loaded.add("newcomer", "", new_x)
    inode = vec.stat().st_ino
    loaded.save(a)
    assert vec.stat().st_ino == inode and vec.stat().st_size == (len(x) + 30) * DIM * 2  # appended, not rewritten
    assert vec.read_bytes()[: len(first)] == first
    with open(vec, "ab") as fh:  # a save killed after writing vectors, before gallery.json: rows past the recorded ones
        fh.write(b"\x01" * DIM * 2 * 7)
    again = Gallery.load(a)
    q = np.concatenate([queries_for(centres), queries_for(new_c, seed=3)])
    assert again.search(q, k=3) == loaded.search(q, k=3) and top1(again, q)[-1] == "newcomer"
    again.save(a)
    assert vec.stat().st_size == (len(x) + 30) * DIM * 2  # the killed save's tail is cut

    b = tmp_path / "b"  # a derived version hard-links its parent's files (registry.carry_files)
    b.mkdir()
    for name in ("gallery.vectors", "gallery.faiss", "gallery.rows.npz", "gallery.json"):
        (b / name).hardlink_to(a / name)
    before = vec.read_bytes()
    child = Gallery.load(b)
    child.add("another", "", cloud(1, 10, seed=11)[0])
    child.save(b)
    assert vec.read_bytes() == before and (b / "gallery.vectors").stat().st_ino != vec.stat().st_ino
    assert len(Gallery.load(a)) == len(x) + 30 and len(Gallery.load(b)) == len(x) + 40


def test_ivfpq_vector_file_damage_is_a_one_line_error(tmp_path):
    x, labels, _ = cloud(120, 100)
    gallery({**TIERS, **IVF}, x, labels).save(tmp_path)
    vec = tmp_path / "gallery.vectors"
    with open(vec, "r+b") as fh:
        fh.truncate(DIM * 2 * 100)
    with pytest.raises(GalleryError, match="cut short"):
        Gallery.load(tmp_path)
    vec.unlink()
    with pytest.raises(GalleryError, match="missing"):
        Gallery.load(tmp_path)
    with pytest.raises(ConfigError, match="ivfpq_vectors='fp32'"):
        Gallery("e", DIM, index={"type": "ivfpq", "ivfpq_vectors": "fp32"})


def test_a_gallery_growing_into_ivfpq_keeps_every_rows_vector(tmp_path):
    """auto moves HNSW to IVF-PQ: the vector file is filled from the graph's vectors (removed rows: zeros)."""
    x, labels, centres = cloud(120, 100)
    g = gallery({**TIERS, **IVF}, x[:8000], labels[:8000])
    assert g.kind == "hnsw"
    g.remove("char0002")
    g.add_rows(x[8000:], [f"char{i:04d}" for i in labels[8000:]])
    assert g.kind == "ivfpq" and len(g.vectors) == g.next_id == len(x)
    np.testing.assert_allclose(g.vectors.get(np.arange(300, 310)), x[300:310], atol=2e-3)
    assert not g.vectors.get(np.arange(200, 300)).any()
    exact = gallery({"type": "flat"}, x, labels)
    exact.remove("char0002")
    q = queries_for(centres)
    assert np.mean([a == b for a, b in zip(top1(g, q), top1(exact, q))]) >= 0.98


def test_a_codes_only_ivfpq_gallery_saved_before_vector_files_still_loads(tmp_path):
    x, labels, centres = cloud(120, 100)
    g = gallery({**TIERS, **IVF, "ivfpq_vectors": "none"}, x, labels)
    g.save(tmp_path)
    meta = json.loads((tmp_path / "gallery.json").read_text())
    del meta["vectors"], meta["index"]["ivfpq_vectors"], meta["index"]["refine_factor"]  # as written before
    (tmp_path / "gallery.json").write_text(json.dumps(meta))
    loaded = Gallery.load(tmp_path)
    assert loaded.kind == "ivfpq" and loaded.vectors is None and loaded.index_spec.ivfpq_vectors == "none"
    q = queries_for(centres)
    assert loaded.search(q, k=3) == g.search(q, k=3)


def test_ivfpq_gallery_saved_again_after_its_folder_moved(tmp_path):
    """A version folder is renamed when sealed: the gallery object still saves its rows elsewhere."""
    x, labels, centres = cloud(120, 100)
    g = gallery({**TIERS, **IVF}, x, labels)
    g.save(tmp_path / ".staging")
    (tmp_path / ".staging").rename(tmp_path / "v1")
    g.add("late", "", cloud(1, 5, seed=4)[0])
    g.save(tmp_path / "v2")
    loaded = Gallery.load(tmp_path / "v2")
    np.testing.assert_allclose(loaded.vectors.get(np.arange(len(x) + 5)), g.vectors.get(np.arange(len(x) + 5)))
    q = queries_for(centres)
    assert loaded.search(q, k=3) == g.search(q, k=3)
