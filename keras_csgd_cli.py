"""The `keras-csgd` console script: loads TensorFlow quietly, then runs.

TensorFlow prints its start-up lines (oneDNN, CUDA, absl) while it is
imported, before any setting of `TF_CPP_MIN_LOG_LEVEL` made after the
process started can reach its C++ logger. Importing `keras_csgd` imports
TensorFlow, so this launcher lives outside the package: it points stderr at
`os.devnull` for the import only (an import error is still reported: it is
raised once stderr is back), then hands over to `keras_csgd.cli.main`.
"""

import contextlib
import os


@contextlib.contextmanager
def silenced_stderr():
    """Points file descriptor 2 at `os.devnull` (C++ logs included)."""
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def main() -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with silenced_stderr():
        from keras_csgd import cli
    return cli.main()
