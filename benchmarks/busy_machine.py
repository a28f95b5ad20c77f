"""A latency plan made on a busy machine, re-timed on a quiet one.

    .venv/bin/python benchmarks/busy_machine.py [--target 0.5] \\
        [--runtime litert] [--size 96]

Issue #25's check that profiles survive a busy machine: a keras.applications
MobileNetV2 (`--size` x `--size`, random weights: latency does not depend
on them) is pruned by the flagship command,

    keras-csgd prune mobilenetv2.keras --method magnitude --latency 0.5 \\
        --runtime litert --batch-size 1 --out slim.keras

with a cold latency cache (a fresh `KERAS_CSGD_CACHE`) while one other
CPU-bound process spins at the lowest priority (`nice 19`) on the same
cores. The spinner is then stopped, and the written slim model is re-timed
against the full one with each exported file alone in its own process
(`timing_protocol.retime`). Run it with nothing else on the machine: the
re-timing is the measurement. Writes
`benchmarks/results/busy_machine.json` with the machine, the command's
output (its profile's self-checks and verified ratio) and the quiet
ratio; the target holds when that ratio is at most `target * 1.05`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
from cifar10 import command, dump_json, machine, write_atomically  # noqa: E402
from timing_protocol import retime  # noqa: E402

from keras_csgd.latency.target import TOLERANCE  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SPIN = "while True: pass"


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--runtime", default="litert")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(
        HERE, "results", "busy_machine.json"))
    args = parser.parse_args(argv)
    result = {"command": command("busy_machine.py", argv),
              "machine": machine(), "target": args.target,
              "runtime": args.runtime, "size": args.size}
    with tempfile.TemporaryDirectory() as folder:
        full_path = os.path.join(folder, "mobilenetv2.keras")
        slim_path = os.path.join(folder, "slim.keras")
        keras.applications.MobileNetV2(
            input_shape=(args.size, args.size, 3), weights=None
        ).save(full_path)
        cli = [sys.executable, "-m", "keras_csgd.cli", "prune", full_path,
               "--method", "magnitude", "--latency", f"{args.target:g}",
               "--runtime", args.runtime, "--batch-size", "1", "--threads",
               str(args.threads), "--out", slim_path]
        env = {**os.environ,
               "KERAS_CSGD_CACHE": os.path.join(folder, "cache")}
        spinner = subprocess.Popen(["nice", "-n", "19", sys.executable,
                                    "-c", SPIN])
        start = time.perf_counter()
        try:
            proc = subprocess.run(cli, capture_output=True, text=True,
                                  env=env)
        finally:
            spinner.kill()
            spinner.wait()
        result["busy"] = {
            "command": " ".join(cli[2:]),
            "returncode": proc.returncode,
            "stdout": proc.stdout.strip().splitlines(),
            "stderr_tail": proc.stderr.strip().splitlines()[-5:],
            "seconds": round(time.perf_counter() - start, 1),
        }
        print("\n".join(result["busy"]["stdout"]), flush=True)
        if proc.returncode == 0:
            full, slim = (keras.saving.load_model(p)
                          for p in (full_path, slim_path))
            quiet = retime(full, slim, args.runtime, 1, args.threads)
            result["quiet"] = quiet
            result["target_met"] = quiet["ratio"] <= args.target * (
                1 + TOLERANCE)
            verdict = "met" if result["target_met"] else "missed"
            print(f"quiet, each file alone in its own process: full "
                  f"{quiet['full_ms']:.3f} ms, slim {quiet['slim_ms']:.3f} "
                  f"ms, ratio {quiet['ratio']:.3f} (target "
                  f"{args.target:g}: {verdict})")
    write_atomically(args.out, lambda tmp: dump_json(result, tmp))


if __name__ == "__main__":
    main()
