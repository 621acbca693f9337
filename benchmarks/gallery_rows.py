"""A gallery's row records: the column table (`recognition.rows.RowTable`, gallery.rows.npz) vs one object per row.

Baseline, built in the same run: what `Gallery` held before 2026-12-03 (a dict of `Row` objects plus each
character's list of ids) and the JSON row list gallery.json carried (written indented by `atomic_write_json`,
read by `Gallery.load`'s old-format path). Reported at `--rows` rows: traced memory per row (tracemalloc; the
caller's strings are not counted: objects point at them, the table copies their bytes, which it counts), and
wall seconds to save and load a flat gallery of those rows (dim 4, so the rows dominate). Then the memory a
loaded table holds, sources read against sources mapped from the file (`RowTable.load`, `MAP_MIN_ROWS`).

    python benchmarks/gallery_rows.py                 # 1M rows
    python benchmarks/gallery_rows.py --rows 10000000 --no-objects   # the loaded table at 10M rows only
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from _common import quiet


@dataclass
class FormerRow:
    """`gallery.Row` as it was before the column table (a plain dataclass: one __dict__ per row)."""

    id: int
    character: str
    series: str = ""
    source: str = ""


def traced(build) -> tuple[object, int]:
    tracemalloc.start()
    obj = build()
    size = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return obj, size


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--per-character", type=int, default=100)
    ap.add_argument("--no-objects", action="store_true", help="skip the one-object-per-row baseline and the save/load timings")
    args = ap.parse_args(argv)
    quiet()
    from anime_role_detect.fsutil import atomic_write_json
    from anime_role_detect.recognition.gallery import Gallery
    from anime_role_detect.recognition.rows import RowTable

    n = args.rows
    load0 = os.getloadavg()
    chars = [f"c{i // args.per_character:06d}" for i in range(n)]
    rows = [(c, "", f"{c}/{i:08d}.png") for i, c in enumerate(chars)]

    def objects() -> tuple[dict, dict]:
        table: dict[int, FormerRow] = {}
        members: dict[str, list[int]] = {}
        for i, (c, s, src) in enumerate(rows):
            table[i] = FormerRow(i, c, s, src)
            members.setdefault(c, []).append(i)
        return table, members

    def columns() -> RowTable:
        t = RowTable()
        t.add(0, rows)
        return t

    work = Path(tempfile.mkdtemp(prefix="gallery_rows_"))
    if args.no_objects:
        try:
            return loaded_table(columns(), n, work, load0)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    _, old_bytes = traced(objects)
    table, new_bytes = traced(columns)
    try:
        g = Gallery("bench:rows", 4, index={"type": "flat"})
        g.add_rows(np.random.default_rng(0).standard_normal((n, 4)).astype(np.float32), chars, None, [r[2] for r in rows])
        t0 = time.perf_counter()
        g.save(work)
        save_new = time.perf_counter() - t0
        t0 = time.perf_counter()
        Gallery.load(work)
        load_new = time.perf_counter() - t0
        meta = json.loads((work / "gallery.json").read_text())
        t0 = time.perf_counter()  # the former save: the row list inside gallery.json
        meta["rows"] = [{"id": r.id, "character": r.character, "series": r.series, "source": r.source} for r in g.rows.values()]
        atomic_write_json(work / "gallery.json", meta)
        save_old = time.perf_counter() - t0
        (work / "gallery.rows.npz").unlink()
        t0 = time.perf_counter()
        Gallery.load(work)
        load_old = time.perf_counter() - t0
        (work / "gallery.rows.npz").unlink(missing_ok=True)
        report_formats(n, args.per_character, load0, old_bytes, new_bytes, save_old, save_new, load_old, load_new)
        return loaded_table(table, n, work, None)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report_formats(n: int, per_character: int, load0: tuple[float, ...], old_bytes: int, new_bytes: int,
                   save_old: float, save_new: float, load_old: float, load_new: float) -> None:
    load1 = os.getloadavg()
    print(f"# gallery rows: {n:,} rows, {n // per_character:,} characters, 22-byte sources; "
          f"load average {load0[0]:.2f} at start, {load1[0]:.2f} at end\n")
    print("| rows kept as | bytes per row (traced) | save s | load s |")
    print("|---|---|---|---|")
    print(f"| one object per row, JSON row list (before) | {old_bytes / n:,.0f} | {save_old:.2f} | {load_old:.2f} |")
    print(f"| columns, gallery.rows.npz | {new_bytes / n:,.0f} | {save_new:.2f} | {load_new:.2f} |")
    print(f"\ncolumns / objects: memory {new_bytes / old_bytes:.2f}x, save {save_new / save_old:.2f}x, load {load_new / load_old:.2f}x")


def loaded_table(table, n: int, work: Path, load0: tuple[float, ...] | None) -> int:
    """Traced bytes per row of a loaded table: sources read into memory vs mapped from gallery.rows.npz."""
    from anime_role_detect.recognition.rows import RowTable

    path, _ = table.save(work)
    del table
    read, read_bytes = traced(lambda: RowTable.load(path, map_min_rows=n + 1))
    mapped, mapped_bytes = traced(lambda: RowTable.load(path, map_min_rows=0))
    assert read[n - 1] == mapped[n - 1]
    del read, mapped
    times = {}
    for name, at in (("read", n + 1), ("mapped", 0)):  # untraced: tracemalloc slows every allocation
        t0 = time.perf_counter()
        RowTable.load(path, map_min_rows=at)
        times[name] = time.perf_counter() - t0
    if load0 is not None:
        print(f"# gallery rows, loaded: {n:,} rows, 22-byte sources, file {path.stat().st_size / 2**20:,.0f} MB; load average "
              f"{load0[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end\n")
    print("\n| loaded table | bytes per row (traced) | MB at this size |\n|---|---|---|")
    print(f"| sources read | {read_bytes / n:,.1f} | {read_bytes / 2**20:,.0f} |")
    print(f"| sources mapped (from {n:,} rows at MAP_MIN_ROWS) | {mapped_bytes / n:,.1f} | {mapped_bytes / 2**20:,.0f} |")
    print(f"\nmapped / read: memory {mapped_bytes / read_bytes:.2f}x; load {times['mapped']:.2f} s against {times['read']:.2f} s "
          f"({times['mapped'] / times['read']:.2f}x; the file from the page cache)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
