"""The library's timing protocol against separate-process timing.

    .venv/bin/python benchmarks/timing_protocol.py [--quick] \\
        [--models resnet56 mobilenetv2_128] [--runtimes litert ...]

`kc.latency.time_against_full` (what `plan_for_latency` verifies with)
times a slim model against the full one, interleaved: rounds of blocks of
calls, alternating which model goes first, each model's latency its
fastest block median (README, "How keras_csgd times"); each model is
timed in this process (LiteRT, TensorFlow), or in a worker process of its
own (`Runtime.separate_process`: ONNX Runtime, OpenVINO). The JSON records
which, with the runtime's session settings (`"protocol"`). Here each
exported file (`kc.export`) is also timed alone, in a
process of its own (this script with `--alone FILE`): load, warm up, then
blocks of calls for `--seconds`, reporting the fastest block median and the
median of every call. Full and slim processes alternate, `--processes`
each; each file's latency is its fastest over its processes. For uniform
slim models (`kc.methods.magnitude_plan(keep, round_to=8)` at `--keeps`)
of each model on each runtime, the JSON lists both slim/full ratios and
their difference; issue #25 asks for agreement within 0.05. Writes
`benchmarks/results/timing_protocol[_quick].json` with the machine and the
runtimes' versions. `retime` is what `latency_target.py` re-times with.

    .venv/bin/python benchmarks/timing_protocol.py --pair FULL.keras \
        SLIM.keras --runtime litert [--batch-size 1]

re-times one pair (e.g. what `keras-csgd prune --latency` wrote on a busy
machine, on a quiet one) both ways and prints the ratios as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from cifar10 import command, dump_json, machine, write_atomically  # noqa: E402

import keras_csgd as kc  # noqa: E402
from keras_csgd import latency, runtimes  # noqa: E402
from keras_csgd.latency import timing  # noqa: E402
from keras_csgd.runtimes.base import uniform  # noqa: E402
from keras_csgd.runtimes.onnx import session_options  # noqa: E402
from keras_csgd.runtimes.openvino import cpu_config  # noqa: E402
from keras_csgd.runtimes.tensorflow import set_tf_threads  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = {
    "resnet20": lambda: kc.models.resnet_cifar(20),
    "resnet56": lambda: kc.models.resnet_cifar(56),
    "mobilenetv2_128": lambda: keras.applications.MobileNetV2(
        input_shape=(128, 128, 3), weights=None
    ),
}
SETUPS = {"litert": 1, "litert-int8": 1, "onnxruntime": 1, "openvino": 1,
          "tensorflow": 64}
BLOCK_MS = 10.0


def alone(path, runtime, batch_size, threads, seconds) -> dict:
    """Times one exported file in this process: 10 warm-up calls, then
    blocks of about `BLOCK_MS` for `seconds`."""
    if runtime == "tensorflow":
        set_tf_threads(threads)
    program = runtimes.get(runtime).load(path, threads)
    call = program.bind(uniform((batch_size, *program.input_shape)))
    for _ in range(10):
        call()
    ms = timing.time_calls(call, runs=5, warmup=0)["median_ms"]
    calls = int(np.clip(round(BLOCK_MS / ms), 1, 200))
    blocks, times, end = [], [], time.perf_counter() + seconds
    while time.perf_counter() < end or len(blocks) < 3:
        block = []
        for _ in range(calls):
            start = time.perf_counter()
            call()
            block.append((time.perf_counter() - start) * 1e3)
        blocks.append(float(np.median(block)))
        times += block
    return {"fastest_block_ms": min(blocks),
            "median_ms": float(np.median(times)), "calls": len(times)}


def spawn_alone(path, runtime, batch_size, threads, seconds) -> dict:
    argv = [sys.executable, os.path.abspath(__file__), "--alone", path,
            "--runtime", runtime, "--batch-size", str(batch_size),
            "--threads", str(threads), "--seconds", str(seconds)]
    done = subprocess.run(argv, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def retime(model, slim, runtime, batch_size, threads, processes=3,
           seconds=3.0) -> dict:
    """Slim against full, each exported file alone in its own process.

    Returns:
        `{"full_ms", "slim_ms", "ratio"}` (fastest block medians, fastest
        over processes) and `"median_ratio"` (the ratio of the median
        calls, likewise), with every process's numbers.
    """
    fmt = runtimes.get(runtime).format
    suffix = runtimes.get(runtime).suffix
    out = {"full": [], "slim": []}
    with tempfile.TemporaryDirectory() as folder:
        paths = {name: kc.export(m, os.path.join(folder, name + suffix),
                                 fmt).path
                 for name, m in (("full", model), ("slim", slim))}
        for k in range(processes):
            for name in (("full", "slim") if k % 2 == 0
                         else ("slim", "full")):
                out[name].append(spawn_alone(paths[name], runtime,
                                             batch_size, threads, seconds))
    best = {n: min(r["fastest_block_ms"] for r in rs)
            for n, rs in out.items()}
    median = {n: min(r["median_ms"] for r in rs) for n, rs in out.items()}
    return {"full_ms": best["full"], "slim_ms": best["slim"],
            "ratio": best["slim"] / best["full"],
            "median_ratio": median["slim"] / median["full"],
            "processes": out}


def protocol(runtime, threads) -> dict:
    """How the library times on `runtime`: in this process or a worker
    process per model, and the session settings ONNX Runtime and OpenVINO
    load files with."""
    out = {"separate_process": runtimes.get(runtime).separate_process}
    if runtime == "onnxruntime":
        options = session_options(threads)
        out["session_options"] = {
            "intra_op_num_threads": options.intra_op_num_threads,
            "inter_op_num_threads": options.inter_op_num_threads,
            "execution_mode": str(options.execution_mode),
            "graph_optimization_level": str(
                options.graph_optimization_level),
            "session.force_spinning_stop": options.get_session_config_entry(
                "session.force_spinning_stop")}
    elif runtime == "openvino":
        out["cpu_config"] = cpu_config(threads)
    return out


def compare(name, runtime, args) -> dict:
    """In-process against separate-process ratios of uniform slim models."""
    model = MODELS[name]()
    batch = SETUPS[runtime]
    rows = []
    for keep in args.keeps:
        plan = kc.methods.magnitude_plan(model, keep=keep, round_to=8)
        slim = kc.slim(model, plan)
        full_ms, slim_ms, ratio = latency.time_against_full(
            model, slim, runtime, batch, threads=args.threads)
        separate = retime(model, slim, runtime, batch, args.threads,
                          args.processes, args.seconds)
        row = {"keep": keep, "in_process": {
            "full_ms": full_ms, "slim_ms": slim_ms, "ratio": ratio},
            "separate": separate,
            "difference": separate["ratio"] - ratio,
            "agrees": abs(separate["ratio"] - ratio) <= 0.05}
        print(f"{name} {runtime} b{batch} keep {keep}: in process "
              f"{ratio:.3f}, separate {separate['ratio']:.3f} (medians "
              f"{separate['median_ratio']:.3f})", flush=True)
        rows.append(row)
    return {"model": name, "runtime": runtime, "batch_size": batch,
            "versions": timing.versions(runtime),
            "protocol": protocol(runtime, args.threads), "rows": rows}


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--alone", help=argparse.SUPPRESS)
    parser.add_argument("--pair", nargs=2, metavar=("FULL", "SLIM"),
                        help="two .keras models to re-time on --runtime")
    parser.add_argument("--runtime", default="litert",
                        choices=list(runtimes.RUNTIMES))
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--quick", action="store_true",
                        help="one keep (0.5), 2 processes of 2 s")
    parser.add_argument("--models", nargs="+", choices=list(MODELS),
                        default=["resnet56", "mobilenetv2_128"])
    parser.add_argument("--runtimes", nargs="+", choices=list(SETUPS),
                        default=list(SETUPS))
    parser.add_argument("--keeps", type=float, nargs="+",
                        default=[0.75, 0.5, 0.35])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.alone:
        print(json.dumps(alone(args.alone, args.runtime, args.batch_size,
                               args.threads, args.seconds)))
        return None
    set_tf_threads(args.threads)
    if args.pair:
        full, slim = (keras.saving.load_model(p) for p in args.pair)
        in_process = latency.time_against_full(
            full, slim, args.runtime, args.batch_size, threads=args.threads)
        separate = retime(full, slim, args.runtime, args.batch_size,
                          args.threads, args.processes, args.seconds)
        print(json.dumps({"in_process_ratio": in_process[2],
                          "separate_ratio": separate["ratio"],
                          "separate_median_ratio": separate["median_ratio"],
                          "machine": machine()}, indent=1))
        return None
    if args.quick:
        args.keeps, args.processes, args.seconds = [0.5], 2, 2.0
    out = args.out or os.path.join(
        HERE, "results",
        "timing_protocol_quick.json" if args.quick else "timing_protocol.json")
    result = {"command": command("timing_protocol.py", argv),
              "threads": args.threads, "machine": machine(),
              "processes": args.processes, "seconds": args.seconds,
              "setups": []}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    for name in args.models:
        for runtime in args.runtimes:
            result["setups"].append(compare(name, runtime, args))
            result["all_agree"] = all(
                r["agrees"] for s in result["setups"] for r in s["rows"])
            write_atomically(out, lambda tmp: dump_json(result, tmp))
    return result


if __name__ == "__main__":
    main()
