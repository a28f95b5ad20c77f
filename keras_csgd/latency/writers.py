"""Writing the files `profile` times, in processes of their own.

Converting a variant to its runtime's file (`Runtime.quick_write`) took
most of a profile's time on ONNX Runtime and OpenVINO (about 2.5 s per
ResNet-56 variant, slim model included, against 1 s of timing) and runs
on one core. `write_all` writes every file before anything is timed: this
process takes variants in turn with `Writer` child processes (one per
further core), each of which loads the model from a `.keras` file saved
once, builds the variants it is given and writes them. A model that does
not load back with the same groups (a custom layer Keras cannot
deserialize in a fresh process) is written here alone, as are the
variants a child fails on. `Files` holds a profile's files.

    python -m keras_csgd.latency.writers
"""

from __future__ import annotations

import collections
import importlib
import json
import os
import tempfile
import threading
import warnings

import keras

from keras_csgd import runtimes
from keras_csgd.latency import design, timing
from keras_csgd.latency.worker import Child, run


def signature(model, an) -> list:
    """What a loaded copy of `model` must share with it: its name and
    every channel group's name, size and prunability (JSON)."""
    return json.loads(json.dumps(
        [model.name, [[g.name, g.size, g.prunable] for g in an.groups]]))


class Writer(Child):
    """A child process that writes variants of one model (`write_all`).

    Args:
        source: the model's `.keras` file.
        runtime: the runtime's name.
        expected: the model's `signature`.
        modules: modules to import before loading (its layers' classes).
    """

    def __init__(self, source, runtime, expected, modules):
        super().__init__("keras_csgd.latency.writers",
                         f"variant writer of {runtime}")
        self.source = {"source": source, "runtime": runtime,
                       "signature": expected, "modules": modules}

    def start(self) -> None:
        """Loads the model (`RuntimeError` when it differs)."""
        self.ask(**self.source)

    def write(self, job) -> None:
        """Writes `job` (`(path, widths, removed)`, see `write_all`)."""
        path, widths, removed = job
        self.ask(path=path, widths=widths, removed=list(removed))


def _modules(model) -> list[str]:
    classes = [type(model), *(type(layer) for layer in model.layers)]
    return sorted({c.__module__ for c in classes} - {"__main__"})


def _save(model, folder) -> str | None:
    path = os.path.join(folder, "source.keras")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.save(path)
    except Exception:  # not serializable: written here alone
        return None
    return path


def write_all(model, an, runtime, jobs, folder, processes: int,
              verbose: int = 1) -> None:
    """Writes the file of every job not written yet.

    Args:
        model: the full model; `an` its `graph.analyze`.
        runtime: the `Runtime`.
        jobs: `(path, widths, removed)` per file: `widths` `None` for the
            full model, else `{group: width}`, and the removed blocks
            (`design.variant`).
        folder: where the model's `.keras` copy for the children goes.
        processes: processes writing at once, this one included.
        verbose: `1` shows a progress bar.
    """
    queue = collections.deque(
        j for j in jobs if not any(os.path.exists(p)
                                   for p in runtime.files(j[0])))
    if not queue:
        return
    bar = keras.utils.Progbar(len(queue), verbose=verbose,
                              unit_name="file")
    lock, failed, threads, writers = threading.Lock(), [], [], []

    def done():
        with lock:
            bar.add(1)

    def feed(writer):
        try:
            writer.start()
        except RuntimeError:
            return  # the model did not load there: written here
        while True:
            try:
                job = queue.popleft()
            except IndexError:
                return
            try:
                writer.write(job)
            except RuntimeError:
                failed.append(job)
                return
            done()

    source = (_save(model, folder) if processes > 1 and len(queue) > 2
              else None)
    try:
        if source is not None:
            expected, modules = signature(model, an), _modules(model)
            for _ in range(processes - 1):
                writers.append(Writer(source, runtime.name, expected,
                                      modules))
                threads.append(threading.Thread(target=feed,
                                                args=(writers[-1],)))
                threads[-1].start()
        while True:
            try:
                job = queue.popleft()
            except IndexError:
                break
            _write(runtime, model, an, job)
            done()
        for thread in threads:
            thread.join()
    finally:
        for writer in writers:
            writer.close()
    for job in failed:
        for path in runtime.files(job[0]):
            if os.path.exists(path):
                os.remove(path)
        _write(runtime, model, an, job)
        done()


class Files:
    """Each model `kc.latency.profile` times, written once (`prepare`)
    into a temporary folder, so that a second attempt re-times the same files
    without converting them again (the folder holds every variant's file
    until `profile` returns). A runtime timed from the model (TensorFlow)
    has no files: each variant is built and compiled once (`timed`) and
    kept for the next attempt (a ResNet-56 variant took about 1.2 s to
    build, fold and trace, as long as its timing). An injected `measure`
    builds each variant again."""

    def __init__(self, runtime, measure):
        self.runtime, self.folder = runtimes.get(runtime), None
        self.calls = {}
        if measure is None and self.runtime.timed_from_file:
            self.folder = tempfile.TemporaryDirectory(prefix="keras-csgd-")

    def path(self, name) -> str:
        return os.path.join(self.folder.name, name + self.runtime.suffix)

    def prepare(self, model, an, work, verbose) -> None:
        """Writes the full model's and every variant's file before any is
        timed, on every core (`write_all`)."""
        if self.folder is None:
            return
        jobs = [(self.path("full"), None, ())] + [
            (self.path(f"variant{k}"), widths, removed)
            for k, (widths, removed) in enumerate(work)]
        write_all(model, an, self.runtime, jobs, self.folder.name,
                  timing.cores(), verbose)

    def get(self, name, build) -> tuple:
        """`(model, None)` of the model `build()` makes, or `(None, path)`
        of its file, called `name`, that `prepare` wrote."""
        if self.folder is None:
            return build(), None
        return None, self.path(name)

    def timed(self, name, make):
        """`make()`, the model called `name` made ready to time; kept
        for later attempts where there are no files (TensorFlow)."""
        if self.folder is not None:
            return make()
        if name not in self.calls:
            self.calls[name] = make()
        return self.calls[name]

    def close(self) -> None:
        self.calls = {}
        if self.folder is not None:
            self.folder.cleanup()


def _write(runtime, model, an, job) -> None:
    path, widths, removed = job
    runtime.quick_write(design.variant(model, an, widths, removed), path)


def serve(requests, replies) -> None:
    """Answers JSON requests, one a line: `{"source", "runtime",
    "signature", "modules"}` loads the model (an error when its
    `signature` differs), `{"path", "widths", "removed"}` writes a file;
    replies `{}` or `{"error": message}`."""
    from keras_csgd import graph, runtimes

    model = an = rt = None
    for line in requests:
        request = json.loads(line)
        try:
            if "source" in request:
                for module in request["modules"]:
                    try:
                        importlib.import_module(module)
                    except ImportError:
                        pass
                model = keras.saving.load_model(request["source"],
                                                compile=False)
                an = graph.analyze(model)
                if signature(model, an) != request["signature"]:
                    raise ValueError("the loaded model differs")
                rt = runtimes.get(request["runtime"])
            else:
                _write(rt, model, an, (request["path"], request["widths"],
                                       request["removed"]))
            reply = {}
        except Exception as error:  # reported to the parent
            reply = {"error": f"{type(error).__name__}: {error}"}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


if __name__ == "__main__":
    run(serve)
