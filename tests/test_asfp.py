"""Tests of `kc.callbacks.AsymptoticSoftFilterPruning` (ASFP / SFP)."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers as L
from scipy.optimize import fsolve

import keras_csgd as kc
from keras_csgd import graph
from keras_csgd.callbacks.asfp import asymptotic_speed
from utils import constructor_arguments, two_cpu_strategy

ASFP = kc.callbacks.AsymptoticSoftFilterPruning


def one_by_one_model(seed=0):
    """Pruned groups are read only by 1x1 convs and a Dense behind GAP."""
    keras.utils.set_random_seed(seed)
    x = inp = keras.Input((6, 6, 3))
    x = L.Conv2D(8, 3, padding="same", use_bias=False, name="c1")(x)
    x = L.ReLU()(L.BatchNormalization(name="bn1")(x))
    y = L.Conv2D(8, 1, name="c2")(x)
    y = L.BatchNormalization(name="bn2")(y)
    x = L.ReLU()(L.Add()([x, y]))
    x = L.Conv2D(12, 1, name="c3")(x)
    x = L.ReLU()(L.BatchNormalization(name="bn3")(x))
    x = L.GlobalAveragePooling2D()(x)
    model = keras.Model(inp, L.Dense(4, name="out")(x))
    model.compile("adam", "sparse_categorical_crossentropy")
    return model


def data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6, 6, 3)).astype("float32")
    return x, rng.integers(0, 4, n)


def zero_channels(model, group):
    rows = graph.producer_filters(model, group)
    return np.flatnonzero(~rows.any(axis=1))


def prunable(model):
    return [g for g in kc.channel_groups(model) if g.prunable]


def test_rate_at_closed_form():
    rate, total = 0.4, 16
    cb = ASFP(rate, epochs=total)
    assert abs(cb.rate_at(0)) < 1e-6
    assert abs(cb.rate_at(0.125 * total) - 0.75 * rate) < 1e-6
    assert abs(cb.rate_at(total) - rate) < 1e-6
    assert cb.rate_at(total + 5) == pytest.approx(rate, abs=1e-12)

    # Independent reference: solve a, k, b of P(t) = a exp(-k t) + b from
    # the three conditions.
    def eqs(p):
        a, k, b = p
        return [
            a + b,
            a * np.exp(-k * 2) + b - 0.75 * rate,
            a * np.exp(-k * total) + b - rate,
        ]

    a, k, b = fsolve(eqs, [-rate, np.log(4) / 2, rate], xtol=1e-13)
    for t in np.linspace(0, total, 9):
        assert cb.rate_at(t) == pytest.approx(a * np.exp(-k * t) + b, abs=1e-9)
    # The approximation of the paper: rate * (1 - 4 ** (-8 t / T)).
    t = np.arange(total + 1)
    approx = rate * (1 - 4.0 ** (-8 * t / total))
    np.testing.assert_allclose([cb.rate_at(e) for e in t], approx, atol=1e-3)
    assert asymptotic_speed(0.125) == pytest.approx(11.0894, abs=1e-3)


def test_rate_at_other_decay_and_constant():
    cb = ASFP(0.5, epochs=10, decay=0.3)
    assert cb.rate_at(3) == pytest.approx(0.375, abs=1e-9)
    assert cb.rate_at(10) == pytest.approx(0.5, abs=1e-9)
    sfp = ASFP(0.3, schedule="constant")
    assert sfp.rate_at(0) == 0.3 and sfp.rate_at(7) == 0.3
    with pytest.raises(ValueError, match="number of epochs"):
        ASFP(0.3).rate_at(1)


def test_fit_zeroes_exact_count_and_slim_is_exact():
    model = one_by_one_model()
    x, y = data()
    total, rate = 3, 0.3
    cb = ASFP(rate, verbose=0)
    hist = model.fit(x, y, epochs=total, batch_size=32, callbacks=[cb],
                     verbose=0)
    np.testing.assert_allclose(
        hist.history["asfp_rate"], [cb.rate_at(e) for e in (1, 2, 3)]
    )
    assert hist.history["asfp_rate"][-1] == pytest.approx(rate)
    groups = prunable(model)
    assert sorted(g.size for g in groups) == [8, 12]
    for g in groups:
        zeroed = zero_channels(model, g)
        assert len(zeroed) == int(np.floor(rate * g.size + 0.5))
        kept = [c[0] for c in cb.plan.clusters[g.name]]
        assert sorted(set(kept) | set(zeroed)) == list(range(g.size))
    slim = kc.slim(model, cb.plan)
    assert kc.count_macs(slim) < kc.count_macs(model)
    np.testing.assert_allclose(
        slim.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5
    )


def test_step_intervals_follow_the_schedule_and_slim_is_exact():
    """`steps=3` over 2 epochs of 5 batches: P(t) over 4 intervals (the
    last one 1 batch long, ending with training); the end state is P(T)."""
    model = one_by_one_model()
    x, y = data(80)
    cb = ASFP(0.3, steps=3, batchnorm="scale", verbose=0)
    seen = []

    class Spy(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append(cb._batches)

    hist = model.fit(x, y, epochs=2, batch_size=16, callbacks=[cb, Spy()],
                     verbose=0)
    assert cb._intervals == 4 and seen == list(range(1, 11))
    # After epoch 1 (5 batches) one interval had ended: P(1).
    np.testing.assert_allclose(hist.history["asfp_rate"],
                               [cb.rate_at(1), cb.rate_at(3)])
    assert cb.rate_at(4) == pytest.approx(0.3)
    for g in prunable(model):
        kept = [c[0] for c in cb.plan.clusters[g.name]]
        assert len(kept) == g.size - int(np.floor(0.3 * g.size + 0.5))
    np.testing.assert_allclose(
        kc.slim(model, cb.plan).predict(x, verbose=0),
        model.predict(x, verbose=0), atol=1e-5,
    )


def test_kernel_mode_sets_bn_moving_mean_of_zeroed_channels():
    model = one_by_one_model(5)
    x, y = data()
    cb = ASFP(0.5, epochs=2, verbose=0)
    model.fit(x, y, epochs=2, batch_size=32, callbacks=[cb], verbose=0)
    (group,) = [g for g in prunable(model) if g.name == "c1"]
    zeroed = zero_channels(model, group)
    assert len(zeroed) == 4
    bias = model.get_layer("c2").bias.numpy()
    for bn, expected in (("bn1", 0.0), ("bn2", bias[zeroed])):
        moving_mean = model.get_layer(bn).moving_mean.numpy()
        np.testing.assert_array_equal(moving_mean[zeroed], expected)
    # A zeroed channel outputs beta at inference, as in training.
    probe = keras.Model(model.input, model.get_layer("bn1").output)
    out = probe.predict(x, verbose=0)[..., zeroed]
    beta = model.get_layer("bn1").beta.numpy()[zeroed]
    np.testing.assert_allclose(out, np.broadcast_to(beta, out.shape),
                               atol=1e-6)


def folded_filters(model, group):
    """Producer filters times their BN's gamma / sqrt(var + eps)."""
    rows = []
    for lname, path, axis in group.producers:
        w = np.moveaxis(graph.get_variable(model, path).numpy(), axis, 0)
        w = w.reshape(group.size, -1)
        bn = model.get_layer("bn" + lname[1:])
        scale = bn.gamma.numpy() / np.sqrt(
            bn.moving_variance.numpy() + bn.epsilon
        )
        rows.append(w * scale[:, None])
    return np.concatenate(rows, axis=1)


def test_scale_mode_zeroes_gamma_and_slim_is_exact():
    model = one_by_one_model(6)
    x, y = data()
    kernels = {
        g.name: graph.producer_filters(model, g).copy()
        for g in prunable(model)
    }
    rate = 0.5
    cb = ASFP(rate, epochs=3, batchnorm="scale", verbose=0)
    model.fit(x, y, epochs=3, batch_size=32, callbacks=[cb], verbose=0)
    for g in prunable(model):
        rows = folded_filters(model, g)
        zeroed = np.flatnonzero(~rows.any(axis=1))
        assert len(zeroed) == int(np.floor(rate * g.size + 0.5))
        kept = [c[0] for c in cb.plan.clusters[g.name]]
        assert sorted(set(kept) | set(zeroed)) == list(range(g.size))
        for lname, _, _ in g.producers:
            bn = model.get_layer("bn" + lname[1:])
            np.testing.assert_array_equal(bn.gamma.numpy()[zeroed], 0.0)
            np.testing.assert_array_equal(bn.beta.numpy()[zeroed], 0.0)
        # The kernels are not zeroed: they keep training.
        assert graph.producer_filters(model, g)[zeroed].any(axis=1).all()
        assert not np.allclose(graph.producer_filters(model, g),
                               kernels[g.name])
    slim = kc.slim(model, cb.plan)
    np.testing.assert_allclose(
        slim.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5
    )


def three_by_three_model(seed=0):
    """A residual CNN whose pruned groups feed zero-padded 3x3 convs."""
    keras.utils.set_random_seed(seed)
    x = inp = keras.Input((8, 8, 3))
    x = L.Conv2D(8, 3, padding="same", use_bias=False, name="c1")(x)
    x = L.ReLU()(L.BatchNormalization(name="bn1")(x))
    y = L.Conv2D(8, 3, padding="same", use_bias=False, name="c2")(x)
    y = L.ReLU()(L.BatchNormalization(name="bn2")(y))
    y = L.Conv2D(8, 3, padding="same", use_bias=False, name="c3")(y)
    x = L.ReLU()(L.Add()([x, L.BatchNormalization(name="bn3")(y)]))
    x = L.Conv2D(4, 3, padding="same", name="c4")(x)
    x = L.Flatten()(x)
    model = keras.Model(inp, L.Dense(4, name="out")(x))
    model.compile("adam", "sparse_categorical_crossentropy")
    return model


def test_scale_mode_slim_is_exact_behind_padded_3x3_convs():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 8, 8, 3)).astype("float32")
    y = rng.integers(0, 4, 64)
    gaps = {}
    for mode in ("kernel", "scale"):
        model = three_by_three_model(8)
        cb = ASFP(0.5, epochs=2, batchnorm=mode, verbose=0)
        model.fit(x, y, epochs=2, batch_size=32, callbacks=[cb], verbose=0)
        # c1 (with c3) and c2 halved; c4 (no BN, behind Flatten) too.
        assert sorted(cb.plan.widths().values()) == [2, 4, 4]
        slim = kc.slim(model, cb.plan)
        gaps[mode] = np.abs(
            slim.predict(x, verbose=0) - model.predict(x, verbose=0)
        ).max()
    assert gaps["scale"] < 1e-5
    # The papers' rule leaves the constant beta, wrong at padded borders.
    assert gaps["kernel"] > 1e-4


def test_scale_mode_ranks_by_the_bn_folded_norm_or_the_kernel():
    model = one_by_one_model(7)
    (group,) = [g for g in prunable(model) if g.name == "c3"]
    bn = model.get_layer("bn3")
    # Channel 0 has the largest kernel but the smallest folded filter.
    kernel = model.get_layer("c3").kernel
    w = kernel.numpy()
    w[..., 0] *= 100.0
    kernel.assign(w)
    gamma = np.ones(12, "float32")
    gamma[0] = 1e-4
    bn.gamma.assign(gamma)
    cb = ASFP(1 / 12, schedule="constant", skip=["c1"], batchnorm="scale",
              verbose=0)
    cb.set_model(model)
    cb.on_train_begin()
    cb.on_epoch_begin(0)
    np.testing.assert_array_equal(cb._zeroed[group.name][1], [0])
    assert bn.gamma.numpy()[0] == 0.0
    kernel_mode = ASFP(1 / 12, schedule="constant", skip=["c1"], verbose=0)
    kernel_mode.set_model(model)
    kernel_mode.on_train_begin()
    kernel_mode.on_epoch_begin(0)
    assert kernel_mode._zeroed[group.name][1].tolist() != [0]
    # Ranked by the kernel alone, the BN's gamma and beta still zeroed:
    # the smallest kernel's channel, not channel 0.
    kernel.assign(w)  # kernel_mode zeroed a kernel
    gamma[0] = 1.0
    bn.gamma.assign(gamma)
    bn.beta.assign(np.ones(12, "float32"))
    norms = np.sqrt(np.square(w).reshape(-1, 12).sum(axis=0))
    weakest = int(np.argmin(norms))
    by_kernel = ASFP(1 / 12, schedule="constant", skip=["c1"],
                     batchnorm="scale", ranking="kernel", verbose=0)
    by_kernel.set_model(model)
    by_kernel.on_train_begin()
    by_kernel.on_epoch_begin(0)
    np.testing.assert_array_equal(by_kernel._zeroed[group.name][1],
                                  [weakest])
    assert bn.gamma.numpy()[weakest] == bn.beta.numpy()[weakest] == 0.0
    np.testing.assert_array_equal(kernel.numpy(), w)
    with pytest.raises(ValueError, match="ranking"):
        ASFP(0.5, ranking="bn")


def test_reuse_across_fits_skip_and_l1():
    model = one_by_one_model(1)
    x, y = data()
    skip = ["c3"]
    cb = ASFP(0.5, norm="l1", skip=skip, verbose=0)
    model.fit(x, y, epochs=2, batch_size=32, callbacks=[cb], verbose=0)
    first = cb.plan
    hist = model.fit(x, y, epochs=4, batch_size=32, callbacks=[cb], verbose=0)
    # The second fit is its own schedule over its own 4 epochs.
    np.testing.assert_allclose(
        hist.history["asfp_rate"], [cb.rate_at(e) for e in (1, 2, 3, 4)]
    )
    assert list(first.clusters) == list(cb.plan.clusters) == ["c1"]
    for g in prunable(model):
        expected = 4 if g.name == "c1" else 0
        assert len(zero_channels(model, g)) == expected


def test_sfp_prunes_before_first_epoch():
    model = one_by_one_model(2)
    seen = []

    class Probe(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if not seen:
                seen.append(
                    [len(zero_channels(model, g)) for g in prunable(model)]
                )

    x, y = data(32)
    cb = ASFP(0.25, schedule="constant", verbose=0)
    model.fit(x, y, epochs=1, batch_size=32, callbacks=[cb, Probe()],
              verbose=0)
    assert sorted(seen[0]) == [2, 3]


def test_backup_and_restore_resumes_schedule(tmp_path):
    x, y = data(32)

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 2:
                raise RuntimeError("interrupted")

    model = one_by_one_model(3)
    backup = keras.callbacks.BackupAndRestore(str(tmp_path))
    cb = ASFP(0.5, verbose=0)
    with pytest.raises(RuntimeError, match="interrupted"):
        model.fit(x, y, epochs=4, batch_size=32, verbose=0,
                  callbacks=[backup, cb, Interrupt()])
    model = one_by_one_model(3)
    hist = model.fit(x, y, epochs=4, batch_size=32, verbose=0,
                     callbacks=[backup, cb])
    assert hist.epoch == [2, 3]
    np.testing.assert_allclose(
        hist.history["asfp_rate"], [cb.rate_at(3), cb.rate_at(4)]
    )
    for g in prunable(model):
        assert len(zero_channels(model, g)) == g.size // 2


@pytest.mark.skipif(
    len(tf.config.list_logical_devices("CPU")) < 2,
    reason="needs two logical CPU devices (configured in conftest)",
)
def test_mirrored_strategy():
    strategy = two_cpu_strategy()
    with strategy.scope():
        model = one_by_one_model(4)
    x, y = data()
    cb = ASFP(0.25, epochs=2, verbose=0)
    model.fit(x, y, epochs=2, batch_size=32, callbacks=[cb], verbose=0)
    for g in prunable(model):
        assert len(zero_channels(model, g)) == int(0.25 * g.size + 0.5)
        for _, path, _ in g.producers:
            var = graph.get_variable(model, path).value
            replicas = strategy.experimental_local_results(var)
            for r in replicas[1:]:
                np.testing.assert_array_equal(r.numpy(), replicas[0].numpy())


def test_config_round_trip():
    cb = ASFP(0.4, epochs=12, decay=0.2, norm="l1",
              schedule="constant", skip=("a", "b"), batchnorm="scale",
              verbose=0, steps=25, ranking="kernel")
    config = cb.get_config()
    # A keras.callbacks.Callback adds no base keys to its config.
    assert set(config) == constructor_arguments(ASFP)
    again = ASFP.from_config(config)
    assert again.get_config() == config
    # A config saved before `criterion` was renamed `norm` loads.
    old = {k: v for k, v in config.items() if k != "norm"}
    with pytest.warns(DeprecationWarning, match="`criterion` is now"):
        assert ASFP.from_config({**old, "criterion": "l1"}).get_config() == (
            config
        )
    restored = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(cb)
    )
    assert isinstance(restored, ASFP)
    assert restored.get_config() == config


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"rate": 1.0}, "`rate` must be"),
        ({"rate": 0.3, "decay": 0.8}, "`decay` must be"),
        ({"rate": 0.3, "norm": "l3"}, "`norm` must be"),
        ({"rate": 0.3, "schedule": "linear"}, "`schedule` must be"),
        ({"rate": 0.3, "epochs": 0}, "`epochs` must be"),
        ({"rate": 0.3, "steps": 0}, "`steps` must be"),
        ({"rate": 0.3, "batchnorm": "gamma"}, "`batchnorm` must be"),
    ],
)
def test_bad_arguments(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        ASFP(**kwargs)


def test_unknown_skip_raises_at_fit():
    model = one_by_one_model()
    x, y = data(32)
    with pytest.raises(ValueError, match="`skip` names groups"):
        model.fit(x, y, epochs=1, verbose=0,
                  callbacks=[ASFP(0.3, skip=["nope"], verbose=0)])


def test_from_plan_prunes_each_group_to_the_plans_width():
    # A latency plan: per-group widths and a removed block.
    model = one_by_one_model()
    groups = {g.name: g for g in prunable(model)}
    assert set(groups) == {"c1", "c3"}
    blocks = kc.blocks.residual_blocks(model)
    plan = kc.PruningPlan({"c1": [[i] for i in range(6)]},
                          groups=list(groups.values()),
                          remove_blocks=blocks)
    asfp = ASFP.from_plan(plan, epochs=2, batchnorm="scale", verbose=0)
    assert asfp.rate == {"c1": 0.25}
    x, y = data()
    model.fit(x, y, epochs=2, verbose=0, callbacks=[asfp])
    assert asfp.plan.widths() == {"c1": 6}  # c3 is not in the plan
    assert asfp.plan.remove_blocks == tuple(blocks)
    assert len(zero_channels(model, groups["c1"])) == 0  # BN-scale mode
    config = asfp.get_config()
    assert ASFP.from_config(config).get_config() == config
    with pytest.raises(ValueError, match=r"`rate` names groups"):
        model.fit(x, y, epochs=1, verbose=0,
                  callbacks=[ASFP({"nope": 0.5}, verbose=0)])
