"""Tests for `kc.GSM` against a NumPy re-implementation of its update."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import keras_csgd as kc
from keras_csgd.models import lenet_300_100
from keras_csgd.optimizers.base import Optimizer
from utils import constructor_arguments, two_cpu_strategy

LR = 0.1
MOMENTUM = 0.9
DECAY = 0.05
DENSITY = 0.3


def _variables(seed=0):
    rng = np.random.default_rng(seed)
    shapes = {
        "dense": (6, 5),
        "bias": (5,),
        "conv": (3, 3, 2, 4),
        "gamma": (4,),
    }
    return [
        keras.Variable(rng.normal(size=s).astype("float32"), name=n)
        for n, s in shapes.items()
    ]


def _gradients(variables, seed):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=v.shape).astype("float32") for v in variables]


def _reference_step(ws, gs, zs, lr, nesterov, decays=None):
    """NumPy GSM step; returns new weights, momentums and the kernel masks."""
    kernels = [i for i, w in enumerate(ws) if w.ndim >= 2]
    decays = decays or {i: DECAY for i in kernels}
    scores = np.concatenate([np.abs(ws[i] * gs[i]).ravel() for i in kernels])
    q = int(scores.size * DENSITY)
    active = np.zeros(scores.size, bool)
    active[np.argsort(-scores, kind="stable")[:q]] = True
    masks, start = {}, 0
    for i in kernels:
        masks[i] = active[start : start + ws[i].size].reshape(ws[i].shape)
        start += ws[i].size
    new_ws, new_zs = [], []
    for i, (w, g, z) in enumerate(zip(ws, gs, zs)):
        w, g, z = (x.astype(np.float64) for x in (w, g, z))
        d = decays[i] * w + masks[i] * g if i in masks else g
        z = MOMENTUM * z + d
        w = w - lr * (d + MOMENTUM * z if nesterov else z)
        new_ws.append(w)
        new_zs.append(z)
    return new_ws, new_zs, masks


@pytest.mark.parametrize("jit_compile", [True, False])
@pytest.mark.parametrize("nesterov", [False, True])
def test_steps_match_numpy_reference(jit_compile, nesterov):
    variables = _variables()
    schedule = keras.optimizers.schedules.ExponentialDecay(LR, 1, 0.5)
    opt = kc.GSM(
        density=DENSITY,
        learning_rate=schedule,
        momentum=MOMENTUM,
        nesterov=nesterov,
        weight_decay=DECAY,
        jit_compile=jit_compile,
    )
    ws = [v.numpy() for v in variables]
    zs = [np.zeros_like(w) for w in ws]
    for step in range(3):
        gs = _gradients(variables, seed=step + 1)
        opt.apply(gs, variables)
        ws, zs, masks = _reference_step(
            ws, gs, zs, LR * 0.5**step, nesterov
        )
        for v, w in zip(variables, ws):
            np.testing.assert_allclose(v.numpy(), w, rtol=0, atol=1e-6)
        for z, ref in zip(opt.momentums, zs):
            np.testing.assert_allclose(z.numpy(), ref, rtol=0, atol=1e-6)
        ws = [v.numpy() for v in variables]
        zs = [z.numpy() for z in opt.momentums]
    n = sum(w.size for w in ws if w.ndim >= 2)
    assert sum(m.sum() for m in masks.values()) == int(n * DENSITY)


@pytest.mark.parametrize("jit_compile", [True, False])
def test_active_count_is_q_and_inactive_get_decay_only(jit_compile):
    variables = _variables()
    w0 = [v.numpy() for v in variables]
    gs = _gradients(variables, seed=1)
    opt = kc.GSM(
        density=DENSITY,
        learning_rate=LR,
        momentum=MOMENTUM,
        weight_decay=DECAY,
        jit_compile=jit_compile,
    )
    opt.apply(gs, variables)
    active, n = 0, 0
    for v, w, g in zip(variables, w0, gs):
        if w.ndim < 2:
            continue
        # First step, zero momentum: w1 = w0 - lr * (decay * w0 + B * g).
        masked_grad = (w - v.numpy()) / LR - DECAY * w
        is_active = np.abs(masked_grad) > np.abs(g) / 2
        np.testing.assert_allclose(masked_grad[~is_active], 0, atol=1e-4)
        active += is_active.sum()
        n += w.size
    assert active == int(n * DENSITY)


def test_excluded_kernel_gets_no_decay():
    variables = _variables()
    opt = kc.GSM(
        density=DENSITY,
        learning_rate=LR,
        momentum=MOMENTUM,
        weight_decay=DECAY,
        jit_compile=False,
    )
    opt.exclude_from_weight_decay(var_names=["conv"])
    ws = [v.numpy() for v in variables]
    gs = _gradients(variables, seed=1)
    opt.apply(gs, variables)
    ref, _, _ = _reference_step(
        ws, gs, [np.zeros_like(w) for w in ws], LR, False, {0: DECAY, 2: 0.0}
    )
    for v, w in zip(variables, ref):
        np.testing.assert_allclose(v.numpy(), w, rtol=0, atol=1e-6)


@pytest.mark.parametrize("jit_compile", [True, False])
def test_nonfinite_gradient_skips_step(jit_compile):
    variables = _variables()
    opt = kc.GSM(density=DENSITY, momentum=MOMENTUM, jit_compile=jit_compile)
    opt.apply(_gradients(variables, seed=1), variables)
    ws = [v.numpy() for v in variables]
    zs = [z.numpy() for z in opt.momentums]
    gs = _gradients(variables, seed=2)
    gs[1][0] = np.nan
    gs[2][0, 0, 0, 0] = np.inf
    opt.apply(gs, variables)
    for v, w in zip(variables, ws):
        np.testing.assert_array_equal(v.numpy(), w)
    for z, ref in zip(opt.momentums, zs):
        np.testing.assert_array_equal(z.numpy(), ref)
    assert int(opt.skipped_steps.numpy()) == 1
    assert int(opt.iterations.numpy()) == 2


@pytest.mark.parametrize("in_function", [False, True])
@pytest.mark.parametrize("jit_compile", [True, False])
def test_nonfinite_gradient_raises(jit_compile, in_function):
    variables = _variables()
    opt = kc.GSM(
        density=DENSITY, on_nonfinite="raise", jit_compile=jit_compile
    )
    opt.build(variables)
    apply = tf.function(opt.apply) if in_function else opt.apply
    gs = _gradients(variables, seed=1)
    gs[0][0, 0] = np.nan
    with pytest.raises(tf.errors.InvalidArgumentError, match="non-finite"):
        apply(gs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"density": 0.1, "compression": 10},
        {"density": 0.0},
        {"density": 1.5},
        {"density": True},
        {"compression": 0.5},
        {"density": 0.1, "momentum": 1.0},
        {"density": 0.1, "weight_decay": -1.0},
        {"density": 0.1, "on_nonfinite": "ignore"},
    ],
)
def test_invalid_arguments(kwargs):
    with pytest.raises(ValueError, match="Received:"):
        kc.GSM(**kwargs)


def test_compression_sets_density():
    assert kc.GSM(compression=4).density == 0.25
    assert kc.GSM(density=0.25).compression is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"density": 0.2, "nesterov": True, "jit_compile": False},
        {"compression": 8, "on_nonfinite": "raise", "clipnorm": 1.0},
    ],
)
def test_config_round_trip(kwargs):
    opt = kc.GSM(
        learning_rate=keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.9),
        weight_decay=3e-4,
        **kwargs,
    )
    config = opt.get_config()
    # Its own arguments and, through `**kwargs`, those of the base class.
    assert set(config) == (
        constructor_arguments(kc.GSM) | constructor_arguments(Optimizer)
    )
    assert config["weight_decay"] == 3e-4
    # `from_config` deserializes the schedule in place: pass a fresh config.
    again = kc.GSM.from_config(opt.get_config())
    assert again.get_config() == config
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert isinstance(restored, kc.GSM)
    assert restored.get_config() == config


def _tiny_model(batchnorm=True):
    keras.utils.set_random_seed(0)
    norm = [keras.layers.BatchNormalization()] if batchnorm else []
    return keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(16, activation="relu")]
        + norm
        + [keras.layers.Dense(3)]
    )


def _tiny_data():
    rng = np.random.default_rng(0)
    return (
        rng.normal(size=(32, 8)).astype("float32"),
        rng.integers(0, 3, size=32),
    )


def _compile(model, opt_jit, model_jit=False):
    model.compile(
        optimizer=kc.GSM(
            density=0.25,
            learning_rate=0.05,
            momentum=MOMENTUM,
            jit_compile=opt_jit,
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=model_jit,
    )
    return model


def test_keras_save_load_continues_identically(tmp_path):
    x, y = _tiny_data()
    model = _compile(_tiny_model(), opt_jit=False)
    model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    path = str(tmp_path / "gsm.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.optimizer, kc.GSM)
    assert loaded.optimizer.get_config() == model.optimizer.get_config()
    for m in (model, loaded):
        m.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    for a, b in zip(model.weights, loaded.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=1e-6)
    for a, b in zip(model.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=1e-6)


def test_fit_same_with_xla_inside_and_around():
    x, y = _tiny_data()
    weights = []
    for opt_jit, model_jit in [(False, False), (True, True)]:
        model = _compile(_tiny_model(), opt_jit, model_jit)
        model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
        weights.append([w.numpy() for w in model.weights])
    for other in weights[1:]:
        for a, b in zip(weights[0], other):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_loss_scale_optimizer_matches_plain():
    x, y = _tiny_data()
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    results = []
    for scaled in (False, True):
        model = _tiny_model()
        opt = kc.GSM(density=0.25, momentum=MOMENTUM, jit_compile=False)
        if scaled:
            opt = keras.optimizers.LossScaleOptimizer(opt, initial_scale=256.0)
        for _ in range(3):
            with tf.GradientTape() as tape:
                loss = loss_fn(y, model(x, training=True))
                loss = opt.scale_loss(loss)
            grads = tape.gradient(loss, model.trainable_variables)
            opt.apply(grads, model.trainable_variables)
        results.append([w.numpy() for w in model.weights])
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_mirrored_strategy_matches_one_device():
    devices = [d.name for d in tf.config.list_logical_devices("CPU")][:2]
    if len(devices) < 2:
        pytest.skip("needs two logical CPUs (tests/conftest.py)")
    x, y = _tiny_data()
    weights = []
    for strategy in (
        tf.distribute.get_strategy(),
        two_cpu_strategy(),
    ):
        with strategy.scope():
            # No BatchNormalization: its batch statistics are per replica.
            model = _compile(_tiny_model(batchnorm=False), opt_jit=True)
        model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
        weights.append([w.numpy() for w in model.weights])
        assert int(model.optimizer.skipped_steps.numpy()) == 0
    for a, b in zip(*weights):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_digits_mlp_compression_10_keeps_accuracy():
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, random_state=0, stratify=y
    )

    def train(optimizer):
        keras.utils.set_random_seed(0)
        model = lenet_300_100()
        model.compile(
            optimizer=optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        model.fit(x_train, y_train, batch_size=64, epochs=20, verbose=0)
        return model

    sgd = train(keras.optimizers.SGD(0.02, momentum=0.9))
    gsm = train(
        kc.GSM(
            compression=10,
            learning_rate=0.02,
            momentum=0.98,
            weight_decay=5e-3,
            jit_compile=False,
        )
    )
    report = kc.sparsify(gsm, density=0.1)
    assert report["nonzero"] == int(report["size"] * 0.1)
    sgd_accuracy = sgd.evaluate(x_test, y_test, verbose=0)[1]
    gsm_accuracy = gsm.evaluate(x_test, y_test, verbose=0)[1]
    assert gsm_accuracy >= sgd_accuracy - 0.015
