"""The gallery's rows as columns (`recognition.rows.RowTable`, saved as gallery.rows.npz): the same rows and answers
as before, a fraction of the memory, galleries saved with the old JSON row list still load, damage is one line."""

from __future__ import annotations

import json
import tracemalloc
from dataclasses import asdict

import numpy as np
import pytest

from anime_role_detect.errors import GalleryError
from anime_role_detect.fsutil import file_sha256
from anime_role_detect.recognition.gallery import Gallery
from anime_role_detect.recognition.rows import Row, RowTable

from .test_gallery import DIM, filled


def test_rows_survive_removal_readding_and_a_save(tmp_path):
    g, queries, truth = filled({"type": "hnsw"})
    g.remove("c2")
    g.add("c2", "series_c2", queries[2:3], ["again.png"])
    g.add("newcomer", "", queries[:2], ["n0.png", "n1.png"])
    g.save(tmp_path)
    recorded = json.loads((tmp_path / "gallery.json").read_text())["rows"]["sha256"]
    assert recorded == file_sha256(tmp_path / "gallery.rows.npz")  # hashed while written: the bytes on disk
    back = Gallery.load(tmp_path)
    assert dict(back.rows) == dict(g.rows) and len(back.rows) == 203
    assert back.rows[240] == Row(240, "c2", "series_c2", "again.png") and 80 not in back.rows  # c2's first rows (80-119) are gone
    assert back.rows[0] == Row(0, "c0", "series_c0", "c0/0.png")
    assert back.characters() == g.characters() and back.search(queries, k=3) == g.search(queries, k=3)
    with pytest.raises(KeyError):
        back.rows[80]


def test_a_gallery_saved_with_the_json_row_list_still_loads(tmp_path):
    g, queries, _ = filled({"type": "hnsw"})
    g.remove("c1")
    g.save(tmp_path)
    meta = json.loads((tmp_path / "gallery.json").read_text())  # the format before the row file
    meta["rows"] = [asdict(r) for r in g.rows.values()]
    (tmp_path / "gallery.json").write_text(json.dumps(meta))
    (tmp_path / "gallery.rows.npz").unlink()
    old = Gallery.load(tmp_path)
    assert dict(old.rows) == dict(g.rows) and old.search(queries, k=3) == g.search(queries, k=3)
    old.add("later", "", queries[:1])
    old.save(tmp_path)  # saved again: the row file
    assert json.loads((tmp_path / "gallery.json").read_text())["rows"]["file"] == "gallery.rows.npz"
    assert Gallery.load(tmp_path).rows[old.next_id - 1].character == "later"


def test_a_missing_damaged_or_stale_row_file_is_a_one_line_error(tmp_path):
    g, _, _ = filled()
    g.save(tmp_path)
    rows = tmp_path / "gallery.rows.npz"
    good = rows.read_bytes()
    rows.write_bytes(good[:-10])
    with pytest.raises(GalleryError, match="does not match .*rebuild"):
        Gallery.load(tmp_path)
    meta = json.loads((tmp_path / "gallery.json").read_text())
    meta["rows"].pop("sha256")
    (tmp_path / "gallery.json").write_text(json.dumps(meta))
    with pytest.raises(GalleryError, match="not a readable row table"):
        Gallery.load(tmp_path)
    rows.write_bytes(good)
    meta["rows"]["rows"] = 7  # a row file from another save
    (tmp_path / "gallery.json").write_text(json.dumps(meta))
    with pytest.raises(GalleryError, match="lists 7"):
        Gallery.load(tmp_path)
    rows.unlink()
    with pytest.raises(GalleryError, match="missing .*copy the whole gallery folder"):
        Gallery.load(tmp_path)


def test_a_row_costs_a_few_dozen_bytes_not_hundreds():
    """200k rows: the table holds ~16 bytes of codes and offsets, 4 of member ids and the source's bytes per row;
    the dict of `Row` objects it replaced held 183 bytes a row (benchmarks/gallery_rows.py)."""
    n = 200_000
    chars = [f"char{i // 50:05d}" for i in range(n)]
    sources = [f"{c}/{i:08d}.png" for i, c in enumerate(chars)]  # 22 bytes each
    rows = list(zip(chars, [""] * n, sources))
    tracemalloc.start()
    table = RowTable()
    for a in range(0, n, 65_536):
        table.add(a, rows[a : a + 65_536])
    table_bytes = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert len(table) == n and table[n - 1] == Row(n - 1, chars[-1], "", sources[-1])
    assert table_bytes / n < 80, table_bytes / n


def test_a_big_table_maps_its_sources_instead_of_reading_them(tmp_path, monkeypatch):
    """From `MAP_MIN_ROWS` rows a loaded table reads codes only: the sources (here 8 MB) stay in the file until a
    row is shown, rows added later and removals survive the next save, and the answers are the same as read."""
    from anime_role_detect.recognition import rows as rows_mod

    n = 40_000
    chars = [f"char{i // 100:04d}" for i in range(n)]
    sources = [f"{c}/{i:08d}-{'x' * 180}.png" for i, c in enumerate(chars)]  # ~200 bytes each
    table = RowTable()
    table.add(0, list(zip(chars, [""] * n, sources)))
    table.save(tmp_path)

    def loaded(min_rows: int) -> tuple[RowTable, int]:
        tracemalloc.start()
        t = RowTable.load(tmp_path / "gallery.rows.npz", map_min_rows=min_rows)
        held = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        return t, held

    read, read_bytes = loaded(n + 1)
    mapped, mapped_bytes = loaded(n)
    assert read_bytes - mapped_bytes > 0.9 * sum(map(len, sources)), (read_bytes, mapped_bytes)
    assert mapped_bytes / n < 20, mapped_bytes / n  # codes (4 + 4) and member ids (4)
    for t in (read, mapped):
        assert dict(t) == dict(table) and t[n - 1] == Row(n - 1, chars[-1], "", sources[-1])
    mapped.remove("char0003")
    mapped.add(n, [("late", "s", "late.png"), ("char0001", "", "é.png")])
    mapped.save(tmp_path)  # over the file it maps
    monkeypatch.setattr(rows_mod, "MAP_MIN_ROWS", 0)  # what `Gallery.load` uses
    again = RowTable.load(tmp_path / "gallery.rows.npz")
    assert again[n] == Row(n, "late", "s", "late.png") and again[n + 1].source == "é.png" and 300 not in again
    assert again[299] == Row(299, "char0002", "", sources[299]) and len(again) == n - 100 + 2
    assert again.member_ids("char0001").tolist() == [*range(100, 200), n + 1]


def test_row_table_ids_follow_on():
    t = RowTable()
    t.add(0, [("a", "s", "a.png"), ("b", "", "b.png")])
    with pytest.raises(GalleryError, match="row id 5"):
        t.add(5, [("c", "", "c.png")])
    assert list(t) == [0, 1] and t.series == {"a": "s", "b": ""}
    assert np.array_equal(t.remove("a"), [0]) and list(t) == [1] and len(t) == 1 and DIM
