"""Where a quiet machine's timing noise comes from, and what the library's
protocol does against it (issue #25; README, "How keras_csgd times").

    .venv/bin/python benchmarks/timing_noise.py \\
        [--model mobilenetv2_128] [--runtime onnxruntime]

Writes the model's file and uniform slim variants of it
(`kc.methods.magnitude_plan(keep, round_to=8)` at `--keeps`) with the
runtime's `quick_write`, then measures three things, with nothing else
running:

1. `phases`: the full model's file loaded in `--sessions` sessions (or
   interpreters) built in a row in this process, 50 blocks of about 10 ms
   each, then timed alone in `--processes` processes started in a row
   (`timing_protocol.py --alone`, `--seconds` each): the fastest block of
   each and when it started. A machine with slow phases (a shared host)
   shows sessions or processes well above the fastest.
2. `changes`: every variant timed twice against the full model by the
   library's profile protocol (`timing.Pair` with `sweep.PROFILE_TIMING`),
   in two passes. The two passes' disagreement (RMS over variants, as a
   share of the full model's median latency) when a variant's change is
   taken as a difference in ms (`second_ms - first_ms`) and as a ratio
   (`second_ms / first_ms - 1`, what `kc.latency.profile` fits): a slow
   phase scales both models of a pair, so a ratio cancels it and a
   difference does not.
3. `spinning` (ONNX Runtime only): the same pairs (the full model against
   itself `--self-pairs` times, each variant `--variant-pairs` times) with
   the library's session options (thread pools spin within a call and stop
   when it returns, `session.force_spinning_stop`) and with pools that
   never spin (`session.intra_op.allow_spinning` `0`), each model in a
   worker process of its own as the library times: the full model's
   latency and the ratios' mean and standard deviation.

Writes `benchmarks/results/timing_noise_<model>_<runtime>.json` with the
machine and the runtime's versions.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

SPINNING = "TIMING_NOISE_SPINNING"  # set in this script's worker children


def _never_spin() -> None:
    """Makes this process's ONNX Runtime sessions never spin."""
    from keras_csgd.runtimes import onnx

    library = onnx.session_options

    def options(threads=None):
        out = library(threads)
        out.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return out

    onnx.session_options = options


if __name__ == "__main__" and os.environ.get(SPINNING):
    # A timing worker (`keras_csgd.latency.worker`) with other sessions.
    from keras_csgd.latency import worker as _worker

    if os.environ[SPINNING] == "never":
        _never_spin()
    _worker.run(_worker.serve)
    sys.exit(0)

import numpy as np  # noqa: E402
from cifar10 import command, dump_json, machine, write_atomically  # noqa: E402
from timing_protocol import MODELS, spawn_alone  # noqa: E402

import keras_csgd as kc  # noqa: E402
from keras_csgd import runtimes  # noqa: E402
from keras_csgd.latency import timing  # noqa: E402
from keras_csgd.latency.sweep import PROFILE_TIMING  # noqa: E402
from keras_csgd.latency.worker import Worker  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


class SpinningWorker(Worker):
    """A `Worker` whose ONNX Runtime sessions spin as `spinning` says
    (`"within calls"`: the library's options; `"never"`): this script,
    run as its child."""

    module = "timing_noise"

    def __init__(self, spinning, runtime, batch_size, threads):
        saved = dict(os.environ)
        os.environ[SPINNING] = spinning
        os.environ["PYTHONPATH"] = os.pathsep.join(
            filter(None, [HERE, saved.get("PYTHONPATH")]))
        try:
            super().__init__(runtime, batch_size, threads)
        finally:
            os.environ.clear()
            os.environ.update(saved)


def write_files(model, runtime, keeps, folder) -> dict:
    """`{name: path}` of the full model and a slim variant per keep."""
    rt = runtimes.get(runtime)
    paths = {"full": os.path.join(folder, "full" + rt.suffix)}
    rt.quick_write(model, paths["full"])
    for keep in keeps:
        plan = kc.methods.magnitude_plan(model, keep=keep, round_to=8)
        name = f"keep{keep:g}"
        paths[name] = os.path.join(folder, name + rt.suffix)
        rt.quick_write(kc.slim(model, plan), paths[name])
    return paths


def phases(path, runtime, threads, sessions, processes, seconds) -> dict:
    """The full model's file in `sessions` sessions in a row here, then
    alone in `processes` processes in a row."""
    start, out = time.perf_counter(), {"sessions": [], "processes": []}
    for _ in range(sessions):
        at = time.perf_counter() - start
        call = timing.runner(None, runtime, 1, threads, False, path=path)
        calls, rounds = timing.schedule(call, 10.0, 0.0, (25, 25))
        blocks = timing.interleaved(call, call, rounds, calls)
        out["sessions"].append({"started_s": round(at, 1),
                                "fastest_block_ms": float(np.min(blocks))})
        del call
        gc.collect()  # the session's threads and memory
    for _ in range(processes):
        at = time.perf_counter() - start
        row = spawn_alone(path, runtime, 1, threads, seconds)
        out["processes"].append({"started_s": round(at, 1), **row})
    for kind in ("sessions", "processes"):
        fastest = np.array([r["fastest_block_ms"] for r in out[kind]])
        out[f"{kind}_above_1.15x_fastest"] = int(np.sum(
            fastest > timing.SLOW_PHASE * fastest.min()))
    return out


def changes(paths, runtime, threads) -> dict:
    """Each variant twice against the full model (profile protocol):
    the passes' disagreement as differences and as ratios."""
    names = [n for n in paths if n != "full"]
    passes = []
    with timing.Pair(None, runtime, 1, threads, False,
                     PROFILE_TIMING["block_ms"], PROFILE_TIMING["budget_ms"],
                     PROFILE_TIMING["rounds"], path=paths["full"]) as pair:
        for _ in range(2):
            passes.append([pair.against(None, paths[n]) for n in names])
    full = float(np.median([s["first_ms"] for p in passes for s in p]))
    delta = np.array([[s["delta_ms"] for s in p] for p in passes]) / full
    ratio = np.array([[s["ratio"] - 1.0 for s in p] for p in passes])
    rms = {"differences": float(np.sqrt(np.mean((delta[0] - delta[1]) ** 2))),
           "ratios": float(np.sqrt(np.mean((ratio[0] - ratio[1]) ** 2)))}
    return {"variants": names, "full_median_ms": full,
            "passes": passes, "rms_disagreement_share": rms}


def spinning(paths, runtime, threads, self_pairs, variant_pairs) -> dict:
    """Self pairs and variant pairs with each spinning setting."""
    out = {}
    for setting in ("within calls", "never"):
        workers = [SpinningWorker(setting, runtime, 1, threads)
                   for _ in range(2)]
        try:
            full, other = workers
            full.load(paths["full"])
            calls, rounds = timing.schedule(
                full, PROFILE_TIMING["block_ms"],
                PROFILE_TIMING["budget_ms"], PROFILE_TIMING["rounds"])
            row = {"calls": calls, "rounds": rounds, "pairs": {}}
            for name, times in [("full", self_pairs)] + [
                    (n, variant_pairs) for n in paths if n != "full"]:
                other.load(paths[name])
                stats = [timing.fastest_blocks(*timing.interleaved(
                    full, other, rounds, calls)) for _ in range(times)]
                ratios = np.array([s["ratio"] for s in stats])
                row["pairs"][name] = {
                    "ratios": ratios.round(4).tolist(),
                    "mean": float(ratios.mean()),
                    "sd": float(ratios.std(ddof=1)),
                    "full_ms": [round(s["first_ms"], 4) for s in stats]}
            row["full_ms_median"] = float(np.median(
                [ms for p in row["pairs"].values() for ms in p["full_ms"]]))
            out[setting] = row
        finally:
            for worker in workers:
                worker.close()
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--model", default="mobilenetv2_128",
                        choices=list(MODELS))
    parser.add_argument("--runtime", default="onnxruntime",
                        choices=["litert", "litert-int8", "onnxruntime",
                                 "openvino"])
    parser.add_argument("--keeps", type=float, nargs="+",
                        default=[0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sessions", type=int, default=12)
    parser.add_argument("--processes", type=int, default=12)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--self-pairs", type=int, default=12)
    parser.add_argument("--variant-pairs", type=int, default=6)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    out = args.out or os.path.join(
        HERE, "results", f"timing_noise_{args.model}_{args.runtime}.json")
    result = {"command": command("timing_noise.py", argv),
              "machine": machine(), "model": args.model,
              "runtime": args.runtime,
              "versions": timing.versions(args.runtime),
              "threads": args.threads, "profile_timing": PROFILE_TIMING}

    def save():
        write_atomically(out, lambda tmp: dump_json(result, tmp))

    with tempfile.TemporaryDirectory() as folder:
        paths = write_files(MODELS[args.model](), args.runtime, args.keeps,
                            folder)
        result["phases"] = phases(paths["full"], args.runtime, args.threads,
                                  args.sessions, args.processes,
                                  args.seconds)
        for kind in ("sessions", "processes"):
            print(f"phases, {kind}:", [round(r["fastest_block_ms"], 3) for r
                                       in result["phases"][kind]], flush=True)
        save()
        result["changes"] = changes(paths, args.runtime, args.threads)
        print("changes:", result["changes"]["rms_disagreement_share"],
              flush=True)
        save()
        if args.runtime == "onnxruntime":
            result["spinning"] = spinning(paths, args.runtime, args.threads,
                                          args.self_pairs,
                                          args.variant_pairs)
            for setting, row in result["spinning"].items():
                print(f"spinning {setting}: full {row['full_ms_median']:.3f}"
                      " ms;", {n: (round(p["mean"], 4), round(p["sd"], 4))
                               for n, p in row["pairs"].items()}, flush=True)
            save()
    return result


if __name__ == "__main__":
    main()
