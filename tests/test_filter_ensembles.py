"""Tests of linear filter ensembles (`ensemble_importance`, the callback)."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers as L
from scipy.stats import spearmanr
from sklearn.linear_model import Ridge

import keras_csgd as kc
from keras_csgd import batches, graph
from keras_csgd.methods import ensembles
from keras_csgd.models import small_resnet
from utils import constructor_arguments, two_cpu_strategy
from zoo import ZOO, randomize

FE = kc.callbacks.FilterEnsembles


def planted_model(n=12, seed=0):
    """x -> Dense(n) = diag(s) -> Dense(1) = v: channel i adds s_i v_i x_i."""
    rng = np.random.default_rng(seed)
    inp = keras.Input((n,))
    hidden = L.Dense(n, use_bias=False, name="hidden")
    out = L.Dense(1, use_bias=False, name="out")
    model = keras.Model(inp, out(hidden(inp)))
    s = np.geomspace(0.1, 2.0, n) * rng.permutation(n).clip(1)
    hidden.kernel.assign(np.diag(s).astype("float32"))
    out.kernel.assign(rng.choice([-1.0, 1.0], (n, 1)).astype("float32"))
    model.compile(loss="mse")
    return model


def test_planted_importances_are_ranked():
    model = planted_model()
    x = np.random.default_rng(1).normal(size=(512, 12)).astype("float32")
    y = model.predict(x, verbose=0)
    hidden = x @ model.get_layer("hidden").kernel.numpy()
    contrib = hidden * model.get_layer("out").kernel.numpy()[:, 0]
    truth = np.mean(contrib**2, axis=0)  # MSE added by removing channel i
    scores = kc.methods.ensemble_importance(
        model, (x, y), samples=256, verbose=0
    )
    assert list(scores) == ["hidden"]
    rho = spearmanr(scores["hidden"], truth).statistic
    assert rho >= 0.95
    np.testing.assert_allclose(scores["hidden"], truth, rtol=0.2,
                               atol=0.05 * truth.max())


def test_ridge_matches_sklearn():
    rng = np.random.default_rng(0)
    bits = (rng.random((200, 30)) < 0.8).astype(np.float32)
    values = bits @ rng.normal(size=30) + rng.normal(size=200) * 0.1
    ridge = 1e-2
    ref = Ridge(alpha=ridge * len(values)).fit(bits.astype(float), values)
    np.testing.assert_allclose(
        ensembles.ridge_coefficients(bits, values, ridge), ref.coef_,
        atol=1e-8,
    )


def test_auto_ridge_follows_the_noise_of_the_metric():
    """Leave-one-out picks the least penalty for an exact linear metric and
    a strong one for a metric the masks do not explain."""
    rng = np.random.default_rng(0)
    bits = (rng.random((300, 40)) < 0.9).astype(np.float32)
    exact = bits @ rng.normal(size=40)
    assert ensembles.chosen_ridge(bits, exact) == min(ensembles.RIDGES)
    noise = rng.normal(size=300)
    assert ensembles.chosen_ridge(bits, noise) >= 0.1  # a bit's var: 0.09
    # The penalty chosen is the one `ensemble_importance` fits with.
    ridge = ensembles.chosen_ridge(bits, exact + noise)
    assert ridge in ensembles.RIDGES
    ref = Ridge(alpha=ridge * 300).fit(bits.astype(float), exact + noise)
    np.testing.assert_allclose(
        ensembles.ridge_coefficients(bits, exact + noise, ridge), ref.coef_,
        atol=1e-8)


def test_masks_drop_every_channel_equally_often():
    """Binomially many drops per mask, on the channels dropped least so
    far: every channel is seen, which independent draws do not ensure."""
    bits = ensembles.balanced_masks(512, 448, 0.99, seed=0)
    dropped = 1 - bits
    per_channel = dropped.sum(axis=0)
    assert per_channel.max() - per_channel.min() <= 1
    assert per_channel.min() >= 4
    per_mask = dropped.sum(axis=1)
    assert per_mask.std() > 1  # the intercept stays identifiable
    assert per_mask.mean() == pytest.approx(448 * 0.01, rel=0.15)
    independent = np.random.default_rng(0).random((512, 448)) >= 0.99
    assert (independent.sum(axis=0) == 0).any()
    np.testing.assert_array_equal(
        bits, ensembles.balanced_masks(512, 448, 0.99, seed=0))


@pytest.mark.parametrize("name", ["densenet", "plain_cnn", "mbv2", "nested"])
def test_mask_equals_slim_removal(name):
    """A mask's metric equals the metric of the slim model without them."""
    model = randomize(ZOO[name](), seed=3)
    model.compile(loss="mse")
    rng = np.random.default_rng(4)
    x = rng.normal(size=(24,) + model.input_shape[1:]).astype("float32")
    y = rng.normal(size=(24,) + model.output_shape[1:]).astype("float32")
    an = graph.analyze(model)
    groups = [g for g in an.groups if g.prunable]
    offsets = np.cumsum([0] + [g.size for g in groups])
    masked = ensembles._masked_consumers(model, an, groups, offsets)
    evaluate = ensembles._compiled_evaluation(
        model, batches.fixed_batches((x, y), 8), masked,
        ensembles._metric_fn(model, "loss"),
    )
    bits = (rng.random(offsets[-1]) < 0.6).astype(np.float32)
    clusters = {}
    for k, g in enumerate(groups):
        keep = np.flatnonzero(bits[offsets[k]:offsets[k + 1]])
        if not len(keep):
            bits[offsets[k]] = 1
            keep = [0]
        clusters[g.name] = [[int(i)] for i in keep]
    got = float(evaluate(tf.constant(bits)))
    for variable, original, _, _ in masked:
        variable.assign(original)
    slim = kc.slim(model, kc.PruningPlan(clusters, groups=an.groups))
    slim.compile(loss="mse")
    want = slim.evaluate(x, y, batch_size=8, verbose=0)
    assert got == pytest.approx(want, rel=1e-4)


def classifier():
    keras.utils.set_random_seed(0)
    model = small_resnet(width=4)
    model.compile("adam", "sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model


def digits(n=128):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images[:n, :, :, None] / 16.0).astype("float32")
    return x, d.target[:n]


def test_weights_restored_and_data_forms_agree():
    model = classifier()
    x, y = digits(64)
    before = [v.numpy().copy() for v in model.weights]
    a = kc.methods.ensemble_importance(
        model, (x, y), samples=16, metric="accuracy", verbose=0
    )
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(128)
    b = kc.methods.ensemble_importance(
        model, ds, samples=16, metric="accuracy", verbose=0
    )
    assert set(a) == {g.name for g in kc.channel_groups(model) if g.prunable}
    for name in a:
        np.testing.assert_allclose(a[name], b[name], atol=1e-6)
    for v, w in zip(model.weights, before):
        np.testing.assert_array_equal(v.numpy(), w)


def test_accuracy_metric_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 7)).astype("float32")
    labels = rng.integers(0, 7, 50)
    want = np.mean(logits.argmax(1) == labels)
    got = ensembles._accuracy(tf.constant(labels), tf.constant(logits))
    assert float(got) == pytest.approx(want)
    one_hot = np.eye(7, dtype="float32")[labels]
    got = ensembles._accuracy(tf.constant(one_hot), tf.constant(logits))
    assert float(got) == pytest.approx(want)


def test_callback_in_fit_and_plan():
    model = classifier()
    x, y = digits()
    fe = FE((x[:64], y[:64]), when=0, samples=16, verbose=0)
    with pytest.raises(ValueError, match="needs scores"):
        fe.plan(0.5)
    hist = model.fit(x, y, epochs=2, batch_size=32, callbacks=[fe],
                     verbose=0)
    assert hist.history["ensemble_samples"][0] == 16
    groups = [g for g in kc.channel_groups(model) if g.prunable]
    assert {g.name: g.size for g in groups} == {
        n: len(s) for n, s in fe.scores.items()
    }
    plan = fe.plan(0.5)
    for g in groups:
        width = len(plan.clusters[g.name])
        best = np.sort(np.argsort(-fe.scores[g.name])[:width])
        assert [c[0] for c in plan.clusters[g.name]] == best.tolist()
    slim = kc.slim(model, plan)
    assert kc.count_macs(slim) < kc.count_macs(model)


def test_errors_and_config_round_trip():
    data = (np.zeros((4, 8, 8, 1)), np.zeros(4))
    fe = FE(data, when=3, samples=8, mask_keep=0.8, metric="accuracy",
            ridge=0.1, seed=5, verbose=0)
    config = fe.get_config()
    # Every argument but `data` (a dataset does not serialize); a
    # keras.callbacks.Callback adds no base keys.
    assert set(config) == constructor_arguments(FE) - {"data"}
    assert FE.from_config({**config, "data": data}).get_config() == config
    # A config saved before `keep_prob` was renamed `mask_keep` loads.
    old = {**config, "data": data, "keep_prob": 0.8}
    del old["mask_keep"]
    with pytest.warns(DeprecationWarning, match="`keep_prob` is now"):
        assert FE.from_config(old).get_config() == config
    with pytest.raises(ValueError, match="both `keep_prob` and `mask_keep`"):
        FE.from_config({**config, "data": data, "keep_prob": 0.8})
    with pytest.raises(ValueError, match="`when` must be"):
        FE(data, when="epoch_end")
    with pytest.raises(ValueError, match="`metric` must be"):
        FE(data, metric="auc")
    model = small_resnet(width=4)
    with pytest.raises(ValueError, match="compiled loss"):
        kc.methods.ensemble_importance(model, data, samples=4, verbose=0)
    with pytest.raises(ValueError, match="`mask_keep` must be"):
        kc.methods.ensemble_importance(model, data, mask_keep=1.0)
    with pytest.raises(ValueError, match="`samples` must be"):
        kc.methods.ensemble_importance(model, data, samples=1)
    with pytest.raises(TypeError, match="`data` must be"):
        kc.methods.ensemble_importance(model, np.zeros(3), metric="accuracy")


def test_callback_under_mirrored_strategy_and_reuse():
    devices = tf.config.list_logical_devices("CPU")
    if len(devices) < 2:
        pytest.skip("needs two logical CPU devices (configured in conftest)")
    strategy = two_cpu_strategy()
    with strategy.scope():
        model = classifier()
    x, y = digits(64)
    fe = FE((x, y), samples=8, metric="accuracy", verbose=0)
    model.fit(x, y, epochs=1, batch_size=32, callbacks=[fe], verbose=0)
    first = fe.scores
    before = [v.numpy().copy() for v in model.weights]
    model.fit(x, y, epochs=1, batch_size=32, callbacks=[fe], verbose=0)
    assert fe.scores is not first and set(fe.scores) == set(first)
    reference = kc.methods.ensemble_importance(
        model, (x, y), samples=8, metric="accuracy", verbose=0
    )
    for name, s in reference.items():
        np.testing.assert_allclose(fe.scores[name], s, rtol=1e-5, atol=1e-7)
    for v in model.trainable_weights:  # BN moving stats are replica-local
        replicas = strategy.experimental_local_results(v.value)
        for r in replicas[1:]:
            np.testing.assert_array_equal(r.numpy(), replicas[0].numpy())
    assert any(
        not np.array_equal(v.numpy(), w) for v, w in zip(model.weights, before)
    )
