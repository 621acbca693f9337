"""Seconds from ``python infer.py image=<one picture>`` to its answer in a fresh process: this checkout vs another.

What someone tagging one picture waits for: interpreter start, imports, the config, loading the version (on
ONNX Runtime when it has the export) and one answer. Each round runs the command once with this checkout's
package and once with `--baseline-src`'s (e.g. a ``git worktree`` of an older commit), alternating the order;
the median of each and their ratio come from the same run, with the load average printed. With ``--service`` it
times ``python -m anime_role_detect.serve`` instead, from launch to its first ``/api/classify`` answer of the
picture, and reports the server's peak resident memory then (Linux ``/proc``).

    git worktree add /tmp/ard-old <commit> && python benchmarks/cold_start.py --image pic.jpg \\
        --registry outputs/registry --baseline-src /tmp/ard-old/src [--service]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
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


def service_seconds(src: Path, image: Path, registry: Path, timeout_s: float = 300.0) -> tuple[float, float]:
    """Wall seconds from launching the service with the package from `src` to its first answer of `image`, and the
    server's peak resident memory (MB) at that moment."""
    import httpx

    root = src.parent
    env = {**os.environ, "PYTHONPATH": str(src), "ARD_CONF_DIR": str(root / "conf")}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    payload = image.read_bytes()
    with tempfile.TemporaryDirectory() as work:
        t = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "anime_role_detect.serve", f"port={port}", f"registry_dir={registry}",
                                 f"feature_log.dir={work}/featurelog", f"hydra.run.dir={work}/hydra"], env=env, cwd=work,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while True:
                if proc.poll() is not None or time.perf_counter() - t > timeout_s:
                    raise SystemExit(f"the service from {src} did not answer (exit code {proc.returncode})")
                try:
                    r = httpx.post(f"http://127.0.0.1:{port}/api/classify", files={"file": (image.name, payload)}, timeout=60)
                    if r.status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.05)
            seconds = time.perf_counter() - t
            peak = next(int(line.split()[1]) for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
                        if line.startswith("VmHWM:")) / 1024.0
        finally:
            proc.terminate()
            proc.wait(30)
    return seconds, peak


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image", type=Path, required=True)
    ap.add_argument("--registry", type=Path, required=True, help="a registry whose live version answers")
    ap.add_argument("--baseline-src", type=Path, required=True, help="the src/ folder of the checkout to compare with")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--service", action="store_true", help="time the service's first answer instead of infer.py")
    args = ap.parse_args(argv)
    ours, theirs = REPO / "src", args.baseline_src.resolve()
    if args.service:
        return compare_service(ours, theirs, args)
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


def compare_service(ours: Path, theirs: Path, args: argparse.Namespace) -> int:
    """`service_seconds` for both checkouts, alternated; medians of time and peak memory, and their ratios."""
    print(f"# service start to first answer on {args.image}; load average {os.getloadavg()[0]:.2f}")
    got: dict[str, list[tuple[float, float]]] = {"baseline": [], "this checkout": []}
    for r in range(args.rounds):
        order = [("baseline", theirs), ("this checkout", ours)]
        for name, src in order if r % 2 == 0 else order[::-1]:
            got[name].append(service_seconds(src, args.image.resolve(), args.registry.resolve()))
        print(f"round {r}: " + ", ".join(f"{n} {v[-1][0]:.2f} s {v[-1][1]:.0f} MB" for n, v in got.items()), flush=True)
    (bs, bm), (ns, nm) = ((statistics.median(x[0] for x in got[n]), statistics.median(x[1] for x in got[n]))
                          for n in ("baseline", "this checkout"))
    print(f"median of {args.rounds}: baseline {bs:.2f} s {bm:.0f} MB, this checkout {ns:.2f} s {nm:.0f} MB: "
          f"{ns / bs:.2f}x time, {nm / bm:.2f}x memory; load average at end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
