"""Build and edit galleries: ``python -m anime_role_detect.recognition.gallery_cli build|add|remove|list``.

``build`` turns a labelled dataset folder into a recognition folder (the version-folder contract):
``gallery.faiss`` + ``gallery.json``, ``tag_profiles.json`` (when the metadata has tags) and
``calibration.json`` (open-set thresholds and rerank weights tuned on a held-out split), plus a
copy of ``model.ckpt`` when given. Extra ``key=value`` arguments are Hydra overrides of
``conf/infer.yaml`` (e.g. ``embedder=open_clip gallery.index.type=hnsw``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from PIL import Image

from ..cli import user_errors_exit
from ..confutil import CONFIG_DIR, to_plain as _plain
from ..errors import ConfigError, DatasetError, ImageError
from ..imageio import IMAGE_SUFFIXES, load_image
from ..log import get_logger
from .gallery import Gallery
from .openset import OpenSetCalibration, calibrate, leave_one_out_scores
from .pipeline import MODEL_FILE, MODES, Recognizer
from .rerank import DEFAULT_WEIGHTS, TagReranker, tune_weight

_log = get_logger("system")


def compose_config(overrides: Sequence[str] = (), config_name: str = "infer") -> dict[str, Any]:
    """``conf/<config_name>.yaml`` with Hydra overrides, as a plain dict (no Hydra run folder)."""
    from omegaconf import OmegaConf, open_dict

    from ..confutil import compose_config as compose

    cfg = compose(config_name, overrides, fix=f"check the overrides {' '.join(overrides)}", config_dir=CONFIG_DIR)
    with open_dict(cfg):
        cfg.pop("hydra", None)
        if "paths" in cfg:
            del cfg.paths["output_dir"]  # only resolvable inside a Hydra run
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def _safe_loader(path: Path) -> Callable[[], Image.Image | None]:
    def load() -> Image.Image | None:
        try:
            return load_image(path)
        except ImageError as exc:
            _log.warning(f"skipped unreadable image: {exc}")
            return None

    return load


@dataclass
class BuildReport:
    """What `build_recognition_folder` made and how well it did on the held-out images."""

    out_dir: str
    characters: int
    train_images: int
    val_images: int
    rows: int
    embedder_id: str
    top1: dict[str, float] = field(default_factory=dict)  # "<mode>" and "<mode>+rerank" on val
    thresholds: dict[str, float] = field(default_factory=dict)
    rerank_weights: dict[str, float] = field(default_factory=dict)


def _score_matrix(cands: list[list[tuple[str, str, float]]], names: list[str]) -> np.ndarray:
    col = {n: i for i, n in enumerate(names)}
    m = np.full((len(cands), len(names)), -1.0)
    for r, row in enumerate(cands):
        for c, _, s in row:
            if c in col:
                m[r, col[c]] = s
    return m


def evaluate_split(rec: Recognizer, images: list[Image.Image], labels: list[str], modes: Sequence[str],
                   target_far: float = 0.05, tune: bool = True, min_tar: float = 0.9,
                   tag_truth: Sequence[Sequence[str]] | None = None) -> tuple[dict[str, float], OpenSetCalibration, dict[str, float]]:
    """Top-1 with/without reranking per mode on labelled images, open-set thresholds, tuned rerank weights.

    With `tag_truth` (the images' metadata tags) the reranker first learns the tagger's noise per tag.
    """
    top1: dict[str, float] = {}
    calib = OpenSetCalibration(target_far=target_far)
    weights: dict[str, float] = {}
    names = sorted(set(labels) | {c["name"] for c in rec.characters()})
    rec.n_candidates = max(rec.n_candidates, len(names))
    for mode in modes:
        need_tags = rec.reranker is not None and rec.tagger is not None
        scored = rec._score(images, mode, need_tags, False)
        top1[mode] = float(np.mean([bool(c) and c[0][0] == y for c, y in zip(scored.candidates, labels)]))
        known = [i for i, y in enumerate(labels) if y in names]
        if len(set(labels)) >= 2:
            m = _score_matrix(scored.candidates, names)
            y_idx = [names.index(labels[i]) for i in known]
            g, imp = leave_one_out_scores(m[known], y_idx, renormalise=(mode == "model"))
            calib.modes[mode] = calibrate(g, imp, target_far, min_tar)
        if need_tags and scored.tag_probs is not None:
            aligned = rec.reranker.align(scored.tag_probs, rec.tagger.tag_names)
            if tag_truth is not None and rec.reranker.noise is None:
                truth = np.array([[t in set(tags) for t in rec.reranker.tags] for tags in tag_truth])
                usable = rec.reranker.fit_tagger_noise(aligned, truth, tagger_id=getattr(rec.tagger, "model_id", ""))
                _log.info(f"tagger noise model: {usable} of {len(rec.reranker.tags)} profile tags usable")
            if tune:
                weights[mode], _ = tune_weight(rec.reranker, scored.candidates, aligned, labels, default=DEFAULT_WEIGHTS.get(mode, 0.03))
            w = weights.get(mode, rec.reranker.weight_for(mode))
            hits = [rec.reranker.rerank(c, a, weight=w).candidates[0][0] == y for c, a, y in zip(scored.candidates, aligned, labels) if c]
            top1[f"{mode}+rerank"] = float(np.mean(hits))
    return top1, calib, weights


def build_recognition_folder(data_root: str | Path, out_dir: str | Path, cfg: Mapping[str, Any], model_ckpt: str | Path | None = None,
                             val_fraction: float = 0.2, seed: int = 42, target_far: float = 0.05, dedupe: bool = True,
                             include_val: bool = True, progress: Callable[[int, int], None] | None = None) -> BuildReport:
    """Dataset folder -> gallery + tag profiles + calibration (+ model.ckpt copy) in `out_dir`, tuned on a leak-free split."""
    from ..data.layout import scan_dataset, stratified_group_split
    from .embedder import build_embedder

    cfg = dict(_plain(cfg) or {})
    root, out = Path(data_root), Path(out_dir)
    records = scan_dataset(root)
    if dedupe and val_fraction > 0:
        from ..data.dedupe import assign_duplicate_groups

        assign_duplicate_groups(records, root)
    if val_fraction > 0:
        split = stratified_group_split(records, val_fraction, seed)
        val_set = set(split.val)
        train = [r for r in records if r.file_name not in val_set]
        val = [r for r in records if r.file_name in val_set]
    else:
        train, val = list(records), []
    out.mkdir(parents=True, exist_ok=True)
    if model_ckpt:
        if Path(model_ckpt).resolve() != (out / MODEL_FILE).resolve():
            shutil.copy2(model_ckpt, out / MODEL_FILE)
    ecfg = dict(cfg.get("embedder") or {"kind": "timm"})
    if ecfg.get("kind") == "classifier":
        if not (out / MODEL_FILE).is_file() and not ecfg.get("ckpt_path"):
            raise ConfigError("embedder=classifier needs --model-ckpt (or embedder.ckpt_path)")
        ecfg["ckpt_path"] = MODEL_FILE if (out / MODEL_FILE).is_file() else str(Path(ecfg["ckpt_path"]).resolve())
    embedder = build_embedder(ecfg, base_dir=out)
    gcfg = dict(cfg.get("gallery_build") or {})
    items = [(r.character, r.series, _safe_loader(r.path(root)), r.file_name) for r in train]
    gallery = Gallery.build(items, embedder, index=gcfg.get("index"), prototypes=gcfg.get("prototypes"),
                            aggregate=gcfg.get("aggregate", "max"), embedder_config=ecfg, progress=progress)
    gallery.save(out)
    has_tags = any(r.tags for r in train)
    if has_tags:
        TagReranker.fit(train, min_tag_count=int(gcfg.get("min_tag_count", 2))).save(out)
    report = BuildReport(str(out), len(gallery.characters()), len(train), len(val), len(gallery), embedder.model_id)
    if val:
        loaded = [(img, r) for r in val if (img := _safe_loader(r.path(root))()) is not None]
        vimgs, vlabels = [img for img, _ in loaded], [r.character for _, r in loaded]
        rcfg = {**cfg, "detector": None, "openset": {"enabled": False}, "cache_size": 0}
        rec = Recognizer.from_version(out, rcfg)
        modes = [m for m in MODES if m == "clip" or (out / MODEL_FILE).is_file()]
        top1, calib, weights = evaluate_split(rec, vimgs, vlabels, modes, target_far, tag_truth=[r.tags for _, r in loaded])
        calib.save(out)
        report.top1, report.rerank_weights = top1, weights
        report.thresholds = {m: t.threshold for m, t in calib.modes.items()}
        if rec.reranker is not None and (weights or rec.reranker.noise is not None):
            rec.reranker.mode_weights.update(weights)
            rec.reranker.save(out)
        if include_val:  # thresholds are set; the final gallery also learns from the held-out images
            for character in sorted(set(vlabels)):
                mine = [(img, r) for img, r in loaded if r.character == character]
                emb = embedder.embed([img for img, _ in mine])
                gallery.add(character, mine[0][1].series, emb, [r.file_name for _, r in mine], embedder_id=embedder.model_id)
            gallery.save(out)
            report.rows = len(gallery)
    return report


def _images_from(paths: Sequence[str]) -> list[tuple[Image.Image, str]]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        else:
            files.append(p)
    if not files:
        raise DatasetError(f"no images in {' '.join(paths)}; give image files or a folder of images")
    return [(load_image(f), str(f)) for f in files]


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: build | add | remove | list."""
    ap = argparse.ArgumentParser(prog="python -m anime_role_detect.recognition.gallery_cli", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build a recognition folder from a labelled dataset folder")
    b.add_argument("--data", required=True, help="dataset folder: <character>/<image> (+ metadata.jsonl)")
    b.add_argument("--out", required=True, help="output folder (gallery.faiss/json, tag_profiles.json, calibration.json)")
    b.add_argument("--model-ckpt", default=None, help="classifier checkpoint to copy in (model/fusion modes, classifier embedder)")
    b.add_argument("--val-fraction", type=float, default=0.2, help="held-out share for calibration (0: none)")
    b.add_argument("--far", type=float, default=0.05, help="target false-accept rate of unseen characters")
    b.add_argument("--seed", type=int, default=42)
    b.add_argument("--no-dedupe", action="store_true", help="skip near-duplicate grouping before the split")
    b.add_argument("overrides", nargs="*", help="Hydra overrides of conf/infer.yaml, e.g. embedder=open_clip")
    a = sub.add_parser("add", help="enroll a character from a few images (no retraining)")
    a.add_argument("--gallery", required=True)
    a.add_argument("--character", required=True)
    a.add_argument("--series", default="")
    a.add_argument("images", nargs="+", help="image files or folders")
    r = sub.add_parser("remove", help="delete a character")
    r.add_argument("--gallery", required=True)
    r.add_argument("--character", required=True)
    ls = sub.add_parser("list", help="list characters and prototype counts")
    ls.add_argument("--gallery", required=True)
    args = ap.parse_args(argv)
    return _run(args)


@user_errors_exit
def _run(args: argparse.Namespace) -> int:
    import json

    from ..log import setup_logging

    if args.cmd == "build":
        cfg = compose_config(args.overrides)
        setup_logging({**(cfg.get("log") or {}), "console_level": "WARNING"})
        from tqdm import tqdm

        bar = tqdm(total=0, desc="embedding", unit="img", file=sys.stderr)

        def prog(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()

        rep = build_recognition_folder(args.data, args.out, cfg, args.model_ckpt, args.val_fraction, args.seed, args.far,
                                       dedupe=not args.no_dedupe, progress=prog)
        bar.close()
        print(json.dumps(rep.__dict__, indent=2))
        return 0
    if args.cmd == "list":
        g = Gallery.load(args.gallery)
        for c in g.characters():
            print(f"{c['name']}\t{c['series']}\t{c['prototypes']}")
        print(f"# {len(g.characters())} characters, {len(g)} rows, embedder {g.embedder_id}", file=sys.stderr)
        return 0
    rec = Recognizer.from_version(args.gallery, {"detector": None})
    if args.cmd == "add":
        items = _images_from(args.images)
        n = rec.enroll(args.character, args.series, [im for im, _ in items], [name for _, name in items])
        rec.save_gallery()
        print(f"enrolled {args.character}: {n} prototype(s) from {len(items)} image(s)")
        return 0
    n = rec.remove(args.character)
    if n == 0:
        print(f"error: {args.character!r} is not in the gallery {args.gallery}; see `gallery_cli list --gallery {args.gallery}`", file=sys.stderr)
        return 2
    rec.save_gallery()
    print(f"removed {args.character}: {n} row(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
