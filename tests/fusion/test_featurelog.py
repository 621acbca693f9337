"""Feature log: round trip, feedback join, torn lines, rotation, retention, privacy default, concurrent reading."""

from __future__ import annotations

import io
import json
import os
import threading
import time

import numpy as np
import pytest
from PIL import Image

from anime_role_detect.errors import ConfigError
from anime_role_detect.fusion.featurelog import FeatureLog, FeedbackError, LogPolicy

from .helpers import make_answer, unit_rows


def _png(color=(200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buf, "PNG")
    return buf.getvalue()


def test_append_read_round_trip_keeps_answer_and_exact_embeddings(tmp_path):
    log = FeatureLog(tmp_path / "fl", embedder_id="timm:test")
    ids = []
    for i in range(5):
        emb = unit_rows(i, 2, 32)
        ids.append(log.append(make_answer(f"char_{i:02d}", 0.8, n_det=2, sha=f"{i:064x}"), emb))
    log.close()
    recs = list(FeatureLog(tmp_path / "fl").read())
    assert [r.id for r in recs] == ids
    for i, r in enumerate(recs):
        np.testing.assert_array_equal(r.embeddings, unit_rows(i, 2, 32))
        assert r.embedder == "timm:test" and r.data["role"] == f"char_{i:02d}"
        assert len(r.detections) == 2 and r.detections[0]["topk"][0]["role"] == f"char_{i:02d}"
        assert r.data["image"] is None  # images are not stored by default (privacy)
        assert r.data["boxes"] == [[0, 0, 10, 10], [0, 0, 11, 11]]


def test_embedding_rows_must_match_detections(tmp_path):
    log = FeatureLog(tmp_path)
    with pytest.raises(ValueError, match="one row per detection"):
        log.append(make_answer(n_det=2), unit_rows(0, 3, 8))


def test_feedback_joined_by_record_id_and_by_image_hash(tmp_path):
    log = FeatureLog(tmp_path, embedder_id="e")
    a = log.append(make_answer("char_00", sha="a" * 64), unit_rows(0, 1, 8))
    b = log.append(make_answer("char_01", sha="b" * 64, n_det=2), unit_rows(1, 2, 8))
    c = log.append(make_answer("char_02", sha="c" * 64), unit_rows(2, 1, 8))
    log.feedback(a, confirmed=True)
    log.feedback("b" * 64, correct_role="char_05", detection=1)  # by image hash, second detection
    log.feedback(c, correct_role="char_03")
    log.feedback(c, correct_role="char_04")  # the latest verdict wins
    with pytest.raises(FeedbackError, match="no logged classification"):
        log.feedback("r-does-not-exist", confirmed=True)
    with pytest.raises(FeedbackError, match="correct_role"):
        log.feedback(a)
    # a fresh process (new FeatureLog object) finds records it did not write
    other = FeatureLog(tmp_path)
    other.feedback(a, confirmed=True)
    other.feedback("c" * 64, correct_role="char_09", detection=0)  # by hash, found by scanning
    with pytest.raises(FeedbackError):
        other.feedback("e" * 64, confirmed=True)
    other.feedback(c, correct_role="char_04")  # record-id feedback beats image-hash feedback
    recs = {r.id: r for r in FeatureLog(tmp_path).read()}
    assert recs[a].feedback[0].confirmed and recs[a].feedback[0].role == "char_00"
    assert set(recs[b].feedback) == {1} and recs[b].feedback[1].role == "char_05" and not recs[b].feedback[1].confirmed
    assert recs[c].feedback[0].role == "char_04"


def test_torn_last_line_and_garbage_are_skipped_not_fatal(tmp_path):
    log = FeatureLog(tmp_path, embedder_id="e")
    ids = [log.append(make_answer(sha=f"{i:064x}"), unit_rows(i, 1, 8)) for i in range(3)]
    seg = log.segment_paths()[0]
    with open(seg, "ab") as fh:  # what a kill in the middle of a write leaves behind
        fh.write(b'{"v":1,"id":"r-torn","emb":{"fi')
    assert [r.id for r in FeatureLog(tmp_path).read()] == ids
    # embedding bytes that do not match their CRC (bit rot) drop only that record
    with open(seg.with_suffix(".f32"), "r+b") as fh:
        fh.seek(4)
        fh.write(b"\x00\x00\x80\x7f")
    reader = FeatureLog(tmp_path)
    assert [r.id for r in reader.read()] == ids[1:] and reader.corrupt == 1


def test_rotation_creates_segments_and_reader_sees_all(tmp_path):
    log = FeatureLog(tmp_path, LogPolicy(max_segment_bytes=8192), embedder_id="e")
    ids = [log.append(make_answer(sha=f"{i:064x}"), unit_rows(i, 1, 256)) for i in range(20)]
    segs = log.segment_paths()
    assert len(segs) >= 4
    for s in segs[:-1]:  # a segment closes once it reaches the limit (one record past it at most)
        assert s.stat().st_size + s.with_suffix(".f32").stat().st_size < 8192 + 4096
    assert [r.id for r in FeatureLog(tmp_path).read()] == ids


def test_retention_deletes_old_segments_images_and_feedback(tmp_path):
    pol = LogPolicy(max_segment_bytes=4096, retention_days=14, store_images=True)
    log = FeatureLog(tmp_path, pol, embedder_id="e")
    old = [log.append(make_answer(sha=""), unit_rows(i, 1, 512), image_bytes=_png((i, 0, 0))) for i in range(3)]
    log.feedback(old[0], confirmed=True)
    assert len(list((tmp_path / "images").rglob("*.png"))) == 3
    log.close()  # retention works per closed segment (the active one is never deleted)
    past = time.time() - 15 * 86400
    for p in list((tmp_path / "segments").iterdir()) + list((tmp_path / "images").rglob("*.png")):
        os.utime(p, (past, past))
    events = [json.loads(line) for line in (tmp_path / "feedback.jsonl").read_text().splitlines()]
    events[0]["ts"] = past
    (tmp_path / "feedback.jsonl").write_text(json.dumps(events[0]) + "\n")
    log = FeatureLog(tmp_path, pol, embedder_id="e")
    fresh = log.append(make_answer(sha=""), unit_rows(9, 1, 512))  # opening a segment applies retention
    left = [r.id for r in FeatureLog(tmp_path).read()]
    assert fresh in left and not set(old) & set(left)
    assert not list((tmp_path / "images").rglob("*.png"))
    assert FeatureLog(tmp_path).read_feedback() == []
    assert log.apply_retention() == 0  # nothing old is left


def test_store_images_on_keeps_one_copy_per_content(tmp_path):
    log = FeatureLog(tmp_path, {"store_images": True}, embedder_id="e")
    data = _png()
    r1 = log.append(make_answer(sha=""), unit_rows(0, 1, 8), image_bytes=data)
    log.append(make_answer(sha=""), unit_rows(1, 1, 8), image_bytes=data)
    files = list((tmp_path / "images").rglob("*"))
    assert [p.suffix for p in files if p.is_file()] == [".png"]
    rec = next(iter(FeatureLog(tmp_path).read()))
    assert rec.id == r1 and FeatureLog(tmp_path).image_path(rec).read_bytes() == data


def test_bad_policy_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="unknown key"):
        FeatureLog(tmp_path, {"max_segmnt_bytes": 10})
    with pytest.raises(ConfigError, match="max_segment_bytes"):
        FeatureLog(tmp_path, {"max_segment_bytes": 10})


def test_reader_consumes_while_writer_appends(tmp_path):
    """A reader polling during writes sees only complete records, and eventually all of them."""
    log = FeatureLog(tmp_path, LogPolicy(max_segment_bytes=16384), embedder_id="e")
    written: list[str] = []
    done = threading.Event()

    def writer() -> None:
        for i in range(150):
            written.append(log.append(make_answer(sha=f"{i:064x}"), unit_rows(i, 1, 64)))
        done.set()

    t = threading.Thread(target=writer)
    t.start()
    seen_counts = []
    while not done.is_set():
        recs = list(FeatureLog(tmp_path).read())
        for r in recs:
            i = int(r.image_sha256, 16)
            np.testing.assert_array_equal(r.embeddings, unit_rows(i, 1, 64))
        seen_counts.append(len(recs))
    t.join()
    assert [r.id for r in FeatureLog(tmp_path).read()] == written
    assert seen_counts == sorted(seen_counts)  # append-only: never fewer records than before


def test_sink_matches_recognizer_sink_signature(tmp_path):
    """`FeatureLogSink` is an `AnswerSink`: (answer, embeddings, image_bytes) appends one record; unbound, the log's embedder id."""
    from anime_role_detect.fusion.featurelog import FeatureLogSink
    from anime_role_detect.recognition.sinks import AnswerSink

    sink = FeatureLogSink(FeatureLog(tmp_path, embedder_id="e"))
    assert isinstance(sink, AnswerSink)
    sink(make_answer(sha="d" * 64), unit_rows(3, 1, 16), None)
    sink.close()
    (rec,) = FeatureLog(tmp_path).read()
    assert rec.image_sha256 == "d" * 64 and rec.embeddings.shape == (1, 16) and rec.embedder == "e"
