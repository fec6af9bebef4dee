"""Detect a diverging run from its step losses, before the bad update is applied.

A step diverges when its loss is NaN or infinite, or finite but more than
`threshold` times the moving average of the previous `window` finite losses. The
moving-average test starts once `min_history` losses exist, so the first noisy steps
of a fine-tune do not trip it. The trainer runs the check after the backward pass and before
`optimizer.step()`, so the model still holds the last good weights when a
checkpoint is saved.

Gradient-norm spikes (a norm above `threshold` times its moving average) are
reported by `check_grad_norm` for logging only: early in a fine-tune, newly added
token embeddings routinely produce spikes that recover on their own.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Optional


class DivergenceDetector:
    """Moving averages of the step loss and gradient norm.

    Checkpoint behaviour: `state_dict()` contains the recent losses and gradient
    norms, so a resumed run judges its first steps against the same averages;
    `threshold`, `window` and `min_history` come from the constructor.
    """

    def __init__(self, threshold: float = 5.0, window: int = 50, min_history: int = 5):
        self.threshold = threshold
        self.window = window
        self.min_history = min_history
        self._losses: deque[float] = deque(maxlen=window)
        self._grad_norms: deque[float] = deque(maxlen=window)

    @property
    def loss_average(self) -> Optional[float]:
        return sum(self._losses) / len(self._losses) if self._losses else None

    @property
    def grad_norm_average(self) -> Optional[float]:
        return sum(self._grad_norms) / len(self._grad_norms) if self._grad_norms else None

    def check_loss(self, loss: float) -> Optional[str]:
        """Return why `loss` counts as divergence, or None and add it to the moving average."""
        if not math.isfinite(loss):
            return f"loss is {loss}"
        average = self.loss_average
        if average is not None and len(self._losses) >= self.min_history and loss > self.threshold * average:
            return f"loss {loss:.4f} is above {self.threshold:g} x the moving average {average:.4f}"
        self._losses.append(loss)
        return None

    def check_grad_norm(self, grad_norm: float) -> Optional[str]:
        """Return a description of a gradient-norm spike (for a warning), or None."""
        if not math.isfinite(grad_norm):
            return f"gradient norm is {grad_norm}"
        average = self.grad_norm_average
        spike = None
        if average is not None and len(self._grad_norms) >= self.min_history and grad_norm > self.threshold * average:
            spike = f"gradient norm {grad_norm:.4g} is above {self.threshold:g} x the moving average {average:.4g}"
        self._grad_norms.append(grad_norm)
        return spike

    def state_dict(self) -> dict:
        return {"losses": list(self._losses), "grad_norms": list(self._grad_norms)}

    def load_state_dict(self, state: dict) -> None:
        self._losses = deque(state.get("losses", []), maxlen=self.window)
        self._grad_norms = deque(state.get("grad_norms", []), maxlen=self.window)
