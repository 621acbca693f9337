"""Log fusion on real images: a gallery of face crops meets full illustrations (a real domain shift).

Live version: gallery of `newgame_faces` (96 px face crops, 80% of each character; 20% held out as
the original-domain check). Stream: half of `newgame_full` (full illustrations) goes through the
real Recognizer with the feature log attached; a simulated user confirms or corrects a share of the
answers with the folder label. `fuse()` builds the new version (validation = the held-out faces).
Printed: top-1 on the other half of `newgame_full` and on the held-out faces, live vs fused, and
the same for "add every answer unchecked" (the seed's approach) as the baseline.

``python benchmarks/fusion_real_data.py [--data DIR] [--feedback 0.5] [--image-size 160] [--min-confidence 0.6] [--no-auto]``
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import data_dir

from anime_role_detect.data.layout import scan_dataset
from anime_role_detect.fusion.evaluation import save_val_embeddings, top1_accuracy
from anime_role_detect.fusion.featurelog import FeatureLog
from anime_role_detect.fusion.fuse import fuse
from anime_role_detect.imageio import load_image
from anime_role_detect.recognition.embedder import build_embedder
from anime_role_detect.recognition.gallery import Gallery
from anime_role_detect.recognition.pipeline import Recognizer
from anime_role_detect.registry import Registry
from anime_role_detect.versionfiles import VAL_EMBEDDINGS


def _split(records: list, fraction: float, seed: int) -> tuple[list, list]:
    """Per character: the first `fraction` (after a seeded shuffle) and the rest."""
    rng = random.Random(seed)
    a, b = [], []
    by: dict[str, list] = {}
    for r in records:
        by.setdefault(r.character, []).append(r)
    for c in sorted(by):
        rs = by[c][:]
        rng.shuffle(rs)
        k = int(round(len(rs) * fraction))
        a += rs[:k]
        b += rs[k:]
    return a, b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(data_dir()), help="folder of the real sets (default: $ARD_DATA_DIR or ../shared/data)")
    ap.add_argument("--feedback", type=float, default=0.5, help="share of streamed answers a user confirms or corrects")
    ap.add_argument("--image-size", type=int, default=160)
    ap.add_argument("--min-confidence", type=float, default=0.85, help="selection.min_confidence (floor for unconfirmed answers)")
    ap.add_argument("--no-auto", action="store_true", help="selection.auto_confidence=false (fixed bar only)")
    args = ap.parse_args()
    data = Path(args.data)
    faces, full = data / "newgame_faces", data / "newgame_full"
    if not faces.is_dir() or not full.is_dir():
        raise SystemExit(f"real data not found under {data} (newgame_faces, newgame_full)")
    ecfg = {"kind": "timm", "model_name": "efficientnet_lite0_offline", "pretrained": True, "image_size": args.image_size}
    embedder = build_embedder(ecfg)
    face_gal, face_val = _split(scan_dataset(faces), 0.8, 0)
    stream, test = _split(scan_dataset(full), 0.5, 0)
    t0 = time.perf_counter()

    def embed(root: Path, recs: list) -> np.ndarray:
        return np.concatenate([embedder.embed([load_image(r.path(root)) for r in recs[i : i + 32]]) for i in range(0, len(recs), 32)])

    val_x, test_x = embed(faces, face_val), embed(full, test)
    val_y, test_y = [r.character for r in face_val], [r.character for r in test]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        reg = Registry(tmp / "registry")
        items = [(r.character, "New Game!", (lambda p=r.path(faces): load_image(p)), r.file_name) for r in face_gal]
        with reg.derive(None, "workflow", promote=True) as d:
            Gallery.build(items, embedder, embedder_config=ecfg).save(d.dir)
            save_val_embeddings(d.dir / VAL_EMBEDDINGS, val_x, val_y, embedder.model_id)
        v0 = d.id
        log = FeatureLog(tmp / "featurelog")
        rec = log.attach(Recognizer.from_version(reg.path(), {"mode": "clip", "rerank": False, "openset": {"enabled": False}}))
        rng = random.Random(1)
        answers = []
        for i in range(0, len(stream), 16):
            chunk = stream[i : i + 16]
            answers += list(zip(chunk, rec.recognize_batch([(load_image(r.path(full)), r.file_name) for r in chunk])))
        n_fb = 0
        for r, ans in answers:
            if rng.random() < args.feedback:
                log.feedback(ans.image_sha256, confirmed=True) if ans.role == r.character else log.feedback(ans.image_sha256, correct_role=r.character)
                n_fb += 1
        live = Gallery.load(reg.path(v0))
        res = fuse({"log_dir": str(tmp / "featurelog"), "registry_dir": str(reg.root), "evaluation": {"holdout_fraction": 0.2},
                    "selection": {"min_confidence": args.min_confidence, "auto_confidence": not args.no_auto}})
        fused = Gallery.load(reg.path(res.version_id)) if res.version_id else live
        # baseline: every streamed answer added unchecked (what the seed did)
        naive = Gallery.load(reg.path(v0))
        for r in log.read():
            if r.detections and r.detections[0]["role"] != "unknown":
                naive.add(r.detections[0]["role"], "", r.embeddings[:1])
        dt = time.perf_counter() - t0
        stream_acc = float(np.mean([a.role == r.character for r, a in answers]))
        print(f"gallery {len(face_gal)} faces; stream {len(stream)} full illustrations (live top-1 {stream_acc:.3f}), "
              f"feedback on {n_fb}; test {len(test)} full; original-domain check {len(face_val)} faces; {dt:.0f} s")
        print(f"unconfirmed bar: {res.report['unconfirmed_bar']}")
        print(f"fusion: {res.report['decision']} ({res.report['reason']}); added "
              f"{sum(sum(d.values()) for d in res.report['added_per_character'].values())}; skipped {res.report['skipped']}")
        print(f"{'top-1':<32}{'full (new domain)':>18}{'faces (original)':>18}")
        for name, g in (("live (faces gallery)", live), ("fused (this fusion)", fused), ("every answer added unchecked", naive)):
            print(f"{name:<32}{top1_accuracy(g, test_x, test_y):>18.3f}{top1_accuracy(g, val_x, val_y):>18.3f}")


if __name__ == "__main__":
    main()
