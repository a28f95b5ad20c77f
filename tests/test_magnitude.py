"""Tests of `kc.methods.magnitude_plan` against NumPy filter norms."""

import numpy as np
import pytest

import keras_csgd as kc
from keras_csgd import graph
from keras_csgd.clusters import target_width
from keras_csgd.methods.magnitude import filter_norms
from zoo import bottleneck_resnet, randomize


@pytest.fixture(scope="module")
def model():
    return randomize(bottleneck_resnet(), seed=1)


def reference_norms(model, group, norm):
    """NumPy: per producer, out channels on the last kernel axis."""
    total = np.zeros(group.size)
    for _, path, axis in group.producers:
        w = graph.get_variable(model, path).numpy().astype(np.float64)
        w = np.moveaxis(w, axis, -1).reshape(-1, group.size)
        total += np.abs(w).sum(0) if norm == "l1" else np.square(w).sum(0)
    return total if norm == "l1" else np.sqrt(total)


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_filter_norms_sum_over_all_producers(model, norm):
    coupled = [g for g in kc.channel_groups(model) if len(g.producers) > 1]
    assert coupled, "the residual stages must couple producers"
    for g in coupled:
        np.testing.assert_allclose(
            filter_norms(model, g, norm), reference_norms(model, g, norm)
        )


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_magnitude_plan_keeps_largest(model, norm):
    plan = kc.methods.magnitude_plan(model, keep=0.5, norm=norm)
    groups = [g for g in kc.channel_groups(model) if g.prunable]
    assert set(plan.clusters) == {g.name for g in groups}
    for g in groups:
        kept = [c[0] for c in plan.clusters[g.name]]
        assert all(len(c) == 1 for c in plan.clusters[g.name])
        norms = reference_norms(model, g, norm)
        width = target_width(g.size, 0.5)
        assert kept == sorted(np.argsort(-norms)[:width].tolist())
    slim = kc.slim(model, plan)
    assert kc.count_macs(slim) < kc.count_macs(model)


def test_round_to_and_bad_norm(model):
    plan = kc.methods.magnitude_plan(model, keep=0.4, round_to=4)
    assert all(w % 4 == 0 for w in plan.widths().values())
    with pytest.raises(ValueError, match="`norm` must be"):
        kc.methods.magnitude_plan(model, keep=0.5, norm="linf")
