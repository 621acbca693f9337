"""Service fixtures: a real registry version built from synthetic characters, and the real server
(`python -m anime_role_detect.serve`, uvicorn on 127.0.0.1, a free port) talked to over HTTP."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import httpx
import pytest
from PIL import Image

from anime_role_detect.data.synthetic import generate_dataset, make_characters

#: Characters in the served gallery, and one more that only gets enrolled through the API.
N_GALLERY = 5
ENROLL_INDEX = 5
SIZE = 96


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class Dataset:
    """Synthetic characters: `gallery_root` is built into the registry, `enroll_root` is held back."""

    gallery_root: Path
    enroll_root: Path
    names: list[str]
    enroll_name: str

    def images(self, name: str) -> list[Path]:
        root = self.enroll_root if name == self.enroll_name else self.gallery_root
        return sorted((root / name).glob("*.png"))


@pytest.fixture(scope="session")
def service_data(tmp_path_factory) -> Dataset:
    base = tmp_path_factory.mktemp("service_data")
    specs = make_characters(N_GALLERY + 1, seed=11, twin_fraction=0.0)
    generate_dataset(base / "gallery", size=SIZE, seed=1, images_per_character=10, characters=specs[:N_GALLERY])
    generate_dataset(base / "enroll", size=SIZE, seed=2, images_per_character=6, characters=specs[ENROLL_INDEX:])
    return Dataset(base / "gallery", base / "enroll", [s.name for s in specs[:N_GALLERY]], specs[ENROLL_INDEX].name)


def build_version(registry_root: Path, data_root: Path, promote: bool = True) -> str:
    """A registry version (gallery + calibration + tag profiles) from a dataset folder, via the recognition builder,
    with its gallery embedder exported to ONNX as the workflow's versions are (the server answers on ONNX Runtime)."""
    from anime_role_detect.confutil import compose_plain
    from anime_role_detect.recognition.build import build_recognition_folder
    from anime_role_detect.registry import Registry

    cfg = compose_plain("infer", ["embedder=lite0", "embedder.image_size=96", "embedder.flip_tta=false", "tagger=none"])
    reg = Registry(registry_root)
    staging = reg.staging_dir()
    build_recognition_folder(data_root, staging, cfg, val_fraction=0.2, seed=0, onnx=True)
    return reg.commit(staging, kind="test", promote=promote)


@pytest.fixture(scope="session")
def registry_root(tmp_path_factory, service_data) -> Path:
    root = tmp_path_factory.mktemp("registry")
    build_version(root, service_data.gallery_root)
    return root


class Server:
    """`python -m anime_role_detect.serve` in a subprocess on a free loopback port."""

    def __init__(self, workdir: Path, registry_dir: Path, overrides: Sequence[str] = (), config_dir: Path | None = None,
                 config_name: str | None = None) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "anime_role_detect.serve"]
        if config_dir is not None:
            args += ["--config-dir", str(config_dir), "--config-name", config_name or "serve"]
        args += [f"port={self.port}", f"registry_dir={registry_dir}", f"feature_log.dir={workdir / 'featurelog'}",
                 "reload_interval_s=0.2", "log.console_level=WARNING", f"hydra.run.dir={workdir / 'hydra'}",
                 "+feature_log.policy.fsync=false", *overrides]
        env = {**os.environ, "ARD_ROOT": str(workdir), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
               "YOLO_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        env.pop("ARD_API_TOKEN", None)
        self.log_path = workdir / "server.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(args, cwd=workdir, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def log_tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/api/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not up after {timeout}s:\n{self.log_tail()}")

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kw.pop("timeout", 120), **kw)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


def start_server(workdir: Path, registry_dir: Path, overrides: Sequence[str] = (), **kw) -> Server:
    workdir.mkdir(parents=True, exist_ok=True)
    server = Server(workdir, registry_dir, overrides, **kw)
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="session")
def server(tmp_path_factory, registry_root) -> Iterator[Server]:
    """The default server (no token) over the synthetic registry; enrol tests leave a new version behind."""
    srv = start_server(tmp_path_factory.mktemp("server"), registry_root)
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def client(server) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


def mp4_bytes(frames: Sequence[Image.Image], fps: int = 4, container: str = "mp4", codec: str = "mpeg4") -> bytes:
    """Encode frames as a video in memory (PyAV), for video uploads: MPEG-4 in MP4, or VP8 in WebM (what browsers play)."""
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        stream.options = {"qscale": "2"} if codec == "mpeg4" else {"crf": "10", "b": "2M"}
        for img in frames:
            for packet in stream.encode(av.VideoFrame.from_image(img.convert("RGB"))):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def write_site_config(folder: Path, collector_root: Path, work_dir: Path, train_overrides: Sequence[str]) -> Path:
    """A site config layered on conf/serve.yaml (how a deployment sets server-side workflow values)."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {
        "defaults": ["serve", "_self_"],
        "workflow": {
            "overrides": ["collector=local"],
            "values": {
                "collector.root": str(collector_root), "work_dir": str(work_dir), "clean.min_side": 48,
                "gallery.embedder.flip_tta": False, "gallery.embedder.batch_size": 64, "train.overrides": list(train_overrides),
            },
        },
    }
    import yaml

    (folder / "serve_site.yaml").write_text("# @package _global_\n" + yaml.safe_dump(cfg, sort_keys=False))
    return folder
