"""`SkippedSteps` puts the optimizers' count of skipped steps into logs."""

import keras
import numpy as np
import pytest

import keras_csgd as kc


def _fit(optimizer, callbacks):
    keras.utils.set_random_seed(0)
    inp = keras.Input((4,))
    model = keras.Model(inp, keras.layers.Dense(2, name="d")(inp))
    if optimizer == "gsm":
        optimizer = kc.GSM(density=0.5)
    elif optimizer == "csgd":
        optimizer = kc.CSGD(kc.PruningPlan({}, groups=[]))
    model.compile(optimizer=optimizer, loss="mse")
    x = np.ones((8, 4), "float32")
    y = np.ones((8, 2), "float32")
    y[4] = np.nan  # the second batch of 4 has a NaN loss and gradient
    before = model.get_layer("d").kernel.numpy()
    history = model.fit(x, y, batch_size=4, epochs=2, shuffle=False,
                        callbacks=callbacks, verbose=0)
    return model, history, before


@pytest.mark.parametrize("optimizer", ["gsm", "csgd"])
def test_count_reaches_the_logs(optimizer):
    model, history, _ = _fit(optimizer, [kc.callbacks.SkippedSteps()])
    assert history.history["skipped_steps"] == [1, 2]
    assert np.isfinite(model.get_layer("d").kernel.numpy()).all()


def test_other_optimizers_warn_once():
    with pytest.warns(UserWarning, match="does not count skipped steps"):
        _, history, _ = _fit("sgd", [kc.callbacks.SkippedSteps()])
    assert "skipped_steps" not in history.history


def test_config_round_trip():
    cb = kc.callbacks.SkippedSteps()
    again = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(cb)
    )
    assert isinstance(again, kc.callbacks.SkippedSteps)
