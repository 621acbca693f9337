"""How long a version's gallery stage takes with its embeddings on torch vs on ONNX Runtime, timed interleaved.

The workflow's gallery stage (`recognition.build.build_recognition_folder` with the workflow's ``gallery`` config,
its split seed and ``onnx: true``) builds a version from a dataset folder and a trained checkpoint twice per round:
``gallery.build.runtime=torch`` (before 2026-12-06: torch embeds the gallery and val pictures, the export comes last)
and ``auto`` (the default: the classifier is exported first and ONNX Runtime embeds with it). Rounds alternate the
order; the best round of each gives the time, and the ratio is taken in the same run with the load average printed.
Both versions are checked to hold the same rows and the same characters' thresholds.

    python benchmarks/build_speed.py --data <workflow work dir>/dataset --ckpt <registry version>/model.ckpt
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import quiet

RUNTIMES = ("torch", "auto")


def build(data: Path, ckpt: Path, out: Path, runtime: str, threads: int) -> float:
    """Seconds for the workflow's gallery stage into `out` with ``gallery.build.runtime=runtime``."""
    from anime_role_detect.confutil import compose_plain
    from anime_role_detect.recognition.build import build_recognition_folder

    wf = compose_plain("workflow", [f"gallery.build.runtime={runtime}"])
    g = wf["gallery"]
    cfg = {"embedder": g.get("embedder"), "tagger": g.get("tagger"), "gallery_build": g.get("build") or {}}
    if out.exists():
        shutil.rmtree(out)
    t = time.perf_counter()
    build_recognition_folder(data, out, cfg, model_ckpt=ckpt, val_fraction=float(wf["split"]["val_fraction"]),
                             seed=int(wf["split"]["seed"]), target_far=float(g.get("target_far", 0.05)),
                             max_false_reject=float(g.get("max_false_reject", 0.02)), dedupe=False,
                             include_val=bool(g.get("include_val", True)), onnx=True)
    return time.perf_counter() - t


def same_version(a: Path, b: Path) -> str:
    """A one-line comparison of two built versions: rows, and the largest threshold difference."""
    from anime_role_detect.recognition.gallery import Gallery
    from anime_role_detect.recognition.openset import OpenSetCalibration

    ga, gb = Gallery.load(a), Gallery.load(b)
    ca, cb = OpenSetCalibration.load(a), OpenSetCalibration.load(b)
    diff = max(abs(ca.modes[m].threshold - cb.modes[m].threshold) for m in ca.modes)
    return f"rows {len(ga)} vs {len(gb)}, same embedder id: {ga.embedder_id == gb.embedder_id}, largest threshold difference {diff:.2e}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="a dataset folder (the workflow's <work>/dataset)")
    ap.add_argument("--ckpt", type=Path, required=True, help="the classifier checkpoint trained on it (a version's model.ckpt)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    quiet(args.threads)
    from anime_role_detect.data.layout import scan_dataset

    print(f"# gallery stage on {args.data} ({len(scan_dataset(args.data))} pictures); load average {os.getloadavg()[0]:.2f}")
    best: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="ard-build-speed-") as tmp:
        for r in range(args.rounds):
            for runtime in RUNTIMES if r % 2 == 0 else RUNTIMES[::-1]:
                s = build(args.data, args.ckpt, Path(tmp) / runtime, runtime, args.threads)
                best[runtime] = min(best.get(runtime, np.inf), s)
                print(f"round {r}: runtime={runtime:5s} {s:6.1f} s (load average {os.getloadavg()[0]:.2f})", flush=True)
        print(same_version(Path(tmp) / "torch", Path(tmp) / "auto"))
    print(f"best of {args.rounds}: torch {best['torch']:.1f} s, auto (ONNX Runtime) {best['auto']:.1f} s: "
          f"{best['auto'] / best['torch']:.2f}x the time; load average at end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
