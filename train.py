#!/usr/bin/env python
"""Train the hybrid image generator: `python train.py [--config FILE] [key=value ...]` (see --help)."""

import sys

from hybrid.experiment import main

if __name__ == "__main__":
    sys.exit(main())
