"""Which held-out pictures fusion's blend is fitted on: all of them, or those filed under one character?

`build_recognition_folder` fits the gallery weight (`openset.fit_gallery_weight`) on the version's val pictures
before they join the gallery. This rebuilds those scores offline from what a version keeps: the val pictures'
embeddings (``val_embeddings.npz``) against the gallery's rows without them, aggregated as the gallery does
(each character's best `Gallery.depth` rows), softmax at the version's temperature; the classifier's val and
test probabilities and the test pictures' gallery cosines come from `fusion_blends.py`'s cache beside the version
(run it first). Each weight is fitted again both ways (all val pictures, as built: the "refit" must equal the
version's own weight; and only the pictures filed under one character) and scores the set-aside test pictures.

    python benchmarks/fusion_blends.py --work W --sets newgame_full --recipe recipe
    python benchmarks/blend_fit.py --work W --sets newgame_full --recipes recipe
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
from _common import quiet
from fusion_blends import built_version

COLUMNS = ("clip", "model", "half", "all (built)", "one character")


def _key(path: str) -> str:
    """``<character>/<file>``: how a val picture, a gallery row's source and a split entry name the same file."""
    return "/".join(Path(path).parts[-2:])


def val_gallery_probabilities(version: Path, val: list[str]) -> tuple[np.ndarray, list[str]]:
    """``[val, characters]`` gallery probabilities as the build scored them: the gallery without the val rows."""
    from anime_role_detect.recognition.gallery import Gallery
    from anime_role_detect.recognition.openset import gallery_probabilities

    saved = np.load(version / "val_embeddings.npz")
    at = {_key(str(p)): i for i, p in enumerate(saved["paths"])}
    emb = saved["embeddings"][[at[_key(f)] for f in val]]
    g = Gallery.load(version)
    ids = g._live_ids()
    rows = [g.rows[int(i)] for i in ids]
    held = {_key(f) for f in val}
    keep = np.array([_key(r.source) not in held for r in rows])
    owner = np.array([r.character for r in rows])[keep]
    cos = emb @ g._vectors(ids)[keep].T
    names = sorted(set(owner))
    agg = np.zeros((len(val), len(names)))
    for j, name in enumerate(names):
        s = np.sort(cos[:, owner == name], 1)[:, ::-1]
        agg[:, j] = s[:, : min(g.depth(name), s.shape[1])].mean(1)
    t = json.loads((version / "calibration.json").read_text())["gallery_temperature"]
    return np.stack([gallery_probabilities(r, t) for r in agg]), names


def scores(run: Path, version: Path, recipe: str, pictures: dict[str, list]) -> dict[str, float] | None:
    """Test top-1 % of each blend, and the two fitted weights."""
    from anime_role_detect.recognition.openset import fit_gallery_weight, gallery_probabilities

    cache = version.parent / f"blend-scores-{recipe}.npz"
    trained = version.parent / recipe / "accuracy_run.json"
    if not cache.is_file() or not trained.is_file() or not (version / "val_embeddings.npz").is_file():
        return None
    s = np.load(cache)
    val = json.loads(Path(json.loads(trained.read_text())["split_path"]).read_text())["val"]
    g, names = val_gallery_probabilities(version, val)
    m, y = s["val_model"], np.array([names.index(f.split("/")[0]) for f in val])
    filed = np.array([[n in pictures[f][1] for n in names] for f in val])
    one = filed.sum(1) == 1
    w_all = fit_gallery_weight(g, m, y, filed=filed)
    w_one = fit_gallery_weight(g[one], m[one], y[one], filed=filed[one])
    t = float(s["T"]) or None
    gt = np.stack([gallery_probabilities(r, t) for r in s["test_clip"]])

    def top1(w: float) -> float:
        return 100 * float(np.mean((w * gt + (1 - w) * s["test_model"]).argmax(1) == s["test_y"]))

    built = json.loads((version / "calibration.json").read_text()).get("gallery_weight")
    return {"clip": top1(1.0), "model": top1(0.0), "half": top1(0.5), "all (built)": top1(w_all), "one character": top1(w_one),
            "w_all": w_all, "w_one": w_one, "built": float("nan") if built is None else built, "group": int((~one).sum()), "val": len(val)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="accuracy.py's --work folder")
    ap.add_argument("--sets", nargs="+", default=["newgame_full", "newgame_faces", "faces6", "mixed5"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--recipes", nargs="+", default=["recipe"])
    ap.add_argument("--test-fraction", type=float, default=0.2)
    args = ap.parse_args(argv)
    quiet(1)
    print(f"# blend fitted on all val pictures vs those of one character; load average {os.getloadavg()[0]:.2f}; top-1 % on set-aside pictures")
    print("| set | recipe | seed | " + " | ".join(COLUMNS) + " | w all / one (built) | val group pictures |\n|---|---|---|" + "---|" * (len(COLUMNS) + 2))
    means: dict[tuple[str, str], list[dict[str, float]]] = {}
    for name in args.sets:
        pics_files = sorted(args.work.glob(f"{name}-pictures-*.json"))
        if not pics_files:
            print(f"skip {name}: no {name}-pictures-*.json in {args.work} (run benchmarks/accuracy.py first)", file=sys.stderr)
            continue
        pictures = json.loads(pics_files[-1].read_text())
        for recipe in args.recipes:
            for seed in args.seeds:
                run = args.work / name / "closed" / f"s{seed}" / f"t{args.test_fraction:g}"
                version = built_version(run, recipe)
                got = scores(run, version, recipe, pictures) if version else None
                if got is None:
                    print(f"skip {run} {recipe}: no version, val embeddings or fusion_blends cache", file=sys.stderr)
                    continue
                means.setdefault((name, recipe), []).append(got)
                print(f"| {name} | {recipe} | {seed} | " + " | ".join(f"{got[c]:.1f}" for c in COLUMNS)
                      + f" | {got['w_all']:.2f} / {got['w_one']:.2f} ({got['built']:.2f}) | {got['group']} of {got['val']} |", flush=True)
    for (name, recipe), rs in means.items():
        print(f"| {name} | {recipe} | mean of {len(rs)} | " + " | ".join(f"{np.mean([r[c] for r in rs]):.1f}" for c in COLUMNS) + " | | |")
    print(f"# load average at end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
