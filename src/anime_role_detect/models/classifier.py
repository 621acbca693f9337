"""`CharacterClassifier`: a timm backbone with a character head and a multi-label tag head.

The two heads train jointly (cross-entropy + ``tag_loss_weight`` x BCE); tags carry the attributes
that separate look-alike characters. The checkpoint's hyper-parameters hold the class names,
series, tag vocabulary, image size, normalisation and the resolved run config, so
``CharacterClassifier.load_from_checkpoint(path)`` needs no other file and no network.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from timm.optim import param_groups_layer_decay
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from ..confutil import to_plain as _plain
from ..errors import ConfigError, UserError, WeightsError
from .backbones import backbone_data_config, create_backbone
from .filed_accuracy import FiledAccuracy, filed_cross_entropy
from .metric import EmbeddingSpec, IdentityHead
from .tag_metrics import TagMeanAveragePrecision

#: optimizer name -> constructor(params, lr, weight_decay)
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adamw": lambda params, lr, weight_decay, **kw: torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **kw),
    "adam": lambda params, lr, weight_decay, **kw: torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, **kw),
    "sgd": lambda params, lr, weight_decay, **kw: torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, momentum=kw.pop("momentum", 0.9), **kw),
}

DEFAULT_BACKBONE: dict[str, Any] = {"name": "efficientnet_b0", "pretrained": False, "weights_path": None}
DEFAULT_OPTIMIZER: dict[str, Any] = {"name": "adamw", "lr": 5e-5, "weight_decay": 1e-4, "head_lr_multiplier": 10.0}
DEFAULT_SCHEDULER: dict[str, Any] = {"name": "cosine", "warmup_epochs": 0, "min_lr_ratio": 0.01}


def _check_layer_decay(decay: Any, backbone: nn.Module) -> None:
    """Refuse a ``model.optimizer.layer_decay`` the optimizer could not apply, at construction rather than at fit."""
    if decay is None:
        return
    if not 0.0 < float(decay) <= 1.0:
        raise ConfigError(f"model.optimizer.layer_decay={decay}: give a factor in (0, 1] (or null for one rate over the body)")
    if not hasattr(backbone, "group_matcher"):
        raise ConfigError(f"model.optimizer.layer_decay: backbone {type(backbone).__name__} has no timm "
                          "group_matcher to number its layers; set model.optimizer.layer_decay=null")


def _copy_rows(head: nn.Linear, state: Mapping[str, torch.Tensor], prefix: str, old_names: Sequence[str], new_names: Sequence[str]) -> int:
    """Copy the weight/bias rows of names present in both heads (by name, so a reordered or grown head still matches)."""
    w, b = state.get(f"{prefix}.weight"), state.get(f"{prefix}.bias")
    if w is None or b is None or w.shape[1] != head.weight.shape[1]:
        return 0
    index = {n: i for i, n in enumerate(old_names)}
    n = 0
    with torch.no_grad():
        for j, name in enumerate(new_names):
            i = index.get(name)
            if i is not None and i < w.shape[0]:
                head.weight[j].copy_(w[i])
                head.bias[j].copy_(b[i])
                n += 1
    return n


class CharacterClassifier(L.LightningModule):
    """Character classifier with an auxiliary tag head and an optional identity embedding head (``embedding.dim``);
    `.embed` gives the gallery embedding: the identity head's unit vectors when present, else pooled features."""

    def __init__(
        self,
        class_names: Sequence[str],
        tag_names: Sequence[str] = (),
        series: Mapping[str, str] | None = None,
        backbone: Mapping[str, Any] | None = None,
        image_size: int = 224,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        optimizer: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = None,
        tag_loss_weight: float = 0.5,
        label_smoothing: float = 0.1,
        dropout: float = 0.2,
        class_weights: Sequence[float] | None = None,
        run_config: Mapping[str, Any] | None = None,
        init_from: str | None = None,
        embedding: Mapping[str, Any] | None = None,
        eval_resize: str = "center_crop",
        face_view: Mapping[str, Any] | None = None,
        partial_labels: bool = True,
    ) -> None:
        super().__init__()
        class_names = list(class_names)
        if len(class_names) < 2:
            raise ConfigError(f"a classifier needs at least 2 characters, got {class_names}")
        backbone = {**DEFAULT_BACKBONE, **dict(_plain(backbone) or {})}
        optimizer = {**DEFAULT_OPTIMIZER, **dict(_plain(optimizer) or {})}
        scheduler = {**DEFAULT_SCHEDULER, **dict(_plain(scheduler) or {})}
        spec = EmbeddingSpec.from_mapping(_plain(embedding))
        if str(optimizer["name"]).lower() not in OPTIMIZERS:
            raise ConfigError(f"model.optimizer.name={optimizer['name']!r}: choose one of {', '.join(OPTIMIZERS)}")
        self.save_hyperparameters(
            {
                "class_names": class_names,
                "tag_names": list(tag_names),
                "series": dict(series or {}),
                "backbone": backbone,
                "image_size": int(image_size),
                "mean": None if mean is None else [float(x) for x in mean],
                "std": None if std is None else [float(x) for x in std],
                "optimizer": optimizer,
                "scheduler": scheduler,
                "tag_loss_weight": float(tag_loss_weight),
                "label_smoothing": float(label_smoothing),
                "dropout": float(dropout),
                "class_weights": None if class_weights is None else [float(w) for w in class_weights],
                "run_config": _plain(run_config),
                "embedding": dict(spec.__dict__),
                "eval_resize": str(eval_resize),
                "face_view": _plain(face_view),
                "partial_labels": bool(partial_labels),
            }
        )
        bb_kw = {k: v for k, v in backbone.items() if k not in ("name", "pretrained", "weights_path")}
        self.backbone = create_backbone(backbone["name"], bool(backbone["pretrained"]), backbone["weights_path"], **bb_kw)
        _check_layer_decay(optimizer.get("layer_decay"), self.backbone)
        data_cfg = backbone_data_config(self.backbone)
        self.class_names: list[str] = class_names
        self.tag_names: list[str] = list(tag_names)
        self.series: dict[str, str] = {c: (series or {}).get(c, "") for c in class_names}
        self.image_size: int = int(image_size)
        self.eval_resize: str = str(eval_resize)  # how evaluation and recognition frame a picture (data.resize)
        self.face_view: dict[str, Any] | None = dict(_plain(face_view)) if face_view else None  # trained on face views too (data.face_view)
        self.partial_labels: bool = bool(partial_labels)  # a group picture trains towards any character it is filed under
        self.mean: tuple[float, ...] = tuple(float(x) for x in (mean if mean is not None else data_cfg["mean"]))
        self.std: tuple[float, ...] = tuple(float(x) for x in (std if std is not None else data_cfg["std"]))
        self.hparams["mean"], self.hparams["std"] = list(self.mean), list(self.std)
        dim = int(self.backbone.num_features)
        self.feature_dim: int = dim
        self.embed_dim: int = spec.dim or dim
        self.dropout = nn.Dropout(float(dropout))
        self.char_head = nn.Linear(dim, len(class_names))
        self.tag_head = nn.Linear(dim, len(self.tag_names)) if self.tag_names else None
        self.identity = IdentityHead(dim, len(class_names), spec) if spec.dim else None
        weights = torch.tensor(class_weights, dtype=torch.float32) if class_weights is not None else None
        self.register_buffer("class_weights", weights, persistent=False)
        self._build_metrics()
        if init_from:
            self.warm_start(init_from)

    def warm_start(self, checkpoint_path: str | Path) -> dict[str, int]:
        """Copy weights from an earlier checkpoint: the whole backbone, and the head rows of the characters/tags it knew.

        The fine-tuning path of log fusion: characters added since keep a fresh row, the rest start where they were.
        """
        p = Path(checkpoint_path)
        if not p.is_file():
            raise WeightsError(f"model.init_from: checkpoint {p} not found; point it at a train.py checkpoint or drop it")
        try:
            ckpt = torch.load(str(p), map_location="cpu", weights_only=False)
            state, hp = ckpt["state_dict"], ckpt["hyper_parameters"]
        except Exception as exc:  # noqa: BLE001 - torch/pickle raise many types for a bad file
            raise WeightsError(f"model.init_from: {p} is not a CharacterClassifier checkpoint ({type(exc).__name__}); retrain or fix the path") from None
        if hp.get("backbone", {}).get("name") != self.hparams["backbone"]["name"]:
            raise ConfigError(
                f"model.init_from: {p} has backbone {hp.get('backbone', {}).get('name')!r}, this model "
                f"{self.hparams['backbone']['name']!r}; use the same model.backbone.name"
            )
        bb = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
        self.backbone.load_state_dict(bb)
        copied = {"characters": _copy_rows(self.char_head, state, "char_head", hp.get("class_names", []), self.class_names)}
        if self.tag_head is not None:
            copied["tags"] = _copy_rows(self.tag_head, state, "tag_head", hp.get("tag_names", []), self.tag_names)
        if self.identity is not None:
            copied["identity"] = self.identity.warm_start(state, "identity", hp.get("class_names", []), self.class_names)
        return copied

    # -- model ------------------------------------------------------------------------------
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features [N, F]: what the character and tag heads read."""
        return self.backbone(x)

    def embedding(self, feats: torch.Tensor) -> torch.Tensor:
        """The gallery embedding of pooled features: the identity head's unit vectors, else the features themselves."""
        return self.identity(feats) if self.identity is not None else feats

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Gallery embedding [N, embed_dim] of images (unit length with an identity head; else raw pooled features)."""
        return self.embedding(self.features(x))

    def outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(embedding, character logits, tag logits) from one backbone pass: what recognition and the ONNX export run."""
        feats = self.features(x)
        return (self.embedding(feats), *self.heads(feats))

    def heads(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(character logits [N, C], tag logits [N, T]; T may be 0) from pooled features: lets one backbone pass serve
        the gallery embedding and the heads at inference."""
        char_logits = self.char_head(self.dropout(feats))
        tag_logits = self.tag_head(feats) if self.tag_head is not None else feats.new_zeros((feats.shape[0], 0))
        return char_logits, tag_logits

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(character logits [N, C], tag logits [N, T]; T may be 0)."""
        return self.heads(self.features(x))

    # -- metrics ----------------------------------------------------------------------------
    def _build_metrics(self) -> None:
        n = len(self.class_names)
        # Under DDP the train metrics are computed per rank and averaged by Lightning (`sync_dist`; the distributed
        # sampler gives every rank as many pictures). Synced by torchmetrics in `on_train_epoch_end` they were a
        # collective rank 0 reached after its progress bar's own (the bar runs on rank 0 only, before this hook):
        # `train.py trainer=ddp` hung at the end of its first epoch.
        self.train_acc = FiledAccuracy(n, top_k=1, sync_on_compute=False)  # train/acc: read as val/acc is (any character filed)
        self.train_acc_strict = MulticlassAccuracy(num_classes=n, average="micro", sync_on_compute=False)
        self.val_acc = FiledAccuracy(n, top_k=5)  # val/acc: right when naming any character the picture is filed under
        self.val_acc_strict = MulticlassAccuracy(num_classes=n, average="micro")  # each copy on its own label
        self.val_f1 = MulticlassF1Score(num_classes=n, average="macro")
        self.val_tag_ap = TagMeanAveragePrecision(len(self.tag_names)) if self.tag_names else None

    def _losses(self, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        x, y, tags = batch[:3]  # a 4th item, when there, is the filed-characters mask (val/acc; partial_labels' loss)
        filed = batch[3] if self.partial_labels and len(batch) > 3 else None
        feats = self.features(x)
        char_logits, tag_logits = self.heads(feats)
        char_loss = filed_cross_entropy(char_logits, y, filed, self.class_weights, self.hparams.label_smoothing)
        tag_loss = F.binary_cross_entropy_with_logits(tag_logits, tags) if tag_logits.shape[1] else char_loss.new_zeros(())
        id_loss = self.identity.loss(self.identity(feats), y, self.class_weights) if self.identity is not None else char_loss.new_zeros(())
        loss = char_loss + self.hparams.tag_loss_weight * tag_loss + self.identity_weight * id_loss
        return {"loss": loss, "char_loss": char_loss, "tag_loss": tag_loss, "id_loss": id_loss, "char_logits": char_logits,
                "tag_logits": tag_logits}

    @property
    def identity_weight(self) -> float:
        return float(self.identity.spec.weight) if self.identity is not None else 0.0

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        out = self._losses(batch)
        logits = out["char_logits"].detach()
        self.train_acc.update(logits, batch[1], batch[3] if len(batch) > 3 else None)
        self.train_acc_strict.update(logits, batch[1])
        bs = batch[0].shape[0]
        self.log("train/loss", out["loss"], on_step=False, on_epoch=True, prog_bar=True, batch_size=bs, sync_dist=True)
        self.log("train/tag_loss", out["tag_loss"], on_step=False, on_epoch=True, batch_size=bs, sync_dist=True)
        if self.identity is not None:
            self.log("train/id_loss", out["id_loss"], on_step=False, on_epoch=True, batch_size=bs, sync_dist=True)
        return out["loss"]

    def on_train_epoch_end(self) -> None:
        self.log("train/acc", self.train_acc.compute()["acc"], prog_bar=True, sync_dist=True)
        self.log("train/acc_strict", self.train_acc_strict.compute(), sync_dist=True)
        for metric in (self.train_acc, self.train_acc_strict):
            metric.reset()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        out = self._losses(batch)
        logits, y = out["char_logits"], batch[1]
        bs = batch[0].shape[0]
        self.val_acc.update(logits, y, batch[3] if len(batch) > 3 else None)
        for metric in (self.val_acc_strict, self.val_f1):
            metric.update(logits, y)
        if self.val_tag_ap is not None:
            self.val_tag_ap.update(out["tag_logits"].sigmoid(), batch[2].long())
        self.log("val/loss", out["loss"], on_step=False, on_epoch=True, prog_bar=True, batch_size=bs, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        # torchmetrics has already gathered every rank's pictures, so each value is global and the same on every
        # rank; sync_dist's mean leaves it as it is and tells Lightning so (it warns per metric under DDP otherwise)
        acc = self.val_acc.compute()
        self.log("val/acc", acc["acc"], prog_bar=True, sync_dist=True)
        values = {"val/acc_top5": acc["acc_top_k"], "val/acc_strict": self.val_acc_strict.compute(),
                  "val/f1_macro": self.val_f1.compute()}
        # a character with no validation picture has no accuracy
        values.update({f"val_class_acc/{name}": v for name, v in zip(self.class_names, acc["per_class"]) if not torch.isnan(v)})
        if self.val_tag_ap is not None:
            tag_map = self.val_tag_ap.compute()  # NaN when no validation picture carries a tag: not logged
            if not torch.isnan(tag_map):
                values["val/tag_map"] = tag_map
            self.val_tag_ap.reset()
        self.log_dict(values, sync_dist=True)
        for metric in (self.val_acc, self.val_acc_strict, self.val_f1):
            metric.reset()

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        char_logits, tag_logits = self(x)
        return {"probs": char_logits.softmax(-1), "tag_probs": tag_logits.sigmoid()}

    # -- optimisation -----------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW (heads at ``head_lr_multiplier`` x lr) with cosine annealing and optional linear warm-up."""
        o = dict(self.hparams.optimizer)
        name, lr, wd = str(o.pop("name")).lower(), float(o.pop("lr")), float(o.pop("weight_decay"))
        head_mult = float(o.pop("head_lr_multiplier", 1.0))
        decay = o.pop("layer_decay", None)
        heads = [p for head in (self.char_head, self.tag_head, self.identity) if head is not None for p in head.parameters()]
        groups = [*self._body_param_groups(lr, wd, decay), {"params": heads, "lr": lr * head_mult}]
        opt = OPTIMIZERS[name](groups, lr=lr, weight_decay=wd, **o)
        s = self.hparams.scheduler
        if str(s.get("name", "cosine")).lower() in ("none", "constant"):
            return {"optimizer": opt}
        max_epochs = self.trainer.max_epochs if self.trainer is not None and self.trainer.max_epochs else 1
        total = max(1, int(max_epochs if max_epochs > 0 else 1))
        warm = min(int(s.get("warmup_epochs", 0) or 0), total - 1)
        floor = float(s.get("min_lr_ratio", 0.0))

        def factor(epoch: int) -> float:
            import math

            if epoch < warm:
                return (epoch + 1) / (warm + 1)
            t = (epoch - warm) / max(1, total - warm)
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    def _body_param_groups(self, lr: float, weight_decay: float, layer_decay: float | None) -> list[dict[str, Any]]:
        """The backbone's optimizer groups: one at ``lr``, or with ``layer_decay`` timm's per-layer groups.

        Layer-wise decay gives the top layer ``lr`` and each layer below ``layer_decay`` times the one above, so the
        early, generic layers move least (timm's grouping; bias and norm parameters then take no weight decay)."""
        if layer_decay is None:
            return [{"params": list(self.backbone.parameters()), "lr": lr}]
        groups = param_groups_layer_decay(self.backbone, weight_decay=weight_decay, layer_decay=float(layer_decay))
        return [{"params": g["params"], "lr": lr * g["lr_scale"], "weight_decay": g["weight_decay"]} for g in groups]

    # -- checkpoints ------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Weights are in the state dict: a reload must not fetch pretrained weights again."""
        hp = checkpoint.get("hyper_parameters")
        if isinstance(hp, dict) and isinstance(hp.get("backbone"), dict):
            hp = checkpoint["hyper_parameters"] = dict(hp)
            hp["backbone"] = {**copy.deepcopy(hp["backbone"]), "pretrained": False, "weights_path": None}

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: str | Path, map_location: Any = None, **kwargs: Any) -> "CharacterClassifier":  # type: ignore[override]
        """Lightning's loader with one-line `WeightsError`s for a missing or corrupt file."""
        p = Path(checkpoint_path)
        if not p.is_file():
            raise WeightsError(f"checkpoint {p} not found; train one with `python train.py` or fix the path")
        try:
            return super().load_from_checkpoint(str(p), map_location=map_location, **kwargs)
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - torch/pickle raise many types for a bad file
            raise WeightsError(
                f"checkpoint {p} could not be loaded ({type(exc).__name__}: {str(exc)[:200]}); is it a CharacterClassifier checkpoint?"
            ) from None
