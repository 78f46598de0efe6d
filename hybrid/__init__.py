"""hybrid: a coarse autoregressive token model plus a small diffusion refiner for image generation."""

import logging as _logging

# diffusers imports xformers eagerly whenever it is installed; on a machine without working xformers
# kernels (any CPU machine) that prints a multi-line warning about its C++/CUDA extensions. Our own
# attention imports xformers lazily and only uses it on CUDA, so keep CPU users' output clean.
_logging.getLogger("xformers").setLevel(_logging.ERROR)

__version__ = "0.1.0"
