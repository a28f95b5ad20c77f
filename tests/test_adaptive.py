"""Tests of `kc.methods.adaptive`: gates, folding, block removal, budget."""

import inspect
import itertools

import keras
import numpy as np
import pytest

import keras_csgd as kc
from keras_csgd import graph
from keras_csgd.latency import design
from keras_csgd.methods.adaptive import (
    AdaptiveGates,
    BlockGate,
    ChannelGate,
    MacsTargetCallback,
    controller,
)
from keras_csgd.models import resnet_cifar
from utils import relative_error
from zoo import preact_resnet, randomize

RNG = np.random.default_rng(0)
X = RNG.normal(size=(16, 16, 16, 3)).astype("float32")


def resnet8():
    return randomize(resnet_cifar(8, input_shape=(16, 16, 3)), seed=4)


def open_gates(gates, low):
    """Every gate uniform in `[low, 1)`."""
    for gate in gates._all_gates():
        gate.gate.assign(RNG.uniform(low, 1.0, gate.gate.shape))


def close_some(gates):
    """Closes a third of every channel gate and half of the block gates."""
    for gate in gates.channel_gates.values():
        values = RNG.uniform(0.5, 1.5, gate.gate.shape)
        values[::3] = 0.0
        gate.gate.assign(values)
    for k, gate in enumerate(gates.block_gates.values()):
        gate.gate.assign([0.0 if k % 2 == 0 else 0.7])


@pytest.mark.parametrize("build", [resnet8, lambda: randomize(preact_resnet())])
def test_open_gates_change_nothing(build):
    model = build()
    gates = AdaptiveGates(model, macs_target=0.5)
    assert gates.channel_gates and gates.block_gates
    np.testing.assert_allclose(
        gates.model.predict(X, verbose=0), model.predict(X, verbose=0),
        rtol=1e-6, atol=1e-6,
    )


@pytest.mark.parametrize("build", [resnet8, lambda: randomize(preact_resnet())])
def test_closed_gates_are_removed_exactly(build):
    model = build()
    gates = AdaptiveGates(model, macs_target=0.5)
    close_some(gates)
    expected = gates.model.predict(X, verbose=0)
    estimate = gates.estimated_macs(threshold=1e-3)
    model, plan = gates.finalize(threshold=1e-3)
    blocks = list(plan.remove_blocks)
    assert blocks == list(gates.block_gates)[::2]
    assert plan.clusters
    np.testing.assert_allclose(model.predict(X, verbose=0), expected,
                               rtol=1e-5, atol=1e-5)
    slim = kc.slim(model, plan, remove_blocks=blocks)
    assert relative_error(slim.predict(X, verbose=0), expected) < 1e-5
    assert kc.count_macs(slim) == estimate
    for name in blocks:
        assert name not in [layer.name for layer in slim.layers]


def train_gates(callback_kwargs, epochs):
    keras.utils.set_random_seed(0)
    model = resnet_cifar(8, input_shape=(16, 16, 3))
    x = RNG.normal(size=(128, 16, 16, 3)).astype("float32")
    y = RNG.integers(0, 10, 128)
    gates = AdaptiveGates(model, macs_target=0.5)
    gates.model.compile(
        optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    callback = MacsTargetCallback(gates, **callback_kwargs)
    history = gates.model.fit(
        x, y, batch_size=32, epochs=epochs, callbacks=[callback], verbose=0
    )
    return model, gates, history


def check_budget(model, gates, plan, blocks):
    slim = kc.slim(model, plan, remove_blocks=blocks)
    macs = kc.count_macs(slim)
    assert abs(macs - gates.macs_target) <= 0.1 * gates.macs_target
    assert blocks, "a whole block must go at half the MACs"
    assert plan.clusters, "channels must go too"
    assert all(w < plan.groups[n].size for n, w in plan.widths().items())
    return slim


def test_learnt_macs_meet_target_with_channels_and_blocks():
    model, gates, history = train_gates({"lock": False}, epochs=12)
    assert len(set(history.history["penalty_weight"])) > 1
    assert not gates.locked
    folded, plan = gates.finalize()
    check_budget(folded, gates, plan, list(plan.remove_blocks))


def test_locked_gates_stay_closed_and_are_removed_exactly():
    model, gates, history = train_gates({"factor": 1.2, "steps": 1}, 12)
    assert gates.locked
    assert history.history["penalty_weight"][-1] == 0.0
    locked_macs = history.history["macs"][-1]
    assert locked_macs >= gates.macs_target
    # Training went on after the lock: the locked gates are still exactly 0.
    values = gates.gate_values()
    masks, closed = gates._locked
    for name in closed:
        assert values[name][0] == 0.0
    for site in gates._sites:
        assert np.all(values[site.group][~masks[site.root]] == 0.0)
    expected = gates.model.predict(X, verbose=0)
    folded, plan = gates.finalize()
    slim = check_budget(folded, gates, plan, list(plan.remove_blocks))
    assert kc.count_macs(slim) == locked_macs
    assert relative_error(slim.predict(X, verbose=0), expected) < 1e-5


def test_callback_moves_weight_towards_target():
    gates = AdaptiveGates(resnet8(), macs_target=0.5, penalty_weight=2.0)
    callback = MacsTargetCallback(gates, factor=2.0, lock=False)
    logs = {}
    callback.on_epoch_end(0, logs)  # all gates open: above the target
    assert gates.penalty_weight == 4.0
    assert logs["macs"] == gates.base_macs
    for gate in gates.block_gates.values():
        gate.gate.assign([0.0])
    for gate in gates.channel_gates.values():
        gate.gate.assign(np.zeros(gate.gate.shape))
    callback.on_epoch_end(1, logs)
    assert gates.penalty_weight == 2.0 and logs["macs"] < gates.macs_target
    strengths = [g.strength.numpy() for g in gates.channel_gates.values()]
    np.testing.assert_allclose(strengths, 2.0)
    assert not gates.locked


def test_callback_locks_at_target_every_few_steps():
    gates = AdaptiveGates(resnet8(), macs_target=0.5, penalty_weight=2.0)
    callback = MacsTargetCallback(gates, factor=2.0, steps=3)
    for batch in range(3):
        callback.on_train_batch_end(batch)
    assert gates.penalty_weight == 4.0  # one adjustment after 3 batches
    callback.on_epoch_end(0, {})
    assert gates.penalty_weight == 4.0  # none at the epoch's end
    close_some(gates)
    estimate = gates.estimated_macs()
    assert estimate <= gates.macs_target
    for batch in range(3):
        callback.on_train_batch_end(batch)
    assert gates.locked and gates.penalty_weight == 0.0
    assert callback.locked_at_step == 6
    with pytest.raises(RuntimeError, match="already locked"):
        gates.lock()
    for gate in gates.channel_gates.values():  # gradient steps reopen ...
        gate.gate.assign(np.ones(gate.gate.shape))
    values = gates.gate_values()  # ... but the mask holds them at 0
    masks, closed = gates._locked
    assert all(values[name][0] == 0.0 for name in closed)
    assert any(not m.all() for m in masks.values())


def test_callback_locks_by_its_deadline_at_the_budget():
    """`lock_by`: below the penalty that reaches the target, the gates lock
    at that batch all the same, by the budget, and removal is exact."""
    gates = AdaptiveGates(resnet8(), macs_target=0.5, penalty_weight=0.0)
    callback = MacsTargetCallback(gates, factor=2.0, steps=2, lock_by=5)
    close_some(gates)
    for gate in gates.block_gates.values():  # nothing at 0: no early lock
        gate.gate.assign([0.3])
    for gate in gates.channel_gates.values():
        gate.gate.assign(RNG.uniform(0.5, 1.5, gate.gate.shape))
    for batch in range(4):
        callback.on_train_batch_end(batch)
        assert not gates.locked
    callback.on_train_batch_end(4)
    assert gates.locked and callback.locked_at_step == 5
    # The budget closes gates until the MACs land just above the target.
    assert gates.macs_target <= gates.estimated_macs()
    assert gates.estimated_macs() <= 1.05 * gates.macs_target
    folded, plan = gates.finalize()
    slim = kc.slim(folded, plan)
    assert relative_error(slim.predict(X, verbose=0),
                          gates.model.predict(X, verbose=0)) < 1e-5
    with pytest.raises(ValueError, match="needs `lock=True`"):
        MacsTargetCallback(gates, lock=False, lock_by=3)


def test_gate_penalties_are_cost_weighted():
    gate = ChannelGate(cost=0.25)
    x = np.ones((2, 3), "float32")
    gate(x)
    gate.gate.assign([1.0, 0.5, 0.0])
    gate.strength.assign(2.0)
    out = gate(x)
    np.testing.assert_allclose(out, np.tile([1.0, 0.5, 0.0], (2, 1)))
    # Hoyer-square: (sum g)^2 / sum g^2, the same for any common scale.
    hoyer = 1.5**2 / 1.25
    np.testing.assert_allclose(float(gate.losses[0]), 2.0 * 0.25 * hoyer,
                               rtol=1e-6)
    gate.gate.assign([3.0, 1.5, 0.0])
    gate(x)
    np.testing.assert_allclose(float(gate.losses[0]), 2.0 * 0.25 * hoyer,
                               rtol=1e-6)
    gate.lock([True, False, True])  # a locked gate counts as closed
    gate(x)
    np.testing.assert_allclose(float(gate.losses[0]), 2.0 * 0.25, rtol=1e-6)
    block = BlockGate(cost=0.5)
    block(x)
    block.gate.assign([0.75])
    block.strength.assign(2.0)
    np.testing.assert_allclose(block(x), 0.75 * x)
    np.testing.assert_allclose(float(block.losses[0]), 2.0 * 0.5 * 0.75)


@pytest.mark.parametrize("cls", [ChannelGate, BlockGate])
def test_gate_config_round_trip(cls):
    gate = cls(cost=0.125, name="g")
    again = cls.from_config(gate.get_config())
    assert again.get_config() == gate.get_config()
    assert again.cost == 0.125


def test_gated_model_saves_and_loads(tmp_path):
    gates = AdaptiveGates(resnet8(), macs_target=0.5)
    close_some(gates)
    path = str(tmp_path / "gated.keras")
    gates.model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(
        loaded.predict(X, verbose=0), gates.model.predict(X, verbose=0),
        rtol=1e-6, atol=1e-6,
    )


def test_bad_arguments():
    model = resnet8()
    with pytest.raises(ValueError, match="`macs_target` must be"):
        AdaptiveGates(model, macs_target=10 * kc.count_macs(model))
    gates = AdaptiveGates(model, macs_target=0.5)
    with pytest.raises(ValueError, match="`steps` must be"):
        MacsTargetCallback(gates, steps=0)
    with pytest.raises(TypeError, match="`macs_target` must be"):
        AdaptiveGates(model, macs_target="half")
    with pytest.raises(ValueError, match="`factor` must be > 1"):
        AdaptiveGates(model, macs_target=0.5, factor=0.5)


def test_finalize_leaves_the_model_and_the_gates_unchanged():
    model = resnet8()
    before = [w.copy() for w in model.get_weights()]
    gates = AdaptiveGates(model, macs_target=0.5)
    close_some(gates)
    gated = gates.model.predict(X, verbose=0)
    values = gates.gate_values()
    folded, _ = gates.finalize(threshold=1e-3)
    assert folded is not model
    assert [layer.name for layer in folded.layers] == [
        layer.name for layer in model.layers
    ]
    for old, new in zip(before, model.get_weights()):
        np.testing.assert_array_equal(old, new)
    np.testing.assert_array_equal(gates.model.predict(X, verbose=0), gated)
    for name, value in gates.gate_values().items():
        np.testing.assert_array_equal(value, values[name])


def test_callback_config_round_trip():
    gates = AdaptiveGates(resnet8(), macs_target=0.5)
    callback = kc.callbacks.MacsTargetCallback(gates, factor=1.25, steps=4,
                                               lock=False)
    config = callback.get_config()
    params = inspect.signature(MacsTargetCallback.__init__).parameters
    assert set(config) == set(params) - {"self"}
    again = MacsTargetCallback.from_config(config)
    assert again.get_config() == config
    assert again.gates is gates and again.steps == 4 and not again.lock


class LinearTable:
    """A fake latency table: milliseconds linear in widths and blocks."""

    def __init__(self, gates, seed=0):
        rng = np.random.default_rng(seed)
        self.sizes = {s.group: s.size for s in gates._sites}
        self.per_channel = {g: rng.uniform(0.01, 0.1) for g in self.sizes}
        self.per_block = {b: rng.uniform(0.5, 1.0) for b in gates.block_gates}
        self.full = 1.0 + sum(self.per_block.values()) + sum(
            n * self.per_channel[g] for g, n in self.sizes.items()
        )

    def step(self, group):
        return design.channel_step(self.sizes[group])

    def predict(self, widths, remove_blocks=()):
        return self.full - sum(
            (n - widths.get(g, n)) * self.per_channel[g]
            for g, n in self.sizes.items()
        ) - sum(self.per_block[b] for b in remove_blocks)


def test_latency_target_follows_the_table():
    model = resnet8()
    table = LinearTable(AdaptiveGates(model, macs_target=0.5))
    gates = AdaptiveGates(model, latency_target=0.8, latency_table=table)
    assert gates.macs_target is None
    np.testing.assert_allclose(gates.target, 0.8 * table.full)
    for site in gates._sites:  # penalties weighted by the table's costs
        cost = gates.channel_gates[site.group].cost * len(site.layers)
        np.testing.assert_allclose(
            cost, table.per_channel[site.group] / table.full, rtol=1e-9
        )
    for name, gate in gates.block_gates.items():
        np.testing.assert_allclose(gate.cost, table.per_block[name]
                                   / table.full, rtol=1e-9)
    close_some(gates)
    closed = list(gates.block_gates)[::2]
    expected = table.full - sum(table.per_block[b] for b in closed) - sum(
        len(range(0, n, 3)) * table.per_channel[g]
        for g, n in table.sizes.items()
    )
    np.testing.assert_allclose(gates.estimated_cost(1e-3), expected)
    # Below the target, the callback locks; the logs carry the latency.
    gates.threshold = 1e-3
    logs = {}
    gates.callback.on_epoch_end(0, logs)
    assert gates.locked
    np.testing.assert_allclose(logs["latency_ms"], gates.estimated_cost())
    assert logs["latency_ms"] >= gates.target


@pytest.mark.parametrize("round_to", [None, 1])
def test_latency_budget_closes_the_cheapest_gates_to_the_target(round_to):
    model = resnet8()
    table = LinearTable(AdaptiveGates(model, macs_target=0.5), seed=1)
    gates = AdaptiveGates(model, latency_target=0.9, latency_table=table,
                          round_to=round_to)
    for gate in gates.channel_gates.values():
        gate.gate.assign(RNG.uniform(0.0, 0.5, gate.gate.shape))
    for gate in gates.block_gates.values():  # blocks rank after channels
        gate.gate.assign([1.0])
    values = gates.gate_values()
    gates.lock()
    _, plan = gates.finalize()
    assert not plan.remove_blocks and plan.clusters
    # By default widths are kept at the multiples the table measures
    # (resnet8: 4 of 16 channels, 8 of 32 and 64), else channel by channel.
    steps = {g: 1 if round_to else design.channel_step(n)
             for g, n in table.sizes.items()}
    assert set(steps.values()) == ({1} if round_to else {4, 8})
    widths = plan.widths()
    for group, width in widths.items():
        assert width % steps[group] == 0
        kept = plan.clusters[group]
        closed = np.setdiff1d(np.arange(table.sizes[group]),
                              np.concatenate(kept))
        if len(closed):  # the lowest gates close
            assert values[group][closed].max() <= min(
                values[group][c].min() for c in kept)
    latency = table.predict(widths)
    chunk = max(table.per_channel[g] * steps[g] for g in steps)
    assert gates.target <= latency < gates.target + chunk
    np.testing.assert_allclose(gates.estimated_cost(), latency)


def test_tighten_closes_more_gates_and_keeps_removal_exact():
    model = resnet8()
    table = LinearTable(AdaptiveGates(model, macs_target=0.5), seed=2)
    gates = AdaptiveGates(model, latency_target=0.8, latency_table=table)
    open_gates(gates, 0.2)
    gates.lock()
    first_masks, first_closed = gates._locked
    first = gates.estimated_cost()
    gates.tighten(0.6 * table.full)
    masks, closed = gates._locked
    assert set(first_closed) <= set(closed)
    for root, mask in masks.items():  # locked channels stay closed
        assert not np.any(mask & ~first_masks[root])
    assert 0.6 * table.full <= gates.estimated_cost() < first
    assert gates.latency_target == 0.6 * table.full
    expected = gates.model.predict(X, verbose=0)  # the new gates are at 0
    folded, plan = gates.finalize()
    slim = kc.slim(folded, plan)
    assert relative_error(slim.predict(X, verbose=0), expected) < 1e-5
    assert set(plan.remove_blocks) == set(closed)
    with pytest.raises(ValueError, match="locked gates do not reopen"):
        gates.tighten(0.7 * table.full)


def test_bad_latency_arguments():
    model = resnet8()
    table = LinearTable(AdaptiveGates(model, macs_target=0.5))
    with pytest.raises(ValueError, match="exactly one of `macs_target`"):
        AdaptiveGates(model)
    with pytest.raises(ValueError, match="exactly one of `macs_target`"):
        AdaptiveGates(model, macs_target=0.5, latency_target=0.5,
                      latency_table=table)
    with pytest.raises(ValueError, match="`latency_table` goes with"):
        AdaptiveGates(model, latency_target=0.5)
    with pytest.raises(ValueError, match="`latency_table` goes with"):
        AdaptiveGates(model, macs_target=0.5, latency_table=table)
    with pytest.raises(ValueError, match="`latency_target` must be"):
        AdaptiveGates(model, latency_target=1.5, latency_table=table)
    with pytest.raises(TypeError, match="`latency_table` must have"):
        AdaptiveGates(model, latency_target=0.5, latency_table=object())
    with pytest.raises(ValueError, match="`round_to` must be"):
        AdaptiveGates(model, latency_target=0.5, latency_table=table,
                      round_to=0)


def measured_table(gates, seed):
    """A `kc.latency.LatencyTable` of `LinearTable`'s costs at the widths a
    profile measures, with the blocks a plan may remove."""
    fake = LinearTable(gates, seed)
    model = gates.source
    groups = {
        g: {"size": n, "widths": design.grid_widths(n),
            "ms": [fake.predict({g: w}) for w in design.grid_widths(n)]}
        for g, n in fake.sizes.items()
    }
    inner = design.removable_blocks(model, graph.analyze(model))
    blocks = {b: {"saving_ms": fake.per_block[b], "groups": inner[b]}
              for b in inner}
    return kc.latency.LatencyTable(fake.full, groups, blocks)


def test_measured_table_locks_the_most_gate_value_within_the_budget():
    model = resnet8()
    table = measured_table(AdaptiveGates(model, macs_target=0.5), seed=3)
    gates = AdaptiveGates(model, latency_target=0.6, latency_table=table)
    assert set(table.blocks) <= set(gates.block_gates)
    open_gates(gates, 0.0)
    values = gates.gate_values()
    inside = {g: b for b, block in table.blocks.items()
              for g in block["groups"]}

    def value(widths, removed):  # the sum of kept gates, as a reference
        total = 0.0
        for g, n in ((g, t["size"]) for g, t in table.groups.items()):
            if inside.get(g) in removed:
                continue
            v = np.sort(values[g])[::-1] / values[g].max()
            scale = min(values[inside[g]][0], 1.0) if g in inside else 1.0
            w = widths.get(g, n)
            total += v[:w].sum() * scale + controller.FILL * w
        return total

    names = list(table.groups)
    best = 0.0
    for combo in itertools.product(*(
            [table.groups[g]["size"], *table.groups[g]["widths"]]
            for g in names)):
        widths = dict(zip(names, combo))
        for k in range(len(table.blocks) + 1):
            for removed in itertools.combinations(table.blocks, k):
                if table.predict(widths, removed) <= gates.target:
                    best = max(best, value(widths, set(removed)))

    gates.lock()
    expected = gates.model.predict(X, verbose=0)
    folded, plan = gates.finalize()
    removed = set(plan.remove_blocks)
    widths = {g: table.groups[g]["size"] for g in names}
    widths.update(plan.widths())
    assert table.predict(widths, removed) <= gates.target
    np.testing.assert_allclose(value(widths, removed), best, rtol=1e-9)
    for group, kept in plan.clusters.items():  # the largest gates stay
        kept = np.concatenate(kept)
        closed = np.setdiff1d(np.arange(len(values[group])), kept)
        assert values[group][closed].max() <= values[group][kept].min()
    slim = kc.slim(folded, plan)
    assert relative_error(slim.predict(X, verbose=0), expected) < 1e-5

    gates.tighten(0.45 * table.full)  # narrower still, and exact
    _, tighter = gates.finalize()
    assert removed <= set(tighter.remove_blocks)
    for group, width in tighter.widths().items():
        assert width <= plan.widths().get(group, table.groups[group]["size"])
    assert gates.estimated_cost() <= 0.45 * table.full
    expected = gates.model.predict(X, verbose=0)
    folded, plan = gates.finalize()
    slim = kc.slim(folded, plan)
    assert relative_error(slim.predict(X, verbose=0), expected) < 1e-5


def test_measured_table_closes_zero_gates_only_as_far_as_the_budget():
    model = resnet8()
    table = measured_table(AdaptiveGates(model, macs_target=0.5), seed=3)
    gates = AdaptiveGates(model, latency_target=0.7, latency_table=table)
    for gate in gates.channel_gates.values():  # the penalty took all to 0
        gate.gate.assign(np.zeros(gate.gate.shape))
    gates.lock()
    # Every plan keeps no gate value: the knapsack keeps the widest within
    # the budget, not the fastest (0.41 of full).
    assert 0.6 * table.full < gates.estimated_cost() <= gates.target


def test_tighten_closes_more_even_when_the_lock_is_under_the_new_budget():
    model = resnet8()
    table = measured_table(AdaptiveGates(model, macs_target=0.5), seed=3)
    gates = AdaptiveGates(model, latency_target=0.8, latency_table=table)
    open_gates(gates, 0.0)
    gates.lock()
    locked = gates.estimated_cost()
    assert locked < gates.target  # the knapsack's plan is under its budget
    gates.tighten((locked + gates.target) / 2)  # which the lock still meets
    assert gates.estimated_cost() < locked
