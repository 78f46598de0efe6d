#!/usr/bin/env python
"""Generate images: `python sample.py --run DIR --prompt "a red circle" -n 16 --out OUT` (see --help)."""

import sys

from hybrid.sample_cli import main

if __name__ == "__main__":
    sys.exit(main())
