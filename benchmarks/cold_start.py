"""Seconds from ``python infer.py image=<one picture>`` to its answer in a fresh process: this checkout vs another.

What someone tagging one picture waits for: interpreter start, imports, the config, loading the version (on
ONNX Runtime when it has the export) and one answer. Each round runs the command once with this checkout's
package and once with `--baseline-src`'s (e.g. a ``git worktree`` of an older commit), alternating the order;
the median of each and their ratio come from the same run, with the load average printed.

    git worktree add /tmp/ard-old <commit> && python benchmarks/cold_start.py --image pic.jpg \\
        --registry outputs/registry --baseline-src /tmp/ard-old/src
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def answer_seconds(src: Path, image: Path, registry: Path) -> float:
    """Wall seconds of one ``infer.py image=...`` with the package from `src` (its sibling conf/ and infer.py)."""
    root = src.parent
    env = {**os.environ, "PYTHONPATH": str(src), "ARD_CONF_DIR": str(root / "conf")}
    t = time.perf_counter()
    run = subprocess.run([sys.executable, str(root / "infer.py"), f"image={image}", f"registry_dir={registry}"], env=env,
                         capture_output=True, text=True, cwd=root, check=False)
    seconds = time.perf_counter() - t
    if run.returncode != 0 or '"role"' not in run.stdout:
        raise SystemExit(f"infer.py from {src} failed: {run.stderr.strip().splitlines()[-1:]}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image", type=Path, required=True)
    ap.add_argument("--registry", type=Path, required=True, help="a registry whose live version answers")
    ap.add_argument("--baseline-src", type=Path, required=True, help="the src/ folder of the checkout to compare with")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    ours, theirs = REPO / "src", args.baseline_src.resolve()
    print(f"# cold infer.py on {args.image}; load average {os.getloadavg()[0]:.2f}")
    got: dict[str, list[float]] = {"baseline": [], "this checkout": []}
    for r in range(args.rounds):
        order = [("baseline", theirs), ("this checkout", ours)]
        for name, src in order if r % 2 == 0 else order[::-1]:
            got[name].append(answer_seconds(src, args.image.resolve(), args.registry.resolve()))
        print(f"round {r}: baseline {got['baseline'][-1]:.2f} s, this checkout {got['this checkout'][-1]:.2f} s", flush=True)
    base, new = statistics.median(got["baseline"]), statistics.median(got["this checkout"])
    print(f"median of {args.rounds}: baseline {base:.2f} s, this checkout {new:.2f} s: {new / base:.2f}x; "
          f"load average at end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
