"""The library's front door: `from anime_role_detect import Recognizer, RecognizerConfig, Answer` works
without Hydra, its settings are typed, and unknown keys are a one-line error."""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap

import pytest
from omegaconf import OmegaConf

from anime_role_detect import Answer, Recognizer, RecognizerConfig
from anime_role_detect.confutil import CONFIG_DIR
from anime_role_detect.errors import ConfigError

EMBEDDER = {"kind": "timm", "model_name": "efficientnet_lite0_offline", "pretrained": True, "image_size": 64}  # real weights: same in every process


@pytest.fixture(scope="module")
def gallery_dir(tmp_path_factory):
    from anime_role_detect.data.synthetic import make_characters, render_character
    from anime_role_detect.recognition.embedder import build_embedder
    from anime_role_detect.recognition.gallery import Gallery

    rng = random.Random(0)
    specs = make_characters(3, seed=0, twin_fraction=0.0)
    items = [(s.name, s.series, render_character(s, rng, 64)[0], f"{s.name}/{k}") for s in specs for k in range(4)]
    d = tmp_path_factory.mktemp("gallery")
    Gallery.build(items, build_embedder(EMBEDDER), embedder_config=EMBEDDER).save(d)
    render_character(specs[1], random.Random(7), 64)[0].save(d.parent / "probe.png")
    return d, specs[1].name


def test_readme_example_runs_without_hydra(gallery_dir):
    folder, truth = gallery_dir
    code = textwrap.dedent(f"""
        import sys
        from anime_role_detect import Recognizer, RecognizerConfig
        rec = Recognizer.from_config(RecognizerConfig(gallery={str(folder)!r}, rerank=False))
        answer = rec.recognize_bytes(open({str(folder.parent / "probe.png")!r}, "rb").read(), "probe.png")
        print(answer.role, answer.similarity, answer.boxes)
        assert "hydra" not in sys.modules, "the library front door must not need Hydra"
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    role, sim, _ = proc.stdout.strip().split(" ", 2)
    assert role == truth and 0.0 < float(sim) <= 1.0


def test_answer_type_and_typed_config(gallery_dir):
    folder, _ = gallery_dir
    rec = Recognizer.from_config({"gallery": str(folder), "rerank": False, "image": "ignored: an entry-point key"})
    assert isinstance(rec.config, RecognizerConfig) and rec.config.gallery == str(folder)
    from PIL import Image

    ans = rec.recognize(Image.open(folder.parent / "probe.png").convert("RGB"), "p.png")
    assert isinstance(ans, Answer) and ans.filename == "p.png"


@pytest.mark.parametrize("bad, needle", [
    ({"mdoe": "fusion"}, "unknown key(s) ['mdoe']"),
    ({"openset": {"enabeld": False}}, "openset: unknown key(s) ['enabeld']"),
    ({"mode": "clipp"}, "mode='clipp'"),
    ({"fusion": {"gallery_weight": 2}}, "gallery_weight=2"),
])
def test_bad_recognizer_config_is_a_one_line_error(bad, needle):
    with pytest.raises(ConfigError) as err:
        RecognizerConfig.from_mapping(bad)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_infer_yaml_defaults_are_the_dataclass_defaults():
    """conf/infer.yaml lists the recognizer options for the command line; its values must be the library's defaults."""
    infer = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "infer.yaml"))
    defaults = RecognizerConfig().to_dict()
    shared = {k: v for k, v in infer.items() if k in defaults and k not in ("registry_dir", "embedder", "tagger", "detector")}
    assert shared and {k: defaults[k] for k in shared} == shared
