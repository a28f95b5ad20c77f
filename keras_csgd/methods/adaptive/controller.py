"""`AdaptiveGates`: the controller of adaptive channel and layer pruning."""

from __future__ import annotations

import copy

import numpy as np

from keras_csgd import flops, graph
from keras_csgd.callbacks.macs_target import MacsTargetCallback
from keras_csgd.latency import planner
from keras_csgd.latency.table import LatencyTable
from keras_csgd.methods.adaptive import budget, sites
from keras_csgd.methods.adaptive.gates import BlockGate, ChannelGate
from keras_csgd.plan import PruningPlan
from keras_csgd.rebuild import rebuild
from keras_csgd.scoring import top_channels

# The value of a kept channel besides its gate's (`AdaptiveGates._planned`).
FILL = 1e-6


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
      input that is not the shortcut, found as in `kc.slim`), when the
      branch ends in a BN with `scale=True` or a linear Conv/Dense used
      only by that Add.

    The budget is a MACs target (the analytic cost model of
    `kc.count_macs`) or a latency target (a latency table's predictions).
    Each gate's penalty (see `ChannelGate`, `BlockGate`) is weighted by the
    cost it controls, as a fraction of the full model's cost (per channel:
    what removing one channel of the group saves; per block: what removing
    the block saves), times a global penalty weight that `.callback` adapts
    towards the target and, once the target is reached, locks the gates
    that go at exactly 0 (`lock`; with a measured latency table, the
    knapsack of `kc.plan_for_latency` chooses them, valuing channels by
    their gates): the rest of training fine-tunes the
    pruned network, and its removal is exact. Train `.model` with momentum
    SGD: its steps follow the cost weighting, whereas Adam moves every gate
    at the same pace whatever it costs.

    `finalize` folds the gates into a copy of the trained weights and
    returns it with what to remove; `model` itself is never changed.

    Args:
        model: a trained functional `keras.Model` (static input shape).
        macs_target: the MACs budget: a fraction of the model's MACs in
            (0, 1), or an absolute number of MACs (int `> 1`). Defaults to
            `None` (give `latency_target` instead).
        threshold: gates below it count as closed for `estimated_macs` and
            the callback. Defaults to `1e-2`.
        penalty_weight: initial weight of the gate penalty. Defaults to
            `1.0`.
        factor: step of the callback's weight adjustment. Defaults to
            `1.5`.
        latency_target: the latency budget, a fraction in (0, 1) of
            `latency_table.full`: the alternative to `macs_target`.
            Defaults to `None`.
        latency_table: the table whose `predict(widths, remove_blocks)`
            (milliseconds of the slim model at `{group name: width}` with
            those blocks removed) is the cost model, for `latency_target`,
            such as `kc.latency.LatencyTable` (whose measured widths the
            lock then chooses among, see `finalize`). Defaults to `None`.
        round_to: channels close in chunks of this many per group (the
            lowest gates first), so that kept widths are multiples of it
            (the first chunk takes the remainder); not used with a
            `kc.latency.LatencyTable`, whose widths are the ones it
            measured. Defaults to `None`: for a latency target, the
            multiple the table measured each group at
            (`latency_table.step(group)`, where the table has `step`),
            since runtimes block channels by their SIMD width and a width
            between two multiples runs about as slowly as the wider one,
            or slower; else 1.

    Attributes:
        model: the gated, trainable copy of `model`.
        callback: a `kc.callbacks.MacsTargetCallback(self, factor)` to pass
            to `model.fit` (per epoch, locking; make another one to adjust
            every few batches).
        channel_gates: `{group_name: ChannelGate}`.
        block_gates: `{add_layer_name: BlockGate}`.
        base_macs: MACs of `model`.
        macs_target: the budget in MACs, or `None` for a latency target.
        latency_target: the budget in milliseconds, or `None`.
        cost: the cost model, `cost(widths, removed_blocks) -> float`
            (`widths`: `{group name: width}`; `removed_blocks`: a set of Add
            names), in MACs or milliseconds.
        target: the budget in the units of `cost`.

    Raises:
        ValueError: not exactly one of `macs_target` and `latency_target`,
            a `latency_table` without `latency_target` or the reverse, a bad
            target, `threshold`, `penalty_weight` or `factor`; a model with
            nothing to gate.
        TypeError: a `macs_target` that is not a number, a `latency_table`
            without `predict` and `full`.

    Example:

    ```python
    gates = kc.methods.adaptive.AdaptiveGates(model, macs_target=0.5)
    gates.model.compile(
        optimizer=keras.optimizers.SGD(0.05, momentum=0.9), loss=loss
    )
    gates.model.fit(x, y, epochs=30, callbacks=[gates.callback])
    folded, plan = gates.finalize()
    slim = kc.slim(folded, plan)  # plan.remove_blocks: the closed blocks
    ```

    References:
        Adaptive channel and layer pruning (seed abstract: "the proportion
        of each is learned"); Liu et al., network slimming,
        arXiv 1708.06519; Yang et al., DeepHoyer, arXiv 1908.09979.
    """

    def __init__(
        self,
        model,
        macs_target=None,
        threshold=1e-2,
        penalty_weight=1.0,
        factor=1.5,
        latency_target=None,
        latency_table=None,
        round_to=None,
    ):
        if not threshold >= 0:
            raise ValueError(
                f"`threshold` must be >= 0. Received: threshold={threshold!r}"
            )
        if not penalty_weight >= 0:
            raise ValueError(
                "`penalty_weight` must be >= 0. "
                f"Received: penalty_weight={penalty_weight!r}"
            )
        self.source = model
        self.threshold = float(threshold)
        self._analysis = graph.analyze(model)
        self.base_macs = flops.count_macs(model, self._analysis)
        self._sites = sites.channel_sites(model, self._analysis)
        self._blocks = sites.gated_blocks(model)
        if not self._sites and not self._blocks:
            raise ValueError(
                "`model` has no prunable channel group or residual block "
                "that can be gated."
            )
        self._macs = budget.macs_cost(
            self._analysis, {n: b.ops for n, b in self._blocks.items()}
        )
        self._budget = self._make_budget(
            macs_target, latency_target, latency_table
        )
        self.cost, self.target = self._budget.cost, self._budget.target
        self.macs_target = (
            int(self.target) if latency_table is None else None
        )
        self.latency_target = None if latency_table is None else self.target
        if round_to is not None and not (
                isinstance(round_to, int) and round_to >= 1):
            raise ValueError(
                "`round_to` must be a positive integer or None. "
                f"Received: round_to={round_to!r}"
            )
        step = getattr(latency_table, "step", lambda group: 1)
        self._steps = {s.group: round_to or step(s.group)
                       for s in self._sites}
        # A measured table: the knapsack decides (`_planned`), among the
        # blocks that have a gate.
        self._table = None
        if isinstance(latency_table, LatencyTable):
            self._table = copy.copy(latency_table)
            self._table.blocks = {n: b for n, b in latency_table.blocks.items()
                                  if n in self._blocks}
        self._build_gated_model()
        self.penalty_weight = penalty_weight
        self._locked = None
        self.callback = MacsTargetCallback(self, factor)

    def _make_budget(self, macs_target, latency_target, latency_table):
        if (macs_target is None) == (latency_target is None):
            raise ValueError(
                "Pass exactly one of `macs_target` and `latency_target`. "
                f"Received: macs_target={macs_target!r}, "
                f"latency_target={latency_target!r}"
            )
        if (latency_target is None) != (latency_table is None):
            raise ValueError(
                "`latency_table` goes with `latency_target`, and only with "
                f"it. Received: latency_table={latency_table!r}"
            )
        if latency_table is None:
            return budget.macs_budget(self._macs, self.base_macs, macs_target)
        return budget.latency_budget(latency_table, latency_target)

    # ------------------------------------------------------ gated model
    def _build_gated_model(self) -> None:
        full = self._budget.full
        where = {}
        self.channel_gates: dict[str, ChannelGate] = {}
        for site in self._sites:  # a group's last channel always stays
            saved = (full - self.cost({site.group: site.size - 1}, set())
                     if site.size > 1 else 0.0)
            gate = ChannelGate(cost=saved / full / len(site.layers),
                               name=f"{site.group}_gate")
            self.channel_gates[site.group] = gate
            for lname, _ in site.layers:
                where[lname] = gate
        self.block_gates: dict[str, BlockGate] = {
            name: BlockGate(cost=(full - self.cost({}, {name})) / full,
                            name=f"{name}_gate")
            for name in self._blocks
        }

        def call(name, layer, args, kwargs):
            block = self._blocks.get(name)
            if block is not None:
                ins = list(args[0])
                ins[block.branch] = self.block_gates[name](ins[block.branch])
                args = (ins, *args[1:])
            elif name not in where:
                return NotImplemented
            out = layer(*args, **kwargs)
            return where[name](out) if name in where else out

        self.model = rebuild(self.source, call=call)

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
        (for a `kc.latency.LatencyTable`, the knapsack of the table's widths
        that keeps the most gate value within the budget; otherwise
        ascending gate values, in chunks of `round_to` channels, down to
        the budget), fixes their gates at 0 for the rest of training
        (`ChannelGate.lock`) and sets the penalty weight to 0. Further
        training fine-tunes what is left, and `finalize()` removes exactly
        these channels and blocks, whose outputs are then exactly 0.

        Raises:
            RuntimeError: when already locked.
        """
        if self.locked:
            raise RuntimeError("The gates are already locked.")
        self._hold(*self._decide(None))

    def _hold(self, masks, closed) -> None:
        """Holds the gates of `masks`' closed channels and of the `closed`
        blocks at 0, and the penalty weight at 0."""
        for site in self._sites:
            self.channel_gates[site.group].lock(masks[site.root])
        for name in closed:
            self.block_gates[name].lock([False])
        self.penalty_weight = 0.0
        self._locked = (masks, closed)

    def tighten(self, target) -> None:
        """Lowers the budget to `target` and locks what else it closes.

        For a verified latency: when the slim model measures slower than
        the cost model predicted, lower the target (in the units of
        `.cost`, e.g. `gates.target * target / measured` for a latency
        target and ratio) and call `finalize()` again. The locked channels
        and blocks stay closed; further ones close as in `lock` (no group
        widens, no removed block returns; the budget is at most just below
        the locked plan's cost, which the knapsack's plans can be well
        under), and their gates are held at 0, so
        the slim model still computes what the gated model does (train on
        to recover).

        Args:
            target: the new budget, in the units of `.cost`, at most the
                current one.

        Raises:
            ValueError: when `target` is above the current target (locked
                gates do not reopen) or not positive.
        """
        if not 0 < target <= self.target:
            raise ValueError(
                f"`target` must be in (0, {self.target:g}] (the current "
                f"target; locked gates do not reopen). Received: "
                f"target={target!r}"
            )
        old = self._locked
        if old is not None:  # a budget the locked plan meets closes nothing
            target = min(target, self.estimated_cost() * (1 - 1e-6))
        self.target = float(target)
        if self.macs_target is not None:
            self.macs_target = int(self.target)
        else:
            self.latency_target = self.target
        masks, closed = self._decide(None, within=old)
        if old is not None:  # what was locked stays closed (its gates: 0)
            masks = {root: mask & old[0][root] for root, mask in masks.items()}
            closed = sorted(set(closed) | set(old[1]))
        self._hold(masks, closed)

    def _widths(self, masks) -> dict[str, int]:
        return {s.group: int(masks[s.root].sum()) for s in self._sites}

    def _decide(self, threshold, within=None):
        """Kept-channel masks per gated group root, and closed blocks
        (`within`: a locked decision that tightening narrows)."""
        values = self.gate_values()
        if threshold is not None:
            closed = [n for n in self.block_gates if values[n][0] < threshold]
            masks = {}
            for site in self._sites:
                keep = values[site.group] >= threshold
                keep[np.argmax(values[site.group])] = True
                masks[site.root] = keep
            return masks, closed
        if self._table is not None:
            return self._planned(values, within)
        masks = {site.root: np.ones(site.size, bool) for site in self._sites}
        closed = []
        roots = {site.group: site.root for site in self._sites}
        chunks = {n: self._chunks(values[n], self._steps[n])
                  for n in self.channel_gates}
        items = sorted(
            [(float(values[n][0]), 0, n, -1) for n in self.block_gates]
            + [
                (float(np.mean(values[n][chunk])), 1, n, k)
                for n in self.channel_gates
                for k, chunk in enumerate(chunks[n])
            ]
        )
        cost = self.cost(self._widths(masks), set(closed))
        for _, is_channel, name, k in items:
            if cost <= self.target:
                break
            trial_masks, trial_closed = masks, closed + [name]
            if is_channel:
                mask = masks[roots[name]].copy()
                mask[chunks[name][k]] = False
                if not mask.any():
                    continue
                trial_masks, trial_closed = {**masks, roots[name]: mask}, closed
            trial = self.cost(self._widths(trial_masks), set(trial_closed))
            if trial >= self.target:
                masks, closed, cost = trial_masks, trial_closed, trial
        return masks, closed

    def _planned(self, values, within=None):
        """The latency knapsack's decision (`kc.latency.planner.choose`):
        the table's widths and block removals that keep the most gate
        value within the budget.

        A group's value at a width is the sum of its largest gate values
        there, divided by its largest (as `plan_for_latency` values filter
        norms), times its block's gate value (clipped to [0, 1]) for a
        group inside a gated block's branch, which that gate scales;
        removing a block keeps none of its groups' value. Each kept channel
        is also worth `FILL`, so that of plans of equal value the knapsack
        keeps the one that closes least: gates the penalty took to exactly
        0 close only as far as the budget needs (as in the ascending
        order), and the others can grow again once the penalty stops (a
        lock that closed every 0 gate took a CIFAR ResNet-20 to 9% of its
        latency at target 0.5, `benchmarks/latency_methods.py`). The kept
        channels are the group's largest gates. With `within`, no group
        gets wider and no removed block comes back.
        """
        table = self._table
        kept = planner.kept_values({n: values[n] for n in self.channel_gates
                                    if n in table.groups})
        for name, block in table.blocks.items():
            scale = float(np.clip(values[name][0], 0.0, 1.0))
            for group in set(block["groups"]) & set(kept):
                kept[group] = kept[group] * scale
        for group, value in kept.items():  # of equal values, keep more
            kept[group] = value + FILL * np.arange(len(value))
        if within is not None:  # wider than locked: never worth it
            for site in self._sites:
                if site.group in kept:
                    kept[site.group][within[0][site.root].sum() + 1:] = -1e9
            for name in set(within[1]) & set(table.blocks):
                for group in set(table.blocks[name]["groups"]) & set(kept):
                    kept[group][1:] = -1e9
        choice = planner.choose(table, kept, self.target)
        widths, removed = (choice[:2] if choice is not None
                           else planner.fastest_choice(table, kept))
        masks = {}
        for site in self._sites:
            masks[site.root] = np.zeros(site.size, bool)
            masks[site.root][[i for (i,) in top_channels(
                values[site.group], widths.get(site.group, site.size))]] = True
        return masks, sorted(removed)

    @staticmethod
    def _chunks(values, step) -> list[np.ndarray]:
        """Channel indices in ascending order of `values`, in chunks of
        `step` (the first one the remainder), closed in this order."""
        order = np.argsort(values, kind="stable")
        first = len(order) % step or step
        return [order[:first]] + [order[i:i + step]
                                  for i in range(first, len(order), step)]

    def _removal(self, threshold):
        """`_decide(threshold)`, or the locked decision for `None`."""
        if threshold is None and self.locked:
            return self._locked
        return self._decide(threshold)

    def _estimated(self, threshold):
        """The widths and closed blocks that `estimated_macs` counts."""
        if threshold is None and not self.locked:
            threshold = self.threshold
        masks, closed = self._removal(threshold)
        return self._widths(masks), set(closed)

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
        return round(self._macs(*self._estimated(threshold)))

    def estimated_cost(self, threshold=None) -> float:
        """`estimated_macs`, in the units of the cost model (`.cost`).

        Args:
            threshold: as in `estimated_macs`. Defaults to `None`.

        Returns:
            The cost (MACs, or milliseconds for a latency target) of the
            slim model at `threshold`.
        """
        return self.cost(*self._estimated(threshold))

    def finalize(self, threshold=None):
        """The trained model with the gates folded in, and what to remove.

        A copy of `.model` without its gates is built, and every gate is
        folded into the weights of the layer it scales (BN gamma and beta,
        or a producer's kernel and bias), so that the copy computes what
        `.model` computes. Then channels and blocks are chosen for removal
        (at least one channel per group is kept):

        - `threshold=None` (the default): the locked gates when `lock` has
          run (the callback locks when training reaches the target);
          otherwise, with a `kc.latency.LatencyTable`, the knapsack over
          the table's measured widths and blocks that keeps the most gate
          value within the budget (`kc.plan_for_latency`'s, with each
          group's gate values for its filter norms, scaled by the gate of
          the block it is in), and else the gates are closed in ascending
          order of their values (blocks first on ties), each one only if
          the cost stays at or above the target, until the target is
          reached: the learnt gates rank what goes, the budget says how
          much, and the cost lands just above the target (within one
          channel's cost, when a channel fits).
        - a number: every gate below it is closed, whatever the cost.

        Removal is exact for gates at 0 (all of them after `lock`) and
        close for small gates; without a lock, fine-tune the slim model.
        Neither `model` nor `.model` is changed.

        Args:
            threshold: `None` or a gate threshold (e.g. `self.threshold`).
                Defaults to `None`.

        Returns:
            `(folded, plan)`: the folded model (a new `keras.Model` with
            the layers and names of `model`) and a bound `PruningPlan` of
            singleton clusters (groups that keep all channels, or lie
            entirely inside removed blocks, are left out) whose
            `remove_blocks` are the `Add` layers whose branch is removed.
            Use `kc.slim(folded, plan)`.
        """
        scales = [
            (lname, producer, self.channel_gates[site.group].value())
            for site in self._sites for lname, producer in site.layers
        ] + [
            (block.end, block.producer, self.block_gates[name].value())
            for name, block in self._blocks.items()
        ]
        gate_names = {gate.name for gate in self._all_gates()}

        def call(name, layer, args, kwargs):
            return args[0] if name in gate_names else NotImplemented

        folded = rebuild(self.model, call=call,
                         values=sites.folded_values(self.model, scales))
        masks, closed = self._removal(threshold)
        dropped = set().union(*(self._blocks[n].ops for n in closed))
        groups = {g.name: g for g in self._analysis.groups}
        clusters = {}
        for site in self._sites:
            keep = masks[site.root]
            inside = all(lname in dropped
                         for lname, _, _ in groups[site.group].producers)
            if keep.all() or inside:
                continue
            clusters[site.group] = [[int(i)] for i in np.flatnonzero(keep)]
        plan = PruningPlan(clusters, groups=self._analysis.groups,
                           remove_blocks=closed)
        return folded, plan
