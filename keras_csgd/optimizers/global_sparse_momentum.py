"""Global sparse momentum SGD (GSM): a global top-Q mask on every step."""

import numbers

import keras
import tensorflow as tf

from keras_csgd.optimizers.nonfinite import all_finite, check_on_nonfinite
from keras_csgd.sparsity import check_density, is_kernel, top_q_threshold


def _gsm_step(
    variables,
    grads,
    momentums,
    skipped,
    learning_rate,
    decays,
    q,
    momentum,
    nesterov,
):
    """One GSM step on plain (per-device) variables; see `GSM`.

    `decays[i]` is the weight decay of `variables[i]`, `None` for a
    non-kernel variable (never masked, never decayed). A step with a
    non-finite gradient leaves every variable as it was and adds 1 to
    `skipped`.
    """
    grads = [tf.cast(g, v.dtype) for g, v in zip(grads, variables)]
    values = [v.read_value() for v in variables]
    finite = all_finite(grads)
    scores = [
        tf.abs(tf.cast(w * g, tf.float32)) if d is not None else None
        for w, g, d in zip(values, grads, decays)
    ]
    flat = [tf.reshape(s, [-1]) for s in scores if s is not None]
    if flat:
        threshold = top_q_threshold(tf.concat(flat, 0), q)
    for variable, w, g, z, d, score in zip(
        variables, values, grads, momentums, decays, scores
    ):
        if d is not None:
            g = d * w + tf.where(score >= threshold, g, tf.zeros_like(g))
        z_old = z.read_value()
        z_new = momentum * z_old + g
        step = g + momentum * z_new if nesterov else z_new
        w_new = w - tf.cast(learning_rate, w.dtype) * step
        z.assign(tf.where(finite, z_new, z_old))
        variable.assign(tf.where(finite, w_new, w))
    skipped.assign_add(tf.cast(tf.logical_not(finite), skipped.dtype))



@keras.saving.register_keras_serializable(package="keras_csgd")
class GSM(keras.optimizers.Optimizer):
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
    zero score is active too). The whole update runs as one XLA-compiled
    function when `jit_compile=True`, whatever the model's own `jit_compile`.

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
            `gradient_accumulation_steps`, `name`).

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
        clipnorm=None,
        clipvalue=None,
        global_clipnorm=None,
        use_ema=False,
        ema_momentum=0.99,
        ema_overwrite_frequency=None,
        loss_scale_factor=None,
        gradient_accumulation_steps=None,
        name=None,
        **kwargs,
    ):
        super().__init__(
            learning_rate=learning_rate,
            name=name,
            weight_decay=None,
            clipnorm=clipnorm,
            clipvalue=clipvalue,
            global_clipnorm=global_clipnorm,
            use_ema=use_ema,
            ema_momentum=ema_momentum,
            ema_overwrite_frequency=ema_overwrite_frequency,
            loss_scale_factor=loss_scale_factor,
            gradient_accumulation_steps=gradient_accumulation_steps,
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
        if not isinstance(momentum, numbers.Real) or not 0 <= momentum < 1:
            raise ValueError(
                f"`momentum` must be a float in [0, 1). Received: "
                f"momentum={momentum!r}"
            )
        if not isinstance(weight_decay, numbers.Real) or weight_decay < 0:
            raise ValueError(
                "`weight_decay` must be a float >= 0. "
                f"Received: weight_decay={weight_decay!r}"
            )
        check_on_nonfinite(on_nonfinite)
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov)
        self.kernel_weight_decay = float(weight_decay)
        self.jit_compile = bool(jit_compile)
        self.on_nonfinite = on_nonfinite

    def build(self, variables):
        """Creates one momentum per variable and the `skipped_steps` count.

        Args:
            variables: the model variables the optimizer will update.
        """
        if self.built:
            return
        super().build(variables)
        self.momentums = self.add_optimizer_variables(variables, "momentum")
        self.skipped_steps = self.add_variable(
            shape=(), dtype="int64", initializer="zeros", name="skipped_steps"
        )
        # One function per optimizer: its traces hold this model's variables.
        self._step_fn = tf.function(_gsm_step, jit_compile=self.jit_compile)

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        # The mask spans all variables: one function updates them all, on
        # the all-reduced gradients, once per device.
        decays = tuple(
            (self.kernel_weight_decay if self._use_weight_decay(v) else 0.0)
            if is_kernel(v)
            else None
            for v in trainable_variables
        )
        momentums = [
            self.momentums[self._get_variable_index(v)].value
            for v in trainable_variables
        ]
        variables = [
            v.value if isinstance(v, keras.Variable) else v
            for v in trainable_variables
        ]
        grads = [
            g
            for g, _ in self._all_reduce_sum_gradients(zip(grads, variables))
        ]
        if isinstance(learning_rate, keras.Variable):
            learning_rate = learning_rate.value
        tf.__internal__.distribute.interim.maybe_merge_call(
            self._distributed_gsm_step,
            self._distribution_strategy,
            grads,
            variables,
            momentums,
            learning_rate,
            decays,
        )

    def _distributed_gsm_step(
        self, distribution, grads, variables, momentums, learning_rate, decays
    ):
        def local(value, replica):
            values = distribution.experimental_local_results(value)
            return values[replica] if len(values) > 1 else values[0]

        n = sum(
            v.shape.num_elements()
            for v, d in zip(variables, decays)
            if d is not None
        )
        replicas = len(distribution.experimental_local_results(variables[0]))
        for r in range(replicas):
            local_grads = [local(g, r) for g in grads]
            local_vars = [local(v, r) for v in variables]
            with tf.device(local_vars[0].device):
                if self.on_nonfinite == "raise":
                    tf.debugging.Assert(
                        all_finite(local_grads),
                        ["GSM received a non-finite (NaN or Inf) gradient."],
                    )
                self._step_fn(
                    local_vars,
                    local_grads,
                    [local(z, r) for z in momentums],
                    local(self.skipped_steps.value, r),
                    local(learning_rate, r),
                    decays,
                    int(n * self.density),
                    self.momentum,
                    self.nesterov,
                )

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "density": None if self.compression else self.density,
                "compression": self.compression,
                "momentum": self.momentum,
                "nesterov": self.nesterov,
                "weight_decay": self.kernel_weight_decay,
                "jit_compile": self.jit_compile,
                "on_nonfinite": self.on_nonfinite,
            }
        )
        return config
