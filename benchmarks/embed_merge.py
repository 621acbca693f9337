"""Merging cluster embedding shards into a gallery: the in-memory merge vs the streamed one, same shards, same run.

`python -m anime_role_detect.cli.embed` (DDP ranks) leaves shards of ids + float32 vectors; rank 0 then builds
the gallery. Before, it read every vector into memory, sorted them (a second copy) and built the gallery in one
add, whose IVF-PQ vector file was held in memory until saved: about 12 x dim bytes per row (15.6 KB at dim
1280, measured here), so a 10M-image archive needed ~145 GiB on the merging machine. `predict.gallery_from_shards` copies one shard part at a time
into a float32 scratch file in gallery order, adds chunks to an index trained on a sample of the whole gallery,
and spills the vector file to disk as it grows (renamed into place on save).

This writes synthetic shards as `--world` DDP ranks would (rank r holds rows r, r+world, ...; vectors from
gallery_scale.py's `CharacterCloud`, clustered like characters), then builds and saves the gallery twice, each in
a fresh process: the old merge (reconstructed from the same library calls: `shards.merge_shards`, then one
`Gallery.add_rows` of every row, the vector file never spilled) and `gallery_from_shards`. Reported: wall seconds,
peak anonymous memory (the process's own; sampled every 20 ms), peak file-backed resident pages (page cache the
kernel can drop), and whether both galleries answer 500 queries with the same characters and scores.

    python benchmarks/embed_merge.py                                  # 200k and 1M rows, dim 1280, IVF-PQ (~20 min, 13 GB disk)
    python benchmarks/embed_merge.py --rows 20000 50000 --dim 128     # quick
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from _common import quiet
from gallery_scale import DEFAULT_DIM, CharacterCloud

QUERIES = 500


def status_kb(*keys: str) -> dict[str, int]:
    """Fields of /proc/self/status in kB (RssAnon: the process's own memory; RssFile: mapped file pages)."""
    out: dict[str, int] = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            name, _, rest = line.partition(":")
            if name in keys:
                out[name] = int(rest.split()[0])
    return out


class PeakMemory:
    """Samples RssAnon and RssFile every `every` seconds in a thread and keeps the maxima (MB)."""

    def __init__(self, every: float = 0.02) -> None:
        self.every, self.anon, self.file = every, 0.0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            s = status_kb("RssAnon", "RssFile")
            self.anon = max(self.anon, s.get("RssAnon", 0) / 1024)
            self.file = max(self.file, s.get("RssFile", 0) / 1024)
            self._stop.wait(self.every)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def write_shards(work: Path, cloud: CharacterCloud, world: int, rows_per_part: int) -> list[tuple[str, str, str]]:
    """Shards as `world` ranks write them, without all rows in memory; returns the dataset's (character, series, id) rows."""
    from anime_role_detect.fsutil import atomic_write_json
    from anime_role_detect.recognition.shards import done_name, part_name, save_part

    d = work / "shards"
    d.mkdir(parents=True, exist_ok=True)
    chars = np.empty(cloud.rows, np.int32)
    parts = [0] * world
    for start, x, c in cloud.chunks(world * rows_per_part):
        chars[start : start + len(x)] = c
        ids = np.array([f"c{k:06d}/{start + i:08d}.png" for i, k in enumerate(c)])
        for r in range(world):
            if len(ids[r::world]):
                save_part(d / part_name(r, parts[r]), ids[r::world], x[r::world])
                parts[r] += 1
    for r in range(world):
        rows = len(range(r, cloud.rows, world))
        atomic_write_json(d / done_name(r), {"rank": r, "world_size": world, "rows": rows, "parts": parts[r], "embedder_id": "bench:cloud",
                                             "dim": cloud.dim, "seconds": 0.0, "errors": []})
    return sorted(((f"c{k:06d}", "", f"c{k:06d}/{i:08d}.png") for i, k in enumerate(chars.tolist())), key=lambda r: r[2])


def child(args: argparse.Namespace) -> None:
    """One merge in this fresh process: build, save, answer the queries; prints one JSON line."""
    quiet()
    import faiss

    from anime_role_detect.recognition import vector_file
    from anime_role_detect.recognition.gallery import Gallery
    from anime_role_detect.recognition.predict import gallery_from_shards, gallery_order
    from anime_role_detect.recognition.shards import merge_shards

    faiss.omp_set_num_threads(args.threads)
    work, out = Path(args.work), Path(args.work) / args.child
    rows = [tuple(r) for r in json.loads((work / "rows.json").read_text())]
    index = {"type": args.index}
    base = status_kb("RssAnon").get("RssAnon", 0) / 1024  # the interpreter, libraries and the rows list
    t0 = time.perf_counter()
    with PeakMemory() as peak:
        if args.child == "in_memory":  # the merge before gallery_from_shards, from the same library calls
            vector_file.SPILL_ROWS = 1 << 62  # an IVF-PQ vector file was held in memory until saved
            ids, vectors, info = merge_shards(work / "shards")
            by_id = {r[2]: r for r in rows}
            meta = [by_id[i] for i in ids]
            order = gallery_order([m[0] for m in meta])
            g = Gallery(info["embedder_id"], info["dim"], None, index)
            g.add_rows(vectors[order], [meta[i][0] for i in order], [meta[i][1] for i in order], [meta[i][2] for i in order],
                       expected_rows=len(order))
            del vectors
        else:
            g = gallery_from_shards(work / "shards", rows, out, None, {"index": index}, spill_dir=out)
        g.save(out)
        seconds = time.perf_counter() - t0
    q = np.load(work / "queries.npy")
    answers = [[(c, round(s, 4)) for c, _, s in res] for res in g.search(q, k=3)]
    print(json.dumps({"seconds": round(seconds, 1), "peak_anon_mb": round(peak.anon), "peak_file_mb": round(peak.file),
                      "base_anon_mb": round(base), "kind": g.kind, "rows": len(g), "answers": answers,
                      "disk_mb": round(sum(p.stat().st_size for p in out.iterdir()) / 2**20)}), flush=True)


def run_size(args: argparse.Namespace, rows_n: int) -> dict[str, dict]:
    """Shards of `rows_n` rows, then each merge in its own fresh process; the shards are removed after."""
    work = Path(tempfile.mkdtemp(prefix="embed_merge_", dir=args.workdir))
    try:
        cloud = CharacterCloud(rows_n, args.dim, args.rows_per_class, 0.60, 0.30, 1.0, 256, 0)  # gallery_scale.py defaults
        t0 = time.perf_counter()
        rows = write_shards(work, cloud, args.world, args.rows_per_part)
        (work / "rows.json").write_text(json.dumps(rows))
        del rows
        np.save(work / "queries.npy", cloud.queries(QUERIES)[0])
        shard_mb = sum(p.stat().st_size for p in (work / "shards").iterdir()) / 2**20
        print(f"{rows_n:,} rows: shards written in {time.perf_counter() - t0:.0f} s, {shard_mb:,.0f} MB", flush=True)
        res: dict[str, dict] = {}
        for name in ("in_memory", "streamed"):
            cmd = [sys.executable, __file__, "--child", name, "--work", str(work), "--index", args.index, "--threads", str(args.threads)]
            p = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if p.returncode != 0:
                tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
                res[name] = {"failed": f"exit {p.returncode}: {tail[:200]}"}
            else:
                res[name] = json.loads(p.stdout.strip().splitlines()[-1])
            print(f"  {name}: {res[name].get('seconds', '-')} s, peak own memory {res[name].get('peak_anon_mb', '-')} MB "
                  f"{res[name].get('failed', '')}", flush=True)
            shutil.rmtree(work / name, ignore_errors=True)
        return res
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(args: argparse.Namespace, results: dict[int, dict[str, dict]], load0: tuple[float, float, float]) -> None:
    print("\n| rows | merge | seconds | peak own memory MB (RssAnon) | of which before the merge | peak file pages MB | gallery on disk MB | same answers |")
    print("|---|---|---|---|---|---|---|---|")
    for n, res in results.items():
        old, new = res["in_memory"], res["streamed"]
        same = "-"
        if "failed" not in old and "failed" not in new:
            chars = np.mean([[c for c, _ in a] == [c for c, _ in b] for a, b in zip(old["answers"], new["answers"])])
            diff = max(abs(x[1] - y[1]) for a, b in zip(old["answers"], new["answers"]) for x, y in zip(a, b))
            same = f"top-3 characters {chars:.1%} of {QUERIES}, scores within {diff:.4f}"
        for name, r in (("in memory (before)", old), ("streamed", new)):
            if "failed" in r:
                print(f"| {n:,} | {name} | failed: {r['failed']} | | | | | |")
            else:
                print(f"| {n:,} | {name} | {r['seconds']} | {r['peak_anon_mb']:,} | {r['base_anon_mb']:,} | {r['peak_file_mb']:,} | "
                      f"{r['disk_mb']:,} | {same if name == 'streamed' else ''} |")
    sizes = [n for n in results if all("failed" not in r for r in results[n].values())]
    if len(sizes) >= 2:
        lo, hi = min(sizes), max(sizes)
        for name in ("in_memory", "streamed"):
            grow = [results[n][name]["peak_anon_mb"] - results[n][name]["base_anon_mb"] for n in (lo, hi)]
            per_row = (grow[1] - grow[0]) / (hi - lo) * 2**20
            fixed = grow[0] - per_row * lo / 2**20
            print(f"{name}: merge memory {per_row:,.0f} B per row + {fixed:,.0f} MB (from {lo:,} and {hi:,} rows); "
                  f"10M rows: {(per_row * 1e7 / 2**20 + fixed) / 1024:,.1f} GiB (projected)")
        r_hi = results[hi]
        print(f"at {hi:,} rows, streamed / in memory: time {r_hi['streamed']['seconds'] / r_hi['in_memory']['seconds']:.2f}x, "
              f"peak own memory {r_hi['streamed']['peak_anon_mb'] / r_hi['in_memory']['peak_anon_mb']:.2f}x")
    load1 = os.getloadavg()
    print(f"\nload average at start {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}, at end {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[200_000, 1_000_000], help="gallery sizes (two or more: memory per row from the slope)")
    ap.add_argument("--dim", type=int, default=DEFAULT_DIM)
    ap.add_argument("--rows-per-class", type=int, default=100)
    ap.add_argument("--world", type=int, default=4, help="DDP ranks that wrote the shards")
    ap.add_argument("--rows-per-part", type=int, default=65_536, help="rows per shard part (the embed CLI's default)")
    ap.add_argument("--index", default="ivfpq", help="gallery index type (auto picks HNSW below 2M rows: its graph keeps float32 vectors)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", default=None, help="where the shards and galleries go (default: the temp folder; removed after each size)")
    ap.add_argument("--child", choices=["in_memory", "streamed"], help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args)
        return 0
    load0 = os.getloadavg()
    print(f"# embed merge: sizes {args.rows}, dim {args.dim}, {args.world} ranks, {args.rows_per_part:,} rows per part, "
          f"index {args.index}; load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}", flush=True)
    results = {n: run_size(args, n) for n in sorted(args.rows)}
    report(args, results, load0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
