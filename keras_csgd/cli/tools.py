"""`keras-csgd export` and `keras-csgd bench`."""

from __future__ import annotations

import os

import keras_csgd as kc
from keras_csgd import export as kexport
from keras_csgd.cli.common import (
    CommandError,
    batch_sizes,
    existing_file,
    format_table,
    load_data,
    load_model,
    output_path,
    positive_int,
)


def cmd_export(args):
    output_path(args.out, ".tflite")
    quantize = None if args.quantize == "none" else args.quantize
    if quantize == "int8" and args.data is None:
        raise CommandError("--quantize int8 needs --data (calibration)")
    if args.data is not None and not os.path.exists(args.data):
        raise CommandError(f"--data {args.data!r} does not exist")
    model = load_model(args.model)
    data = load_data(args.data, model)
    result = kc.export_tflite(
        model, args.out, quantize=quantize, representative_data=data
    )
    print(
        f"wrote {result.path}: {result.size_bytes:,} bytes, max relative "
        f"error {result.max_error:.2g} (tolerance "
        f"{kexport.TOLERANCES[quantize]:g})"
    )


def cmd_bench(args):
    existing_file(args.model, "model")
    target = args.model
    if not args.model.endswith(".tflite"):
        target = load_model(args.model)
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
    print(format_table(rows))


def add_export(sub):
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


def add_bench(sub):
    bench = sub.add_parser(
        "bench",
        help="time a .keras or .tflite model",
        description="Median and 10th/90th percentile latency per batch "
        "size (Keras through a compiled tf.function, TFLite through the "
        "interpreter).",
    )
    bench.add_argument("model", help=".keras or .tflite file")
    bench.add_argument("--batch-sizes", type=batch_sizes, default=(1, 64),
                       help="comma-separated (default 1,64)")
    bench.add_argument("--threads", type=positive_int, default=2)
    bench.add_argument("--runs", type=positive_int, default=50)
    bench.add_argument("--jit", action="store_true",
                       help="XLA-compile the Keras function")
    bench.set_defaults(func=cmd_bench)
    return bench
