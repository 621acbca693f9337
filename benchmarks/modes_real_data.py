"""Top-1 of the real `Recognizer` in every mode (clip, model, fusion) x rerank on/off, on the real sets.

For each set and fine-tuned checkpoint: the checkpoint's own split manifest (train.py writes it under
data/splits/), a recognition folder built by `recognition.build.build_recognition_folder` from the train
side only (gallery, calibration, model.ckpt, tag profiles when the data has tags), then the val side
through `Recognizer.recognize_batch` exactly as `infer.py` runs it (no detector, open set off so
every answer is a name). Baseline in the same run, same split: the data README's recipe (frozen
ImageNet Lite0, one mean prototype per character).

    python benchmarks/modes_real_data.py --run newgame_full=CKPT:SPLIT.json [--run mixed5=CKPT:SPLIT.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import LITE0, data_dir, embed_all, gallery_top1, quiet, set_root

MODES = (("clip", False), ("clip", True), ("model", False), ("model", True), ("fusion", False), ("fusion", True))


def link_subset(root: Path, files: list[str], out: Path) -> Path:
    """A dataset folder holding only `files` of `root` (hard links), so the gallery never sees val images."""
    from anime_role_detect.fsutil import link_or_copy

    for f in files:
        link_or_copy(root / f, out / f)
    return out


def run_set(name: str, ckpt: str, split_path: str, work: Path, embedder: str) -> list[tuple[str, str, str]]:
    from anime_role_detect.confutil import compose_config
    from anime_role_detect.data.layout import scan_dataset
    from anime_role_detect.imageio import load_image
    from anime_role_detect.recognition.build import build_recognition_folder
    from anime_role_detect.recognition.embedder import build_embedder
    from anime_role_detect.recognition.pipeline import Recognizer

    root = data_dir() / name
    split = json.loads(Path(split_path).read_text())
    recs = {r.file_name: r for r in scan_dataset(root)}
    train = [f for f in split["train"] if f in recs]
    val = [recs[f] for f in split["val"] if f in recs]
    print(f"{name}: {len(train)} train / {len(val)} val (split {split_path})", file=sys.stderr)
    rows: list[tuple[str, str, str]] = []

    # baseline: the data README's recipe on the same split
    lite0 = build_embedder(LITE0)
    files = train + [r.file_name for r in val]
    plain, _ = embed_all(lite0, [root / f for f in files])
    labels = [recs[f].character for f in files]
    tr, va = np.arange(len(train)), np.arange(len(train), len(files))
    base = gallery_top1(plain, labels, tr, va)
    rows.append((name, "baseline: frozen Lite0, one mean prototype (data README recipe)", f"{100 * base:.1f}"))

    train_root = link_subset(root, train, work / name / "train")
    version = work / name / "version"
    cfg = compose_config("infer", [f"embedder={embedder}", "detector=none", "openset.enabled=false", "feature_log.enabled=false"])
    from omegaconf import OmegaConf

    plain_cfg = OmegaConf.to_container(cfg, resolve=False)
    plain_cfg.pop("paths", None), plain_cfg.pop("hydra", None), plain_cfg.pop("log", None)
    report = build_recognition_folder(train_root, version, plain_cfg, model_ckpt=ckpt, val_fraction=0.2, seed=0)
    print(f"  built {version}: {report}", file=sys.stderr)
    images = [(load_image(r.path(root)), r.file_name) for r in val]
    for mode, rerank in MODES:
        rec = Recognizer.from_version(version, {**plain_cfg, "mode": mode, "rerank": rerank, "detector": None})
        t0 = time.perf_counter()
        answers = rec.recognize_batch(images)
        ms = (time.perf_counter() - t0) * 1e3 / len(images)
        acc = float(np.mean([a.role == r.character for a, r in zip(answers, val)]))
        used = sum(bool(d.rerank and d.rerank.tags_used) for a in answers for d in a.detections)
        label = f"{mode}, rerank={'on' if rerank else 'off'} ({embedder} gallery)" if mode != "model" else f"model, rerank={'on' if rerank else 'off'}"
        rows.append((name, label, f"{100 * acc:.1f}"))
        print(f"  {label}: {rows[-1][2]}%  ({ms:.0f} ms/img, reranked detections: {used}; ratio to baseline {acc / base:.2f})", file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", nargs="+", required=True, help="SET=CKPT:SPLIT_JSON (a train.py checkpoint and the split it was trained on)")
    ap.add_argument("--embedder", default="lite0", help="conf/embedder/ group for the gallery (lite0 | classifier | ...)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    quiet(args.threads)
    rows: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for item in args.run:
            name, spec = item.split("=", 1)
            ckpt, split = spec.rsplit(":", 1)
            if set_root(name) is None:
                continue
            rows += run_set(name, ckpt, split, Path(tmp), args.embedder)
    print("\n| set | mode | top-1 % (checkpoint's val split) |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
