"""XLA or not for the TensorFlow runtime: full-model inference latency.

    .venv/bin/python benchmarks/xla_cpu.py [--threads 2] [--batch-size 64]

Times a CIFAR ResNet-56 and keras.applications MobileNetV2 (128x128,
random weights) as `kc.latency.timing.runner(..., "tensorflow")` calls
(BatchNormalization folded, `tf.function`) with `jit_compile=True` and
`False`, interleaved (`kc.latency.timing.interleaved`, fastest block
medians). This is the measurement behind `jit_compile="auto"` (XLA only
where TensorFlow has a GPU). Writes `benchmarks/results/xla_cpu.json` with
the machine (CPU model, SIMD flags, cores).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
from cifar10 import dump_json, machine, write_atomically  # noqa: E402

import keras_csgd as kc  # noqa: E402
from keras_csgd.latency import timing  # noqa: E402
from keras_csgd.runtimes.tensorflow import set_tf_threads  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = {
    "resnet56": lambda: kc.models.resnet_cifar(56),
    "mobilenetv2_128": lambda: keras.applications.MobileNetV2(
        input_shape=(128, 128, 3), weights=None
    ),
}


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=os.path.join(HERE, "results",
                                                      "xla_cpu.json"))
    args = parser.parse_args(argv)
    set_tf_threads(args.threads)
    result = {
        "command": "python benchmarks/xla_cpu.py", "threads": args.threads,
        "batch_size": args.batch_size, "machine": machine(),
        "statistic": "fastest block median over interleaved rounds "
        "(blocks of one call)", "models": {},
    }
    for name, build in MODELS.items():
        model = build()
        xla, graph = (
            timing.runner(model, "tensorflow", args.batch_size, args.threads,
                          jit_compile=jit)
            for jit in (True, False)
        )
        stats = timing.fastest_blocks(
            *timing.interleaved(xla, graph, args.rounds, 1)
        )
        result["models"][name] = {
            "xla_ms": stats["first_ms"], "no_xla_ms": stats["second_ms"],
            "xla_over_no_xla": stats["first_ms"] / stats["second_ms"],
        }
        print(name, result["models"][name], flush=True)
    write_atomically(args.out, lambda tmp: dump_json(result, tmp))
    return result


if __name__ == "__main__":
    main()
