"""keras.applications families (weights=None, small inputs): the collapse test.

Frozen groups must never mis-slim: every model's slim outputs must equal the
collapsed model's, whatever the analysis left prunable.
"""

import keras
import numpy as np
import pytest

import keras_csgd as kc
from utils import collapse, relative_error
from zoo import randomize

A = keras.applications
FAST = {
    "MobileNetV2": lambda: A.MobileNetV2(
        weights=None, input_shape=(32, 32, 3), alpha=0.35, classes=10
    ),
    "MobileNetV3Small": lambda: A.MobileNetV3Small(
        weights=None, input_shape=(32, 32, 3), classes=10
    ),
    "VGG16": lambda: A.VGG16(
        weights=None, input_shape=(32, 32, 3), classes=10
    ),
}
SLOW = {
    "ResNet50": lambda: A.ResNet50(
        weights=None, input_shape=(32, 32, 3), classes=10
    ),
    "DenseNet121": lambda: A.DenseNet121(
        weights=None, input_shape=(32, 32, 3), classes=10
    ),
    "EfficientNetB0": lambda: A.EfficientNetB0(
        weights=None, input_shape=(32, 32, 3), classes=10
    ),
    "ConvNeXtTiny": lambda: A.ConvNeXtTiny(
        weights=None, input_shape=(32, 32, 3), classes=10
    ),
    "Xception": lambda: A.Xception(
        weights=None, input_shape=(71, 71, 3), classes=10
    ),
}


def _check(make):
    model = randomize(make())
    groups = kc.channel_groups(model)
    assert any(g.prunable for g in groups)
    for g in groups:
        assert g.prunable == (g.reason is None)
    plan = kc.make_plan(model, keep=0.6, method="even")
    collapse(model, plan)
    shape = [2] + list(model.inputs[0].shape[1:])
    x = np.random.default_rng(0).normal(size=shape).astype("float32")
    small = kc.slim(model, plan)
    assert relative_error(small(x), model(x)) < 1e-4
    assert kc.count_macs(small) < 0.7 * kc.count_macs(model)


@pytest.mark.parametrize("name", sorted(FAST))
def test_application_collapse(name):
    _check(FAST[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SLOW))
def test_application_collapse_large(name):
    _check(SLOW[name])
