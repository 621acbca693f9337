"""Several square crops of a non-square picture instead of its centre crop: does a version name more pictures?

A version frames a query picture as its centre square (`data.resize=center_crop`), so a character at the side
of a wide illustration can fall outside it. This scores each set-aside picture of `accuracy.py`'s versions
on its centre crop and on the two squares at its ends (left and right of a wide picture, top and bottom of a
tall one; a picture within `--aspect` of square keeps its centre), through the real `Recognizer` in clip and
model modes, and combines the crops' per-character scores by rule:

- ``centre``: the picture alone, as the version answers today;
- ``mean3``: the mean of the centre's and the two ends' scores;
- ``ends``: the mean of the two ends' scores;
- ``max3``: each character's best score over the three.

Fusion blends the gallery's probabilities and the classifier's with the version's own fitted weight. Top-1 %
on the set-aside pictures; the face sets' 96 px squares have no ends to crop.

    python benchmarks/multicrop.py --work outputs/benchmarks/accuracy/work --sets newgame_full mixed5
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
from _common import data_dir, quiet
from accuracy import load
from fusion_blends import built_version, score_matrix
from PIL import Image

RULES = ("centre", "mean3", "ends", "max3")
MODES = ("clip", "model", "fusion")


def ends(img: Image.Image, aspect: float) -> tuple[Image.Image, Image.Image]:
    """The two squares at a non-square picture's ends (left/right or top/bottom); the picture twice when near square."""
    w, h = img.size
    if w > aspect * h:
        return img.crop((0, 0, h, h)), img.crop((w - h, 0, w, h))
    if h > aspect * w:
        return img.crop((0, 0, w, w)), img.crop((0, h - w, w, h))
    return img, img


def crop_scores(version: Path, root: Path, files: list[str], aspect: float, cache: Path) -> dict[str, np.ndarray]:
    """Clip and model score matrices of the centre (``c_``) and both ends (``a_``, ``b_``), cached beside the version."""
    if cache.is_file():
        return dict(np.load(cache))
    from anime_role_detect.recognition.pipeline import Recognizer

    rec = Recognizer.from_version(version, {"detector": None, "cache_size": 0, "rerank": False, "topk": 1000,
                                            "openset": {"enabled": False}})
    names = sorted(c["name"] for c in rec.characters())
    items = load(root, files)
    cut = [ends(img, aspect) for img, _ in items]
    out = {"y": np.array([names.index(f.split("/")[0]) for f in files]), "T": np.array(rec.gallery_temperature() or 0.0)}
    for mode in ("clip", "model"):
        out[f"c_{mode}"] = score_matrix(rec, items, mode, names)
        out[f"a_{mode}"] = score_matrix(rec, [(a, f) for (a, _), f in zip(cut, files)], mode, names)
        out[f"b_{mode}"] = score_matrix(rec, [(b, f) for (_, b), f in zip(cut, files)], mode, names)
    tmp = cache.with_suffix(".part")
    with open(tmp, "wb") as f:  # a killed run leaves no half-written cache
        np.savez(f, **out)
    os.replace(tmp, cache)
    return out


def rule_top1(s: dict[str, np.ndarray], w: float) -> dict[str, dict[str, float]]:
    """Top-1 % of each rule in each mode."""
    from anime_role_detect.recognition.openset import gallery_probabilities

    T = float(s["T"]) or None

    def probs(view: str, mode: str) -> np.ndarray:
        x = s[f"{view}_{mode}"]
        return np.stack([gallery_probabilities(r, T) for r in x]) if mode == "clip" else x

    got: dict[str, dict[str, float]] = {}
    for rule in RULES:
        per_mode = {}
        for mode in ("clip", "model"):
            c, a, b = (probs(v, mode) for v in "cab")
            per_mode[mode] = {"centre": c, "mean3": (c + a + b) / 3, "ends": (a + b) / 2,
                              "max3": np.maximum(np.maximum(c, a), b)}[rule]
        per_mode["fusion"] = w * per_mode["clip"] + (1 - w) * per_mode["model"]
        got[rule] = {m: 100 * float(np.mean(p.argmax(1) == s["y"])) for m, p in per_mode.items()}
    return got


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="accuracy.py's --work folder")
    ap.add_argument("--sets", nargs="+", default=["newgame_full", "mixed5"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--recipe", default="recipe")
    ap.add_argument("--aspect", type=float, default=1.2, help="a picture this far from square gets end crops")
    ap.add_argument("--test-fraction", type=float, default=0.2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: all cores)")
    args = ap.parse_args(argv)
    quiet(args.threads)
    print(f"# multi-crop of version-{args.recipe}; load average {os.getloadavg()[0]:.2f}; top-1 % on set-aside pictures")
    print("| set | seed | " + " | ".join(f"{r} {m}" for r in RULES for m in MODES) + " |\n|---|---|" + "---|" * len(RULES) * len(MODES))
    per_set: dict[str, list[dict[str, dict[str, float]]]] = {}
    for name in args.sets:
        for seed in args.seeds:
            run = args.work / name / "closed" / f"s{seed}" / f"t{args.test_fraction:g}"
            version = built_version(run, args.recipe)
            if version is None:
                print(f"skip {run}: no version-{args.recipe} (run benchmarks/accuracy.py first)", file=sys.stderr)
                continue
            files = json.loads((run / "test_split.json").read_text())["test"]
            w = float(json.loads((version / "calibration.json").read_text()).get("gallery_weight") or 0.5)
            s = crop_scores(version, data_dir() / name, files, args.aspect, version.parent / f"crop-scores-{args.recipe}.npz")
            got = rule_top1(s, w)
            per_set.setdefault(name, []).append(got)
            print(f"| {name} | {seed} | " + " | ".join(f"{got[r][m]:.1f}" for r in RULES for m in MODES) + " |", flush=True)
    for name, runs in per_set.items():
        print(f"| {name} | mean of {len(runs)} | "
              + " | ".join(f"{np.mean([g[r][m] for g in runs]):.1f}" for r in RULES for m in MODES) + " |")
    print(f"# load average at end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
