"""Top-1 of gallery recognition on the real labelled sets (``$ARD_DATA_DIR``, default ../shared/data), leak-free 80/20 splits.

For each set: near-duplicates grouped (`data.dedupe`), `stratified_group_split` per seed, gallery built
from the train side with the real `Gallery` (Faiss) and queried with the val side. Every image is
embedded once per embedder (plus its mirror image), then each gallery variant reuses the vectors.

Baseline (same run, same splits): frozen ImageNet Lite0 features, one mean prototype per character,
no flip: the recipe behind the data README's 40.7% / 87.8% (which used random splits).
With ``--ckpt SET=PATH`` the fine-tuned classifier is evaluated too: as an embedder (gallery mode) and
as a classifier (model mode), on the same val images (the checkpoint must not have trained on them:
pass its split manifest with ``--split SET=data/splits/<set>-...json``).

    python benchmarks/eval_real_data.py [--sets newgame_full mixed5] [--seeds 0 1 2]
    python benchmarks/eval_real_data.py --sets mixed5 --ckpt mixed5=CKPT --split mixed5=data/splits/mixed5-...json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from _common import LITE0, embed_all, gallery_top1, quiet, real_set, seeded_splits, unit

VARIANTS = {
    # name: (use flip, prototypes, aggregate)
    "mean prototype (baseline recipe)": (False, {"method": "mean"}, "max"),
    "mean prototype + flip": (True, {"method": "mean"}, "max"),
    "kmeans 4/char + flip": (True, {"method": "kmeans", "k": 4}, "max"),
    "all samples, top-3 mean + flip": (True, {"method": "all"}, "top3_mean"),
    "all samples, max (1-NN) + flip": (True, {"method": "all"}, "max"),
}


def model_top1(ckpt: str, paths: list[Path], labels: list[str], val: np.ndarray) -> float:
    from anime_role_detect.fusion.finetune import classifier_top1
    from anime_role_detect.imageio import load_image

    return float(classifier_top1(Path(ckpt), [load_image(paths[j]) for j in val], [labels[j] for j in val]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sets", nargs="+", default=["newgame_full", "mixed5"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ckpt", nargs="*", default=[], help="SET=PATH: a fine-tuned classifier for that set")
    ap.add_argument("--split", nargs="*", default=[], help="SET=PATH: use this split manifest (train.py's data/splits/*.json) instead of --seeds")
    args = ap.parse_args(argv)
    quiet(args.threads)
    from anime_role_detect.recognition.embedder import ClassifierEmbedder, build_embedder

    ckpts = dict(c.split("=", 1) for c in args.ckpt)
    manifests = dict(c.split("=", 1) for c in args.split)
    lite0 = build_embedder(LITE0)
    rows: list[tuple[str, str, str]] = []
    for name in args.sets:
        s = real_set(name)
        if s is None:
            continue
        paths = [r.path(s.root) for r in s.records]
        labels = s.labels
        print(f"{name}: {len(s.records)} images, {len(set(labels))} characters, {s.near_duplicate_groups} near-duplicate groups", file=sys.stderr)
        if name in manifests:  # the exact split a checkpoint was trained on: its val images are unseen by it
            m = json.loads(Path(manifests[name]).read_text())
            splits = [(np.array([s.pos[f] for f in m["train"] if f in s.pos]), np.array([s.pos[f] for f in m["val"] if f in s.pos]))]
            print(f"  split from {manifests[name]}: {len(splits[0][0])} train / {len(splits[0][1])} val", file=sys.stderr)
        else:
            splits = seeded_splits(s, args.seeds)
        embedders = {"ImageNet Lite0 (frozen)": lite0}
        if name in ckpts:
            embedders["fine-tuned classifier"] = ClassifierEmbedder(ckpts[name])
        for ename, emb in embedders.items():
            t0 = time.perf_counter()
            plain, flipped = embed_all(emb, paths)
            ms = (time.perf_counter() - t0) * 1e3 / (2 * len(paths))
            both = unit(plain + flipped)
            for vname, (flip, protos, agg) in VARIANTS.items():
                vecs = both if flip else plain
                accs = [gallery_top1(vecs, labels, tr, va, protos, agg) for tr, va in splits]
                rows.append((name, f"clip: {ename}, {vname}", f"{100 * statistics.mean(accs):.1f} ± {100 * statistics.pstdev(accs):.1f}"))
                print(f"  {rows[-1][1]}: {rows[-1][2]}   ({ms:.0f} ms/img embed)", file=sys.stderr)
        if name in ckpts:
            accs = [model_top1(ckpts[name], paths, labels, va) for _, va in splits]
            rows.append((name, "model: fine-tuned classifier", f"{100 * statistics.mean(accs):.1f} ± {100 * statistics.pstdev(accs):.1f}"))
    print("\n| set | method | top-1 % (mean ± sd over splits) |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")
    print("\nrerank: n/a on these sets (no per-image tags to learn profiles from; see docs/recognition.md)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
