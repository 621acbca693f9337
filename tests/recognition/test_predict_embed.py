"""Gallery embedding as a Lightning predict: the real command over 1 and 2 DDP CPU processes (gloo) gives the same
gallery, equal to the in-process `Gallery.build`; the merge refuses incomplete shards."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from anime_role_detect.errors import GalleryError
from anime_role_detect.recognition.gallery import Gallery

#: Real fixed ImageNet weights (offline), so two processes compute the same network without a shared seed.
EMBEDDER = {"kind": "timm", "model_name": "efficientnet_lite0_offline", "pretrained": True, "image_size": 64}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """4 characters x 10 small drawings (odd sizes, so letterboxing matters) and one corrupt file."""
    root = tmp_path_factory.mktemp("embed") / "chars"
    rng = np.random.default_rng(0)
    for c in range(4):
        d = root / f"char_{c}"
        d.mkdir(parents=True)
        for i in range(10):
            im = Image.new("RGB", (80, 96), tuple(int(x) for x in rng.integers(0, 255, 3)))
            ImageDraw.Draw(im).ellipse([10 + 5 * c, 10, 60, 70 - i], fill=tuple(int(x) for x in rng.integers(0, 255, 3)))
            im.save(d / f"{i:02d}.png")
    (root / "char_0" / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return root


def _overrides(dataset: Path, out: Path, cwd: Path, *extra: str) -> list[str]:
    return [f"data.root={dataset}", f"out={out}", f"paths.root_dir={cwd}",
            *(f"embedder.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in EMBEDDER.items()),
            "embedder.flip_tta=true", "gallery_build.index.type=flat", "batch_size=8", "num_workers=1", *extra]


def embed(dataset: Path, out: Path, cwd: Path, *extra: str) -> dict:
    """The embed command in a process of its own (DDP's launcher re-runs it for rank 1); its summary line."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    args = [sys.executable, "-m", "anime_role_detect.cli.embed", *_overrides(dataset, out, cwd, *extra)]
    p = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def embed_here(dataset: Path, out: Path, cwd: Path, *extra: str) -> dict:
    """What the command runs (`run_embed` on conf/embed.yaml), on one process inside this one: 7 s less a call."""
    from anime_role_detect.cli.embed import run_embed
    from anime_role_detect.confutil import compose_config

    summary = run_embed(compose_config("embed", [*_overrides(dataset, out, cwd, *extra), f"paths.output_dir={cwd / 'run'}"]))
    assert summary is not None
    return summary


def rows_and_vectors(folder: Path) -> tuple[list[tuple], np.ndarray]:
    g = Gallery.load(folder)
    ids = np.array(sorted(g.rows), dtype=np.int64)
    return [(g.rows[i].character, g.rows[i].source) for i in ids], g.index.reconstruct_batch(ids)


@pytest.mark.slow
def test_two_ddp_processes_build_the_same_gallery_as_one(dataset, tmp_path):
    one = embed(dataset, tmp_path / "one", tmp_path, "trainer=cpu")
    two = embed(dataset, tmp_path / "two", tmp_path, "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu")
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert one["embedded"] == two["embedded"] == 40 and one["unreadable"] == two["unreadable"] == 1
    assert sorted(p.name for p in (tmp_path / "two" / "shards").iterdir()) == [
        "rank-00000-part-0000.npz", "rank-00000.done.json", "rank-00001-part-0000.npz", "rank-00001.done.json", "run.json"]
    rows1, v1 = rows_and_vectors(tmp_path / "one")
    rows2, v2 = rows_and_vectors(tmp_path / "two")
    assert rows1 == rows2 and len(rows1) == 40
    assert [s for _, s in rows1] == sorted(s for _, s in rows1)  # characters sorted, file names sorted within
    np.testing.assert_allclose(v1, v2, atol=1e-5)
    # the in-process path (Gallery.build, as build_recognition_folder does by default) gives the same rows and vectors
    from anime_role_detect.imageio import load_image
    from anime_role_detect.recognition.embedder import build_embedder

    files = sorted(p for p in dataset.rglob("*.png") if "broken" not in p.name)
    items = [(p.parent.name, "", (lambda p=p: load_image(p)), p.relative_to(dataset).as_posix()) for p in files]
    # on the CPU as the processes above: a GPU's TF32 convolutions would differ by ~1e-3, not by rounding
    ref = Gallery.build(items, build_embedder({**EMBEDDER, "flip_tta": True, "batch_size": 8, "device": "cpu"}), index={"type": "flat"})
    ids = np.array(sorted(ref.rows), dtype=np.int64)
    assert [(ref.rows[i].character, ref.rows[i].source) for i in ids] == rows1
    np.testing.assert_allclose(ref.index.reconstruct_batch(ids), v1, atol=1e-5)


def _shard(d: Path, rank: int, world: int, ids: list[str], dim: int = 4) -> None:
    from anime_role_detect.fsutil import atomic_write_json
    from anime_role_detect.recognition.shards import part_name, save_part

    save_part(d / part_name(rank, 0), ids, np.eye(dim, dtype=np.float32)[: len(ids)])
    atomic_write_json(d / f"rank-{rank:05d}.done.json", {"rank": rank, "world_size": world, "rows": len(ids), "parts": 1,
                                                          "embedder_id": "e", "dim": dim, "seconds": 1.0, "errors": []})


def test_merge_sorts_by_id_and_refuses_a_missing_rank(tmp_path):
    from anime_role_detect.recognition.shards import merge_shards

    _shard(tmp_path, 0, 2, ["b/1.png", "a/2.png"])
    with pytest.raises(GalleryError, match="a rank failed"):
        merge_shards(tmp_path)
    _shard(tmp_path, 1, 2, ["a/1.png", "a/2.png"])  # a/2.png twice (a resumed rank): kept once
    ids, vecs, info = merge_shards(tmp_path)
    assert ids == ["a/1.png", "a/2.png", "b/1.png"] and info["world_size"] == 2
    assert vecs.shape == (3, 4) and vecs[0, 0] == 1.0  # rank 1's first row
    (tmp_path / "rank-00001-part-0000.npz").unlink()
    with pytest.raises(GalleryError, match="part"):
        merge_shards(tmp_path)


@pytest.mark.slow
def test_build_recognition_folder_with_a_ddp_trainer_builds_the_default_gallery(dataset, tmp_path):
    """gallery_build.trainer (2 gloo processes through the embed command) gives the rows and vectors of the default path."""
    from anime_role_detect.recognition.build import build_recognition_folder

    # the in-process path on the CPU too: compared with the gloo processes to 1e-5, not across devices
    cfg = {"embedder": {**EMBEDDER, "flip_tta": False, "batch_size": 8, "device": "cpu"}, "gallery_build": {"index": {"type": "flat"}}}
    build_recognition_folder(dataset, tmp_path / "plain", cfg, val_fraction=0)
    ddp = {**cfg, "gallery_build": {**cfg["gallery_build"], "num_workers": 0,
                                    "trainer": {"accelerator": "cpu", "devices": 2, "strategy": "ddp"}}}
    build_recognition_folder(dataset, tmp_path / "ddp", ddp, val_fraction=0)
    rows1, v1 = rows_and_vectors(tmp_path / "plain")
    rows2, v2 = rows_and_vectors(tmp_path / "ddp")
    assert rows1 == rows2 and len(rows1) == 40
    np.testing.assert_allclose(v1, v2, atol=1e-5)
    assert not (tmp_path / "ddp" / ".embed").exists()  # the shards are not left in the version folder


@pytest.mark.slow
def test_a_cancelled_or_abandoned_ddp_gallery_embedding_leaves_no_rank(dataset, tmp_path, processes_naming):
    """The embed command a gallery build runs over processes goes with its caller: a cancel (`check` raising, as the
    workflow's progress does) kills both ranks at once instead of waiting for the embedding to end, and so does the
    caller's death by SIGKILL (the command watches for it)."""
    import signal
    import time

    from anime_role_detect.recognition.build import build_recognition_folder

    cfg = {"embedder": {**EMBEDDER, "flip_tta": False, "batch_size": 8, "device": "cpu"},
           "gallery_build": {"index": {"type": "flat"}, "num_workers": 0, "batch_size": 1,
                             "trainer": {"accelerator": "cpu", "devices": 2, "strategy": "ddp"}}}

    class Cancelled(Exception):
        pass

    work = tmp_path / "cancel" / ".embed"
    cancelled_at = []

    def check() -> None:
        if len(processes_naming(str(work / "files.txt"))) >= 2:  # rank 0 and the rank Lightning started
            cancelled_at.append(time.monotonic())
            raise Cancelled

    with pytest.raises(Cancelled):
        build_recognition_folder(dataset, tmp_path / "cancel", cfg, val_fraction=0, check=check)
    assert time.monotonic() - cancelled_at[0] < 5
    assert not processes_naming(str(work / "files.txt")), "a rank outlived the cancel"

    work = tmp_path / "abandoned" / ".embed"
    code = (f"from anime_role_detect.recognition.build import build_recognition_folder as b; "
            f"b({str(dataset)!r}, {str(tmp_path / 'abandoned')!r}, {cfg!r}, val_fraction=0)")
    caller = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(processes_naming(str(work / "files.txt"))) < 2:
            assert caller.poll() is None and time.monotonic() < deadline, "the embedding ended before both ranks ran"
            time.sleep(0.1)
        caller.send_signal(signal.SIGKILL)
        caller.wait(30)
        deadline = time.monotonic() + 5  # the command looks for its caller once a second
        while processes_naming(str(work / "files.txt")):
            assert time.monotonic() < deadline, "a rank outlived its killed caller"
            time.sleep(0.1)
    finally:
        for pid in processes_naming(str(work / "files.txt")):
            os.kill(pid, 9)


@pytest.mark.slow
def test_a_failed_ddp_gallery_embedding_names_its_log_and_a_command_to_run(dataset, tmp_path):
    """The embed command's own one-line error comes back, with its log and the command to run by hand, which does
    not carry the caller's pid (a hand run would stop at once, its "caller" gone)."""
    from anime_role_detect.recognition.build import build_recognition_folder

    cfg = {"embedder": {**EMBEDDER, "device": "cpu"},  # GPU ranks on a machine without one
           "gallery_build": {"index": {"type": "flat"}, "num_workers": 0,
                             "trainer": {"accelerator": "gpu", "devices": 2, "strategy": "ddp"}}}
    with pytest.raises(GalleryError) as err:
        build_recognition_folder(dataset, tmp_path / "bad", cfg, val_fraction=0)
    message = str(err.value)
    assert "No supported gpu backend found" in message, message  # the error, not Hydra's hint printed after it
    assert str(tmp_path / "bad" / ".embed" / "embed.log") in message, message
    assert "anime_role_detect.cli.embed" in message and "parent_pid" not in message, message


@pytest.mark.slow
def test_a_killed_embedding_resumes_with_only_the_images_its_parts_lack(dataset, tmp_path):
    """An archive's embedding killed part way loses at most the part being written: run again, on 1 or 2 processes,
    it embeds only the images no finished part holds, and the gallery equals an uninterrupted run's."""
    small = ("rows_per_part=8", "trainer=cpu")
    whole = embed_here(dataset, tmp_path / "whole", tmp_path, *small)
    assert whole["resumed"] == 0 and whole["embedded"] == 40
    rows, vectors = rows_and_vectors(tmp_path / "whole")

    def kill(out: Path, keep_parts: dict[int, int]) -> int:
        """What a SIGKILL leaves: finished parts only (each written atomically), no done marker, no gallery; returns
        how many images the parts left hold."""
        shards = out / "shards"
        for marker in shards.glob("rank-*.done.json"):
            marker.unlink()
        for rank, keep in keep_parts.items():
            for part in sorted(shards.glob(f"rank-{rank:05d}-part-*.npz"))[keep:]:
                part.unlink()
        for f in out.glob("gallery*"):
            f.unlink()
        held = set()
        for part in shards.glob("rank-*-part-*.npz"):
            with np.load(part) as z:
                held.update(z["ids"].tolist())
        return len(held)

    shutil.copytree(tmp_path / "whole", tmp_path / "one")
    held = kill(tmp_path / "one", {0: 3})
    assert 0 < held < 40
    again = embed_here(dataset, tmp_path / "one", tmp_path, *small)
    assert again["resumed"] == held and again["embedded"] == 40 and again["unreadable"] == 1  # the broken file is tried again
    assert [p.name for p in sorted((tmp_path / "one" / "shards").glob("*.npz"))][:4] == [
        f"rank-00000-part-{i:04d}.npz" for i in range(4)]  # the new parts numbered after the old ones
    got_rows, got = rows_and_vectors(tmp_path / "one")
    assert got_rows == rows
    np.testing.assert_allclose(got, vectors, atol=1e-5)
    again = embed_here(dataset, tmp_path / "one", tmp_path, *small)  # finished: only the unreadable file is tried again
    assert (again["resumed"], again["unreadable"], again["embedded"]) == (40, 1, 40)
    good = tmp_path / "good.txt"  # the readable images only: another set of images, so it starts over once
    good.write_text("\n".join(sorted(p.relative_to(dataset).as_posix() for p in dataset.rglob("*.png") if "broken" not in p.name)))
    assert embed_here(dataset, tmp_path / "one", tmp_path, *small, f"files={good}")["resumed"] == 0
    again = embed_here(dataset, tmp_path / "one", tmp_path, *small, f"files={good}")  # then nothing is left to embed
    assert (again["resumed"], again["embedded"], again["embed_seconds"]) == (40, 40, 0.0)
    assert rows_and_vectors(tmp_path / "one")[0] == rows

    two = ("rows_per_part=4", "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu")
    embed(dataset, tmp_path / "two", tmp_path, *two)
    held = kill(tmp_path / "two", {0: 2, 1: 1})
    assert 0 < held < 40
    again = embed(dataset, tmp_path / "two", tmp_path, *two)
    assert again["resumed"] == held and again["world_size"] == 2 and again["embedded"] == 40
    got_rows, got = rows_and_vectors(tmp_path / "two")
    assert got_rows == rows
    np.testing.assert_allclose(got, vectors, atol=1e-5)
    # another embedder (or another world size) starts over: its vectors are not these
    assert embed_here(dataset, tmp_path / "one", tmp_path, *small, "embedder.image_size=96")["resumed"] == 0


@pytest.mark.parametrize("trainer, many", [
    ({"devices": 1}, False), ({"devices": "2"}, True), ({"devices": -1}, True), ({"devices": [0]}, False),
    ({"devices": [0, 1]}, True), ({"num_nodes": 2}, True), ({"strategy": "ddp"}, True),
    ({"devices": "auto", "accelerator": "cpu"}, False),
])
def test_which_trainer_configs_start_more_processes(trainer, many):
    """What decides that embedding (and in-process training) runs as a command of its own: a plain dict or the
    composed config's node (a Hydra ListConfig of devices read as one process before)."""
    from omegaconf import OmegaConf

    from anime_role_detect.recognition.predict import starts_ranks

    assert starts_ranks(trainer) is many and starts_ranks(OmegaConf.create(trainer)) is many
