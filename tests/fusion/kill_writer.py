"""Subprocess for the kill test: appends records (and some feedback) forever, printing each id once it is durable."""

from __future__ import annotations

import sys

from anime_role_detect.fusion.featurelog import FeatureLog, LogPolicy

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from helpers import make_answer, unit_rows  # noqa: E402

if __name__ == "__main__":
    log = FeatureLog(sys.argv[1], LogPolicy(max_segment_bytes=64 * 1024), embedder_id="e")
    start = int(sys.argv[2])
    i = start
    while True:
        rid = log.append(make_answer(f"char_{i % 5:02d}", sha=f"{i:064x}", n_det=2), unit_rows(i, 2, 384))
        print(f"R {i} {rid}", flush=True)
        if i % 3 == 0:
            log.feedback(rid, correct_role=f"fixed_{i}")
            print(f"F {i} {rid}", flush=True)
        i += 1
