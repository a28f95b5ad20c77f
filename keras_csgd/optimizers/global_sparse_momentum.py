"""Global sparse momentum SGD (GSM): a global top-Q mask on every step."""

import numbers

import keras
from keras import ops

from keras_csgd.optimizers.base import Optimizer, check_float
from keras_csgd.sparsity import check_density, is_kernel, top_q_threshold


@keras.saving.register_keras_serializable(package="keras_csgd")
class GSM(Optimizer):
    """Global sparse momentum SGD: only the global top-Q weights learn.

    On every step, each weight `w` of every trainable kernel (rank >= 2; all
    kernels of the model together) is scored by `|w * g|` (first-order Taylor
    estimate of its effect on the loss, `g` = loss gradient). The `Q` best,
    `Q = int(N * density)` of the `N` kernel weights, form the mask `B`; the
    others receive only weight decay and shrink towards zero. Biases and
    normalization parameters train with plain momentum SGD. The per-layer
    densities are not set by hand: they follow from the global ranking.
    Finish with `kc.sparsify(model, density)`.

    ```python
    # kernels (B = 1 for the global top-Q of |w * g|, recomputed every step)
    z = momentum * z + weight_decay * w + B * g
    # other variables
    z = momentum * z + g
    w = w - learning_rate * z
    # nesterov=True:
    w = w - learning_rate * (weight_decay * w + B * g + momentum * z)
    ```

    One momentum buffer per variable, never reset. The selection finds the
    `Q`-th largest score exactly by bisection on counts over the scores' bit
    patterns (`kc.sparsity.top_q_threshold`), measured faster than
    `tf.math.top_k` and `tf.sort` (`benchmarks/gsm_selection.py`): exactly
    `Q` weights are active when no score ties the threshold; scores tied with
    it are all active (e.g. when fewer than `Q` scores are nonzero, every
    zero score is active too). The scores, the selection and the masked
    gradients of all variables run in one XLA-compiled function when
    `jit_compile=True`, whatever the model's own `jit_compile`; the momentum
    step then runs per variable. TensorFlow backend only: the selection
    (`kc.sparsity.top_q_threshold`) is written in `tf.*`.

    Args:
        density: fraction of kernel weights kept active, in (0, 1]. Set
            exactly one of `density` and `compression`. Defaults to `None`.
        compression: compression ratio `C >= 1`; `density = 1 / C`. Defaults
            to `None`.
        learning_rate: a float, a
            `keras.optimizers.schedules.LearningRateSchedule` instance, or a
            callable that takes no arguments and returns the value to use.
            Defaults to `0.01`.
        momentum: float in [0, 1), the momentum `beta`. Defaults to `0.98`.
        nesterov: whether to apply Nesterov momentum. Defaults to `False`.
        weight_decay: float >= 0, the L2 coefficient `lambda` added to the
            kernels' momentum, kept in `optimizer.kernel_weight_decay` (the
            base class's decoupled `optimizer.weight_decay` stays `None`, so
            decay is never applied twice). `exclude_from_weight_decay()`
            applies. Defaults to `1e-4`.
        jit_compile: whether the update (selection included) is compiled with
            XLA. Defaults to `True`.
        on_nonfinite: `"skip"` leaves weights and momentum unchanged on a
            step whose gradient has a NaN or Inf and counts it in
            `optimizer.skipped_steps` (the `iterations` counter still
            advances); `"raise"` fails the step with
            `tf.errors.InvalidArgumentError`. XLA drops runtime assertions,
            so inside a model compiled with `jit_compile=True` `"raise"`
            behaves like `"skip"`. Defaults to `"skip"`.
        **kwargs: the base optimizer's keyword arguments (`clipnorm`,
            `clipvalue`, `global_clipnorm`, `use_ema`, `ema_momentum`,
            `ema_overwrite_frequency`, `loss_scale_factor`,
            `gradient_accumulation_steps`, `name`), forwarded by
            `keras_csgd.optimizers.base.Optimizer`.

    Raises:
        ValueError: if not exactly one of `density` and `compression` is
            set, or an argument is out of range.

    Example:

    ```python
    model.compile(optimizer=kc.GSM(compression=10, learning_rate=5e-3),
                  loss="sparse_categorical_crossentropy")
    model.fit(x, y, epochs=10)
    kc.sparsify(model, density=0.1)
    ```

    References:
        Ding et al., Global Sparse Momentum SGD for Pruning Very Deep Neural
        Networks, NeurIPS 2019 (arXiv 1909.12778).
    """

    def __init__(
        self,
        density=None,
        compression=None,
        learning_rate=0.01,
        momentum=0.98,
        nesterov=False,
        weight_decay=1e-4,
        jit_compile=True,
        on_nonfinite="skip",
        **kwargs,
    ):
        super().__init__(
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            on_nonfinite=on_nonfinite,
            jit_compile=jit_compile,
            **kwargs,
        )
        if (density is None) == (compression is None):
            raise ValueError(
                "Exactly one of `density` and `compression` must be set. "
                f"Received: density={density!r}, compression={compression!r}"
            )
        if compression is not None:
            if (
                isinstance(compression, bool)
                or not isinstance(compression, numbers.Real)
                or not compression >= 1
            ):
                raise ValueError(
                    "`compression` must be a number >= 1. "
                    f"Received: compression={compression!r}"
                )
            self.compression = float(compression)
            self.density = 1.0 / self.compression
        else:
            self.density = check_density(density)
            self.compression = None
        self.momentum = check_float("momentum", momentum, high=1, closed=False)
        self.nesterov = bool(nesterov)

    def _build_state(self, variables):
        # One momentum per variable, never reset; the weight decay of every
        # kernel (`None`: not a kernel, never masked).
        self.momentums = self.add_optimizer_variables(variables, "momentum")
        self._decays = [
            self._kernel_decay(v) if is_kernel(v) else None for v in variables
        ]

    def _effective_gradients(self, grads, values, indices):
        # `weight_decay * w + B * g` for kernels, `B` the global top-Q mask
        # of `|w * g|`; `g` for the other variables.
        decays = [self._decays[i] for i in indices]
        scores = [
            ops.abs(ops.cast(w * g, "float32")) if d is not None else None
            for w, g, d in zip(values, grads, decays)
        ]
        flat = [ops.reshape(s, [-1]) for s in scores if s is not None]
        if not flat:
            return grads
        n = sum(f.shape[0] for f in flat)
        threshold = top_q_threshold(
            ops.concatenate(flat), int(n * self.density)
        )
        return [
            g
            if d is None
            else d * w + ops.where(score >= threshold, g, ops.zeros_like(g))
            for w, g, d, score in zip(values, grads, decays, scores)
        ]

    def update_step(self, gradient, variable, learning_rate):
        """Momentum step of one variable with its masked `gradient`."""
        z = self.momentums[self._get_variable_index(variable)]
        z_new = self.momentum * z + gradient
        step = gradient + self.momentum * z_new if self.nesterov else z_new
        w_new = variable - ops.cast(learning_rate, variable.dtype) * step
        self._assign_unless_skipped(gradient, [(z, z_new), (variable, w_new)])

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "density": None if self.compression else self.density,
                "compression": self.compression,
                "momentum": self.momentum,
                "nesterov": self.nesterov,
            }
        )
        return config
