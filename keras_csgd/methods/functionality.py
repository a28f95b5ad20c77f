"""Functionality-oriented filter pruning (Qin, Yu, Liu, Chen).

Filters have interpretable functions and many of them are repeats of one
another; magnitude says little about importance. Each filter's function is
characterised by its response profile, its mean activation per class over a
few hundred labelled examples; filters with similar profiles are clustered,
the most active filter of each cluster is kept and the repeats are pruned,
then the slim model is fine-tuned briefly.

References:
    Qin, Yu, Liu, Chen, "Functionality-Oriented Convolutional Filter Pruning",
    arXiv 1810.07322.
"""

from __future__ import annotations

import numpy as np

from keras_csgd import checks, graph
from keras_csgd.batches import labelled_batches
from keras_csgd.methods.similarity import (
    LINKAGES,
    agglomerate,
    channel_entries,
    euclidean_distances,
    probe_outputs,
    response_layers,
    response_probe,
)
from keras_csgd.plan import PruningPlan
from keras_csgd.scoring import plan_from_clusters


def _class_ids(y: np.ndarray) -> np.ndarray:
    """Integer labels from integer or one-hot (probability) labels."""
    y = np.asarray(y)
    if y.ndim > 1 and y.shape[-1] > 1:
        return np.argmax(y, axis=-1)
    return y.reshape(-1).astype(np.int64)


class _Profiles:
    """Running per-class (or per-example) mean activations of one tensor."""

    def __init__(self, per_class: bool):
        self.per_class = per_class
        self.sums = None  # (classes, channels) or list of (batch, channels)
        self.counts = np.zeros(0)

    def update(self, act: np.ndarray, y) -> None:
        if not self.per_class:
            self.sums = (self.sums or []) + [act]
            return
        labels = _class_ids(y)
        classes = max(int(labels.max()) + 1, len(self.counts))
        sums = np.zeros((classes, act.shape[1]))
        counts = np.zeros(classes)
        if self.sums is not None:
            sums[: len(self.counts)] = self.sums
            counts[: len(self.counts)] = self.counts
        np.add.at(sums, labels, act)
        np.add.at(counts, labels, 1.0)
        self.sums, self.counts = sums, counts

    def profiles(self) -> np.ndarray:
        """`(channels, classes or examples)` mean activations."""
        if not self.per_class:
            return np.concatenate(self.sums).T
        seen = self.counts > 0
        return (self.sums[seen] / self.counts[seen, None]).T


def functionality_profiles(
    model, data, per_class: bool = True, batch_size: int = 128
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Functionality profile and mean activation of every filter.

    A filter's activation on one example is its rectified response
    (`max(., 0)` of the BN output, or of the producer output for a group
    without BN) averaged over the spatial positions. Its profile is the mean
    activation per class (`per_class=True`) or the activation on every
    example (`per_class=False`); a channel of a coupled group concatenates
    the profiles of its BNs. Profiles are divided by their L2 norm (an all
    zero profile stays zero), so that clustering compares which classes a
    filter responds to, not how strongly.

    Args:
        model: a trained functional or Sequential `keras.Model`.
        data: `(x, y)` NumPy arrays or a `tf.data.Dataset` of `(x, y)`
            batches (integer or one-hot labels); with `per_class=False`,
            inputs alone suffice.
        per_class: profile per class (`True`) or per example (`False`).
            Defaults to `True`.
        batch_size: batch size for NumPy inputs. Defaults to `128`.

    Returns:
        `{group_name: (profiles, activity)}` for every prunable group:
        `profiles` is `(size, features)`, L2-normalised; `activity` is each
        filter's mean activation over all examples, `(size,)`.

    Raises:
        ValueError: `per_class=True` and the data has no labels; `data`
            yields no samples.
    """
    analysis = graph.analyze(model)
    groups = [g for g in analysis.groups if g.prunable]
    probe, names = response_probe(model, analysis, groups)
    stats = {n: _Profiles(per_class) for n in names}
    totals = {n: 0.0 for n in names}
    count = 0
    for x, y in labelled_batches(data, batch_size):
        if per_class and y is None:
            raise ValueError(
                "`per_class=True` needs labelled `data`: `(x, y)` arrays or "
                "a dataset of `(x, y)` batches. Received: batches without "
                "labels"
            )
        for n, out in zip(names, probe_outputs(probe, x)):
            act = np.maximum(out, 0.0).astype(np.float64)
            act = act.reshape(act.shape[0], -1, act.shape[-1]).mean(axis=1)
            stats[n].update(act, y)
            totals[n] = totals[n] + act.sum(axis=0)
        count += len(x)
    if not count:
        raise ValueError(
            "`data` yielded no examples; functionality profiles need a few "
            "hundred labelled examples."
        )
    out = {}
    for g in groups:
        profs, activity = [], np.zeros(g.size)
        for _, lname, cmap in response_layers(analysis, g):
            idx = channel_entries(cmap, g.size)
            p = stats[lname].profiles()
            profs.append(p[idx].reshape(g.size, -1))
            activity += totals[lname][idx].sum(axis=1) / count
        prof = np.concatenate(profs, axis=1)
        norm = np.linalg.norm(prof, axis=1, keepdims=True)
        prof = np.divide(prof, norm, out=np.zeros_like(prof), where=norm > 0)
        out[g.name] = (prof, activity)
    return out


def functionality_plan(
    model,
    data,
    *,
    keep: float = 0.5,
    per_class: bool = True,
    round_to: int | None = None,
    linkage: str = "average",
    batch_size: int = 128,
) -> PruningPlan:
    """Plans filter pruning by clustering filters with similar functions.

    For every prunable group: the functionality profiles of its filters
    (`functionality_profiles`: mean rectified activation per class,
    L2-normalised) are clustered by agglomerative clustering (`linkage`,
    Euclidean distance between normalised profiles) cut at the target width
    (`kc.clusters.target_width`). Per cluster the filter with the largest mean
    activation is kept and the others, its repeats, are removed (not merged:
    the paper prunes repeats), so the plan has singleton clusters. Removing
    filters changes the outputs; fine-tune the slim model briefly.

    Args:
        model: a trained functional or Sequential `keras.Model`.
        data: labelled examples in any form `keras_csgd.batches` reads:
            `(x, y)` NumPy arrays, a `tf.data.Dataset` of `(x, y)` batches,
            an `.npz` or an image folder; a few hundred examples are
            enough.
        keep: kept fraction of every prunable group, in (0, 1]. Defaults to
            `0.5`.
        per_class: profile per class (`True`) or per example (`False`, no
            labels needed). Defaults to `True`.
        round_to: round widths to multiples of `round_to` (see
            `kc.make_plan`). Defaults to `None`.
        linkage: agglomerative linkage: `"average"`, `"complete"`,
            `"single"` or `"weighted"`. Defaults to `"average"`.
        batch_size: batch size for NumPy inputs. Defaults to `128`.

    Returns:
        A bound `PruningPlan` of singleton clusters for every prunable group
        whose width shrinks.

    Raises:
        ValueError: bad `keep`, `linkage` or `round_to`; unlabelled data with
            `per_class=True`; a response layer inside a nested model.

    Example:

    ```python
    plan = kc.methods.functionality_plan(model, (x[:500], y[:500]), keep=0.6)
    slim = kc.slim(model, plan)
    slim.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    slim.fit(x, y, epochs=2)  # short fine-tune
    ```

    References:
        Qin, Yu, Liu, Chen, arXiv 1810.07322.
    """
    checks.choice("linkage", linkage, LINKAGES)

    def cluster(todo):
        profiles = functionality_profiles(model, data, per_class, batch_size)
        clusters = {}
        for g, width in todo:
            prof, activity = profiles[g.name]
            kept = [
                max(c, key=lambda i: activity[i])
                for c in agglomerate(euclidean_distances(prof), width,
                                     linkage)
            ]
            clusters[g.name] = [[i] for i in sorted(kept)]
        return clusters

    return plan_from_clusters(model, cluster, keep, round_to=round_to)
