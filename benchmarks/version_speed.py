"""Images/second of two versions of one `accuracy.py` run on the same set-aside pictures, timed interleaved.

What a change of recipe costs at recognition (e.g. the head + figure views' second forward pass): both versions
answer the run's set-aside pictures in their default mode, as `accuracy.py` scores them (torch runtime, batches of
32, open-set off), alternately for `--repeats` passes; the best pass of each gives images/s, and the ratio is the
second version's to the first's, taken in the same run with the load average printed.

    python benchmarks/accuracy.py --sets newgame_full --seeds 0 --recipes figure recipe --protocols closed
    python benchmarks/version_speed.py outputs/benchmarks/accuracy/work/newgame_full/closed/s0/t0.2 figure recipe
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from _common import data_dir, quiet
from accuracy import answers, load, recognizer


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="an accuracy.py run folder (<work>/<set>/closed/s<seed>/t<fraction>)")
    ap.add_argument("baseline", help="the first version's recipe name (its folder: version-<name>)")
    ap.add_argument("candidate", help="the second version's recipe name")
    ap.add_argument("--root", type=Path, default=None, help="the set's folder (default: $ARD_DATA_DIR/<set>)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    args = ap.parse_args(argv)
    quiet(args.threads)
    root = args.root or data_dir() / args.run.parts[-4]
    split = args.run / "test_split.json"
    if not split.is_file():
        print(f"{split} not found: give an accuracy.py run folder scored on set-aside pictures", file=sys.stderr)
        return 2
    items = load(root, json.loads(split.read_text())["test"])
    recs = {n: recognizer(args.run / f"version-{n}", openset=False) for n in (args.baseline, args.candidate)}
    for rec in recs.values():
        answers(rec, items[:4], None)  # load the networks before timing
    load0 = os.getloadavg()[0]
    best = dict.fromkeys(recs, float("inf"))
    for _ in range(args.repeats):
        for name, rec in recs.items():
            t0 = time.perf_counter()
            answers(rec, items, None)
            best[name] = min(best[name], time.perf_counter() - t0)
    ips = {n: len(items) / s for n, s in best.items()}
    print(f"# {args.run}: {len(items)} pictures, default mode, best of {args.repeats} interleaved passes; "
          f"load average {load0:.2f} -> {os.getloadavg()[0]:.2f}")
    for name, v in ips.items():
        print(f"{name:>12s}  {v:6.1f} images/s")
    print(f"ratio {args.candidate} / {args.baseline}: {ips[args.candidate] / ips[args.baseline]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
