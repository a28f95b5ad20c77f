"""What every `keras-csgd` subcommand shares.

The one-line error (`CommandError`, the parser), the argument types, model
and data loading, the classifier training loop, atomic file writing and the
plain-text table.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile

import keras

from keras_csgd import batches, checks, latency

PROG = "keras-csgd"


def quiet_tensorflow() -> None:
    """Silences TensorFlow's and absl's informational logging.

    Sets `TF_CPP_MIN_LOG_LEVEL=3` (unless set already; read by TensorFlow's
    C++ runtime, and by the converter subprocesses) and the absl and
    `tensorflow` Python loggers to errors only. The lines TensorFlow prints
    while it is imported only go away when this runs before the import.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
    except ImportError:
        pass
    logging.getLogger("tensorflow").setLevel(logging.ERROR)


class CommandError(Exception):
    """Bad command-line input: reported as one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    """Reports usage errors as one line `keras-csgd: error: ...`."""

    def error(self, message):
        self.exit(2, f"{PROG}: error: {message}\n")


def _argument_type(check, convert, rule):
    """An argparse type: `convert(text)` checked by `check`, else `rule`."""

    def parse(text):
        try:
            return check(convert(text))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be {rule}, got {text!r}"
            ) from None

    return parse


fraction = _argument_type(
    lambda v: checks.fraction("keep", v), float, "a fraction in (0, 1]"
)
split_fraction = _argument_type(
    lambda v: checks.fraction("val_split", v, low_open=False,
                              high_closed=False),
    float, "a fraction in [0, 1)",
)
positive_int = _argument_type(
    lambda v: checks.positive_int("value", v), int, "a positive integer"
)


def batch_sizes(text):
    return tuple(positive_int(part) for part in text.split(","))


def latency_fraction(text):
    try:
        return checks.fraction("latency", float(text), high_closed=False)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a fraction in (0, 1), got {text!r}"
        ) from None


def existing_file(path, what):
    if not os.path.isfile(path):
        raise CommandError(f"{what} {path!r} is not an existing file")


def output_path(path, suffix, source=None):
    """Checks that `path` ends in `suffix` and can be written."""
    if not path.endswith(suffix):
        raise CommandError(f"--out must end with {suffix}, got {path!r}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise CommandError(
            f"--out {path!r}: folder {folder!r} does not exist or is not "
            "writable"
        )
    if os.path.isdir(path):
        raise CommandError(f"--out {path!r} is a folder")
    if source is not None and os.path.abspath(source) == os.path.abspath(
        path
    ):
        raise CommandError("--out must differ from the input model")
    return path


def load_model(path):
    existing_file(path, "model")
    try:
        return keras.saving.load_model(path)
    except Exception as error:  # Keras raises many types on bad files.
        first_line = str(error).strip().splitlines()[0] if str(error) else ""
        raise CommandError(
            f"{path!r} is not a loadable Keras model "
            f"({type(error).__name__}: {first_line})"
        ) from error


def load_data(path, model):
    """`(x, y)` of `--data` (an `.npz` or an image folder), or `None`.

    Read by `keras_csgd.batches.read`: image folders are resized to the
    model's input size and scaled to `[0, 1]`; `.npz` arrays are used as
    they are.
    """
    return None if path is None else batches.read(path, model)


def write_atomically(writers):
    """Runs `writer(tmp_path)` for each `(path, writer)`, then renames all.

    Either every file appears or none does.
    """
    temps = []
    try:
        for path, writer in writers:
            folder, name = os.path.split(os.path.abspath(path))
            suffix = os.path.splitext(name)[1]
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=suffix,
                                       dir=folder)
            os.close(fd)
            temps.append(tmp)
            writer(tmp)
        for tmp, (path, _) in zip(temps, writers):
            os.replace(tmp, path)
    finally:
        for tmp in temps:
            if os.path.exists(tmp):
                os.unlink(tmp)


def write_text(text):
    def write(path):
        with open(path, "w") as f:
            f.write(text)

    return write


def format_table(rows):
    """Right-aligned plain-text table; the first column left-aligned."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return "\n".join(
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths))
        )
        for row in cells
    )


def add_runtime(parser):
    """`--runtime`, `--batch-size` and `--threads` of a timed command."""
    parser.add_argument("--runtime", choices=latency.RUNTIMES,
                        default="litert",
                        help="litert (float32), litert-int8 (full "
                        "integer), onnxruntime, openvino, tensorflow "
                        "(compiled, BN folded), ...; default litert")
    parser.add_argument("--batch-size", type=positive_int, default=1,
                        help="batch size timed (default 1)")
    parser.add_argument("--threads", type=positive_int, default=2,
                        help="threads (default 2)")
