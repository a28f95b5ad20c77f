"""How far apart the profile protocol times two identical models, per
runtime and batch size: the floor under a latency table's fit (issue #25).

    .venv/bin/python benchmarks/identical_pairs.py \\
        [--model resnet56] [--setups tensorflow:1 tensorflow:64 litert:1]

For each setup, in a fresh process (TensorFlow's threads are pinned
before it starts: 2 intra-op, 1 inter-op), the full model is compiled
(or its file written and loaded) once as the reference and `--copies`
more times, and each copy is timed against the reference `--repeats`
times by `kc.latency.profile`'s protocol (`timing.Pair` with
`sweep.PROFILE_TIMING`: interleaved rounds, fastest block medians). Every
ratio would be 1 without noise; their spread is what any variant's
measured change carries. A profile fails its checks when its fit's
residual or its held-out predictions miss by more than 3% of the full
latency (`quality.MAX_ERROR`), so a setup whose identical pairs already
spread by that much cannot fit clean in one measurement. Also the same
ratios from the median of the blocks instead of the fastest.

Writes `benchmarks/results/identical_pairs.json` with the machine.
Run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

HERE = os.path.dirname(os.path.abspath(__file__))
RESULT = os.path.join(HERE, "results", "identical_pairs.json")


def one_setup(model_name, runtime, batch_size, copies, repeats) -> dict:
    """The ratios of one setup, in this process."""
    from keras_csgd.runtimes.tensorflow import set_tf_threads

    set_tf_threads(2)
    import numpy as np
    from timing_protocol import MODELS

    from keras_csgd import runtimes
    from keras_csgd.latency import timing
    from keras_csgd.latency.sweep import PROFILE_TIMING

    model = MODELS[model_name]()
    rt = runtimes.get(runtime)
    with tempfile.TemporaryDirectory() as folder:
        path = None
        if rt.timed_from_file:
            path = os.path.join(folder, "full" + rt.suffix)
            rt.quick_write(model, path)

        def call():
            return timing.runner(model, runtime, batch_size, 2, False,
                                 path=path)

        full = call()
        calls, rounds = timing.schedule(
            full, PROFILE_TIMING["block_ms"], PROFILE_TIMING["budget_ms"],
            PROFILE_TIMING["rounds"])
        fastest, medians, full_ms = [], [], []
        for _ in range(copies):
            copy = call()
            for _ in range(repeats):
                blocks = timing.interleaved(full, copy, rounds, calls)
                first = timing.block_ratio(*blocks, "fastest")
                fastest.append(first["ratio"])
                medians.append(timing.block_ratio(*blocks, "median")["ratio"])
                full_ms.append(first["first_ms"])

    def spread(ratios):
        r = np.array(ratios)
        return {"sd": float(r.std(ddof=1)),
                "rms_from_1": float(np.sqrt(np.mean((r - 1) ** 2))),
                "min": float(r.min()), "max": float(r.max())}

    return {"model": model_name, "runtime": runtime,
            "batch_size": batch_size, "calls_per_block": calls,
            "rounds": rounds, "full_ms_fastest": float(min(full_ms)),
            "copies": copies, "repeats": repeats,
            "fastest_blocks": spread(fastest),
            "block_medians": spread(medians),
            "ratios_fastest": fastest, "ratios_medians": medians}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="resnet56")
    parser.add_argument("--setups", nargs="+",
                        default=["tensorflow:1", "tensorflow:64", "litert:1"],
                        help="runtime:batch_size")
    parser.add_argument("--copies", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=RESULT)
    args = parser.parse_args(argv)
    if args.one:  # a child: one setup, its row as JSON on stdout
        runtime, batch = args.one.split(":")
        row = one_setup(args.model, runtime, int(batch), args.copies,
                        args.repeats)
        print("ROW " + json.dumps(row))
        return
    from cifar10 import command, dump_json, machine, write_atomically

    rows = []
    for setup in args.setups:
        out = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--one", setup,
             "--model", args.model, "--copies", str(args.copies),
             "--repeats", str(args.repeats)],
            capture_output=True, text=True, check=True, cwd=HERE).stdout
        row = json.loads(next(line[4:] for line in out.splitlines()
                              if line.startswith("ROW ")))
        rows.append(row)
        print(setup, "fastest", row["fastest_blocks"], "medians",
              row["block_medians"], flush=True)
    result = {"command": command("identical_pairs.py", argv),
              "machine": machine(), "threads": 2, "rows": rows}
    write_atomically(args.out, lambda tmp: dump_json(result, tmp))


if __name__ == "__main__":
    main()
