"""ONNX taggers through real onnxruntime: tiny WD14-style (NHWC, BGR, 0-255) and DeepDanbooru-style (RGB, 0-1) exports."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from anime_role_detect.errors import ConfigError, WeightsError
from anime_role_detect.recognition.tagger import build_tagger

SIZE = 32


class ChannelTagger(torch.nn.Module):
    """Tag k fires when channel k (in the model's own channel order) is bright; output 3 = rating (always high)."""

    def __init__(self, nhwc: bool, scale: float) -> None:
        super().__init__()
        self.nhwc, self.scale = nhwc, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean(dim=(1, 2)) if self.nhwc else x.mean(dim=(2, 3))
        p = torch.sigmoid((m / self.scale - 0.5) * 20)
        return torch.cat([p, torch.ones_like(p[:, :1])], dim=1)


def export(tmp_path, nhwc: bool, scale: float, dynamic_size: bool = False) -> str:
    path = tmp_path / "model.onnx"
    x = torch.zeros((1, SIZE, SIZE, 3) if nhwc else (1, 3, SIZE, SIZE))
    axes = {0: "batch"}
    if dynamic_size:
        axes.update({1: "h", 2: "w"} if nhwc else {2: "h", 3: "w"})
    torch.onnx.export(ChannelTagger(nhwc, scale), x, str(path), input_names=["input"], output_names=["tags"],
                      dynamic_axes={"input": axes}, dynamo=False)
    return str(path)


def wd14_csv(tmp_path) -> str:
    p = tmp_path / "selected_tags.csv"
    p.write_text("tag_id,name,category,count\n1,first_channel,0,10\n2,second_channel,0,10\n3,third_channel,4,10\n4,general,9,10\n")
    return str(p)


RED = Image.new("RGB", (40, 20), (255, 0, 0))
BLUE = Image.new("RGB", (20, 40), (0, 0, 255))


def test_wd14_style_nhwc_bgr_export(tmp_path):
    tagger = build_tagger({"kind": "onnx", "model_path": export(tmp_path, nhwc=True, scale=255.0), "tags_path": wd14_csv(tmp_path),
                           "channel_order": "bgr", "pixel_scale": 255.0, "general_threshold": 0.2, "character_threshold": 0.2,
                           "pad_color": 0})
    assert tagger.input_size == SIZE and tagger.nhwc
    probs = tagger.predict([RED, BLUE, RED])
    assert probs.shape == (3, 4)
    # BGR: a red image lights the model's third channel (character tag), a blue one its first
    red_tags = [t.tag for t in tagger.tag([RED])[0]]
    blue_tags = [t.tag for t in tagger.tag([BLUE])[0]]
    assert red_tags == ["third_channel"] and blue_tags == ["first_channel"]
    assert "general" not in red_tags  # rating tags are never reported


def test_deepdanbooru_style_nchw_rgb_export_with_txt_tags(tmp_path):
    tags = tmp_path / "tags.txt"
    tags.write_text("red_thing\ngreen_thing\nblue_thing\nrating_tag\n")
    tagger = build_tagger({"kind": "onnx", "model_path": export(tmp_path, nhwc=False, scale=1.0), "tags_path": str(tags),
                           "channel_order": "rgb", "pixel_scale": 1.0, "general_threshold": 0.2, "pad_color": 0})
    assert not tagger.nhwc
    red, blue = ({t.tag for t in tags} for tags in tagger.tag([RED, BLUE]))
    assert "red_thing" in red and "blue_thing" not in red
    assert "blue_thing" in blue and "red_thing" not in blue


def test_dynamic_input_size_needs_config(tmp_path):
    model = export(tmp_path, nhwc=True, scale=255.0, dynamic_size=True)
    with pytest.raises(ConfigError, match="tagger.input_size"):
        build_tagger({"kind": "onnx", "model_path": model, "tags_path": wd14_csv(tmp_path)})
    t = build_tagger({"kind": "onnx", "model_path": model, "tags_path": wd14_csv(tmp_path), "input_size": 24})
    assert t.input_size == 24 and t.predict([RED]).shape == (1, 4)


def test_missing_or_mismatched_tagger_files_are_clear_errors(tmp_path):
    model = export(tmp_path, nhwc=True, scale=255.0)
    with pytest.raises(WeightsError, match="nowhere.onnx not found"):
        build_tagger({"kind": "onnx", "model_path": str(tmp_path / "nowhere.onnx"), "tags_path": wd14_csv(tmp_path)})
    with pytest.raises(WeightsError, match="tag list .* not found"):
        build_tagger({"kind": "onnx", "model_path": model, "tags_path": str(tmp_path / "none.csv")})
    short = tmp_path / "short.csv"
    short.write_text("tag_id,name,category,count\n1,a,0,1\n")
    with pytest.raises(WeightsError, match="predicts 4 tags but .* lists 1"):
        build_tagger({"kind": "onnx", "model_path": model, "tags_path": str(short)})
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not onnx at all")
    with pytest.raises(WeightsError, match="could not be loaded"):
        build_tagger({"kind": "onnx", "model_path": str(junk), "tags_path": wd14_csv(tmp_path)})
    with pytest.raises(ConfigError, match="tagger.kind"):
        build_tagger({"kind": "magic"})
    assert build_tagger({"kind": "none"}) is None


def test_relative_paths_resolve_against_the_version_folder(tmp_path):
    export(tmp_path, nhwc=True, scale=255.0)
    wd14_csv(tmp_path)
    t = build_tagger({"kind": "onnx", "model_path": "model.onnx", "tags_path": "selected_tags.csv"}, base_dir=tmp_path)
    assert np.all(np.isfinite(t.predict([RED])))


def test_a_local_model_finds_its_tag_list_next_to_it(tmp_path):
    model = export(tmp_path, nhwc=True, scale=255.0)
    wd14_csv(tmp_path)  # selected_tags.csv beside model.onnx, as a WD download unpacks
    t = build_tagger({"kind": "onnx", "model_path": model, "repo_id": "SmilingWolf/wd-vit-tagger-v3"})  # local wins over the repo
    assert t.tag_names[-1] == "general" and t.predict([RED]).shape == (1, 4)
    dd = tmp_path / "dd"
    dd.mkdir()
    (dd / "tags.txt").write_text("a\nb\nc\nd\n")
    t = build_tagger({"kind": "onnx", "model_path": export(dd, nhwc=True, scale=1.0), "tags_file": "tags.txt", "channel_order": "rgb"})
    assert t.tag_names == ["a", "b", "c", "d"]
