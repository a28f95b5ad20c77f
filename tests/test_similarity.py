"""Tests of `kc.methods.similarity_plan` and its distances."""

import keras
import numpy as np
import pytest
from keras import layers as L
from scipy.cluster import hierarchy
from scipy.spatial.distance import pdist

import keras_csgd as kc
from keras_csgd import graph
from keras_csgd.methods import similarity
from keras_csgd.models import resnet_cifar
from utils import relative_error
from zoo import bottleneck_resnet, randomize

RNG = np.random.default_rng(0)
X = RNG.normal(size=(48, 8, 8, 3)).astype("float32")


def planted_model(batchnorm=True):
    """conv1 has channel 5 = channel 1 and 6 = 2 (filters and BN/bias)."""
    x = inp = keras.Input((8, 8, 3))
    x = L.Conv2D(8, 3, padding="same", use_bias=not batchnorm, name="c1")(x)
    if batchnorm:
        x = L.BatchNormalization(name="bn1")(x)
    x = L.ReLU()(x)
    x = L.Conv2D(6, 3, padding="same", name="c2")(x)
    x = L.BatchNormalization(name="bn2")(x)
    x = L.ReLU()(x)
    x = L.GlobalAveragePooling2D()(x)
    model = randomize(keras.Model(inp, L.Dense(4, name="out")(x)), seed=3)
    layers = ["c1", "bn1"] if batchnorm else ["c1"]
    for name in layers:
        for v in model.get_layer(name).weights:
            w = np.moveaxis(v.numpy(), -1, 0)
            w[5], w[6] = w[1], w[2]
            v.assign(np.moveaxis(w, 0, -1))
    return model


def only(plan, name):
    return kc.PruningPlan({name: plan.clusters[name]}, groups=plan.groups)


@pytest.mark.parametrize(
    "batchnorm, metric",
    [(True, "wasserstein"), (True, "correlation"), (False, "wasserstein")],
)
def test_planted_duplicates_merge_without_change(batchnorm, metric):
    model = planted_model(batchnorm)
    data = X if metric == "correlation" else None
    plan = kc.methods.similarity_plan(model, data, keep=0.75, distance=metric)
    assert plan.bound
    clusters = plan.clusters["c1"]
    assert len(clusters) == 6
    assert [1, 5] in clusters and [2, 6] in clusters
    slim = kc.slim(model, only(plan, "c1"))
    assert slim.get_layer("c1").filters == 6
    expected = model.predict(X, verbose=0)
    assert relative_error(slim.predict(X, verbose=0), expected) < 1e-5


def test_wasserstein_matches_numpy_on_coupled_groups():
    model = randomize(bottleneck_resnet(), seed=2)
    an = graph.analyze(model)
    coupled = [g for g in an.groups if len(g.producers) > 1]
    assert coupled
    for g in coupled:
        bns = sorted({
            lname for lname, _, _ in g.members
            if isinstance(an.layers[lname], L.BatchNormalization)
        })
        assert len(bns) > 1
        d2 = np.zeros((g.size, g.size))
        for name in bns:
            layer = model.get_layer(name)
            beta = layer.beta.numpy().astype(np.float64)
            gamma = np.abs(layer.gamma.numpy().astype(np.float64))
            d2 += (beta[:, None] - beta[None]) ** 2
            d2 += (gamma[:, None] - gamma[None]) ** 2
        got = similarity.wasserstein_distances(model, an, g)
        np.testing.assert_allclose(got, np.sqrt(d2), atol=1e-6)


def test_correlation_matches_numpy():
    model = planted_model()
    an = graph.analyze(model)
    group = next(g for g in an.groups if g.name == "c1")
    dist = similarity.correlation_distances(
        model, an, [group], X, batch_size=16
    )["c1"]
    probe = keras.Model(model.inputs, model.get_layer("bn1").output)
    maps = probe.predict(X, verbose=0).reshape(-1, 8).astype(np.float64)
    np.testing.assert_allclose(dist, 1 - np.corrcoef(maps.T), atol=1e-6)


def test_agglomerate_gives_exact_width_on_ties():
    clusters = similarity.agglomerate(np.zeros((7, 7)), 3)
    assert len(clusters) == 3
    assert sorted(i for c in clusters for i in c) == list(range(7))


def test_agglomerate_equals_fcluster_without_ties():
    points = RNG.normal(size=(12, 3))
    d = pdist(points)
    labels = hierarchy.fcluster(
        hierarchy.linkage(d, "average"), 4, criterion="maxclust"
    )
    expected = sorted(
        (np.flatnonzero(labels == k).tolist() for k in set(labels)), key=min
    )
    dense = np.sqrt(((points[:, None] - points[None]) ** 2).sum(-1))
    assert similarity.agglomerate(dense, 4) == expected


def test_resnet_plan_widths_and_round_to():
    model = resnet_cifar(8, input_shape=(8, 8, 3))
    plan = kc.methods.similarity_plan(model, keep=0.5, round_to=4)
    groups = [g for g in kc.channel_groups(model) if g.prunable]
    assert set(plan.clusters) == {g.name for g in groups}
    for g in groups:
        assert plan.widths()[g.name] == g.size // 2
        assert sorted(i for c in plan.clusters[g.name] for i in c) == list(
            range(g.size)
        )


def test_errors():
    model = planted_model()
    with pytest.raises(ValueError, match="`distance` must be one of"):
        kc.methods.similarity_plan(model, keep=0.5, distance="kl")
    with pytest.raises(ValueError, match="`linkage` must be one of"):
        kc.methods.similarity_plan(model, keep=0.5, linkage="ward")
    with pytest.raises(ValueError, match="needs `data`"):
        kc.methods.similarity_plan(model, keep=0.5, distance="correlation")
    with pytest.raises(ValueError, match="`keep` must be"):
        kc.methods.similarity_plan(model, keep=1.5)
    with pytest.raises(ValueError, match="`round_to` must be"):
        kc.methods.similarity_plan(model, keep=0.5, round_to=0)
