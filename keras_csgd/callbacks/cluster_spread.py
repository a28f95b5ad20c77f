"""`ClusterSpread`: log how far C-SGD clusters are from collapsed."""

import keras

from keras_csgd.optimizers.spread import cluster_spread
from keras_csgd.plan import coerce_plan


@keras.saving.register_keras_serializable(package="keras_csgd")
class ClusterSpread(keras.callbacks.Callback):
    """Writes `kc.cluster_spread(model, plan)` into the logs every epoch.

    `logs["cluster_spread"]` is the overall spread (so it appears in
    `model.fit(...).history` and in other callbacks); `history` keeps the
    full result (per group) of every epoch of the last `fit`.

    Args:
        plan: the bound `kc.PruningPlan` given to `kc.CSGD`, or its JSON.

    Raises:
        TypeError: if `plan` is not a `PruningPlan` or its JSON.

    Example:

    ```python
    spread = kc.callbacks.ClusterSpread(plan)
    history = model.fit(x, y, epochs=10, callbacks=[spread])
    history.history["cluster_spread"]   # one float per epoch
    spread.history[-1]["groups"]        # per group, last epoch
    ```

    References:
        Ding et al., Centripetal SGD for Pruning Very Deep Convolutional
        Networks with Complicated Structure, CVPR 2019 (arXiv 1904.03837).
    """

    def __init__(self, plan):
        super().__init__()
        self.plan = coerce_plan(plan, "`ClusterSpread`")
        self.history = []

    def on_train_begin(self, logs=None):
        self.history = []

    def on_epoch_end(self, epoch, logs=None):
        spread = cluster_spread(self.model, self.plan)
        self.history.append(spread)
        if logs is not None:
            logs["cluster_spread"] = spread["overall"]

    def get_config(self):
        return {"plan": self.plan.to_json()}

    @classmethod
    def from_config(cls, config):
        return cls(**config)
