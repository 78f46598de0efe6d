#!/usr/bin/env python
"""Generate images: `python sample.py --run DIR --class 3 -n 16 --out OUT` (see --help).

A run trained with `ar.condition=text` takes `--prompt "a red circle at the top left"` instead.
"""

import sys

from hybrid.sample_cli import main

if __name__ == "__main__":
    sys.exit(main())
