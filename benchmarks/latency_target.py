"""Latency-targeted pruning: measured latency against the target.

    .venv/bin/python benchmarks/latency_target.py [--quick] [--setups ...]

For a CIFAR ResNet-56 and keras.applications MobileNetV2 (128x128, random
weights: latency does not depend on them), on every runtime: LiteRT float32
and full-integer int8, ONNX Runtime and OpenVINO at batch 1, TensorFlow at
batch 1 and 64 (BN folded; XLA only where there is a GPU,
`jit_compile="auto"`: XLA's CPU kernels are slower, see
`kc.runtimes.tensorflow.xla`), with
`--threads` threads: the latency table is profiled with a cold cache
(`kc.latency.profile`, its time and self-checks recorded), then for each
target 0.7, 0.5 and 0.35 of the full latency `kc.plan_for_latency` plans
and verifies (slim vs full, interleaved), and the two exported files are
re-timed each alone in its own process (`timing_protocol.retime`). Next to
each, the uniform plan (`kc.methods.magnitude_plan(keep, round_to=8)`) that
measures the latency plan's measured ratio is searched (the table's guess,
then secant steps on measured ratios, never timing the same widths twice:
up to `--uniform-tries` timings, 4 by default, 0 skips it) and reported
with the importance (L1 filter norms, see `kc.latency.kept_importance`)
each keeps. Writes
`benchmarks/results/latency_target[_quick].json` with the machine (CPU
model, SIMD flags, cores), the runtimes' versions and the load average,
after every model and runtime. `--quick` verifies at most 4 plans (else 6).
`--smoke` only checks that the script runs (ResNet-20, one target, a
one-width grid, one round per variant; its numbers mean nothing).
The accuracy row of issue #13 (ResNet-20, CIFAR quick) is
`benchmarks/latency_accuracy.py`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
from cifar10 import command, dump_json, machine, write_atomically  # noqa: E402
from timing_protocol import MODELS, retime  # noqa: E402

import keras_csgd as kc  # noqa: E402
from keras_csgd import latency  # noqa: E402
from keras_csgd.clusters import target_width  # noqa: E402
from keras_csgd.latency.target import corrected_ratio  # noqa: E402
from keras_csgd.runtimes.tensorflow import set_tf_threads, xla  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
TARGETS = (0.7, 0.5, 0.35)
SETUPS = {"litert_b1": ("litert", 1), "litert-int8_b1": ("litert-int8", 1),
          "onnxruntime_b1": ("onnxruntime", 1), "openvino_b1": ("openvino", 1),
          "tensorflow_b1": ("tensorflow", 1),
          "tensorflow_b64": ("tensorflow", 64)}
# `timing_protocol.retime`'s ratio for each `Runtime.block_statistic`.
SEPARATE_RATIO = {"fastest": "ratio", "median": "median_ratio"}


def uniform_widths(table, keep) -> dict:
    return {n: target_width(g["size"], keep, 8)
            for n, g in table.groups.items()}


def uniform_keep(table, ms) -> float:
    """The `keep` whose uniform round_to=8 plan is predicted nearest `ms`."""
    keeps = np.round(np.arange(0.05, 1.0001, 0.005), 3)
    predicted = [table.predict(uniform_widths(table, k)) for k in keeps]
    return float(keeps[int(np.argmin(np.abs(np.array(predicted) - ms)))])


def time_uniform(model, keep, setup, threads) -> dict:
    runtime, batch = setup
    plan = kc.methods.magnitude_plan(model, keep=keep, round_to=8)
    full_ms, slim_ms, ratio = latency.time_against_full(
        model, kc.slim(model, plan), runtime, batch, threads=threads
    )
    return {
        "keep": keep, "measured_ratio": ratio, "full_ms": full_ms,
        "slim_ms": slim_ms,
        "macs_ratio": kc.macs_under(model, plan) / kc.count_macs(model),
        "kept_importance": latency.kept_importance(model, plan),
    }


def untimed_keep(table, keep, timed, upward) -> float | None:
    """`keep`, or the nearest keep past it (up or down) whose round_to=8
    widths none of `timed` has (nearby keeps round to the same widths, and
    timing one plan twice measures only noise); None past the bounds."""
    seen = [uniform_widths(table, t["keep"]) for t in timed]
    while 0.05 <= keep <= 1.0:
        if uniform_widths(table, keep) not in seen:
            return keep
        keep = round(keep + (0.005 if upward else -0.005), 3)
    return None


def uniform_row(model, table, measured_ratio, setup, threads, tries):
    """The uniform round_to=8 plan that measures nearest `measured_ratio`.

    The first `keep` is the table's guess; then secant steps on the
    measured ratios against `keep` (with the full model at `keep=1`,
    `kc.latency.target.corrected_ratio`), each moved on to the first keep
    with widths not yet timed, `tries` timings in all; the timing nearest
    `measured_ratio` is kept, and every timing listed.
    """
    keep = uniform_keep(table, measured_ratio * table.full)
    timed = []
    for _ in range(tries):
        timed.append(time_uniform(model, keep, setup, threads))
        keep = corrected_ratio(
            [(t["keep"], t["measured_ratio"]) for t in timed], measured_ratio
        )
        keep = untimed_keep(
            table, float(np.clip(round(keep, 3), 0.05, 1.0)), timed,
            upward=timed[-1]["measured_ratio"] < measured_ratio,
        )
        if keep is None:
            break
    best = min(timed, key=lambda t: abs(t["measured_ratio"] - measured_ratio))
    return {**best, "timed_keeps": timed}


def run_setup(name, setup, args):
    model = MODELS[name]()
    runtime, batch = setup
    smoke = {"grid": (0.5,), "rounds": 1} if args.smoke else {}
    with tempfile.TemporaryDirectory() as cold:
        start = time.perf_counter()
        table = latency.profile(
            model, runtime, batch, threads=args.threads, cache_dir=cold,
            verbose=1, **smoke,
        )
        seconds = time.perf_counter() - start
    rows = []
    for target in args.targets:
        row = {"target": target}
        try:
            plan, report = kc.plan_for_latency(
                model, target, runtime, batch, table=table,
                threads=args.threads,
                max_iterations=1 if args.smoke else 4 if args.quick else 6,
                return_report=True, verbose=0,
            )
        except ValueError as e:
            row["error"] = str(e)
            rows.append(row)
            continue
        row.update(
            predicted_ratio=report.predicted_ratio,
            measured_ratio=report.measured_ratio,
            measured_over_target=report.measured_ratio / target,
            met=report.met, full_ms=report.full_ms, slim_ms=report.slim_ms,
            macs_ratio=report.macs[1] / report.macs[0],
            params_ratio=report.params[1] / report.params[0],
            kept_importance=report.kept_importance,
            remove_blocks=report.remove_blocks,
            widths=report.widths, iterations=report.iterations,
            reason=report.reason,
        )
        row["separate_processes"] = retime(
            model, kc.slim(model, plan), runtime, batch, args.threads,
            processes=1 if args.smoke else 3,
            seconds=0.5 if args.smoke else 3.0)
        # Compared by the runtime's statistic, as the library compares:
        # fastest blocks, or (TensorFlow) median calls.
        separate = row["separate_processes"][SEPARATE_RATIO[
            kc.runtimes.get(runtime).block_statistic]]
        row["separate_minus_library"] = separate - report.measured_ratio
        line = (f"{name} {runtime} b{batch} target {target}: {report}; "
                f"re-timed in separate processes {separate:.3f}")
        if args.uniform_tries:
            uniform = row["uniform_round_to_8"] = uniform_row(
                model, table, report.measured_ratio, setup, args.threads,
                tries=1 if args.smoke else args.uniform_tries,
            )
            line += (f"; uniform keep {uniform['keep']} measures "
                     f"{uniform['measured_ratio']:.3f}, importance "
                     f"{report.kept_importance:.3f} vs "
                     f"{uniform['kept_importance']:.3f}")
        print(line, flush=True)
        rows.append(row)
    return {
        "model": name, "runtime": runtime, "batch_size": batch,
        "xla": xla("auto") if runtime == "tensorflow" else None,
        "versions": table.fields["versions"],
        "full_ms_table": table.full,
        "fit_rms_ms": table.fields.get("fit_rms_ms"),
        "checks": table.fields["checks"],
        "profile_seconds_cold_cache": round(seconds, 1),
        "groups": len(table.groups), "blocks": len(table.blocks),
        "rows": rows,
    }


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True,
                              text=True).stdout.strip()
    except OSError:
        return ""


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", nargs="+", choices=list(MODELS),
                        help="default resnet56 mobilenetv2_128 (--smoke: "
                        "resnet20)")
    parser.add_argument("--setups", nargs="+", choices=list(SETUPS),
                        default=list(SETUPS))
    parser.add_argument("--uniform-tries", type=int, default=4,
                        help="timings of the uniform plan search per "
                        "target (0: no uniform row)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    args.targets = TARGETS[1:2] if args.smoke else TARGETS
    args.models = args.models or (
        ["resnet20"] if args.smoke else ["resnet56", "mobilenetv2_128"])
    out = args.out or os.path.join(
        HERE, "results",
        "latency_target_quick.json" if args.quick else "latency_target.json",
    )
    set_tf_threads(args.threads)
    result = {
        "command": command("latency_target.py", argv),
        "threads": args.threads, "targets": list(args.targets),
        "machine": machine(),
        "uptime_at_start": uptime(),
        "statistic": "full_ms, slim_ms: fastest block median of each over "
        "interleaved rounds (one run; kc.latency.timing.block_ratio), the "
        "median block on TensorFlow (Runtime.block_statistic); "
        "measured_ratio: slim_ms / full_ms; predicted_ratio: the latency "
        "table's prediction; separate_processes: each exported file timed "
        "alone in its own process (benchmarks/timing_protocol.py), "
        "separate_minus_library comparing its ratio by the same statistic",
        "accuracy_row": "benchmarks/latency_accuracy.py",
        "setups": [],
    }
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    for name in args.models:
        for setup in args.setups:
            result["setups"].append(run_setup(name, SETUPS[setup], args))
            result["uptime_at_end"] = uptime()
            load = max(os.getloadavg())
            result["note"] = (
                f"Shared machine: load average up to {load:.1f} on "
                f"{result['machine']['cores']} cores while it ran; timings "
                "are noisy (and multi-threaded timings bimodal: a call is "
                "about 2x slower whenever another process holds a core)."
                if load > result["machine"]["cores"] else None
            )
            write_atomically(out, lambda tmp: dump_json(result, tmp))
    return result


if __name__ == "__main__":
    main()
