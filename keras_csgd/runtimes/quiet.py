"""Silencing C++ logs on stderr. Standard library only.

Runtimes print informational lines on the C++ stderr (LiteRT's "Created
TensorFlow Lite XNNPACK delegate", TensorFlow's start-up lines) that no
Python logger controls. The `keras-csgd` console script loads this file on
its own, before the package (whose `__init__` imports TensorFlow).
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
