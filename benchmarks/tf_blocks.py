"""How long TensorFlow's timed blocks must be for an interleaved slim/full
ratio to agree with each model timed alone (issue #25, TensorFlow at
batch 1).

    .venv/bin/python benchmarks/tf_blocks.py [--rows mobilenetv2_128:0 ...]

Rebuilds plans of `results/latency_target_tensorflow_b1_intel_folded.json`
(`MODEL:ROW`, the row's index in that model's setup) and times each
against its full model in this process, interleaved (`timing.Pair` at
`kc.latency.time_against_full`'s schedule, TensorFlow's median blocks, 2
intra-op threads), `--repeats` times for each block length: about 10 ms
(the library before TensorFlow's `verify_block_ms`: one call of a
MobileNetV2, two of a ResNet-56 after an untimed one), the same with an
untimed call before every block, and at least 50 ms (the library now) and
100 ms. Then
each model's SavedModel alone in processes of its own
(`timing_protocol.retime`, `--processes` each, its `median_ratio`).
Writes `results/tf_blocks.json` with the machine. Run it with nothing
else on the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from keras_csgd.runtimes.tensorflow import set_tf_threads  # noqa: E402

set_tf_threads(2)  # before any TensorFlow op

from cifar10 import command, dump_json, machine  # noqa: E402
from tf_process_state import rebuild, untimed_call_first  # noqa: E402
from timing_protocol import retime  # noqa: E402

from keras_csgd.latency import timing  # noqa: E402
from keras_csgd.latency.verify import VERIFY_TIMING  # noqa: E402

PLANS = os.path.join(HERE, "results",
                     "latency_target_tensorflow_b1_intel_folded.json")
# (name, block in ms, an untimed call also before a one-call block)
BLOCKS = (("10 ms (before)", 10.0, False),
          ("10 ms, an untimed call first", 10.0, True),
          ("50 ms (the library)", 50.0, False), ("100 ms", 100.0, False))


def plan_row(name):
    """`(model, slim model, row)` of `MODEL:ROW`."""
    model_name, index = name.split(":")
    with open(PLANS) as f:
        setup = next(s for s in json.load(f)["setups"]
                     if s["model"] == model_name)
    row = setup["rows"][int(index)]
    model, _, slim = rebuild(model_name, row)
    return model, slim, row


def ratios(model, slim, block_ms, warm, repeats):
    """`repeats` in-process ratios with blocks of about `block_ms` (and,
    where `warm`, an untimed call before every block)."""
    out = []
    with untimed_call_first() if warm else contextlib.nullcontext():
        for _ in range(repeats):
            with timing.Pair(model, "tensorflow", 1, 2, False, **{
                    **VERIFY_TIMING, "block_ms": block_ms}) as pair:
                stats = pair.against(slim)
            out.append({"ratio": stats["ratio"], "calls": pair.calls,
                        "full_ms": stats["first_ms"]})
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", default=[
        "mobilenetv2_128:0", "mobilenetv2_128:1", "resnet56:0"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(
        HERE, "results", "tf_blocks.json"))
    args = parser.parse_args(argv)
    result = {"command": command("tf_blocks.py", argv), "machine": machine(),
              "plans": os.path.relpath(PLANS, HERE), "rows": {}}
    for name in args.rows:
        model, slim, row = plan_row(name)
        out = {"target": row["target"], "blocks": {}}
        for label, block_ms, warm in BLOCKS:
            out["blocks"][label] = ratios(model, slim, block_ms, warm,
                                          args.repeats)
            print(name, label, " ".join(
                f"{r['ratio']:.4f}" for r in out["blocks"][label]),
                flush=True)
        out["alone"] = retime(model, slim, "tensorflow", 1, 2,
                              args.processes)
        print(name, "alone", f"{out['alone']['median_ratio']:.4f}",
              flush=True)
        result["rows"][name] = out
        dump_json(result, args.out)


if __name__ == "__main__":
    main()
