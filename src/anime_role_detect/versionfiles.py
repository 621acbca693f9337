"""The names of the files in a registry version folder (README "Version folder"): the one place they are spelled.

A base-layer contract module: recognition, training, the registry, the workflow and fusion import it;
it imports nothing of the project.
"""

from __future__ import annotations

MODEL = "model.ckpt"  # the classifier checkpoint (Lightning)
EMBEDDER = "embedder.ckpt"  # the weights a classifier-embedded gallery was built with, when model.ckpt moved on
GALLERY_INDEX = "gallery.faiss"
GALLERY_META = "gallery.json"  # embedder id, dimension, characters, index and row-file hashes
GALLERY_ROWS = "gallery.rows.npz"  # per row id: character, series, source, as columns (recognition.rows)
GALLERY_VECTORS = "gallery.vectors"  # IVF-PQ galleries: every row's vector, fp16, memory-mapped (recognition.vector_file)
WHITENED_GALLERY = "whitened_gallery.npz"  # the trained characters' rows, whitened: fusion's judge among them (recognition.whitened)
TAG_PROFILES = "tag_profiles.json"
CALIBRATION = "calibration.json"  # open-set thresholds
METRICS = "metrics.json"
CONFIG = "config.yaml"  # the resolved config that made the version
PARENT = "parent"  # the id the version was derived from, or "none"
MANIFEST = "manifest.json"  # written last by the registry: a version without it is incomplete
VAL_EMBEDDINGS = "val_embeddings.npz"  # the evaluation set: held-out embeddings + labels + hashes + paths
EVAL_METRICS = "eval_metrics.json"  # the version's own figures on its evaluation set when it was built
FUSION_REPORT_JSON = "fusion_report.json"
FUSION_REPORT_MD = "fusion_report.md"

#: The training run's report files a version keeps (train.py register=true and the workflow).
RUN_REPORT = (METRICS, "per_character.csv", "per_character.md", "confusion_matrix.png")

#: Files the registry writes itself when it seals a version; never carried from a parent.
SEALED = frozenset({MANIFEST, PARENT})
