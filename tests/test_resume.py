"""Interruption and resume; plans across JSON and across models.

`keras.callbacks.BackupAndRestore` backs up at every epoch end (the weights,
the optimizer state and the epoch). Training interrupted in the middle of
an epoch restarts that epoch from the backup; with deterministic ops and an
unshuffled dataset it must end with exactly the weights of an
uninterrupted run, for C-SGD, GSM and ASFP (whose schedule position comes
from the restored epoch and whose masks are recomputed from the restored
weights). Optimizer state across `.keras` files is tested in
test_centripetal_sgd.py and test_global_sparse_momentum.py.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers as L
from tensorflow.python.framework import config as tf_config

import keras_csgd as kc
from keras_csgd import graph
from keras_csgd.models import resnet_cifar

EPOCHS, BATCH, N = 3, 8, 32  # 4 steps per epoch
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


@pytest.fixture(scope="module", autouse=True)
def deterministic_ops():
    """Deterministic kernels for this module only."""
    was_on = tf_config.is_op_determinism_enabled()
    tf.config.experimental.enable_op_determinism()
    yield
    if not was_on:
        tf_config.disable_op_determinism()


def tiny_model():
    x = inp = keras.Input((6, 6, 2))
    x = L.Conv2D(6, 3, padding="same", name="c1")(x)
    x = L.BatchNormalization(name="bn1")(x)
    x = L.ReLU()(x)
    x = L.Conv2D(6, 3, padding="same", name="c2")(x)
    x = L.BatchNormalization(name="bn2")(x)
    x = L.ReLU()(x)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inp, L.Dense(3, name="logits")(x))


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 6, 6, 2)).astype("float32")
    return x, rng.integers(0, 3, N)


class Interrupt(keras.callbacks.Callback):
    """Raises after batch `batch` of epoch `epoch` (a crash mid-epoch)."""

    def __init__(self, epoch, batch):
        super().__init__()
        self.epoch, self.batch, self.current = epoch, batch, None

    def on_epoch_begin(self, epoch, logs=None):
        self.current = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self.current, batch) == (self.epoch, self.batch):
            raise RuntimeError("interrupted")


def csgd(model):
    return kc.CSGD(kc.make_plan(model, keep=0.5, method="kmeans"),
                   learning_rate=0.05, centripetal_strength=0.1)


def gsm(model):
    return kc.GSM(density=0.3, learning_rate=0.05, momentum=0.9)


def sgd(model):
    return keras.optimizers.SGD(0.05, momentum=0.9)


def asfp():
    return kc.callbacks.AsymptoticSoftFilterPruning(0.5, verbose=0)


def train(make_optimizer, callbacks, fresh=True):
    """A freshly built and compiled model, trained `EPOCHS` epochs."""
    keras.utils.set_random_seed(0)
    model = tiny_model()
    model.compile(optimizer=make_optimizer(model), loss=LOSS)
    x, y = data()
    history = model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False,
                        callbacks=callbacks, verbose=0)
    return model, history


@pytest.mark.parametrize(
    "make_optimizer, with_asfp",
    [(csgd, False), (gsm, False), (sgd, True)],
    ids=["CSGD", "GSM", "ASFP"],
)
def test_interrupted_mid_epoch_and_resumed_equals_uninterrupted(
    make_optimizer, with_asfp, tmp_path
):
    def callbacks(*extra):
        return [*extra, asfp()] if with_asfp else list(extra)

    reference_callbacks = callbacks()
    reference, ref_history = train(make_optimizer, reference_callbacks)
    backup = str(tmp_path / "backup")
    with pytest.raises(RuntimeError, match="interrupted"):
        train(make_optimizer,
              callbacks(keras.callbacks.BackupAndRestore(backup),
                        Interrupt(epoch=1, batch=2)))
    # A new process would rebuild the model and optimizer from scratch.
    resumed_callbacks = callbacks(keras.callbacks.BackupAndRestore(backup))
    resumed, history = train(make_optimizer, resumed_callbacks)

    assert history.epoch == [1, 2]
    for a, b in zip(resumed.weights, reference.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=1e-6,
                                   err_msg=a.path)
    assert int(resumed.optimizer.iterations) == EPOCHS * N // BATCH
    for a, b in zip(resumed.optimizer.variables,
                    reference.optimizer.variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=1e-6,
                                   err_msg=a.path)
    if with_asfp:
        # The schedule continues at the restored epoch and the masks (the
        # zeroed filters, hence the final plan) are those of the reference.
        np.testing.assert_allclose(
            history.history["asfp_rate"],
            ref_history.history["asfp_rate"][1:],
        )
        plan = resumed_callbacks[-1].plan
        assert plan == reference_callbacks[-1].plan
        assert plan.widths() == {"c1": 3, "c2": 3}
        for name, clusters in plan.clusters.items():
            for _, path, axis in plan.groups[name].producers:
                kernel = graph.get_variable(resumed, path).numpy()
                norms = np.abs(np.moveaxis(kernel, axis, 0)).reshape(
                    plan.groups[name].size, -1).sum(1)
                assert np.flatnonzero(norms).tolist() == [
                    c[0] for c in clusters
                ]


def test_plan_json_round_trip_is_stable_and_slims_the_same():
    keras.utils.set_random_seed(0)
    model = tiny_model()
    plan = kc.make_plan(model, keep=0.5, method="kmeans")
    text = plan.to_json(indent=1)
    back = kc.PruningPlan.from_json(text)
    assert back.to_json(indent=1) == text
    assert kc.PruningPlan.from_json(back.to_json()).to_json(indent=1) == text
    segments = back.variable_segments()
    for path, (axis, seg, n) in plan.variable_segments().items():
        assert (segments[path][0], segments[path][2]) == (axis, n)
        np.testing.assert_array_equal(segments[path][1], seg)
    for a, b in zip(kc.slim(model, plan).weights, kc.slim(model, back).weights):
        assert a.path == b.path
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_plan_loaded_against_another_model_names_the_mismatching_groups():
    source = resnet_cifar(8, input_shape=(8, 8, 3), widths=(4, 8, 16))
    other = resnet_cifar(8, input_shape=(8, 8, 3), widths=(4, 8, 32))
    plan = kc.PruningPlan.from_json(kc.make_plan(source, 0.5).to_json())
    sizes = {g.name: g.size for g in kc.channel_groups(other)}
    differ = sorted(n for n, g in plan.groups.items() if g.size != sizes[n])
    same = sorted(n for n, g in plan.groups.items() if g.size == sizes[n])
    assert differ and same
    with pytest.raises(ValueError, match="group sizes differ") as info:
        kc.slim(other, plan)
    message = str(info.value)
    for name in differ:
        assert f"{name} ({plan.groups[name].size} vs {sizes[name]})" in message
    for name in same:
        assert f"{name} (" not in message
    with pytest.raises(ValueError, match="does not match the shapes") as info:
        kc.CSGD(plan).build(other.trainable_variables)
    for name in differ:
        assert name in str(info.value)
