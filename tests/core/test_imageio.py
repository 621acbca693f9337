"""Safe image decoding: what users upload (good and bad) gets a picture or a clear error."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from anime_role_detect.errors import ImageError
from anime_role_detect.imageio import (
    RECOGNITION_LIMITS,
    ImageLimits,
    decode_image,
    load_image,
    original_size,
    scale_to_original,
    sniff,
)


def _png(size=(32, 24), mode="RGB", color=(10, 200, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buf, format="JPEG")
    return buf.getvalue()


def test_png_and_jpeg_decode_to_rgb():
    img = decode_image(_png(mode="RGBA", color=(0, 0, 0, 0)), "a.png")
    assert img.mode == "RGB" and img.size == (32, 24)
    assert img.getpixel((0, 0)) == (255, 255, 255)  # transparent -> white, not black
    assert decode_image(_jpeg(), "b.jpg").size == (64, 48)


def test_type_is_sniffed_from_content_not_name():
    assert sniff(_jpeg()) == ("image", "jpeg")
    assert sniff(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 16) == ("video", "mp4")
    assert sniff(b"hello world, not an image") is None
    with pytest.raises(ImageError, match=r"notes\.jpg: not an image"):
        decode_image(b"just some text pretending to be a jpeg", "notes.jpg")


def test_truncated_jpeg_is_reported_with_file_name():
    data = _jpeg((256, 256))
    with pytest.raises(ImageError, match=r"cut\.jpg: .*corrupt or truncated"):
        decode_image(data[: len(data) // 3], "cut.jpg")


def test_tiny_and_empty_images_are_rejected():
    with pytest.raises(ImageError, match=r"1x1 pixels is too small"):
        decode_image(_png((1, 1)), "dot.png")
    with pytest.raises(ImageError, match="empty"):
        decode_image(b"", "empty.png")


def test_decompression_bomb_is_refused_before_decoding():
    data = _png((3000, 3000))
    with pytest.raises(ImageError, match="decompression-bomb guard"):
        decode_image(data, "bomb.png", ImageLimits(max_pixels=1_000_000))


def test_byte_limit_and_missing_file(tmp_path):
    with pytest.raises(ImageError, match="MB limit"):
        decode_image(_png((64, 64)), "big.png", ImageLimits(max_bytes=10))
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "nope.png")


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 CW on display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    assert decode_image(buf.getvalue(), "rot.jpg").size == (20, 40)


def test_corrupt_image_is_an_image_error_even_after_ultralytics_patched_pil(monkeypatch):
    """ultralytics wraps PIL's Image.open process-wide (it tries to pip-install a HEIF plugin on
    unknown files); our decoder must still report a corrupt upload as ImageError, offline."""
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    monkeypatch.setenv("YOLO_AUTOINSTALL", "False")
    import ultralytics.utils.patches  # noqa: F401 - applies the patch

    assert Image.open is not ultralytics.utils.patches._image_open
    bad = b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20
    with pytest.raises(ImageError, match=r"broken\.png: .*corrupt"):
        decode_image(bad, "broken.png")


@pytest.mark.parametrize("size, draft_side, decoded", [
    ((4000, 3000), 768, (2000, 1500)),  # half: a quarter would leave the shorter side 750 < 768
    ((6000, 4000), 768, (1500, 1000)),  # a quarter
    ((6400, 6200), 768, (800, 775)),  # an eighth, the smallest DCT scale
    ((3000, 1535), 768, (3000, 1535)),  # shorter side under 2 x 768: every pixel
    ((4000, 3000), 0, (4000, 3000)),  # off
])
def test_a_big_jpeg_decodes_drafted_and_remembers_its_size(size, draft_side, decoded):
    img = decode_image(_jpeg(size), "big.jpg", ImageLimits(draft_side=draft_side))
    assert img.size == decoded and img.mode == "RGB"
    assert original_size(img) == size
    assert scale_to_original(img) == pytest.approx((size[0] / decoded[0], size[1] / decoded[1]))


def test_a_drafted_picture_turned_by_exif_keeps_its_turned_size():
    """EXIF orientation 6 (a quarter turn): the full size is reported as the picture is shown, not as stored."""
    im = Image.new("RGB", (4000, 2000), (10, 20, 30))
    exif = im.getexif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif.tobytes())
    img = decode_image(buf.getvalue(), "phone.jpg", RECOGNITION_LIMITS)
    assert img.size == (1000, 2000) and original_size(img) == (2000, 4000) == decode_image(buf.getvalue()).size


def test_drafting_is_for_jpeg_only_and_the_bomb_guard_reads_the_full_size():
    big_png = _png(size=(4000, 3000))
    assert decode_image(big_png, "big.png", RECOGNITION_LIMITS).size == (4000, 3000)  # PNG has no reduced decode
    with pytest.raises(ImageError, match="big.jpg"):
        decode_image(_jpeg((4000, 3000)), "big.jpg", ImageLimits(max_pixels=10_000_000, draft_side=768))
