"""Inference latency and throughput of a REAL registry version: torch eager vs ONNX Runtime vs ONNX int8, in one run.

The version (default: the live one of ``outputs/registry``, which ``python train.py`` registers) is copied into
a scratch registry and exported there (`recognition.onnx_export.export_version`, fp32 + int8), so your registry is
left as it was. Then three `Recognizer`s over that one folder, configured like ``infer.py`` (conf/infer.yaml,
cache off) and differing only in ``runtime=torch|onnx|onnx-int8``, are timed interleaved (each repeat runs all
three, so they share the machine's load):

- one image end to end (``recognize``, median of ``--repeats``), per mode, and the plain eager forward of the
  classifier on the same image as a reference;
- a folder (``--folder`` pictures, decoded and run in batches of ``--batch`` as ``infer.py image=<folder>`` does):
  images/second, and how many answers equal torch's;
- top-1 on the version's evaluation set (``val_embeddings.npz`` pictures) or ``--eval-split`` (a train.py split
  manifest: its val side), per runtime and mode: the int8 accuracy change.

Ratios are to torch in the same run. ``--vit`` adds an open_clip ViT-B/32-size embedder (random init, no
download): one image, torch vs ONNX vs int8. ``--random-init`` runs the older table instead (random-init
ViT-B/32 gallery + B0 classifier, pipeline vs eager forward per mode).

    python train.py                                    # a live version (demo), then:
    python benchmarks/infer_latency.py [--registry outputs/registry] [--version latest] [--threads 2] [--repeats 15]
        [--folder 200] [--batch 16] [--modes clip model fusion] [--eval-split SPLIT.json] [--vit] [--random-init]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from _common import quiet

RUNTIMES = ("torch", "onnx", "onnx-int8")


# == a real version: torch vs ONNX vs int8 ==========================================================
def exported_copy(registry: Path, version: str, scratch: Path) -> Path:
    """`version` of `registry` imported into a scratch registry and exported there (fp32 + int8); returns the exported folder."""
    from anime_role_detect.recognition.onnx_export import export_version
    from anime_role_detect.registry import Registry

    src = Registry(registry).path(version)
    reg = Registry(scratch / "registry")
    base = reg.import_folder(src, promote=True)
    t0 = time.perf_counter()
    res = export_version(reg.root, base, int8=True)
    print(f"version {src.name} ({src}) exported in {time.perf_counter() - t0:.1f} s: {', '.join(res.files)}")
    for name, check in res.checks.items():
        print(f"  {name}: {json.dumps(check)}")
    return res.version_dir


def recognizers(folder: Path, batch: int, threads: int) -> dict[str, Any]:
    """One `Recognizer` per runtime over `folder`, configured like infer.py (conf/infer.yaml), answer cache off."""
    from anime_role_detect.confutil import compose_plain
    from anime_role_detect.recognition.pipeline import Recognizer

    cfg = compose_plain("infer", ["feature_log.enabled=false"])
    return {r: Recognizer.from_version(folder, {**cfg, "runtime": r, "cache_size": 0, "batch_size": batch, "threads": threads})
            for r in RUNTIMES}


def pictures(folder: Path, eval_split: str | None, limit: int) -> list[tuple[Path, str, bool]]:
    """Up to `limit` labelled pictures ``(path, label, held_out)``: `eval_split`'s val side then its train side, else the version's
    evaluation set. Only held-out pictures count for top-1; the rest only fill the folder for throughput."""
    if eval_split:
        man = json.loads(Path(eval_split).read_text())
        side = [(f, True) for f in man["val"]] + [(f, False) for f in man["train"]]
        return [(Path(man["root"]) / f, f.split("/")[0], held) for f, held in side][:limit]
    from anime_role_detect.recognition.evalset import EvalSet
    from anime_role_detect.recognition.evalset import pictures as eval_pictures

    found = [(Path(p), y, True) for p, y, _ in eval_pictures(EvalSet.load(folder))]
    if found:
        return found[:limit]
    raise SystemExit(f"{folder} has no evaluation set with pictures on disk; give --eval-split SPLIT.json (a train.py split manifest)")


def _median_ms(fn: Callable[[], Any], runs: list[float]) -> None:
    t0 = time.perf_counter()
    fn()
    runs.append((time.perf_counter() - t0) * 1e3)


def one_image(recs: dict[str, Any], image: Any, modes: list[str], repeats: int) -> None:
    """Median end-to-end ms for one image per runtime and mode (interleaved), ratio to torch, and the eager classifier forward."""
    import torch
    from torchvision import transforms as T

    if recs["torch"].model_ckpt is None:
        raise SystemExit("the version has no classifier (model.ckpt); this benchmark times a classifier version")
    clf = recs["torch"].classifier
    tf = T.Compose([T.Resize(clf.image_size), T.CenterCrop(clf.image_size), T.ToTensor(), T.Normalize(clf.mean, clf.std)])

    def eager() -> Any:
        with torch.no_grad():
            return clf(tf(image)[None])

    print(f"\none image end to end ({image.size[0]}x{image.size[1]}), median of {repeats}; ratio = runtime / torch pipeline")
    header = f"{'mode':<8}{'eager fwd ms':>13}" + "".join(f"{r + ' ms':>15}" for r in RUNTIMES) + f"{'onnx ratio':>12}{'int8 ratio':>12}  stages onnx (ms)"
    print(header)
    print("-" * len(header))
    for mode in modes:
        runs: dict[str, list[float]] = {r: [] for r in ("eager", *RUNTIMES)}
        stages: list[dict[str, float]] = []
        for r in RUNTIMES:
            recs[r].recognize(image, "warm.png", mode=mode)
        for _ in range(repeats):
            _median_ms(eager, runs["eager"])
            for r in RUNTIMES:
                t0 = time.perf_counter()
                ans = recs[r].recognize(image, "bench.png", mode=mode)
                runs[r].append((time.perf_counter() - t0) * 1e3)
                if r == "onnx":
                    stages.append(ans.timings_ms)
        med = {k: statistics.median(v) for k, v in runs.items()}
        st = {k: statistics.median(s.get(k, 0.0) for s in stages) for k in stages[-1] if k != "total"}
        print(f"{mode:<8}{med['eager']:>13.1f}" + "".join(f"{med[r]:>15.1f}" for r in RUNTIMES)
              + f"{med['onnx'] / med['torch']:>12.2f}{med['onnx-int8'] / med['torch']:>12.2f}  "
              + " ".join(f"{k}={v:.1f}" for k, v in st.items() if v >= 0.05))


def folder(recs: dict[str, Any], paths: list[Path], modes: list[str], batch: int) -> dict[str, dict[str, list[str]]]:
    """Images/second over `paths` (decode + recognize_batch in batches, as infer.py), per runtime and mode; returns the answers."""
    from anime_role_detect.imageio import load_image

    print(f"\nfolder of {len(paths)} pictures, batches of {batch} (decode included); ratio = runtime / torch images/s; "
          "same = answers equal to torch's")
    header = f"{'mode':<8}" + "".join(f"{r + ' img/s':>17}" for r in RUNTIMES) + f"{'onnx ratio':>12}{'int8 ratio':>12}{'onnx same':>11}{'int8 same':>11}"
    print(header)
    print("-" * len(header))
    answers: dict[str, dict[str, list[str]]] = {}
    for mode in modes:
        rate, got = {}, {}
        for r in RUNTIMES:
            roles: list[str] = []
            t0 = time.perf_counter()
            for i in range(0, len(paths), batch):
                chunk = paths[i : i + batch]
                roles += [a.role for a in recs[r].recognize_batch([(load_image(p), str(p)) for p in chunk], mode=mode)]
            rate[r] = len(paths) / (time.perf_counter() - t0)
            got[r] = roles
        same = {r: sum(a == b for a, b in zip(got[r], got["torch"])) / len(paths) for r in RUNTIMES}
        print(f"{mode:<8}" + "".join(f"{rate[r]:>17.1f}" for r in RUNTIMES) + f"{rate['onnx'] / rate['torch']:>12.2f}"
              f"{rate['onnx-int8'] / rate['torch']:>12.2f}{100 * same['onnx']:>10.1f}%{100 * same['onnx-int8']:>10.1f}%")
        answers[mode] = got
    return answers


def accuracy(answers: dict[str, dict[str, list[str]]], labelled: list[tuple[Path, str, bool]], title: str) -> None:
    """Top-1 (open set on, as a user gets it) on the held-out pictures, per runtime and mode, from the folder run's answers."""
    keep = [i for i, (_, _, held) in enumerate(labelled) if held]
    print(f"\ntop-1 on {title} ({len(keep)} held-out pictures, open set on)")
    print(f"{'mode':<8}" + "".join(f"{r:>12}" for r in RUNTIMES) + f"{'int8 - torch':>15}")
    for mode, got in answers.items():
        acc = {r: 100 * sum(got[r][i] == labelled[i][1] for i in keep) / max(1, len(keep)) for r in RUNTIMES}
        print(f"{mode:<8}" + "".join(f"{acc[r]:>11.1f}%" for r in RUNTIMES) + f"{acc['onnx-int8'] - acc['torch']:>+14.1f}")


# == open_clip ViT-B/32 size: one image ===============================================================
def vit(scratch: Path, repeats: int, threads: int) -> None:
    """open_clip ViT-B-32 (random init): one image through the torch embedder vs its ONNX export (fp32, int8)."""
    import numpy as np
    from PIL import Image

    from anime_role_detect.recognition.embedder import OpenClipEmbedder
    from anime_role_detect.recognition.onnx_export import export_embedder, quantize_int8
    from anime_role_detect.recognition.runtime import OnnxEmbedder, open_session

    emb = OpenClipEmbedder("ViT-B-32", pretrained=None, device="cpu")
    t0 = time.perf_counter()
    entry = export_embedder(emb, scratch / "vit.onnx")
    quantize_int8(scratch / "vit.onnx", scratch / "vit.int8.onnx")
    print(f"\nopen_clip ViT-B-32 (random init) exported + quantised in {time.perf_counter() - t0:.1f} s")
    runners = {"torch": emb,
               "onnx": OnnxEmbedder(open_session(scratch / "vit.onnx", "cpu", threads), entry),
               "onnx-int8": OnnxEmbedder(open_session(scratch / "vit.int8.onnx", "cpu", threads), entry, runtime="onnx-int8")}
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8))
    runs: dict[str, list[float]] = {r: [] for r in RUNTIMES}
    for r in RUNTIMES:
        runners[r].embed([image])
    for _ in range(repeats):
        for r in RUNTIMES:
            _median_ms(functools.partial(runners[r].embed, [image]), runs[r])
    med = {r: statistics.median(v) for r, v in runs.items()}
    ref = runners["torch"].embed([image])
    cos = {r: float((runners[r].embed([image]) * ref).sum()) for r in RUNTIMES}
    print("embedder  " + "  ".join(f"{r} {med[r]:.1f} ms" for r in RUNTIMES)
          + f"   ratio onnx {med['onnx'] / med['torch']:.2f}, int8 {med['onnx-int8'] / med['torch']:.2f}"
          + f"   cosine to torch: onnx {cos['onnx']:.6f}, int8 {cos['onnx-int8']:.4f}")


# == the older random-init table ======================================================================
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


def random_init_table(args: argparse.Namespace, tmp: Path) -> None:
    """Random-init ViT-B/32 gallery + B0 classifier: pipeline end to end vs the eager forward of the same networks, per mode."""
    import torch
    from PIL import Image
    from torchvision import transforms as T

    from anime_role_detect.confutil import compose_plain
    from anime_role_detect.data.layout import scan_dataset, series_of, tag_vocabulary
    from anime_role_detect.data.synthetic import generate_dataset
    from anime_role_detect.recognition.build import build_recognition_folder
    from anime_role_detect.recognition.pipeline import Recognizer

    data = tmp / "data"
    generate_dataset(data, n_characters=8, images_per_character=12, size=256, seed=0)
    recs = scan_dataset(data)
    names = sorted({r.character for r in recs})
    ckpt = make_classifier_ckpt(tmp / "model.ckpt", names, tag_vocabulary(recs, 2), series_of(recs))
    cfg = compose_plain("infer", ["embedder=open_clip", "embedder.pretrained=null", f"embedder.batch_size={args.batch}", "runtime=torch"])
    build_recognition_folder(data, tmp / "v", cfg, model_ckpt=ckpt, val_fraction=0.25, dedupe=False)
    images = [Image.open(data / r.file_name).convert("RGB") for r in recs[: args.batch]]
    one = images[0]
    rec = Recognizer.from_version(tmp / "v", {**cfg, "cache_size": 0, "batch_size": args.batch})
    rec.warmup("fusion")
    _ = rec.tagger
    clip_visual, clf = rec.embedder.model, rec.classifier
    clip_tf = T.Compose([T.Resize(224), T.CenterCrop(224), T.ToTensor(), T.Normalize(rec.embedder.mean, rec.embedder.std)])
    clf_tf = T.Compose([T.Resize(clf.image_size), T.CenterCrop(clf.image_size), T.ToTensor(), T.Normalize(clf.mean, clf.std)])

    def eager_clip() -> Any:
        with torch.no_grad():
            return clip_visual(clip_tf(one)[None])

    def eager_model() -> Any:
        with torch.no_grad():
            return clf(clf_tf(one)[None])

    eager = {"clip": [eager_clip], "model": [eager_model], "fusion": [eager_clip, eager_model]}
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--registry", default=os.environ.get("ARD_REGISTRY", "outputs/registry"))
    ap.add_argument("--version", default="latest")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--folder", type=int, default=200, help="pictures in the folder run (held-out ones first)")
    ap.add_argument("--modes", nargs="+", default=["clip", "model", "fusion"])
    ap.add_argument("--eval-split", default=None, help="a train.py split manifest: its val side is the folder and the accuracy set")
    ap.add_argument("--vit", action="store_true", help="also time an open_clip ViT-B/32-size embedder (random init)")
    ap.add_argument("--random-init", action="store_true", help="the older random-init pipeline-vs-eager table instead")
    args = ap.parse_args(argv)

    quiet(args.threads)
    print(f"CPU threads: {args.threads} of {os.cpu_count()} cores; load average at the start {os.getloadavg()[0]:.1f} "
          "(other processes compete when it is above the core count)")
    with tempfile.TemporaryDirectory(prefix="ard-bench-") as tmp:
        scratch = Path(tmp)
        if args.random_init:
            random_init_table(args, scratch)
        else:
            exported = exported_copy(Path(args.registry), args.version, scratch)
            recs = recognizers(exported, args.batch, args.threads)
            modes = [m for m in args.modes if m in recs["torch"].describe()["modes"]]
            labelled = pictures(exported, args.eval_split, args.folder)
            from anime_role_detect.imageio import load_image

            one_image(recs, load_image(labelled[0][0]), modes, args.repeats)
            answers = folder(recs, [p for p, _, _ in labelled], modes, args.batch)
            accuracy(answers, labelled, f"{args.eval_split} (val side)" if args.eval_split else "the version's evaluation set")
            print("\nruntimes in use: " + ", ".join(f"{r}: {type(recs[r].embedder).__name__}/{type(recs[r].classifier_transform).__name__}"
                                                    for r in RUNTIMES))
        if args.vit:
            vit(scratch, args.repeats, args.threads)
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
