"""`MacsTargetCallback`: steers the adaptive gates' penalty to a budget."""

from __future__ import annotations

import keras

from keras_csgd import checks


@keras.saving.register_keras_serializable(package="keras_csgd")
class MacsTargetCallback(keras.callbacks.Callback):
    """Adjusts the gate penalty weight towards the gates' budget.

    Every `steps` training batches, or at the end of each epoch when
    `steps=None`, the cost of the model pruned at the current gates
    (`AdaptiveGates.estimated_cost`: MACs, or milliseconds for a latency
    target) is compared with the target (`AdaptiveGates.target`). Above
    it, the penalty weight is multiplied by `factor`. At or below it:

    - `lock=True` (the default): `AdaptiveGates.lock` holds the gates that
      `finalize` would close at exactly 0 and sets the penalty weight to 0,
      once and for all. The rest of training fine-tunes the pruned network
      inside the gated model, and the removal by `finalize()` is exact.
    - `lock=False`: the weight is divided by `factor` (the gates keep
      moving; `finalize` closes the smallest ones, not all of them at 0).

    With `lock_by`, the gates are locked after that many training batches
    if the target has not been reached by then: `lock` closes the lowest
    gates down to the budget, so the cost meets the target all the same,
    and the batches after it fine-tune the pruned network. A short
    schedule (a few epochs) rarely grows the penalty enough to reach the
    budget by itself, and gates that never lock are not removed exactly.

    Writes `macs`, `penalty_weight` and, for a latency target,
    `latency_ms` into the epoch logs.

    `get_config` holds every argument, `gates` as the controller object
    itself: the config copies a callback in memory (callbacks are not saved
    with models, and a controller does not serialize).

    Args:
        gates: the `kc.methods.adaptive.AdaptiveGates` whose gates are
            trained.
        factor: multiplicative step of the weight, `> 1`. Defaults to `1.5`.
        steps: adjust every `steps` batches instead of every epoch: several
            times per epoch lets the penalty grow within a short schedule.
            Defaults to `None`.
        lock: lock the gates when the target is first reached. Defaults to
            `True`.
        lock_by: lock the gates after this many training batches (counted
            from 1 over all epochs) at the latest, whatever the cost; needs
            `lock=True`. Defaults to `None`: only on reaching the target.

    Attributes:
        locked_at_step: the training batch (counted from 1 over all epochs)
            after which this callback locked the gates, or `None`.

    Raises:
        ValueError: `factor <= 1`, `steps` or `lock_by` not a positive int
            or `None`, or `lock_by` with `lock=False`.

    Example:

    ```python
    callback = kc.callbacks.MacsTargetCallback(gates, factor=1.1, steps=25)
    gates.model.fit(x, y, epochs=20, callbacks=[callback])
    ```
    """

    def __init__(self, gates, factor=1.5, steps=None, lock=True,
                 lock_by=None):
        super().__init__()
        if not factor > 1:
            raise ValueError(
                f"`factor` must be > 1. Received: factor={factor!r}"
            )
        checks.positive_int("steps", steps, allow_none=True)
        checks.positive_int("lock_by", lock_by, allow_none=True)
        if lock_by is not None and not lock:
            raise ValueError("`lock_by` needs `lock=True`.")
        self.gates = gates
        self.factor = float(factor)
        self.steps = steps
        self.lock = bool(lock)
        self.lock_by = lock_by
        self.locked_at_step = None
        self._batches = 0

    def _adjust(self) -> None:
        if self.gates.locked:
            return
        if self.gates.estimated_cost() > self.gates.target:
            self.gates.penalty_weight *= self.factor
        elif self.lock:
            self.gates.lock()
            self.locked_at_step = self._batches
        else:
            self.gates.penalty_weight /= self.factor

    def on_train_batch_end(self, batch, logs=None):
        self._batches += 1
        if self.steps is not None and self._batches % self.steps == 0:
            self._adjust()
        if self._batches == self.lock_by and not self.gates.locked:
            self.gates.lock()
            self.locked_at_step = self._batches

    def on_epoch_end(self, epoch, logs=None):
        if self.steps is None:
            self._adjust()
        if logs is not None:
            logs["macs"] = self.gates.estimated_macs()
            logs["penalty_weight"] = self.gates.penalty_weight
            if self.gates.latency_target is not None:
                logs["latency_ms"] = self.gates.estimated_cost()

    def get_config(self):
        return {
            "gates": self.gates,
            "factor": self.factor,
            "steps": self.steps,
            "lock": self.lock,
            "lock_by": self.lock_by,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)
