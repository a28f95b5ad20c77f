"""`keras-csgd export` and `keras-csgd bench`, on every runtime."""

from __future__ import annotations

import os

import keras_csgd as kc
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


def export_format(args) -> str:
    """`--format`, or `litert-<quantize>` for the older `--quantize`."""
    if args.quantize == "none":
        return args.format
    if args.format != "litert":
        raise CommandError("--quantize applies to --format litert only")
    return f"litert-{args.quantize}"


def cmd_export(args):
    fmt = export_format(args)
    output_path(args.out, kc.runtimes.for_format(fmt).suffix)
    if fmt == "litert-int8" and args.data is None:
        raise CommandError(f"--format {fmt} needs --data (calibration)")
    if args.data is not None and not os.path.exists(args.data):
        raise CommandError(f"--data {args.data!r} does not exist")
    model = load_model(args.model)
    data = load_data(args.data, model)
    result = kc.export(model, args.out, fmt, data=data)
    print(
        f"wrote {result.path} ({fmt}): {result.size_bytes:,} bytes, max "
        f"relative error {result.max_error:.2g} (tolerance "
        f"{result.tolerance:g})"
    )


def cmd_bench(args):
    target = args.model
    if not os.path.isdir(args.model):
        existing_file(args.model, "model")
    if args.model.endswith(".keras"):
        target = load_model(args.model)
    results = kc.benchmark_latency(
        target,
        batch_sizes=args.batch_sizes,
        threads=args.threads,
        runs=args.runs,
        jit_compile=args.jit,
        runtime=args.runtime,
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
        help="export a .keras model for a runtime (LiteRT, ONNX, ...)",
        description="Writes MODEL in --format (Keras's own exporter), "
        "checks its outputs against Keras and writes it atomically.",
    )
    export.add_argument("model", help="input .keras model")
    export.add_argument("--out", required=True,
                        help="output file: .tflite (litert*), .onnx, .xml "
                        "(openvino, with its .bin), a folder (saved_model)")
    export.add_argument("--format", default="litert",
                        choices=tuple(kc.runtimes.FORMATS),
                        help="default litert (float32)")
    export.add_argument("--quantize", default="none",
                        choices=("none", "dynamic", "float16", "int8"),
                        help="LiteRT quantization: the same as --format "
                        "litert-<quantize>")
    export.add_argument("--data", help="inputs for the check and int8 "
                        "calibration: image folder or .npz (x, y); "
                        "required for int8")
    export.set_defaults(func=cmd_export)
    return export


def add_bench(sub):
    bench = sub.add_parser(
        "bench",
        help="time a .keras model on a runtime, or an exported file",
        description="Median and 10th/90th percentile latency per batch "
        "size: a .keras model on --runtime (default tensorflow, a compiled "
        "tf.function), an exported file on its runtime (.tflite LiteRT, "
        ".onnx ONNX Runtime, .xml OpenVINO, a folder a SavedModel).",
    )
    bench.add_argument("model", help=".keras, .tflite, .onnx or .xml file, "
                       "or a SavedModel folder")
    bench.add_argument("--runtime", choices=kc.latency.RUNTIMES,
                       help="the runtime (default: tensorflow for .keras, "
                       "the file's own otherwise)")
    bench.add_argument("--batch-sizes", type=batch_sizes, default=(1, 64),
                       help="comma-separated (default 1,64)")
    bench.add_argument("--threads", type=positive_int, default=2)
    bench.add_argument("--runs", type=positive_int, default=50)
    bench.add_argument("--jit", action="store_true",
                       help="XLA-compile the Keras function")
    bench.set_defaults(func=cmd_bench)
    return bench
