"""A gallery's row records: the column table (`recognition.rows.RowTable`, gallery.rows.npz) vs one object per row.

Baseline, built in the same run: what `Gallery` held before 2026-12-03 (a dict of `Row` objects plus each
character's list of ids) and the JSON row list gallery.json carried (written indented by `atomic_write_json`,
read by `Gallery.load`'s old-format path). Reported at `--rows` rows: traced memory per row (tracemalloc; the
caller's strings are not counted: objects point at them, the table copies their bytes, which it counts), and
wall seconds to save and load a flat gallery of those rows (dim 4, so the rows dominate).

    python benchmarks/gallery_rows.py                 # 1M rows
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

    _, old_bytes = traced(objects)
    _, new_bytes = traced(columns)

    work = Path(tempfile.mkdtemp(prefix="gallery_rows_"))
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
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load1 = os.getloadavg()
    print(f"# gallery rows: {n:,} rows, {n // args.per_character:,} characters, 22-byte sources; "
          f"load average {load0[0]:.2f} at start, {load1[0]:.2f} at end\n")
    print("| rows kept as | bytes per row (traced) | save s | load s |")
    print("|---|---|---|---|")
    print(f"| one object per row, JSON row list (before) | {old_bytes / n:,.0f} | {save_old:.2f} | {load_old:.2f} |")
    print(f"| columns, gallery.rows.npz | {new_bytes / n:,.0f} | {save_new:.2f} | {load_new:.2f} |")
    print(f"\ncolumns / objects: memory {new_bytes / old_bytes:.2f}x, save {save_new / save_old:.2f}x, load {load_new / load_old:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
