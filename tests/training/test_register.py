"""The README's first command leaves a live version: `train.py` (demo, register=true) -> the printed
`infer.py image=<sample>` answers the right character, `registry list` shows it live, the service answers it.

Everything runs as a user would, in a fresh working folder with the default paths (``.``), through the real
entry points as subprocesses; only the demo's size is shrunk (3 characters, tiny model, 64 px).
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

TINY_DEMO = [
    "data.synthetic.n_characters=3", "data.synthetic.images_per_character=16", "data.synthetic.twin_fraction=0",
    "data.synthetic.size=64", "data.image_size=64", "model=tiny", "trainer=cpu", "trainer.max_epochs=4",
    "model.optimizer.lr=3e-3", "logger=csv", "~callbacks.progress_bar", "+trainer.enable_progress_bar=false",
    "log.console_level=WARNING", "threads=1", "publish.samples_per_character=2",
]


def _env() -> dict[str, str]:
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "YOLO_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1"}
    env.pop("ARD_ROOT", None)
    env.pop("ARD_REGISTRY", None)
    return env


def _python(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def demo(tmp_path_factory, train_py):
    """`python train.py` (the demo experiment, shrunk) in a fresh folder; returns (folder, stdout)."""
    work = tmp_path_factory.mktemp("fresh_clone")
    proc = train_py(TINY_DEMO, cwd=work, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work, proc.stdout


def _printed_command(stdout: str, prefix: str) -> list[str]:
    line = next((ln for ln in stdout.splitlines() if prefix in ln), None)
    assert line is not None, stdout[-2000:]
    return shlex.split(line[line.index(prefix):].split("   then ")[0])


def test_the_printed_infer_command_answers_the_right_character(demo, project_root):
    work, stdout = demo
    cmd = _printed_command(stdout, "python infer.py")
    assert cmd[:2] == ["python", "infer.py"] and cmd[2].startswith("image=outputs/demo/samples/"), cmd
    sample = work / cmd[2].split("=", 1)[1]
    samples = sorted(sample.parent.glob("*.png"))
    assert sample.is_file() and len(samples) == 6  # 2 per character, fresh renders (not training images)
    p = _python([str(project_root / "infer.py"), *cmd[2:]], cwd=work)
    assert p.returncode == 0, p.stderr[-2000:]
    ans = json.loads(p.stdout.strip().splitlines()[-1])
    character = sample.stem.rsplit("_", 1)[0]
    assert ans["role"] == character and not ans["unknown"], ans
    from anime_role_detect.recognition.evalset import best_mode

    measured = json.loads((work / "outputs" / "registry" / "versions" / ans["version"] / "eval_metrics.json").read_text())
    assert ans["version"].startswith("v")  # default mode auto: the best the demo version measured on its held-out pictures
    assert ans["mode"] == best_mode(["clip", "model", "fusion"], measured["top1"], True, measured["pictures"]), (ans["mode"], measured)


def test_registry_lists_the_run_live_with_its_parts(demo):
    work, _ = demo
    p = _python(["-m", "anime_role_detect.registry", "list"], cwd=work)
    assert p.returncode == 0, p.stderr[-2000:]
    live = [ln for ln in p.stdout.splitlines() if ln.startswith("*")]
    assert len(live) == 1 and " train " in live[0] and "acc=" in live[0], p.stdout
    vid = live[0].split()[1]
    files = {f.name for f in (work / "outputs" / "registry" / "versions" / vid).iterdir()}
    assert {"model.ckpt", "gallery.faiss", "gallery.json", "tag_profiles.json", "calibration.json", "metrics.json",
            "config.yaml", "manifest.json", "onnx.json", "classifier.onnx"} <= files  # exported with the version
    manifest = json.loads((work / "outputs" / "registry" / "versions" / vid / "manifest.json").read_text())
    assert manifest["onnx"]["files"] == ["classifier.onnx", "onnx.json"], manifest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_service_answers_the_printed_curl_line(demo):
    import httpx

    work, stdout = demo
    curl = _printed_command(stdout, "curl ")
    sample = work / next(a for a in curl if a.startswith("file=@")).split("@", 1)[1]
    port = _free_port()
    log = open(work / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "anime_role_detect.serve", f"port={port}", "log.console_level=WARNING"],
                            cwd=work, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline, answer = time.monotonic() + 180, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with open(sample, "rb") as fh:
                    r = httpx.post(f"http://127.0.0.1:{port}/api/classify", files={"file": (sample.name, fh, "image/png")}, timeout=60)
                answer = r.json() if r.status_code == 200 else r.text
                break
            except httpx.HTTPError:
                time.sleep(0.3)
        assert isinstance(answer, dict), (answer, (work / "serve.log").read_text()[-3000:])
        assert answer["role"] == sample.stem.rsplit("_", 1)[0], answer
        served = httpx.get(f"http://127.0.0.1:{port}/api/version", timeout=30).json()
        assert served["recognizer"]["runtime"] == "onnx", served  # runtime: auto runs the version on ONNX Runtime with no export step
    finally:
        proc.terminate()
        proc.wait(20)
        log.close()
