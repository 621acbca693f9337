"""Typed view of `conf/serve.yaml`: validated once at start so a bad value fails with one clear line."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import ConfigError
from ..imageio import RECOGNITION_DRAFT_SIDE, ImageLimits


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Limits(_Section):
    """Per-request limits (sizes in MB, times in seconds)."""

    max_upload_mb: float = Field(20.0, gt=0, description="Largest image upload.")
    max_video_mb: float = Field(200.0, gt=0, description="Largest video upload.")
    max_files: int = Field(16, ge=1, description="Most files in one batch or enrol request.")
    max_pixels: int = Field(40_000_000, ge=64, description="Decompression-bomb guard: most pixels per image.")
    draft_side: int = Field(RECOGNITION_DRAFT_SIDE, ge=0, description="A JPEG whose shorter side is at least twice this decodes at a reduced "
                            "scale (1/2, 1/4, 1/8) keeping it >= this, several times faster; boxes stay in the upload's "
                            "pixels. 0 decodes every pixel.")
    request_timeout_s: float = Field(60.0, gt=0, description="Model work longer than this answers 503.")
    inference_threads: int = Field(2, ge=1, description="Worker threads for model work (off the event loop).")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def image_limits(self) -> ImageLimits:
        """How the server decodes an uploaded picture: its pixel and byte limits, big JPEGs drafted."""
        return ImageLimits(max_pixels=self.max_pixels, max_bytes=self.max_upload_bytes, draft_side=self.draft_side)

    @property
    def max_video_bytes(self) -> int:
        return int(self.max_video_mb * 1024 * 1024)

    @property
    def max_body_bytes(self) -> int:
        """Whole-request cap: the larger per-file limit times the file count, plus form overhead."""
        return max(self.max_video_bytes, self.max_upload_bytes * self.max_files) + 1024 * 1024


class BatchingSettings(_Section):
    """Micro-batching of concurrent single-image `/api/classify` requests (one recognizer call for many)."""

    max_wait_ms: float = Field(5.0, ge=0, le=1000, description="Longest a request waits for others to join its batch; 0 = off.")
    max_batch: int = Field(8, ge=1, le=256, description="Most images in one recognizer batch.")

    @property
    def enabled(self) -> bool:
        """Off when there is nothing to wait for (0 ms) or nothing to gather (batches of one)."""
        return self.max_wait_ms > 0 and self.max_batch > 1


class Auth(_Section):
    """Bearer token for the mutating endpoints (enrol, delete, feedback, workflow); null = open."""

    token: str | None = None


class Cors(_Section):
    """Cross-origin access for browsers on other origins; empty = same origin only."""

    allow_origins: list[str] = Field(default_factory=list)
    allow_credentials: bool = False


class FeatureLogSettings(_Section):
    """Where answers and their embeddings are logged for log fusion."""

    enabled: bool = True
    dir: str = "outputs/featurelog"
    #: `fusion.featurelog.LogPolicy` fields (max_segment_bytes, retention_days, store_images, fsync).
    policy: dict[str, Any] = Field(default_factory=dict)


class WorkflowSettings(_Section):
    """How `/api/workflow` builds and runs the collect -> train -> gallery workflow."""

    enabled: bool = True
    config_dir: str | None = None
    config_name: str = "workflow"
    runner: dict[str, Any] = Field(
        default_factory=lambda: {"_target_": "anime_role_detect.workflow.run.run_workflow", "_partial_": True}
    )
    #: request parameter -> where it goes (only these can be set from a client): a config key
    #: (``split.seed``) or ``LIST_KEY+=TEMPLATE`` appending e.g. ``trainer.max_epochs={value}`` to a list of overrides.
    params: dict[str, str] = Field(default_factory=dict)
    #: config key -> value applied to every run (server-side settings such as the collector's folder).
    values: dict[str, Any] = Field(default_factory=dict)
    #: config key that receives the characters list.
    characters_key: str = "characters"
    #: config keys that receive the server's registry folder (so a finished run goes live here).
    registry_keys: list[str] = Field(default_factory=list)
    overrides: list[str] = Field(default_factory=list)
    max_concurrent: int = Field(1, ge=1)
    max_queued: int = Field(8, ge=0, description="Jobs that may wait for a free runner; one more is refused (429), so a "
                                                 "burst of submissions cannot queue hours of training.")
    isolation: Literal["process", "thread"] = Field(
        "process", description="Where a job runs: its own process (the server never loads the training stack, and a "
                               "cancel that is not heeded ends it), or a thread of the server (embedding, debugging).")
    job_nice: int = Field(10, ge=0, le=19, description="Niceness added to a job's process (POSIX; isolation=process): "
                                                     "training yields the CPU to the requests the server answers.")
    cancel_grace_s: float = Field(30.0, gt=0, description="Seconds a cancelled job's process has to stop at its next "
                                                          "progress event before it is terminated (stages resume).")
    keep_finished: int = Field(50, ge=1)
    #: folder where each job's latest status is saved, so job ids survive a server restart (null = memory only)
    jobs_dir: str | None = None


class ServeSettings(_Section):
    """Everything the service needs, from `conf/serve.yaml`."""

    model_config = ConfigDict(extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(5001, ge=0, le=65535)
    registry_dir: str = "outputs/registry"
    version: str = "latest"
    reload_interval_s: float = Field(2.0, ge=0)
    persist_gallery_edits: bool = True
    recognizer: dict[str, Any] = Field(default_factory=dict)
    video_sample_fps: float = Field(1.0, gt=0)
    limits: Limits = Field(default_factory=Limits)
    batching: BatchingSettings = Field(default_factory=BatchingSettings)
    auth: Auth = Field(default_factory=Auth)
    cors: Cors = Field(default_factory=Cors)
    feature_log: FeatureLogSettings = Field(default_factory=FeatureLogSettings)
    workflow: WorkflowSettings = Field(default_factory=WorkflowSettings)
    static_dir: str | None = None

    @property
    def registry_path(self) -> Path:
        return Path(self.registry_dir).expanduser()

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | "ServeSettings" | None) -> "ServeSettings":
        """Validate a Hydra/OmegaConf or plain mapping; raises `ConfigError` naming the bad key."""
        if isinstance(cfg, ServeSettings):
            return cfg
        if cfg is None:
            return cls()
        try:
            from omegaconf import DictConfig, OmegaConf

            if isinstance(cfg, DictConfig):
                cfg = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
        except ImportError:  # pragma: no cover - omegaconf is a dependency
            pass
        try:
            return cls.model_validate(dict(cfg))  # type: ignore[arg-type]
        except ValidationError as exc:
            err = exc.errors()[0]
            key = ".".join(str(p) for p in err["loc"])
            raise ConfigError(f"serve config: {key}: {err['msg']}; fix it in conf/serve.yaml or on the command line") from None
