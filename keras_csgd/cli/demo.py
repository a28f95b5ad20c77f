"""`keras-csgd demo`: the flagship flow, offline, in about two minutes.

Train a small ResNet, plan to a measured LiteRT latency target
(`kc.plan_for_latency`, widths and removed blocks), train it with C-SGD
(clusters pulled together, removed blocks pulled to zero), `kc.slim` it
exactly, and print the held-out accuracy of each model, the slim/trained
agreement and the slim model's measured speed-up.
"""

from __future__ import annotations

import os
import time

import keras

import keras_csgd as kc
from keras_csgd import data as kdata
from keras_csgd import recover
from keras_csgd.cli.common import (
    CommandError,
    format_table,
    latency_fraction,
    positive_int,
)
from keras_csgd.cli.prune import CSGD_LEARNING_RATE, csgd_optimizer
from keras_csgd.cli.recovery import frozen_copy, progress


def _upscaled(x, size):
    return keras.ops.convert_to_numpy(keras.ops.image.resize(x, (size, size)))


def _demo_data(args):
    """`((x, y), (x_test, y_test), test label, depth)`, images in [0, 1]."""
    if args.dataset == "digits":
        (x, y), (xt, yt) = kdata.load_digits_images()
        return ((_upscaled(x, args.size), y), (_upscaled(xt, args.size), yt),
                "held-out digits (450)", 14)
    try:
        x, y = kdata.load_cifar10(args.data_dir)
    except RuntimeError as error:
        raise CommandError(str(error)) from None
    (x, y), (xt, yt) = kdata.train_val_split(x, y, 5000)
    x = x[: args.train_samples] if args.train_samples else x
    y = y[: len(x)]
    return ((x.astype("float32") / 255, y),
            (xt.astype("float32") / 255, yt),
            "validation split (the last 5,000 of a fixed shuffle)", 20)


def cmd_demo(args):
    out = args.out
    if os.path.exists(out) and not os.path.isdir(out):
        raise CommandError(f"--out {out!r} is not a folder")
    if args.data_dir is not None and args.dataset != "cifar10":
        raise CommandError("--data-dir needs --dataset cifar10")
    if args.data_dir is not None and not os.path.isdir(args.data_dir):
        raise CommandError(f"--data-dir {args.data_dir!r} is not a folder")
    os.makedirs(out, exist_ok=True)
    if not os.access(out, os.W_OK):
        raise CommandError(f"--out {out!r} is not writable")
    start, verbose = time.perf_counter(), progress()
    keras.utils.set_random_seed(args.seed)
    train, test, test_label, depth = _demo_data(args)
    mean, std = kdata.channel_stats(train[0])
    model = kc.models.resnet_cifar(depth, input_shape=train[0].shape[1:],
                                   num_classes=10, mean=mean, std=std)
    augment = args.dataset == "cifar10"  # no flipped digits
    base = recover.fine_tune(
        model, train, epochs=args.base_epochs, validation_data=test,
        learning_rate=0.05, batch_size=32, augment=augment,
        seed=args.seed, verbose=verbose,
    ).accuracy_after
    print(f"1. trained {model.name}: {base:.2%} on the {test_label}")
    plan, report = kc.plan_for_latency(
        model, args.latency, "litert", 1, clusters="kmeans",
        grid=(0.5,), threads=args.threads, seed=args.seed,
        return_report=True, verbose=verbose,
    )
    print(f"2. planned for {args.latency:.0%} of its LiteRT batch-1 latency"
          f": {report}")
    teacher = frozen_copy(model)
    recover.fine_tune(
        model, train, teacher=teacher, epochs=args.epochs,
        validation_split=0, learning_rate=CSGD_LEARNING_RATE, batch_size=32,
        augment=augment, seed=args.seed, verbose=verbose,
        optimizer=csgd_optimizer(plan),
    )
    print(f"3. C-SGD for {args.epochs} epochs (distilled from the trained "
          f"model): clusters to {plan.widths()}, removed blocks "
          f"{list(plan.remove_blocks)} pulled to zero")
    slim = kc.slim(model, plan, inputs=test[0][:256])
    same, difference = recover.agreement(model, slim, test[0])
    full_ms, slim_ms, ratio = kc.latency.time_against_full(
        teacher, slim, "litert", 1, threads=args.threads
    )
    slim.save(os.path.join(out, "slim.keras"))
    kc.export_tflite(slim, os.path.join(out, "slim.tflite"))
    with open(os.path.join(out, "plan.json"), "w") as f:
        f.write(plan.to_json())
    rows = [["", "trained", "C-SGD", "slim"]]
    rows.append(["accuracy (%)", f"{100 * base:.2f}",
                 f"{100 * recover.evaluate(model, *test)[0]:.2f}",
                 f"{100 * recover.evaluate(slim, *test)[0]:.2f}"])
    rows.append(["MACs", f"{kc.count_macs(teacher):,}", "",
                 f"{kc.count_macs(slim):,}"])
    rows.append(["params", f"{teacher.count_params():,}", "",
                 f"{slim.count_params():,}"])
    rows.append(["LiteRT batch 1 (ms)", f"{full_ms:.3f}", "",
                 f"{slim_ms:.3f}"])
    print()
    print(format_table(rows))
    print(
        f"\n4. slim vs C-SGD model on the {test_label}: argmax agreement "
        f"{same:.2%}, max logit difference {difference:.1e} of the largest"
        f" logit; the slim model runs in {ratio:.1%} of the trained model's"
        f" LiteRT time (batch 1, {args.threads} threads, interleaved) and "
        f"is in {out} (.keras, .tflite, plan.json); "
        f"{time.perf_counter() - start:.0f} s"
    )


def add_demo(sub):
    demo = sub.add_parser(
        "demo",
        help="the flagship flow: latency target, C-SGD, exact slim, speed-up",
        description="Trains a small ResNet on scikit-learn's digits "
        "(upscaled; or ResNet-20 on CIFAR-10), plans it to a measured "
        "LiteRT latency target, trains it with C-SGD (removed blocks pulled "
        "to zero), slims it exactly and prints accuracy, agreement, MACs, "
        "params and the measured speed-up.",
    )
    demo.add_argument("--dataset", choices=("digits", "cifar10"),
                      default="digits")
    demo.add_argument("--data-dir", help="CIFAR-10 image folder (else tfds)")
    demo.add_argument("--base-epochs", type=positive_int, default=5,
                      help="epochs of training before pruning (default 5)")
    demo.add_argument("--epochs", type=positive_int, default=8,
                      help="epochs of C-SGD (default 8: about 350 steps, "
                      "enough for the clusters to collapse)")
    demo.add_argument("--latency", type=latency_fraction, default=0.5,
                      help="the slim model's LiteRT batch-1 latency as a "
                      "fraction of the trained model's (default 0.5)")
    demo.add_argument("--size", type=positive_int, default=32,
                      help="digits: image size after upscaling (default 32)")
    demo.add_argument("--out", default="demo_out",
                      help="output folder (default ./demo_out)")
    demo.add_argument("--train-samples", type=positive_int,
                      help="cifar10: use only this many training images")
    demo.add_argument("--threads", type=positive_int, default=2)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)
    return demo
