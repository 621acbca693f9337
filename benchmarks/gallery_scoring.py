"""How should a gallery turn its rows into one score per character? Closed-set top-1 against 5-shot enrolment.

A character enrolled from 5 pictures competes with trained characters that have 30-100 rows each. With the
gallery's aggregates (`max`, `top3_mean`) the best of many rows beats the best of five on pictures of the new
character too, so it is rarely named (the extreme-value effect: the maximum of more samples is higher). This
script measures that, and the scorings that would undo it, on the real sets with frozen features (no training,
minutes on 2 cores), so the trade-off is on record:

* ``top3_mean`` (the default, through the real `Gallery`) and ``max`` (also the real `Gallery`);
* ``mean``: one mean prototype per character (each character one row, whatever its count);
* ``fair``: the mean of a character's best ``round(3 n / n_min)`` rows, ``n_min`` the smallest character's row count
  (every character scored at the same quantile of its own rows);
* ``balanced`` (the real `Gallery`): the same, ``n_min`` fixed when the gallery was built (an enrolled character with
  fewer rows is scored on its best ``max(1, round(3 n / n_min))``; no other character's score moves when one is enrolled);
* ``top3_mean+few``: ``top3_mean`` for characters with at least the build's ``n_min`` rows, and the mean of the
  best ``max(1, round(3 n / n_min))`` for a character enrolled later with fewer (the trained characters' scores stay
  ``top3_mean``'s);
* ``znorm``: ``top3_mean`` standardised per character by its scores on other characters' rows (as in speaker
  verification);
* ``+centred``: the rows' mean subtracted before normalising (SimpleShot's CL2N), with ``top3_mean``.

Per set and seed: a leak-free split of the trained characters (near-duplicates grouped), 2 characters held out
(the same ones as `benchmarks/accuracy.py` picks per seed), enrolled from 5 pictures of distinct duplicate groups
and scored on their other pictures (none in an enrolled picture's group). "closed" is the trained characters' test
pictures before enrolment, "enrolled" the held-out characters' pictures after it, "others" the trained characters'
test pictures after it; Δ columns are against ``top3_mean`` in the same run.

    python benchmarks/gallery_scoring.py                         # every real set, seeds 0 1 2, frozen Lite0
    python benchmarks/gallery_scoring.py --sets newgame_full --ckpt run/checkpoints/best.ckpt --held suzukaze_aoba toyama_rin

With ``--ckpt`` (a classifier trained without the ``--held`` characters) the enrolled figure is fair, but the
trained characters' pictures may be ones the checkpoint trained on: "closed" and "others" are then optimistic.
``--runs`` scores runs of `benchmarks/accuracy.py` instead (folders ``<work>/<set>/<closed|unseen>/s<seed>/t0.2``): their
checkpoint's features, their training pictures as the rows, their set-aside pictures as queries (clip mode, leak-free);
an unseen run's held-out characters are enrolled from the same 5 pictures accuracy.py enrols and scored on the rest:

    python benchmarks/gallery_scoring.py --runs outputs/benchmarks/accuracy/work/*/closed/s0/t0.2
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from _common import LITE0, RealSet, data_dir, held_out, quiet, real_set, unit

REAL_SETS = ("newgame_full", "newgame_faces", "faces6", "mixed5")
SHOTS = 5
HELD_OUT = 2
BASELINE = "top3_mean"


def embed_files(embedder: Any, paths: Sequence[Path]) -> np.ndarray:
    """Unit embeddings of the pictures at `paths`, 32 at a time."""
    from anime_role_detect.imageio import load_image

    return unit(np.concatenate([embedder.embed([load_image(p) for p in paths[i : i + 32]]) for i in range(0, len(paths), 32)]))


def protocol(s: RealSet, held: Sequence[str], seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(gallery rows, trained characters' test rows, enrolment rows, enrolled characters' test rows), leak-free."""
    from anime_role_detect.data.layout import stratified_group_split

    known = [r for r in s.records if r.character not in held]
    sp = stratified_group_split(known, 0.2, seed)
    rng = np.random.default_rng(seed)
    enrol, test = [], []
    for c in held:
        rows = [i for i, r in enumerate(s.records) if r.character == c]
        groups: dict[str, list[int]] = {}
        for i in rows:
            groups.setdefault(s.records[i].group or s.records[i].file_name, []).append(i)
        order = list(groups)
        rng.shuffle(order)
        picked = order[:SHOTS]
        enrol += [groups[g][0] for g in picked]
        test += [i for g in order[SHOTS:] for i in groups[g]]
    pos = s.pos
    return (np.array([pos[f] for f in sp.train]), np.array([pos[f] for f in sp.val]), np.array(enrol), np.array(test))


# -- scorings: (rows [R, D], row labels, queries [Q, D]) -> best character per query ---------------------------
def _real_gallery(aggregate: str) -> Callable[..., np.ndarray]:
    def score(rows: np.ndarray, labels: np.ndarray, queries: np.ndarray, n_ref: int | None = None) -> np.ndarray:
        from anime_role_detect.recognition.gallery import Gallery

        g = Gallery("scoring", rows.shape[1], aggregate=aggregate)
        for c in sorted(set(labels)):
            g.add(c, "", rows[labels == c])
        g.reference_rows = n_ref  # `balanced`: fixed when the gallery was built, before enrolment
        return np.array([r[0][0] if r else "" for r in g.search(queries, k=1)])
    return score


def _by_character(reduce: Callable[[np.ndarray, int, int], np.ndarray]) -> Callable[..., np.ndarray]:
    """A scoring from `reduce(sorted similarities [Q, n] best first, n, n_min) -> [Q]`, over every row (exact).

    `n_min` is the smallest character's row count, or `n_ref` when given (the count fixed when the gallery was built,
    so enrolling a character changes no other character's score)."""
    def score(rows: np.ndarray, labels: np.ndarray, queries: np.ndarray, n_ref: int | None = None) -> np.ndarray:
        names = sorted(set(labels))
        n_min = n_ref or min(int((labels == c).sum()) for c in names)
        sims = queries @ rows.T
        m = np.stack([reduce(-np.sort(-sims[:, labels == c], axis=1), int((labels == c).sum()), n_min) for c in names], 1)
        return np.array(names)[m.argmax(1)]
    return score


def _znorm(rows: np.ndarray, labels: np.ndarray, queries: np.ndarray, impostors: int = 300) -> np.ndarray:
    names = sorted(set(labels))
    rng = np.random.default_rng(0)
    cols = []
    for c in names:
        mine = rows[labels == c]
        other = np.flatnonzero(labels != c)
        other = rng.choice(other, min(impostors, len(other)), replace=False)
        imp = -np.sort(-(rows[other] @ mine.T), axis=1)[:, :3].mean(1)
        cols.append((-np.sort(-(queries @ mine.T), axis=1)[:, :3].mean(1) - imp.mean()) / (imp.std() + 1e-6))
    return np.array(names)[np.stack(cols, 1).argmax(1)]


def _centred(inner: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]) -> Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]:
    def score(rows: np.ndarray, labels: np.ndarray, queries: np.ndarray, centre: np.ndarray | None = None) -> np.ndarray:
        mu = rows.mean(0) if centre is None else centre
        return inner(unit(rows - mu), labels, unit(queries - mu))
    return score


SCORINGS: dict[str, Callable[..., np.ndarray]] = {
    BASELINE: _real_gallery("top3_mean"),
    "max": _real_gallery("max"),
    "mean": _by_character(lambda s, n, n_min: s.mean(1)),
    "fair": _by_character(lambda s, n, n_min: s[:, : max(1, round(3 * n / n_min))].mean(1)),
    "balanced": _real_gallery("balanced"),
    "top3_mean+few": _by_character(lambda s, n, n_min: s[:, : min(3, max(1, round(3 * n / n_min)))].mean(1)),
    "znorm": _znorm,
    "top3_mean+centred": _centred(_real_gallery("top3_mean")),
}


def _fixed_at_build(name: str, rows: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """What a scoring fixes when its gallery is built, so that enrolling moves it not: the rows' centre (``+centred``)
    or the smallest character's row count (``balanced``, ``top3_mean+few``)."""
    if name.endswith("+centred"):
        return {"centre": rows.mean(0)}
    if name in ("balanced", "top3_mean+few"):
        return {"n_ref": int(np.bincount(np.unique(labels, return_inverse=True)[1]).min())}
    return {}


def score_all(rows: np.ndarray, labels: np.ndarray, queries: np.ndarray, truth: np.ndarray,
              enrolment: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None) -> dict[str, tuple[float, ...]]:
    """Per scoring, top-1 (%) on `queries` of a gallery of `rows`: ``(closed,)``, or with `enrolment` = (rows, labels,
    queries, truth) of characters enrolled after the build ``(closed, enrolled, others after enrolment)``."""
    out: dict[str, tuple[float, ...]] = {}
    for name, fn in SCORINGS.items():
        kw = _fixed_at_build(name, rows, labels)
        closed = 100 * float(np.mean(fn(rows, labels, queries, **kw) == truth))
        if enrolment is None:
            out[name] = (closed,)
            continue
        e_rows, e_labels, u_queries, u_truth = enrolment
        after = fn(np.concatenate([rows, e_rows]), np.concatenate([labels, e_labels]), np.concatenate([u_queries, queries]), **kw)
        out[name] = (closed, 100 * float(np.mean(after[: len(u_queries)] == u_truth)), 100 * float(np.mean(after[len(u_queries):] == truth)))
    return out


def run_set(s: RealSet, vecs: np.ndarray, seeds: Sequence[int], held_names: Sequence[str] | None) -> dict[str, np.ndarray]:
    """scoring -> [seeds, 3] of (closed, enrolled, others) top-1."""
    labels = np.array(s.labels)
    out: dict[str, list[tuple[float, ...]]] = {k: [] for k in SCORINGS}
    for seed in seeds:
        held = list(held_names) if held_names else held_out(set(s.labels), seed, HELD_OUT)
        gal, test, enrol, utest = protocol(s, held, seed)
        got = score_all(vecs[gal], labels[gal], vecs[test], labels[test], (vecs[enrol], labels[enrol], vecs[utest], labels[utest]))
        for name, v in got.items():
            out[name].append(v)
    return {k: np.array(v) for k, v in out.items()}


def enrolment_files(set_root: Path, held: Sequence[str], seed: int) -> dict[str, list[str]]:
    """Per held-out character, its files in the order accuracy.py's unseen protocol draws them (first 5 enrolled)."""
    from anime_role_detect.data.layout import scan_dataset

    records = scan_dataset(set_root)
    rng = np.random.default_rng(seed)
    out = {}
    for c in held:
        files = sorted(r.file_name for r in records if r.character == c)
        rng.shuffle(files)
        out[c] = files
    return out


def score_run(d: Path) -> tuple[str, list[str]]:
    """One accuracy.py run's (label, cells): closed top-1 per scoring, or closed / enrolled / others for an unseen run."""
    import json

    from anime_role_detect.recognition.embedder import ClassifierEmbedder

    trained = json.loads((d / "recipe" / "accuracy_run.json").read_text())
    split = json.loads(Path(trained["split_path"]).read_text())
    test = json.loads((d / "test_split.json").read_text())["test"]
    set_name, protocol, seed = d.parts[-4], d.parts[-3], int(d.parts[-2].lstrip("s"))
    set_root = data_dir() / set_name
    emb = ClassifierEmbedder(trained["ckpt_path"], device="cpu", flip_tta=False)
    rows = embed_files(emb, [d / "pool" / f for f in split["train"]])  # the run's training pictures (hard links)
    queries = embed_files(emb, [set_root / f for f in test])  # set aside before training
    labels, truth = np.array([f.split("/")[0] for f in split["train"]]), np.array([f.split("/")[0] for f in test])
    label = "/".join(d.parts[-4:])
    if protocol != "unseen":
        return label, [f"{v[0]:.1f}" for v in score_all(rows, labels, queries, truth).values()]
    from anime_role_detect.data.layout import scan_dataset

    held = held_out({r.character for r in scan_dataset(set_root)}, seed, HELD_OUT)
    files = enrolment_files(set_root, held, seed)
    enrol = [f for c in held for f in files[c][:SHOTS]]
    utest = [f for c in held for f in files[c][SHOTS:]]
    enrolment = (embed_files(emb, [set_root / f for f in enrol]), np.array([f.split("/")[0] for f in enrol]),
                 embed_files(emb, [set_root / f for f in utest]), np.array([f.split("/")[0] for f in utest]))
    return label, [" / ".join(f"{x:.1f}" for x in v) for v in score_all(rows, labels, queries, truth, enrolment).values()]


def score_runs(dirs: Sequence[Path]) -> str:
    """Clip top-1 of every scoring on accuracy.py runs' set-aside pictures, with their own checkpoints (leak-free)."""
    lines = ["| run | " + " | ".join(SCORINGS) + " |", "|---|" + "---|" * len(SCORINGS)]
    for d in dirs:
        label, cells = score_run(d)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n(closed runs: closed top-1; unseen runs: closed / enrolled / others after enrolment)"


def table(results: dict[str, dict[str, np.ndarray]], seeds: Sequence[int]) -> str:
    head = (f"| set | scoring | closed | enrolled ({SHOTS} shots) | others after enrolment | mean of enrolled and others | "
            f"Δ closed | Δ enrolled | Δ others (vs {BASELINE}) |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for set_name, by in results.items():
        base = by[BASELINE].mean(0)
        for name, v in by.items():
            m = v.mean(0)
            d = m - base
            lines.append(f"| {set_name} | {name} | {m[0]:.1f} | {m[1]:.1f} | {m[2]:.1f} | {(m[1] + m[2]) / 2:.1f} | "
                         f"{d[0]:+.1f} | {d[1]:+.1f} | {d[2]:+.1f} |")
    return "\n".join(lines) + f"\n\n(mean of seeds {list(seeds)})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", nargs="+", default=list(REAL_SETS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--ckpt", default=None, help="a classifier checkpoint as the embedder (default: frozen ImageNet Lite0)")
    ap.add_argument("--held", nargs="*", default=None, help="the characters to hold out (default: accuracy.py's per seed)")
    ap.add_argument("--runs", type=Path, nargs="*", default=None, help="accuracy.py run folders (closed or unseen) to score instead (clip, leak-free)")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    quiet(args.threads)
    if args.runs:
        print(f"# gallery scoring of {len(args.runs)} accuracy.py runs (clip top-1 on their set-aside pictures); load average {os.getloadavg()[0]:.2f}")
        print(score_runs(args.runs))
        return 0
    from anime_role_detect.recognition.embedder import (
        ClassifierEmbedder,
        build_embedder,
    )

    embedder = ClassifierEmbedder(args.ckpt, device="cpu", flip_tta=False) if args.ckpt else build_embedder(LITE0)
    load0, t0 = os.getloadavg(), time.perf_counter()
    print(f"# gallery scoring: embedder {args.ckpt or 'frozen Lite0'}, seeds {args.seeds}; load average at start {load0[0]:.2f}")
    if args.ckpt:
        print("# --ckpt: the trained characters' pictures may be the checkpoint's training pictures; 'closed' and 'others' are optimistic")
    results: dict[str, dict[str, np.ndarray]] = {}
    for name in args.sets:
        s = real_set(name)
        if s is None:
            continue
        vecs = embed_files(embedder, [r.path(s.root) for r in s.records])
        results[name] = run_set(s, vecs, args.seeds, args.held)
    print(table(results, args.seeds))
    load1 = os.getloadavg()
    print(f"# {(time.perf_counter() - t0) / 60:.1f} min; load average at start {load0[0]:.2f}, at end {load1[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
