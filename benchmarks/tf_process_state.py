"""Whether a process that profiled TensorFlow variants still times a
slim/full pair as a fresh one does (issue #25, TensorFlow at batch 1).

    .venv/bin/python benchmarks/tf_process_state.py [--variants 60]

`latency_target.py` found a MobileNetV2 plan (128x128, target 0.7) that
the library verified at 0.689 re-time at 0.603 with each SavedModel alone
in its own process. This script rebuilds that plan from
`results/latency_target_tensorflow_b1_intel.json` and times it against
the full model with `kc.latency.time_against_full` (TensorFlow's median
blocks, 2 intra-op threads) `--repeats` times in each state of one
process: fresh (also with one untimed call before every block, where
the library has none for blocks of one call, and with both models'
SavedModels loaded in this process instead of compiled Keras calls);
after building, compiling and calling `--variants`
profile variants (`kc.latency.profile`'s design, slimmed from the
BN-folded model) that stay alive; after dropping them; after
`gc.collect()`. Then each model's SavedModel alone in processes of its
own (`timing_protocol.retime`, `--processes` each). Writes
`results/tf_process_state.json` with the machine. Run it with nothing
else on the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from keras_csgd.runtimes.tensorflow import set_tf_threads  # noqa: E402

set_tf_threads(2)  # before any TensorFlow op

import numpy as np  # noqa: E402
from cifar10 import command, dump_json, machine  # noqa: E402
from timing_protocol import MODELS, retime  # noqa: E402

import keras_csgd as kc  # noqa: E402
from keras_csgd import graph, latency, runtimes  # noqa: E402
from keras_csgd.latency import design, timing  # noqa: E402
from keras_csgd.latency.profile import _Design  # noqa: E402
from keras_csgd.latency.verify import VERIFY_TIMING  # noqa: E402

PLANS = os.path.join(HERE, "results", "latency_target_tensorflow_b1_intel.json")


def rebuild(model_name, row):
    """`(model, its analysis, slim model)` of a `latency_target.py` row's
    plan (its widths and removed blocks)."""
    model = MODELS[model_name]()
    an = graph.analyze(model)
    plan = design.width_plan(
        model, an, {g: w[0] for g, w in row["widths"].items()},
        row["remove_blocks"])
    return model, an, kc.slim(model, plan, check=False)


@contextlib.contextmanager
def untimed_call_first():
    """Within it, `timing.interleaved` makes at least one untimed call
    before every block (the library has none before a block of one
    call)."""
    block_timer = timing.block_timer

    def warm(call):
        block = block_timer(call)
        return lambda calls, warmup: block(calls, max(warmup, 1))

    timing.block_timer = warm
    try:
        yield
    finally:
        timing.block_timer = block_timer


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--processes", type=int, default=5)
    parser.add_argument("--out", default=os.path.join(
        HERE, "results", "tf_process_state.json"))
    args = parser.parse_args(argv)
    with open(PLANS) as f:
        setup = json.load(f)["setups"][1]
    row = setup["rows"][0]
    model, an, slim = rebuild(setup["model"], row)
    result = {"command": command("tf_process_state.py", argv),
              "machine": machine(), "model": setup["model"],
              "target": row["target"],
              "library_ratio_after_profile": row["measured_ratio"],
              "states": {}}

    def record(state, ratios):
        result["states"][state] = ratios
        print(state, " ".join(f"{r:.4f}" for r in ratios), flush=True)

    def timed(state):
        record(state, [latency.time_against_full(
            model, slim, "tensorflow", 1, threads=2)[2]
            for _ in range(args.repeats)])

    def timed_files(state):
        with tempfile.TemporaryDirectory() as folder:
            paths = [kc.export(m, os.path.join(folder, name),
                               "saved_model").path
                     for name, m in (("full", model), ("slim", slim))]
            ratios = []
            for _ in range(args.repeats):
                with timing.Pair(model, "tensorflow", 1, 2, False,
                                 **VERIFY_TIMING, path=paths[0]) as pair:
                    ratios.append(pair.against(None, paths[1])["ratio"])
        record(state, ratios)

    timed("fresh")
    with untimed_call_first():
        timed("fresh, one untimed call before every block")
    timed_files("fresh, both SavedModels loaded in this process")
    rt = runtimes.get("tensorflow")
    served = rt.served(model)
    served_an = graph.analyze(served)
    work = _Design(model, an, design.prunable_groups(model, an),
                   design.GRID, 16).work[:args.variants]
    x = np.zeros((1, *model.input_shape[1:]), np.float32)
    calls = []
    for widths, removed in work:
        call = rt.compile(design.variant(served, served_an, widths,
                                         removed)).bind(x)
        for _ in range(20):
            call()
        calls.append(call)
    timed(f"{len(calls)} variants alive")
    calls = call = None
    timed("variants dropped")
    gc.collect()
    timed("after gc.collect")
    separate = retime(model, slim, "tensorflow", 1, 2, args.processes)
    result["separate_processes"] = separate
    print("separate processes: median ratio "
          f"{separate['median_ratio']:.4f}", flush=True)
    dump_json(result, args.out)


if __name__ == "__main__":
    main()
