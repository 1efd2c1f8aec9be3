"""``python -m feature_cloud``: the same as the ``feature-cloud`` console script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
