"""Stage 3: the conditional denoiser and the diffusion wrapper (refiner and pure-diffusion baseline).

- `Denoiser`: DiT or per-position MLP on latents (B, C, h, w), conditioned on the coarse latent z_q
  (refiner, `coarse=True`) or not (baseline), the timestep and a class / text condition.
- `Diffusion`: diffusers schedulers behind one trainer x sampler wrapper (ddpm: ddim | dpm;
  flow: euler | dpm), `loss(...)` and `sample(...)`.
- `refiner_target` / `refiner_compose`: the refiner's x0 (scaled residual or full latent) and back.
"""

from hybrid.refiner.denoiser import DENOISER_PRESETS, Denoiser, build_denoiser
from hybrid.refiner.diffusion import SAMPLERS, Diffusion, refiner_compose, refiner_target

__all__ = ["DENOISER_PRESETS", "Denoiser", "build_denoiser", "SAMPLERS", "Diffusion", "refiner_compose",
           "refiner_target"]
