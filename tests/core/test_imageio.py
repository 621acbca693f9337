"""Safe image decoding: what users upload (good and bad) gets a picture or a clear error."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from anime_role_detect.errors import ImageError
from anime_role_detect.imageio import ImageLimits, decode_image, load_image, sniff


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
