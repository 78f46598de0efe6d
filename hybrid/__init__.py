"""hybrid: a coarse autoregressive token model plus a small diffusion refiner for image generation."""

import logging as _logging
import os as _os

# PyTorch's CPU kernels run on OpenMP threads that, by GNU OpenMP's default, spin for about 300,000 rounds while
# they wait for each other at each kernel's end. When another job shares the cores, a spinning thread burns the time
# that the thread it waits for needs: on 2 cores a training step took 2.3-3.9x as long beside a second job. Letting
# waiting threads sleep at once (OMP_WAIT_POLICY=PASSIVE, this project's default until 2026-12-07) cut that to
# 1.8-1.9x but made generation, whose kernels are small, 2.5x slower at batch 1 on an idle machine. A short spin
# (GOMP_SPINCOUNT=10000) keeps most of both: 2.0x beside a second job, and generation 5-10% slower than OpenMP's default
# (`python -m benchmarks.threads`, docs/results.md, "OpenMP's wait policy against generation"). OpenMP reads these
# when torch loads, so they take effect where hybrid is imported before torch (train.py, sample.py, `python -m
# hybrid...`, the benchmarks; a script of yours that imports torch before hybrid does not get it). Either variable
# set already wins.
if "OMP_WAIT_POLICY" not in _os.environ and "GOMP_SPINCOUNT" not in _os.environ:
    _os.environ["GOMP_SPINCOUNT"] = "10000"

# diffusers imports xformers eagerly whenever it is installed; on a machine without working xformers
# kernels (any CPU machine) that prints a multi-line warning about its C++/CUDA extensions. Our own
# attention imports xformers lazily and only uses it on CUDA, so keep CPU users' output clean.
_logging.getLogger("xformers").setLevel(_logging.ERROR)

__version__ = "0.1.0"
