"""Tests of `kc.methods.compensation` against NumPy references."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers as L

import keras_csgd as kc
from keras_csgd.methods import compensation
from keras_csgd.models import small_resnet


def _inputs_of(model, name, x):
    """The float64 input of layer `name` on `x`."""
    probe = keras.Model(model.input, model.get_layer(name).input)
    return np.asarray(probe(x, training=False), dtype=np.float64)


def _numpy_patches(x, kh, kw, strides, dilation, padding):
    """Conv patches by explicit loops, ordered (kh, kw, in)."""
    n, h, w, c = x.shape
    span_h, span_w = dilation * (kh - 1) + 1, dilation * (kw - 1) + 1
    if padding == "same":
        out_h, out_w = -(-h // strides), -(-w // strides)
        pad_h = max((out_h - 1) * strides + span_h - h, 0)
        pad_w = max((out_w - 1) * strides + span_w - w, 0)
        x = np.pad(
            x,
            [
                (0, 0),
                (pad_h // 2, pad_h - pad_h // 2),
                (pad_w // 2, pad_w - pad_w // 2),
                (0, 0),
            ],
        )
    else:
        out_h = (h - span_h) // strides + 1
        out_w = (w - span_w) // strides + 1
    rows = []
    for b in range(n):
        for i in range(out_h):
            for j in range(out_w):
                rows.append(
                    [
                        x[b, i * strides + a * dilation,
                          j * strides + e * dilation, ch]
                        for a in range(kh)
                        for e in range(kw)
                        for ch in range(c)
                    ]
                )
    return np.asarray(rows)


def _conv_model():
    x = inp = keras.Input((7, 7, 3))
    x = L.Conv2D(4, 3, padding="same", name="c1")(x)
    x = L.ReLU()(x)
    y = L.Conv2D(5, 3, strides=2, padding="valid", name="c2")(x)
    z = L.Conv2D(5, 3, dilation_rate=2, padding="same", name="c3")(x)
    x = L.Concatenate()([L.GlobalAveragePooling2D()(y),
                         L.GlobalAveragePooling2D()(z)])
    return keras.Model(inp, L.Dense(2, name="out")(x))


def test_statistics_match_numpy_patches():
    keras.utils.set_random_seed(0)
    model = _conv_model()
    x = np.random.default_rng(0).normal(size=(10, 7, 7, 3)).astype("float32")
    stats = compensation.collect_statistics(model, x, verbose=0, batch_size=4)
    # c1 reads the model input, a frozen group: not a consumer to measure.
    assert set(stats) == {"c2", "c3", "out"}
    for name, strides, dilation, padding in [
        ("c2", 2, 1, "valid"),
        ("c3", 1, 2, "same"),
    ]:
        layer = model.get_layer(name)
        inputs = _inputs_of(model, name, x)
        p = _numpy_patches(inputs, 3, 3, strides, dilation, padding)
        st = stats[name]
        assert st.count == len(p)
        # The inputs are float32, computed in batches of 4 there and of 10
        # here: TensorFlow's kernels may round them apart by an ulp.
        np.testing.assert_allclose(st.mean, p.mean(0), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(
            st.cov, np.cov(p, rowvar=False, bias=True), rtol=1e-6, atol=1e-9
        )
        # The order of the entries is the kernel's: patches @ kernel is
        # the layer's output.
        kernel = layer.kernel.numpy().reshape(-1, 5).astype(np.float64)
        out = keras.Model(model.input, layer.output)(x).numpy()
        np.testing.assert_allclose(
            p @ kernel + layer.bias.numpy(), out.reshape(-1, 5), atol=1e-4
        )


def test_statistics_predict_conv1d_causal_outputs():
    """Output mean/cov = mu K + b and K^T Sigma K: the patch order is right."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((9, 3))
    h = L.Conv1D(4, 1, name="p")(inp)
    y = L.Conv1D(5, 3, dilation_rate=2, padding="causal", name="c")(h)
    model = keras.Model(inp, L.GlobalAveragePooling1D()(y))
    x = np.random.default_rng(0).normal(size=(20, 9, 3)).astype("float32")
    x += np.arange(3.0, dtype="float32")
    st = compensation.collect_statistics(model, x, verbose=0)["c"]
    layer = model.get_layer("c")
    kernel = layer.kernel.numpy().reshape(-1, 5).astype(np.float64)
    out = keras.Model(model.input, layer.output)(x).numpy().reshape(-1, 5)
    assert st.count == len(out)
    np.testing.assert_allclose(
        st.mean @ kernel + layer.bias.numpy(), out.mean(0), atol=1e-5
    )
    np.testing.assert_allclose(
        kernel.T @ st.cov @ kernel,
        np.cov(out, rowvar=False, bias=True),
        atol=1e-4,
    )


def test_statistics_from_dataset_and_max_batches():
    keras.utils.set_random_seed(0)
    model = _conv_model()
    x = np.random.default_rng(1).normal(size=(12, 7, 7, 3)).astype("float32")
    ds = tf.data.Dataset.from_tensor_slices((x, np.zeros(12))).batch(4)
    stats = compensation.collect_statistics(
        model, ds, layers=["out"], max_batches=2, verbose=0
    )
    ref = _inputs_of(model, "out", x[:8])
    assert stats["out"].count == 8
    np.testing.assert_allclose(stats["out"].mean, ref.mean(0), atol=1e-10)


def test_statistics_rejects_unsupported_layer():
    model = _conv_model()
    with pytest.raises(ValueError, match="`layers`"):
        compensation.collect_statistics(
            model, np.zeros((1, 7, 7, 3)), layers=["re_lu"], verbose=0
        )


def _correlated(n, d, rank, seed, noise=0.0):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, rank)) @ rng.normal(size=(rank, d))
    return (z + 1.0 + noise * rng.normal(size=(n, d))).astype("float32")


def _dense_pair(use_bias=True):
    inp = keras.Input((10,))
    h = L.Dense(8, name="d1")(inp)
    return keras.Model(inp, L.Dense(3, use_bias=use_bias, name="d2")(h))


def _conv_pair(use_bias=True):
    inp = keras.Input((5, 5, 8))
    h = L.Conv2D(6, 1, name="d1")(inp)
    y = L.Conv2D(3, 1, use_bias=use_bias, name="d2")(h)
    return keras.Model(inp, L.ReLU()(y))


def _branches_flatten(use_bias=True):
    inp = keras.Input((4, 4, 5))
    a = L.Conv2D(3, 3, activation="relu", name="a")(inp)
    b = L.Conv2D(4, 1, strides=2, activation="relu", name="b")(inp)
    h = L.Flatten()(L.Concatenate()([a, b]))
    return keras.Model(inp, L.Dense(3, use_bias=use_bias, name="d2")(h))


# builder, clusters, kept entries of d2's input (per position, channel)
CASES = {
    "dense": (_dense_pair, {"d1": [[0], [2], [3], [5], [6], [7]]},
              lambda e: e not in (1, 4)),
    "conv1x1": (_conv_pair, {"d1": [[0], [2], [3], [5]]},
                lambda e: e not in (1, 4)),
    # d2 reads Flatten(Concatenate([a (3 ch), b (4 ch)])) at 2x2 positions;
    # removed: a1, b0 and b3 (second member of a cluster) = 1, 3, 6 of 7.
    "concat_flatten": (_branches_flatten, {"a": [[0], [2]], "b": [[1, 3], [2]]},
                       lambda e: e % 7 not in (1, 3, 6)),
}


@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("case", sorted(CASES))
def test_compensation_equals_lstsq(case, use_bias):
    build, clusters, kept_entry = CASES[case]
    keras.utils.set_random_seed(1)
    model = build(use_bias)
    shape = (200,) + tuple(model.input.shape[1:])
    x = np.random.default_rng(2).normal(size=shape).astype("float32")
    plan = kc.PruningPlan(clusters, groups=kc.channel_groups(model))
    stats = compensation.collect_statistics(model, x, verbose=0)
    small = compensation.compensate(model, plan, stats)

    d2 = model.get_layer("d2")
    kernel = d2.kernel.numpy().astype(np.float64)
    kernel = kernel.reshape(-1, kernel.shape[-1])
    h = _inputs_of(model, "d2", x).reshape(-1, kernel.shape[0])
    keep = [e for e in range(kernel.shape[0]) if kept_entry(e)]
    target = h @ kernel + (d2.bias.numpy() if use_bias else 0.0)
    design = np.concatenate([h[:, keep], np.ones((len(h), 1))], axis=1)
    sol = np.linalg.lstsq(design, target, rcond=None)[0]
    new = small.get_layer("d2")
    np.testing.assert_allclose(
        new.kernel.numpy().reshape(len(keep), -1), sol[:-1], atol=1e-6
    )
    np.testing.assert_allclose(new.bias.numpy(), sol[-1], atol=1e-6)


def _error(model, other, x):
    return float(np.mean((model(x).numpy() - other(x).numpy()) ** 2))


def test_compensation_halves_error_on_correlated_channels():
    keras.utils.set_random_seed(2)
    inp = keras.Input((8,))
    h = L.Dense(8, name="d1")(inp)
    model = keras.Model(inp, L.Dense(4, name="d2")(h))
    x = _correlated(300, 8, rank=3, seed=3, noise=0.05)
    plan = kc.PruningPlan(
        {"d1": [[0], [2], [5], [6]]}, groups=kc.channel_groups(model)
    )
    stats = compensation.collect_statistics(model, x, verbose=0)
    compensated = _error(model, compensation.compensate(model, plan, stats), x)
    plain = _error(model, kc.slim(model, plan), x)
    assert compensated <= 0.5 * plain


def test_compensation_3x3_conv_bn_consumer():
    """k x k consumer without bias: the mean shift goes into its BN."""
    keras.utils.set_random_seed(3)
    inp = keras.Input((6, 6, 2))
    h = L.Conv2D(6, 1, name="d1")(inp)
    y = L.Conv2D(4, 3, padding="same", use_bias=False, name="d2")(h)
    y = L.BatchNormalization(name="bn")(y)
    model = keras.Model(inp, L.GlobalAveragePooling2D()(y))
    model.get_layer("bn").set_weights(
        [np.ones(4), np.zeros(4), np.full(4, 0.5), np.full(4, 2.0)]
    )
    x = np.random.default_rng(4).normal(size=(40, 6, 6, 2)).astype("float32")
    x += 1.0
    plan = kc.PruningPlan(
        {"d1": [[0, 3], [1], [4]]}, groups=kc.channel_groups(model)
    )
    stats = compensation.collect_statistics(model, x, verbose=0)
    small = compensation.compensate(model, plan, stats)
    assert small.get_layer("d2").kernel.shape == (3, 3, 3, 4)
    # d1's output has rank 2 (+ a constant), so three kept channels
    # reproduce it exactly: compensation is (nearly) lossless.
    assert _error(model, small, x) < 1e-8
    assert _error(model, kc.slim(model, plan), x) > 1e-3


def test_compensation_on_resnet_beats_plain_removal():
    keras.utils.set_random_seed(4)
    model = small_resnet(width=8)
    x = np.random.default_rng(5).normal(size=(64, 8, 8, 1)).astype("float32")
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.moving_mean.assign(0.1 * np.arange(n))
    plan = kc.make_plan(model, keep=0.5)
    first = kc.PruningPlan(
        {n: [c[:1] for c in cl] for n, cl in plan.clusters.items()},
        groups=kc.channel_groups(model),
    )
    stats = compensation.collect_statistics(model, x, verbose=0)
    small = compensation.compensate(model, plan, stats)
    assert kc.count_macs(small) == kc.count_macs(kc.slim(model, plan))
    plain = _error(model, kc.slim(model, first), x)
    assert _error(model, small, x) < 0.5 * plain


def test_cap_first_pick_equals_brute_force():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(500, 3)) @ rng.normal(size=(3, 2 * 2 * 5))
    x += 0.3 * rng.normal(size=x.shape)
    x -= x.mean(0)
    stats = compensation.Stats(x.mean(0), x.T @ x / len(x), len(x))
    kernel = rng.normal(size=(2, 2, 5, 3))
    k2d = kernel.reshape(-1, 3)
    y = x @ k2d
    channel = np.tile(np.arange(5), 4)

    def loss(chosen):
        cols = np.isin(channel, chosen)
        fit = np.linalg.lstsq(x[:, cols], y, rcond=None)[0]
        return np.sum((y - x[:, cols] @ fit) ** 2) / len(x)

    order = compensation.cap_rank(stats, kernel)
    assert sorted(order.tolist()) == list(range(5))
    first = int(np.argmin([loss([c]) for c in range(5)]))
    assert order[0] == first
    rest = [c for c in range(5) if c != first]
    second = rest[int(np.argmin([loss([first, c]) for c in rest]))]
    assert order[1] == second


def test_cap_rank_rejects_mismatched_kernel():
    stats = compensation.Stats(np.zeros(4), np.eye(4), 10)
    with pytest.raises(ValueError, match="`kernel`"):
        compensation.cap_rank(stats, np.ones((5, 2)))


def _tiny_cnn():
    inp = keras.Input((8, 8, 1))
    x = L.Conv2D(8, 3, padding="same", activation="relu", name="c1")(inp)
    x = L.Conv2D(8, 3, padding="same", activation="relu", name="c2")(x)
    x = L.GlobalAveragePooling2D()(x)
    x = L.Dense(6, activation="relu", name="fc")(x)
    return keras.Model(inp, L.Dense(3, name="out")(x))


def test_structural_search_meets_floor_and_is_valid():
    keras.utils.set_random_seed(6)
    model = _tiny_cnn()
    rng = np.random.default_rng(7)
    x = rng.normal(size=(64, 8, 8, 1)).astype("float32")
    reference = model(x).numpy().argmax(1)

    def evaluate(m):
        return float(np.mean(m(x).numpy().argmax(1) == reference))

    plan, small = compensation.structural_search(
        model, x, evaluate, acc_start=0.97, acc_end=0.9, steps=3, verbose=0
    )
    assert plan.bound and set(plan.clusters) <= {"c1", "c2", "fc"}
    assert plan.clusters, "nothing was pruned"
    assert evaluate(small) >= 0.9
    for name, width in plan.widths().items():
        assert small.get_layer(name).kernel.shape[-1] == width
    again, _ = compensation.structural_search(
        model, x, evaluate, acc_start=0.97, acc_end=0.9, steps=3, verbose=0
    )
    assert again == plan


def test_structural_search_rejects_bad_arguments():
    model = _tiny_cnn()
    with pytest.raises(ValueError, match="`min_keep`"):
        compensation.structural_search(
            model, np.zeros((1, 8, 8, 1)), len, 1, 1, min_keep=0.0
        )


def test_a_plan_with_removed_blocks_removes_them_too():
    """A latency plan can remove blocks; CaP's slim model drops them."""
    keras.utils.set_random_seed(0)
    model = small_resnet(width=8)
    x = np.random.default_rng(0).uniform(size=(32, 8, 8, 1)).astype("f4")
    stats = compensation.collect_statistics(model, x, verbose=0)
    narrow = kc.make_plan(model, keep={"b2_1_conv": 0.5})
    plan = kc.PruningPlan(narrow.clusters, groups=kc.channel_groups(model),
                          remove_blocks=["b1_add"])
    small = compensation.compensate(model, plan, stats)
    assert "b1_add" not in {layer.name for layer in small.layers}
    assert kc.count_macs(small) == kc.macs_under(model, plan)
    assert kc.count_macs(small) < kc.macs_under(model, narrow)
