"""Training-step throughput: Lightning `Trainer.fit` vs a plain PyTorch loop, same model, batch and data.

Both paths run `CharacterClassifier`'s loss (character CE + tag BCE), AdamW and the train-accuracy
metric on the same in-memory batches; only the loop around them differs. Rounds alternate to
spread machine noise; the best round of each is compared. Target: Lightning overhead < 10%.

    python benchmarks/train_throughput.py                       # resnet10t, 96 px, batch 16
    python benchmarks/train_throughput.py --backbone efficientnet_lite0_offline --size 128
"""

from __future__ import annotations

import argparse
import time

import lightning as L
import torch
from _common import quiet
from torch.utils.data import DataLoader, TensorDataset

from anime_role_detect.models.classifier import CharacterClassifier


def make_model(backbone: str, n_classes: int, n_tags: int, seed: int, pretrained: bool = False) -> CharacterClassifier:
    torch.manual_seed(seed)
    return CharacterClassifier(
        class_names=[f"c{i}" for i in range(n_classes)],
        tag_names=[f"t{i}" for i in range(n_tags)],
        backbone={"name": backbone, "pretrained": pretrained},
        optimizer={"name": "adamw", "lr": 1e-4, "weight_decay": 1e-4, "head_lr_multiplier": 1.0},
        scheduler={"name": "none"},
    )


def make_loader(n_batches: int, batch: int, size: int, n_classes: int, n_tags: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    n = n_batches * batch
    x = torch.randn(n, 3, size, size, generator=g)
    y = torch.randint(0, n_classes, (n,), generator=g)
    tags = (torch.rand(n, n_tags, generator=g) > 0.7).float()
    return DataLoader(TensorDataset(x, y, tags), batch_size=batch, shuffle=False)


def plain_loop(model: CharacterClassifier, loader: DataLoader, warmup: int) -> float:
    """images/s of a hand-written loop over the same steps (after `warmup` batches)."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)
    t0, seen = 0.0, 0
    for i, batch in enumerate(loader):
        if i == warmup:
            t0, seen = time.perf_counter(), 0
        out = model._losses(batch)
        model.train_acc(out["char_logits"].detach(), batch[1])
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        seen += batch[0].shape[0]
    return seen / (time.perf_counter() - t0)


class _StepTimer(L.Callback):
    """Times the training batches after `warmup`, exactly as the plain loop does."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.t0, self.t1, self.seen = warmup, 0.0, 0.0, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            self.t0, self.seen = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx >= self.warmup:
            self.seen += batch[0].shape[0]
            self.t1 = time.perf_counter()


def lightning_loop(model: CharacterClassifier, loader: DataLoader, warmup: int, precision: str = "32-true",
                   callbacks: list[L.Callback] | None = None) -> float:
    """images/s of `Trainer.fit` training steps (after `warmup` batches), at `precision` with extra `callbacks`."""
    timer = _StepTimer(warmup)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=0, callbacks=[*(callbacks or []), timer], precision=precision,
    )
    trainer.fit(model, train_dataloaders=loader)
    return timer.seen / (timer.t1 - timer.t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="resnet10t")
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--batches", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = ap.parse_args()
    quiet(args.threads)
    loader = make_loader(args.batches, args.batch, args.size, 8, 24)
    plain, light = [], []
    for r in range(args.rounds):  # alternate so both see the same machine load
        plain.append(plain_loop(make_model(args.backbone, 8, 24, r), loader, args.warmup))
        light.append(lightning_loop(make_model(args.backbone, 8, 24, r), loader, args.warmup))
        print(f"round {r}: plain {plain[-1]:.1f} img/s, lightning {light[-1]:.1f} img/s")
    bp, bl = max(plain), max(light)
    print(
        f"{args.backbone} {args.size}px batch {args.batch}, {args.batches - args.warmup} timed steps x {args.rounds} rounds, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"plain PyTorch loop : {bp:8.1f} images/s (best round)")
    print(f"Lightning Trainer  : {bl:8.1f} images/s (best round)")
    print(f"ratio lightning/plain = {bl / bp:.3f}  (overhead {100 * (1 - bl / bp):+.1f}%; target < 10%)")


if __name__ == "__main__":
    main()
