"""Training and inference speed on this CPU by memory layout and precision: NCHW vs channels-last, fp32 vs bf16.

Training: the real `CharacterClassifier` (Lite0 with its offline ImageNet weights, character + tag heads, AdamW)
trains through Lightning's `Trainer.fit` on the same in-memory batches in every setting; only the layout of the
weights (`ChannelsLast`, the callback conf/callbacks/channels_last.yaml adds) and `trainer.precision` differ.
Inference: the same network's `outputs` (embedding, logits, tags: what a torch version runs per picture) in eval
mode, NCHW against channels-last (`recognition.embedder.ready`). Settings alternate within each round so all see
the same machine load; the best round of each is compared with NCHW fp32 (before) measured in the same run.

    python benchmarks/cpu_layouts.py                         # 224 px, batch 16 (inference 32), 2 threads, 3 rounds
    python benchmarks/cpu_layouts.py --threads 1 --size 128
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from _common import quiet
from train_throughput import lightning_loop, make_loader
from train_throughput import make_model as make_throughput_model

from anime_role_detect.models.classifier import CharacterClassifier
from anime_role_detect.recognition.embedder import ready
from anime_role_detect.training.formats import ChannelsLast, native_bf16

#: setting name -> (channels-last weights, trainer precision)
SETTINGS: dict[str, tuple[bool, str]] = {
    "nchw fp32": (False, "32-true"),
    "channels-last fp32": (True, "32-true"),
    "nchw bf16": (False, "bf16-mixed"),
    "channels-last bf16": (True, "bf16-mixed"),
}


def make_model(seed: int) -> CharacterClassifier:
    """Lite0 with its offline ImageNet weights, 19 characters and 64 tags (the layout, not the rate, sets the speed)."""
    return make_throughput_model("efficientnet_lite0_offline", 19, 64, seed, pretrained=True)


def inference_images_per_s(model: CharacterClassifier, x: torch.Tensor, channels_last: bool) -> float:
    """images/s of one eval forward (embedding + logits + tags) over batch `x`, in the layout asked."""
    net = ready(model, "cpu") if channels_last else model.eval().to(memory_format=torch.contiguous_format)
    with torch.inference_mode():
        net.outputs(x[:2])  # warm-up: oneDNN builds its kernels for the shape
        t = time.perf_counter()
        net.outputs(x)
    return len(x) / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (0: torch's default)")
    ap.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--infer-batch", type=int, default=32, help="inference batch (0: skip inference)")
    args = ap.parse_args(argv)
    quiet(args.threads)
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; native bf16: {native_bf16()}")
    loader = make_loader(args.batches, args.batch, args.size, 19, 64)
    best: dict[str, float] = {}
    for r in range(args.rounds):
        order = args.settings if r % 2 == 0 else args.settings[::-1]
        for name in order:
            cl, precision = SETTINGS[name]
            ips = lightning_loop(make_model(r), loader, args.warmup, precision=precision,
                                 callbacks=[ChannelsLast()] if cl else [])
            best[name] = max(best.get(name, 0.0), ips)
            print(f"round {r}: {name:20s} {ips:6.2f} images/s", flush=True)
    base = best.get("nchw fp32")
    print(f"Lite0 {args.size}px batch {args.batch}, {args.batches - args.warmup} timed steps x {args.rounds} rounds, "
          f"{torch.get_num_threads()} threads; best round of each")
    for name in args.settings:
        ratio = f"{best[name] / base:.2f}x nchw fp32" if base else ""
        print(f"{name:20s} {best[name]:6.2f} images/s  {ratio}")
    if args.infer_batch:
        model = make_model(0)
        x = torch.randn(args.infer_batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
        inf = {False: 0.0, True: 0.0}
        for r in range(args.rounds):
            for cl in ((False, True) if r % 2 == 0 else (True, False)):
                inf[cl] = max(inf[cl], inference_images_per_s(model, x, cl))
        print(f"inference, batch {args.infer_batch}, eval outputs: nchw {inf[False]:.2f} images/s, channels-last "
              f"{inf[True]:.2f} images/s ({inf[True] / inf[False]:.2f}x)")
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
