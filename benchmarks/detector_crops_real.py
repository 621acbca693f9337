"""Does cropping the detected face help recognition on real pictures? Gallery top-1 with and without the detector.

On the real labelled sets (``$ARD_DATA_DIR``, default ``../shared/data``), leak-free 80/20 splits
(near-duplicates grouped), frozen ImageNet Lite0 embeddings, one mean prototype per character in the
real `Gallery` (Faiss):

- baseline (same run, same splits): the whole image, as with ``detector=none``;
- face crop: the animeface detector's most likely face, widened by ``--margin`` (the pipeline's
  ``crop_margin``), the whole image when no face is found, as with ``detector=animeface``;
- whole + face: the mean of both embeddings (context and face together).

    python benchmarks/detector_crops_real.py [--sets newgame_full mixed5] [--seeds 0 1 2] [--margin 0.5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
from _common import LITE0, gallery_top1, quiet, real_set, seeded_splits, unit


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sets", nargs="+", default=["newgame_full", "mixed5"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--margin", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    quiet(args.threads)
    from anime_role_detect.imageio import load_image
    from anime_role_detect.recognition.detector import AnimeFaceDetector, crop_box
    from anime_role_detect.recognition.embedder import build_embedder

    embedder = build_embedder(LITE0)
    detector = AnimeFaceDetector()
    print(f"| set | images | faces found | whole image (baseline) | face crop (margin {args.margin}) | ratio | whole + face | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.sets:
        s = real_set(name)
        if s is None:
            continue
        root, recs, labels = s.root, s.records, s.labels
        whole, face, found = [], [], 0
        t_det = t_emb = 0.0
        for i in range(0, len(recs), 32):
            images = [load_image(r.path(root)) for r in recs[i : i + 32]]
            t0 = time.perf_counter()
            boxes = detector.detect(images)
            t_det += time.perf_counter() - t0
            crops = [crop_box(im, b[0], args.margin) if b else im for im, b in zip(images, boxes)]
            found += sum(bool(b) for b in boxes)
            t0 = time.perf_counter()
            whole.append(embedder.embed(images))
            face.append(embedder.embed(crops))
            t_emb += time.perf_counter() - t0
            print(f"\r  {name}: {min(i + 32, len(recs))}/{len(recs)}", end="", file=sys.stderr)
        print(f"\n  animeface {t_det * 1e3 / len(recs):.0f} ms/image, embedding {t_emb * 1e3 / (2 * len(recs)):.0f} ms/image", file=sys.stderr)
        variants = {"whole": unit(np.concatenate(whole)), "face": unit(np.concatenate(face))}
        variants["both"] = unit(variants["whole"] + variants["face"])
        scores: dict[str, list[float]] = {k: [] for k in variants}
        for train, val in seeded_splits(s, args.seeds):
            for k, v in variants.items():
                scores[k].append(gallery_top1(v, labels, train, val))
        m = {k: statistics.mean(v) for k, v in scores.items()}
        print(
            f"| {name} | {len(recs)} | {found / len(recs):.0%} | {m['whole']:.1%} | {m['face']:.1%} | {m['face'] / m['whole']:.2f}x "
            f"| {m['both']:.1%} | {m['both'] / m['whole']:.2f}x |"
        )
    print(f"(mean over seeds {args.seeds}; frozen ImageNet Lite0, mean prototype per character)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
