"""What a classifier checkpoint says about itself (`ClassifierCard`): read from the checkpoint, or from the version's
ONNX export, which carries it (`runtime.OnnxVersion.card`), so an ONNX Runtime recognizer never imports torch."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..errors import WeightsError


@dataclass(frozen=True)
class ClassifierCard:
    """What a classifier checkpoint says about itself, as `CharacterClassifier` reads it: enough to name its outputs
    and pick its views without building the network (an ONNX Runtime recognizer then never imports Lightning)."""

    class_names: list[str]
    series: dict[str, str]
    tag_names: list[str]
    face_view: dict[str, Any] | None


def read_classifier_card(ckpt_path: str | Path) -> ClassifierCard:
    """`ClassifierCard` of a Lightning checkpoint (its hyper-parameters only), read once per process and file version.
    Cards are kept apart from `shared_model`'s networks, whose few slots they would otherwise take."""
    p = Path(ckpt_path)
    if not p.is_file():
        raise WeightsError(f"classifier checkpoint {p} not found; train one (python train.py) or fix the path / version")
    return _read_card(str(p.resolve()), p.stat().st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _read_card(path: str, mtime_ns: int) -> ClassifierCard:
    """The card of `path` as it was at `mtime_ns` (the key: a rewritten checkpoint is read again)."""
    import torch

    try:
        hp = dict(torch.load(path, map_location="cpu", weights_only=False)["hyper_parameters"])
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
        why = " ".join(str(exc).split())[:300]  # one line, whatever the unpickler said
        raise WeightsError(f"classifier checkpoint {path} could not be read ({type(exc).__name__}: {why}); is it a train.py checkpoint?") from None
    return card_from(hp)


def card_from(hp: Mapping[str, Any]) -> ClassifierCard:
    """The card of a classifier's hyper-parameters (a checkpoint's, or the same fields an ONNX export recorded)."""
    from ..confutil import to_plain

    names = [str(c) for c in hp.get("class_names") or []]
    series = dict(to_plain(hp.get("series")) or {})
    face_view = hp.get("face_view")
    return ClassifierCard(names, {c: str(series.get(c, "")) for c in names}, [str(t) for t in hp.get("tag_names") or []],
                          dict(to_plain(face_view)) if face_view else None)
