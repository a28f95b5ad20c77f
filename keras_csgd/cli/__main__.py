"""`python -m keras_csgd.cli`: runs the `keras-csgd` command line."""

import sys

from keras_csgd.cli import main

if __name__ == "__main__":
    sys.exit(main())
