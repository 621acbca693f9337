"""Merging a predict's shards into a gallery of any size (`predict.gallery_from_shards`), on real Faiss and real files.

The merge copies vectors one shard part at a time into a scratch file in gallery order, adds them in chunks to an
index trained on a sample of the whole gallery, and an IVF-PQ vector file spills to disk while built and is renamed
into place when saved. Each test compares with the one-shot in-memory build the merge replaces.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

import numpy as np
import pytest

from anime_role_detect.fsutil import atomic_write_json
from anime_role_detect.recognition import vector_file
from anime_role_detect.recognition.gallery import Gallery
from anime_role_detect.recognition.predict import (
    gallery_from_shards,
    gallery_from_vectors,
)
from anime_role_detect.recognition.shards import (
    ShardSet,
    done_name,
    part_name,
    save_part,
)
from anime_role_detect.recognition.vector_file import VectorFile

from .test_gallery_scale import DIM, IVF, cloud, one_faiss_thread, queries_for  # noqa: F401 (autouse fixture)

SPEC = {"type": "ivfpq", **IVF}


def write_shards(d: Path, ids: list[str], x: np.ndarray, world: int, part_rows: int, unreadable: list[str]) -> None:
    """Shards as DDP ranks write them: rank r embeds rows r, r+world, ... in parts of `part_rows`; rank 0's first id again
    at the end of the last rank (a resumed rank), and the unreadable ids listed in rank 0's errors."""
    d.mkdir(parents=True, exist_ok=True)
    for r in range(world):
        mine = list(range(r, len(ids), world)) + ([0] if r == world - 1 else [])
        parts = [mine[i : i + part_rows] for i in range(0, len(mine), part_rows)]
        for p, rows in enumerate(parts):
            save_part(d / part_name(r, p), [ids[i] for i in rows], x[rows])
        atomic_write_json(d / done_name(r), {"rank": r, "world_size": world, "rows": len(mine), "parts": len(parts),
                                             "embedder_id": "test:scale", "dim": DIM, "seconds": 1.0,
                                             "errors": [[u, f"{u}: not an image"] for u in unreadable] if r == 0 else []})


@pytest.fixture
def archive(tmp_path):
    """3,000 rows of 60 characters in 3 ranks' shards of 350-row parts, plus 2 records no rank could read."""
    x, labels, centres = cloud(60, 50)
    ids = [f"char{c:04d}/{j:05d}.png" for j, c in enumerate(labels)]
    unreadable = ["char0003/broken.png", "char0041/broken.png"]
    write_shards(tmp_path / "shards", ids, x, world=3, part_rows=350, unreadable=unreadable)
    records = sorted([(i.split("/")[0], f"series{int(i[4:8]) % 7}", i) for i in ids + unreadable], key=lambda r: r[2])
    return tmp_path, x, labels, centres, ids, records


def searched(g: Gallery, q: np.ndarray) -> list[list[tuple[str, float]]]:
    return [[(c, round(s, 5)) for c, _, s in res] for res in g.search(q, k=5)]


def test_streamed_merge_builds_the_in_memory_gallery_and_moves_its_vector_file_into_place(archive, monkeypatch):
    tmp, x, labels, centres, ids, records = archive
    monkeypatch.setattr(vector_file, "SPILL_ROWS", 700)  # 3,000 rows spill, as 10M rows do past 65k
    out = tmp / "gallery"
    g = gallery_from_shards(tmp / "shards", records, tmp / "work", {"kind": "test"}, {"index": SPEC}, spill_dir=out)
    # the one-shot in-memory build of the old merge: every vector at once, characters sorted (ids sort the same way)
    ref = Gallery("test:scale", DIM, {"kind": "test"}, SPEC, aggregate=g.aggregate)
    ref.add_rows(x, [r[0] for r in sorted(records) if r[2] in set(ids)], [r[1] for r in sorted(records) if r[2] in set(ids)],
                 ids, expected_rows=len(ids))
    assert g.kind == ref.kind == "ivfpq" and len(g) == len(ids) == 3000
    assert [(r.character, r.series, r.source) for r in g.rows.values()] == [(r.character, r.series, r.source) for r in ref.rows.values()]
    np.testing.assert_array_equal(g.vectors.get(np.arange(3000)), ref.vectors.get(np.arange(3000)))
    q = np.concatenate([queries_for(centres, seed=s) for s in (1, 2)])
    assert searched(g, q) == searched(ref, q)  # same training sample, same codes, same answers
    assert not (tmp / "work" / "merged-vectors.npy").exists()
    # built: the rows wait in a scratch file in the gallery's folder, none in memory
    spills = list(out.glob(".gallery.vectors.*.spill"))
    assert len(spills) == 1 and len(g.vectors._base) == 3000 and g.vectors._n_tail == 0
    inode = spills[0].stat().st_ino
    g.save(out)
    assert not list(out.glob(".gallery.vectors.*.spill")) and (out / "gallery.vectors").stat().st_ino == inode  # renamed, not copied
    assert searched(Gallery.load(out), q) == searched(ref, q)


def test_chunked_build_trains_on_a_sample_of_the_whole_gallery(archive):
    """The first 300-row chunk holds 6 of 60 characters; the index is still trained as the one-shot build trains it."""
    tmp, x, labels, centres, ids, records = archive
    rows = [(f"char{c:04d}", "", i) for c, i in zip(labels, ids)]
    q = queries_for(centres)
    chunked = gallery_from_vectors(rows, x, "test:scale", DIM, index=SPEC, chunk=300)
    whole = gallery_from_vectors(rows, x, "test:scale", DIM, index=SPEC, chunk=len(x))
    assert searched(chunked, q) == searched(whole, q)
    assert np.mean([r[0][0] == f"char{i:04d}" for i, r in enumerate(chunked.search(q, k=1))]) >= 0.95


def test_streamed_merge_keeps_prototypes_per_character(archive):
    tmp, x, labels, centres, ids, records = archive
    g = gallery_from_shards(tmp / "shards", records, tmp / "work", None, {"index": {"type": "flat"}, "prototypes": {"method": "mean"}})
    assert len(g) == 60 and g.n_characters == 60
    means = np.stack([x[labels == c].mean(0) for c in range(60)])
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    np.testing.assert_allclose(g.index.reconstruct_batch(np.arange(60)), means, atol=1e-5)


def test_shard_set_reads_ids_only_and_locates_each_ids_first_copy(archive):
    tmp, x, labels, centres, ids, records = archive
    shards = ShardSet.open(tmp / "shards")
    assert len(shards.ids) == 3001 and len(shards.unique_ids()) == 3000 and len(shards.parts) == 9
    where = shards.locate([ids[5], "char0003/broken.png", ids[0]])
    assert where[1] == -1 and shards.ids[where[0]].decode() == ids[5] and where[2] == 0  # rank 0's copy, not the resumed rank's
    assert shards.n_unique() == 3000 and shards.ids.dtype.kind == "S"  # UTF-8 bytes: a quarter of numpy text
    np.testing.assert_array_equal(shards.gather(where[[0, 2]], np.empty((2, DIM), np.float32)), x[[5, 0]].astype(np.float32))


def test_a_spilled_vector_file_is_removed_when_dropped_and_replaces_a_linked_target(tmp_path):
    rows = np.random.default_rng(0).standard_normal((25, 8)).astype(np.float32)
    vf = VectorFile(8, spill_dir=tmp_path / "spill", spill_rows=10)
    for a in range(0, 25, 10):  # a build appends chunk after chunk
        vf.append(rows[a : a + 10])
    spill = next((tmp_path / "spill").glob("*.spill"))
    assert spill.stat().st_size == 20 * 8 * 2 and vf._n_tail == 5  # 20 rows on disk, 5 in memory
    del vf
    gc.collect()
    assert not spill.exists()  # a build that is never saved leaves no scratch file

    other = tmp_path / "other.vectors"  # an older version's file, hard-linked into the folder saved to
    other.write_bytes(b"old rows")
    (tmp_path / "out").mkdir()
    os.link(other, tmp_path / "out" / vector_file.FILE)
    vf = VectorFile(8, spill_dir=tmp_path / "out", spill_rows=10)
    vf.append(rows)
    entry = vf.save(tmp_path / "out")
    assert entry["rows"] == 25 and other.read_bytes() == b"old rows"
    np.testing.assert_array_equal(VectorFile.open(tmp_path / "out", entry, 8).get(np.arange(25)), rows.astype(np.float16))


def test_a_vector_file_spilled_on_another_file_system_is_copied_then_removed(tmp_path):
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK) or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs a writable /dev/shm on another file system than the test folder, to spill across file systems")
    rows = np.random.default_rng(1).standard_normal((25, 8)).astype(np.float32)
    spill_dir = shm / f"ard-spill-{os.getpid()}"
    try:
        vf = VectorFile(8, spill_dir=spill_dir, spill_rows=10)
        vf.append(rows)
        entry = vf.save(tmp_path)
        assert not list(spill_dir.glob("*.spill"))
        np.testing.assert_array_equal(VectorFile.open(tmp_path, entry, 8).get(np.arange(25)), rows.astype(np.float16))
    finally:
        for p in spill_dir.glob("*"):
            p.unlink()
        spill_dir.rmdir()


def test_non_ascii_ids_sort_and_match_as_text(tmp_path):
    ids = ["初音ミク/02.png", "Zoe/01.png", "初音ミク/01.png", "Émilie/01.png"]
    x = np.eye(4, DIM, dtype=np.float32)
    write_shards(tmp_path, ids, x, world=2, part_rows=1, unreadable=[])
    shards = ShardSet.open(tmp_path)
    assert shards.unique_ids() == sorted(ids)
    where = shards.locate(["Émilie/01.png", "初音ミク/02.png", "初音ミク/03.png"])
    assert where[2] == -1
    np.testing.assert_array_equal(shards.gather(where[:2], np.empty((2, DIM), np.float32)), x[[3, 0]])
