"""Asymptotic soft filter pruning (ASFP) and soft filter pruning (SFP)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import keras
import numpy as np
from scipy.optimize import brentq

from keras_csgd import blocks, checks, graph
from keras_csgd.callbacks.soft_zeroing import Producer
from keras_csgd.methods.magnitude import NORMS, row_norms
from keras_csgd.plan import PruningPlan

SCHEDULES = ("asymptotic", "constant")
BATCHNORM_MODES = ("kernel", "scale")
RANKINGS = ("folded", "kernel")


def asymptotic_speed(decay: float) -> float:
    """`s = k * T` of the ASFP curve, which depends only on `decay`.

    `P(t) = a exp(-k t) + b` with `P(0) = 0` gives `b = -a`, so
    `P(t) = b (1 - exp(-k t))`. `P(T) = rate` and `P(decay T) = 3/4 rate`
    leave one equation for `s = k T`:

    ```
    1 - exp(-s * decay) = 3/4 * (1 - exp(-s))
    ```

    It has a positive root exactly when `0 < decay < 3/4`; it has no closed
    form for general `decay` and is solved with Brent's method. For
    `decay = 1/8`, `s = 11.0894...`, close to the approximation
    `8 ln 4 = 11.0904` of `P(t) = rate (1 - 4^(-8 t / T))`.

    Args:
        decay: `D`, the fraction of the epochs at which 3/4 of the rate is
            reached.

    Returns:
        `s > 0`.
    """

    def h(s):
        return -math.expm1(-s * decay) + 0.75 * math.expm1(-s)

    return brentq(h, 1e-9, 60.0 / decay, xtol=1e-14, rtol=1e-15)


@keras.saving.register_keras_serializable(package="keras_csgd")
class AsymptoticSoftFilterPruning(keras.callbacks.Callback):
    """Zeroes the weakest filters after every epoch; they keep training.

    Before the first epoch and at the end of every epoch, in every prunable
    channel group (`kc.channel_groups(model)`, less `skip`), the
    `round(P(t) * size)` channels with the smallest filter norm get their
    producer filters zeroed (kernels only, biases stay; see `batchnorm` for
    filters followed by a BN). The norm of
    a channel is taken over ALL producers of its group (see
    `kc.methods.magnitude.filter_norms`), so coupled residual layers are
    pruned together. The zeroed filters keep being trained and may grow
    back; the choice is remade from the current norms each time.

    The ASFP rate after `t` completed epochs of `T`:

    ```
    P(t) = a * exp(-k t) + b,  P(0) = 0,  P(decay T) = 3/4 rate,  P(T) = rate
         = rate * (1 - exp(-s t / T)) / (1 - exp(-s))
    a = -rate / (1 - exp(-s)),  b = -a,  k = s / T
    ```

    with `s` from `asymptotic_speed(decay)` (about `8 ln 4` for the
    default `decay = 1/8`); `P` stays at `rate` after `T`.
    `schedule="constant"` is SFP: `P(t) = rate` from the start.

    Behind a `BatchNormalization`, a zero kernel is not a small filter: the
    batch variance of its channel is 0, so its first gradient is scaled by
    `gamma / sqrt(epsilon)` (316 gamma at `epsilon=1e-5`) and the regrown
    filter is normalised back to full scale at once. With
    `batchnorm="kernel"` (the papers' rule, the default) the kernel is
    zeroed all the same, and the BN moving mean of the zeroed channels is
    set to what a zero filter outputs (its bias, or 0), so inference sees
    the same constant `beta` as training. With `batchnorm="scale"` a
    producer followed by its own `BatchNormalization` is treated as one
    filter, `gamma / sqrt(moving_variance + epsilon) * kernel`: its norm
    ranks the channels (with `ranking="kernel"`, the kernel's norm
    alone), and zeroing it sets the BN's `gamma` and `beta` to
    0. The channel then outputs exactly 0 after its BN, as if removed, so
    behind ReLU-like activations `kc.slim` has no constant to fold and is
    exact behind any consumer; the kernel keeps its values and all three
    keep training, so the channel regrows from 0 at the normal pace. On a
    CIFAR ResNet-20 (`epsilon=1e-5`, coupled residual groups at rate
    0.375), `"kernel"` training collapses within three epochs and
    `"scale"` does not (`benchmarks/cifar10.py`). Producers without their
    own BN are zeroed by kernel in both modes.

    The epoch comes from the `epoch` argument of the callback hooks (not a
    counter), so training resumed by `keras.callbacks.BackupAndRestore`
    continues the schedule; weights are changed with `variable.assign`, so
    it runs under a `tf.distribute` strategy. `round` is half-up
    (`floor(x + 0.5)`), and at least one channel per group stays.

    After `fit`, `plan` is the bound `PruningPlan` of the channels kept at
    the last step (singleton clusters; groups where nothing was zeroed are
    not in it): `kc.slim(model, callback.plan)` builds the hard-pruned
    model. It equals the soft-pruned one where the consumers are 1x1
    convolutions, dense layers or behind global pooling (the constant BN
    output of a zeroed filter is folded into the consumer bias); behind a
    k x k convolution with zero padding, the folded constant is wrong only
    on the border positions that the padding reaches.

    Args:
        rate: the final fraction of channels zeroed, in [0, 1), or a dict
            `{group_name: fraction}` (only those groups are pruned; see
            `from_plan`).
        epochs: `T`, the epochs over which the rate grows. Defaults to
            `None`: the `epochs` of the `fit` call.
        decay: `D`, the fraction of `T` at which 3/4 of `rate` is reached,
            in (0, 0.75). Defaults to `0.125`.
        norm: filter norm, `"l2"` (ASFP's) or `"l1"` (called `criterion`
            before; `norm` as in `kc.methods.magnitude_plan`). Defaults to
            `"l2"`.
        schedule: `"asymptotic"` (ASFP) or `"constant"` (SFP). Defaults to
            `"asymptotic"`.
        skip: names of groups never pruned. Defaults to `()`.
        batchnorm: how a producer followed by a `BatchNormalization` is
            zeroed: `"kernel"` (its kernel) or `"scale"` (its BN `gamma` and
            `beta`). Defaults to `"kernel"`.
        ranking: what ranks the channels of a producer zeroed by its BN
            (`batchnorm="scale"`): `"folded"`, the norm of the BN-folded
            filter, or `"kernel"`, the norm of its kernel alone, as in
            `batchnorm="kernel"` and the papers. While a channel's `gamma`
            is 0 its kernel gets no gradient from the loss, so a zeroed
            channel keeps its kernel's rank and the choice settles. On
            `keras-csgd prune --method asfp`'s flow (a trained CIFAR
            ResNet-20, 3 epochs, a 0.5 latency plan), `"kernel"` scored
            0.6 points above `"folded"` over 8 seeds, and is its setting.
            Defaults to `"folded"`.
        verbose: `1` prints the rate and the zeroed channels at each
            epoch end. Defaults to `1`.
        remove_blocks: residual blocks that `.plan` removes (carried from
            a plan by `from_plan`). They are soft-pruned too: at the end of
            every epoch the gate of each block's branch (its last
            normalization's `gamma` and `beta`, or its last Conv/Dense
            kernel and bias; see `keras_csgd.blocks`) is scaled by
            `1 - P(t) / rate`, so the branch fades on the filters' schedule
            and is exactly 0 from epoch `T` on: `kc.slim(model, .plan)`
            then equals the soft-pruned model. Defaults to `()`.
        steps: prune every `steps` training batches instead of at every
            epoch's end: `t` counts these intervals, `T` is `epochs` worth
            of them, and the last (shorter) interval ends with training.
            For schedules of a few epochs, where channels that regrow for a
            whole epoch and are zeroed at its end cost accuracy that no
            epoch is left to recover (`keras-csgd prune --method asfp`).
            Defaults to `None`: every epoch.

    Raises:
        ValueError: a bad argument; when training starts, a `skip` name that
            is not a group of the model.

    Example:

    ```python
    asfp = kc.callbacks.AsymptoticSoftFilterPruning(rate=0.4)
    model.fit(x, y, epochs=30, callbacks=[asfp])
    slim = kc.slim(model, asfp.plan)
    ```

    References:
        He, Dong, Kang, Fu, Yang. Asymptotic Soft Filter Pruning for Deep
        Convolutional Neural Networks. arXiv 1808.07471. He, Kang, Dong,
        Fu, Yang. Soft Filter Pruning for Accelerating Deep Convolutional
        Neural Networks. IJCAI 2018.
    """

    def __init__(
        self,
        rate,
        epochs=None,
        decay=0.125,
        norm="l2",
        schedule="asymptotic",
        skip=(),
        batchnorm="kernel",
        verbose=1,
        remove_blocks=(),
        steps=None,
        ranking="folded",
    ):
        super().__init__()
        if isinstance(rate, Mapping):
            rate = {
                str(name): checks.fraction(
                    f"rate[{name!r}]", r, low_open=False, high_closed=False
                )
                for name, r in rate.items()
            }
        else:
            rate = checks.fraction("rate", rate, low_open=False,
                                   high_closed=False)
        checks.positive_int("epochs", epochs, allow_none=True)
        checks.positive_int("steps", steps, allow_none=True)
        # P(decay T) = 3/4 rate needs 0 < decay < 3/4.
        checks.number("decay", decay, 0, 0.75, low_open=True, high_open=True)
        checks.choice("norm", norm, NORMS)
        checks.choice("schedule", schedule, SCHEDULES)
        checks.choice("batchnorm", batchnorm, BATCHNORM_MODES)
        checks.choice("ranking", ranking, RANKINGS)
        if isinstance(skip, str):
            raise TypeError(
                "`skip` must be a list of group names, not a string. "
                f"Received: skip={skip!r}"
            )
        self.rate = rate
        self.remove_blocks = tuple(remove_blocks)
        self.epochs = epochs
        self.steps = steps
        self.decay = float(decay)
        self.norm = norm
        self.schedule = schedule
        self.skip = tuple(skip)
        self.batchnorm = batchnorm
        self.ranking = ranking
        self.verbose = verbose
        self._speed = asymptotic_speed(self.decay)
        self.plan = None
        self._groups = []
        self._all_groups = []
        self._producers = {}
        self._gates = []
        self._zeroed = {}
        self._started = False
        self._batches = 0
        self._intervals = None

    def rate_at(self, epoch):
        """Fraction of channels zeroed after `epoch` completed epochs.

        Args:
            epoch: completed epochs `t` (0 = before training).

        Returns:
            `P(t)` as a float.

        Raises:
            ValueError: `epochs=None` and no `fit` has set the epoch count.
        """
        progress = self.progress_at(epoch)
        if isinstance(self.rate, dict):
            return {name: r * progress for name, r in self.rate.items()}
        return self.rate * progress

    def progress_at(self, epoch):
        """`P(t) / rate`: the schedule's progress after `epoch` epochs.

        It scales the gates of the removed blocks by `1 - progress` (see
        the class).

        Raises:
            ValueError: `epochs=None` and no `fit` has set the epoch count.
        """
        if self.schedule == "constant":
            return 1.0
        total = (self._intervals if self.steps else
                 self.epochs or (self.params or {}).get("epochs"))
        if not total:
            raise ValueError(
                "`rate_at` needs the number of epochs: pass `epochs=` to "
                "AsymptoticSoftFilterPruning or call it during `fit`."
            )
        t = min(max(float(epoch), 0.0), float(total))
        s = self._speed
        return math.expm1(-s * t / total) / math.expm1(-s)

    @classmethod
    def from_plan(cls, plan, **kwargs):
        """A callback that prunes each group of `plan` to the plan's width.

        Each planned group's final rate is `1 - width / size` (groups not
        in the plan are not pruned), and `.plan` after `fit` carries the
        plan's `remove_blocks`: a plan of `kc.plan_for_latency` trains
        with soft pruning and slims to its widths and blocks.

        Args:
            plan: a bound `kc.PruningPlan`.
            **kwargs: the other constructor arguments.

        Returns:
            An `AsymptoticSoftFilterPruning`.
        """
        groups = plan.require_bound("`AsymptoticSoftFilterPruning.from_plan`")
        rate = {
            name: 1.0 - len(clusters) / groups[name].size
            for name, clusters in plan.clusters.items()
        }
        return cls(rate, remove_blocks=plan.remove_blocks, **kwargs)

    def on_train_begin(self, logs=None):
        # Under `keras.distillation.Distiller` (`kc.fine_tune` with a
        # teacher) callbacks see the distiller: prune its student.
        model = getattr(self.model, "student", self.model)
        an = graph.analyze(model)
        groups = an.groups
        names = {g.name for g in groups}
        unknown = sorted(set(self.skip) - names)
        if unknown:
            raise ValueError(
                f"`skip` names groups the model does not have: {unknown}. "
                f"Received: skip={list(self.skip)!r}"
            )
        if isinstance(self.rate, dict):
            prunable = {g.name for g in groups if g.prunable}
            bad = sorted(set(self.rate) - prunable)
            if bad:
                raise ValueError(
                    "`rate` names groups that are not prunable groups of "
                    f"the model: {bad}. Received: rate={self.rate!r}"
                )
        self._all_groups = groups
        self._groups = [
            g for g in groups if g.prunable and g.name not in self.skip
            and (not isinstance(self.rate, dict) or g.name in self.rate)
        ]
        self._producers = {
            g.name: [
                Producer(
                    graph.get_variable(model, path), axis,
                    graph.following_batchnorm(an.layers[lname],
                                              scaled=True),
                    getattr(an.layers[lname], "bias", None),
                )
                for lname, path, axis in g.producers
            ]
            for g in self._groups
        }
        self._gates = [
            graph.get_variable(model, path)
            for paths in blocks.branch_gates(model,
                                             self.remove_blocks).values()
            for path in paths
        ]
        self._zeroed = {}
        self._started = False
        self._batches = 0
        if self.steps:
            params = self.params or {}
            per_epoch = params.get("steps")
            if not per_epoch:
                raise ValueError(
                    "`steps=` needs the number of batches per epoch: pass "
                    "`steps_per_epoch` to `fit`, or data of known size."
                )
            epochs = self.epochs or params.get("epochs")
            self._intervals = math.ceil(epochs * per_epoch / self.steps)
        self.plan = None

    def on_epoch_begin(self, epoch, logs=None):
        if not self._started:
            self._started = True
            self._prune(self.rate_at(0 if self.steps else epoch))

    def on_train_batch_end(self, batch, logs=None):
        if self.steps:
            self._batches += 1
            if self._batches % self.steps == 0:
                self._step(self._batches // self.steps)

    def on_epoch_end(self, epoch, logs=None):
        top = self._step(epoch + 1) if not self.steps else self._top(
            self.rate_at(self._batches // self.steps))
        if logs is not None:
            logs["asfp_rate"] = top

    def _step(self, t):
        """Prunes at `P(t)` and scales the block gates; returns the rate."""
        rate = self.rate_at(t)
        count = self._prune(rate)
        scale = 1.0 - self.progress_at(t)
        for gate in self._gates:
            gate.assign(gate * scale)
        top = self._top(rate)
        if self.verbose:
            total = sum(g.size for g in self._groups)
            unit = "Step" if self.steps else "Epoch"
            print(
                f"\n{unit} {t * (self.steps or 1)}: "
                f"AsymptoticSoftFilterPruning zeroed {count} of {total} "
                f"channels (rate {top:.4f})."
            )
        return top

    @staticmethod
    def _top(rate):
        return (max(rate.values(), default=0.0) if isinstance(rate, dict)
                else rate)

    def on_train_end(self, logs=None):
        if self.steps and self._batches % self.steps:
            self._step(self._intervals)  # the last, shorter interval
        clusters = {
            name: [[int(i)] for i in np.setdiff1d(np.arange(size), zeroed)]
            for name, (size, zeroed) in self._zeroed.items()
            if len(zeroed)
        }
        self.plan = PruningPlan(clusters, groups=self._all_groups,
                                remove_blocks=self.remove_blocks)

    def _prune(self, rate):
        """Zeroes the weakest filters of every group; returns their count."""
        count = 0
        scaled = self.batchnorm == "scale"
        folded = scaled and self.ranking == "folded"
        for g in self._groups:
            r = rate[g.name] if isinstance(rate, dict) else rate
            n = min(g.size - 1, math.floor(r * g.size + 0.5))
            producers = self._producers[g.name]
            rows = np.concatenate(
                [p.filters(folded) for p in producers], axis=1
            )
            norms = row_norms(rows, self.norm)
            zeroed = np.sort(np.argsort(norms, kind="stable")[:n])
            if n:
                for producer in producers:
                    producer.zero(zeroed, scaled)
            self._zeroed[g.name] = (g.size, zeroed)
            count += n
        return count

    def get_config(self):
        return {
            "rate": self.rate,
            "epochs": self.epochs,
            "decay": self.decay,
            "norm": self.norm,
            "schedule": self.schedule,
            "skip": list(self.skip),
            "batchnorm": self.batchnorm,
            "verbose": self.verbose,
            "remove_blocks": list(self.remove_blocks),
            "steps": self.steps,
            "ranking": self.ranking,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**checks.renamed(config, {"criterion": "norm"},
                                    cls.__name__))
