"""hybrid: a coarse autoregressive token model plus a small diffusion refiner for image generation."""

import logging as _logging
import os as _os

# PyTorch's CPU kernels run on OpenMP threads that, by OpenMP's default, spin while they wait for each other at
# each kernel's end. When another job shares the cores, a spinning thread burns the time that the thread it
# waits for needs: on 2 cores a training step took 2.3-3.9x as long beside a second job, against 1.8-1.9x with
# passive waiting, which costs nothing alone (`python -m benchmarks.threads`, docs/results.md). OpenMP reads
# this when torch loads, so it takes effect where hybrid is imported before torch (train.py, sample.py,
# `python -m hybrid...`; the benchmarks set it themselves before torch, `threads` aside, which measures it; a script
# of yours that imports torch before hybrid does not get it); a value already set wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# diffusers imports xformers eagerly whenever it is installed; on a machine without working xformers
# kernels (any CPU machine) that prints a multi-line warning about its C++/CUDA extensions. Our own
# attention imports xformers lazily and only uses it on CUDA, so keep CPU users' output clean.
_logging.getLogger("xformers").setLevel(_logging.ERROR)

__version__ = "0.1.0"
