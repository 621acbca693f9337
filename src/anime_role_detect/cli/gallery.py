"""Build and edit galleries: ``ard-gallery build|add|remove|list`` (also ``python -m anime_role_detect.cli.gallery``).

``build`` turns a labelled dataset folder into a recognition folder (`recognition.build`): ``gallery.faiss`` +
``gallery.json``, ``tag_profiles.json`` (when the metadata has tags) and ``calibration.json`` (open-set
thresholds and rerank weights tuned on a held-out split), plus a copy of ``model.ckpt`` when given. Extra
``key=value`` arguments are Hydra overrides of ``conf/infer.yaml`` (e.g. ``embedder=open_clip gallery.index.type=hnsw``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from PIL import Image

from ..confutil import compose_plain
from ..errors import DatasetError
from ..imageio import IMAGE_SUFFIXES, load_image
from ..log import setup_logging
from ..recognition.build import build_recognition_folder
from ..recognition.gallery import Gallery
from ..recognition.openset import DEFAULT_MAX_FALSE_REJECT
from ..recognition.pipeline import Recognizer
from . import user_errors_exit


def _images_from(paths: Sequence[str]) -> list[tuple[Image.Image, str]]:
    """Decoded images (with their paths) from files and folders; a one-line error when there are none."""
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
    ap = argparse.ArgumentParser(prog="ard-gallery", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build a recognition folder from a labelled dataset folder")
    b.add_argument("--data", required=True, help="dataset folder: <character>/<image> (+ metadata.jsonl)")
    b.add_argument("--out", required=True, help="output folder (gallery.faiss/json, tag_profiles.json, calibration.json)")
    b.add_argument("--model-ckpt", default=None, help="classifier checkpoint to copy in (model/fusion modes, classifier embedder)")
    b.add_argument("--val-fraction", type=float, default=0.2, help="held-out share for calibration (0: none)")
    b.add_argument("--far", type=float, default=0.05, help="target false-accept rate of unseen characters")
    b.add_argument("--max-false-reject", type=float, default=DEFAULT_MAX_FALSE_REJECT,
                   help="most of the held-out pictures answered right the threshold may refuse (wins over --far)")
    b.add_argument("--seed", type=int, default=42)
    b.add_argument("--no-dedupe", action="store_true", help="skip near-duplicate grouping before the split")
    b.add_argument("overrides", nargs="*", help="Hydra overrides of conf/infer.yaml, e.g. embedder=open_clip")
    a = sub.add_parser("add", help="enroll a character from a few images (no retraining)")
    a.add_argument("--gallery", required=True)
    a.add_argument("--character", required=True)
    a.add_argument("--series", default="")
    a.add_argument("--no-mirror", action="store_true",
                   help="add the pictures alone (default: each picture and its mirror image, recognizer enrol.mirror)")
    a.add_argument("images", nargs="+", help="image files or folders")
    r = sub.add_parser("remove", help="delete a character")
    r.add_argument("--gallery", required=True)
    r.add_argument("--character", required=True)
    ls = sub.add_parser("list", help="list characters and prototype counts")
    ls.add_argument("--gallery", required=True)
    args = ap.parse_args(argv)
    return _run(args)


def _build(args: argparse.Namespace) -> int:
    """Dataset folder -> recognition folder; prints the build report as JSON."""
    cfg = compose_plain("infer", args.overrides)
    setup_logging({**(cfg.get("log") or {}), "console_level": "WARNING"})
    from tqdm import tqdm

    bar = tqdm(total=0, desc="embedding", unit="img", file=sys.stderr)

    def prog(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    rep = build_recognition_folder(args.data, args.out, cfg, args.model_ckpt, args.val_fraction, args.seed, args.far,
                                   dedupe=not args.no_dedupe, progress=prog, max_false_reject=args.max_false_reject)
    bar.close()
    print(json.dumps(rep.__dict__, indent=2))
    return 0


def _list(args: argparse.Namespace) -> int:
    """Characters, series and prototype counts, one per line."""
    g = Gallery.load(args.gallery)
    for c in g.characters():
        print(f"{c['name']}\t{c['series']}\t{c['prototypes']}")
    print(f"# {len(g.characters())} characters, {len(g)} rows, embedder {g.embedder_id}", file=sys.stderr)
    return 0


def _add(args: argparse.Namespace) -> int:
    """Enrol a character from image files/folders into the gallery (no retraining)."""
    rec = Recognizer.from_version(args.gallery, {"detector": None, "enrol": {"mirror": not args.no_mirror}})
    items = _images_from(args.images)
    n = rec.enroll(args.character, args.series, [im for im, _ in items], [name for _, name in items])
    rec.save_gallery()
    print(f"enrolled {args.character}: {n} row(s) from {len(items)} image(s)" + ("" if args.no_mirror else ", mirror images included"))
    return 0


def _remove(args: argparse.Namespace) -> int:
    """Delete a character's rows; exit 2 when it is not in the gallery."""
    rec = Recognizer.from_version(args.gallery, {"detector": None})
    n = rec.remove(args.character)
    if n == 0:
        print(f"error: {args.character!r} is not in the gallery {args.gallery}; see `ard-gallery list --gallery {args.gallery}`", file=sys.stderr)
        return 2
    rec.save_gallery()
    print(f"removed {args.character}: {n} row(s)")
    return 0


COMMANDS = {"build": _build, "list": _list, "add": _add, "remove": _remove}


@user_errors_exit
def _run(args: argparse.Namespace) -> int:
    return COMMANDS[args.cmd](args)


if __name__ == "__main__":
    raise SystemExit(main())
