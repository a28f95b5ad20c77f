"""Centripetal SGD (C-SGD): momentum SGD that collapses filter clusters.

Ding et al., "Centripetal SGD for Pruning Very Deep Convolutional Networks
with Complicated Structure", CVPR 2019 (arXiv 1904.03837).
"""

from __future__ import annotations

import dataclasses
import math

import keras
import numpy as np
from keras import ops

from keras_csgd.optimizers.base import Optimizer, check_float
from keras_csgd.plan import coerce_plan
from keras_csgd.sparsity import is_kernel

_STATISTICS = ("moving_mean", "moving_variance")


@dataclasses.dataclass(frozen=True)
class _Rule:
    """The gradient `g'` that one trainable variable is updated with.

    Clustered (`segments` set): `g' = mean_H(g - eps w) + (lam + eps) w`,
    `mean_H` over the entries along `axis` with equal `segments`; the sums
    run in one segment sum over all clustered variables, where entry `p`
    (row-major over the other axes) of channel `c` is segment
    `base + segments[c] * per_channel + p`. A removed block's gate
    (`zero`): `g' = (lam + eps) w`, the loss gradient dropped, so it
    decays to 0. Otherwise `g' = g + lam w`.
    """

    lam: float
    eps: float = 0.0
    axis: int = 0
    segments: np.ndarray | None = None
    inv_counts: np.ndarray | None = None
    base: int = 0
    zero: bool = False

    def segment_ids(self, shape):
        """Global segment id of every entry of the variable, flattened."""
        rest = [d for i, d in enumerate(shape) if i != self.axis]
        per_channel = math.prod(rest)
        entry = ops.expand_dims(
            ops.reshape(ops.arange(per_channel, dtype="int32"), rest),
            self.axis,
        )
        segment = self._along_axis(self.segments, len(shape))
        return ops.reshape(self.base + segment * per_channel + entry, [-1])

    def gradient(self, grad, w, sums):
        """`g'` from the segment sums of `g - eps w` (see the class)."""
        if self.zero:
            return (self.lam + self.eps) * w
        if self.segments is None:
            return grad + self.lam * w if self.lam else grad
        mean = ops.cast(
            ops.reshape(ops.take(sums, self.segment_ids(w.shape)), w.shape),
            w.dtype,
        ) * ops.cast(self._along_axis(self.inv_counts, len(w.shape)), w.dtype)
        return mean + (self.lam + self.eps) * w

    def _along_axis(self, values, rank):
        shape = [1] * rank
        shape[self.axis] = len(values)
        return ops.reshape(ops.convert_to_tensor(values), shape)


@keras.saving.register_keras_serializable(package="keras_csgd")
class CSGD(Optimizer):
    """Centripetal SGD: momentum SGD that pulls each filter cluster together.

    Every variable of a planned channel group (producer kernels and biases,
    BatchNormalization gamma/beta, depthwise kernels, ...) gets, for entry
    `i` of cluster `H` along its channel axis:

    ```python
    g_i = mean(g[H]) + lam * w_i + eps * (w_i - mean(w[H]))
    velocity = momentum * velocity - learning_rate * g
    w = w + momentum * velocity - learning_rate * g   # nesterov=True
    w = w + velocity                                  # nesterov=False
    ```

    Kernels (rank >= 2) use `lam = weight_decay`, `eps = centripetal_strength`;
    1-D variables use `lam = 0`, `eps = vector_strength_scale *
    centripetal_strength`. The loss gradient no longer separates the
    members of a cluster; their differences only shrink (by
    `1 - lr * (lam + eps)` per step before momentum), so each cluster
    collapses to one point and `kc.slim(model, plan)` then removes the
    duplicates without changing the outputs.

    A residual block the plan removes (`plan.remove_blocks`) is pulled to
    zero the same way: its branch's gate (the last normalization's `gamma`
    and `beta`, or the last Conv/Dense kernel and bias; `plan.gates`) gets
    `g = (lam + eps) * w` with no loss gradient, so it decays like a
    cluster's spread and the rest of the network learns without the
    branch; once it is 0, `kc.slim` drops the block exactly. Variables
    outside the plan get momentum SGD with `weight_decay` on kernels only.
    Weight decay is part of `g` above and is never applied a second time by
    the base class.

    The cluster means of all clustered variables come from one segment sum
    (no `n x n` matrices), computed for all variables at once (in one
    XLA-compiled function when `jit_compile=True`, whatever the model's own
    `jit_compile`); the momentum step then runs per variable. It runs
    inside `model.fit`, custom loops (`apply_gradients`), learning-rate
    schedules, `keras.optimizers.LossScaleOptimizer` and
    `tf.distribute.MirroredStrategy` (TensorFlow backend), and on the JAX
    backend (where `jit_compile` has no effect: the JAX trainer compiles the
    whole train step). A step whose
    gradients hold NaN or Inf is skipped (`iterations` still advances) and
    counted in `skipped_steps` (`on_nonfinite="skip"`), or raises
    (`on_nonfinite="raise"`).

    Args:
        plan: a bound `kc.PruningPlan` (from `kc.make_plan(model, ...)`), or
            its JSON (`plan.to_json()`).
        learning_rate: a float, a
            `keras.optimizers.schedules.LearningRateSchedule`, or a callable
            without arguments. Defaults to `0.01`.
        momentum: float in `[0, 1]`. Defaults to `0.9`.
        nesterov: whether to apply Nesterov momentum. Defaults to `True`.
        centripetal_strength: `eps` of kernels, the pull of every filter
            towards its cluster mean. Defaults to `3e-3` (the reference value
            on CIFAR; 0.05 on ImageNet ResNet-50).
        weight_decay: L2 coefficient `lam` of kernels (rank >= 2), clustered
            or not, kept in `optimizer.kernel_weight_decay` (the base class's
            decoupled `optimizer.weight_decay` stays `None`, so decay is never
            applied twice). Biases and normalization parameters get none;
            `exclude_from_weight_decay()` applies. Defaults to `1e-4`.
        vector_strength_scale: 1-D clustered variables (bias, BN gamma/beta,
            PReLU alpha) use `eps = vector_strength_scale *
            centripetal_strength`. Defaults to `0.1`.
        on_nonfinite: `"skip"`: a step with a NaN/Inf gradient changes no
            variable and increments `skipped_steps`; `"raise"`: it raises
            `tf.errors.InvalidArgumentError` naming the variable (checked
            outside XLA: inside a train step that is itself XLA-compiled,
            `model.compile(jit_compile=True)`, XLA drops runtime checks and
            the step is skipped as with `"skip"`). Defaults to `"skip"`.
        jit_compile: whether to XLA-compile the cluster means. Defaults to
            `True`.
        **kwargs: the base optimizer's keyword arguments (`clipnorm`,
            `clipvalue`, `global_clipnorm`, `use_ema`, `ema_momentum`,
            `ema_overwrite_frequency`, `loss_scale_factor`,
            `gradient_accumulation_steps`, `name`), forwarded by
            `keras_csgd.optimizers.base.Optimizer`.

    Raises:
        TypeError: if `plan` is not a `PruningPlan` or its JSON.
        ValueError: for an unbound plan, a plan of a prune-only group
            (`ChannelGroup.exact` is False) or an invalid hyperparameter; at
            `build`, if the plan names variables that are missing from the
            trainable variables (another model, or frozen layers) or whose
            channel axis has another length.

    Example:

    ```python
    plan = kc.make_plan(model, keep=0.625, method="kmeans")
    model.compile(optimizer=kc.CSGD(plan, learning_rate=3e-2),
                  loss="sparse_categorical_crossentropy")
    model.fit(x, y, epochs=30)
    slim = kc.slim(model, plan)  # same outputs, fewer channels
    ```

    References:
        Ding, Ding, Guo, Han. Centripetal SGD for Pruning Very Deep
        Convolutional Networks with Complicated Structure. CVPR 2019.
        arXiv 1904.03837.
    """

    def __init__(
        self,
        plan,
        learning_rate=0.01,
        momentum=0.9,
        nesterov=True,
        centripetal_strength=3e-3,
        weight_decay=1e-4,
        vector_strength_scale=0.1,
        on_nonfinite="skip",
        jit_compile=True,
        **kwargs,
    ):
        super().__init__(
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            on_nonfinite=on_nonfinite,
            jit_compile=jit_compile,
            **kwargs,
        )
        self.plan = coerce_plan(plan, "`CSGD`")
        inexact = {n: g.prune_only for n, g in self.plan.groups.items()
                   if not g.exact}
        if inexact:
            raise ValueError(
                "`CSGD` promises a slim model equal to the trained one, "
                "which a prune-only group cannot give (removing or merging "
                f"its channels changes its normalization): {inexact}. Leave "
                "these groups out of the plan (`kc.make_plan` does), or "
                "prune them with `kc.methods.magnitude_plan` / "
                "`kc.plan_from_scores` and fine-tune."
            )
        self.momentum = check_float("momentum", momentum, high=1.0)
        self.nesterov = bool(nesterov)
        self.centripetal_strength = check_float(
            "centripetal_strength", centripetal_strength
        )
        self.vector_strength_scale = check_float(
            "vector_strength_scale", vector_strength_scale
        )

    def _build_state(self, variables):
        # Binds the plan by variable path (raises for another model's plan),
        # then one momentum buffer per variable.
        self._rules = self._bind(variables)
        self.momentums = []
        if self.momentum != 0:
            self.momentums = self.add_optimizer_variables(variables, "momentum")

    def _bind(self, variables) -> tuple[_Rule, ...]:
        segments = self.plan.variable_segments()
        gates = self._gate_paths()
        by_path = {v.path: v for v in variables}
        missing = sorted(
            p
            for p in [*segments, *gates]
            if p not in by_path and p.rsplit("/", 1)[-1] not in _STATISTICS
        )
        if missing:
            raise ValueError(
                "The plan names variables that are not among the optimizer's "
                "trainable variables (the plan was made for another model, "
                f"or the layers are frozen): {missing}"
            )
        mismatched = [
            f"{p}: shape {tuple(by_path[p].shape)}, plan axis {axis} of "
            f"length {len(seg)}"
            for p, (axis, seg, _) in segments.items()
            if p in by_path
            and (
                axis >= len(by_path[p].shape)
                or by_path[p].shape[axis] != len(seg)
            )
        ]
        if mismatched:
            raise ValueError(
                "The plan does not match the shapes of the model's "
                f"variables (was it made for another model?): {mismatched}"
            )
        rules, base = [], 0
        for v in variables:
            lam = self._kernel_decay(v)
            if v.path in gates:
                rules.append(_Rule(lam, self._strength(v), zero=True))
                continue
            axis, seg, num = segments.get(v.path, (0, None, 0))
            if seg is None or num == len(seg):
                rules.append(_Rule(lam))
                continue
            counts = np.bincount(seg, minlength=num)[seg]
            rules.append(
                _Rule(lam, self._strength(v), axis, seg.astype(np.int32),
                      1.0 / counts, base)
            )
            base += num * math.prod(v.shape) // len(seg)
        self._num_segments = base
        return tuple(rules)

    def _gate_paths(self) -> set[str]:
        """Paths of the removed blocks' gate variables (see the class)."""
        if self.plan.remove_blocks and self.plan.gates is None:
            raise ValueError(
                "The plan removes blocks "
                f"{list(self.plan.remove_blocks)} but does not know their "
                "gates, the variables `CSGD` drives to zero so that the "
                "slim model equals the trained one. Call "
                "`plan.bind_blocks(model)` first (the plan makers that "
                "remove blocks do)."
            )
        return {p for paths in (self.plan.gates or {}).values()
                for p in paths}

    def _strength(self, variable) -> float:
        """`eps`: `centripetal_strength`, scaled on 1-D variables."""
        eps = self.centripetal_strength
        return eps if is_kernel(variable) else eps * self.vector_strength_scale

    def _effective_gradients(self, grads, values, indices):
        # `g'` of every variable (see `_Rule`), the cluster sums of all
        # clustered variables in one segment sum.
        rules = [self._rules[i] for i in indices]
        pulled = [
            (
                r.segment_ids(w.shape),
                ops.cast(ops.reshape(g - r.eps * w, [-1]), "float32"),
            )
            for r, g, w in zip(rules, grads, values)
            if r.segments is not None
        ]
        sums = None
        if pulled:
            ids, xs = zip(*pulled)
            sums = ops.segment_sum(
                ops.concatenate(xs),
                ops.concatenate(ids),
                num_segments=self._num_segments,
            )
        return [r.gradient(g, w, sums) for r, g, w in zip(rules, grads, values)]

    def update_step(self, gradient, variable, learning_rate):
        """Momentum step of one variable with its `g'` (`gradient`)."""
        step = ops.cast(learning_rate, variable.dtype) * gradient
        if not self.momentums:
            self._assign_unless_skipped(gradient, [(variable, variable - step)])
            return
        m = self.momentums[self._get_variable_index(variable)]
        mu = ops.cast(self.momentum, variable.dtype)
        m_new = mu * m - step
        w_new = variable - (step - mu * m_new if self.nesterov else -m_new)
        self._assign_unless_skipped(gradient, [(m, m_new), (variable, w_new)])

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "plan": self.plan.to_json(),
                "momentum": self.momentum,
                "nesterov": self.nesterov,
                "centripetal_strength": self.centripetal_strength,
                "vector_strength_scale": self.vector_strength_scale,
            }
        )
        return config
