"""Does scoring a picture against its named character's own spread tell unseen characters apart better than the best
gallery cosine? Per-character normalisations of the open-set score (issue 11 asks for per-character thresholds or
score normalisation), on accuracy.py's unseen-protocol runs.

For each version: the val pictures' gallery cosines as the build calibrated them (val rows left out,
`openset_scores.cosines_leaving_out`) give each character the mean ``mu_c`` and spread ``sd_c`` of its own pictures'
cosines; a set-aside known picture or an unseen character's picture named ``c`` with best cosine ``s`` then scores
``s`` (today's), ``s / mu_c``, ``s - mu_c``, ``(s - mu_c) / sd_c``, the share of ``c``'s val cosines at or below ``s``
(a per-character threshold), or the margin over the second character. Per score: AUROC (known set-aside pictures
against the unseen characters' pictures) and the best any threshold does, an oracle placed on the test pictures: the
unseen pictures refused when 2% / 5% of known ones are. Clip embeddings only (one forward pass per picture).

    python benchmarks/accuracy.py --sets newgame_faces faces6 --recipes recipe --protocols unseen --seeds 0 1 2
    python benchmarks/openset_per_character.py --work outputs/benchmarks/accuracy/work
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import accuracy as acc
import numpy as np
import openset_scores as osc
from _common import REPO, quiet

#: score name -> f(best cosine, named character's column, its mean, its spread, its val cosines, second best)
PerCharacter = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[np.ndarray], np.ndarray], np.ndarray]
SCORES: dict[str, PerCharacter] = {
    "best cosine (today)": lambda s, c, mu, sd, gen, s2: s,
    "cosine / character mean": lambda s, c, mu, sd, gen, s2: s / mu[c],
    "cosine - character mean": lambda s, c, mu, sd, gen, s2: s - mu[c],
    "z within the character": lambda s, c, mu, sd, gen, s2: (s - mu[c]) / sd[c],
    "share of the character's val cosines below (per-character threshold)":
        lambda s, c, mu, sd, gen, s2: np.array([(gen[ci] <= si).mean() for ci, si in zip(c, s)]) + 1e-3 * s,  # ties by cosine
    "margin over the second character": lambda s, c, mu, sd, gen, s2: s - s2,
}


def embeddings(rec, root: Path, files: list[str]) -> np.ndarray:
    images = [im for im, _ in acc.load(root, files)]
    return np.concatenate([rec._score(images[i : i + 32], "clip", False, True).embeddings for i in range(0, len(images), 32)])


def oracle(known: np.ndarray, unseen: np.ndarray, known_refused: float) -> float:
    """Unseen pictures refused by the threshold that refuses `known_refused` of the known ones."""
    return float((unseen < np.quantile(known, known_refused)).mean())


def study(tag: Path, run: Path) -> dict:
    from anime_role_detect.data.layout import scan_dataset

    name = tag.parts[-4]
    rec = acc.recognizer(run / "version-recipe", openset=False)
    names = [c["name"] for c in rec.characters()]
    val = json.loads(osc._path(json.loads((run / "recipe" / "accuracy_run.json").read_text())["split_path"]).read_text())["val"]
    test = json.loads((tag / "test_split.json").read_text())["test"]
    full = acc.set_root(name, tag)
    unseen = sorted(r.file_name for r in scan_dataset(full) if r.character not in names)
    g = rec.gallery
    gv = osc.cosines_leaving_out(embeddings(rec, run / "pool", val), g, names, [set(val)] * len(val))
    yv = np.array([names.index(f.split("/")[0]) for f in val])
    own = gv[np.arange(len(yv)), yv]
    gen = [own[yv == c] if (yv == c).any() else own for c in range(len(names))]
    mu = np.array([x.mean() for x in gen])
    sd = np.array([x.std() + 1e-3 for x in gen])

    def scores(root: Path, files: list[str]) -> dict[str, np.ndarray]:
        m = osc.cosines_leaving_out(embeddings(rec, root, files), g, names, [set()] * len(files))
        s, c, s2 = m.max(1), m.argmax(1), np.sort(m, 1)[:, -2]
        return {k: f(s, c, mu, sd, gen, s2) for k, f in SCORES.items()}

    known, other = scores(full, test), scores(full, unseen)
    return {"set": name, "seed": int(tag.parts[-2][1:]),
            "scores": {k: {"auroc": acc.auroc(known[k], other[k]), "at_2pct": oracle(known[k], other[k], 0.02),
                           "at_5pct": oracle(known[k], other[k], 0.05)} for k in SCORES}}


def table(results: list[dict]) -> str:
    lines = ["| set | runs | score | AUROC | best: unseen refused at 2% / 5% known refused |", "|---|---|---|---|---|"]
    for name in sorted({r["set"] for r in results}):
        rs = [r for r in results if r["set"] == name]
        for k in SCORES:
            mean = {c: np.mean([r["scores"][k][c] for r in rs]) for c in ("auroc", "at_2pct", "at_5pct")}
            lines.append(f"| {name} | {len(rs)} | {k} | {mean['auroc']:.3f} | {100 * mean['at_2pct']:.1f} / {100 * mean['at_5pct']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, nargs="+", default=[REPO / "outputs" / "benchmarks" / "accuracy" / "work"],
                    help="accuracy.py's --work folder(s)")
    ap.add_argument("--json", type=Path, default=None, help="also write every run's figures here")
    args = ap.parse_args(argv)
    quiet()
    load0 = os.getloadavg()
    results = []
    for work in args.work:
        for tag, run in osc.finished_runs(work, protocol="unseen"):
            results.append(study(tag, run))
            print(f"  {results[-1]['set']} seed {results[-1]['seed']}: " + ", ".join(
                f"{k}: {v['auroc']:.3f}" for k, v in results[-1]["scores"].items()), file=sys.stderr, flush=True)
    if not results:
        print(f"error: no unseen-protocol versions with set-aside pictures under {args.work}; run benchmarks/accuracy.py "
              "--protocols unseen first", file=sys.stderr)
        return 2
    print(f"# per-character open-set scores over {len(results)} runs; load average at start {load0[0]:.2f}, at end {os.getloadavg()[0]:.2f}\n")
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
