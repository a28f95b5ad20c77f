"""Measured speed-up of a slimmed CIFAR ResNet-56 against its MACs ratio.

    .venv/bin/python benchmarks/latency.py [--quick]

The full ResNet-56 (16/32/64) and its slim versions at `--keep 0.625` of
every channel group (`kc.make_plan(..., round_to=r)` for r = None, 4, 8, 16;
`kc.slim`), and one with chosen per-stage widths (`STAGE_WIDTHS`), are timed
in Keras (a compiled `tf.function`, XLA off and on, as built and with
BatchNormalization folded into the convolutions by `kc.fold_batchnorm`) and
in LiteRT (`kc.export_tflite`, float32, interpreter with the default XNNPACK
delegate; the converter folds BN itself), at batch 1 and 64, with
`--threads` threads (TensorFlow intra-op and interpreter). Runs are
interleaved: each round times every (model, runtime, batch) once, a block of
calls each, in an order rotated every round, so slow phases of a shared
machine hit all of them alike; the reported latency is the median over
rounds of each block's median. Weights are random (latency does not depend
on them). Writes `benchmarks/results/latency.json` with the speed-up over
the full model next to the MACs ratio (the speed-up MACs would predict), and
whether the targets (2.0x in LiteRT at batch 1, 1.8x in TensorFlow at batch
64) are met. `--quick` does fewer rounds and calls (noisier).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from cifar10 import command, dump_json, machine, write_atomically  # noqa: E402

import keras_csgd as kc  # noqa: E402
from keras_csgd.latency.timing import time_calls  # noqa: E402
from keras_csgd.models import resnet_cifar  # noqa: E402
from keras_csgd.runtimes import litert  # noqa: E402
from keras_csgd.runtimes.tensorflow import set_tf_threads  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROUND_TO = (None, 4, 8, 16)
BATCHES = (1, 64)
RUNTIMES = (
    "keras", "keras_xla", "keras_folded", "keras_xla_folded", "tflite"
)
TARGETS = {"tflite_batch1": 2.0, "tensorflow_batch64": 1.8}
# Stage widths at about 60% fewer MACs, ((residual), (block-inner)) per
# stage: the early, high-resolution stages are cut harder and stage 3 kept
# wide (small-channel layers at 32x32 are memory-bound, wide ones run near
# peak). Picked as the fastest LiteRT batch-1 variant of seven
# multiple-of-8 candidates between 58% and 63% fewer MACs in a probe run.
STAGE_WIDTHS = {"stages_8-16-48_inner_8-24-48": ((8, 16, 48), (8, 24, 48))}
# (rounds, calls per block at batch 1, calls per block at batch 64)
SETTINGS = {"quick": (5, 20, 5), "full": (9, 50, 10)}


def stage_keep(model, residual, inner) -> dict:
    """`make_plan`'s `keep` dict for given stage widths of a CIFAR ResNet.

    `residual[s]`: width of stage s's residual stream (the group of
    `stem_conv`, `s2b1_2_conv`, `s3b1_2_conv`); `inner[s]`: width of every
    block's first convolution in stage s.
    """
    keep = {}
    for g in kc.channel_groups(model):
        if not g.prunable:
            continue
        stage = 0 if g.name == "stem_conv" else int(g.name[1]) - 1
        width = inner if g.name.endswith("_1_conv") else residual
        keep[g.name] = width[stage] / g.size
    return keep


def variants(keep) -> dict:
    """`{name: model}`: the full ResNet-56 and its slim versions."""
    model = resnet_cifar(56)
    out = {"full": model}
    for r in ROUND_TO:
        plan = kc.make_plan(model, keep=keep, round_to=r)
        out[f"keep{keep:g}_round{r}"] = kc.slim(model, plan)
    for name, widths in STAGE_WIDTHS.items():
        plan = kc.make_plan(model, keep=stage_keep(model, *widths))
        out[name] = kc.slim(model, plan)
    return out


def widths(model) -> dict:
    """Block-inner and stage (residual) widths of each stage."""
    return {
        f"stage{s}": [
            model.get_layer(f"s{s}b1_1_conv").filters,
            model.get_layer(f"s{s}b1_2_conv").filters,
        ]
        for s in (1, 2, 3)
    }


def keras_call(model, x, jit_compile):
    call = tf.function(
        functools.partial(model, training=False), jit_compile=jit_compile
    )
    x = tf.constant(x)
    return lambda: call(x).numpy()


def tflite_call(path, x, threads):
    interpreter = litert.load_interpreter(path, threads)
    litert.set_input(interpreter, x)
    return interpreter.invoke


def callables(models, paths, threads) -> dict:
    """`{(variant, runtime, batch): zero-argument call}`."""
    rng = np.random.default_rng(0)
    inputs = {
        b: rng.uniform(size=(b, 32, 32, 3)).astype(np.float32) for b in BATCHES
    }
    calls = {}
    for name, model in models.items():
        folded = kc.fold_batchnorm(model)
        for b, x in inputs.items():
            for runtime, net in (("keras", model), ("keras_folded", folded)):
                calls[name, runtime, b] = keras_call(net, x, False)
                calls[name, runtime.replace("keras", "keras_xla"), b] = (
                    keras_call(net, x, True)
                )
            calls[name, "tflite", b] = tflite_call(paths[name], x, threads)
    return calls


def interleaved(calls, rounds, runs) -> dict:
    """`{key: [block timings per round]}`; blocks rotate every round.

    Each block is `kc.export`'s timing summary (`median_ms`, `p10_ms`, ...)
    of `runs[batch]` calls after one untimed call.
    """
    for call in calls.values():  # compile and warm up, untimed
        call()
    keys = list(calls)
    blocks = {key: [] for key in keys}
    for r in range(rounds):
        shift = r * len(keys) // rounds
        for key in keys[shift:] + keys[:shift]:
            blocks[key].append(
                time_calls(calls[key], runs[key[2]], warmup=1)
            )
    return blocks


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--keep", type=float, default=0.625)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--out", default=os.path.join(HERE, "results", "latency.json")
    )
    args = parser.parse_args(argv)
    set_tf_threads(args.threads)
    info = machine()
    rounds, runs1, runs64 = SETTINGS["quick" if args.quick else "full"]
    models = variants(args.keep)
    macs = {name: kc.count_macs(m) for name, m in models.items()}
    with tempfile.TemporaryDirectory() as folder:
        exports = {
            name: kc.export_tflite(m, os.path.join(folder, f"{name}.tflite"))
            for name, m in models.items()
        }
        calls = callables(
            models, {n: e.path for n, e in exports.items()}, args.threads
        )
        blocks = interleaved(calls, rounds, {1: runs1, 64: runs64})
    latency = {
        key: float(np.median([b["median_ms"] for b in values]))
        for key, values in blocks.items()
    }
    fastest = {
        key: min(b["p10_ms"] for b in values)
        for key, values in blocks.items()
    }
    rows = []
    for name, model in models.items():
        row = {
            "variant": name,
            "widths": widths(model),
            "macs": macs[name],
            "params": model.count_params(),
            "tflite_bytes": exports[name].size_bytes,
            "macs_speedup": macs["full"] / macs[name],
            "latency_ms": {},
            "speedup": {},
            "latency_p10_ms": {},
            "speedup_p10": {},
        }
        for runtime in RUNTIMES:
            for b in BATCHES:
                key = f"{runtime}_batch{b}"
                row["latency_ms"][key] = round(latency[name, runtime, b], 3)
                row["speedup"][key] = round(
                    latency["full", runtime, b] / latency[name, runtime, b], 3
                )
                row["latency_p10_ms"][key] = round(fastest[name, runtime, b], 3)
                row["speedup_p10"][key] = round(
                    fastest["full", runtime, b] / fastest[name, runtime, b], 3
                )
        rows.append(row)
        print(
            f"{name:22s} MACs x{row['macs_speedup']:.2f}  "
            + "  ".join(f"{k} {v:.2f}x" for k, v in row["speedup"].items())
        )
    slim_rows = rows[1:]
    best = {
        "tflite_batch1": max(r["speedup"]["tflite_batch1"] for r in slim_rows),
        "tensorflow_batch64": max(
            r["speedup"][f"{runtime}_batch64"]
            for r in slim_rows
            for runtime in RUNTIMES
            if runtime.startswith("keras")
        ),
    }
    end_load = [round(v, 2) for v in os.getloadavg()]
    busy = max(info["load_average_at_start"] + end_load) > info["cores"]
    result = {
        "command": command("latency.py", argv),
        "keep": args.keep,
        "threads": args.threads,
        "rounds": rounds,
        "calls_per_block": {"batch1": runs1, "batch64": runs64},
        "statistic": "latency_ms: median over rounds of each interleaved "
        "block's median; latency_p10_ms: the smallest block 10th percentile "
        "(less sensitive to other processes on a shared machine)",
        "rows": rows,
        "targets": {
            key: {"target": target, "best": best[key],
                  "met": bool(best[key] >= target)}
            for key, target in TARGETS.items()
        },
        "machine": {**info, "load_average_at_end": end_load},
        "note": (
            "The machine was shared with other processes (load average "
            f"{info['load_average_at_start']} at start, {end_load} at end, "
            f"{info['cores']} cores): timings are noisy; interleaving "
            "spreads the noise over all variants."
            if busy else None
        ),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_atomically(args.out, lambda tmp: dump_json(result, tmp))
    print(json.dumps(result["targets"], indent=2))
    return result


if __name__ == "__main__":
    main()
