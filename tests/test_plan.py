"""PruningPlan: validation, widths, makers, binding and JSON."""

import numpy as np
import pytest

import keras_csgd as kc
import zoo
from keras_csgd.clusters import even_clusters, target_width
from keras_csgd.models import resnet_cifar


@pytest.fixture(scope="module")
def model():
    return resnet_cifar(20, input_shape=(16, 16, 3))


def test_even_clusters_first_ones_longer():
    assert even_clusters(7, 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert even_clusters(4, 4) == [[0], [1], [2], [3]]


@pytest.mark.parametrize(
    "size, keep, round_to, width",
    [(16, 0.625, None, 10), (64, 0.625, None, 40), (10, 0.01, None, 1),
     (16, 0.625, 8, 8), (64, 0.625, 8, 40), (32, 0.625, 8, 24),
     (64, 0.6, 16, 32), (4, 0.5, 8, 4), (32, 1.0, 8, 32)],
)
def test_target_width(size, keep, round_to, width):
    assert target_width(size, keep, round_to) == width


def test_make_plan_even_and_kmeans(model):
    groups = {g.name: g for g in kc.channel_groups(model)}
    for method in ("even", "kmeans"):
        plan = kc.make_plan(model, keep=0.625, method=method, seed=0)
        assert plan.bound
        assert set(plan.clusters) == {n for n, g in groups.items()
                                      if g.prunable}
        for name, clusters in plan.clusters.items():
            assert len(clusters) == int(np.ceil(0.625 * groups[name].size))
            flat = sorted(i for c in clusters for i in c)
            assert flat == list(range(groups[name].size))


def test_kmeans_groups_identical_filters():
    model = zoo.plain_cnn()
    kernel = model.get_layer("c1").kernel
    w = kernel.numpy()
    w[..., 5] = w[..., 1]
    w[..., 7] = w[..., 1]
    kernel.assign(w)
    plan = kc.make_plan(model, keep={"c1": 0.75}, method="kmeans")
    assert any({1, 5, 7} <= set(c) for c in plan.clusters["c1"])
    assert set(plan.clusters) == {"c1"}


def test_keep_dict_and_round_to(model):
    plan = kc.make_plan(model, keep={"stem_conv": 0.5}, round_to=4)
    assert plan.widths() == {"stem_conv": 8}


def test_json_round_trip_keeps_binding(model):
    plan = kc.make_plan(model, keep=0.5, method="kmeans")
    back = kc.PruningPlan.from_json(plan.to_json())
    assert back == plan and back.bound
    assert back.groups["stem_conv"].to_dict() == (
        plan.groups["stem_conv"].to_dict()
    )
    segs = back.variable_segments()
    assert segs.keys() == plan.variable_segments().keys()


def test_variable_segments_follow_clusters(model):
    groups = kc.channel_groups(model)
    plan = kc.PruningPlan({"stem_conv": [[0, 3], [1], [2, 4, 5]]},
                          groups=groups)
    axis, seg, n = plan.variable_segments()["stem_bn/gamma"]
    assert axis == 0
    assert seg[0] == seg[3] and seg[2] == seg[4] == seg[5]
    assert len(set(seg[[0, 1, 2]])) == 3
    assert n == 3 + (16 - 6)  # three clusters, ten removed singletons


@pytest.mark.parametrize(
    "clusters, message",
    [
        ({"nope": [[0]]}, "groups the model does not have"),
        ({"logits": [[0]]}, "is frozen"),
        ({"stem_conv": [[0, 16]]}, "has 16 channels but the plan uses"),
        ({"stem_conv": [[0, 1], [1]]}, "duplicate index"),
        ({"stem_conv": [[0], []]}, "empty cluster"),
        ({"stem_conv": []}, "zero clusters"),
        ({"stem_conv": [[-1]]}, ">= 0"),
    ],
)
def test_bad_plans_raise(model, clusters, message):
    with pytest.raises(ValueError, match=message):
        kc.PruningPlan(clusters, groups=kc.channel_groups(model))


def test_plan_for_another_model_is_refused(model):
    plan = kc.make_plan(model, keep=0.5)
    other = resnet_cifar(20, input_shape=(16, 16, 3), widths=(8, 32, 64))
    with pytest.raises(ValueError, match="group sizes differ"):
        kc.slim(other, plan)


def test_unbound_plan_says_how_to_bind():
    plan = kc.PruningPlan({"c1": [[0]]})
    with pytest.raises(ValueError, match="bind"):
        plan.variable_segments()


@pytest.mark.parametrize("keep", [0, -0.5, 1.5, "half", True])
def test_bad_keep(model, keep):
    with pytest.raises(ValueError, match="`keep` must be a fraction"):
        kc.make_plan(model, keep=keep)


def test_bad_method_and_round_to(model):
    with pytest.raises(ValueError, match="`method`"):
        kc.make_plan(model, method="random")
    with pytest.raises(ValueError, match="`round_to`"):
        kc.make_plan(model, round_to=0)


def test_bad_json():
    with pytest.raises(ValueError, match="not a JSON pruning plan"):
        kc.PruningPlan.from_json("{]")
    with pytest.raises(ValueError, match="format_version"):
        kc.PruningPlan.from_json('{"clusters": {}, "format_version": 99}')
