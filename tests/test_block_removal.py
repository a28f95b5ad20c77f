"""Removed residual blocks: each method carries the removal out its own way.

C-SGD drives a removed block's gate to zero (slim = trained), ASFP fades it
on its schedule (slim = soft model), CaP refits the layers that read it,
and `kc.slim` checks that every removed block is dead.
"""

import warnings

import keras
import numpy as np
import pytest
from keras import layers as L

import keras_csgd as kc
from keras_csgd import blocks
from keras_csgd.cli.prune import ASFP_SETTINGS
from keras_csgd.data import load_digits_images
from keras_csgd.methods import compensation
from keras_csgd.methods.compensation.solve import cross_least_squares
from utils import relative_error

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
REMOVED = ["s1b2_add", "s2b2_add"]


@pytest.fixture(scope="module")
def digits():
    return load_digits_images()


@pytest.fixture(scope="module")
def trained(digits):
    """A residual CNN trained on the digits (about 97% held out)."""
    keras.utils.set_random_seed(0)
    model = kc.models.resnet_cifar(14, input_shape=(8, 8, 1),
                                   widths=(8, 16, 16))
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9), LOSS,
                  metrics=["accuracy"], jit_compile=False)
    (x, y), _ = digits
    model.fit(x, y, epochs=8, batch_size=32, verbose=0)
    return model


def copy_of(model):
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    return clone


def accuracy(model, x, y):
    return float(np.mean(np.argmax(model.predict(x, verbose=0), -1) == y))


def block_plan(model, keep=0.5, method="kmeans"):
    clusters = kc.make_plan(model, keep=keep, method=method).clusters
    return kc.PruningPlan(clusters, groups=kc.channel_groups(model),
                          remove_blocks=REMOVED).bind_blocks(model)


# -------------------------------------------------------------- gates
def test_gates_are_the_last_normalization_or_kernel():
    model = kc.models.resnet_cifar(14, input_shape=(8, 8, 1),
                                   widths=(8, 16, 16))
    assert blocks.branch_gates(model, ["s1b2_add"]) == {
        "s1b2_add": ["s1b2_2_bn/gamma", "s1b2_2_bn/beta"]
    }
    x = keras.Input((6, 6, 4))
    y = L.Conv2D(4, 3, padding="same", activation="relu", name="c")(x)
    y = L.Dropout(0.1, name="drop")(L.MaxPooling2D(1, name="pool")(y))
    out = L.Add(name="add")([x, y])
    assert blocks.branch_gates(keras.Model(x, out), ["add"]) == {
        "add": ["c/kernel", "c/bias"]
    }


@pytest.mark.parametrize("tail", ["sigmoid", "bn_without_scale"])
def test_a_branch_that_cannot_be_silenced_is_named(tail):
    x = keras.Input((6, 6, 4))
    y = L.Conv2D(4, 3, padding="same", name="c")(x)
    if tail == "sigmoid":
        y = L.Activation("sigmoid", name="gate")(y)
    else:
        y = L.BatchNormalization(scale=False, name="gate")(y)
    model = keras.Model(x, L.Add(name="add")([x, y]))
    with pytest.raises(ValueError, match="add: `gate`"):
        kc.PruningPlan({}, remove_blocks=["add"]).bind_blocks(model)


def test_gates_travel_with_the_plan_json(trained):
    plan = block_plan(trained)
    again = kc.PruningPlan.from_json(plan.to_json())
    assert again.gates == plan.gates and again.remove_blocks == tuple(REMOVED)
    with pytest.raises(ValueError, match="exactly the `remove_blocks`"):
        kc.PruningPlan({}, remove_blocks=["a"], gates={"b": []})


# -------------------------------------------------------------- C-SGD
def test_csgd_without_gates_says_how_to_get_them(trained):
    plan = kc.PruningPlan({}, groups=kc.channel_groups(trained),
                          remove_blocks=REMOVED)
    model = copy_of(trained)
    model.compile(kc.CSGD(plan), LOSS)
    with pytest.raises(ValueError, match=r"plan.bind_blocks\(model\)"):
        model.train_on_batch(np.zeros((2, 8, 8, 1)), np.zeros(2))


@pytest.mark.parametrize("jit", [True, False])
def test_gate_step_matches_numpy(trained, jit):
    # Gates: g' = (lam + eps) w, the loss gradient dropped (eps scaled on
    # 1-D variables); every other variable: momentum SGD with g + lam w.
    model = copy_of(trained)
    plan = kc.PruningPlan({}, groups=kc.channel_groups(model),
                          remove_blocks=REMOVED).bind_blocks(model)
    gates = {p for paths in plan.gates.values() for p in paths}
    lr, mu, eps, lam, scale = 0.1, 0.9, 0.3, 0.01, 0.5
    opt = kc.CSGD(plan, learning_rate=lr, momentum=mu, nesterov=True,
                  centripetal_strength=eps, weight_decay=lam,
                  vector_strength_scale=scale, jit_compile=jit)
    variables = model.trainable_variables
    rng = np.random.default_rng(0)
    w = [v.numpy().astype(np.float64) for v in variables]
    m = [np.zeros_like(a) for a in w]
    for _ in range(2):
        grads = [rng.normal(size=a.shape).astype("float32") for a in w]
        opt.apply_gradients(zip(grads, variables))
        for k, v in enumerate(variables):
            kernel = len(v.shape) >= 2
            decay = lam if kernel else 0.0
            if v.path in gates:
                g = (decay + (eps if kernel else eps * scale)) * w[k]
            else:
                g = grads[k] + decay * w[k]
            m[k] = mu * m[k] - lr * g
            w[k] = w[k] + mu * m[k] - lr * g
    assert len(gates) == 4
    for k, v in enumerate(variables):
        np.testing.assert_allclose(v.numpy(), w[k], rtol=1e-5, atol=1e-6,
                                   err_msg=v.path)


def test_csgd_kills_removed_blocks_and_slim_equals_trained(trained, digits):
    (x, y), (xv, yv) = digits
    model = copy_of(trained)
    plan = block_plan(model)
    model.compile(
        kc.CSGD(plan, learning_rate=0.03, centripetal_strength=0.3,
                vector_strength_scale=1.0, jit_compile=False),
        LOSS, jit_compile=False,
    )
    model.fit(x, y, epochs=5, batch_size=32, verbose=0)
    live = blocks.branch_contributions(model, REMOVED, xv)
    assert max(live.values()) < 1e-5
    slim = kc.slim(model, plan, strict=True, inputs=xv)
    a, b = model.predict(xv, verbose=0), slim.predict(xv, verbose=0)
    assert relative_error(b, a) <= 1e-4
    assert np.mean(a.argmax(-1) == b.argmax(-1)) >= 0.999
    assert accuracy(slim, xv, yv) > 0.85
    assert not {"s1b2_1_conv", "s2b2_2_bn"} & {x.name for x in slim.layers}


# --------------------------------------------------------------- ASFP
def test_asfp_fades_removed_blocks_and_slim_equals_soft(trained, digits):
    (x, y), (xv, _) = digits
    model = copy_of(trained)
    asfp = kc.callbacks.AsymptoticSoftFilterPruning.from_plan(
        block_plan(model, method="even"), batchnorm="scale", verbose=0
    )
    model.compile(keras.optimizers.SGD(0.01, momentum=0.9), LOSS,
                  jit_compile=False)
    scales = []
    fade = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda e, logs: scales.append(
            float(np.abs(model.get_layer("s1b2_2_bn").gamma.numpy()).max()))
    )
    model.fit(x, y, epochs=3, batch_size=32, verbose=0,
              callbacks=[asfp, fade])
    assert asfp.plan.remove_blocks == tuple(REMOVED)
    assert scales[0] > scales[1] > 0 and scales[-1] == 0.0
    slim = kc.slim(model, asfp.plan, strict=True, inputs=xv)
    assert relative_error(slim.predict(xv, verbose=0),
                          model.predict(xv, verbose=0)) <= 1e-4


def test_asfp_every_few_steps_under_distillation_slims_exactly(trained,
                                                                digits):
    """The command line's ASFP: pruning every 4 batches, inside
    `kc.fine_tune` with a teacher (the callback prunes the distiller's
    student); the last interval ends with training."""
    (x, y), (xv, _) = digits
    model = copy_of(trained)
    asfp = kc.callbacks.AsymptoticSoftFilterPruning.from_plan(
        block_plan(model, method="even"), **{**ASFP_SETTINGS, "steps": 4},
        verbose=0,
    )
    assert asfp.ranking == "kernel"
    kc.fine_tune(model, (x[:600], y[:600]), teacher=trained, epochs=1,
                 validation_split=0, batch_size=64, verbose=0,
                 callbacks=[asfp])
    assert asfp._intervals == 3  # 10 batches: 4 + 4 + 2
    slim = kc.slim(model, asfp.plan, strict=True, inputs=xv)
    assert relative_error(slim.predict(xv, verbose=0),
                          model.predict(xv, verbose=0)) <= 1e-4


# --------------------------------------------------------------- slim
def test_slim_warns_on_a_live_removed_block_and_strict_raises(trained,
                                                              digits):
    _, (xv, _) = digits
    plan = kc.PruningPlan({}, groups=kc.channel_groups(trained),
                          remove_blocks=REMOVED)
    with pytest.warns(UserWarning, match="block 's[12]b2_add'"):
        kc.slim(trained, plan, inputs=xv)
    with pytest.raises(ValueError, match="branches are not zero"):
        kc.slim(trained, plan, strict=True)
    dead = copy_of(trained)
    for name in REMOVED:
        bn = dead.get_layer(name.replace("_add", "_2_bn"))
        bn.gamma.assign(np.zeros(bn.gamma.shape))
        bn.beta.assign(np.zeros(bn.beta.shape))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        slim = kc.slim(dead, plan, strict=True)
    assert relative_error(slim(xv), dead(xv)) <= 1e-5


# ---------------------------------------------------------------- CaP
def test_cross_least_squares_matches_numpy_lstsq():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(500, 5))
    p = np.concatenate([q @ rng.normal(size=(5, 3)), rng.normal(size=(500,
                                                                      4))],
                       axis=1) + 0.3
    kernel = rng.normal(size=(7, 2))
    joint = np.concatenate([q, p], axis=1)
    cov = np.cov(joint.T, bias=True)
    k_new, delta = cross_least_squares(cov, joint.mean(0), kernel, 0.0)
    design = np.concatenate([q, np.ones((500, 1))], axis=1)
    solution = np.linalg.lstsq(design, p @ kernel, rcond=None)[0]
    np.testing.assert_allclose(k_new, solution[:5], atol=1e-8)
    np.testing.assert_allclose(delta, solution[5], atol=1e-8)


def test_cap_refits_the_readers_of_removed_blocks(trained, digits):
    (x, y), (xv, yv) = digits
    plan = kc.PruningPlan({}, groups=kc.channel_groups(trained),
                          remove_blocks=["s1b1_add", "s1b2_add"])
    stats = compensation.collect_statistics(trained, x, verbose=0)
    assert compensation.blocks.block_readers(
        trained, plan.remove_blocks) == ["s2b1_1_conv", "s2b1_proj_conv"]
    with pytest.warns(UserWarning, match="not refitted"):
        plain = compensation.compensate(trained, plan, stats)
    refit = compensation.compensate(trained, plan, stats, data=x)
    assert accuracy(refit, xv, yv) > accuracy(plain, xv, yv) + 0.2
    assert [v.shape for v in refit.weights] == [v.shape
                                                for v in plain.weights]
