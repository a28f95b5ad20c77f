"""`keras-csgd export`, `bench` and `profile`, on every runtime."""

from __future__ import annotations

import os

import keras_csgd as kc
from keras_csgd.cli.common import (
    CommandError,
    add_runtime,
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


def cmd_profile(args):
    model = load_model(args.model)
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
    where = table.fields.get("machine") or {}
    if where:
        print(f"machine: {where.get('cpu')}, {where.get('cores')} cores, "
              f"SIMD {' '.join(where.get('simd', [])) or 'unknown'}")
    print(format_table(rows))


def add_profile(sub):
    profile = sub.add_parser(
        "profile",
        help="measure each group's and block's share of the latency",
        description="Profiles MODEL on --runtime on this machine (slim "
        "variants timed against the full model, interleaved; cached under "
        "~/.cache/keras_csgd/latency or $KERAS_CSGD_CACHE) and prints each "
        "prunable group's and removable block's share of the latency.",
    )
    profile.add_argument("model", help="input .keras model")
    add_runtime(profile)
    profile.set_defaults(func=cmd_profile)
    return profile
