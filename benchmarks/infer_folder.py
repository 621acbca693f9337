"""Folder throughput of ``infer.py image=<folder>``: decoding in DataLoader workers vs in the main process, same run.

Takes `--n` real images from ``$ARD_DATA_DIR`` (newgame_full then mixed5: booru illustrations and web images up
to 512 px, read in place, never copied), runs `cli.infer._run_folder` (the code behind ``image=<folder>``)
with ``decode_workers=0`` (today's path) and ``--workers`` alternately (`--rounds` each), checks the answers
are identical and in the same order, and prints images/s per setting, the ratio and the load average.

    .venv/bin/python benchmarks/infer_folder.py                      # Lite0 gallery at 224 px, 1,000 images
    .venv/bin/python benchmarks/infer_folder.py --version latest     # the live registry version instead
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time
from pathlib import Path

from _common import LITE0, data_dir, quiet


def pick_files(n: int) -> list[Path]:
    """The first `n` images of newgame_full then mixed5 (sorted, as ``image=<folder>`` lists them)."""
    from anime_role_detect.cli.infer import list_images

    files: list[Path] = []
    for name in ("newgame_full", "mixed5", "faces6"):
        if (data_dir() / name).is_dir():
            files += list_images(data_dir() / name)
    if len(files) < n:
        print(f"note: only {len(files)} images under {data_dir()}")
    return files[:n]


def recognizer(args: argparse.Namespace, workdir: Path):
    """The live registry version (``--version``), else a small Lite0 gallery (5 mixed5 images per character)."""
    from anime_role_detect.recognition.pipeline import Recognizer

    common = {"cache_size": 0, "rerank": False, "threads": args.threads or None}
    if args.version:
        return Recognizer.from_config({"version": args.version, "registry_dir": args.registry, **common})
    from anime_role_detect.imageio import load_image
    from anime_role_detect.recognition.embedder import build_embedder
    from anime_role_detect.recognition.gallery import Gallery

    root = data_dir() / "mixed5"
    items = [(c.name, "", load_image(p), p.name) for c in sorted(root.iterdir()) if c.is_dir() for p in sorted(c.iterdir())[:5]]
    Gallery.build(items, build_embedder(LITE0), embedder_config=LITE0).save(workdir / "g")
    return Recognizer.from_config({"gallery": str(workdir / "g"), "version": None, "tagger": None, **common})


def one_pass(rec, files: list[Path], workers: int, batch_size: int) -> tuple[float, list[dict]]:
    from anime_role_detect.cli.infer import AnswerWriter, _run_folder

    buf = io.StringIO()
    t0 = time.perf_counter()
    _run_folder(rec, files, AnswerWriter(buf, "jsonl"), batch_size, progress=False, workers=workers)
    dt = time.perf_counter() - t0
    lines = [json.loads(x) for x in buf.getvalue().splitlines()]
    for x in lines:
        x.pop("timings_ms", None)
    return len(files) / dt, lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--version", default=None, help="registry version (latest | ID) instead of the Lite0 gallery")
    ap.add_argument("--registry", default="outputs/registry")
    args = ap.parse_args()
    quiet(args.threads)
    import tempfile

    files = pick_files(args.n)
    with tempfile.TemporaryDirectory() as tmp:
        rec = recognizer(args, Path(tmp))
        one_pass(rec, files[:16], 0, args.batch_size)  # warm-up: model load, first-call allocations
        load0 = os.getloadavg()
        rates: dict[int, list[float]] = {0: [], args.workers: []}
        answers: dict[int, list[dict]] = {}
        for _ in range(args.rounds):
            for w in (0, args.workers):
                rate, answers[w] = one_pass(rec, files, w, args.batch_size)
                rates[w].append(rate)
                print(f"decode_workers={w}: {rate:.2f} images/s", flush=True)
        load1 = os.getloadavg()
    same = answers[0] == answers[args.workers]
    best = {w: max(r) for w, r in rates.items()}
    print(json.dumps({"images": len(files), "batch_size": args.batch_size, "images_per_s": {f"decode_workers={w}": round(r, 2) for w, r in best.items()},
                      "ratio": round(best[args.workers] / best[0], 3), "same_answers_same_order": same,
                      "errors": sum("error" in x for x in answers[0]), "loadavg_1min_before_after": [round(load0[0], 2), round(load1[0], 2)],
                      "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
