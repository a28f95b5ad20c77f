"""`keras-csgd demo`: train, C-SGD, slim, export and compare."""

from __future__ import annotations

import argparse
import os
import time

import keras
import numpy as np

import keras_csgd as kc
from keras_csgd import data as kdata
from keras_csgd import models
from keras_csgd.cli.common import (
    CommandError,
    fit,
    format_table,
    fraction,
    positive_int,
    sgd,
)
from keras_csgd.cli.prune import METHODS


def _demo_data(args):
    """`(model, train, (x_test, y_test), test_label)`.

    `train` is `(x, y)` arrays (digits) or an augmented `tf.data.Dataset`
    (CIFAR-10); `x_test` an array or a dataset of normalised batches.
    """
    if args.dataset == "digits":
        train, test = kdata.load_digits_images()
        return models.small_resnet(), train, test, "test split (450 digits)"
    try:
        x, y = kdata.load_cifar10(args.data_dir)
    except RuntimeError as error:
        raise CommandError(str(error)) from None
    (x_train, y_train), (x_val, y_val) = kdata.train_val_split(x, y, 5000)
    if args.train_samples:
        x_train, y_train = x_train[: args.train_samples], y_train[
            : args.train_samples
        ]
    mean, std = kdata.channel_stats(x_train)
    train = kdata.make_dataset(
        x_train, y_train, 128, shuffle=True, augment=True, mean=mean, std=std,
        seed=args.seed,
    )
    val = kdata.make_dataset(x_val, y_val, 256, mean=mean, std=std)
    return (
        models.resnet_cifar(20),
        train,
        (val, y_val),
        (
            "validation split: the last 5,000 of a fixed shuffle of the "
            "training folder"
        ),
    )


def _accuracy(model, x, y):
    logits = model.predict(x, batch_size=256, verbose=0)
    return float(np.mean(np.argmax(logits, axis=-1) == y)), logits


def cmd_demo(args):
    out = args.out
    if os.path.exists(out) and not os.path.isdir(out):
        raise CommandError(f"--out {out!r} is not a folder")
    if args.data_dir is not None and args.dataset != "cifar10":
        raise CommandError("--data-dir needs --dataset cifar10")
    if args.data_dir is not None and not os.path.isdir(args.data_dir):
        raise CommandError(f"--data-dir {args.data_dir!r} is not a folder")
    start = time.perf_counter()
    keras.utils.set_random_seed(args.seed)
    model, train, (x_test, y_test), test_label = _demo_data(args)
    os.makedirs(out, exist_ok=True)
    if not os.access(out, os.W_OK):
        raise CommandError(f"--out {out!r} is not writable")
    epochs = args.epochs or (20 if args.dataset == "digits" else 10)
    fit(model, train, epochs, sgd(0.05))
    print(f"trained {model.name} for {epochs} epochs")
    options = argparse.Namespace(keep=args.keep, latency=None, round_to=None,
                                 epochs=epochs, seed=args.seed, verbose=0)
    plan, slim = METHODS["csgd"](model, train, options)
    print(f"C-SGD for {epochs} epochs, clusters: {plan.widths()}")
    acc_full, logits_full = _accuracy(model, x_test, y_test)
    acc_slim, logits_slim = _accuracy(slim, x_test, y_test)
    paths = {}
    for name, m in (("trained", model), ("slim", slim)):
        paths[name] = os.path.join(out, f"{name}.keras")
        m.save(paths[name])
        kc.export_tflite(m, os.path.join(out, f"{name}.tflite"))
    with open(os.path.join(out, "plan.json"), "w") as f:
        f.write(plan.to_json())
    rows = [["", "trained", "slim", "slim/trained"]]

    def add(label, full, small, fmt="{:,}", ratio=True):
        rows.append(
            [label, fmt.format(full), fmt.format(small)]
            + [f"{small / full:.2f}" if ratio else ""]
        )

    add("accuracy (%)", 100 * acc_full, 100 * acc_slim, "{:.2f}", False)
    rows.append(
        [
            "max |logit difference|",
            "",
            f"{np.max(np.abs(logits_full - logits_slim)):.1e}",
            "",
        ]
    )
    add("MACs", kc.count_macs(model), kc.count_macs(slim))
    add("params", model.count_params(), slim.count_params())
    latency = {
        name: {
            "Keras": kc.benchmark_latency(
                m, threads=args.threads, runs=args.runs
            ),
            "TFLite": kc.benchmark_latency(
                os.path.join(out, f"{name}.tflite"),
                threads=args.threads,
                runs=args.runs,
            ),
        }
        for name, m in (("trained", model), ("slim", slim))
    }
    for engine in ("Keras", "TFLite"):
        for batch in (1, 64):
            add(
                f"{engine} latency, batch {batch} (ms)",
                latency["trained"][engine][batch]["median_ms"],
                latency["slim"][engine][batch]["median_ms"],
                "{:.3f}",
            )
    for suffix in (".keras", ".tflite"):
        add(
            f"{suffix} file (KiB)",
            os.path.getsize(os.path.join(out, "trained" + suffix)) / 1024,
            os.path.getsize(os.path.join(out, "slim" + suffix)) / 1024,
            "{:.1f}",
        )
    print()
    print(format_table(rows))
    print(
        f"\naccuracy on the {test_label}; latency: median of {args.runs} "
        f"runs, {args.threads} threads; files in {out}; "
        f"{time.perf_counter() - start:.0f} s"
    )
    if args.dataset == "digits":
        print(
            "The digits model is tiny: per-call overhead dominates its "
            "latency, so the MACs saving shows in size more than in time."
        )


def add_demo(sub):
    demo = sub.add_parser(
        "demo",
        help="train, C-SGD to about half the MACs, slim, export, compare",
        description="Trains a small residual CNN on scikit-learn's digits "
        "(or ResNet-20 on CIFAR-10), runs C-SGD to about half the MACs, "
        "slims it, exports TFLite and prints accuracy, MACs, params, "
        "latency and file sizes of the trained and the slim model.",
    )
    demo.add_argument("--dataset", choices=("digits", "cifar10"),
                      default="digits")
    demo.add_argument("--data-dir", help="CIFAR-10 image folder (else tfds)")
    demo.add_argument("--epochs", type=positive_int,
                      help="epochs of training and of C-SGD each "
                      "(default 20 digits, 10 cifar10)")
    demo.add_argument("--keep", type=fraction, default=0.67,
                      help="kept fraction of every channel group "
                      "(default 0.67: about half the MACs)")
    demo.add_argument("--out", default="demo_out",
                      help="output folder (default ./demo_out)")
    demo.add_argument("--train-samples", type=positive_int,
                      help="cifar10: use only this many training images")
    demo.add_argument("--threads", type=positive_int, default=2)
    demo.add_argument("--runs", type=positive_int, default=30,
                      help="timed runs per latency (default 30)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)
    return demo
