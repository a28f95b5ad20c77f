"""Timing a runtime's files in a process of their own.

For runtimes with `Runtime.separate_process` (ONNX Runtime, OpenVINO), two
models loaded in one process and timed in turn ran differently from each
alone in a process (see `keras_csgd.runtimes.onnx`). A `Worker` is a child
Python process that loads one file at a time with its runtime and, on
request, times a block of calls there: the parent's interleaved rounds
(`timing.interleaved`) then time each model as it runs alone, while the
parent and the other worker wait in a pipe read. Requests and replies are
JSON lines on the child's stdin and on a copy of its original stdout;
anything else the child prints goes to stderr (`Child` and `run`, which
`keras_csgd.latency.writers` shares).

    python -m keras_csgd.latency.worker
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys


class Child:
    """A child Python process running `python -m module`, asked JSON
    requests one line at a time (see `run`). A context manager: leaving it
    (or `close`) ends the process.

    Args:
        module: the child's module (run as `__main__`, it calls `run`).
        name: what errors call the child.
    """

    def __init__(self, module: str, name: str):
        self.name = name
        package = os.path.dirname(os.path.dirname(os.path.dirname(
            os.path.abspath(__file__))))
        path = [package, *filter(None, [os.environ.get("PYTHONPATH")])]
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
                   PYTHONPATH=os.pathsep.join(path))
        self.process = subprocess.Popen(
            [sys.executable, "-m", module],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True, env=env)

    def ask(self, **request) -> dict:
        """Sends `request`, returns the reply; `RuntimeError` when the
        child failed or exited."""
        try:
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
            line = self.process.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            raise RuntimeError(
                f"The {self.name} exited with code {self.process.wait()}."
            )
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"The {self.name} failed: {reply['error']}")
        return reply

    def close(self) -> None:
        """Ends the process (it exits at the end of its input)."""
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process.stdout.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Worker(Child):
    """A child process that times one file at a time.

    Args:
        runtime: the runtime's name (`kc.latency.RUNTIMES`).
        batch_size: the batch of every call (uniform `[0, 1)` inputs, see
            `keras_csgd.runtimes.base.uniform`).
        threads: the runtime's threads.

    Example:

    ```python
    with Worker("onnxruntime", 1, 2) as worker:
        worker.load("model.onnx")
        ms = worker.block(calls=20, warmup=1)  # the block's median
    ```
    """

    # The child's module (`python -m`); it serves with `run(serve)`.
    module = "keras_csgd.latency.worker"

    def __init__(self, runtime: str, batch_size: int, threads: int):
        super().__init__(self.module, f"timing worker of {runtime}")
        self.args = {"runtime": runtime, "batch_size": batch_size,
                     "threads": threads}

    def load(self, path) -> None:
        """Loads the file at `path` (replacing the one loaded before)."""
        self.ask(load=os.fspath(path), **self.args)

    def block(self, calls: int, warmup: int) -> float:
        """The median time (ms) of `calls` calls after `warmup` untimed
        ones (`timing.time_calls`), in the worker."""
        return self.ask(block=calls, warmup=warmup)["ms"]


def serve(requests, replies) -> None:
    """Answers JSON requests, one a line, until the end of `requests`:
    `{"load": path, "runtime", "batch_size", "threads"}` -> `{}`;
    `{"block": calls, "warmup": n}` -> `{"ms": median}`; a failure ->
    `{"error": message}`."""
    from keras_csgd import runtimes
    from keras_csgd.latency.timing import time_calls
    from keras_csgd.runtimes.base import uniform

    call = None
    for line in requests:
        request = json.loads(line)
        try:
            if "load" in request:
                call = None
                gc.collect()  # the last session's threads and memory
                program = runtimes.get(request["runtime"]).load(
                    request["load"], request["threads"])
                call = program.bind(uniform(
                    (request["batch_size"], *program.input_shape)))
                reply = {}
            else:
                reply = {"ms": time_calls(call, request["block"],
                                          request["warmup"])["median_ms"]}
        except Exception as error:  # reported to the parent, which raises
            reply = {"error": f"{type(error).__name__}: {error}"}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


def run(serve_requests) -> None:
    """A child's entry point: `serve_requests(stdin, replies)`, replying
    on a copy of stdout (stray prints go to stderr, not into the
    replies)."""
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    serve_requests(sys.stdin, replies)


if __name__ == "__main__":
    run(serve)
