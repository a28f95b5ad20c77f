"""`FilterEnsembles`: channel importance from random masks, inside `fit`."""

from __future__ import annotations

import keras

from keras_csgd import checks
from keras_csgd.methods.ensembles import METRICS, ensemble_importance
from keras_csgd.scoring import plan_from_scores


@keras.saving.register_keras_serializable(package="keras_csgd")
class FilterEnsembles(keras.callbacks.Callback):
    """Runs `kc.methods.ensemble_importance` from inside `model.fit`.

    At the end of training (or of one epoch), random channel masks are
    evaluated on `data` and one ridge least-squares fit of the metric on the
    mask bits gives every channel an importance (see
    `kc.methods.ensemble_importance` for the method and how masks are
    applied without re-tracing). `scores` holds the result; `plan(keep)`
    turns it into a pruning plan for `kc.slim`. Writes
    `logs["ensemble_samples"]` at the epoch where it ran.

    `get_config` holds every argument except `data` (a dataset does not
    serialize); restore with `FilterEnsembles.from_config({**config,
    "data": data})`.

    Args:
        data: a fixed validation set, read once per run: a
            `tf.data.Dataset` of `(x, y)` batches, a tuple `(x, y)` of
            arrays, an `.npz` or an image folder.
        when: `"train_end"`, or an int `e`: at the end of epoch `e`
            (0-based, as the `epoch` of `on_epoch_end`). Defaults to
            `"train_end"`.
        samples: number of random masks. Defaults to `512`.
        mask_keep: the kept fraction of each random mask (the probability
            that a channel is kept). Defaults to `0.99` (see
            `kc.methods.ensemble_importance`).
        metric: `"loss"` (the compiled loss) or `"accuracy"`. Defaults to
            `"loss"`.
        ridge: ridge penalty of the fit, or `"auto"` (chosen by
            leave-one-out error). Defaults to `"auto"`.
        seed: seed of the masks. Defaults to `0`.
        verbose: `1` shows a progress bar. Defaults to `1`.

    Raises:
        ValueError: a bad `when` or `metric`.

    Example:

    ```python
    fe = kc.callbacks.FilterEnsembles((x_val, y_val), samples=256)
    model.fit(x, y, epochs=10, callbacks=[fe])
    slim = kc.slim(model, fe.plan(keep=0.5))
    ```

    References:
        Sandor, Szulc, Grigoras, Bodea. Linear Filter Ensembles for Network
        Pruning. arXiv 2001.08142.
    """

    def __init__(
        self,
        data,
        when="train_end",
        samples=512,
        mask_keep=0.99,
        metric="loss",
        ridge="auto",
        seed=0,
        verbose=1,
    ):
        super().__init__()
        if when != "train_end" and (
            not isinstance(when, int) or isinstance(when, bool) or when < 0
        ):
            raise ValueError(
                '`when` must be "train_end" or an epoch index >= 0. '
                f"Received: when={when!r}"
            )
        checks.choice("metric", metric, METRICS)
        self.data = data
        self.when = when
        self.samples = samples
        self.mask_keep = mask_keep
        self.metric = metric
        self.ridge = ridge
        self.seed = seed
        self.verbose = verbose
        self.scores = None

    def on_train_begin(self, logs=None):
        self.scores = None

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.when:
            self._score()
            if logs is not None:
                logs["ensemble_samples"] = self.samples

    def on_train_end(self, logs=None):
        if self.when == "train_end":
            self._score()

    def _score(self):
        self.scores = ensemble_importance(
            self.model,
            self.data,
            samples=self.samples,
            mask_keep=self.mask_keep,
            metric=self.metric,
            ridge=self.ridge,
            seed=self.seed,
            verbose=self.verbose,
        )

    def plan(self, keep=None, *, macs_budget=None):
        """The plan that keeps the most important channels.

        Args:
            keep: kept fraction per group, see `kc.plan_from_scores`.
                Defaults to `None` (`0.5` without `macs_budget`).
            macs_budget: kept fraction of the MACs: ranks channels across
                groups. Defaults to `None` (per group).

        Returns:
            A bound `PruningPlan`.

        Raises:
            ValueError: no scores yet (the callback has not run).
        """
        if self.scores is None:
            raise ValueError(
                "`FilterEnsembles.plan` needs scores: run `model.fit` with "
                "this callback first (scores are computed at "
                f"when={self.when!r})."
            )
        return plan_from_scores(
            self.model,
            self.scores,
            keep,
            macs_budget=macs_budget,
        )

    def get_config(self):
        return {
            "when": self.when,
            "samples": self.samples,
            "mask_keep": self.mask_keep,
            "metric": self.metric,
            "ridge": self.ridge,
            "seed": self.seed,
            "verbose": self.verbose,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**checks.renamed(config, {"keep_prob": "mask_keep"},
                                    cls.__name__))
