"""Which score tells unseen characters from known ones? Candidate open-set scores and calibration rules on
accuracy.py's runs.

Reads the versions that ``benchmarks/accuracy.py`` left in its ``--work`` folder (one per set, protocol and seed;
unseen protocol: 2 characters held out of training; both: a fifth of the known characters' pictures set aside) and
scores every picture with several candidate scores computed from the same two networks' outputs: the gallery's
per-character cosine ``G`` and the classifier's probabilities ``P``, fused as the version fuses them (``w``
softmax(G / T) + (1 - w) P, with the version's weight and fitted temperature). "Foreign" pictures are another set's
characters (another series): a stranger the gallery was never shown.

**Rules** (what a version's fusion threshold is): the score, how its leave-one-out impostors are made and how many
of the val pictures answered right it may refuse. ``before`` is fusion's rule until 2026-12-04 (the fused
probability, the left-out character's classifier mass kept, 95% kept); ``now`` is `recognition.build`'s (the best
gallery cosine, 98% kept, with `openset.genuine_floor`'s prediction bound for few pictures), its val pictures scored
against the train pictures' rows as the build calibrates them; the last rule scores them against the final gallery
(val rows in, each picture's own copies out), as a new picture meets a workflow-built version. Per rule and run: known
pictures refused (all, and of those fusion names right), the default answer's top-1 counting a refusal as wrong, unseen
and foreign pictures refused.

Per score and run: AUROC (known set-aside pictures against the unseen characters' pictures); the share of unseen
pictures refused and of known pictures refused at the threshold the version's calibration rule gives on its val
pictures (leave-one-out impostors, at most 5% false accepts, lowered to keep 95% of right answers; unlike the
version's fusion threshold, the left-out character's classifier probability is renormalised away); and the
best any threshold could do: unseen refused when 2% / 5% of known pictures are refused (an oracle on the test
pictures, an upper bound of what calibration can reach with that score).

    python benchmarks/accuracy.py --sets newgame_faces faces6 --recipes recipe --protocols unseen --seeds 0 1
    python benchmarks/openset_scores.py            # reads outputs/benchmarks/accuracy/work
    python benchmarks/openset_scores.py --work outputs/bench/acc_unseen/work outputs/bench/s24/work
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from _common import REPO, quiet

import accuracy as acc

Score = Callable[[np.ndarray, np.ndarray, float, float], np.ndarray]
#: another series for each set: its pictures are strangers to a version of the set
FOREIGN = {"newgame_full": "faces6", "newgame_faces": "faces6", "faces6": "newgame_faces", "mixed5": "faces6"}


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


@dataclass(frozen=True)
class Rule:
    """How a version's fusion threshold is set: the score, whether leave-one-out renormalises the classifier, the share
    of val right answers kept, by the order statistic alone or with `openset.genuine_floor`'s prediction bound (the
    rule until 2026-12-04 was the order statistic), and which gallery the val pictures are scored against: the one
    `recognition.build` calibrates on (the train pictures' rows; the val rows join after), or the final gallery with
    each val picture's own copies left out (what a new picture meets once the val rows have joined)."""

    score: str
    renormalise: bool
    keep: float
    order_only: bool = False
    val_gallery: str = "calibrated"  # calibrated | final


RULES: dict[str, Rule] = {
    "before: fused_max, mass kept, 95%": Rule("fused_max", False, 0.95, True),
    "fused_max, renormalised, 98%": Rule("fused_max", True, 0.98, True),
    "cosine_max, 95%": Rule("cosine_max", True, 0.95, True),
    "cosine_max, 98%, order statistic": Rule("cosine_max", True, 0.98, True),
    "now: cosine_max, 98%, prediction bound": Rule("cosine_max", True, 0.98),
    "cosine_max, 98%, prediction bound, val in the final gallery": Rule("cosine_max", True, 0.98, val_gallery="final"),
}


def rule_threshold(right: np.ndarray, impostor: np.ndarray, keep: float, order_only: bool) -> float:
    """The threshold a rule gives on val scores: `openset.calibrate`, or its order-statistic-only form."""
    from anime_role_detect.recognition.openset import calibrate

    if not order_only:
        return calibrate(right, impostor, 0.05, keep).threshold
    t = calibrate(right, impostor, 0.05, 0.0).threshold
    g = np.sort(right)
    return min(t, float(g[int(np.floor((1.0 - keep) * len(g)))])) if len(g) else t


def matrices(rec, root: Path, files: list[str], names: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gallery cosine and classifier probability of every picture for every character, in `names` order, and the
    pictures' gallery embeddings."""
    images = [im for im, _ in acc.load(root, files)]
    col = {n: i for i, n in enumerate(names)}
    rec.n_candidates = len(names)
    g, p = np.full((len(images), len(names)), -1.0), np.zeros((len(images), len(names)))
    embs = []
    for i in range(0, len(images), 32):
        batch = images[i : i + 32]
        for mode, m in (("clip", g), ("model", p)):
            scored = rec._score(batch, mode, False, mode == "clip")
            if mode == "clip":
                embs.append(scored.embeddings)
            for r, cands in enumerate(scored.candidates):
                for c, _, s in cands:
                    if c in col:
                        m[i + r, col[c]] = s
    return g, p, np.concatenate(embs) if embs else np.zeros((0, rec.gallery.dim), np.float32)


def cosines_leaving_out(emb: np.ndarray, gallery, names: list[str], left_out: list[set[str]]) -> np.ndarray:
    """Each picture's score per character in `names` as `gallery` aggregates it (the mean of the character's best
    `gallery.depth(c)` rows), leaving out the rows whose source is in the picture's `left_out` set: the val pictures
    as the version was calibrated on them (every val row out) or as a new picture meets the final gallery (its own
    copies out)."""
    from anime_role_detect.recognition.aggregate import topm_mean as _topm_mean

    ids = gallery._live_ids()
    vectors = gallery._vectors(ids)
    owner = np.array([gallery.rows.names[c] for c in gallery.rows.owner[ids]])
    sources = np.array([gallery.rows[int(i)].source for i in ids])
    out = np.full((len(emb), len(names)), -1.0)
    for i, (e, drop) in enumerate(zip(emb, left_out)):
        sims, kept = vectors @ e, ~np.isin(sources, list(drop))
        for j, name in enumerate(names):
            s = np.sort(sims[(owner == name) & kept])[::-1]
            if len(s):
                out[i, j] = _topm_mean(s.tolist(), min(gallery.depth(name), len(s)))
    return out


def leave_one_out(g: np.ndarray, p: np.ndarray, y: np.ndarray, f: Score, w: float, t: float, renormalise: bool = True) -> np.ndarray:
    """Each val picture's score with its own character removed (classifier renormalised): a stand-in for an unseen one.
    Without `renormalise`, the fused scores of the other characters as they are (fusion's calibration before 2026-12-04)."""
    if not renormalise:
        from anime_role_detect.recognition.openset import leave_one_out_scores

        return leave_one_out_scores(fused(g, p, w, t), y)[1]
    out = np.empty(len(y))
    for i, c in enumerate(y):
        keep = np.arange(g.shape[1]) != c
        pk = p[i : i + 1, keep]
        out[i] = f(g[i : i + 1, keep], pk / max(1e-9, float(pk.sum())), w, t)[0]
    return out


def refused(scores: np.ndarray, threshold: float) -> float:
    """Share of `scores` below `threshold` (NaN for none)."""
    return float((scores < threshold).mean()) if len(scores) else float("nan")


def _path(p: str) -> Path:
    """A path accuracy.py recorded (relative ones are relative to the repository it ran in)."""
    return Path(p) if Path(p).is_absolute() else REPO / p


def val_scores(rec, run: Path, tag: Path, name: str, val: list[str], names: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The val pictures' (gallery cosines, classifier probabilities) per `Rule.val_gallery`: as calibrated (every val
    row left out: a version the workflow built holds them) and against the final gallery (own copies left out)."""
    _, p, emb = matrices(rec, run / "pool", val, names)
    distance = int(acc.workflow_clean().get("max_distance", 6))
    pics = acc.pictures_of(acc.set_root(name, tag), tag.parents[3] / f"{name}-pictures-d{distance}.json", distance)
    cluster = {f: pics[f].cluster if f in pics else f for f in val}
    copies = {f: {v for v in val if cluster[v] == cluster[f]} | {f} for f in val}
    return {"calibrated": (cosines_leaving_out(emb, rec.gallery, names, [set(val)] * len(val)), p),
            "final": (cosines_leaving_out(emb, rec.gallery, names, [copies[f] for f in val]), p)}


def study(run: Path, tag: Path, name: str, protocol: str, seed: int, foreign_pictures: int, version: str = "recipe") -> dict:
    """One run's scores and rules; `run` holds its versions, pool and training (`tag` itself, or its clean-* folder
    since accuracy.py trains on the cleaned pool), `tag` the set-aside split."""
    from anime_role_detect.data.layout import scan_dataset
    from anime_role_detect.recognition.openset import calibrate

    full = acc.set_root(name, tag)
    rec = acc.recognizer(run / f"version-{version}", openset=False)
    w, t = rec.gallery_weight(), float(rec.gallery_temperature() or 1.0)
    names = [c["name"] for c in rec.characters()]
    test = json.loads((tag / "test_split.json").read_text())["test"]
    trained = json.loads((run / "recipe" / "accuracy_run.json").read_text())
    val = json.loads(_path(trained["split_path"]).read_text())["val"]
    unseen = sorted(r.file_name for r in scan_dataset(full) if r.character not in names)
    by_gallery = val_scores(rec, run, tag, name, val, names)
    gv, pv = by_gallery["calibrated"]
    yv = np.array([names.index(f.split("/")[0]) for f in val])
    gt, pt, _ = matrices(rec, full, test, names)
    yt = np.array([names.index(f.split("/")[0]) for f in test])
    gu, pu, _ = matrices(rec, full, unseen, names)
    froot = acc.set_root(FOREIGN[name], tag) if name in FOREIGN else None
    ffiles = sorted(r.file_name for r in scan_dataset(froot))[::3][:foreign_pictures] if froot is not None else []
    gf, pf = matrices(rec, froot, ffiles, names)[:2] if ffiles else (np.zeros((0, len(names))),) * 2
    right = fused(gv, pv, w, t).argmax(1) == yv
    test_right = fused(gt, pt, w, t).argmax(1) == yt
    scores, rules = {}, {}
    for sname, f in SCORES.items():
        th = calibrate(f(gv, pv, w, t)[right], leave_one_out(gv, pv, yv, f, w, t), 0.05, 0.95).threshold
        known, other = f(gt, pt, w, t), f(gu, pu, w, t)
        scores[sname] = {"auroc": acc.auroc(known, other), "known_refused": refused(known, th), "unseen_refused": refused(other, th),
                         "best_unseen_refused_at_2pct_known": refused(other, np.quantile(known, 0.02)),
                         "best_unseen_refused_at_5pct_known": refused(other, np.quantile(known, 0.05)),
                         "foreign_auroc": acc.auroc(known, f(gf, pf, w, t))}
    for rname, rule in RULES.items():
        f = SCORES[rule.score]
        g, p = by_gallery[rule.val_gallery]
        ok = fused(g, p, w, t).argmax(1) == yv
        th = rule_threshold(f(g, p, w, t)[ok], leave_one_out(g, p, yv, f, w, t, rule.renormalise), rule.keep, rule.order_only)
        known = f(gt, pt, w, t)
        rules[rname] = {"known_refused": refused(known, th), "right_refused": refused(known[test_right], th),
                        "top1_with_refusals": float((test_right & (known >= th)).mean()),
                        "unseen_refused": refused(f(gu, pu, w, t), th), "foreign_refused": refused(f(gf, pf, w, t), th)}
    return {"set": name, "protocol": protocol, "seed": seed, "known_pictures": len(test), "unseen_pictures": len(unseen),
            "foreign_pictures": len(ffiles), "fusion_top1": float(test_right.mean()), "scores": scores, "rules": rules}


def finished_runs(work: Path, version: str = "recipe", protocol: str = "*") -> Iterator[tuple[Path, Path]]:
    """(tag, run folder) of every run under accuracy.py's `work` with a finished `version` (its eval set is written last)
    and set-aside pictures (``tag/test_split.json``); the run folder is the tag itself, or its ``clean-<options>``
    folder since accuracy.py cleans its pool."""
    for tag in sorted(work.glob(f"*/{protocol}/s*/t*")):
        for run in [tag, *sorted(tag.glob("clean-*"))]:
            if (run / f"version-{version}" / "eval_metrics.json").is_file() and (tag / "test_split.json").is_file():
                yield tag, run


def _pm(xs: list[float], scale: float = 100.0, digits: int = 1) -> str:
    xs = [x for x in xs if not np.isnan(x)]
    return "-" if not xs else f"{scale * np.mean(xs):.{digits}f} ± {scale * np.std(xs):.{digits}f}"


def rule_table(runs: list[dict]) -> str:
    lines = ["| set | protocol | runs | rule | known refused | of right answers | top-1 counting refusals | unseen refused | foreign refused |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key in sorted({(r["set"], r["protocol"]) for r in runs}):
        rs = [r for r in runs if (r["set"], r["protocol"]) == key]
        for rname in RULES:
            cols = ("known_refused", "right_refused", "top1_with_refusals", "unseen_refused", "foreign_refused")
            cells = " | ".join(_pm([r["rules"][rname][c] for r in rs]) for c in cols)
            lines.append(f"| {key[0]} | {key[1]} | {len(rs)} | {rname} | {cells} |")
    return "\n".join(lines)


def table(runs: list[dict]) -> str:
    cols = ["auroc", "known_refused", "unseen_refused", "best_unseen_refused_at_2pct_known", "best_unseen_refused_at_5pct_known"]
    lines = ["| set | runs | score | AUROC | known refused | unseen refused | best: unseen refused at 2% / 5% known refused | AUROC x today's | AUROC, foreign |",
             "|---|---|---|---|---|---|---|---|---|"]
    runs = [r for r in runs if r["protocol"] == "unseen"]
    for name in sorted({r["set"] for r in runs}):
        rs = [r for r in runs if r["set"] == name]
        base = np.mean([r["scores"]["fused_max"]["auroc"] for r in rs])
        for sname in SCORES:
            m = {c: (np.mean([r["scores"][sname][c] for r in rs]), np.std([r["scores"][sname][c] for r in rs])) for c in cols}
            pct = lambda c: f"{100 * m[c][0]:.1f} ± {100 * m[c][1]:.1f}"  # noqa: E731
            lines.append(f"| {name} | {len(rs)} | {sname}{' (today)' if sname == 'fused_max' else ''} | {m['auroc'][0]:.3f} ± {m['auroc'][1]:.3f} | "
                         f"{pct('known_refused')} | {pct('unseen_refused')} | {pct(cols[3])} / {pct(cols[4])} | {m['auroc'][0] / base:.3f} | "
                         f"{_pm([r['scores'][sname]['foreign_auroc'] for r in rs], 1.0, 3)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, nargs="+", default=[REPO / "outputs" / "benchmarks" / "accuracy" / "work"],
                    help="accuracy.py's --work folder(s)")
    ap.add_argument("--version", default="recipe", help="which of each run's versions: recipe, recipe+colour, ...")
    ap.add_argument("--foreign-pictures", type=int, default=120, help="pictures of another set scored as strangers")
    ap.add_argument("--json", type=Path, default=None, help="also write every run's figures here")
    args = ap.parse_args(argv)
    quiet()
    load0 = os.getloadavg()
    runs = []
    for work in args.work:
        for tag, run in finished_runs(work, args.version):
            name, protocol, seed = tag.parts[-4], tag.parts[-3], int(tag.parts[-2][1:])
            runs.append(study(run, tag, name, protocol, seed, args.foreign_pictures, args.version))
            print(f"  {name} {protocol} seed {seed}: " + ", ".join(f"{k}: top-1 {v['top1_with_refusals']:.3f}, unseen refused "
                                                                   f"{v['unseen_refused']:.3f}" for k, v in runs[-1]["rules"].items()),
                  file=sys.stderr, flush=True)
    if not runs:
        print(f"error: no versions with set-aside pictures under {args.work}; run benchmarks/accuracy.py first", file=sys.stderr)
        return 2
    print(f"# open-set scores of version-{args.version} over {len(runs)} runs; load average at start {load0[0]:.2f}, at end {os.getloadavg()[0]:.2f}\n")
    print(rule_table(runs) + "\n")
    print(table(runs))
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
