"""Export a version's networks to ONNX (what `runtime` runs on ONNX Runtime).

`export_version` (CLI ``python -m anime_role_detect.export``): the version's classifier becomes ONE graph
``classifier.onnx`` with outputs ``logits``, ``tag_logits`` (when it has a tag head) and ``embedding`` (pooled
features), so one forward per view serves every mode; a gallery embedder that is not that classifier (timm, open_clip,
an older classifier in ``embedder.ckpt``) becomes ``embedder.onnx`` (output ``embedding``). Batch axis dynamic;
optional dynamic int8 copies (``*.int8.onnx``). The files go into a version derived with `Registry.derive` together
with ``onnx.json`` (what each file is, the preprocessing, the source checkpoint fingerprint, the torch model id), and
the manifest gets an ``onnx`` entry; the derived version is promoted when the base was live. `export_into` writes them
into a folder being built (the workflow and ``train.py register=true`` export every version they build).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from ..errors import ConfigError
from ..fsutil import atomic_write_json
from ..log import get_logger
from ..versionfiles import GALLERY_META, MODEL
from .shared import file_fingerprint, l2_normalise
from .runtime import (
    CLASSIFIER_ONNX,
    EMBEDDER_ONNX,
    EMBEDDING,
    INPUT,
    LOGITS,
    ONNX_FILES,
    ONNX_META,
    TAG_LOGITS,
    onnx_file_name,
)

_log = get_logger("system")

DEFAULT_OPSET = 17


@dataclass
class ExportResult:
    """What an export made: the new version, its base, whether it is live, the files and the ``onnx`` manifest entry."""

    version_id: str
    base_id: str
    live: bool
    version_dir: Path
    files: list[str]
    manifest_entry: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)  # per network: agreement with torch (fp32, int8)


def _torch_graph(forward: Callable[[Any], Any], module: Any) -> Any:
    """An eval-mode ``nn.Module`` whose forward is `forward` and whose parameters are `module`'s (what the exporter traces)."""
    from torch import nn

    class Graph(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = module

        def forward(self, images: Any) -> Any:
            return forward(images)

    return Graph().eval()


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """Silence the exporter's deprecation warnings and onnxruntime.quantization's stdlib log chatter."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def _export_graph(graph: Any, path: Path, size: int, outputs: Sequence[str], opset: int) -> None:
    """Trace `graph` on a ``[2, 3, size, size]`` batch into `path` (TorchScript exporter; batch axis dynamic)."""
    import torch

    dummy = torch.zeros(2, 3, size, size)
    axes = {name: {0: "batch"} for name in (INPUT, *outputs)}
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # nn.MultiheadAttention's fused inference op has no ONNX export (open_clip ViTs)
    try:
        with _quiet_export(), torch.no_grad():
            torch.onnx.export(graph, (dummy,), str(path), input_names=[INPUT], output_names=list(outputs), dynamic_axes=axes,
                              opset_version=int(opset), dynamo=False, do_constant_folding=True)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def _classifier_entry(model: Any, path: Path, opset: int, source: Path, model_id: str) -> dict[str, Any]:
    """Export a `CharacterClassifier` as one graph (logits, tag logits, embedding) and describe it."""
    has_tags = bool(model.tag_names)
    outputs = [LOGITS, TAG_LOGITS, EMBEDDING] if has_tags else [LOGITS, EMBEDDING]

    def forward(x: Any) -> Any:
        emb, logits, tags = model.outputs(x)
        return (logits, tags, emb) if has_tags else (logits, emb)

    _export_graph(_torch_graph(forward, model), path, int(model.image_size), outputs, opset)
    return {"file": path.name, "kind": "classifier", "outputs": outputs, "model_id": model_id, "dim": int(model.embed_dim),
            "source": MODEL, "source_fingerprint": file_fingerprint(source),
            "preprocess": {"transform": "classifier", "image_size": int(model.image_size), "mean": list(model.mean), "std": list(model.std),
                           "resize": model.eval_resize},
            "class_names": list(model.class_names), "series": dict(model.series), "tag_names": list(model.tag_names),
            "face_view": model.face_view}  # with the names above, the card a recognizer reads without torch (`OnnxVersion.card`)


def export_embedder(emb: Any, path: Path, opset: int = DEFAULT_OPSET, config: Mapping[str, Any] | None = None,
                    version_dir: Path | None = None) -> dict[str, Any]:
    """Export a torch embedder's feature network (output: embedding) into `path`; returns its ``onnx.json`` entry."""
    from .embedder import ClassifierEmbedder

    _export_graph(_torch_graph(emb.forward_features, emb.model), path, int(emb.image_size), [EMBEDDING], opset)
    pre: dict[str, Any] = {"transform": "resize", "image_size": int(emb.image_size), "mean": list(emb.mean), "std": list(emb.std),
                           "resize": emb.resize}
    source: Path | None = None
    if isinstance(emb, ClassifierEmbedder):
        pre = {"transform": "classifier", "image_size": int(emb.image_size), "mean": list(emb.mean), "std": list(emb.std)}
        source = Path(emb.ckpt_path).resolve()
    base = Path(version_dir).resolve() if version_dir is not None else None
    shown = None if source is None else str(source.relative_to(base) if base is not None and source.is_relative_to(base) else source)
    config = dict(config or {})
    return {"file": path.name, "kind": str(config.get("kind", "")), "outputs": [EMBEDDING], "model_id": str(emb.model_id),
            "dim": int(emb.dim), "source": shown, "source_fingerprint": file_fingerprint(source) if source is not None else None,
            "preprocess": pre, "config": {k: v for k, v in config.items() if k not in ("device", "batch_size", "num_threads")}}


#: Layers the int8 copies quantise: matrix products (transformer blocks, heads), per output channel. Convolutions stay
#: float: dynamic int8 convolutions made the Lite0 demo classifier 3.5x slower with 72% top-1 agreement (docs/recognition.md).
INT8_OPS = ("MatMul", "Gemm")


def quantize_int8(src: Path, dst: Path) -> None:
    """Dynamic int8 quantisation of `src`'s `INT8_OPS` into `dst` (weights int8 per channel, activations quantised at run time)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet_export():
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=list(INT8_OPS), per_channel=True)


def _check(entry: Mapping[str, Any], torch_forward: Callable[[Any], dict[str, Any]], path: Path, seed: int = 0) -> dict[str, float]:
    """Agreement of the ONNX file with torch on a random batch: max |logit diff| and min embedding cosine."""
    import onnxruntime as ort
    import torch

    size = int(entry["preprocess"]["image_size"])
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        ref = {k: v.float().numpy() for k, v in torch_forward(x).items()}
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {INPUT: x.numpy()})))
    out = {"embedding_min_cosine": float(np.min(np.sum(l2_normalise(ref[EMBEDDING]) * l2_normalise(got[EMBEDDING]), axis=1)))}
    if LOGITS in ref and LOGITS in got:
        out["logits_max_abs_diff"] = float(np.max(np.abs(ref[LOGITS] - got[LOGITS])))
    return out


def export_folder(src: str | Path, out: str | Path, int8: bool = False, opset: int = DEFAULT_OPSET) -> dict[str, Any]:
    """Write the ONNX files of version folder `src` into `out` (may be the same folder) and return the ``onnx.json`` content.

    The classifier (``model.ckpt``) becomes ``classifier.onnx``; the gallery embedder, when it is not that
    classifier, ``embedder.onnx``. Each is checked against torch on a random batch (recorded under ``check``).
    """
    import onnxruntime
    import torch

    from .config import RecognizerConfig
    from .pipeline import Recognizer
    from .views import bare_network, base_model_id

    src, out = Path(src), Path(out)
    rec = Recognizer.from_version(src, RecognizerConfig(runtime="torch", device="cpu", cache_size=0, version=None))
    networks: dict[str, dict[str, Any]] = {}
    checks: dict[str, Callable[[Any], dict[str, Any]]] = {}
    if rec.model_ckpt is not None:
        from .embedder import ClassifierEmbedder

        model = rec.classifier
        model_id = ClassifierEmbedder(str(rec.model_ckpt), device="cpu").model_id
        networks["classifier"] = _classifier_entry(model, out / CLASSIFIER_ONNX, opset, rec.model_ckpt, model_id)

        def classifier_forward(x: Any) -> dict[str, Any]:
            emb, logits, _ = model.outputs(x)
            return {LOGITS: logits, EMBEDDING: emb}

        checks["classifier"] = classifier_forward
    gallery = rec.gallery if (src / GALLERY_META).is_file() else None
    if gallery is not None and base_model_id(gallery.embedder_id) != networks.get("classifier", {}).get("model_id"):
        # rec.embedder also checks that the gallery was built by this embedder; the export is the bare network,
        # not its face + figure views or colour histogram (ONNX Runtime sessions are wrapped the same way when loaded)
        emb = bare_network(rec.embedder)
        networks["embedder"] = export_embedder(emb, out / EMBEDDER_ONNX, opset, gallery.embedder_config, src)
        checks["embedder"] = lambda x: {EMBEDDING: emb.forward_features(x)}
    if not networks:
        raise ConfigError(f"{src} has neither a classifier ({MODEL}) nor a gallery to export")
    for name, entry in networks.items():
        fp32 = out / entry["file"]
        entry["check"] = _check(entry, checks[name], fp32)
        if int8:
            entry["int8_file"] = onnx_file_name(entry["file"], True)
            quantize_int8(fp32, out / entry["int8_file"])
            entry["check_int8"] = _check(entry, checks[name], out / entry["int8_file"])
        _log.info(f"exported {name} -> {fp32.name}: {entry['check']}")
    return {"format": 1, "opset": int(opset), "int8": bool(int8), "int8_ops": list(INT8_OPS) if int8 else [], "networks": networks,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__}


def manifest_entry(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest's ``onnx`` entry: files, opset, int8, and each network's source checkpoint fingerprint and model id."""
    nets = meta["networks"]
    files = sorted({n["file"] for n in nets.values()} | {n["int8_file"] for n in nets.values() if n.get("int8_file")} | {ONNX_META})
    return {"files": files, "opset": meta["opset"], "int8": meta["int8"], "int8_ops": meta.get("int8_ops", []),
            "networks": {k: {"file": n["file"], "int8_file": n.get("int8_file"), "source": n.get("source"),
                             "source_fingerprint": n.get("source_fingerprint"), "model_id": n["model_id"]} for k, n in nets.items()}}


def export_into(folder: str | Path, int8: bool = False, opset: int = DEFAULT_OPSET, src: str | Path | None = None) -> dict[str, Any]:
    """Export the networks of version folder `src` (default: `folder` itself) into `folder`: ``*.onnx`` + ``onnx.json``,
    whose content it returns (`manifest_entry` makes the manifest's entry of it).

    What the workflow and ``train.py register=true`` do to every version they build, so ``runtime: auto`` runs it on
    ONNX Runtime without a separate export step; `export_version` does it into a derived version.
    """
    folder = Path(folder)
    meta = export_folder(folder if src is None else src, folder, int8=int8, opset=opset)
    atomic_write_json(folder / ONNX_META, meta)
    return meta


def export_version(registry_dir: str | Path, version: str = "latest", int8: bool = False, opset: int = DEFAULT_OPSET,
                   promote: bool | None = None) -> ExportResult:
    """Export `version`'s networks into a version derived from it; promoted when the base was live (or as `promote` says)."""
    from ..registry import Registry

    reg = Registry(registry_dir)
    base = reg.path(version)
    live = reg.latest_id() == base.name if promote is None else bool(promote)
    with reg.derive(base.name, kind="onnx", promote=live, skip=ONNX_FILES) as d:
        meta = export_into(d.dir, int8=int8, opset=opset, src=base)
        d.extra["onnx"] = manifest_entry(meta)
    assert d.id is not None
    checks = {k: {c: n[c] for c in ("check", "check_int8") if c in n} for k, n in meta["networks"].items()}
    return ExportResult(d.id, base.name, live, reg.versions_dir / d.id, d.extra["onnx"]["files"], d.extra["onnx"], checks)
