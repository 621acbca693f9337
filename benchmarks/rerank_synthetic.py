"""Tag reranking on synthetic near-twins: top-1 with it off and on per mode, and what the answer's similarity says.

Builds what the recognition tests build (`tests/recognition/conftest.py`): 8 synthetic characters, half of them
near-twins one attribute apart, 24 pictures each at 96 px; a tiny resnet10t classifier with a tag head trained 5
epochs at 64 px by `training.train`; a WD14-format ONNX tagger that sees the full 96 px. Then two versions of the one
checkpoint, as `build_recognition_folder` builds them (25% held out to tune the rerank weights): one reranking with
the ONNX tagger, one with the classifier's own tag head (`tagger=auto`). Each answers fresh renders of the twin
characters and of every character, open set off. Per tagger, set and mode: top-1 with reranking off and on, the
answers' mean similarity, the share that read 1.0, and the share of right / wrong answers that pass log fusion's
confidence bar (`fusion.selection`: similarity >= 0.85 and a margin >= 0.05 over the next character).

    python benchmarks/rerank_synthetic.py [--work outputs/benchmarks/rerank_synthetic]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from anime_role_detect.data.synthetic import generate_dataset, load_characters, render_character  # noqa: E402
from anime_role_detect.recognition.build import build_recognition_folder  # noqa: E402
from anime_role_detect.recognition.pipeline import Recognizer  # noqa: E402
from tests.recognition.helpers import compose, infer_cfg, train_onnx_tagger  # noqa: E402

MODES = ("clip", "model", "fusion")
BAR = (0.85, 0.05)  # fusion.selection's defaults: min_confidence, min_margin


def build(work: Path) -> tuple[Path, dict[str, Path], list[str]]:
    """Data, classifier, ONNX tagger and the two versions (cached in `work`)."""
    import torch

    from anime_role_detect.training import train

    data = work / "chars"
    if not data.is_dir():
        generate_dataset(data, n_characters=8, images_per_character=24, size=96, seed=3, twin_fraction=0.5)
    torch.set_num_threads(2)
    ckpts = sorted((work / "train").rglob("*.ckpt"))
    if not ckpts:
        cfg = compose("train", [
            f"paths.root_dir={work / 'train'}", f"paths.output_dir={work / 'train' / 'out'}", f"data.root={data}",
            "data.synthetic=null", "data.image_size=64", "data.batch_size=16", "model=tiny", "trainer=cpu",
            "trainer.max_epochs=5", "+trainer.enable_progress_bar=false", "~callbacks.progress_bar", "logger=csv",
            "log.console_level=WARNING", "model.optimizer.lr=3e-3", "evaluate=false"])
        ckpt = Path(train(cfg).ckpt_path)
    else:
        ckpt = next((c for c in ckpts if c.name != "last.ckpt"), ckpts[0])
    model, tags = work / "tagger" / "model.onnx", work / "tagger" / "selected_tags.csv"
    if not model.is_file():
        model, tags = train_onnx_tagger(data, work / "tagger")
    onnx = ["tagger=wd14", f"tagger.model_path={model}", f"tagger.tags_path={tags}", "tagger.general_threshold=0.5"]
    versions = {"ONNX tagger": work / "v_onnx", "classifier tag head": work / "v_head"}
    for name, extra in (("ONNX tagger", onnx), ("classifier tag head", [])):
        out = versions[name]
        if not (out / "calibration.json").is_file():
            cfg = infer_cfg(["embedder=classifier", "embedder.flip_tta=false", *extra])
            build_recognition_folder(data, out, cfg, model_ckpt=ckpt, val_fraction=0.25, seed=0, target_far=0.05)
    return data, versions, onnx


def pictures(data: Path) -> dict[str, list[tuple]]:
    """Fresh renders: 12 of each character with a near-twin (seed 99), 8 of every character (seed 1234)."""
    specs = load_characters(data)
    twins = sorted({n for i, a in enumerate(specs) for b in specs[i + 1:]
                    if sum(x != y for x, y in zip(a.attributes(), b.attributes())) == 1 for n in (a.name, b.name)})
    by_name = {s.name: s for s in specs}
    rng = random.Random(99)
    out = {"twins": [(render_character(by_name[n], rng, 96)[0], n) for n in twins for _ in range(12)]}
    rng = random.Random(1234)
    out["every character"] = [(render_character(s, rng, 96)[0], s.name) for s in specs for _ in range(8)]
    return out


def row(answers, labels) -> str:
    right = np.array([a.role == y for a, y in zip(answers, labels)])
    sim = np.array([a.similarity for a in answers])
    dets = [a.detections[0] for a in answers]
    margin = np.array([d.topk[0].score - (d.topk[1].score if len(d.topk) > 1 else 0.0) for d in dets])
    bar = (sim >= BAR[0]) & (margin >= BAR[1])
    share = lambda m: f"{100 * bar[m].mean():.1f}" if m.any() else "-"  # noqa: E731
    return f"{100 * right.mean():.1f} | {sim.mean():.3f} | {100 * (sim >= 0.9999).mean():.1f} | {share(right)} / {share(~right)}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=ROOT / "outputs" / "benchmarks" / "rerank_synthetic")
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    data, versions, onnx = build(args.work)
    sets = pictures(data)
    print(f"# rerank_synthetic: load average {os.getloadavg()[0]:.2f}; built in {time.time() - t0:.0f} s")
    print("| tagger | pictures | mode | weight | rerank | top-1 % | mean similarity | reads 1.0 % | bar passes right / wrong % |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, folder in versions.items():
        extra = onnx if name == "ONNX tagger" else []
        rec = Recognizer.from_version(folder, {**infer_cfg(extra), "openset": {"enabled": False}, "cache_size": 0})
        for set_name, items in sets.items():
            imgs, labels = [(im, "x.png") for im, _ in items], [y for _, y in items]
            for mode in MODES:
                w = rec.reranker.weight_for(mode) if rec.reranker is not None else 0.0
                for rerank in (False, True):
                    answers = rec.recognize_batch(imgs, mode=mode, rerank=rerank)
                    print(f"| {name} | {set_name} | {mode} | {w:g} | {'on' if rerank else 'off'} | {row(answers, labels)} |")
    print(f"# load average at end {os.getloadavg()[0]:.2f}; {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
