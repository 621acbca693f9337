"""Big uploads: a version answering pictures the size of camera photos and booru originals, every pixel decoded
against the drafted decode recognition uses (`imageio.RECOGNITION_LIMITS`: a JPEG decoded at 1/2, 1/4 or 1/8 scale,
its shorter side kept >= 768 px). Same pictures, same recognizer settings otherwise, timed alternately in one run.

Pictures: `--n` of a real set, each enlarged `--scale` times (bicubic, aspect kept, under the 40 MP guard) and saved
as a JPEG (quality 92) in memory, the way an archive keeps its originals. Reports per picture the median decode and
end-to-end milliseconds (`Recognizer.recognize_bytes`, answers uncached) both ways, their ratio, and how often the
two answers name the same character (and their largest score difference).

    python benchmarks/big_pictures.py --version outputs/registry/versions/<id> --set mixed5 --n 40 --scale 4
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
from pathlib import Path

from _common import data_dir, quiet


def enlarged_jpegs(root: Path, n: int, scale: float) -> list[tuple[str, bytes, tuple[int, int]]]:
    """`n` pictures of `root` (every k-th, sorted), enlarged `scale` times, as JPEG bytes with their size."""
    from PIL import Image

    from anime_role_detect.data.layout import scan_dataset
    from anime_role_detect.imageio import DEFAULT_LIMITS, load_image

    records = scan_dataset(root)
    picks = records[:: max(1, len(records) // n)][:n]
    out = []
    for r in picks:
        img = load_image(r.path(root))
        k = min(scale, (DEFAULT_LIMITS.max_pixels * 0.95 / (img.width * img.height)) ** 0.5)
        big = img.resize((round(img.width * k), round(img.height * k)), Image.BICUBIC)
        buf = io.BytesIO()
        big.save(buf, format="JPEG", quality=92)
        out.append((r.file_name, buf.getvalue(), big.size))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--version", type=Path, required=True, help="a version folder (the workflow's, or accuracy.py's version-recipe)")
    ap.add_argument("--set", default="mixed5", help="a real set under $ARD_DATA_DIR")
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--scale", type=float, default=4.0, help="enlargement of each picture")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    quiet(args.threads)
    from anime_role_detect.imageio import RECOGNITION_DRAFT_SIDE
    from anime_role_detect.recognition.pipeline import Recognizer

    load0 = os.getloadavg()[0]
    pictures = enlarged_jpegs(data_dir() / args.set, args.n, args.scale)
    sides = sorted(min(s) for _, _, s in pictures)
    recs = {side: Recognizer.from_version(args.version, {"cache_size": 0, "limits": {"draft_side": side}})
            for side in (0, RECOGNITION_DRAFT_SIDE)}
    for rec in recs.values():  # load every part before timing
        rec.recognize_bytes(pictures[0][1], "warm-up")
    times: dict[int, dict[str, list[float]]] = {s: {"decode": [], "total": []} for s in recs}
    same, worst = 0, 0.0
    for i, (name, data, _) in enumerate(pictures):
        order = list(recs) if i % 2 == 0 else list(recs)[::-1]  # alternate who goes first
        got = {}
        for side in order:
            got[side] = recs[side].recognize_bytes(data, name)
            for key in ("decode", "total"):
                times[side][key].append(got[side].timings_ms[key])
        a, b = got[0], got[RECOGNITION_DRAFT_SIDE]
        same += a.role == b.role
        worst = max(worst, abs(a.similarity - b.similarity))
    full, draft = (statistics.median(times[s]["total"]) for s in (0, RECOGNITION_DRAFT_SIDE))
    print(f"# {len(pictures)} pictures of {args.set} enlarged {args.scale:g}x (shorter side {sides[0]}-{sides[-1]} px, JPEG q92), "
          f"version {args.version.name}, mode {recs[0].mode}; load average {load0:.2f} at start, {os.getloadavg()[0]:.2f} at end")
    print("| decode | decode ms (median) | end to end ms (median) |\n|---|---|---|")
    for side, label in ((0, "every pixel"), (RECOGNITION_DRAFT_SIDE, f"drafted (draft_side {RECOGNITION_DRAFT_SIDE})")):
        print(f"| {label} | {statistics.median(times[side]['decode']):.1f} | {statistics.median(times[side]['total']):.1f} |")
    print(f"drafted / every pixel, end to end: {draft / full:.2f}x; same character named on {same} of {len(pictures)} "
          f"pictures, largest score difference {worst:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
