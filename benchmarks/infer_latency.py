"""Inference latency and throughput of the recognition pipeline on this CPU, per mode, vs plain eager PyTorch.

Embedder: open_clip ViT-B-32 with random init (the size of the real ViT-B/32 CLIP, no download);
classifier: EfficientNet-B0 `CharacterClassifier` (random init, saved as a real Lightning checkpoint);
tagger: the classifier's tag head; gallery: 8 synthetic characters x 12 images (flat index);
detector: none (whole image). Baseline, in the same process: the same network(s) called eagerly on one
preprocessed image (torchvision transform + ``model(x)`` under ``torch.no_grad``), i.e. what a script
without the pipeline would pay. Reported: median per-stage ms for one image (cache off), end to end
ms, ratio to the baseline, and batch throughput (images/s, batch of 32).

    python benchmarks/infer_latency.py [--threads 2] [--repeats 15] [--batch 32]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from _common import quiet


def make_classifier_ckpt(path: Path, class_names: list[str], tags: list[str], series: dict[str, str]) -> Path:
    """A random-init EfficientNet-B0 CharacterClassifier saved as a Lightning checkpoint."""
    import lightning as L

    from anime_role_detect.models.classifier import CharacterClassifier

    model = CharacterClassifier(class_names, tag_names=tags, series=series, backbone={"name": "efficientnet_b0", "pretrained": False},
                                image_size=224)
    trainer = L.Trainer(max_epochs=0, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(str(path))
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args(argv)

    quiet(args.threads)
    import torch

    from anime_role_detect.confutil import compose_plain
    from anime_role_detect.data.layout import scan_dataset, series_of, tag_vocabulary
    from anime_role_detect.data.synthetic import generate_dataset
    from anime_role_detect.recognition.build import build_recognition_folder
    from anime_role_detect.recognition.pipeline import Recognizer

    tmp = Path(tempfile.mkdtemp(prefix="ard-bench-"))
    data = tmp / "data"
    generate_dataset(data, n_characters=8, images_per_character=12, size=256, seed=0)
    recs = scan_dataset(data)
    names = sorted({r.character for r in recs})
    ckpt = make_classifier_ckpt(tmp / "model.ckpt", names, tag_vocabulary(recs, 2), series_of(recs))
    cfg = compose_plain("infer", ["embedder=open_clip", "embedder.pretrained=null", f"embedder.batch_size={args.batch}"])
    t0 = time.perf_counter()
    build_recognition_folder(data, tmp / "v", cfg, model_ckpt=ckpt, val_fraction=0.25, dedupe=False)
    print(f"setup: gallery + calibration built in {time.perf_counter() - t0:.1f} s ({tmp / 'v'})")

    from PIL import Image

    images = [Image.open(data / r.file_name).convert("RGB") for r in recs[: args.batch]]
    one = images[0]
    rec = Recognizer.from_version(tmp / "v", {**cfg, "cache_size": 0, "batch_size": args.batch})
    rec.warmup("fusion")
    _ = rec.tagger

    # -- eager baselines: the same networks, called directly ---------------------------------------
    from torchvision import transforms as T

    clip_visual = rec.embedder.model
    clf = rec.classifier
    clip_tf = T.Compose([T.Resize(224), T.CenterCrop(224), T.ToTensor(), T.Normalize(rec.embedder.mean, rec.embedder.std)])
    clf_tf = T.Compose([T.Resize(clf.image_size), T.CenterCrop(clf.image_size), T.ToTensor(), T.Normalize(clf.mean, clf.std)])

    def eager_clip():
        with torch.no_grad():
            return clip_visual(clip_tf(one)[None])

    def eager_model():
        with torch.no_grad():
            return clf(clf_tf(one)[None])

    eager = {"clip": [eager_clip], "model": [eager_model], "fusion": [eager_clip, eager_model]}

    load = os.getloadavg()[0]
    print(f"\nCPU threads: {args.threads} of {os.cpu_count()} cores; load average {load:.1f} (other processes compete when > cores); "
          f"image {one.size[0]}x{one.size[1]}; repeats {args.repeats}; batch {args.batch}\n")
    header = f"{'mode':<8}{'rerank':<8}{'end-to-end ms':>14}{'eager ms':>10}{'ratio':>7}{'batch img/s':>13}  stages (median ms)"
    print(header)
    print("-" * len(header))
    for mode in ("clip", "model", "fusion"):
        for rerank in (False, True):
            stage_runs: list[dict[str, float]] = []
            pipe_ms: list[float] = []
            base_ms: list[float] = []
            rec.recognize(one, "warm.png", mode=mode, rerank=rerank)
            for _ in range(args.repeats):  # interleaved, so both see the same machine load
                t0 = time.perf_counter()
                for fn in eager[mode]:
                    fn()
                base_ms.append((time.perf_counter() - t0) * 1e3)
                t0 = time.perf_counter()
                stage_runs.append(rec.recognize(one, "bench.png", mode=mode, rerank=rerank).timings_ms)
                pipe_ms.append((time.perf_counter() - t0) * 1e3)
            e2e, base = statistics.median(pipe_ms), statistics.median(base_ms)
            stages = {k: statistics.median(r.get(k, 0.0) for r in stage_runs) for k in stage_runs[-1] if k != "total"}
            t0 = time.perf_counter()
            rec.recognize_batch([(im, f"{i}.png") for i, im in enumerate(images)], mode=mode, rerank=rerank)
            thr = len(images) / (time.perf_counter() - t0)
            st = " ".join(f"{k}={v:.1f}" for k, v in stages.items() if v >= 0.05)
            print(f"{mode:<8}{str(rerank):<8}{e2e:>14.1f}{base:>10.1f}{e2e / base:>7.2f}{thr:>13.1f}  {st}")
    print("\nratio = pipeline end-to-end / eager forward of the same network(s) on one image (same process).")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
