"""Fusion's blend rules on the versions `accuracy.py` built: which rule names the set-aside pictures best, and
whether the version's own held-out pictures could have told.

Each version (`<work>/<set>/closed/s<seed>/t<fraction>/version-<recipe>`) answers its set-aside pictures and its
own held-out (validation) pictures in clip mode (gallery cosine per character) and model mode (classifier
probability per character), through the real `Recognizer`. The rules are then applied to those scores:

- ``half``: fusion before 2026-12-06 (``0.5 x softmax(cosine / T) + 0.5 x classifier``, T the version's);
- ``fitw``: the weight `openset.fit_gallery_weight` fits on the held-out pictures (``fusion.fit_gallery_weight``, the
  default since 2026-12-06: the version's own weight when it was built with one);
- ``acc-fit``: the weight with the best held-out top-1, moved off 0.5 only when that beats 0.5 by the margin
  `auto` demands of a mode (`evalset.best_mode`: two binomial standard errors, at least 1.5 pictures);
- ``sharp``: half and half after a temperature fitted to the classifier's held-out probabilities;
- ``w=0.3``: a fixed lean towards the classifier;
- ``poe``: the product of the two (``gallery^0.5 x classifier^0.5``, renormalised): a source that is sure of a
  picture outvotes one that is not, per picture, where the mixture averages them;
- ``poe-fit``: the product's exponent ``w`` fitted on the held-out pictures by log-likelihood, as ``fitw``;
- ``surer``: per picture, the answer of the source whose top probability is higher;
- ``conf``: per picture, a mixture weighted by each source's top probability (``a = g_max / (g_max + m_max)``): ``surer``
  made smooth, so its probabilities still say how sure the answer is;
- ``fitw-loo``: ``fitw``'s fit, but each held-out picture scored against the gallery the version answers with (its
  held-out pictures' rows in it), its own row left out: the weight fitted on the gallery a user's query meets, not the
  smaller one the build fitted on before those rows joined (`build.refit_gallery_weight`, what a build does since
  2026-12-07; versions built before carry ``fitw``); every rule blends the classifier, so on a version with a whitened
  gallery (`recognition/whitened.py`, what fusion answers with since 2026-12-07) they say what the classifier would
  have given, and ``fitw`` is fitted here;

``--protocol unseen`` reads the versions `accuracy.py --protocols unseen` built (2 characters held out of training):
before anything is enrolled they answer the trained characters' set-aside pictures, a closed set of the rest.

    python benchmarks/fusion_blends.py --work outputs/benchmarks/accuracy/work --sets newgame_full newgame_faces
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
from _common import data_dir, quiet
from accuracy import answers, load

RULES = ("clip", "model", "half", "fitw", "fitw-loo", "acc-fit", "sharp", "w=0.3", "poe", "poe-fit", "surer", "conf")


def built_version(run: Path, recipe: str) -> Path | None:
    """``version-<recipe>`` that `accuracy.py` built for `run`: in its clean-<hash>/ folder (runs before the clean pool:
    in `run` itself); None when it built none."""
    return next((d / f"version-{recipe}" for d in (*sorted(run.glob("clean-*")), run)
                 if (d / f"version-{recipe}" / "gallery.json").is_file()), None)


def score_matrix(rec, items, mode: str, names: list[str]) -> np.ndarray:
    """[pictures, characters] scores of `mode` (every character ranked: the recognizer's top-k is widened)."""
    col = {n: i for i, n in enumerate(names)}
    m = np.zeros((len(items), len(names)))
    for r, a in enumerate(answers(rec, items, mode)):
        for t in a.detections[0].topk:
            m[r, col[t.role]] = t.score
    return m


def scores(version: Path, parts: dict[str, tuple[Path, list[str]]], cache: Path) -> dict[str, np.ndarray]:
    """Clip and model score matrices and labels of each part (val, test), cached beside the version."""
    if cache.is_file():
        return dict(np.load(cache))
    from anime_role_detect.recognition.pipeline import Recognizer

    rec = Recognizer.from_version(version, {"detector": None, "cache_size": 0, "rerank": False, "topk": 1000,
                                            "openset": {"enabled": False}})
    names = sorted(c["name"] for c in rec.characters())
    out: dict[str, np.ndarray] = {"T": np.array(rec.gallery_temperature() or 0.0)}
    for part, (root, files) in parts.items():
        items = load(root, files)
        out[f"{part}_y"] = np.array([names.index(f.split("/")[0]) for f in files])
        for mode in ("clip", "model"):
            out[f"{part}_{mode}"] = score_matrix(rec, items, mode, names)
    tmp = cache.with_suffix(".part")
    with open(tmp, "wb") as f:  # a killed run leaves no half-written cache for the next one to read
        np.savez(f, **out)
    os.replace(tmp, cache)
    return out


def refit_weight(version: Path, pool: Path, val_files: list[str], s: dict[str, np.ndarray]) -> float:
    """The weight a build fits once the val pictures joined the gallery (`build.refit_gallery_weight`, the product's
    own function), on the version's gallery and val embeddings, each picture read as filed (`filed_characters`)."""
    from anime_role_detect.data.layout import filed_characters, scan_dataset
    from anime_role_detect.fsutil import file_sha256
    from anime_role_detect.recognition.build import refit_gallery_weight
    from anime_role_detect.recognition.gallery import Gallery

    g, pool = Gallery.load(version), pool.resolve()  # the embeddings file names pictures by absolute path
    names = sorted(c["name"] for c in g.characters())
    z = np.load(version / "val_embeddings.npz")
    at = {str(Path(p).relative_to(pool)): i for i, p in enumerate(z["paths"])}
    by_name = {r.file_name: r for r in scan_dataset(pool)}
    records = [by_name[f] for f in val_files]
    shows = filed_characters(records, [file_sha256(r.path(pool)) for r in records])
    filed = np.array([[n in shows[f] or n == f.split("/")[0] for n in names] for f in val_files], bool)
    blend = {"names": names, "known": list(range(len(val_files))), "model": s["val_model"], "labels": s["val_y"], "filed": filed}
    return refit_gallery_weight(g, z["embeddings"][[at[f] for f in val_files]], blend, float(s["T"]) or None)


def confident(g: np.ndarray, m: np.ndarray) -> np.ndarray:
    """``a g + (1 - a) m`` per picture, ``a = g_max / (g_max + m_max)``: the surer source weighs more."""
    a = g.max(1, keepdims=True) / np.maximum(g.max(1, keepdims=True) + m.max(1, keepdims=True), 1e-12)
    return a * g + (1 - a) * m


def blends(s: dict[str, np.ndarray], built_w: float | None = None, refit_w: float | None = None) -> dict[str, float]:
    """Top-1 (%) of every rule on the set-aside pictures; the fitted rules fit on the held-out ones. ``fitw`` is the
    weight the version was built with (`built_w`, fitted before its held-out pictures joined the gallery) when it has
    one: scored here, those pictures find themselves in the gallery and every fit leans to it."""
    from anime_role_detect.recognition.evalset import best_mode
    from anime_role_detect.recognition.openset import (
        fit_gallery_weight,
        fit_temperature,
        gallery_probabilities,
    )

    T = float(s["T"]) or None
    g = {p: np.stack([gallery_probabilities(r, T) for r in s[f"{p}_clip"]]) for p in ("val", "test")}
    m = {p: s[f"{p}_model"] for p in ("val", "test")}
    yv, yt = s["val_y"], s["test_y"]

    def top1(w: float, part: str = "test", model: np.ndarray | None = None) -> float:
        p = w * g[part] + (1 - w) * (m[part] if model is None else model)
        return float(np.mean(p.argmax(1) == (yt if part == "test" else yv)))

    grid = np.round(np.linspace(0, 1, 21), 2)
    val = {float(w): top1(w, "val") for w in grid}
    best_w = max(val, key=lambda w: (val[w], -abs(w - 0.5)))
    # the same "clearly better" margin as `auto`'s choice of mode: a weight is a mode of its own here
    acc_w = best_w if best_mode(["fusion", "model"], {"fusion": val[0.5], "model": val[best_w]}, False, len(yv)) == "model" else 0.5
    tm = fit_temperature(np.log(np.clip(m["val"], 1e-9, None)), yv, np.geomspace(0.05, 20.0, 81))
    sharp = np.stack([gallery_probabilities(r, tm) for r in np.log(np.clip(m["test"], 1e-9, None))])  # softmax(log p / tm)
    def product(w: float, part: str) -> np.ndarray:
        logp = w * np.log(np.clip(g[part], 1e-12, None)) + (1 - w) * np.log(np.clip(m[part], 1e-12, None))
        e = np.exp(logp - logp.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    def poe_top1(w: float) -> float:
        return float(np.mean(product(w, "test").argmax(1) == yt))

    def poe_nll(w: float) -> float:
        return float(-np.mean(np.log(np.clip(product(w, "val")[np.arange(len(yv)), yv], 1e-12, None))))

    poe_w = float(min(grid, key=lambda w: (round(poe_nll(w), 9), abs(w - 0.5))))
    surer = np.where(g["test"].max(1) >= m["test"].max(1), g["test"].argmax(1), m["test"].argmax(1))
    got = {"clip": top1(1.0), "model": top1(0.0), "half": top1(0.5),
           "fitw": top1(fit_gallery_weight(g["val"], m["val"], yv) if built_w is None else built_w),
           "fitw-loo": top1(0.5 if refit_w is None else refit_w), "acc-fit": top1(acc_w),
           "sharp": top1(0.5, model=sharp), "w=0.3": top1(0.3), "poe": poe_top1(0.5), "poe-fit": poe_top1(poe_w),
           "surer": float(np.mean(surer == yt)), "conf": float(np.mean(confident(g["test"], m["test"]).argmax(1) == yt))}
    return {k: 100 * v for k, v in got.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="accuracy.py's --work folder")
    ap.add_argument("--sets", nargs="+", default=["newgame_full", "newgame_faces", "faces6", "mixed5"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--recipe", default="recipe")
    ap.add_argument("--protocol", choices=["closed", "unseen"], default="closed",
                    help="which of accuracy.py's versions: closed-set runs, or unseen runs before enrolment (their trained characters)")
    ap.add_argument("--test-fraction", type=float, default=0.2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    args = ap.parse_args(argv)
    quiet(args.threads)
    print(f"# fusion blends of version-{args.recipe}; load average {os.getloadavg()[0]:.2f}; top-1 % on set-aside pictures")
    print("| set | seed | " + " | ".join(RULES) + " |\n|---|---|" + "---|" * len(RULES))
    per_set: dict[str, list[dict[str, float]]] = {}
    for name in args.sets:
        for seed in args.seeds:
            run = args.work / name / args.protocol / f"s{seed}" / f"t{args.test_fraction:g}"
            version = built_version(run, args.recipe)
            runs = version.parent if version is not None else run
            trained = runs / args.recipe / "accuracy_run.json"
            if version is None or not trained.is_file():
                print(f"skip {run}: no version-{args.recipe} (run benchmarks/accuracy.py first)", file=sys.stderr)
                continue
            split = json.loads(Path(json.loads(trained.read_text())["split_path"]).read_text())
            parts = {"val": (runs / "pool", split["val"]), "test": (data_dir() / name, json.loads((run / "test_split.json").read_text())["test"])}
            calib = json.loads((version / "calibration.json").read_text())
            # a version built with a whitened gallery fitted its weight against that, not the classifier these rules blend
            built_w = None if calib.get("whitened_temperature") is not None else calib.get("gallery_weight")
            s = scores(version, parts, runs / f"blend-scores-{args.recipe}.npz")
            got = blends(s, built_w, refit_weight(version, runs / "pool", split["val"], s))
            per_set.setdefault(name, []).append(got)
            print(f"| {name} | {seed} | " + " | ".join(f"{got[r]:.1f}" for r in RULES) + " |", flush=True)
    for name, runs in per_set.items():
        print(f"| {name} | mean of {len(runs)} | " + " | ".join(f"{np.mean([r[k] for r in runs]):.1f}" for k in RULES) + " |")
    print(f"# load average at end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
