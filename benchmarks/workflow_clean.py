"""Cleaning throughput: `workflow.clean.clean_dataset` vs. only decoding the same files (the floor).

``python benchmarks/workflow_clean.py [DATASET_DIR]`` (default ``$ARD_DATA_DIR/mixed5``, i.e.
../shared/data/mixed5, one sub-folder per character). Prints images/s of both and the ratio: what
content hashing, pHash, duplicate grouping and writing the dataset cost on top of reading every image once.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from _common import data_dir

from anime_role_detect.data.layout import scan_dataset
from anime_role_detect.imageio import load_image
from anime_role_detect.workflow.clean import CleanConfig, clean_dataset


def main(argv: list[str]) -> None:
    root = Path(argv[0]) if argv else data_dir() / "mixed5"
    records = scan_dataset(root)
    for r in records[:8]:  # warm the page cache so both passes read from memory
        (root / r.file_name).read_bytes()
    for r in records:
        (root / r.file_name).read_bytes()
    t0 = time.perf_counter()
    for r in records:
        load_image(root / r.file_name)
    decode_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        kept, report = clean_dataset(records, root, Path(tmp) / "dataset", CleanConfig(min_side=64, max_distance=6))
        clean_s = time.perf_counter() - t0
    n = len(records)
    print(f"dataset {root}: {n} images, kept {len(kept)}, near-duplicate groups {report.near_duplicate_groups}, "
          f"rejected {dict(report.reasons)}")
    print(f"decode only (baseline): {decode_s:.2f}s  {n / decode_s:.0f} img/s")
    print(f"clean_dataset         : {clean_s:.2f}s  {n / clean_s:.0f} img/s")
    print(f"ratio clean / decode  : {clean_s / decode_s:.2f}x")


if __name__ == "__main__":
    main(sys.argv[1:])
