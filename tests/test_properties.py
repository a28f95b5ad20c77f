"""Property-based tests of `slim`: random graphs x random plans.

Random small functional models (convolutions 1x1/3x3 with or without bias,
depthwise convolutions with multiplier 1 or 2, BatchNormalization, ReLU,
residual Add, Concatenate, squeeze-and-excitation Multiply, Flatten -> Dense
or global pooling -> Dense heads) get random plans: per prunable group,
random clusters of a random subset of the channels. The collapse test then
says that slimming is exact:

1. copy each cluster's first member into the others (`utils.collapse`);
2. zero the consumer slices of the removed channels, so that the model's
   outputs do not depend on them;
3. `kc.slim(model, plan)` computes the same outputs (1e-4 relative), with no
   more multiply-accumulates than the model.
"""

import keras
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from keras import layers as L

import keras_csgd as kc
from keras_csgd import graph
from utils import collapse, relative_error
from zoo import randomize

INPUT_SHAPE = (5, 5, 3)

# One step of a random model, applied to the current tensor `x`.
_OPS = st.one_of(
    st.tuples(
        st.just("conv"), st.sampled_from([1, 3]), st.integers(2, 5),
        st.booleans(),
    ),
    st.tuples(st.just("se"), st.integers(1, 3)),
    st.tuples(st.just("depthwise"), st.sampled_from([1, 2])),
    st.tuples(st.just("bn")),
    st.tuples(st.just("relu")),
    st.tuples(st.just("residual"), st.sampled_from([1, 3]), st.booleans()),
    st.tuples(st.just("concat"), st.integers(0, 10)),
)
_HEADS = st.sampled_from(["gap", "flatten", "flatten_hidden"])


@st.composite
def recipes(draw):
    """`(ops, head)`: a first convolution, then 2-5 random ops."""
    first = ("conv", draw(st.sampled_from([1, 3])), draw(st.integers(2, 5)),
             draw(st.booleans()))
    ops = [first] + draw(st.lists(_OPS, min_size=2, max_size=5))
    return ops, draw(_HEADS)


def build(recipe):
    """The functional model of a recipe (all convolutions keep 5x5)."""
    ops, head = recipe
    x = inp = keras.Input(INPUT_SHAPE)
    seen = [x]
    for i, op in enumerate(ops):
        kind, name = op[0], f"{op[0]}{i}"
        if kind == "conv":
            x = L.Conv2D(op[2], op[1], padding="same", use_bias=op[3],
                         name=name)(x)
        elif kind == "depthwise":
            x = L.DepthwiseConv2D(3, depth_multiplier=op[1], padding="same",
                                  name=name)(x)
        elif kind == "bn":
            x = L.BatchNormalization(name=name)(x)
        elif kind == "relu":
            x = L.ReLU(name=name)(x)
        elif kind == "residual":
            y = L.Conv2D(x.shape[-1], op[1], padding="same", name=name)(x)
            if op[2]:
                y = L.BatchNormalization(name=f"{name}_bn")(y)
            x = L.Add(name=f"{name}_add")([x, y])
        elif kind == "concat":
            other = seen[op[1] % len(seen)]
            x = L.Concatenate(name=name)([x, other])
        else:  # squeeze-and-excitation
            c = x.shape[-1]
            s = L.GlobalAveragePooling2D(name=f"{name}_pool")(x)
            s = L.Dense(op[1], activation="relu", name=f"{name}_reduce")(s)
            s = L.Dense(c, activation="sigmoid", name=f"{name}_expand")(s)
            s = L.Reshape((1, 1, c), name=f"{name}_reshape")(s)
            x = L.Multiply(name=f"{name}_mul")([x, s])
        seen.append(x)
    if head == "gap":
        x = L.GlobalAveragePooling2D(name="head_pool")(x)
    else:
        x = L.Flatten(name="head_flatten")(x)
        if head == "flatten_hidden":
            x = L.Dense(4, activation="relu", name="head_hidden")(x)
    return keras.Model(inp, L.Dense(3, name="logits")(x))


def random_plan(groups, seed):
    """A random bound plan from a seed (uniform, unlike shrinking draws).

    Each prunable group is planned with probability 0.8: a random subset of
    at least half its channels is kept and cut into random clusters.
    """
    rng = np.random.default_rng(seed)
    clusters = {}
    for g in groups:
        if not g.prunable or rng.random() < 0.2:
            continue
        kept = int(rng.integers((g.size + 1) // 2, g.size + 1))
        width = int(rng.integers(1, kept + 1))
        order = rng.permutation(g.size)[:kept]
        cuts = np.sort(rng.choice(np.arange(1, kept), width - 1,
                                  replace=False))
        clusters[g.name] = [c.tolist() for c in np.split(order, cuts)]
    return kc.PruningPlan(clusters, groups=groups)


def silence_removed(model, plan):
    """Zeroes the consumer slices that read removed channels."""
    an = graph.analyze(model)
    removed = {
        an.gid_of[name]: plan.cluster_ids(name) < 0 for name in plan.clusters
    }
    for e in an.entries:
        if e.role != "consumer":
            continue
        gids, chans = graph.flat_channels(an.root(e.layout), an.sizes)
        drop = np.array([
            gid in removed and removed[gid][ch]
            for gid, ch in zip(gids, chans)
        ], dtype=bool)
        if drop.any():
            var = graph.get_variable(model, e.path)
            w = np.moveaxis(var.numpy(), e.axis, 0).copy()
            w[drop] = 0
            var.assign(np.moveaxis(w, 0, e.axis))


@settings(max_examples=25, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(recipe=recipes(), seed=st.integers(0, 2**16))
def test_collapsed_random_model_slims_exactly(recipe, seed):
    model = randomize(build(recipe), seed=seed)
    groups = kc.channel_groups(model)
    plan = random_plan(groups, seed)
    collapse(model, plan)
    silence_removed(model, plan)
    x = np.random.default_rng(seed).normal(
        size=(4,) + INPUT_SHAPE).astype("float32")
    small = kc.slim(model, plan)
    assert relative_error(small(x), model(x)) < 1e-4
    assert kc.count_macs(small) <= kc.count_macs(model)
    # A producer split into parts (a merge with a concatenation) keeps the
    # widths of its parts' groups, once per part.
    widths = {}
    for g in groups:
        for layer, path, _ in g.producers:
            parts = (g.channel_map(path) >= 0).sum() // g.size
            widths[layer] = widths.get(layer, 0) + parts * plan.widths().get(
                g.name, g.size)
    for layer, width in widths.items():
        assert small.get_layer(layer).kernel.shape[-1] == width
