"""Adaptive channel and layer pruning: learnt gates under a MACs budget.

"Cut off the channel and the layer adaptively; the proportion of each is
learned." `AdaptiveGates` inserts learnable gates into a copy of a trained
model: a per-channel gate (`ChannelGate`) on every prunable channel group and
a scalar gate (`BlockGate`) on the branch of every residual block. A
sparsity penalty on the gates (Hoyer-square per channel group, L1 per
block), each weighted by the MACs it controls, pulls them to zero; a
callback raises the penalty weight while the estimated MACs of the pruned
model are above the target and, once they reach it, locks the smallest
gates at exactly 0 and stops the penalty, so that the rest of training
fine-tunes the pruned network. `finalize` folds the gates back into
the weights and returns the plan (the channels whose gates are locked, or
fell lowest) and the residual blocks whose branch gate closed, which
`kc.slim(model, plan, remove_blocks=blocks)` removes (the Add is replaced by
its shortcut: layer removal).

References:
    Adaptive channel and layer pruning (seed abstract: "the proportion of
    each is learned"); the gates follow network slimming (Liu et al.,
    ICCV 2017, arXiv 1708.06519) and its budgeted variants; the channel
    penalty is DeepHoyer's Hoyer-square (Yang et al., ICLR 2020,
    arXiv 1908.09979).
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
from keras import ops

from keras_csgd import flops, graph
from keras_csgd.methods.similarity import response_layers
from keras_csgd.plan import PruningPlan

_POSITIVELY_HOMOGENEOUS = (keras.activations.linear, keras.activations.relu)


@keras.saving.register_keras_serializable(package="keras_csgd")
class ChannelGate(keras.layers.Layer):
    """Learnable non-negative per-channel scale with a sparsity penalty.

    Multiplies its input by `g = gate * mask` (`gate`: one entry per
    channel, initialised to 1, kept `>= 0` by a `NonNeg` constraint so that
    gates can reach exactly 0; `mask`: non-trainable, 1 until `lock` holds a
    gate at 0) and adds the loss `strength * cost * sum(g)**2 / sum(g**2)`,
    where `strength` is a non-trainable weight that `MacsTargetCallback`
    adjusts. This Hoyer-square measure counts the open gates (it is `k` for
    `k` equal open gates) and is blind to a common scale of all the gates.
    An L1 penalty is not: it shrinks all the gates of a layer together,
    which costs nothing when a BatchNormalization further on renormalises
    the channels, until their signal drowns in that BN's epsilon.

    Args:
        cost: weight of this gate's penalty (MACs per channel, as a fraction
            of the model's MACs, divided by the number of calls of the
            layer). Defaults to `1.0`.
        **kwargs: base `keras.layers.Layer` arguments (`name`, `dtype`).

    Example:

    ```python
    y = ChannelGate(cost=0.01)(x)  # x: (..., channels)
    ```

    References:
        Liu et al., "Learning Efficient Convolutional Networks through
        Network Slimming", arXiv 1708.06519.
    """

    def __init__(self, cost=1.0, **kwargs):
        super().__init__(**kwargs)
        self.cost = float(cost)

    def _gate_shape(self, input_shape):
        return (input_shape[-1],)

    def build(self, input_shape):
        self.gate = self.add_weight(
            shape=self._gate_shape(input_shape),
            initializer="ones",
            constraint="non_neg",
            name="gate",
        )
        self.mask = self.add_weight(
            shape=self._gate_shape(input_shape),
            initializer="ones",
            trainable=False,
            name="mask",
        )
        self.strength = self.add_weight(
            shape=(), initializer="zeros", trainable=False, name="strength"
        )

    def penalty(self, gate):
        """The sparsity measure of `gate` (before `strength * cost`)."""
        total = ops.sum(gate)
        return total * total / (ops.sum(gate * gate) + 1e-12)

    def call(self, x):
        gate = self.gate * self.mask
        self.add_loss(
            ops.cast(self.strength * self.cost, "float32")
            * ops.cast(self.penalty(gate), "float32")
        )
        return x * ops.cast(gate, x.dtype)

    def value(self) -> np.ndarray:
        """The effective gate, `gate * mask`, as a NumPy array."""
        return self.gate.numpy() * self.mask.numpy()

    def lock(self, keep) -> None:
        """Holds the gates where `keep` is False at exactly 0 from now on."""
        keep = np.asarray(keep, bool).reshape(self.mask.shape)
        self.mask.assign(self.mask.numpy() * keep)
        self.gate.assign(self.gate.numpy() * keep)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "cost": self.cost}


@keras.saving.register_keras_serializable(package="keras_csgd")
class BlockGate(ChannelGate):
    """Learnable non-negative scalar gate of a residual branch.

    Same as `ChannelGate` with one gate for all channels and an L1
    penalty, `strength * cost * gate`: multiplies the branch output before
    the residual `Add` (whose sum with the shortcut does depend on the
    gate's scale); a closed gate (0) makes the block the identity of its
    shortcut.

    Args:
        cost: weight of the penalty (the branch's MACs as a fraction of the
            model's MACs). Defaults to `1.0`.
        **kwargs: base `keras.layers.Layer` arguments.

    Example:

    ```python
    out = keras.layers.Add()([shortcut, BlockGate(cost=0.1)(branch)])
    ```
    """

    def _gate_shape(self, input_shape):
        return (1,)

    def penalty(self, gate):
        return ops.sum(gate)


@dataclasses.dataclass
class _Site:
    """Where one group's gate multiplies the model: its location layers."""

    group: str
    root: int
    size: int
    layers: list  # (qualified name, layer, producer (lname, path, axis)|None)


class MacsTargetCallback(keras.callbacks.Callback):
    """Adjusts the gate penalty weight towards a MACs target.

    Every `steps` training batches, or at the end of each epoch when
    `steps=None`, the MACs of the model pruned at the current gates
    (`AdaptiveGates.estimated_macs`) are compared with the target. Above
    it, the penalty weight is multiplied by `factor`. At or below it:

    - `lock=True` (the default): `AdaptiveGates.lock` holds the gates that
      `finalize` would close at exactly 0 and sets the penalty weight to 0,
      once and for all. The rest of training fine-tunes the pruned network
      inside the gated model, and the removal by `finalize()` is exact.
    - `lock=False`: the weight is divided by `factor` (the gates keep
      moving; `finalize` closes the smallest ones, not all of them at 0).

    Writes `macs` and `penalty_weight` into the epoch logs.

    Args:
        gates: the `AdaptiveGates` whose gates are trained.
        factor: multiplicative step of the weight, `> 1`. Defaults to `1.5`.
        steps: adjust every `steps` batches instead of every epoch: several
            times per epoch lets the penalty grow within a short schedule.
            Defaults to `None`.
        lock: lock the gates when the target is first reached. Defaults to
            `True`.

    Attributes:
        locked_at_step: the training batch (counted from 1 over all epochs)
            after which this callback locked the gates, or `None`.

    Example:

    ```python
    callback = MacsTargetCallback(gates, factor=1.1, steps=25)
    gates.model.fit(x, y, epochs=20, callbacks=[callback])
    ```
    """

    def __init__(self, gates, factor=1.5, steps=None, lock=True):
        super().__init__()
        if not factor > 1:
            raise ValueError(
                f"`factor` must be > 1. Received: factor={factor!r}"
            )
        if steps is not None and (
            isinstance(steps, bool) or not isinstance(steps, int) or steps < 1
        ):
            raise ValueError(
                "`steps` must be a positive int or None. "
                f"Received: steps={steps!r}"
            )
        self.gates = gates
        self.factor = float(factor)
        self.steps = steps
        self.lock = bool(lock)
        self.locked_at_step = None
        self._batches = 0

    def _adjust(self) -> None:
        if self.gates.locked:
            return
        macs = self.gates.estimated_macs()
        if macs > self.gates.macs_target:
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

    def on_epoch_end(self, epoch, logs=None):
        if self.steps is None:
            self._adjust()
        if logs is not None:
            logs["macs"] = self.gates.estimated_macs()
            logs["penalty_weight"] = self.gates.penalty_weight


class AdaptiveGates:
    """Learns which channels and which residual blocks to remove.

    Builds `.model`, a copy of `model` (same layer names, weights copied)
    with learnable gates:

    - a `ChannelGate` per prunable channel group, shared by all the places
      where the group's channels get their final per-channel scale: the
      outputs of the group's BatchNormalization layers, or of its producers
      for a group without BN (and of producers not followed by one of the
      group's BNs). A group is gated only when all these layers are
      top-level layers whose channel axis is exactly the group's channels
      (not after a Concatenate or a depth multiplier) and the gate can be
      folded back: BN with `scale=True`, producers with a linear or ReLU
      activation. Other groups are left as they are.
    - a `BlockGate` on the branch of every top-level two-input `Add` (the
      input that is not the shortcut, found as in `kc.slim`: the ancestor
      of the other input, else the one with fewer operations), when the
      branch ends in a BN with `scale=True` or a linear Conv/Dense used
      only by that Add.

    Each gate's penalty (see `ChannelGate`, `BlockGate`) is weighted by
    the MACs it controls, as a fraction of the model's MACs (per channel:
    the MACs of the layers that produce or read the group, divided by its
    size; per block: the MACs of the branch), times a global penalty
    weight that `.callback` adapts each epoch towards `macs_target` and,
    once the target is reached, locks the gates that go at exactly 0
    (`lock`): the rest of training fine-tunes the pruned network, and its
    removal is exact. Train `.model` with
    momentum SGD: its steps follow the MACs weighting, whereas Adam moves
    every gate at the same pace whatever it costs.

    `finalize` copies the trained weights back into `model`, folds the
    gates into them and returns what to remove; `model` is left untouched
    until then.

    Args:
        model: a trained functional `keras.Model` (static input shape).
        macs_target: the MACs budget: a fraction of the model's MACs in
            (0, 1), or an absolute number of MACs (int `> 1`).
        threshold: gates below it count as closed for `estimated_macs` and
            the callback. Defaults to `1e-2`.
        penalty_weight: initial weight of the gate penalty. Defaults to
            `1.0`.
        factor: step of the callback's weight adjustment. Defaults to
            `1.5`.

    Attributes:
        model: the gated, trainable copy of `model`.
        callback: a `MacsTargetCallback(self, factor)` to pass to
            `model.fit` (per epoch, locking; make another one to adjust
            every few batches).
        channel_gates: `{group_name: ChannelGate}`.
        block_gates: `{add_layer_name: BlockGate}`.
        base_macs: MACs of `model`.
        macs_target: the budget in MACs.

    Raises:
        ValueError: bad `macs_target`, `threshold`, `penalty_weight` or
            `factor`; a model with nothing to gate.
        TypeError: a `macs_target` that is not a number.

    Example:

    ```python
    gates = kc.methods.adaptive.AdaptiveGates(model, macs_target=0.5)
    gates.model.compile(
        optimizer=keras.optimizers.SGD(0.05, momentum=0.9), loss=loss
    )
    gates.model.fit(x, y, epochs=30, callbacks=[gates.callback])
    plan, blocks = gates.finalize()
    slim = kc.slim(model, plan, remove_blocks=blocks)  # then fine-tune
    ```

    References:
        Adaptive channel and layer pruning (seed abstract); Liu et al.,
        network slimming, arXiv 1708.06519.
    """

    def __init__(
        self,
        model,
        macs_target,
        threshold=1e-2,
        penalty_weight=1.0,
        factor=1.5,
    ):
        self.source = model
        self.base_macs = flops.count_macs(model)
        self.macs_target = _check_target(macs_target, self.base_macs)
        if not threshold >= 0:
            raise ValueError(
                f"`threshold` must be >= 0. Received: threshold={threshold!r}"
            )
        if not penalty_weight >= 0:
            raise ValueError(
                "`penalty_weight` must be >= 0. "
                f"Received: penalty_weight={penalty_weight!r}"
            )
        self.threshold = float(threshold)
        self._analysis = graph.analyze(model)
        self._sites = _channel_sites(model, self._analysis)
        self._blocks = _residual_blocks(model)
        if not self._sites and not self._blocks:
            raise ValueError(
                "`model` has no prunable channel group or residual block "
                "that can be gated."
            )
        self._layers = _layer_costs(model, self._analysis, self._blocks)
        self._build_gated_model()
        self.penalty_weight = penalty_weight
        self._locked = None
        self.callback = MacsTargetCallback(self, factor)

    # ------------------------------------------------------ gated model
    def _build_gated_model(self) -> None:
        total = float(self.base_macs)
        where = {}
        self.channel_gates: dict[str, ChannelGate] = {}
        for site in self._sites:
            cost = _group_cost(self._layers, site.root, site.size) / total
            gate = ChannelGate(
                cost=cost / len(site.layers), name=f"{site.group}_gate"
            )
            self.channel_gates[site.group] = gate
            for lname, _, _ in site.layers:
                where[lname] = gate
        self.block_gates: dict[str, BlockGate] = {
            name: BlockGate(cost=b.macs(self._layers) / total,
                            name=f"{name}_gate")
            for name, b in self._blocks.items()
        }

        def call_function(layer, *args, **kwargs):
            block = self._blocks.get(layer.name)
            if block is not None:
                ins = list(args[0])
                ins[block.branch] = self.block_gates[layer.name](
                    ins[block.branch]
                )
                args = (ins,) + args[1:]
            out = layer(*args, **kwargs)
            gate = where.get(layer.name)
            return gate(out) if gate is not None else out

        self.model = keras.models.clone_model(
            self.source, call_function=call_function
        )
        for layer in self.source.layers:
            if layer.weights:
                self.model.get_layer(layer.name).set_weights(
                    layer.get_weights()
                )

    @property
    def penalty_weight(self) -> float:
        """The current weight of the gate penalty."""
        return self._penalty_weight

    @penalty_weight.setter
    def penalty_weight(self, value) -> None:
        self._penalty_weight = float(value)
        for gate in self._all_gates():
            gate.strength.assign(self._penalty_weight)

    def _all_gates(self):
        return list(self.channel_gates.values()) + list(
            self.block_gates.values()
        )

    # ------------------------------------------------------ decisions
    def gate_values(self) -> dict[str, np.ndarray]:
        """Current gate values, `{group or Add name: array}`."""
        return {n: g.value() for n, g in
                {**self.channel_gates, **self.block_gates}.items()}

    @property
    def locked(self) -> bool:
        """Whether `lock` has fixed the channels and blocks to remove."""
        return self._locked is not None

    def lock(self) -> None:
        """Holds the gates that `finalize()` would close at exactly 0.

        Chooses the channels and blocks as `finalize(threshold=None)` does
        (ascending gate values, down to the MACs budget), fixes their gates
        at 0 for the rest of training (`ChannelGate.lock`) and sets the
        penalty weight to 0. Further training fine-tunes what is left, and
        `finalize()` removes exactly these channels and blocks, whose
        outputs are then exactly 0.

        Raises:
            RuntimeError: when already locked.
        """
        if self.locked:
            raise RuntimeError("The gates are already locked.")
        masks, closed = self._decide(None)
        for site in self._sites:
            self.channel_gates[site.group].lock(masks[site.root])
        for name in closed:
            self.block_gates[name].lock([False])
        self.penalty_weight = 0.0
        self._locked = (masks, closed)

    def _dropped(self, closed) -> set[str]:
        return set().union(*(self._blocks[n].ops for n in closed))

    def _macs(self, masks, closed) -> float:
        kept = {root: float(mask.mean()) for root, mask in masks.items()}
        dropped = self._dropped(closed)
        return sum(
            c.macs * c.fraction(kept)
            for c in self._layers
            if c.name not in dropped
        )

    def _decide(self, threshold):
        """Kept-channel masks per gated group root, and closed blocks."""
        values = self.gate_values()
        if threshold is not None:
            closed = [n for n in self.block_gates if values[n][0] < threshold]
            masks = {}
            for site in self._sites:
                keep = values[site.group] >= threshold
                keep[np.argmax(values[site.group])] = True
                masks[site.root] = keep
            return masks, closed
        masks = {site.root: np.ones(site.size, bool) for site in self._sites}
        closed = []
        roots = {site.group: site.root for site in self._sites}
        items = sorted(
            [(float(values[n][0]), 0, n, -1) for n in self.block_gates]
            + [
                (float(v), 1, n, i)
                for n in self.channel_gates
                for i, v in enumerate(values[n])
            ]
        )
        macs = self._macs(masks, closed)
        for _, is_channel, name, i in items:
            if macs <= self.macs_target:
                break
            trial_masks, trial_closed = masks, closed + [name]
            if is_channel:
                mask = masks[roots[name]].copy()
                mask[i] = False
                if not mask.any():
                    continue
                trial_masks, trial_closed = {**masks, roots[name]: mask}, closed
            trial = self._macs(trial_masks, trial_closed)
            if trial >= self.macs_target:
                masks, closed, macs = trial_masks, trial_closed, trial
        return masks, closed

    def _removal(self, threshold):
        """`_decide(threshold)`, or the locked decision for `None`."""
        if threshold is None and self.locked:
            return self._locked
        return self._decide(threshold)

    def estimated_macs(self, threshold=None) -> int:
        """MACs of the model pruned where the gates are below `threshold`.

        Args:
            threshold: gate threshold. Defaults to `None`: the locked
                channels and blocks once `lock` has run, else
                `self.threshold`.

        Returns:
            The MACs of the slim model `finalize(threshold)` gives (after a
            lock, `finalize()`): layers of closed blocks count zero, every
            Conv/Dense scales with its kept input and output channel
            fractions.
        """
        if threshold is None and not self.locked:
            threshold = self.threshold
        return round(self._macs(*self._removal(threshold)))

    def finalize(self, threshold=None):
        """Folds the gates into `model` and returns what to remove.

        The trained weights of `.model` are copied into the original
        `model` and every gate is folded into the layer it scales (BN gamma
        and beta, or a producer's kernel and bias), so that `model` computes
        what `.model` computes. Then channels and blocks are chosen for
        removal (at least one channel per group is kept):

        - `threshold=None` (the default): the locked gates when `lock` has
          run (the callback locks when training reaches the target);
          otherwise the gates are closed in ascending order of their values
          (blocks first on ties), each one only if the MACs stay at or
          above `macs_target`, until the target is reached: the learnt
          gates rank what goes, the budget says how much, and the MACs land
          just above the target (within one channel's MACs, when a channel
          fits).
        - a number: every gate below it is closed, whatever the MACs.

        Removal is exact for gates at 0 (all of them after `lock`) and
        close for small gates; without a lock, fine-tune the slim model.

        Args:
            threshold: `None` or a gate threshold (e.g. `self.threshold`).
                Defaults to `None`.

        Returns:
            `(plan, removable_blocks)`: a bound `PruningPlan` of singleton
            clusters (groups that keep all channels, or lie entirely inside
            removed blocks, are left out) and the names of the `Add` layers
            whose branch is removed. Use
            `kc.slim(model, plan, remove_blocks=removable_blocks)`.
        """
        for layer in self.source.layers:
            if layer.weights:
                layer.set_weights(
                    self.model.get_layer(layer.name).get_weights()
                )
        for site in self._sites:
            values = self.channel_gates[site.group].value()
            for _, layer, producer in site.layers:
                _fold_scale(self.source, layer, producer, values)
        for name, block in self._blocks.items():
            value = self.block_gates[name].value()
            _fold_scale(self.source, block.end, block.producer, value)
        masks, closed = self._removal(threshold)
        dropped = self._dropped(closed)
        clusters = {}
        for site in self._sites:
            keep = masks[site.root]
            group = next(
                g for g in self._analysis.groups if g.name == site.group
            )
            inside = all(lname in dropped for lname, _, _ in group.producers)
            if keep.all() or inside:
                continue
            clusters[site.group] = [[int(i)] for i in np.flatnonzero(keep)]
        return PruningPlan(clusters, groups=self._analysis.groups), closed


# ---------------------------------------------------------------- helpers
def _check_target(macs_target, base_macs: int) -> int:
    if isinstance(macs_target, bool) or not isinstance(
        macs_target, (int, float, np.integer, np.floating)
    ):
        raise TypeError(
            "`macs_target` must be a fraction in (0, 1) or a number of MACs."
            f" Received: macs_target={macs_target!r}"
        )
    target = macs_target * base_macs if macs_target < 1 else macs_target
    if not 0 < target < base_macs:
        raise ValueError(
            "`macs_target` must be a fraction in (0, 1) or a number of MACs "
            f"below the model's {base_macs}. "
            f"Received: macs_target={macs_target!r}"
        )
    return round(target)


def _successors(model) -> dict[str, list[str]]:
    """Names of the top-level operations that read each operation's output."""
    out: dict[str, list[str]] = {}
    for node in graph.topological_nodes(model):
        for t in node.input_tensors:
            src = t._keras_history.operation.name
            out.setdefault(src, []).append(node.operation.name)
    for t in model.outputs:
        out.setdefault(t._keras_history.operation.name, []).append(None)
    return out


def _foldable(layer) -> bool:
    if isinstance(layer, keras.layers.BatchNormalization):
        return layer.scale
    activation = getattr(layer, "activation", None)
    return activation in _POSITIVELY_HOMOGENEOUS


def _channel_sites(model, an: graph.Analysis) -> list[_Site]:
    """The gate locations of every gateable prunable group."""
    succ = _successors(model)
    sites = []
    for g in an.groups:
        if not g.prunable:
            continue
        found = response_layers(an, g)
        bns = {lname for _, lname, _ in found}
        layers = []
        if isinstance(found[0][0], keras.layers.BatchNormalization):
            layers = [(lname, layer, None) for layer, lname, _ in found]
        for lname, path, axis in g.producers:
            if not all(s in bns for s in succ.get(lname, [None])):
                layers.append((lname, an.layers[lname], (lname, path, axis)))
        ok = all(
            "/" not in lname
            and _foldable(layer)
            and np.array_equal(_map_of(g, layer, prod), np.arange(g.size))
            for lname, layer, prod in layers
        )
        if ok:
            sites.append(_Site(g.name, an.gid_of[g.name], g.size, layers))
    return sites


def _map_of(group, layer, producer) -> np.ndarray:
    if producer is not None:
        return group.channel_map(producer[1])
    return group.channel_map(layer.gamma.path)


@dataclasses.dataclass
class _Block:
    """A residual block: the Add's branch input, its end layer and ops."""

    branch: int
    end: keras.layers.Layer
    producer: tuple | None
    ops: set

    def macs(self, costs) -> int:
        return sum(c.macs for c in costs if c.name in self.ops)


def _residual_blocks(model) -> dict[str, _Block]:
    """Gateable residual blocks, keyed by their top-level Add layer name."""
    succ = _successors(model)
    adds = [
        layer.name for layer in model.layers
        if isinstance(layer, keras.layers.Add)
        and len(layer._inbound_nodes) == 1
        and len(layer._inbound_nodes[0].input_tensors) == 2
    ]
    blocks = {}
    for name, shortcut in blocks.block_shortcuts(model, adds).items():
        ins = model.get_layer(name)._inbound_nodes[0].input_tensors
        branch = 1 - shortcut
        end = ins[branch]._keras_history.operation
        if succ.get(end.name) != [name] or not _foldable(end):
            continue
        producer = None
        if not isinstance(end, keras.layers.BatchNormalization):
            kernel = getattr(end, "kernel", None)
            if kernel is None or isinstance(end, graph.DEPTHWISE):
                continue
            producer = (end.name, kernel.path, len(kernel.shape) - 1)
        blocks[name] = _Block(
            branch, end, producer, _branch_ops(ins[shortcut], ins[branch])
        )
    return blocks


def _branch_ops(shortcut, branch) -> set[str]:
    """Operations between the shortcut's ancestors and the branch output."""
    stop = graph.ancestors(shortcut)
    names, seen, stack = set(), set(), [branch]
    while stack:
        t = stack.pop()
        if id(t) in stop or id(t) in seen:
            continue
        seen.add(id(t))
        h = t._keras_history
        names.add(h.operation.name)
        stack.extend(h.operation._inbound_nodes[h.node_index].input_tensors)
    return names


@dataclasses.dataclass
class _LayerCost:
    """MACs of one top-level layer and the channel layouts it scales with."""

    name: str
    macs: int
    layouts: list  # per input / output axis: {root gid: share of entries}

    def fraction(self, kept) -> float:
        """Kept share of the MACs, given `{root gid: kept channel share}`."""
        out = 1.0
        for shares in self.layouts:
            out *= sum(w * kept.get(root, 1.0) for root, w in shares.items())
        return out


def _layer_costs(model, an: graph.Analysis, blocks) -> list[_LayerCost]:
    """Per top-level layer: MACs and the layouts its MACs scale with.

    A Conv/Dense scales with its input (consumer) and output (producer)
    channels, a depthwise convolution with its channels. A layout's share
    of a group is the fraction of its entries that are that group's
    channels (every channel of a group appears equally often in a layout).
    """
    costs = []
    for node in graph.topological_nodes(model):
        op = node.operation
        if graph.is_graph_model(op):
            costs.append(_LayerCost(op.name, flops.count_macs(op), []))
            continue
        macs = flops.layer_macs(
            op, node.input_tensors[0].shape, node.outputs[0].shape
        )
        if not macs:
            continue
        mine = [e for e in an.entries if e.lname == op.name]
        ins = [e for e in mine if e.role == "consumer"]
        if not ins and isinstance(op, graph.DEPTHWISE):
            ins = [e for e in mine if e.path == op.kernel.path]
        outs = [e for e in mine if e.producer]
        layouts = []
        for e in ins[:1] + outs[:1]:
            gids, _ = graph.flat_channels(an.root(e.layout), an.sizes)
            roots, counts = np.unique(gids, return_counts=True)
            layouts.append(dict(zip(roots.tolist(), counts / len(gids))))
        costs.append(_LayerCost(op.name, macs, layouts))
    return costs


def _group_cost(costs, root: int, size: int) -> float:
    """MACs saved per removed channel of a group, at full width."""
    total = 0.0
    for c in costs:
        for shares in c.layouts:
            total += c.macs * shares.get(root, 0.0)
    return total / size


def _fold_scale(model, layer, producer, values) -> None:
    """Multiplies `layer`'s output channels by `values` (>= 0) in place."""
    values = np.asarray(values, dtype=np.float64)
    if producer is None:
        for v in (layer.gamma, layer.beta):
            if v is not None:
                v.assign((v.numpy() * values).astype(v.dtype))
        return
    kernel = graph.get_variable(model, producer[1])
    shape = [1] * len(kernel.shape)
    shape[producer[2]] = values.size
    scaled = kernel.numpy() * values.reshape(shape)
    kernel.assign(scaled.astype(kernel.dtype))
    if getattr(layer, "use_bias", False):
        bias = layer.bias
        bias.assign((bias.numpy() * values).astype(bias.dtype))
