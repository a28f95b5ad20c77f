"""A small ViT on CIFAR-10: C-SGD vs magnitude + fine-tuning, heads + MLP.

    .venv/bin/python benchmarks/vit_cifar.py --data-dir ../shared/data/cifar10
        [--profile quick|full] [--seeds 0,1]

A functional ViT written with `keras.layers` (patch `Conv2D`, pre-norm
`MultiHeadAttention` and Dense-gelu-Dense MLP blocks, `LayerNormalization`)
is trained once (seed 0), then pruned at `keep=0.5` on every prunable group
(attention heads and MLP hidden units; the residual stream is frozen by
LayerNormalization) by two methods with the same epochs: C-SGD (k-means
clusters, then `kc.slim`, no fine-tuning) and magnitude pruning (head and
unit norms) plus fine-tuning. Accuracy is on a validation split held out
of the training folder (the last `val` images of a fixed shuffle), not the
CIFAR-10 test set. The slim and full models are timed against each other
(interleaved, `kc.latency.time_against_full`) on LiteRT at batch 1 and
TensorFlow at batch 64. Writes `benchmarks/results/vit_cifar_<profile>.json`
with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import layers as L  # noqa: E402

import keras_csgd as kc  # noqa: E402
from keras_csgd import data as kdata  # noqa: E402
from keras_csgd.latency import timing  # noqa: E402

PROFILES = {
    # About 25 minutes on 2 CPU cores for two seeds.
    "quick": {"train": 10000, "val": 2000, "base_epochs": 15,
              "method_epochs": 5, "depth": 4, "dim": 64, "heads": 8,
              "mlp": 128},
    "full": {"train": 45000, "val": 5000, "base_epochs": 100,
             "method_epochs": 30, "depth": 6, "dim": 192, "heads": 6,
             "mlp": 768},
}
CSGD_SETTINGS = {"learning_rate": 0.03, "momentum": 0.9,
                 "centripetal_strength": 0.3, "vector_strength_scale": 1.0,
                 "weight_decay": 1e-4, "clipnorm": 1.0}


class PositionEmbedding(L.Layer):
    """A learned embedding per position, added to the patch tokens (left
    unregistered: it sits on the residual stream, frozen anyway)."""

    def build(self, input_shape):
        self.positions = self.add_weight(shape=input_shape[1:],
                                         name="positions")

    def call(self, x):
        return x + self.positions


def vit(depth, dim, heads, mlp, patch=4, image=32, classes=10):
    """A small functional ViT: patches, positions, pre-norm blocks."""
    x = inp = keras.Input((image, image, 3))
    x = L.Conv2D(dim, patch, strides=patch, name="patch")(x)
    x = L.Reshape(((image // patch) ** 2, dim))(x)
    x = PositionEmbedding(name="positions")(x)
    for b in range(depth):
        y = L.LayerNormalization(name=f"t{b}_ln1")(x)
        y = L.MultiHeadAttention(heads, dim // heads, name=f"t{b}_mha")(y, y)
        x = L.Add()([x, y])
        y = L.LayerNormalization(name=f"t{b}_ln2")(x)
        y = L.Dense(mlp, activation="gelu", name=f"t{b}_fc1")(y)
        x = L.Add()([x, L.Dense(dim, name=f"t{b}_fc2")(y)])
    x = L.GlobalAveragePooling1D()(L.LayerNormalization(name="ln")(x))
    return keras.Model(inp, L.Dense(classes, name="head")(x), name="vit")


def compile_model(model, optimizer):
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"], jit_compile=False,
    )
    return model


def accuracy(model, ds):
    compile_model(model, "sgd")
    return float(model.evaluate(ds, verbose=0)[1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--profile", choices=sorted(PROFILES),
                        default="quick")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--results-dir", default=os.path.join(
        os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)
    p = PROFILES[args.profile]
    start = time.time()
    x, y = kdata.load_cifar10(args.data_dir)
    (xt, yt), (xv, yv) = kdata.train_val_split(x, y, val_size=p["val"])
    xt, yt = xt[: p["train"]], yt[: p["train"]]
    mean, std = kdata.channel_stats(xt)
    train = kdata.make_dataset(xt, yt, 128, shuffle=True, augment=True,
                               mean=mean, std=std)
    val = kdata.make_dataset(xv, yv, 256, mean=mean, std=std)

    keras.utils.set_random_seed(0)
    base = vit(p["depth"], p["dim"], p["heads"], p["mlp"])
    compile_model(base, keras.optimizers.AdamW(1e-3, weight_decay=0.05))
    base.fit(train, epochs=p["base_epochs"], verbose=2)
    base_acc = accuracy(base, val)
    base_weights = base.get_weights()
    full_macs = kc.count_macs(base)
    runs = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        keras.utils.set_random_seed(seed)
        model = keras.models.clone_model(base)
        model.set_weights(base_weights)
        plan = kc.make_plan(model, keep=0.5, method="kmeans", seed=seed)
        compile_model(model, kc.CSGD(plan, **CSGD_SETTINGS))
        model.fit(train, epochs=p["method_epochs"], verbose=2)
        trained = accuracy(model, val)
        spread = kc.cluster_spread(model, plan)["overall"]
        small = kc.slim(model, plan)
        xs = next(iter(val))[0]
        logit_gap = float(np.max(np.abs(
            model.predict(xs, verbose=0) - small.predict(xs, verbose=0))))
        csgd = {"trained": trained, "slim": accuracy(small, val),
                "cluster_spread": spread, "max_abs_logit_difference":
                logit_gap, "macs_ratio": kc.count_macs(small) / full_macs}

        keras.utils.set_random_seed(seed)
        model = keras.models.clone_model(base)
        model.set_weights(base_weights)
        mplan = kc.methods.magnitude_plan(model, keep=0.5)
        pruned = kc.slim(model, mplan)
        removed = accuracy(pruned, val)
        compile_model(pruned, keras.optimizers.AdamW(3e-4,
                                                     weight_decay=0.05))
        pruned.fit(train, epochs=p["method_epochs"], verbose=2)
        magnitude = {"slim": removed, "finetuned": accuracy(pruned, val),
                     "macs_ratio": kc.count_macs(pruned) / full_macs}
        runs.append({"seed": seed, "csgd": csgd, "magnitude": magnitude})
        print(json.dumps(runs[-1]), flush=True)

    latency = {}
    for runtime, batch in (("litert", 1), ("tensorflow", 64)):
        full_ms, slim_ms, ratio = kc.latency.time_against_full(
            base, small, runtime=runtime, batch_size=batch
        )
        latency[f"{runtime}_b{batch}"] = {
            "full_ms": full_ms, "slim_ms": slim_ms,
            "speedup": 1.0 / ratio,
        }
    result = {
        "command": "python benchmarks/vit_cifar.py --data-dir "
        f"../shared/data/cifar10 --profile {args.profile} --seeds "
        f"{args.seeds}",
        "profile": {"name": args.profile, **p},
        "data": {"train_images": len(xt), "val_images": len(xv),
                 "validation": f"last {len(xv)} of a fixed shuffle (seed 0)"
                 " of the training folder"},
        "keep": 0.5,
        "base_accuracy": base_acc,
        "full_macs": full_macs,
        "groups": {g.name: g.size for g in kc.channel_groups(base)
                   if g.prunable},
        "runs": runs,
        "latency_of_the_last_csgd_slim_model": latency,
        "machine": {**timing.machine(), **timing.versions(),
                    "load_average_at_end": list(os.getloadavg())},
        "wall_seconds": round(time.time() - start, 1),
    }
    os.makedirs(args.results_dir, exist_ok=True)
    path = os.path.join(args.results_dir, f"vit_cifar_{args.profile}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
