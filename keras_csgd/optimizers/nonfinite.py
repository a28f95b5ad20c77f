"""The NaN/Inf gradient check shared by the optimizers."""

from keras import ops

ON_NONFINITE = ("skip", "raise")


def all_finite(tensors):
    """Whether no entry of `tensors` is NaN or Inf, as a scalar tensor.

    `x * 0` is 0 for finite `x` and NaN otherwise; one sum over all
    tensors compiles and runs much faster under XLA than one `isfinite`
    reduction per tensor (ResNet-56 update: about 12 s instead of 48 s to
    compile on 2 CPU cores).
    """
    flat = [ops.reshape(ops.cast(t, "float32"), [-1]) for t in tensors]
    return ops.isfinite(ops.sum(ops.concatenate(flat) * 0.0))


def check_on_nonfinite(on_nonfinite) -> None:
    """Raises `ValueError` unless `on_nonfinite` is "skip" or "raise"."""
    if on_nonfinite not in ON_NONFINITE:
        raise ValueError(
            f"`on_nonfinite` must be one of {ON_NONFINITE}. "
            f"Received: on_nonfinite={on_nonfinite!r}"
        )
