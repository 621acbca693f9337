"""The real entry points as subprocesses: `infer.py` on a file and a folder, and ``ard-gallery`` add/list/remove."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import PROJECT_ROOT

pytestmark = pytest.mark.slow


def run(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "YOLO_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, test_images) -> Path:
    d = tmp_path_factory.mktemp("inputs")
    for i, (im, name) in enumerate(test_images[::4]):
        im.save(d / f"{i:02d}_{name}.png")
    (d / "zz_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return d


def test_infer_py_on_one_file_prints_a_json_answer(version_dir, folder, tmp_path):
    img = sorted(folder.glob("*.png"))[0]
    p = run([str(PROJECT_ROOT / "infer.py"), f"image={img}", f"gallery={version_dir}", "mode=fusion", "rerank=true",
             f"paths.root_dir={tmp_path}", "log.console_level=WARNING"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    ans = json.loads(p.stdout.strip().splitlines()[-1])
    assert ans["filename"] == str(img) and ans["mode"] == "fusion"
    assert {"role", "similarity", "boxes", "detections", "timings_ms", "unknown"} <= set(ans)
    assert ans["detections"][0]["topk"] and ans["timings_ms"]["total"] > 0


def test_infer_py_on_a_folder_writes_csv_and_reports_bad_files(version_dir, folder, tmp_path):
    out = tmp_path / "answers.csv"
    p = run([str(PROJECT_ROOT / "infer.py"), f"image={folder}", f"gallery={version_dir}", "output.format=csv",
             f"output.path={out}", f"paths.root_dir={tmp_path}", "batch_size=4"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    # a line per batch goes to the inference log, not the console, where it would break up the progress bar
    assert "recognized 4 image(s)" not in p.stderr and "recognising" in p.stderr
    assert "recognized 4 image(s)" in (tmp_path / "logs" / "inference.log").read_text()
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert len(rows) == len(list(folder.iterdir()))
    bad = [r for r in rows if r["error"]]
    assert len(bad) == 1 and "zz_broken.jpg" in bad[0]["filename"] and "truncated" in bad[0]["error"]
    good = [r for r in rows if not r["error"]]
    hits = [Path(r["filename"]).stem.split("_", 1)[1] == r["role"] for r in good]
    assert sum(hits) >= len(hits) / 2
    assert "1 of" in p.stderr  # the warning names how many files failed
    # every CLI classification is in the feature log with its embeddings (log fusion reads it)
    from anime_role_detect.fusion.featurelog import FeatureLog

    logged = list(FeatureLog(tmp_path / "outputs" / "featurelog").read())
    assert sorted(Path(r.data["filename"]).name for r in logged) == sorted(Path(r["filename"]).name for r in good)
    assert all(r.embeddings is not None and len(r.embeddings) == len(r.data["detections"]) >= 1 for r in logged)


def test_infer_py_bad_input_is_one_line_error(version_dir, folder, tmp_path):
    p = run([str(PROJECT_ROOT / "infer.py"), f"image={folder / 'zz_broken.jpg'}", f"gallery={version_dir}",
             f"paths.root_dir={tmp_path}"], cwd=tmp_path)
    assert p.returncode == 2
    assert p.stderr.strip().startswith("error: ") and "zz_broken.jpg" in p.stderr and "Traceback" not in p.stderr
    p = run([str(PROJECT_ROOT / "infer.py"), f"image={folder}", "version=latest", f"registry_dir={tmp_path / 'empty'}",
             f"paths.root_dir={tmp_path}"], cwd=tmp_path)
    assert p.returncode == 2 and "no live version" in p.stderr and "Traceback" not in p.stderr


def test_gallery_command_add_list_remove(version_dir, tmp_path, folder, capsys):
    """The command once in a process of its own, then its `main(argv)` in this one (the same code, 3 s less a call)."""
    from anime_role_detect.cli.gallery import main as gallery_main

    g = tmp_path / "g"
    shutil.copytree(version_dir, g)
    shots = tmp_path / "shots"
    shots.mkdir()
    for f in sorted(folder.glob("*.png"))[:3]:
        shutil.copy(f, shots / f.name)
    p = run(["-m", "anime_role_detect.cli.gallery", "add", "--gallery", str(g), "--character", "newbie", "--series", "s9",
             str(shots)], cwd=tmp_path)
    assert p.returncode == 0 and "enrolled newbie" in p.stdout, p.stderr[-1500:]

    def here(*argv: str) -> str:
        assert gallery_main(list(argv)) == 0
        return capsys.readouterr().out

    assert "newbie\ts9\t6" in here("list", "--gallery", str(g))  # each picture and its mirror image (enrol.mirror)
    assert "removed newbie: 6" in here("remove", "--gallery", str(g), "--character", "newbie")
    out = here("add", "--gallery", str(g), "--character", "newbie", "--no-mirror", str(shots))
    assert "enrolled newbie: 3 row(s) from 3 image(s)" in out
    assert "removed newbie: 3" in here("remove", "--gallery", str(g), "--character", "newbie")
    assert gallery_main(["remove", "--gallery", str(g), "--character", "newbie"]) == 2  # the command's exit status
    assert "not in the gallery" in capsys.readouterr().err


def test_infer_py_on_a_video_prints_appearances(version_dir, test_images, tmp_path):
    from .test_video import write_video

    by_name: dict[str, list] = {}
    for im, name in test_images:
        by_name.setdefault(name, []).append(im)
    x, y = sorted(n for n, ims in by_name.items() if len(ims) >= 4)[:2]
    frames = [im.convert("RGB").resize((96, 96)) for im in by_name[x][:4] * 2 + by_name[y][:4] * 2]
    clip = write_video(tmp_path / "clip.mp4", frames, fps=4)  # 4 s: x for 0-2 s, y for 2-4 s
    p = run([str(PROJECT_ROOT / "infer.py"), f"video={clip}", f"gallery={version_dir}", "mode=model", "sample_fps=2",
             f"paths.root_dir={tmp_path}", "log.console_level=WARNING"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    ans = json.loads(p.stdout.strip().splitlines()[-1])
    assert ans["filename"] == str(clip) and ans["mode"] == "model" and ans["duration_s"] > 3.5
    times = [float(f["filename"].rsplit("@t=", 1)[1].rstrip("s")) for f in ans["frames"]]
    assert len(times) == 8 and times == sorted(times) and times[-1] < 4.0
    right = sum(f["role"] == (x if t < 2.0 else y) for f, t in zip(ans["frames"], times))
    assert right >= 6, [(t, f["role"]) for f, t in zip(ans["frames"], times)]
    assert all(0.0 <= a["start_s"] <= a["end_s"] < 4.0 for a in ans["appearances"])
    assert {x, y} <= {a["role"] for a in ans["appearances"]}


# -- folder decoding in DataLoader workers (in-process: no trained version needed) -------------------------------------
@pytest.fixture(scope="module")
def lite0_gallery(tmp_path_factory) -> tuple[Path, Path]:
    """A Lite0 (offline ImageNet weights, 64 px) gallery of 3 drawn characters, and a folder of 14 inputs (one a 2400 x
    3000 JPEG, drafted when decoded) + 1 corrupt."""
    import numpy as np
    from PIL import Image, ImageDraw

    from anime_role_detect.recognition.embedder import build_embedder
    from anime_role_detect.recognition.gallery import Gallery

    base = tmp_path_factory.mktemp("lite0")
    rng = np.random.default_rng(7)
    colours = [tuple(int(x) for x in rng.integers(0, 255, 3)) for _ in range(3)]

    def draw(c: int, i: int) -> Image.Image:
        im = Image.new("RGB", (72 + i, 90), (255, 255, 255))
        ImageDraw.Draw(im).ellipse([8 + 6 * c, 8 + i, 60, 80], fill=colours[c])
        return im

    emb = build_embedder({"kind": "timm", "model_name": "efficientnet_lite0_offline", "pretrained": True, "image_size": 64})
    Gallery.build([(f"c{c}", "s", draw(c, i), f"c{c}/{i}") for c in range(3) for i in range(4)], emb).save(base / "g")
    inputs = base / "in"
    inputs.mkdir()
    for k in range(13):
        draw(k % 3, 5 + k).save(inputs / f"{k:02d}.png")
    (inputs / "06_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")  # mid-folder: the run must go on past it
    draw(1, 3).resize((2400, 3000), Image.BICUBIC).save(inputs / "13_big.jpg", quality=92)
    return base / "g", inputs


def test_folder_decoding_in_workers_gives_the_same_answers_in_order(lite0_gallery):
    from anime_role_detect.cli.infer import AnswerWriter, _run_folder, list_images
    from anime_role_detect.recognition.pipeline import Recognizer

    from .helpers import infer_cfg

    gallery, inputs = lite0_gallery
    files = list_images(inputs)
    outputs, received = {}, {}
    for workers in (0, 2):
        rec = Recognizer.from_config(infer_cfg([f"gallery={gallery}", "version=null", "tagger=none", "rerank=false", "cache_size=0"]))
        got: dict[str, bytes | None] = {}
        rec.add_sink(lambda answer, embeddings, data, got=got: got.__setitem__(answer.filename, data))
        buf = io.StringIO()
        failed = _run_folder(rec, files, AnswerWriter(buf, "jsonl"), batch_size=4, progress=False, workers=workers)
        assert failed == 1
        lines = [json.loads(line) for line in buf.getvalue().splitlines()]
        for line in lines:
            line.pop("timings_ms", None)
        outputs[workers], received[workers] = lines, got
    assert outputs[0] == outputs[2] and len(outputs[2]) == 15  # same answers, same order as decoding in this process
    big = next(x for x in outputs[2] if x["filename"].endswith("13_big.jpg"))  # decoded drafted in a worker (1200 x 1500)
    assert (big["width"], big["height"]) == (2400, 3000) and big["boxes"] == [[0.0, 0.0, 2400.0, 3000.0]] and big["role"] == "c1"
    assert sum("error" in line for line in outputs[2]) == 1 and "06_broken.jpg" in next(x for x in outputs[2] if "error" in x)["filename"]
    assert all(received[2][str(f)] == f.read_bytes() for f in files if f.suffix == ".png")  # sinks get the uploaded bytes


def test_run_infer_takes_decode_workers(lite0_gallery, tmp_path):
    from anime_role_detect.cli.infer import run_infer

    from .helpers import infer_cfg

    gallery, inputs = lite0_gallery
    buf = io.StringIO()
    cfg = infer_cfg([f"gallery={gallery}", "version=null", "tagger=none", "rerank=false", "feature_log.enabled=false",
                     "output.progress=false", f"image={inputs}", "decode_workers=1"])
    assert run_infer(cfg, stream=buf) == 1
    assert len(buf.getvalue().splitlines()) == 15


def test_a_folder_run_that_stopped_part_way_resumes_where_it_stopped(lite0_gallery, tmp_path, capsys):
    """An archive run killed mid-folder loses at most its torn last line: run again, it answers only the files left,
    in the same file; answers by another version, or a file this tool did not write, are refused, never replaced."""
    from anime_role_detect.cli.infer import run_infer
    from anime_role_detect.errors import ConfigError

    from .helpers import infer_cfg

    gallery, inputs = lite0_gallery
    out = tmp_path / "answers.jsonl"

    def infer(*extra: str) -> int:
        return run_infer(infer_cfg([f"gallery={gallery}", "version=null", "tagger=none", "rerank=false", "decode_workers=0",
                                    "feature_log.enabled=false", "output.progress=false", f"image={inputs}",
                                    f"output.path={out}", *extra]))

    def answers() -> list[dict]:
        lines = [json.loads(line) for line in out.read_text().splitlines()]
        for line in lines:
            line.pop("timings_ms", None)
        return lines

    assert infer() == 1
    full = answers()
    assert len(full) == 15
    text = out.read_text()
    cut = [i for i, ch in enumerate(text) if ch == "\n"][5] + 40  # six whole answers and part of the seventh
    out.write_text(text[:cut])
    capsys.readouterr()
    assert infer() == 0  # the unreadable file was answered (as an error line) before the stop
    assert "6 of 15 file(s) already answered" in capsys.readouterr().err
    assert answers() == full  # every file once, in order, the torn line replaced by its whole answer

    before = out.read_text()
    assert infer() == 0 and out.read_text() == before  # nothing left to answer

    out.write_text(re.sub(r'"version":"[^"]*"', '"version":"v-other"', before))
    with pytest.raises(ConfigError, match="answers by version v-other"):
        infer()
    for foreign in ("my notes, not answers\n", "my notes\nwithout an end", "one line without an end"):
        out.write_text(foreign)
        with pytest.raises(ConfigError, match="holds something other than this tool's jsonl answers"):
            infer()
        assert out.read_text() == foreign  # refused untouched: not even its last line is cut
    assert infer("output.resume=false") == 1 and answers() == full

    csv_out = tmp_path / "answers.csv"
    assert infer("output.format=csv", f"output.path={csv_out}") == 1
    rows = csv_out.read_text().splitlines()
    csv_out.write_text("\n".join(rows[:8]) + "\n")  # the header and 7 answers
    assert infer("output.format=csv", f"output.path={csv_out}") == 0
    assert csv_out.read_text().splitlines()[0] == rows[0] and len(csv_out.read_text().splitlines()) == len(rows) == 16
