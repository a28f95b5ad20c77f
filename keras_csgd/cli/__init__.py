"""The `keras-csgd` command line: demo, prune, export, bench, profile.

Every subcommand has `--help`. Bad input (a missing or non-Keras model file,
a bad `--keep`, an unknown method, an unreadable data folder, an unwritable
output) ends with one line `keras-csgd: error: ...` on stderr and exit code
2, without a traceback and without writing any output file.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time

import keras
import numpy as np

import keras_csgd as kc
from keras_csgd import batches, checks, models
from keras_csgd import data as kdata
from keras_csgd import export as kexport
from keras_csgd.methods import compensation
from keras_csgd.methods.adaptive import AdaptiveGates

PROG = "keras-csgd"

# C-SGD settings for short schedules (the demo, `prune --method csgd`): a
# strong centripetal pull, the same on kernels and on 1-D variables, so the
# clusters collapse to float precision within a few hundred steps.
CSGD_SETTINGS = {
    "learning_rate": 0.03,
    "momentum": 0.9,
    "centripetal_strength": 0.3,
    "vector_strength_scale": 1.0,
    "weight_decay": 1e-4,
}
# GSM as in its paper's CIFAR runs (`prune --method gsm`).
GSM_SETTINGS = {"learning_rate": 5e-3, "momentum": 0.98, "weight_decay": 1e-4}


def quiet_tensorflow() -> None:
    """Silences TensorFlow's and absl's informational logging.

    Sets `TF_CPP_MIN_LOG_LEVEL=3` (unless set already; read by TensorFlow's
    C++ runtime, and by the converter subprocesses) and the absl and
    `tensorflow` Python loggers to errors only. The lines TensorFlow prints
    while it is imported only go away when this runs before the import.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
    except ImportError:
        pass
    logging.getLogger("tensorflow").setLevel(logging.ERROR)


class CommandError(Exception):
    """Bad command-line input: reported as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """Reports usage errors as one line `keras-csgd: error: ...`."""

    def error(self, message):
        self.exit(2, f"{PROG}: error: {message}\n")


def _fraction(text):
    try:
        return checks.fraction("keep", float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a fraction in (0, 1], got {text!r}"
        ) from None


def _positive_int(text):
    try:
        return checks.positive_int("value", int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a positive integer, got {text!r}"
        ) from None


def _batch_sizes(text):
    return tuple(_positive_int(part) for part in text.split(","))


def _existing_file(path, what):
    if not os.path.isfile(path):
        raise CommandError(f"{what} {path!r} is not an existing file")


def _output_path(path, suffix, source=None):
    """Checks that `path` ends in `suffix` and can be written."""
    if not path.endswith(suffix):
        raise CommandError(f"--out must end with {suffix}, got {path!r}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise CommandError(
            f"--out {path!r}: folder {folder!r} does not exist or is not "
            "writable"
        )
    if os.path.isdir(path):
        raise CommandError(f"--out {path!r} is a folder")
    if source is not None and os.path.abspath(source) == os.path.abspath(
        path
    ):
        raise CommandError("--out must differ from the input model")
    return path


def _load_model(path):
    _existing_file(path, "model")
    try:
        return keras.saving.load_model(path)
    except Exception as error:  # Keras raises many types on bad files.
        first_line = str(error).strip().splitlines()[0] if str(error) else ""
        raise CommandError(
            f"{path!r} is not a loadable Keras model "
            f"({type(error).__name__}: {first_line})"
        ) from error


def _load_data(path, model):
    """`(x, y)` of `--data` (an `.npz` or an image folder), or `None`.

    Read by `keras_csgd.batches.read`: image folders are resized to the
    model's input size and scaled to `[0, 1]`; `.npz` arrays are used as
    they are.
    """
    return None if path is None else batches.read(path, model)


def _classifier_loss(model):
    """Sparse cross-entropy on logits, or on probabilities after softmax."""
    activation = getattr(model.layers[-1], "activation", None)
    from_logits = getattr(activation, "__name__", "") != "softmax"
    return keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits)


def _compile(model, optimizer):
    model.compile(
        optimizer=optimizer, loss=_classifier_loss(model), metrics=["accuracy"]
    )


def _fit(model, data, epochs, optimizer, callbacks=()):
    """Trains on `(x, y)` arrays (batches of 64) or a `tf.data.Dataset`."""
    _compile(model, optimizer)
    arrays = isinstance(data, tuple)
    x, y = data if arrays else (data, None)
    model.fit(x, y, batch_size=64 if arrays else None, epochs=epochs,
              shuffle=arrays, callbacks=list(callbacks), verbose=0)


def _sgd(learning_rate):
    return keras.optimizers.SGD(learning_rate, momentum=0.9, nesterov=True)


def _needs_data(data, args):
    if data is None:
        raise CommandError(f"--method {args.method} needs --data")


# Methods: `(model, data, args) -> (plan, slim model)`, `args` holding
# `keep`, `round_to`, `epochs` and `seed`. The ones in TRAINED train the
# full model for `--epochs`; the ones in PLANNED plan from the trained
# model, and `--epochs` fine-tunes their slim model.
def _csgd(model, data, args):
    if args.latency is not None:
        plan = _latency_plan(model, args, clusters="kmeans")
    else:
        plan = kc.make_plan(model, keep=args.keep, method="kmeans",
                            seed=args.seed, round_to=args.round_to)
    _fit(model, data, args.epochs, kc.CSGD(plan, **CSGD_SETTINGS))
    return plan, kc.slim(model, plan)


def _asfp(model, data, args):
    asfp = kc.callbacks.AsymptoticSoftFilterPruning(rate=1 - args.keep,
                                                    verbose=0)
    _fit(model, data, args.epochs, _sgd(0.01), [asfp])
    return asfp.plan, kc.slim(model, asfp.plan)


def _gsm(model, data, args):
    """Unstructured: `--keep` is the kept fraction of the kernel weights."""
    _fit(model, data, args.epochs, kc.GSM(density=args.keep, **GSM_SETTINGS))
    kc.sparsify(model, density=args.keep)
    plan = kc.PruningPlan({}, groups=kc.channel_groups(model))
    return plan, kc.slim(model, plan)


def _adaptive(model, data, args):
    """Learnt gates with the MACs of `--keep` per group as the target."""
    target = kc.macs_under(
        model, kc.make_plan(model, keep=args.keep, round_to=args.round_to)
    ) / kc.count_macs(model)
    gates = AdaptiveGates(model, macs_target=target)
    _fit(gates.model, data, args.epochs, _sgd(0.01), [gates.callback])
    folded, plan = gates.finalize()
    return plan, kc.slim(folded, plan)


def _magnitude(model, data, args):
    if args.latency is not None:
        plan = _latency_plan(model, args)  # L1 norms by default
    else:
        plan = kc.methods.magnitude_plan(model, keep=args.keep,
                                         round_to=args.round_to)
    return plan, kc.slim(model, plan)


def _similarity(model, data, args):
    plan = kc.methods.similarity_plan(model, data, keep=args.keep,
                                      round_to=args.round_to)
    return plan, kc.slim(model, plan)


def _functionality(model, data, args):
    _needs_data(data, args)
    plan = kc.methods.functionality_plan(model, data, keep=args.keep,
                                         round_to=args.round_to)
    return plan, kc.slim(model, plan)


def _ensembles(model, data, args):
    _needs_data(data, args)
    _compile(model, "sgd")
    scores = kc.methods.ensemble_importance(model, data, seed=args.seed,
                                            verbose=0)
    if args.latency is not None:
        plan = _latency_plan(model, args, scores=scores)
    else:
        plan = kc.plan_from_scores(model, scores, keep=args.keep,
                                   round_to=args.round_to)
    return plan, kc.slim(model, plan)


def _cap(model, data, args):
    """Magnitude plan, consumers refitted by least squares (CaP)."""
    _needs_data(data, args)
    plan = kc.methods.magnitude_plan(model, keep=args.keep,
                                     round_to=args.round_to)
    stats = compensation.collect_statistics(model, data, verbose=0)
    return plan, compensation.compensate(model, plan, stats)


def _latency_plan(model, args, scores=None, clusters="prune"):
    """`kc.plan_for_latency` at `--latency`; its report goes to `args`."""
    plan, args.latency_report = kc.plan_for_latency(
        model, args.latency, args.runtime, args.batch_size, scores=scores,
        clusters=clusters, threads=args.threads, seed=args.seed,
        return_report=True, verbose=0,
    )
    return plan


TRAINED = {"csgd": _csgd, "asfp": _asfp, "gsm": _gsm, "adaptive": _adaptive}
PLANNED = {
    "magnitude": _magnitude,
    "similarity": _similarity,
    "functionality": _functionality,
    "ensembles": _ensembles,
    "cap": _cap,
}
METHODS = {**TRAINED, **PLANNED}
# The methods that plan to `--latency` (the others take `--keep` only).
LATENCY_METHODS = ("csgd", "magnitude", "ensembles")


def _write_atomically(writers):
    """Runs `writer(tmp_path)` for each `(path, writer)`, then renames all.

    Either every file appears or none does.
    """
    temps = []
    try:
        for path, writer in writers:
            folder, name = os.path.split(os.path.abspath(path))
            suffix = os.path.splitext(name)[1]
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=suffix,
                                       dir=folder)
            os.close(fd)
            temps.append(tmp)
            writer(tmp)
        for tmp, (path, _) in zip(temps, writers):
            os.replace(tmp, path)
    finally:
        for tmp in temps:
            if os.path.exists(tmp):
                os.unlink(tmp)


def _write_text(text):
    def write(path):
        with open(path, "w") as f:
            f.write(text)

    return write


def _plan_path(out):
    return out[: -len(".keras")] + ".plan.json"


def cmd_prune(args):
    _existing_file(args.model, "model")
    _output_path(args.out, ".keras", source=args.model)
    if args.data is not None and not os.path.exists(args.data):
        raise CommandError(f"--data {args.data!r} does not exist")
    if args.latency is not None and args.method not in LATENCY_METHODS:
        raise CommandError(
            f"--latency works with --method {', '.join(LATENCY_METHODS)}; "
            f"got --method {args.method}"
        )
    if args.latency is not None and args.keep is not None:
        raise CommandError("give --keep or --latency, not both")
    if args.keep is None:
        args.keep = 0.625
    trains = args.method in TRAINED
    if trains and args.data is None:
        raise CommandError(f"--method {args.method} needs --data")
    model = _load_model(args.model)
    data = _load_data(args.data, model)
    if args.epochs is None:
        args.epochs = 10 if trains else 0
    if args.epochs and data is None:
        raise CommandError("--epochs needs --data")
    before, params = kc.count_macs(model), model.count_params()
    keras.utils.set_random_seed(args.seed)
    plan, slim = METHODS[args.method](model, data, args)
    if args.epochs and not trains:
        _fit(slim, data, args.epochs, _sgd(0.01))
    _write_atomically(
        [
            (args.out, slim.save),
            (_plan_path(args.out), _write_text(plan.to_json())),
        ]
    )
    after = kc.count_macs(slim)
    print(
        f"{args.method}: MACs {before:,} -> {after:,} "
        f"({after / before:.1%}), params {params:,} -> "
        f"{slim.count_params():,}; wrote {args.out} and "
        f"{_plan_path(args.out)}"
    )
    report = getattr(args, "latency_report", None)
    if report is not None:
        print(
            f"latency ({args.runtime}, batch {args.batch_size}, measured "
            f"interleaved): full {report.full_ms:.3f} ms -> slim "
            f"{report.slim_ms:.3f} ms ({report.measured_ratio:.1%}; target "
            f"{args.latency:.1%}, predicted {report.predicted_ratio:.1%}); "
            f"{len(report.remove_blocks)} blocks removed"
        )
        if report.reason:
            print(f"latency target missed: {report.reason}")


def cmd_profile(args):
    model = _load_model(args.model)
    table = kc.latency.profile(
        model, args.runtime, args.batch_size, threads=args.threads,
        verbose=0,
    )
    shares = sorted(table.shares().items(), key=lambda kv: -kv[1])
    rows = [["group or block", "kind", "share of latency"]]
    for name, share in shares:
        kind = "block" if name in table.blocks else "group"
        rows.append([name, kind, f"{share:.1%}"])
    source = "cache" if table.cached else "measured"
    print(
        f"{args.model}: {table.full:.3f} ms per batch of {args.batch_size} "
        f"on {args.runtime} ({source}); a group's share is its latency "
        "change extended to width 0, a block's what removing it saves"
    )
    print(_table(rows))


def cmd_export(args):
    _output_path(args.out, ".tflite")
    quantize = None if args.quantize == "none" else args.quantize
    if quantize == "int8" and args.data is None:
        raise CommandError("--quantize int8 needs --data (calibration)")
    if args.data is not None and not os.path.exists(args.data):
        raise CommandError(f"--data {args.data!r} does not exist")
    model = _load_model(args.model)
    data = _load_data(args.data, model)
    result = kc.export_tflite(
        model, args.out, quantize=quantize, representative_data=data
    )
    print(
        f"wrote {result.path}: {result.size_bytes:,} bytes, max relative "
        f"error {result.max_error:.2g} (tolerance "
        f"{kexport.TOLERANCES[quantize]:g})"
    )


def cmd_bench(args):
    _existing_file(args.model, "model")
    target = args.model
    if not args.model.endswith(".tflite"):
        target = _load_model(args.model)
    results = kc.benchmark_latency(
        target,
        batch_sizes=args.batch_sizes,
        threads=args.threads,
        runs=args.runs,
        jit_compile=args.jit,
    )
    rows = [["batch", "median ms", "p10 ms", "p90 ms"]]
    for batch, r in results.items():
        rows.append(
            [batch] + [f"{r[k]:.3f}" for k in ("median_ms", "p10_ms", "p90_ms")]
        )
    print(_table(rows))


def _table(rows):
    """Right-aligned plain-text table; the first column left-aligned."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return "\n".join(
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths))
        )
        for row in cells
    )


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
    _fit(model, train, epochs, _sgd(0.05))
    print(f"trained {model.name} for {epochs} epochs")
    options = argparse.Namespace(keep=args.keep, round_to=None,
                                 epochs=epochs, seed=args.seed)
    plan, slim = _csgd(model, train, options)
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
    print(_table(rows))
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


def build_parser():
    """The `keras-csgd` argument parser (all subcommands)."""
    parser = _Parser(
        prog=PROG,
        description="Structured pruning for Keras 3: C-SGD and friends, "
        "slimming and LiteRT export.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def _add_demo(sub):
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
    demo.add_argument("--epochs", type=_positive_int,
                      help="epochs of training and of C-SGD each "
                      "(default 20 digits, 10 cifar10)")
    demo.add_argument("--keep", type=_fraction, default=0.67,
                      help="kept fraction of every channel group "
                      "(default 0.67: about half the MACs)")
    demo.add_argument("--out", default="demo_out",
                      help="output folder (default ./demo_out)")
    demo.add_argument("--train-samples", type=_positive_int,
                      help="cifar10: use only this many training images")
    demo.add_argument("--threads", type=_positive_int, default=2)
    demo.add_argument("--runs", type=_positive_int, default=30,
                      help="timed runs per latency (default 30)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)
    return demo


def _add_prune(sub):
    prune = sub.add_parser(
        "prune",
        help="prune a .keras model, write the slim model and plan JSON",
        description="Prunes MODEL with --method, slims it and writes the "
        "slim model to --out and its plan to <out>.plan.json. --data is an "
        "image folder (scaled to [0, 1]) or an .npz with arrays x, y.",
    )
    prune.add_argument("model", help="input .keras model")
    prune.add_argument("--method", choices=sorted(METHODS), required=True)
    prune.add_argument("--keep", type=_fraction, default=None,
                       help="kept fraction per group (default 0.625; gsm: "
                       "of the kernel weights; adaptive: the MACs of that "
                       "width are the target)")
    prune.add_argument("--latency", type=_target,
                       help="instead of --keep: the slim latency as a "
                       "fraction of the full model's, measured on "
                       "--runtime on this machine (methods: "
                       + ", ".join(LATENCY_METHODS) + ")")
    _add_runtime(prune)
    prune.add_argument("--data", help="image folder or .npz (x, y)")
    prune.add_argument("--epochs", type=int,
                       help="training epochs (" + ", ".join(TRAINED)
                       + "; default 10) or fine-tuning epochs of the slim "
                       "model (others; default 0)")
    prune.add_argument("--round-to", type=_positive_int,
                       help="round widths to a multiple of this")
    prune.add_argument("--seed", type=int, default=0)
    prune.add_argument("--out", required=True, help="output .keras file")
    prune.set_defaults(func=cmd_prune)
    return prune


def _add_export(sub):
    export = sub.add_parser(
        "export",
        help="export a .keras model to LiteRT (.tflite)",
        description="Converts MODEL to a .tflite file, checks it against "
        "Keras and writes it atomically.",
    )
    export.add_argument("model", help="input .keras model")
    export.add_argument("--out", required=True, help="output .tflite file")
    export.add_argument("--quantize", default="none",
                        choices=("none", "dynamic", "float16", "int8"))
    export.add_argument("--data", help="calibration inputs for int8: "
                        "image folder or .npz (x, y)")
    export.set_defaults(func=cmd_export)
    return export


def _add_bench(sub):
    bench = sub.add_parser(
        "bench",
        help="time a .keras or .tflite model",
        description="Median and 10th/90th percentile latency per batch "
        "size (Keras through a compiled tf.function, TFLite through the "
        "interpreter).",
    )
    bench.add_argument("model", help=".keras or .tflite file")
    bench.add_argument("--batch-sizes", type=_batch_sizes, default=(1, 64),
                       help="comma-separated (default 1,64)")
    bench.add_argument("--threads", type=_positive_int, default=2)
    bench.add_argument("--runs", type=_positive_int, default=50)
    bench.add_argument("--jit", action="store_true",
                       help="XLA-compile the Keras function")
    bench.set_defaults(func=cmd_bench)
    return bench


def _target(text):
    try:
        return checks.fraction("latency", float(text), high_closed=False)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a fraction in (0, 1), got {text!r}"
        ) from None


def _add_runtime(parser):
    parser.add_argument("--runtime", choices=kc.latency.RUNTIMES,
                        default="litert",
                        help="litert (float32 interpreter) or tensorflow "
                        "(compiled, BN folded); default litert")
    parser.add_argument("--batch-size", type=_positive_int, default=1,
                        help="batch size timed (default 1)")
    parser.add_argument("--threads", type=_positive_int, default=2,
                        help="threads (default 2)")


def _add_profile(sub):
    profile = sub.add_parser(
        "profile",
        help="measure each group's and block's share of the latency",
        description="Profiles MODEL on --runtime on this machine (slim "
        "variants timed against the full model, interleaved; cached under "
        "~/.cache/keras_csgd/latency or $KERAS_CSGD_CACHE) and prints each "
        "prunable group's and removable block's share of the latency.",
    )
    profile.add_argument("model", help="input .keras model")
    _add_runtime(profile)
    profile.set_defaults(func=cmd_profile)
    return profile


# One function per subcommand: `add(subparsers) -> its parser`.
SUBCOMMANDS = [_add_demo, _add_prune, _add_export, _add_bench, _add_profile]


def main(argv=None):
    """Runs `keras-csgd`; returns the exit code (0, or 2 on bad input)."""
    quiet_tensorflow()
    args = build_parser().parse_args(argv)
    threads = getattr(args, "threads", None)
    if threads:
        kexport.set_tf_threads(threads)
    try:
        args.func(args)
    except (CommandError, ValueError, TypeError, OSError) as error:
        lines = str(error).strip().splitlines() or [repr(error)]
        print(f"{PROG}: error: {lines[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
