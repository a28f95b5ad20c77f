"""Tests for `kc.CSGD`, `kc.cluster_spread` and `kc.callbacks.ClusterSpread`."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers as L

import keras_csgd as kc
import zoo
from keras_csgd import graph
from keras_csgd.models import resnet_cifar, small_resnet
from keras_csgd.optimizers.base import Optimizer
from utils import (
    collapse,
    constructor_arguments,
    relative_error,
    two_cpu_strategy,
)

LOSS = "sparse_categorical_crossentropy"


def random_plan(model, seed=0):
    """Random clusters in every prunable group, one channel removed."""
    rng = np.random.default_rng(seed)
    clusters = {}
    for g in kc.channel_groups(model):
        if not g.prunable or g.size < 4:
            continue
        perm = rng.permutation(g.size)[:-1]
        cuts = np.sort(rng.choice(np.arange(1, len(perm)), 2, replace=False))
        clusters[g.name] = [c.tolist() for c in np.split(perm, cuts)]
    return kc.PruningPlan(clusters, groups=kc.channel_groups(model))


def plain_cnn_layout(model):
    """`{group: [(layer, weight, channel axis, repeat)]}` of `zoo.plain_cnn`.

    The variables that follow each group's channels, read off the model's
    code: along `axis`, entry `j` is channel `j // repeat` of the group
    (`repeat` > 1 behind a depth multiplier), copy `j % repeat`.
    """
    return {
        "c1": [("c1", "kernel", 3, 1), ("c1", "bias", 0, 1),
               ("bn1", "gamma", 0, 1), ("bn1", "beta", 0, 1)],
        "c2": [("c2", "kernel", 3, 1), ("c2", "bias", 0, 1),
               ("prelu", "alpha", 2, 1)],
        "fc1": [("fc1", "kernel", 1, 1), ("fc1", "bias", 0, 1)],
    }


def inverted_residual_layout(model):
    """As `plain_cnn_layout`, for `zoo.inverted_residual`.

    Its unnamed BatchNormalization layers follow stem, expand, dw and
    project, in this order; the Add ties stem and project, and dw2
    (multiplier 2) repeats every stem channel twice in its bias, in dw2_bn
    and in the input channels of sep's depthwise kernel.
    """
    bn = [
        layer.name
        for layer in model.layers
        if isinstance(layer, L.BatchNormalization)
    ]

    def norm(i, repeat=1):
        return [(bn[i], "gamma", 0, repeat), (bn[i], "beta", 0, repeat)]

    return {
        "stem": [("stem", "kernel", 3, 1), ("stem", "bias", 0, 1), *norm(0),
                 ("project", "kernel", 3, 1), ("project", "bias", 0, 1),
                 *norm(3), ("dw2", "kernel", 2, 1), ("dw2", "bias", 0, 2),
                 *norm(4, repeat=2), ("sep", "depthwise_kernel", 2, 2)],
        "expand": [("expand", "kernel", 3, 1), ("expand", "bias", 0, 1),
                   *norm(1), ("dw", "kernel", 2, 1), ("dw", "bias", 0, 1),
                   *norm(2)],
        "sep": [("sep", "pointwise_kernel", 3, 1), ("sep", "bias", 0, 1)],
    }


def reference_segments(model, plan, layout):
    """`{variable path: (axis, segment ids)}` from the clusters and `layout`.

    Entries share a segment when their channels are in one cluster of the
    plan and they are the same copy; removed channels are alone.
    """
    segments = {}
    for group, members in layout.items():
        cluster_of = {
            c: k for k, cluster in enumerate(plan.clusters[group])
            for c in cluster
        }
        for layer, weight, axis, repeat in members:
            variable = getattr(model.get_layer(layer), weight)
            keys = [
                (cluster_of[j // repeat], j % repeat)
                if j // repeat in cluster_of else ("removed", j)
                for j in range(variable.shape[axis])
            ]
            ids = {}
            seg = np.array([ids.setdefault(k, len(ids)) for k in keys])
            segments[variable.path] = (axis, seg)
    return segments


def reference_step(w, g, m, seg, axis, lam, eps, lr, mu, nesterov):
    """One C-SGD step in float64, cluster by cluster, entry by entry."""
    w, g, m = (np.moveaxis(a.astype(np.float64), axis, 0) for a in (w, g, m))
    gp = np.empty_like(g)
    for i in range(len(w)):
        same = seg == seg[i]
        gp[i] = (
            g[same].mean(0)
            + lam * w[i]
            + eps * (w[i] - w[same].mean(0))
        )
    m = mu * m - lr * gp
    w = w + (mu * m - lr * gp if nesterov else m)
    return np.moveaxis(w, 0, axis), np.moveaxis(m, 0, axis)


def small_data(shape, n=32, classes=10, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n,) + tuple(shape)).astype("float32")
    return x, rng.integers(0, classes, n)


def weights(model):
    return [v.numpy() for v in model.trainable_variables]


def assert_all_close(a, b, atol):
    for p, q in zip(a, b):
        np.testing.assert_allclose(p, q, rtol=0, atol=atol)


# ------------------------------------------------------------ the update
@pytest.mark.parametrize(
    "build, layout, nesterov, jit",
    [
        (zoo.plain_cnn, plain_cnn_layout, True, True),
        (zoo.plain_cnn, plain_cnn_layout, False, False),
        (zoo.inverted_residual, inverted_residual_layout, True, False),
        (zoo.inverted_residual, inverted_residual_layout, False, True),
    ],
)
def test_two_steps_match_numpy(build, layout, nesterov, jit):
    # plain_cnn: conv kernels and biases, BN gamma/beta, PReLU alpha, dense
    # kernels and biases (clustered fc1, unplanned output layer);
    # inverted_residual: depthwise kernels (multiplier 1 and 2), separable.
    # The reference clusters come from the plan's clusters and the layout
    # written out above, not from the library's `variable_segments()`.
    model = zoo.randomize(build())
    plan = random_plan(model)
    layout = layout(model)
    assert set(layout) == set(plan.clusters)
    lr = keras.optimizers.schedules.PiecewiseConstantDecay([0], [0.1, 0.05])
    cs, wd, mu = 0.3, 0.01, 0.9
    opt = kc.CSGD(
        plan, learning_rate=lr, momentum=mu, nesterov=nesterov,
        centripetal_strength=cs, weight_decay=wd, jit_compile=jit,
    )
    variables = model.trainable_variables
    segments = reference_segments(model, plan, layout)
    assert any(len(v.shape) == 4 and v.shape[-1] > 1 for v in variables)
    rng = np.random.default_rng(1)
    w = [v.numpy() for v in variables]
    m = [np.zeros_like(a) for a in w]
    for step_lr in (0.1, 0.05):
        grads = [rng.normal(size=a.shape).astype("float32") for a in w]
        opt.apply_gradients(zip(grads, variables))
        for k, v in enumerate(variables):
            axis, seg = segments.get(v.path, (0, np.arange(v.shape[0])))
            kernel = len(v.shape) >= 2
            w[k], m[k] = reference_step(
                w[k], grads[k], m[k], seg, axis,
                lam=wd if kernel else 0.0,
                eps=cs if kernel else 0.1 * cs,
                lr=step_lr, mu=mu, nesterov=nesterov,
            )
    assert sum(p in segments for p in (v.path for v in variables)) > 4
    for k, v in enumerate(variables):
        np.testing.assert_allclose(
            v.numpy(), w[k], rtol=1e-6, atol=1e-6, err_msg=v.path
        )
        np.testing.assert_allclose(
            opt.momentums[k].numpy(), m[k], rtol=1e-6, atol=1e-6
        )


def test_cluster_differences_contract_across_coupled_resnet56_layers():
    # Residual constraint: the stem, the projections and every block's last
    # conv of a stage are one group with one clustering; one step from zero
    # momentum scales the difference of two members of a cluster by exactly
    # 1 - lr (1 + momentum) (lam + eps) in every coupled kernel.
    model = resnet_cifar(56)
    plan = kc.make_plan(model, keep=0.625)
    groups = {p: g for g in plan.groups.values() for _, p, _ in g.producers}
    stages = {
        1: ["stem_conv"] + [f"s1b{b}_2_conv" for b in range(1, 10)],
        2: ["s2b1_proj_conv"] + [f"s2b{b}_2_conv" for b in range(1, 10)],
        3: ["s3b1_proj_conv"] + [f"s3b{b}_2_conv" for b in range(1, 10)],
    }
    lr, mu, cs, wd = 0.1, 0.9, 0.5, 1e-4
    opt = kc.CSGD(plan, learning_rate=lr, momentum=mu, centripetal_strength=cs,
                  weight_decay=wd, jit_compile=False)
    rng = np.random.default_rng(0)
    before = {v.path: v.numpy() for v in model.trainable_variables}
    opt.apply_gradients(
        (rng.normal(size=v.shape).astype("float32"), v)
        for v in model.trainable_variables
    )
    factor = 1 - lr * (1 + mu) * (wd + cs)
    for layers in stages.values():
        paths = [f"{name}/kernel" for name in layers]
        group = groups[paths[0]]
        assert all(groups[p] is group for p in paths)
        i, j = next(c for c in plan.clusters[group.name] if len(c) > 1)[:2]
        for p in paths:
            after = graph.get_variable(model, p).numpy()
            np.testing.assert_allclose(
                after[..., i] - after[..., j],
                factor * (before[p][..., i] - before[p][..., j]),
                atol=1e-5,
            )


def fresh_small(jit=True):
    """small_resnet(width=4) and a CSGD for it, seeded."""
    keras.utils.set_random_seed(0)
    model = small_resnet(width=4)
    opt = kc.CSGD(kc.make_plan(model, keep=0.5), learning_rate=0.05,
                  centripetal_strength=0.2, jit_compile=jit)
    return model, opt


def eager_reference(batches):
    """Weights after an eager custom loop (`apply_gradients`) over batches."""
    model, opt = fresh_small(jit=False)
    loss_fn = keras.losses.SparseCategoricalCrossentropy()
    for xb, yb in batches:
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
    return weights(model)


@pytest.mark.parametrize("model_jit, opt_jit", [(False, True), (True, False)])
def test_fit_matches_eager_custom_loop_and_skips_nonfinite(model_jit, opt_jit):
    # Three finite batches, then one with a NaN input: the last step is
    # skipped and counted, and fit ends where the eager custom loop does.
    x, y = small_data((8, 8, 1), n=16)
    expected = eager_reference([(x[:8], y[:8]), (x[8:], y[8:]), (x[:8], y[:8])])
    model, opt = fresh_small(opt_jit)
    model.compile(optimizer=opt, loss=LOSS, jit_compile=model_jit)
    x_nan = x[:8].copy()
    x_nan[0, 0, 0, 0] = np.nan
    model.fit(np.concatenate([x, x[:8], x_nan]), np.concatenate([y, y[:16]]),
              batch_size=8, epochs=1, shuffle=False, verbose=0)
    assert int(opt.skipped_steps.numpy()) == 1
    assert_all_close(weights(model), expected, atol=1e-5)


def test_loss_scale_optimizer_matches_plain():
    x, y = small_data((8, 8, 1), n=16)
    expected = eager_reference([(x[:8], y[:8]), (x[8:], y[8:])])
    model, opt = fresh_small()
    opt = keras.optimizers.LossScaleOptimizer(opt, initial_scale=2.0**10)
    model.compile(optimizer=opt, loss=LOSS, jit_compile=False)
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    assert_all_close(weights(model), expected, atol=1e-5)


@pytest.mark.parametrize("jit", [True, False])
def test_mirrored_strategy_matches_one_device(jit):
    if len(tf.config.list_logical_devices("CPU")) < 2:
        pytest.skip("needs 2 logical CPUs (tests/conftest.py)")
    x, y = small_data((8, 8, 1), n=16)

    def net():
        # No BatchNormalization: its batch statistics are per replica.
        inp = keras.Input((8, 8, 1))
        a = L.Conv2D(6, 3, padding="same", name="c1")(inp)
        b = L.Conv2D(6, 3, padding="same", activation="relu", name="c2")(a)
        h = L.GlobalAveragePooling2D()(L.Add()([a, b]))
        return keras.Model(inp, L.Dense(10, name="d")(h))

    keras.utils.set_random_seed(0)
    start = net().get_weights()
    results = []
    for strategy in (
        tf.distribute.get_strategy(),
        two_cpu_strategy(),
    ):
        with strategy.scope():
            model = net()
            model.set_weights(start)
            opt = kc.CSGD(kc.make_plan(model, keep=0.5), learning_rate=0.05,
                          centripetal_strength=0.2, jit_compile=jit)
            model.compile(optimizer=opt, loss=LOSS, jit_compile=False)
        model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0)
        results.append(weights(model))
    assert_all_close(results[1], results[0], atol=1e-5)
    assert max(np.abs(a - b).max() for a, b in zip(results[0], start)) > 0.01


# ------------------------------------------------------- non-finite steps
@pytest.mark.parametrize("jit", [True, False])
def test_nonfinite_step_is_skipped_and_counted(jit):
    model, opt = fresh_small(jit)
    variables = model.trainable_variables
    ones = [np.ones(v.shape, "float32") for v in variables]
    opt.apply_gradients(zip(ones, variables))
    state = weights(model), [m.numpy() for m in opt.momentums]
    bad = list(ones)
    bad[3] = np.where(np.arange(bad[3].size).reshape(bad[3].shape) == 1,
                      np.inf, bad[3]).astype("float32")
    bad[-1] = np.full_like(bad[-1], np.nan)
    opt.apply_gradients(zip(bad, variables))
    assert int(opt.skipped_steps.numpy()) == 1
    assert_all_close(weights(model), state[0], atol=0)
    assert_all_close([m.numpy() for m in opt.momentums], state[1], atol=0)
    opt.apply_gradients(zip(ones, variables))
    assert int(opt.skipped_steps.numpy()) == 1
    assert not np.allclose(weights(model)[0], state[0][0])


def test_nonfinite_raise():
    model, _ = fresh_small()
    opt = kc.CSGD(kc.make_plan(model, keep=0.5), on_nonfinite="raise")
    variables = model.trainable_variables
    grads = [np.full(v.shape, np.nan, "float32") for v in variables]
    with pytest.raises(tf.errors.InvalidArgumentError, match="non-finite"):
        opt.apply_gradients(zip(grads, variables))
    model, _ = fresh_small()
    opt = kc.CSGD(kc.make_plan(model, keep=0.5), on_nonfinite="raise")
    model.compile(optimizer=opt, loss=LOSS, jit_compile=False)
    x, y = small_data((8, 8, 1), n=8)
    x[0] = np.nan
    with pytest.raises(tf.errors.InvalidArgumentError, match="non-finite"):
        model.fit(x, y, batch_size=8, epochs=1, verbose=0)


# --------------------------------------------------------------- errors
def test_build_rejects_plans_of_other_models():
    model = small_resnet(width=4)
    other = kc.make_plan(zoo.plain_cnn(), keep=0.5)
    with pytest.raises(ValueError, match="c1/kernel"):
        kc.CSGD(other).build(model.trainable_variables)
    wider = kc.make_plan(small_resnet(width=8), keep=0.5)
    with pytest.raises(ValueError, match="stem_conv/kernel: shape"):
        kc.CSGD(wider).build(model.trainable_variables)
    plan = kc.make_plan(model, keep=0.5)
    model.get_layer("b1_1_bn").trainable = False
    with pytest.raises(ValueError, match="frozen.*b1_1_bn/gamma"):
        kc.CSGD(plan).build(model.trainable_variables)


def test_constructor_errors():
    model = small_resnet(width=4)
    plan = kc.make_plan(model, keep=0.5)
    with pytest.raises(ValueError, match="bound plan"):
        kc.CSGD(kc.PruningPlan(plan.clusters))
    with pytest.raises(TypeError, match="Received: plan=3"):
        kc.CSGD(3)
    with pytest.raises(ValueError, match=r"`momentum`.*momentum=1.5"):
        kc.CSGD(plan, momentum=1.5)
    with pytest.raises(ValueError, match="centripetal_strength=-1"):
        kc.CSGD(plan, centripetal_strength=-1.0)
    with pytest.raises(ValueError, match="on_nonfinite='ignore'"):
        kc.CSGD(plan, on_nonfinite="ignore")


# ------------------------------------------------------- serialization
def test_config_round_trip():
    model = small_resnet(width=4)
    plan = kc.make_plan(model, keep=0.5, method="kmeans")
    lr = keras.optimizers.schedules.ExponentialDecay(0.1, 100, 0.5)
    opt = kc.CSGD(plan, learning_rate=lr, momentum=0.8, nesterov=False,
                  centripetal_strength=0.01, weight_decay=5e-4,
                  vector_strength_scale=0.2, on_nonfinite="raise",
                  jit_compile=False, clipnorm=1.0, name="csgd")
    config = opt.get_config()
    # Its own arguments and, through `**kwargs`, those of the base class.
    assert set(config) == (
        constructor_arguments(kc.CSGD) | constructor_arguments(Optimizer)
    )
    assert config["weight_decay"] == 5e-4
    restored = kc.CSGD.from_config(dict(config))
    assert restored.get_config() == config
    assert restored.plan == plan and restored.plan.bound
    again = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert isinstance(again, kc.CSGD) and again.get_config() == config
    spread = kc.callbacks.ClusterSpread(plan)
    back = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(spread)
    )
    assert back.plan == plan


def test_keras_file_round_trip_continues_identically(tmp_path):
    x, y = small_data((8, 8, 1), n=16)
    model, opt = fresh_small()
    model.compile(optimizer=opt, loss=LOSS, jit_compile=False)
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    path = str(tmp_path / "csgd.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.optimizer, kc.CSGD)
    assert loaded.optimizer.plan == opt.plan
    assert_all_close(
        [m.numpy() for m in loaded.optimizer.momentums],
        [m.numpy() for m in opt.momentums],
        atol=0,
    )
    assert np.abs(opt.momentums[0].numpy()).max() > 0
    for m in (model, loaded):
        m.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    assert_all_close(weights(loaded), weights(model), atol=1e-6)


# ----------------------------------------------------------- the spread
def test_cluster_spread_matches_numpy_and_is_zero_when_collapsed():
    model = zoo.randomize(zoo.plain_cnn())
    plan = random_plan(model)
    spread = kc.cluster_spread(model, plan)
    for name, clusters in plan.clusters.items():
        g = plan.groups[name]
        rows = np.concatenate(
            [
                np.moveaxis(graph.get_variable(model, p).numpy(), a, 0)
                .reshape(g.size, -1)
                for _, p, a in g.members
                if not p.endswith(("moving_mean", "moving_variance"))
                and p not in g.maps
            ],
            axis=1,
        )
        widest = max(
            np.linalg.norm(rows[i] - rows[j])
            for c in clusters for i in c for j in c
        )
        expected = widest / np.linalg.norm(rows, axis=1).mean()
        np.testing.assert_allclose(spread["groups"][name], expected,
                                   rtol=1e-5)
    assert spread["overall"] == max(spread["groups"].values()) > 0
    # BN gamma/beta count: a model whose kernels agree but whose BN
    # parameters do not is not collapsed.
    collapse(model, plan)
    bn = model.get_layer("bn1")
    bn.gamma.assign(bn.gamma.numpy() * np.linspace(0.5, 1.5, 8))
    assert kc.cluster_spread(model, plan)["groups"]["c1"] > 1e-3
    collapse(model, plan)
    assert kc.cluster_spread(model, plan)["overall"] < 1e-6


def test_centripetal_training_collapses_then_slims_exactly():
    keras.utils.set_random_seed(0)
    model = resnet_cifar(8, input_shape=(8, 8, 3), widths=(8, 12, 16))
    plan = kc.make_plan(model, keep=0.5, method="kmeans")
    x, y = small_data((8, 8, 3), n=64)
    start = kc.cluster_spread(model, plan)["overall"]
    spread = kc.callbacks.ClusterSpread(plan)
    model.compile(
        optimizer=kc.CSGD(plan, learning_rate=0.05, centripetal_strength=1.0),
        loss=LOSS,
        jit_compile=False,
    )
    history = model.fit(x, y, batch_size=16, epochs=40, verbose=0,
                        callbacks=[spread])
    curve = history.history["cluster_spread"]
    assert len(spread.history) == len(curve) == 40
    assert spread.history[-1]["overall"] == curve[-1]
    assert curve[-1] <= start / 1000
    slim = kc.slim(model, plan)
    assert slim.count_params() < model.count_params()
    assert relative_error(slim(x), model(x)) < 1e-4


def test_collapse_strength_collapses_by_the_factor_over_the_schedule():
    """The strength's collapse, run by `kc.CSGD` step by step on a cosine
    schedule, against the NumPy recurrence of a cluster difference (no
    loss gradient separates the members) and the factor asked for."""
    inputs = keras.Input((6,))
    model = keras.Model(inputs, L.Dense(1)(L.Dense(8, name="hidden")(inputs)))
    groups = kc.channel_groups(model)
    plan = kc.PruningPlan({"hidden": [[0, 1], [2, 3], [4, 5], [6, 7]]},
                          groups=groups)
    steps, mu, collapse = 200, 0.9, 1e-3
    rate = keras.optimizers.schedules.CosineDecay(0.05, steps)
    eps = kc.optimizers.collapse_strength(rate, steps, momentum=mu,
                                          collapse=collapse)
    opt = kc.CSGD(plan, learning_rate=rate, momentum=mu,
                  centripetal_strength=eps, weight_decay=0.0,
                  vector_strength_scale=1.0, jit_compile=False)
    kernel = model.get_layer("hidden").kernel
    start = kernel.numpy()[:, 0] - kernel.numpy()[:, 1]
    rng = np.random.default_rng(0)
    for _ in range(steps):
        opt.apply_gradients(
            (rng.normal(size=v.shape).astype("float32"), v)
            for v in model.trainable_variables)
    end = kernel.numpy()[:, 0] - kernel.numpy()[:, 1]
    d, m = 1.0, 0.0  # Nesterov momentum on a difference d: gradient eps*d
    for lr in keras.ops.convert_to_numpy(rate(np.arange(steps))):
        g = eps * d
        m = mu * m - lr * g
        d = d + mu * m - lr * g
    np.testing.assert_allclose(end, d * start, rtol=1e-3, atol=5e-6)  # f32
    assert collapse / 3 < abs(d) < collapse * 3
    constant = kc.optimizers.collapse_strength(0.01, 100, momentum=0.0,
                                               collapse=np.exp(-2))
    assert constant == pytest.approx(2.0)
    with pytest.raises(ValueError, match="`collapse`"):
        kc.optimizers.collapse_strength(0.01, 10, collapse=1.0)
    with pytest.raises(ValueError, match="`momentum`"):
        kc.optimizers.collapse_strength(0.01, 10, momentum=1.0)
