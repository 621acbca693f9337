"""The epoch budget (``epoch_budget`` in conf/train.yaml): a schedule of ``trainer.max_epochs`` shortened to the epochs
that fit a number of training steps, so a small set runs the whole schedule and a big one keeps its time."""

from __future__ import annotations

from typing import Any, Mapping

from ..errors import ConfigError
from ..log import training_log


def batches_per_epoch(n_batches: int, limit: float | None, world_size: int = 1) -> int:
    """The training steps (batches) one process runs per epoch: its share of `n_batches`, after Lightning's
    ``limit_train_batches`` (an int caps the count, a float takes that fraction)."""
    per_rank = -(-int(n_batches) // max(1, int(world_size)))
    if limit is None or (isinstance(limit, float) and limit >= 1.0):
        return per_rank
    return min(per_rank, int(limit)) if isinstance(limit, int) else int(per_rank * float(limit))


def budgeted_epochs(max_epochs: int, steps_per_epoch: int, max_steps: int | None, min_epochs: int = 1) -> int:
    """`max_epochs`, shortened to the epochs that fit `max_steps` training steps but never below `min_epochs`: a small
    set runs the whole schedule, a big one keeps the time its steps take (`epoch_budget` in conf/train.yaml)."""
    if not max_steps or steps_per_epoch <= 0 or max_epochs <= 0:
        return max_epochs
    return max(min(max_epochs, int(min_epochs)), min(max_epochs, int(max_steps) // int(steps_per_epoch)))


def apply_epoch_budget(trainer: Any, steps_per_epoch: int, budget: Mapping[str, Any] | None) -> int:
    """Shorten `trainer`'s schedule to `budget` (``max_steps``, ``min_epochs``) for a dataset of `steps_per_epoch`
    training steps per process (`batches_per_epoch`); the epochs it runs. The model's cosine schedule reads
    ``trainer.max_epochs``, so it spans the shortened run."""
    if budget is not None and not isinstance(budget, Mapping):
        raise ConfigError(f"epoch_budget={budget!r} is not a mapping; give epoch_budget.max_steps=<steps> (and min_epochs)")
    budget = dict(budget or {})
    unknown = sorted(set(budget) - {"max_steps", "min_epochs"})
    if unknown:
        raise ConfigError(f"epoch_budget: unknown key(s) {', '.join(unknown)}; choose from max_steps, min_epochs")
    bad = ConfigError(f"epoch_budget={budget}: max_steps and min_epochs must be positive whole numbers (max_steps: null for no budget)")
    try:
        max_steps = int(budget["max_steps"]) if budget.get("max_steps") else None  # null (or 0): no budget
        min_epochs = 1 if budget.get("min_epochs") is None else int(budget["min_epochs"])
    except (TypeError, ValueError):
        raise bad from None
    if (max_steps is not None and max_steps < 1) or min_epochs < 1:
        raise bad
    planned = trainer.max_epochs
    if max_steps is None or not planned or planned < 0 or getattr(trainer, "fast_dev_run", False):
        return planned
    epochs = budgeted_epochs(planned, steps_per_epoch, max_steps, min_epochs)
    if epochs != planned:
        trainer.fit_loop.max_epochs = epochs
        training_log.info(f"epoch budget: {epochs} of trainer.max_epochs={planned} epochs ({steps_per_epoch} steps each, "
                          f"epoch_budget.max_steps={max_steps}, min_epochs={min_epochs})")
    return epochs
