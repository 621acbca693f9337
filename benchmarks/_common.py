"""Helpers the benchmarks share: offline defaults, quiet logging + torch threads, the real data set, gallery top-1.

Benchmarks run with the installed package (``.venv/bin/python benchmarks/<name>.py``) and import this
module from their own folder (a script's folder is on ``sys.path``); none edits ``sys.path``.
Importing it makes the run offline by default (``HF_HUB_OFFLINE``, ``YOLO_OFFLINE``, ``WANDB_MODE``),
so import it before the libraries that read those settings.

The real labelled data (never copied into the repo) is found from one setting: ``ARD_DATA_DIR``,
default ``<repo>/../shared/data``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA_ENV = "ARD_DATA_DIR"
#: the data README's baseline embedder: frozen ImageNet EfficientNet-Lite0 (offline weights), no flip TTA
LITE0: dict[str, Any] = {"kind": "timm", "model_name": "efficientnet_lite0_offline", "pretrained": True, "flip_tta": False,
                         "batch_size": 32}

for _key, _value in (("HF_HUB_OFFLINE", "1"), ("YOLO_OFFLINE", "1"), ("WANDB_MODE", "offline")):
    os.environ.setdefault(_key, _value)


def data_dir() -> Path:
    """The folder of the real labelled sets: ``$ARD_DATA_DIR``, else ``<repo>/../shared/data``."""
    return Path(os.environ.get(DATA_ENV) or REPO.parent / "shared" / "data")


def quiet(threads: int = 0, level: str = "WARNING") -> None:
    """Only `level` and above from the project's (loguru) log on stderr; `threads` torch threads (0: torch's default)."""
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level=level)
    if threads:
        import torch

        torch.set_num_threads(threads)


def set_root(name: str) -> Path | None:
    """``data_dir()/name``, or None (with a note on stderr) when that set is absent."""
    root = data_dir() / name
    if not root.is_dir():
        print(f"skip {name}: {root} not found (set {DATA_ENV})", file=sys.stderr)
        return None
    return root


class RealSet(NamedTuple):
    """One real labelled set, near-duplicates grouped (so splits are leak-free)."""

    name: str
    root: Path
    records: list
    labels: list[str]
    pos: dict[str, int]  # file name -> row
    near_duplicate_groups: int


def real_set(name: str) -> RealSet | None:
    """Scan ``data_dir()/name`` and group its near-duplicates; None (with a note on stderr) when it is absent."""
    from anime_role_detect.data.dedupe import assign_duplicate_groups
    from anime_role_detect.data.layout import scan_dataset

    root = set_root(name)
    if root is None:
        return None
    recs = scan_dataset(root)
    rep = assign_duplicate_groups(recs, root)
    return RealSet(name, root, recs, [r.character for r in recs], {r.file_name: i for i, r in enumerate(recs)},
                   rep.near_duplicate_groups)


def seeded_splits(s: RealSet, seeds: Sequence[int], val_fraction: float = 0.2) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train rows, val rows) of a leak-free stratified split per seed."""
    from anime_role_detect.data.layout import stratified_group_split

    out = []
    for seed in seeds:
        sp = stratified_group_split(s.records, val_fraction, seed)
        out.append((np.array([s.pos[f] for f in sp.train]), np.array([s.pos[f] for f in sp.val])))
    return out


def held_out(names: Sequence[str], seed: int, n: int = 2) -> list[str]:
    """The `n` characters a seed holds out of training (accuracy.py's unseen protocol; gallery_scoring.py the same)."""
    return sorted(np.random.default_rng(1000 + seed).choice(sorted(names), n, replace=False).tolist())


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32)."""
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def embed_all(embedder: Any, paths: list[Path], batch: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Plain and mirrored embeddings of every image (flip_tta off, so both are raw)."""
    from PIL import Image

    from anime_role_detect.imageio import load_image

    plain, flipped = [], []
    for i in range(0, len(paths), batch):
        ims = [load_image(p) for p in paths[i : i + batch]]
        plain.append(embedder.embed(ims))
        flipped.append(embedder.embed([im.transpose(Image.FLIP_LEFT_RIGHT) for im in ims]))
        print(f"\r  embedded {min(i + batch, len(paths))}/{len(paths)}", end="", file=sys.stderr)
    print(file=sys.stderr)
    return np.concatenate(plain), np.concatenate(flipped)


def gallery_top1(vecs: np.ndarray, labels: list[str], train: np.ndarray, val: np.ndarray,
                 prototypes: dict | None = None, aggregate: str = "max") -> float:
    """Top-1 of the real `Gallery` built from the `train` rows and queried with the `val` rows (default: one mean prototype)."""
    from anime_role_detect.recognition.gallery import Gallery

    g = Gallery("eval", vecs.shape[1], prototypes=prototypes or {"method": "mean"}, aggregate=aggregate)
    for c in sorted(set(labels)):
        g.add(c, "", vecs[[i for i in train if labels[i] == c]])
    res = g.search(vecs[val], k=1)
    return float(np.mean([bool(r) and r[0][0] == labels[i] for r, i in zip(res, val)]))
