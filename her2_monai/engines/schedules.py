"""Learning-rate schedules used by the bundle."""

from __future__ import annotations

import math

import torch

__all__ = ["LinearDecay", "WarmupCosine", "CLASSIFIER_SCHEDULES", "classifier_lr_scheduler"]

CLASSIFIER_SCHEDULES: tuple[str, ...] = ("cosine", "plateau")


class LinearDecay:
    """pix2pix schedule as a ``LambdaLR`` factor: constant for ``n_constant`` epochs, then linearly down to 0.

    The factor for (0-based) epoch ``e`` is ``1 - max(0, e + 1 - n_constant) / (n_total - n_constant + 1)``, so the last
    epoch still trains with a small positive rate.

    Args:
        n_constant: epochs at the initial rate.
        n_total: total epochs.

    Raises:
        ValueError: if ``n_constant`` is negative or larger than ``n_total``.
    """

    def __init__(self, n_constant: int, n_total: int) -> None:
        if not 0 <= n_constant <= n_total:
            raise ValueError(f"need 0 <= n_constant <= n_total, got n_constant={n_constant}, n_total={n_total}")
        self.n_constant = int(n_constant)
        self.n_decay = int(n_total) - int(n_constant)

    def __call__(self, epoch: int) -> float:
        return 1.0 - max(0, epoch + 1 - self.n_constant) / float(self.n_decay + 1)


class WarmupCosine:
    """Per-iteration ``LambdaLR`` factor: a linear warm-up, then a half cosine down to ``final_factor``.

    A short from-scratch run needs the rate to fall to nearly zero by its end: at a constant rate the validation score
    of the last epochs swings by tens of points, so the epoch that happens to be last (or best) is a lottery.

    Args:
        total_steps: optimizer steps of the whole run (epochs x iterations per epoch).
        warmup_steps: steps of the linear warm-up from ``1 / (warmup_steps + 1)`` of the rate.
        final_factor: factor reached at the last step.

    Raises:
        ValueError: if ``total_steps`` is below 1, ``warmup_steps`` is negative or not below ``total_steps``, or
            ``final_factor`` is outside ``[0, 1]``.
    """

    def __init__(self, total_steps: int, warmup_steps: int = 0, final_factor: float = 0.01) -> None:
        if total_steps < 1:
            raise ValueError(f"total_steps must be at least 1, got {total_steps}")
        if not 0 <= warmup_steps < total_steps:
            raise ValueError(f"need 0 <= warmup_steps < total_steps, got {warmup_steps} and {total_steps}")
        if not 0.0 <= final_factor <= 1.0:
            raise ValueError(f"final_factor must be in [0, 1], got {final_factor}")
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.final_factor = float(final_factor)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        span = max(1, self.total_steps - self.warmup_steps - 1)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.final_factor + (1.0 - self.final_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def classifier_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    schedule: str,
    epochs: int,
    steps_per_epoch: int,
    warmup_epochs: float = 1.0,
    plateau_patience: int = 5,
) -> torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau:
    """The stage-2 learning-rate schedule named by ``schedule``.

    Args:
        optimizer: the classifier's optimizer.
        schedule: ``"cosine"`` (:class:`WarmupCosine`, stepped every iteration; for short runs) or ``"plateau"``
            (``ReduceLROnPlateau`` on the validation macro-F1, stepped after each validation; for long runs).
        epochs: training epochs.
        steps_per_epoch: optimizer steps per epoch (``len(train_loader)``).
        warmup_epochs: warm-up length of ``"cosine"`` in epochs.
        plateau_patience: validations without improvement before ``"plateau"`` divides the rate by 10.

    Returns:
        The scheduler.

    Raises:
        ValueError: on an unknown ``schedule`` or a run without steps.
    """
    if schedule not in CLASSIFIER_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {CLASSIFIER_SCHEDULES}, got '{schedule}'")
    if schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.1, patience=plateau_patience)
    total = int(epochs) * int(steps_per_epoch)
    if total < 1:
        raise ValueError(f"the cosine schedule needs at least one step, got {epochs} epochs x {steps_per_epoch} steps")
    warmup = min(int(round(warmup_epochs * steps_per_epoch)), total - 1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(total, warmup))
