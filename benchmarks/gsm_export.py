"""TFLite file size and latency of GSM-sparsified models, dense vs sparse.

Two models, each made 90% sparse with `kc.sparsify` (density 0.1): the
LeNet-300-100 MLP trained with GSM (compression 10) on scikit-learn digits,
and a CIFAR ResNet-56 (`--depth`, untrained: size and latency do not depend
on the weights' values). Each is written twice: dense with
`kc.export_tflite` and with its sparsity-aware encoding (`sparse=True`:
`tf.lite.Optimize.EXPERIMENTAL_SPARSITY`). Reported: file size, gzip size,
max |TFLite - Keras| and the
interpreter latency from `kc.benchmark_latency`. The runtime densifies
sparse weights for its dense kernels, so expect smaller files, not faster
inference.

    python benchmarks/gsm_export.py [--depth 56] [--runs 30]

Writes benchmarks/results/gsm_export.json.
"""

import argparse
import gzip
import json
import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import tensorflow as tf
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import keras_csgd as kc
from keras_csgd.latency import timing
from keras_csgd.models import lenet_300_100, resnet_cifar
from keras_csgd.runtimes.litert import run_tflite

RESULTS = os.path.join(os.path.dirname(__file__), "results")
DENSITY = 0.1


def digits_mlp():
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, random_state=0, stratify=y
    )
    keras.utils.set_random_seed(0)
    model = lenet_300_100()
    model.compile(
        optimizer=kc.GSM(
            compression=1 / DENSITY,
            learning_rate=0.02,
            momentum=0.98,
            weight_decay=5e-3,
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(x_train, y_train, batch_size=64, epochs=20, verbose=0)
    kc.sparsify(model, DENSITY)
    return model, x_test, y_test


def measure(name, model, x, folder, runs, y=None):
    dense_path = os.path.join(folder, f"{name}_dense.tflite")
    sparse_path = os.path.join(folder, f"{name}_sparse.tflite")
    kc.export_tflite(model, dense_path, representative_data=x)
    kc.export_tflite(model, sparse_path, representative_data=x, sparse=True)
    expected = np.asarray(model(x[:64], training=False))
    row = {
        "model": name,
        "kernel_density": kc.sparsity_report(model, print_fn=None)["density"],
        "parameters": model.count_params(),
    }
    for kind, path in (("dense", dense_path), ("sparse", sparse_path)):
        with open(path, "rb") as f:
            data = f.read()
        out = run_tflite(path, x[:64])
        row[kind] = {
            "bytes": len(data),
            "gzip_bytes": len(gzip.compress(data)),
            "max_abs_error": float(np.max(np.abs(out - expected))),
            "latency": {
                str(b): v
                for b, v in kc.benchmark_latency(
                    path, batch_sizes=(1, 64), runs=runs
                ).items()
            },
        }
        if y is not None:
            row[kind]["test_accuracy"] = float(
                np.mean(np.argmax(run_tflite(path, x), -1) == y)
            )
    row["size_ratio_sparse_over_dense"] = (
        row["sparse"]["bytes"] / row["dense"]["bytes"]
    )
    print(
        f"{name}: dense {row['dense']['bytes']} B, sparse "
        f"{row['sparse']['bytes']} B ({row['size_ratio_sparse_over_dense']:.2f}"
        f"x); batch-1 latency dense "
        f"{row['dense']['latency']['1']['median_ms']:.3f} ms, sparse "
        f"{row['sparse']['latency']['1']['median_ms']:.3f} ms"
    )
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=56)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        mlp, x_test, y_test = digits_mlp()
        rows.append(
            measure("lenet_300_100_digits", mlp, x_test, folder, args.runs,
                    y=y_test)
        )
        keras.utils.set_random_seed(0)
        resnet = resnet_cifar(depth=args.depth)
        kc.sparsify(resnet, DENSITY)
        x = np.random.default_rng(0).uniform(size=(64, 32, 32, 3))
        rows.append(
            measure(f"resnet{args.depth}_cifar", resnet,
                    x.astype("float32"), folder, args.runs)
        )
    result = {
        "density": DENSITY,
        "tensorflow": tf.__version__,
        "machine": {**timing.machine(), **timing.versions()},
        "cpus": os.cpu_count(),
        "models": rows,
    }
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "gsm_export.json"), "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
