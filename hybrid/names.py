"""Names the model code dispatches on, shared with the config schema (`hybrid.config` checks a config against
them without importing torch or diffusers; the model code under hybrid/{ar,refiner} takes them from here
without importing omegaconf). Imports nothing."""

# the denoisers' trainer x sampler matrix (hybrid.refiner.diffusion)
SAMPLERS: dict[str, tuple[str, ...]] = {"ddpm": ("ddim", "dpm"), "flow": ("euler", "dpm")}
# flow-matching timestep densities (diffusers' training utilities)
TIMESTEP_DENSITIES = ("logit_normal", "uniform", "mode")
# the AR's classifier-free guidance schedules (hybrid.ar.sampling)
CFG_SCHEDULES = ("constant", "linear")
