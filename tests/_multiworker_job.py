"""One worker of the MultiWorkerMirroredStrategy test (test_distributed.py).

Run as `python _multiworker_job.py OUT_DIR` with `TF_CONFIG` set. Under one
`tf.distribute.MultiWorkerMirroredStrategy`, trains a tiny CNN a few steps
with `kc.CSGD`, another with `kc.GSM`, and a third with SGD and the ASFP
callback (two epochs), and writes `OUT_DIR/{csgd,gsm,asfp}_worker{index}.npz`:
the initial and final weights (`initial_<i>`, `final_<i>`), the optimizer
`iterations`, the cluster spread before and after (`spread`) and, for ASFP,
the final plan's JSON (`plan`).
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ["CUDA_VISIBLE_DEVICES"] = ""

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from keras import layers as L  # noqa: E402

import keras_csgd as kc  # noqa: E402

STEPS, GLOBAL_BATCH = 6, 16  # steps per epoch
ASFP_EPOCHS = 2


def tiny_model():
    x = inp = keras.Input((6, 6, 2))
    x = L.Conv2D(6, 3, padding="same", name="c1")(x)
    x = L.BatchNormalization(synchronized=True, name="bn1")(x)
    x = L.ReLU()(x)
    x = L.Conv2D(6, 3, padding="same", name="c2")(x)
    x = L.ReLU()(x)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inp, L.Dense(3, name="logits")(x))


def dataset():
    rng = np.random.default_rng(0)
    n = STEPS * GLOBAL_BATCH
    x = rng.normal(size=(n, 6, 6, 2)).astype("float32")
    y = rng.integers(0, 3, n)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA
    )
    return (
        tf.data.Dataset.from_tensor_slices((x, y))
        .batch(GLOBAL_BATCH)
        .with_options(options)
    )


def train(strategy, model, optimizer):
    """A custom loop: Keras 3 `model.fit` fails under this strategy.

    `fit` reduces a data batch across workers before building, which
    `MultiWorkerMirroredStrategy` rejects (keras-team/keras#20585).
    """
    loss_fn = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction="none"
    )

    def replica_step(x, y):
        with tf.GradientTape() as tape:
            loss = tf.nn.compute_average_loss(
                loss_fn(y, model(x, training=True)),
                global_batch_size=GLOBAL_BATCH,
            )
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))

    @tf.function
    def step(x, y):
        strategy.run(replica_step, args=(x, y))

    for x, y in strategy.experimental_distribute_dataset(dataset()):
        step(x, y)


def run(strategy, name, make_optimizer, out, asfp=None):
    """Trains one model; with `asfp`, calls its hooks around each epoch."""
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = tiny_model()
        plan = kc.make_plan(model, keep=0.5)
        optimizer = make_optimizer(plan)
        optimizer.build(model.trainable_variables)
    arrays = {f"initial_{i}": w for i, w in enumerate(model.get_weights())}
    before = kc.cluster_spread(model, plan)["overall"]
    if asfp is None:
        train(strategy, model, optimizer)
    else:
        asfp.set_model(model)
        asfp.set_params({"epochs": ASFP_EPOCHS})
        asfp.on_train_begin()
        for epoch in range(ASFP_EPOCHS):
            asfp.on_epoch_begin(epoch)
            train(strategy, model, optimizer)
            asfp.on_epoch_end(epoch, {})
        asfp.on_train_end()
        arrays["plan"] = np.array(asfp.plan.to_json())
    arrays.update({f"final_{i}": w for i, w in enumerate(model.get_weights())})
    arrays["spread"] = np.array(
        [before, kc.cluster_spread(model, plan)["overall"]]
    )
    arrays["iterations"] = np.array(optimizer.iterations.numpy())
    index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    np.savez(os.path.join(out, f"{name}_worker{index}.npz"), **arrays)


def main(out):
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    run(strategy, "csgd", lambda plan: kc.CSGD(
        plan, learning_rate=0.1, centripetal_strength=1.0,
        vector_strength_scale=1.0), out)
    run(strategy, "gsm", lambda plan: kc.GSM(
        density=0.3, learning_rate=0.05, momentum=0.9), out)
    run(strategy, "asfp", lambda plan: keras.optimizers.SGD(0.05, 0.9), out,
        asfp=kc.callbacks.AsymptoticSoftFilterPruning(0.5, verbose=0))


if __name__ == "__main__":
    main(sys.argv[1])
