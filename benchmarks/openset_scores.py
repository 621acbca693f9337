"""Which score tells unseen characters from known ones? Candidate open-set scores on accuracy.py's unseen runs.

Reads the versions that ``benchmarks/accuracy.py --protocols unseen`` left in its ``--work`` folder (one per
set and seed: 2 characters held out of training, a fifth of the others' pictures set aside) and scores every
picture with several candidate scores computed from the same two networks' outputs: the gallery's per-character
cosine ``G`` and the classifier's probabilities ``P``, fused as the version fuses them (``w`` softmax(G / T) +
(1 - w) P, with the version's weight and fitted temperature). The baseline is what versions answer with today:
``fused_max``, the fused probability of the best character.

Per score and run: AUROC (known set-aside pictures against the unseen characters' pictures); the share of unseen
pictures refused and of known pictures refused at the threshold the version's calibration rule gives on its val
pictures (leave-one-out impostors, at most 5% false accepts, lowered to keep 95% of right answers; unlike the
version's fusion threshold, the left-out character's classifier probability is renormalised away); and the
best any threshold could do: unseen refused when 2% / 5% of known pictures are refused (an oracle on the test
pictures, an upper bound of what calibration can reach with that score).

    python benchmarks/accuracy.py --sets newgame_faces faces6 --recipes recipe --protocols unseen --seeds 0 1
    python benchmarks/openset_scores.py            # reads outputs/benchmarks/accuracy/work
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable

import numpy as np
from _common import REPO, quiet

import accuracy as acc

Score = Callable[[np.ndarray, np.ndarray, float, float], np.ndarray]


def softmax(x: np.ndarray, t: float) -> np.ndarray:
    e = np.exp((x - x.max(-1, keepdims=True)) / t)
    return e / e.sum(-1, keepdims=True)


def fused(g: np.ndarray, p: np.ndarray, w: float, t: float) -> np.ndarray:
    return w * softmax(g, t) + (1 - w) * p


def _margin(m: np.ndarray) -> np.ndarray:
    s = np.sort(m, 1)
    return s[:, -1] - s[:, -2]


#: score name -> f(G, P, w, t), one value per picture; higher = more likely a known character
SCORES: dict[str, Score] = {
    "fused_max": lambda g, p, w, t: fused(g, p, w, t).max(1),  # today's
    "cosine_max": lambda g, p, w, t: g.max(1),
    "classifier_max": lambda g, p, w, t: p.max(1),
    "fused_margin": lambda g, p, w, t: _margin(fused(g, p, w, t)),
    "cosine_margin": lambda g, p, w, t: _margin(g),
    "cosine_x_fused": lambda g, p, w, t: g.max(1) * fused(g, p, w, t).max(1),
}


def matrices(rec, root: Path, files: list[str], names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Gallery cosine and classifier probability of every picture for every character, in `names` order."""
    images = [im for im, _ in acc.load(root, files)]
    col = {n: i for i, n in enumerate(names)}
    rec.n_candidates = len(names)
    g, p = np.full((len(images), len(names)), -1.0), np.zeros((len(images), len(names)))
    for i in range(0, len(images), 32):
        batch = images[i : i + 32]
        for mode, m in (("clip", g), ("model", p)):
            for r, cands in enumerate(rec._score(batch, mode, False, False).candidates):
                for c, _, s in cands:
                    if c in col:
                        m[i + r, col[c]] = s
    return g, p


def leave_one_out(g: np.ndarray, p: np.ndarray, y: np.ndarray, f: Score, w: float, t: float) -> np.ndarray:
    """Each val picture's score with its own character removed (classifier renormalised): a stand-in for an unseen one."""
    out = np.empty(len(y))
    for i, c in enumerate(y):
        keep = np.arange(g.shape[1]) != c
        pk = p[i : i + 1, keep]
        out[i] = f(g[i : i + 1, keep], pk / max(1e-9, float(pk.sum())), w, t)[0]
    return out


def study(tag: Path, name: str, seed: int) -> dict:
    from anime_role_detect.data.layout import scan_dataset
    from anime_role_detect.recognition.openset import calibrate

    full = acc.set_root(name, tag)
    held = acc.held_out_characters(full, seed)
    rec = acc.recognizer(tag / "version-recipe", openset=False)
    w, t = rec.gallery_weight(), float(rec.gallery_temperature() or 1.0)
    names = [c["name"] for c in rec.characters()]
    test = json.loads((tag / "test_split.json").read_text())["test"]
    trained = json.loads((tag / "recipe" / "accuracy_run.json").read_text())
    val = json.loads(Path(trained["split_path"]).read_text())["val"]
    unseen = sorted(r.file_name for r in scan_dataset(full) if r.character in held)
    gv, pv = matrices(rec, tag / "pool", val, names)
    yv = np.array([names.index(f.split("/")[0]) for f in val])
    gt, pt = matrices(rec, full, test, names)
    gu, pu = matrices(rec, full, unseen, names)
    right = fused(gv, pv, w, t).argmax(1) == yv
    out = {}
    for sname, f in SCORES.items():
        th = calibrate(f(gv, pv, w, t)[right], leave_one_out(gv, pv, yv, f, w, t), 0.05, 0.95).threshold
        known, other = f(gt, pt, w, t), f(gu, pu, w, t)
        out[sname] = {"auroc": acc.auroc(known, other), "known_refused": float((known < th).mean()),
                      "unseen_refused": float((other < th).mean()),
                      "best_unseen_refused_at_2pct_known": float((other < np.quantile(known, 0.02)).mean()),
                      "best_unseen_refused_at_5pct_known": float((other < np.quantile(known, 0.05)).mean())}
    return {"set": name, "seed": seed, "known_pictures": len(test), "unseen_pictures": len(unseen), "scores": out}


def table(runs: list[dict]) -> str:
    cols = ["auroc", "known_refused", "unseen_refused", "best_unseen_refused_at_2pct_known", "best_unseen_refused_at_5pct_known"]
    lines = ["| set | runs | score | AUROC | known refused | unseen refused | best: unseen refused at 2% / 5% known refused | AUROC x today's |",
             "|---|---|---|---|---|---|---|---|"]
    for name in sorted({r["set"] for r in runs}):
        rs = [r for r in runs if r["set"] == name]
        base = np.mean([r["scores"]["fused_max"]["auroc"] for r in rs])
        for sname in SCORES:
            m = {c: (np.mean([r["scores"][sname][c] for r in rs]), np.std([r["scores"][sname][c] for r in rs])) for c in cols}
            pct = lambda c: f"{100 * m[c][0]:.1f} ± {100 * m[c][1]:.1f}"  # noqa: E731
            lines.append(f"| {name} | {len(rs)} | {sname}{' (today)' if sname == 'fused_max' else ''} | {m['auroc'][0]:.3f} ± {m['auroc'][1]:.3f} | "
                         f"{pct('known_refused')} | {pct('unseen_refused')} | {pct(cols[3])} / {pct(cols[4])} | {m['auroc'][0] / base:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=REPO / "outputs" / "benchmarks" / "accuracy" / "work",
                    help="accuracy.py's --work folder")
    ap.add_argument("--json", type=Path, default=None, help="also write every run's figures here")
    args = ap.parse_args(argv)
    quiet()
    load0 = os.getloadavg()
    runs = []
    for tag in sorted(args.work.glob("*/unseen/s*/t*")):
        if not (tag / "version-recipe" / "gallery.json").is_file():
            continue
        name, seed = tag.parts[-4], int(tag.parts[-2][1:])
        runs.append(study(tag, name, seed))
        print(f"  {name} seed {seed}: " + ", ".join(f"{k} AUROC {v['auroc']:.3f}" for k, v in runs[-1]["scores"].items()),
              file=sys.stderr, flush=True)
    if not runs:
        print(f"error: no unseen-protocol versions under {args.work}; run benchmarks/accuracy.py --protocols unseen first",
              file=sys.stderr)
        return 2
    print(f"# open-set scores over {len(runs)} runs; load average at start {load0[0]:.2f}, at end {os.getloadavg()[0]:.2f}\n")
    print(table(runs))
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
