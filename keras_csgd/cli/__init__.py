"""The `keras-csgd` command line: demo, prune, export, bench, profile.

Every subcommand has `--help`. Bad input (a missing or non-Keras model file,
a bad `--keep`, an unknown method, an unreadable data folder, an unwritable
output) ends with one line `keras-csgd: error: ...` on stderr and exit code
2, without a traceback and without writing any output file.
"""

from __future__ import annotations

import sys
import warnings

from keras_csgd.cli.common import PROG, CommandError, Parser, quiet_tensorflow
from keras_csgd.cli.demo import add_demo
from keras_csgd.cli.prune import (
    LATENCY_METHODS,
    METHODS,
    PLANNED,
    TRAINED,
    add_prune,
)
from keras_csgd.cli.tools import add_bench, add_export, add_profile
from keras_csgd.runtimes.tensorflow import set_tf_threads

__all__ = [
    "LATENCY_METHODS", "METHODS", "PLANNED", "PROG", "SUBCOMMANDS", "TRAINED",
    "build_parser", "main",
]


def build_parser():
    """The `keras-csgd` argument parser (all subcommands)."""
    parser = Parser(
        prog=PROG,
        description="Structured pruning for Keras 3: C-SGD and friends, "
        "slimming, export and timing on LiteRT, ONNX Runtime, OpenVINO "
        "and TensorFlow.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


# One function per subcommand: `add(subparsers) -> its parser`.
SUBCOMMANDS = [add_demo, add_prune, add_export, add_bench, add_profile]


def main(argv=None):
    """Runs `keras-csgd`; returns the exit code (0, or 2 on bad input)."""
    quiet_tensorflow()
    args = build_parser().parse_args(argv)
    threads = getattr(args, "threads", None)
    if threads:
        # The console script starts TensorFlow here; a caller in whose
        # process it already runs (a notebook, a test) keeps its threads,
        # and --threads applies to the other runtimes, without a warning
        # on the command's stderr.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            set_tf_threads(threads)
    try:
        args.func(args)
    except (CommandError, ValueError, TypeError, OSError,
            ImportError) as error:
        lines = str(error).strip().splitlines() or [repr(error)]
        print(f"{PROG}: error: {lines[0]}", file=sys.stderr)
        return 2
    return 0
