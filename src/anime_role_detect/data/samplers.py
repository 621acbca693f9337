"""Class-balanced P x K batches (`data.balance=pk`): each batch holds P characters with K pictures each.

A contrastive identity loss (`model.embedding.loss=supcon`) learns from pairs inside a batch, so every batch needs
several pictures of the same character; drawn uniformly, a batch of 16 from 20 characters often has none. P x K
sampling also balances skewed classes: a character with few pictures is drawn as often as one with many (its
pictures are reused, reshuffled, when it runs out).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch.utils.data import Sampler

from ..errors import ConfigError


class PKSampler(Sampler[int]):
    """Indices in P x K order for a DataLoader with ``batch_size = P * K`` and ``shuffle=False``.

    An epoch has ``ceil(len(labels) / (P * K))`` batches, so it sees about as many pictures as a plain epoch. The
    order is reproducible from ``seed`` and the epoch (`set_epoch`, which Lightning calls; without it each new
    iteration counts as the next epoch)."""

    def __init__(self, labels: Sequence[int], batch_size: int, per_class: int, seed: int = 0) -> None:
        self.check(batch_size, per_class)
        self.labels = [int(v) for v in labels]
        self.k = int(per_class)
        classes = sorted(set(self.labels))
        self.p = min(int(batch_size) // self.k, len(classes))
        self.by_class = {c: [i for i, v in enumerate(self.labels) if v == c] for c in classes}
        self.seed = int(seed)
        self.epoch = 0
        self._explicit_epoch = False

    @staticmethod
    def check(batch_size: int, per_class: int) -> None:
        """One-line `ConfigError` unless a batch of `batch_size` holds two characters or more with `per_class` >= 2 each."""
        if int(per_class) < 2:
            raise ConfigError(f"data.pk_per_class={per_class}: P x K batches need at least 2 pictures per character")
        if int(batch_size) < 2 * int(per_class):
            raise ConfigError(
                f"data.batch_size={batch_size} with data.pk_per_class={per_class}: a P x K batch needs batch_size >= "
                f"2 x pk_per_class (two characters or more); raise data.batch_size or lower data.pk_per_class"
            )

    @property
    def batch_size(self) -> int:
        """What the DataLoader's ``batch_size`` must be: P x K."""
        return self.p * self.k

    def __len__(self) -> int:
        n_batches = -(-len(self.labels) // self.batch_size) if self.labels else 0
        return n_batches * self.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self._explicit_epoch = True

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if not self._explicit_epoch:
            self.epoch += 1
        classes = list(self.by_class)
        pools: dict[int, list[int]] = {c: [] for c in classes}

        def take(c: int) -> list[int]:
            out: list[int] = []
            while len(out) < self.k:
                if not pools[c]:
                    members = self.by_class[c]
                    pools[c] = [members[j] for j in torch.randperm(len(members), generator=g).tolist()]
                out.append(pools[c].pop())
            return out

        for _ in range(len(self) // self.batch_size):
            chosen = torch.randperm(len(classes), generator=g)[: self.p].tolist()
            for j in chosen:
                yield from take(classes[j])
