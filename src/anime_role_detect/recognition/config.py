"""`RecognizerConfig`: the typed settings of a `Recognizer`, with their defaults in one place.

Built from keyword arguments in library code, or from a mapping (``conf/infer.yaml``, the service's
``recognizer:`` section) with `from_mapping`, which rejects unknown keys with a one-line `ConfigError`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..confutil import to_plain
from ..errors import ConfigError
from ..imageio import RECOGNITION_DRAFT_SIDE

MODES = ("clip", "model", "fusion")
AUTO = "auto"  # the best mode the version measured on its own evaluation set (`evalset.best_mode`)


def modes_for(has_gallery: bool, has_classifier: bool) -> list[str]:
    """The modes a set of parts can serve: clip needs a gallery, model a classifier, fusion both."""
    return [m for m, ok in (("clip", has_gallery), ("model", has_classifier), ("fusion", has_gallery and has_classifier)) if ok]
#: How fusion scores a character the classifier was not trained on (`FusionOptions.untrained`).
UNTRAINED_RULES = ("gallery", "leftover")
#: Backends for the networks: auto = ONNX Runtime when the version has exported files (recognition/runtime.py), else torch.
RUNTIMES = ("auto", "torch", "onnx", "onnx-int8")

#: Keys of ``conf/infer.yaml`` that belong to the entry point (input, output, logging), not to the recognizer.
ENTRY_POINT_KEYS = frozenset({"image", "video", "output", "feature_log", "gallery_build", "paths", "log", "task_name", "hydra",
                              "decode_workers"})


@dataclass
class OpenSetOptions:
    """Answer ``unknown`` below the version's calibrated threshold (calibration.json)."""

    enabled: bool = True


@dataclass
class FusionOptions:
    """fusion score = ``gallery_weight`` x gallery probability + (1 - ``gallery_weight``) x the trained characters'
    probability (the classifier's, or the whitened gallery's: ``whitened`` below).

    The gallery probability is a softmax of the characters' gallery cosines at a temperature calibrated on the
    version's held-out pictures (``calibration.json``), so both terms are probabilities; a raw cosine (0.9 for every
    character) would let the classifier decide alone. A version calibrated before the temperature existed keeps the
    raw cosine, so its saved thresholds stay valid. ``fit_gallery_weight`` (the default since 2026-12-06) fits the
    blend on those pictures too when a version is built (`openset.fit_gallery_weight`): the half that is sharper on
    them gets more say (docs/accuracy.md "Fusion's blend fitted per version"), fitted again once those pictures join
    the gallery, each with its own row left out (`build.refit_gallery_weight`); ``false`` keeps half and half.

    ``untrained`` scores a character the classifier was never trained on (enrolled after training): ``gallery`` takes
    its gallery probability alone and blends the trained characters within the gallery's mass on them, so the fused
    scores stay one distribution; ``leftover`` (before 2026-12-06) blends in the classifier's 1 - top probability.

    ``whitened`` (the default since 2026-12-07): a build also keeps its trained characters' rows whitened by their
    within-character covariance (`whitened.WhitenedGallery`), and while every gallery character is a trained one
    fusion blends the gallery with that whitened gallery's probability in place of the classifier's: it named more
    set-aside pictures on every real set (docs/accuracy.md "The whitened gallery as fusion's judge of trained
    characters"). Once a character is enrolled the classifier judges again; ``false`` keeps the classifier always."""

    gallery_weight: float | None = None  # None: the version's (its fitted weight, else 0.5); a number overrides it
    fit_gallery_weight: bool = True  # building a version: fit the weight on its held-out pictures (calibration.json)
    gallery_temperature: float | None = None  # None: the version's calibrated temperature; a number overrides it
    untrained: str = "gallery"  # gallery | leftover: how fusion scores a character only the gallery knows (`UNTRAINED_RULES`)
    whitened: bool = True  # build the whitened gallery; fusion judges trained characters with it while none is enrolled


@dataclass
class EnrolOptions:
    """How `Recognizer.enroll` turns a few pictures into gallery rows.

    ``mirror`` adds each picture's mirror image as a row of its own. A character enrolled from 5 pictures competes with
    trained characters of 30–100 rows, and the best of many rows beats the best of five on its pictures; the mirror
    images named 2.5–5.6 points more of the enrolled characters' pictures on the four real sets (5-shot, fusion;
    `newgame_full` 48.1 → 53.7) and no fewer of the trained ones (docs/accuracy.md "Enrolment adds each picture's
    mirror image")."""

    mirror: bool = True


@dataclass
class VideoOptions:
    """How videos are decoded: ``backend`` (av | cv2) and an optional cap on sampled frames."""

    backend: str = "av"
    max_frames: int | None = None


@dataclass
class RecognizerConfig:
    """Settings of a `Recognizer`; every field has the default the CLI and the service use."""

    mode: str = AUTO  # auto (the best the version measured) | clip (embedding + gallery) | model (classifier) | fusion (both + tagger)
    rerank: bool = True  # tag-assisted reranking (needs tag_profiles.json and a tagger)
    topk: int = 5
    rerank_candidates: int = 10  # candidates the reranker may reorder
    batch_size: int = 16
    cache_size: int = 2048  # answers cached by content hash (LRU); 0 turns the cache off
    crop_margin: float = 0.1  # widen detector boxes by this fraction before cropping
    sample_fps: float = 1.0  # video frames sampled per second
    threads: int | None = None  # torch CPU threads (None: torch's default)
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps: where the embedder, classifier and tagger run
    runtime: str = "auto"  # auto | torch | onnx | onnx-int8: auto = ONNX Runtime when the version has exported files
    openset: OpenSetOptions = field(default_factory=OpenSetOptions)
    fusion: FusionOptions = field(default_factory=FusionOptions)
    enrol: EnrolOptions = field(default_factory=EnrolOptions)
    video_options: VideoOptions = field(default_factory=VideoOptions)
    embedder: dict[str, Any] | None = None  # conf/embedder/*: used when there is no gallery naming its own
    tagger: dict[str, Any] | None = None  # conf/tagger/*; None = auto (the classifier's tag head when it has one)
    detector: dict[str, Any] | None = None  # conf/detector/*; None = whole images
    # imageio.ImageLimits for untrusted bytes (max_pixels, max_bytes, draft_side ...), over recognition's own
    limits: dict[str, int] | None = field(default_factory=lambda: {"draft_side": RECOGNITION_DRAFT_SIDE})
    # where the models come from (`Recognizer.from_config`): a folder, a registry version, or a bare checkpoint
    gallery: str | None = None
    version: str | None = "latest"  # a registry id or latest (gallery= wins when set)
    registry_dir: str = "outputs/registry"
    model_ckpt: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in (AUTO, *MODES):
            raise ConfigError(f"mode={self.mode!r}: choose auto, clip (gallery), model (classifier) or fusion")
        if self.topk < 1 or self.batch_size < 1 or self.cache_size < 0 or self.sample_fps <= 0:
            raise ConfigError("topk and batch_size must be >= 1, cache_size >= 0 and sample_fps > 0")
        if self.fusion.gallery_weight is not None and not 0.0 <= self.fusion.gallery_weight <= 1.0:
            raise ConfigError(f"fusion.gallery_weight={self.fusion.gallery_weight}: must be between 0 and 1")
        t = self.fusion.gallery_temperature
        if t is not None and not float(t) > 0:
            raise ConfigError(f"fusion.gallery_temperature={t}: must be above 0 (e.g. 0.02), or null for the version's calibrated one")
        if self.fusion.untrained not in UNTRAINED_RULES:
            raise ConfigError(f"fusion.untrained={self.fusion.untrained!r}: choose gallery (its gallery probability) or leftover "
                              "(the classifier's 1 - top probability blended in)")
        if self.runtime not in RUNTIMES:
            raise ConfigError(f"runtime={self.runtime!r}: choose one of {', '.join(RUNTIMES)} (onnx needs python -m anime_role_detect.export)")

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any] | None, where: str = "recognizer config") -> "RecognizerConfig":
        """From ``conf/infer.yaml``-style keys (entry-point keys are ignored); unknown keys are a one-line `ConfigError`."""
        plain = {k: v for k, v in dict(to_plain(cfg) or {}).items() if k not in ENTRY_POINT_KEYS}
        return _build(cls, plain, where)

    def replace(self, **changes: Any) -> "RecognizerConfig":
        """A copy with `changes` (validated like the constructor)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _build(cls: type, values: Mapping[str, Any], where: str) -> Any:
    """``cls(**values)`` with nested option dataclasses built from their mappings; unknown keys named."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(fields)}")
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        nested = _NESTED.get(name)
        if nested is not None and cls is RecognizerConfig:
            value = value if isinstance(value, nested) else _build(nested, dict(value or {}), f"{where}: {name}")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None


_NESTED: dict[str, type] = {"openset": OpenSetOptions, "fusion": FusionOptions, "enrol": EnrolOptions, "video_options": VideoOptions}
