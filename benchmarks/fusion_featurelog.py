"""Feature-log and fusion speed on this machine, as ratios to baselines measured in the same run.

- `FeatureLog.append` (JSON line + CRC'd embedding rows; fsync off / grouped per second / every record) per record, against the
  baseline of appending the same JSON line to a plain file with no embeddings and no fsync.
- `FeatureLog.read` (parse + CRC check + feedback join) per record, against `json.loads` of the lines.
- `fuse()` end to end on a registry with a 6000-row gallery and the logged records (absolute).

``python benchmarks/fusion_featurelog.py [--records 2000] [--dim 1280]``
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from anime_role_detect.fusion.featurelog import FeatureLog, LogPolicy
from anime_role_detect.fusion.fuse import fuse
from anime_role_detect.recognition.gallery import Gallery
from anime_role_detect.recognition.schema import Answer, Detection, TopK
from anime_role_detect.registry import Registry


def _answer(i: int, n_chars: int) -> Answer:
    role = f"char_{i % n_chars:02d}"
    det = Detection(box=[0, 0, 64, 96], role=role, similarity=0.9,
                    topk=[TopK(role=role, score=0.9), TopK(role="other", score=0.5)])
    return Answer(filename=f"{i}.png", role=role, similarity=0.9, boxes=[det.box], detections=[det],
                  image_sha256=f"{i:064x}", version="bench")


def _unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=2000)
    ap.add_argument("--dim", type=int, default=1280, help="embedding size (1280 = EfficientNet-Lite0, 512 = CLIP ViT-B/32)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    answers = [_answer(i, 20) for i in range(args.records)]
    embs = _unit(rng, args.records, args.dim)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # baseline: the JSON line alone, plain append, no fsync
        t0 = time.perf_counter()
        with open(tmp / "plain.jsonl", "a", encoding="utf-8") as fh:
            for a in answers:
                fh.write(a.model_dump_json() + "\n")
        base = (time.perf_counter() - t0) / args.records
        timings = {}
        policies = {"off": LogPolicy(fsync=False), "1s": LogPolicy(fsync=True, fsync_interval_s=1.0),
                    "every": LogPolicy(fsync=True, fsync_interval_s=0.0)}
        for name, pol in policies.items():
            log = FeatureLog(tmp / f"log_{name}", pol, embedder_id="bench")
            t0 = time.perf_counter()
            for a, e in zip(answers, embs):
                log.append(a, e[None])
            timings[name] = (time.perf_counter() - t0) / args.records
            log.close()
        t0 = time.perf_counter()
        lines = [json.loads(x) for x in (tmp / "plain.jsonl").read_text().splitlines()]
        read_base = (time.perf_counter() - t0) / len(lines)
        t0 = time.perf_counter()
        n = sum(1 for _ in FeatureLog(tmp / "log_off").read())
        read_t = (time.perf_counter() - t0) / n
        print(f"records={args.records} dim={args.dim}")
        print(f"baseline plain JSON-line append        {base * 1e6:9.1f} us/record")
        for name, label in (("off", "fsync off"), ("1s", "fsync every 1 s (default)"), ("every", "fsync every record")):
            print(f"FeatureLog.append {label:<26} {timings[name] * 1e6:9.1f} us/record  ({timings[name] / base:7.1f}x baseline)")
        print(f"baseline json.loads of the lines       {read_base * 1e6:9.1f} us/record")
        print(f"FeatureLog.read (CRC + join)           {read_t * 1e6:9.1f} us/record  ({read_t / read_base:5.1f}x baseline)")

        reg = Registry(tmp / "registry")
        g = Gallery("bench", args.dim)
        for c in range(20):
            g.add(f"char_{c:02d}", "s", _unit(rng, 300, args.dim))
        with reg.derive(None, "workflow", promote=True) as d:
            g.save(d.dir)
        t0 = time.perf_counter()
        res = fuse({"log_dir": str(tmp / "log_off"), "registry_dir": str(reg.root),
                    "selection": {"min_confidence": 0.5}, "force": True})
        dt = time.perf_counter() - t0
        added = sum(sum(d.values()) for d in res.report["added_per_character"].values())
        print(f"fuse(): {args.records} records onto a 6000-row gallery -> {added} added, {res.report['decision']}: {dt:.2f} s "
              f"({dt / args.records * 1e3:.2f} ms/record)")


if __name__ == "__main__":
    main()
