"""Detector and video-sampling speed on this CPU, as ratios to baselines measured in the same run.

- YOLO (`YoloDetector.detect`: letterbox + forward + NMS + boxes) per image at batch 1 and per image at
  batch 8, against the bare eager PyTorch forward of the same network on a ready tensor (baseline).
- animeface (`AnimeFaceDetector`) per image on real illustrations (absolute, and vs the YOLO wrapper).
- Video frame sampling (`iter_video_frames`, PyAV and OpenCV backends) against decoding every frame
  with PyAV (baseline), on a generated 10 s video.

``python benchmarks/detector_latency.py [--weights DIR/detector.pt] [--real DIR]``
(without --weights a tiny detector is trained first into outputs/bench_tiny_yolo, about a minute).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from _common import data_dir, quiet  # sets the offline defaults (YOLO_OFFLINE) before the project's imports
from PIL import Image

from anime_role_detect.data.synthetic import make_characters, render_character, render_scene
from anime_role_detect.recognition.detector import AnimeFaceDetector, YoloDetector
from anime_role_detect.recognition.video import iter_video_frames


def timed(fn: Callable[[], object], repeat: int, warmup: int = 2) -> float:
    """Median seconds of `fn` over `repeat` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_yolo(weights: Path, imgsz: int, repeat: int) -> float:
    det = YoloDetector(weights=weights, imgsz=imgsz)
    rng = random.Random(0)
    specs = make_characters(6, seed=1)
    scenes = [render_scene(rng.sample(specs, 2), rng, size=(320, 224))[0] for _ in range(8)]
    net = det.model.model.eval()
    x1 = torch.rand(1, 3, imgsz, imgsz)
    x8 = torch.rand(8, 3, imgsz, imgsz)
    with torch.inference_mode():
        base1 = timed(lambda: net(x1), repeat)
        base8 = timed(lambda: net(x8), repeat) / 8
    one = timed(lambda: det.detect(scenes[:1]), repeat)
    eight = timed(lambda: det.detect(scenes), repeat) / 8
    print(f"yolo {weights.name} imgsz={imgsz}")
    print(f"  batch 1: {one * 1e3:7.1f} ms/image   eager forward baseline {base1 * 1e3:6.1f} ms   ratio {one / base1:5.2f}x")
    print(f"  batch 8: {eight * 1e3:7.1f} ms/image   eager forward baseline {base8 * 1e3:6.1f} ms   ratio {eight / base8:5.2f}x")
    return one


def bench_animeface(real: Path | None, repeat: int, yolo_one: float) -> None:
    if real is not None and real.is_dir():
        paths = sorted(real.rglob("*.jpg"))[::25][:8]
        images = [Image.open(p).convert("RGB") for p in paths]
        what = f"{len(images)} real images from {real}"
    else:
        rng = random.Random(0)
        images = [render_character(s, rng, 384)[0] for s in make_characters(8, seed=2)]
        what = "8 synthetic 384 px images (no real data found)"
    det = AnimeFaceDetector()
    per = timed(lambda: det.detect(images), max(1, repeat // 4), warmup=1) / len(images)
    print(f"animeface on {what}: {per * 1e3:7.1f} ms/image   ratio to the YOLO wrapper {per / yolo_one:5.2f}x")


def bench_video(repeat: int) -> None:
    import av

    rng = random.Random(0)
    specs = make_characters(2, seed=3)
    tmp = Path(tempfile.mkdtemp()) / "bench.mp4"
    with av.open(str(tmp), "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        frames = [render_character(specs[i // 125], rng, 240)[0].resize((320, 240)) for i in range(250)]
        for img in frames:
            for p in stream.encode(av.VideoFrame.from_image(img)):
                container.mux(p)
        for p in stream.encode():
            container.mux(p)

    def decode_all() -> int:
        with av.open(str(tmp)) as c:
            return sum(1 for f in c.decode(video=0) if f.to_ndarray(format="rgb24") is not None)

    base = timed(decode_all, repeat, warmup=1)
    print(f"video 10 s 25 fps 320x240: decode every frame (PyAV baseline) {base * 1e3:7.1f} ms")
    for backend in ("av", "av_keyframes", "opencv"):
        for fps in (1.0, 5.0):
            t = timed(lambda: list(iter_video_frames(tmp, fps, backend=backend)), repeat, warmup=1)
            print(f"  iter_video_frames backend={backend:12s} sample_fps={fps:3.0f}: {t * 1e3:7.1f} ms   ratio {t / base:5.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", type=Path, default=None)
    ap.add_argument("--imgsz", type=int, default=160)
    ap.add_argument("--real", type=Path, default=data_dir() / "newgame_full")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    quiet(args.threads)
    weights = args.weights
    if weights is None:
        from anime_role_detect.training.detector import make_tiny_detector

        weights = make_tiny_detector(Path("outputs") / "bench_tiny_yolo")
    print(f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs; python {sys.version.split()[0]}")
    one = bench_yolo(weights, args.imgsz, args.repeat)
    bench_animeface(args.real, args.repeat, one)
    bench_video(max(3, args.repeat // 3))


if __name__ == "__main__":
    main()
