"""The `keras-csgd` console script: loads TensorFlow quietly, then runs.

TensorFlow prints its start-up lines (oneDNN, CUDA, absl) while it is
imported, before any setting of `TF_CPP_MIN_LOG_LEVEL` made after the
process started can reach its C++ logger. Importing `keras_csgd` imports
TensorFlow, so this launcher first loads the library's stderr silencing
(`keras_csgd/runtimes/quiet.py`, standard library only) from its file,
without the package, points stderr at `os.devnull` for the import only (an
import error is still reported: it is raised once stderr is back), then
hands over to `keras_csgd.cli.main`.
"""

import importlib.util
import os


def _quiet():
    """`keras_csgd/runtimes/quiet.py`, loaded without importing the
    package (its `__init__` imports TensorFlow)."""
    package = importlib.util.find_spec("keras_csgd")
    path = os.path.join(package.submodule_search_locations[0], "runtimes",
                        "quiet.py")
    spec = importlib.util.spec_from_file_location("keras_csgd_quiet", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with _quiet().silenced_stderr():
        from keras_csgd import cli
    return cli.main()
