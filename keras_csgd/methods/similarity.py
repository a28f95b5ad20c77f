"""Channel similarity + hierarchical clustering (Zhang, Zhao, Ni et al.).

Channels whose features carry similar information overlap in function: keep
one representative per similarity group. Works directly on a pre-trained
model, no sparsity training. Each prunable channel group is clustered by
agglomerative clustering on a channel-to-channel distance, cut at the target
width, and the clusters are merged the C-SGD way by `kc.slim` (the first
member is kept, the consumer slices of all members are summed).

The paper derives its similarity by probabilistic modelling and its exact
form is not public; ours (see `similarity_plan`):

- without data, each channel's post-BN response is modelled as the Gaussian
  `N(beta, gamma^2)` and channels are compared by the 2-Wasserstein distance;
- with data, channels are compared by the correlation of their feature maps.

References:
    Zhang, Zhao, Ni et al., "Channel similarity based hierarchical pruning",
    arXiv 1908.02620.
"""

from __future__ import annotations

import keras
import numpy as np
from scipy.cluster import hierarchy
from scipy.spatial.distance import squareform

from keras_csgd import checks, graph, layers
from keras_csgd.batches import input_batches
from keras_csgd.groups import ChannelGroup
from keras_csgd.methods.moments import RunningMoments
from keras_csgd.plan import PruningPlan
from keras_csgd.scoring import plan_from_clusters

DISTANCES = ("wasserstein", "correlation")
# Linkages that are valid on arbitrary (non-Euclidean) distance matrices.
LINKAGES = ("average", "complete", "single", "weighted")


def response_layers(
    analysis: graph.Analysis, group: ChannelGroup
) -> list[tuple[keras.layers.Layer, str, np.ndarray]]:
    """The layers whose outputs carry a group's per-channel response.

    These are the group's BatchNormalization members (the post-BN response)
    or, for a group without BN, its producers.

    Args:
        analysis: `graph.analyze(model)`.
        group: one of `analysis.groups`.

    Returns:
        `(layer, qualified_name, channel_map)` per layer, where
        `channel_map[i]` is the group channel of the layer's output channel
        `i` (`-1`: another group's channel).
    """
    out, seen = [], set()
    for lname, path, _ in group.members:
        layer = analysis.layers[lname]
        if lname in seen or not layers.attribute(layer, "normalizes"):
            continue
        seen.add(lname)
        out.append((layer, lname, group.channel_map(path)))
    if out:
        return out
    return [
        (analysis.layers[lname], lname, group.channel_map(path))
        for lname, path, _ in group.producers
    ]


def channel_entries(cmap: np.ndarray, size: int) -> np.ndarray:
    """`(size, m)` output entries of each group channel (m: multiplier)."""
    per_channel = [np.flatnonzero(cmap == c) for c in range(size)]
    return np.stack(per_channel)


def _bn_features(layer, cmap: np.ndarray, size: int) -> np.ndarray:
    """`(size, 2 m)` rows `(beta, |gamma|)` of each channel's BN entries."""
    n = len(cmap)
    beta = layer.beta.numpy() if layer.center else np.zeros(n)
    gamma = layer.gamma.numpy() if layer.scale else np.ones(n)
    feats = np.stack([beta, np.abs(gamma)], axis=1).astype(np.float64)
    return feats[channel_entries(cmap, size)].reshape(size, -1)


def euclidean_distances(feats: np.ndarray) -> np.ndarray:
    sq = np.sum(feats**2, axis=1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * feats @ feats.T
    return np.sqrt(np.maximum(d2, 0.0))


def wasserstein_distances(
    model, analysis: graph.Analysis, group: ChannelGroup
) -> np.ndarray:
    """2-Wasserstein distances between a group's channels, without data.

    Each BN entry `i` of a channel is the Gaussian `N(beta_i, gamma_i^2)`;
    a channel with several BN entries (a coupled residual group, a depthwise
    multiplier) is the product of its entries' Gaussians. The 2-Wasserstein
    distance between products of independent 1-D Gaussians is
    `sqrt(sum_i (beta_i - beta'_i)^2 + (|gamma_i| - |gamma'_i|)^2)`, the
    Euclidean distance between the concatenated `(beta, |gamma|)` features.
    A group without BN falls back to the Euclidean distance between its
    producer filters (`graph.producer_filters`).

    Returns:
        A `(size, size)` float64 distance matrix.
    """
    responses = response_layers(analysis, group)
    if not layers.attribute(responses[0][0], "normalizes"):
        return euclidean_distances(
            graph.producer_filters(model, group).astype(np.float64)
        )
    feats = np.concatenate(
        [_bn_features(layer, cmap, group.size)
         for layer, _, cmap in responses],
        axis=1,
    )
    return euclidean_distances(feats)


def response_probe(
    model, analysis: graph.Analysis, groups
) -> tuple[keras.Model, list[str]]:
    """A model that outputs the `response_layers` of all `groups`.

    Returns:
        The probe model and the qualified layer name of each of its outputs.

    Raises:
        ValueError: when a response layer lives inside a nested model.
    """
    wanted = {}
    for g in groups:
        for layer, lname, _ in response_layers(analysis, g):
            if "/" in lname:
                raise ValueError(
                    "`data` can only be used when the response layers of "
                    f"every group are top-level layers; group {g.name!r} "
                    f"reads nested layer {lname!r}."
                )
            wanted[lname] = layer.output
    names = list(wanted)
    return keras.Model(model.inputs, [wanted[n] for n in names]), names


def probe_outputs(probe: keras.Model, x) -> list[np.ndarray]:
    """The probe's outputs on one batch, as a list of NumPy arrays."""
    outs = probe.predict_on_batch(x)
    return list(outs) if len(probe.outputs) > 1 else [outs]


def _correlation(moments: RunningMoments) -> np.ndarray:
    """The channel correlation matrix of accumulated moments."""
    cov = moments.covariance()
    std = np.sqrt(np.maximum(np.diag(cov), 0.0))
    scale = np.outer(std, std)
    corr = np.divide(cov, scale, out=np.zeros_like(cov), where=scale > 0)
    np.fill_diagonal(corr, 1.0)
    return np.clip(corr, -1.0, 1.0)


def correlation_distances(
    model, analysis: graph.Analysis, groups, data, batch_size: int = 128
) -> dict[str, np.ndarray]:
    """`1 - corr` between the feature maps of each group's channels.

    The feature maps are the outputs of `response_layers` (the post-BN
    response, pre-activation), every spatial position of every example one
    observation; correlations are accumulated in float64 over all batches.
    A channel with several entries (coupled groups, depthwise multipliers)
    averages the distances of its entries.

    Returns:
        `{group_name: (size, size) distance matrix}`.

    Raises:
        ValueError: when a response layer lives inside a nested model (use
            `distance="wasserstein"`).
    """
    probe, names = response_probe(model, analysis, groups)
    stats = {
        n: RunningMoments(t.shape[-1]) for n, t in zip(names, probe.outputs)
    }
    for x in input_batches(data, batch_size):
        for n, out in zip(names, probe_outputs(probe, x)):
            stats[n].update(out.reshape(-1, out.shape[-1]))
    corr = {n: _correlation(s) for n, s in stats.items()}
    out = {}
    for g in groups:
        dists = []
        for _, lname, cmap in response_layers(analysis, g):
            idx = channel_entries(cmap, g.size)
            dists += [1.0 - corr[lname][np.ix_(col, col)] for col in idx.T]
        out[g.name] = np.mean(dists, axis=0)
    return out


def agglomerate(
    distances: np.ndarray, width: int, method: str = "average"
) -> list[list[int]]:
    """Agglomerative clustering of channels cut at exactly `width` clusters.

    The first `size - width` merges of `scipy.cluster.hierarchy.linkage` are
    replayed, which is the tree cut at `width` clusters (`fcluster` with
    `criterion="maxclust"` may return fewer when distances tie).

    Args:
        distances: `(size, size)` symmetric distance matrix.
        width: number of clusters.
        method: linkage (`"average"`, `"complete"`, `"single"` or
            `"weighted"`). Defaults to `"average"`.

    Returns:
        `width` clusters of channel indices, each sorted, ordered by their
        first channel.
    """
    size = distances.shape[0]
    if width >= size:
        return [[i] for i in range(size)]
    d = np.nan_to_num((distances + distances.T) / 2.0, nan=np.inf)
    d = np.minimum(np.maximum(d, 0.0), np.finfo(np.float64).max / 4)
    np.fill_diagonal(d, 0.0)
    links = hierarchy.linkage(squareform(d, checks=False), method=method)
    members = {i: [i] for i in range(size)}
    for k in range(size - width):
        a, b = int(links[k, 0]), int(links[k, 1])
        members[size + k] = members.pop(a) + members.pop(b)
    return sorted((sorted(c) for c in members.values()), key=min)


def similarity_plan(
    model,
    data=None,
    *,
    keep: float = 0.5,
    distance: str = "wasserstein",
    linkage: str = "average",
    round_to: int | None = None,
    batch_size: int = 128,
) -> PruningPlan:
    """Plans channel merges by channel similarity and hierarchical clustering.

    For every prunable group, a channel-to-channel distance is computed,
    agglomerative clustering (`linkage`) is cut at the target width
    (`kc.clusters.target_width`), and each cluster becomes one channel of the
    slim model: `kc.slim` keeps its first member and sums the consumer
    slices of all members, so channels that are exact duplicates merge
    without any change of the outputs.

    Distances (the paper's probabilistic similarity is not public; ours):

    - `distance="wasserstein"` (no data needed): each channel's post-BN
      response is the Gaussian `N(beta, gamma^2)` of its BatchNormalization
      entries; the distance is the 2-Wasserstein distance
      `sqrt((beta - beta')^2 + (|gamma| - |gamma'|)^2)`, summed in squares
      over the BNs of a coupled group (the distance between the products of
      the Gaussians). Groups without BN use the Euclidean distance between
      their producer filters.
    - `distance="correlation"` (needs `data`): `1 - corr` of the channels'
      feature maps (the outputs of the group's BNs, or of its producers
      without BN), pooled over examples and positions. The correlation is
      signed on purpose: merging sums the consumer slices, which is right
      for channels that move together and wrong for anti-correlated ones.

    Args:
        model: a trained functional or Sequential `keras.Model`.
        data: inputs, in any form `keras_csgd.batches` reads (an array, an
            `(x, y)` tuple, a `tf.data.Dataset` of `x` or `(x, y, ...)`
            batches, an `.npz` or an image folder). Required by
            `distance="correlation"`, unused by `"wasserstein"`. Defaults
            to `None`.
        keep: kept fraction of every prunable group, in (0, 1]. Defaults to
            `0.5`.
        distance: `"wasserstein"` or `"correlation"`. Defaults to
            `"wasserstein"`.
        linkage: agglomerative linkage: `"average"`, `"complete"`,
            `"single"` or `"weighted"`. Defaults to `"average"`.
        round_to: round widths to multiples of `round_to` (see
            `kc.make_plan`). Defaults to `None`.
        batch_size: batch size used when `data` is a NumPy array. Defaults
            to `128`.

    Returns:
        A bound `PruningPlan` naming every prunable group whose width
        shrinks; pass it to `kc.slim`, then fine-tune briefly.

    Raises:
        ValueError: bad `keep`, `distance`, `linkage` or `round_to`;
            `distance="correlation"` without `data`.

    Example:

    ```python
    plan = kc.methods.similarity_plan(model, keep=0.7)
    slim = kc.slim(model, plan)
    slim.compile(...); slim.fit(x, y, epochs=2)  # short fine-tune
    ```

    References:
        Zhang, Zhao, Ni et al., arXiv 1908.02620.
    """
    checks.choice("distance", distance, DISTANCES)
    checks.choice("linkage", linkage, LINKAGES)
    if distance == "correlation" and data is None:
        raise ValueError(
            '`distance="correlation"` needs `data` (inputs to compute '
            "feature maps from). Received: data=None"
        )
    analysis = graph.analyze(model)

    def cluster(todo):
        groups = [g for g, _ in todo]
        if distance == "correlation":
            dists = correlation_distances(
                model, analysis, groups, data, batch_size
            )
        else:
            dists = {
                g.name: wasserstein_distances(model, analysis, g)
                for g in groups
            }
        return {
            g.name: agglomerate(dists[g.name], width, linkage)
            for g, width in todo
        }

    return plan_from_clusters(
        model, cluster, keep, round_to=round_to, analysis=analysis
    )
