"""What a killed gallery embedding pays to resume: finding the images its finished parts lack, against embedding them.

Writes the parts two DDP ranks killed half way through `--images` would leave (rank r holds rows r, r+2, ...; parts
of 65,536 rows at `--dim`, written by `shards.save_part`), then times `predict.resume_state` (the parts' ids read
without their vectors, `np.isin` against every wanted id). The baseline, measured in the same run: the frozen
Lite0 embedder's images/s through the real Lightning predict (`predict_embeddings`, one process) on `--sample`
synthetic pictures, from which the time to embed the images left again follows.

    python benchmarks/embed_resume.py                       # 1M images, dim 1280 (~2.5 GB of parts in a temp folder)
    python benchmarks/embed_resume.py --images 100000 --dim 128
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import LITE0, quiet

from anime_role_detect.recognition.predict import predict_embeddings, resume_state
from anime_role_detect.recognition.shards import RUN_FILE, part_name, save_part

PART_ROWS = 65_536


def killed_half_way(d: Path, ids: list[str], dim: int, world: int = 2) -> dict:
    """The parts `world` ranks leave when killed after embedding the first half of `ids`; returns the run record."""
    run = {"embedder": "bench", "images": "bench", "world_size": world}
    d.mkdir(parents=True)
    (d / RUN_FILE).write_text(json.dumps(run))
    rng = np.random.default_rng(0)
    for r in range(world):
        mine = ids[r:len(ids) // 2:world]
        for k in range(0, len(mine), PART_ROWS):
            rows = mine[k:k + PART_ROWS]
            save_part(d / part_name(r, k // PART_ROWS), rows, rng.standard_normal((len(rows), dim), np.float32))
    return run


def embedding_rate(work: Path, n: int) -> float:
    """Images/s of the frozen Lite0 embedder through the Lightning predict, model loading left out."""
    from anime_role_detect.data.synthetic import generate_dataset

    root = work / "pictures"
    generate_dataset(root, n_characters=4, images_per_character=max(1, n // 4), size=256, seed=0)
    items = [(str(p.relative_to(root)), p) for p in sorted(root.glob("*/*.png"))]
    predict_embeddings(items[:8], LITE0, work / "warm", {"accelerator": "cpu", "devices": 1}, batch_size=32, num_workers=0)
    predict_embeddings(items, LITE0, work / "shards", {"accelerator": "cpu", "devices": 1}, batch_size=32, num_workers=0)
    seconds = json.loads((work / "shards" / "rank-00000.done.json").read_text())["seconds"]
    return len(items) / max(seconds, 1e-9)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--sample", type=int, default=128, help="pictures embedded for the baseline's images/s")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    quiet(args.threads)
    load0 = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="embed_resume_"))
    try:
        ids = [f"character_{i % 5000:05d}/danbooru_{i:09d}.jpg" for i in range(args.images)]
        items = [(i, Path("/archive") / i) for i in ids]
        run = killed_half_way(work / "killed", ids, args.dim)
        t0 = time.perf_counter()
        left = resume_state(work / "killed", run, items)
        scan = time.perf_counter() - t0
        rate = embedding_rate(work, args.sample)
        again = len(left) / rate
        print(f"load average {load0[0]:.2f} -> {os.getloadavg()[0]:.2f}; {args.images:,} images, dim {args.dim}, 2 ranks killed half way")
        print(f"resume_state: {len(left):,} images left, found in {scan:.2f} s (one rank; each rank does this)")
        print(f"baseline: frozen Lite0 embeds {rate:.1f} images/s per process here; the {len(left):,} left take "
              f"{again / 3600:.1f} h on one process, {again / 7200:.1f} h on two")
        print(f"ratio: finding what is left costs {scan / (again / 2):.2e} x embedding it again on two processes")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
