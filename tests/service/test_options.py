"""Fast checks of the service's shared request plumbing, without a server: the form fields every recognition
path shares (documented in OpenAPI), and the one image decode with its 413 mapping."""

from __future__ import annotations

import struct
import zlib

import pytest
from PIL import Image

from .conftest import png_bytes

RECOGNITION_FIELDS = ("use_model", "use_deepdanbooru", "mode", "rerank")


@pytest.mark.parametrize("fields, want", [
    ({}, (None, None)),
    ({"use_model": True}, ("model", None)),
    ({"use_deepdanbooru": True}, ("fusion", None)),
    ({"use_model": True, "use_deepdanbooru": True}, ("fusion", None)),
    ({"mode": "clip", "use_model": True, "use_deepdanbooru": True, "rerank": False}, ("clip", False)),
    ({"rerank": True}, (None, True)),
])
def test_one_function_turns_the_form_fields_into_mode_and_rerank(fields, want):
    from anime_role_detect.serve.routes.classify import recognition_options

    opts = recognition_options(**fields)
    assert (opts.mode, opts.rerank) == want


def test_openapi_documents_the_same_fields_on_single_and_batch_recognition():
    from anime_role_detect.serve import create_app

    spec = create_app({"feature_log": {"enabled": False}, "workflow": {"enabled": False}}).openapi()
    for path in ("/api/classify", "/api/classify/batch"):
        ref = spec["paths"][path]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"]
        props = spec["components"]["schemas"][ref.rsplit("/", 1)[-1]]["properties"]
        for name in RECOGNITION_FIELDS:
            assert name in props, f"{path} does not take {name}"
            assert props[name].get("description"), f"{path}: {name} is not documented"
    version = spec["components"]["schemas"]["RecognizerFacts"]["properties"]
    for key in ("version", "version_dir", "mode", "modes", "rerank", "embedder", "gallery_rows", "characters", "classifier",
                "tagger", "calibration", "device"):
        assert version[key].get("description"), f"/api/version recognizer.{key} is not documented"


def test_openapi_documents_every_operation_parameter_and_field():
    """What FastAPI's /docs shows a client: each endpoint says what it does, each parameter and each field of every
    request and answer model what it means (FastAPI's own validation-error models aside)."""
    from anime_role_detect.serve import create_app

    spec = create_app({"feature_log": {"enabled": False}, "workflow": {"enabled": True}}).openapi()
    undocumented = []
    for path, operations in spec["paths"].items():
        for method, op in operations.items():
            if not (op.get("summary") and op.get("description")):
                undocumented.append(f"{method.upper()} {path}")
            undocumented += [f"{method.upper()} {path} ({p['in']}) {p['name']}" for p in op.get("parameters", [])
                             if not (p.get("description") or p.get("schema", {}).get("description"))]
    for name, schema in spec["components"]["schemas"].items():
        if name not in ("HTTPValidationError", "ValidationError"):
            undocumented += [f"{name}.{field}" for field, f in schema.get("properties", {}).items() if not f.get("description")]
    assert sum(map(len, spec["paths"].values())) >= 13 and not undocumented, undocumented  # all 13 operations


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height but carries one row of data: what a decompression bomb looks like to a header reader."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("data", [
    png_bytes(Image.new("RGB", (2000, 2000), (255, 255, 255))),  # over the server's limit, under PIL's own
    png_header_only(20000, 20000),  # over PIL's own limit too: PIL refuses it at open time
], ids=["over-server-limit", "over-pil-limit"])
def test_decode_upload_refuses_too_many_pixels_as_image_too_large_413(data):
    from anime_role_detect.serve.errors import ImageTooLarge, status_for_user_error
    from anime_role_detect.serve.settings import Limits
    from anime_role_detect.serve.uploads import Upload, decode_upload

    up = Upload(filename="bomb.png", data=data, kind="image", fmt="png")
    with pytest.raises(ImageTooLarge) as info:
        decode_upload(up, Limits(max_pixels=1_000_000))
    assert "decompression-bomb" in str(info.value) and "bomb.png" in str(info.value)
    assert status_for_user_error(info.value) == 413
    assert info.value.detail == {"filename": "bomb.png", "limit_pixels": 1_000_000}


def test_decode_upload_decodes_within_the_limits():
    from anime_role_detect.serve.settings import Limits
    from anime_role_detect.serve.uploads import Upload, decode_upload

    img = decode_upload(Upload("a.png", png_bytes(Image.new("RGBA", (64, 48), (10, 20, 30, 0))), "image", "png"), Limits())
    assert img.size == (64, 48) and img.mode == "RGB"
