"""Big uploads through the real `Recognizer`: a JPEG far larger than any model reads decodes drafted (recognition's
`imageio.RECOGNITION_LIMITS`), names who the full decode names, and answers in the upload's own pixels."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from anime_role_detect.imageio import decode_image
from anime_role_detect.recognition.pipeline import Recognizer

SIZE = (3200, 2400)  # drafted at half scale: 1600 x 1200


def _big_jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").resize(SIZE, Image.BICUBIC).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def _recognizer(version_dir, **cfg) -> Recognizer:
    return Recognizer.from_version(version_dir, {"cache_size": 0, "rerank": False, "openset": {"enabled": False}, **cfg})


@pytest.mark.parametrize("detector, box", [
    (None, [0.0, 0.0, 3200.0, 2400.0]),  # the whole picture
    ({"kind": "region"}, [640.0, 0.0, 2560.0, 1200.0]),  # the top centre: 60% of the width, the upper half
])
def test_a_big_jpeg_names_the_same_character_with_boxes_in_its_own_pixels(version_dir, test_images, detector, box):
    drafted, full = _recognizer(version_dir, detector=detector), _recognizer(version_dir, detector=detector, limits={"draft_side": 0})
    assert drafted.limits.draft_side > 0 and decode_image(_big_jpeg(test_images[0][0]), limits=drafted.limits).size == (1600, 1200)
    picks = test_images[::8]  # one picture of each character
    same = 0
    for img, _ in picks:
        data = _big_jpeg(img)
        a, b = drafted.recognize_bytes(data, "big.jpg"), full.recognize_bytes(data, "big.jpg")
        assert (a.width, a.height) == (b.width, b.height) == SIZE
        assert a.boxes == b.boxes == [box]
        same += a.role == b.role
    assert same == len(picks), f"the drafted decode named {len(picks) - same} of {len(picks)} pictures otherwise"


def test_unknown_limits_keys_are_one_line_errors(version_dir):
    from anime_role_detect.errors import ConfigError

    with pytest.raises(ConfigError, match="limits: unknown key.*draft_sid.*choose from"):
        _ = _recognizer(version_dir, limits={"draft_sid": 512}).limits
