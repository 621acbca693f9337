"""The YOLO detector made offline: dataset building, training through the real entry point, two characters -> two boxes.

`tiny_yolo_weights` trains once per session (``training.detector.make_tiny_detector``, about a minute
on 2 cores) into the session's base temp folder; other tests that need a detector can call
``make_tiny_detector(tmp_path_factory.getbasetemp() / "tiny_yolo")`` and reuse the same weights.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from PIL import Image

from anime_role_detect.data.synthetic import make_characters, render_scene
from anime_role_detect.errors import ConfigError, DatasetError
from anime_role_detect.recognition.detector import Box, YoloDetector, build_detector
from anime_role_detect.training.detector import (
    DetectorTrainingConfig,
    build_dataset,
    make_tiny_detector,
    parse_overrides,
    yolo_label_line,
)

PROJECT_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_yolo_weights(tmp_path_factory) -> Path:
    """A half-width YOLOv8n trained from scratch on synthetic composites (``preset=tiny``)."""
    import torch

    torch.set_num_threads(2)
    return make_tiny_detector(tmp_path_factory.getbasetemp() / "tiny_yolo")


@pytest.fixture(scope="module")
def yolo(tiny_yolo_weights) -> YoloDetector:
    cfg = OmegaConf.load(PROJECT_ROOT / "conf" / "detector" / "yolo.yaml")
    cfg.weights = str(tiny_yolo_weights)
    det = build_detector(cfg)
    assert isinstance(det, YoloDetector) and det.imgsz == 160  # imgsz: null = the size it was trained at
    return det


@pytest.mark.slow
def test_two_characters_give_two_boxes_near_the_true_ones(yolo):
    specs = make_characters(10, seed=99, twin_fraction=0.0)  # characters never seen in training
    rng = random.Random(5)
    scenes = [render_scene(rng.sample(specs, 2), rng, size=(320, 224)) for _ in range(10)]
    found = yolo.detect([img for img, _ in scenes])  # one batch, images larger than imgsz
    matched, extra = 0, 0
    for (img, placed), boxes in zip(scenes, found):
        truth = [Box(*box) for _, box in placed]
        matched += sum(max((b.iou(t) for b in boxes), default=0.0) > 0.5 for t in truth)
        extra += max(0, len(boxes) - len(truth))
        assert all(0 <= b.x1 < b.x2 <= 320 and 0 <= b.y1 < b.y2 <= 224 for b in boxes)  # input-image pixels
        assert [b.score for b in boxes] == sorted((b.score for b in boxes), reverse=True)
    assert matched >= 18 and extra <= 2, f"{matched}/20 true boxes found, {extra} extra boxes"


@pytest.mark.slow
def test_an_empty_background_gives_no_boxes_and_thresholds_apply(yolo, tiny_yolo_weights):
    import torch

    torch.set_num_threads(2)
    rng = random.Random(8)
    empties = [render_scene([], rng, size=(320, 224))[0] for _ in range(5)]
    assert sum(len(b) for b in yolo.detect(empties)) <= 1
    one = render_scene(make_characters(3, seed=7)[:1], random.Random(1), size=(320, 224))[0]
    strict = YoloDetector(weights=tiny_yolo_weights, imgsz=160, conf=0.999)
    capped = YoloDetector(weights=tiny_yolo_weights, imgsz=160, conf=0.01, max_det=1)
    assert strict.detect([one]) == [[]] and len(capped.detect([one])[0]) == 1
    assert torch.get_num_threads() == 2  # ultralytics' select_device (threads = cpu_count - 1) was undone


@pytest.mark.slow
def test_concurrent_callers_get_the_same_boxes_as_one_caller(yolo):
    from concurrent.futures import ThreadPoolExecutor

    rng = random.Random(11)
    specs = make_characters(4, seed=12)
    scenes = [render_scene(rng.sample(specs, 2), rng, size=(320, 224))[0] for _ in range(6)]
    expected = [yolo.detect([img])[0] for img in scenes]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda img: yolo.detect([img])[0], scenes))
    assert [[b.as_list() for b in boxes] for boxes in got] == [[b.as_list() for b in boxes] for boxes in expected]


@pytest.mark.slow
def test_training_report_records_validation_metrics(tiny_yolo_weights):
    report = json.loads((tiny_yolo_weights.parent / "detector.json").read_text())
    assert report["class_names"] == ["character"] and report["image_size"] == 160
    assert report["metrics"]["map50"] > 0.7, report["metrics"]
    assert report["dataset"]["train_images"] == 96 and report["config"]["preset"] == "tiny"


# --------------------------------------------------------------------------------------------- dataset


def test_synthetic_dataset_labels_are_the_scene_boxes(tmp_path):
    cfg = DetectorTrainingConfig(n_train=6, n_val=2, seed=4)
    data_yaml, counts = build_dataset(cfg, tmp_path / "ds")
    spec = OmegaConf.load(data_yaml)
    assert spec.train == "images/train" and dict(spec.names) == {0: "character"} and Path(spec.path).is_dir()
    assert counts["train_images"] == 6 and counts["val_images"] == 2
    labels = sorted((tmp_path / "ds" / "labels" / "train").glob("*.txt"))
    n_boxes = sum(len(p.read_text().split("\n")) - 1 for p in labels)
    assert n_boxes == counts["synthetic_train_boxes"]
    for p in labels:
        with Image.open(tmp_path / "ds" / "images" / "train" / f"{p.stem}.jpg") as img:  # every label has its image
            width, height = img.size
        for line in p.read_text().splitlines():
            cls, cx, cy, w, h = line.split()
            assert cls == "0" and all(0.0 <= float(v) <= 1.0 for v in (cx, cy, w, h))
            assert float(w) * width >= 4 and float(h) * height >= 4  # a figure, not a speck
    assert yolo_label_line(Box(10, 20, 30, 60), 100, 200) == "0 0.200000 0.200000 0.200000 0.200000"
    assert yolo_label_line((-10, 0, 50, 100), 100, 100) == "0 0.250000 0.500000 0.500000 1.000000"  # clipped


@pytest.mark.realdata
def test_animeface_labels_real_images(shared_data, tmp_path):
    cfg = DetectorTrainingConfig(source="animeface", real_dir=str(shared_data / "newgame_faces"), max_real_images=12,
                                 real_val_fraction=0.25, face_expand=0.0)
    _, counts = build_dataset(cfg, tmp_path / "ds")
    assert counts["real_images"] >= 8 and counts["real_faces"] >= counts["real_images"]
    assert counts["real_images"] + counts["real_skipped"] == 12
    line = next((tmp_path / "ds" / "labels" / "train").glob("*.txt")).read_text().splitlines()[0]
    assert float(line.split()[3]) > 0.3  # a face fills a good part of a 96 px face crop


def test_bad_training_options_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="source='web' is unknown"):
        build_dataset(DetectorTrainingConfig(source="web"), tmp_path / "a")
    with pytest.raises(ConfigError, match="needs real_dir"):
        build_dataset(DetectorTrainingConfig(source="animeface"), tmp_path / "b")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images found"):
        build_dataset(DetectorTrainingConfig(source="animeface", real_dir=str(tmp_path / "empty")), tmp_path / "c")
    with pytest.raises(ConfigError, match="epochs"):
        parse_overrides(["epochs=many"])
    with pytest.raises(ConfigError, match="preset='huge' is unknown"):
        parse_overrides(["preset=huge"])
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["--epochs", "3"])
    cfg = parse_overrides(["preset=tiny", "epochs=3", "+extra.hsv_h=0.0"])
    assert (cfg.epochs, cfg.image_size, cfg.width, cfg.extra) == (3, 160, 0.125, {"hsv_h": 0.0})


# --------------------------------------------------------------------------------------------- entry point


_NO_NETWORK = textwrap.dedent(
    """
    import socket, sys
    attempts = []
    def refuse(*args, **kwargs):
        attempts.append(repr(args)[:120])
        raise OSError("network disabled in this test")
    socket.socket.connect = refuse
    socket.getaddrinfo = refuse
    socket.create_connection = refuse
    from anime_role_detect.cli.detector import main
    try:
        main(sys.argv[1:])
    finally:
        print("NETWORK_ATTEMPTS", len(attempts), attempts[:3])
    """
)


@pytest.mark.slow
def test_cli_trains_a_detector_offline_without_touching_the_network(tmp_path):
    out = tmp_path / "det"
    env = {k: v for k, v in os.environ.items() if k != "YOLO_OFFLINE"}  # our code must switch offline mode on itself
    args = [f"out={out}", "n_train=8", "n_val=2", "epochs=1", "image_size=64", "batch=4", "width=0.125", "val_each_epoch=false"]
    proc = subprocess.run([sys.executable, "-c", _NO_NETWORK, *args], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "NETWORK_ATTEMPTS 0 []" in proc.stdout, proc.stdout[-2000:]
    assert "use it: detector=yolo detector.weights=" in proc.stdout
    assert (out / "detector.pt").is_file() and json.loads((out / "detector.json").read_text())["config"]["epochs"] == 1
    assert YoloDetector(weights=out / "detector.pt", imgsz=64).detect([Image.new("RGB", (64, 64))]) is not None


def test_cli_bad_option_exits_2_with_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "anime_role_detect.cli.detector", "epochz=3"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert proc.returncode == 2 and proc.stderr.startswith("error: bad option") and proc.stderr.count("\n") == 1, proc.stderr
    assert "epochz" in proc.stderr and "epochs" in proc.stderr
