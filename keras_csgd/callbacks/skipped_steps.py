"""`SkippedSteps`: the count of non-finite steps the optimizer skipped."""

import warnings

import keras


@keras.saving.register_keras_serializable(package="keras_csgd")
class SkippedSteps(keras.callbacks.Callback):
    """Writes `logs["skipped_steps"]`: steps skipped for NaN/Inf gradients.

    `kc.CSGD` and `kc.GSM` (with `on_nonfinite="skip"`, their default) never
    write non-finite values into the weights: they skip the step and count
    it in `optimizer.skipped_steps`. This callback puts that count into the
    epoch logs, so it shows in `model.fit(...).history` (reading it every
    batch would cost a device sync per step). Other optimizers have no such
    count: the callback then warns once and writes nothing.

    Example:

    ```python
    skipped = kc.callbacks.SkippedSteps()
    history = model.fit(x, y, epochs=3, callbacks=[skipped])
    history.history["skipped_steps"]  # cumulative count, per epoch
    ```
    """

    def on_train_begin(self, logs=None):
        self._warned = False

    def _count(self):
        opt = self.model.optimizer
        opt = getattr(opt, "inner_optimizer", opt)
        counter = getattr(opt, "skipped_steps", None)
        if counter is None:
            if not self._warned:
                warnings.warn(
                    f"SkippedSteps: optimizer {type(opt).__name__} does not "
                    "count skipped steps; use kc.CSGD or kc.GSM.",
                    stacklevel=2,
                )
                self._warned = True
            return None
        return int(keras.ops.convert_to_numpy(counter))

    def on_epoch_end(self, epoch, logs=None):
        count = self._count()
        if logs is not None and count is not None:
            logs["skipped_steps"] = count

    def get_config(self):
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)
