"""Learning-rate schedules used by the bundle."""

from __future__ import annotations

__all__ = ["LinearDecay"]


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
