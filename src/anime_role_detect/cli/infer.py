"""``python infer.py image=PATH`` / ``ard-infer``: resolve the input (image, folder, video), recognise in batches,
write JSON lines / CSV / JSON; every answer also goes to the fusion feature log (``feature_log.enabled``).

A folder is decoded in ``decode_workers`` DataLoader worker processes (default 2) while the recognizer runs,
answers in file order. In a folder, an unreadable file becomes an ``{"filename", "error"}`` line and the run goes on; a
single bad file is a one-line error (exit 2). A folder run into ``output.path`` that stopped part way continues where
it stopped when run again (``output.resume``): each answer is one flushed line, so at most a torn last line is lost.
"""

from __future__ import annotations

import csv
import io
import json
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, TextIO

from omegaconf import DictConfig

from ..confutil import to_plain as _plain
from ..errors import ConfigError, ImageError
from ..fusion.featurelog import sink_from_config
from ..imageio import IMAGE_SUFFIXES, VIDEO_SUFFIXES, ImageLimits
from ..log import get_logger, setup_logging
from ..recognition.pipeline import Recognizer
from ..recognition.schema import Answer
from . import hydra_main

CSV_FIELDS = ("filename", "role", "series", "similarity", "unknown", "mode", "detections", "boxes", "top2", "top2_score", "tags_used", "error", "total_ms",
              "version")
_log = get_logger("inference")
#: Decode processes for a folder (``decode_workers=``; 0 decodes in this process between batches).
DECODE_WORKERS = 2


def list_images(folder: Path) -> list[Path]:
    """Image files under `folder` (recursive, sorted; hidden folders skipped)."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


class AnswerWriter:
    """Writes answers (or per-file errors) as JSON lines, CSV rows or one JSON document."""

    def __init__(self, stream: TextIO, fmt: str, header: bool = True) -> None:
        check_format(fmt)
        self.stream, self.fmt = stream, fmt
        self._csv = csv.DictWriter(stream, fieldnames=CSV_FIELDS) if fmt == "csv" else None
        if self._csv and header:
            self._csv.writeheader()

    def answer(self, ans: Any) -> None:
        if self.fmt == "json":
            self.stream.write(ans.model_dump_json(indent=2) + "\n")
        elif self.fmt == "jsonl":
            self.stream.write(ans.model_dump_json() + "\n")
        else:
            self._csv.writerow(_csv_row(ans))
        self.stream.flush()

    def error(self, filename: str, message: str) -> None:
        if self.fmt == "csv":
            self._csv.writerow({"filename": filename, "error": message})
        else:
            self.stream.write(json.dumps({"filename": filename, "error": message}, ensure_ascii=False) + "\n")
        self.stream.flush()


def _csv_row(ans: Answer) -> dict[str, Any]:
    best = max(ans.detections, key=lambda d: d.similarity, default=None)
    second = best.topk[1] if best is not None and len(best.topk) > 1 else None
    return {
        "filename": ans.filename, "role": ans.role, "series": ans.series, "similarity": ans.similarity, "unknown": ans.unknown,
        "mode": ans.mode, "detections": len(ans.detections), "boxes": json.dumps(ans.boxes),
        "top2": second.role if second else "", "top2_score": second.score if second else "",
        "tags_used": " ".join(best.rerank.tags_used) if best is not None and best.rerank else "", "error": "",
        "total_ms": ans.timings_ms.get("total", ""), "version": ans.version,
    }


def check_format(fmt: str) -> None:
    if fmt not in ("jsonl", "csv", "json"):
        raise ConfigError(f"output.format={fmt!r}: choose jsonl, csv or json")


def answered_already(path: Path, fmt: str) -> tuple[set[str], set[str]]:
    """The files an earlier run into `path` answered (errors included) and the versions that answered them. A file
    this tool did not write is refused untouched; in one it did, a torn last line (the run died writing it) is cut."""
    data = path.read_bytes() if path.is_file() else b""
    whole = data[: data.rfind(b"\n") + 1]  # complete lines; what follows is a torn last line
    text, torn = whole.decode("utf-8", errors="replace"), data[len(whole):].decode("utf-8", errors="replace")
    refuse = ConfigError(f"output.path={path} holds something other than this tool's {fmt} answers; give another "
                         "output.path, or output.resume=false to replace it")
    ours_first = ",".join(CSV_FIELDS) if fmt == "csv" else '{"filename"'
    if torn and not text and not (ours_first.startswith(torn) or torn.startswith(ours_first)):
        raise refuse  # a file without one complete line is cut only when its start is this tool's
    rows = _answer_rows(text, fmt, refuse)
    if torn:  # checked to be this tool's file before anything of it is cut
        with open(path, "r+b") as fh:
            fh.truncate(len(whole))
        _log.warning(f"{path}: dropped its torn last line (the run writing it stopped mid-line)")
    return {r["filename"] for r in rows}, {r.get("version") or "" for r in rows if not r.get("error")}


def _answer_rows(text: str, fmt: str, refuse: ConfigError) -> list[dict[str, Any]]:
    """The rows of complete answer lines, or `refuse` when they are not this tool's."""
    if fmt == "csv":
        reader = csv.DictReader(io.StringIO(text))
        if text and tuple(reader.fieldnames or ()) != CSV_FIELDS:
            raise refuse
        rows = list(reader)
    else:
        try:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError:
            raise refuse from None
    if not all(isinstance(r, dict) and r.get("filename") for r in rows):
        raise refuse
    return rows


def _decoded(files: list[Path], workers: int = 0, batch_size: int = 16, limits: ImageLimits | None = None) -> Iterator[tuple[Path, Any, str | None, str, bytes | None]]:
    """(path, image or None, sha256, error message, bytes) per file, in order, decoded under `limits` (the recognizer's;
    None: the library's); `workers` > 0 decodes in DataLoader worker processes (up to two batches ahead), so decoding
    overlaps the recognizer's forward pass."""
    from ..data.predict import decode_file, decode_loader
    from ..imageio import DEFAULT_LIMITS

    limits = limits or DEFAULT_LIMITS
    if workers <= 0:
        for f in files:
            d = decode_file(str(f), f, keep_bytes=True, limits=limits)
            yield f, d.image, d.sha256 or None, d.error, d.data
        return
    for batch in decode_loader([(str(f), f) for f in files], batch_size, workers, keep_bytes=True, limits=limits):
        for d in batch:
            yield Path(d.id), d.image, d.sha256 or None, d.error, d.data


def run_infer(cfg: Mapping[str, Any], stream: TextIO | None = None) -> int:
    """Recognise ``cfg.image`` (file or folder) or ``cfg.video``; returns how many inputs failed.

    With ``feature_log.enabled`` every answer is also appended to the feature log (a recognizer sink).
    """
    c = dict(_plain(cfg) or {})
    workers = int(c.pop("decode_workers", DECODE_WORKERS) or 0)  # an entry-point setting, not the recognizer's
    if c.get("log"):
        setup_logging({**c["log"], "console_level": c["log"].get("console_level", "WARNING")})
    image, video = c.get("image"), c.get("video")
    if bool(image) == bool(video):
        raise ConfigError("give exactly one input: image=PATH (file or folder) or video=PATH")
    out_cfg = dict(c.get("output") or {})
    out_path, fmt = out_cfg.get("path"), str(out_cfg.get("format", "jsonl"))
    check_format(fmt)
    resume = bool(out_cfg.get("resume", True)) and bool(out_path) and fmt != "json" and bool(image) and Path(image).is_dir()
    done, versions = answered_already(Path(out_path), fmt) if resume else (set(), set())
    fh: TextIO | None = None
    sink = None
    try:
        rec = Recognizer.from_config(c)  # before the output is opened: a run that cannot start leaves it as it was
        if versions - {rec.version}:
            raise ConfigError(f"output.path={out_path} holds answers by version {', '.join(sorted(versions - {rec.version}))}; "
                              f"this run answers with {rec.version or 'a gallery without a version'}: give another "
                              "output.path, or output.resume=false to replace it")
        fh = open(out_path, "a" if done else "w", encoding="utf-8", newline="") if out_path else (stream or sys.stdout)
        sink = sink_from_config(c.get("feature_log"))
        if sink is not None:
            rec.add_sink(sink)
        writer = AnswerWriter(fh, fmt, header=not done)
        if video:
            vp = Path(video)
            if not vp.is_file():
                raise ImageError(f"{vp}: no such video file; check the path")
            ans = rec.recognize_video(vp, sample_fps=c.get("sample_fps"), filename=str(vp))  # the input as given, as for images
            fh.write(ans.model_dump_json(indent=2 if writer.fmt == "json" else None) + "\n")
            return 0
        ip = Path(image)
        if ip.is_file():
            if ip.suffix.lower() in VIDEO_SUFFIXES:
                raise ConfigError(f"{ip} is a video; use video={ip}")
            data = ip.read_bytes()
            writer.answer(rec.recognize_bytes(data, str(ip)))
            return 0
        if not ip.is_dir():
            raise ImageError(f"{ip}: no such file or folder; check the path")
        files = list_images(ip)
        if not files:
            raise ImageError(f"{ip}: the folder has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        if done:
            left = [f for f in files if str(f) not in done]
            print(f"resuming {out_path}: {len(files) - len(left)} of {len(files)} file(s) already answered by this version, "
                  f"{len(left)} to go (output.resume=false answers them all again)", file=sys.stderr)
            files = left
            if not files:
                return 0
        return _run_folder(rec, files, writer, int(c.get("batch_size", 16)), bool(out_cfg.get("progress", True)), workers)
    finally:
        if sink is not None:
            sink.close()
        if out_path and fh is not None:
            fh.close()


def _run_folder(rec: Recognizer, files: list[Path], writer: AnswerWriter, batch_size: int, progress: bool, workers: int = 0) -> int:
    """Recognise a folder in batches, answers in file order; an unreadable file is one error line and the run goes on."""
    from tqdm import tqdm

    failed = 0
    t0 = time.perf_counter()
    bar = tqdm(total=len(files), unit="img", desc="recognising", file=sys.stderr, disable=not progress)
    batch: list[tuple[Path, Any, str, bytes | None]] = []

    def flush() -> None:
        if batch:
            answers = rec.recognize_batch([(img, str(f)) for f, img, _, _ in batch], hashes=[h for _, _, h, _ in batch],
                                          data=[b for _, _, _, b in batch])
            for a in answers:
                writer.answer(a)
            bar.update(len(batch))
            batch.clear()

    for f, img, h, err, data in _decoded(files, workers, batch_size, rec.limits):
        if err:
            failed += 1
            writer.error(str(f), err)
            bar.update(1)
            continue
        batch.append((f, img, h or "", data))
        if len(batch) >= batch_size:
            flush()
    flush()
    bar.close()
    dt = time.perf_counter() - t0
    _log.info(f"recognised {len(files) - failed} image(s), {failed} unreadable, {len(files) / max(dt, 1e-9):.1f} img/s")
    if failed:
        print(f"warning: {failed} of {len(files)} file(s) could not be read (see 'error' lines)", file=sys.stderr)
    return failed


@hydra_main("infer")
def main(cfg: DictConfig) -> None:
    """Recognise `image=` or `video=` and write the answers (conf/infer.yaml)."""
    run_infer(cfg)


if __name__ == "__main__":
    main()
