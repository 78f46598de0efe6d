"""Diffusion training and sampling over diffusers schedulers, for the refiner and the pure-diffusion baseline.

`Diffusion(objective, prediction, sampler, num_train_timesteps)` is a thin wrapper: the noise
schedules, the noising and the update rules are diffusers'; the wrapper only evens out what the
schedulers lack (the flow scheduler has no `scale_model_input` / `init_noise_sigma`), draws every
random number from a `torch.Generator`, and runs the diffusers sampling contract
`set_timesteps` -> (`scale_model_input`, model, `step(...).prev_sample`)*, so any scheduler with
that contract can be swapped in by name.

Trainer x sampler matrix (`objective` x `sampler`; N = num_train_timesteps; "train" = the
training scheduler's config):

    objective  training (diffusers)                        sampler  sampling scheduler (diffusers)
    ---------  ------------------------------------------  -------  ---------------------------------------------
    ddpm       DDPMScheduler(N, prediction_type,           ddim     DDIMScheduler.from_config(train,
               rescale_betas_zero_snr); add_noise;                    timestep_spacing="trailing")
               t ~ U{0..N-1}; target v (get_velocity,      dpm      DPMSolverMultistepScheduler.from_config(train,
               default) | epsilon | sample                            timestep_spacing="trailing",
                                                                      final_sigmas_type="zero", lower_order_final=True)
                                                                      (DPM-Solver++ 2M)
    flow       FlowMatchEulerDiscreteScheduler(N, shift);  euler    FlowMatchEulerDiscreteScheduler.from_config(train)
               scale_noise; sigma from training_utils.     dpm      DPMSolverMultistepScheduler(N, use_flow_sigmas=True,
               compute_density_for_timestep_sampling                  prediction_type="flow_prediction",
               (logit_normal default, SD3); target the                flow_shift=shift, final_sigmas_type="zero",
               velocity noise - x0 (rectified flow)                   lower_order_final=True)

What the settings are for (checked for 1..8 steps with an exact model, see tests/test_refiner.py):
- Zero terminal SNR (`rescale_betas_zero_snr=True`, Lin et al. 2023) + v prediction is the ddpm
  default: with the default linear schedule alpha_bar(N-1) = 4e-5, so a 1-step sample does not start
  from pure noise and an epsilon model's x0 = (x - sigma eps) / alpha amplifies its error ~150x.
- With zero SNR, epsilon prediction cannot give x0 at t = N-1 (alpha = 0: DDIM divides by zero,
  DPM's 1-step sample is ~0), so `zero_snr` defaults to off for `prediction="epsilon"`.
- `timestep_spacing="trailing"`: DDIM's default "leading" spacing turns a 1-step schedule into
  t = 0; "trailing" starts every schedule at t = N-1 (used for DPM too, so both space alike).
- DPM-Solver with zero SNR: diffusers itself clamps alpha_bar(N-1) to 2**-24 (first sigma 4096,
  not inf); `final_sigmas_type="zero"` makes the last step land on the clean sample (the x0
  prediction); `lower_order_final=True` keeps the last steps first order below 15 steps (second
  order there is unstable); `euler_at_final` is not needed.
- Flow: the Euler schedule starts at sigma = 1 (t = N), DPM's flow sigmas at 1 - 1/N; `flow_shift`
  is the same number as the Euler scheduler's `shift` (1.0 = no shift) and shifts training too.
- Known diffusers quirk: DDIM with "trailing" and a step count that does not divide N (6, 7 for
  N = 1000) ends at t = 0 instead of the clean sample, leaving noise of std sqrt(1 - alpha_bar(0))
  ~ 0.01; DPM has no such quirk.

Timestep units the denoiser sees: ddpm integer t in [0, N-1]; flow t = sigma * N in (0, N].

Refiner targets (`refiner_target` / `refiner_compose`): the refiner learns x0 = (z - z_q) / std
(the residual scaled to unit variance with the tokenizer's per-channel `residual_std`), or the full
latent z (`target="latent"`). "Repair training" corrupts coarse tokens before z_q is formed (the
tokenizer's `corrupt_indices`); this module just takes z_q.
"""

from __future__ import annotations

import inspect

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

from hybrid.names import SAMPLERS, TIMESTEP_DENSITIES

OBJECTIVES = ("ddpm", "flow")
PREDICTIONS = ("v_prediction", "epsilon", "sample")
TARGETS = ("residual", "latent")


class Diffusion:
    """Trainer x sampler wrapper over diffusers schedulers (see the module docstring).

    Args:
        objective: "ddpm" (DDPM-style noising, `prediction` target) or "flow" (rectified flow).
        prediction: ddpm only: "v_prediction" | "epsilon" | "sample".
        sampler: default sampler; "ddim" | "dpm" for ddpm, "euler" | "dpm" for flow.
        num_train_timesteps: N.
        zero_snr: rescale the ddpm betas to zero terminal SNR; None = on unless prediction is epsilon.
        timestep_density: flow only, diffusers' "logit_normal" | "uniform" | "mode".
        logit_mean, logit_std, mode_scale: parameters of that density.
        flow_shift: flow only, the sigma shift (1.0 = none).
    """

    def __init__(
        self,
        objective: str = "ddpm",
        prediction: str = "v_prediction",
        sampler: str | None = None,
        num_train_timesteps: int = 1000,
        zero_snr: bool | None = None,
        timestep_density: str = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
        flow_shift: float = 1.0,
    ) -> None:
        if objective not in OBJECTIVES:
            raise ValueError(f"diffusion objective '{objective}' is unknown; choose one of {', '.join(OBJECTIVES)}")
        sampler = sampler or SAMPLERS[objective][0]
        self._check_sampler(objective, sampler)
        if objective == "ddpm" and prediction not in PREDICTIONS:
            raise ValueError(f"diffusion prediction '{prediction}' is unknown; choose one of {', '.join(PREDICTIONS)}")
        if timestep_density not in TIMESTEP_DENSITIES:
            raise ValueError(
                f"timestep density '{timestep_density}' is unknown; choose one of {', '.join(TIMESTEP_DENSITIES)}")
        self.objective = objective
        self.prediction = prediction if objective == "ddpm" else "flow_prediction"
        self.sampler = sampler
        self.num_train_timesteps = num_train_timesteps
        self.timestep_density = timestep_density
        self.density_kwargs = dict(logit_mean=logit_mean, logit_std=logit_std, mode_scale=mode_scale)
        self.flow_shift = flow_shift
        if objective == "ddpm":
            self.zero_snr = (prediction != "epsilon") if zero_snr is None else zero_snr
            self.train_scheduler = DDPMScheduler(
                num_train_timesteps=num_train_timesteps,
                prediction_type=prediction,
                rescale_betas_zero_snr=self.zero_snr,
                clip_sample=False,
            )
        else:
            self.zero_snr = False
            self.train_scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps,
                                                                   shift=flow_shift)

    @classmethod
    def from_config(cls, section) -> Diffusion:
        """From a `refiner`/`diffusion` config section (a DenoiserConfig-like object)."""
        return cls(
            objective=section.objective,
            prediction=section.prediction,
            sampler=section.sampler,
            num_train_timesteps=section.num_train_timesteps,
            timestep_density=section.timestep_density,
            flow_shift=section.flow_shift,
        )

    def __repr__(self) -> str:
        return (f"Diffusion(objective={self.objective!r}, prediction={self.prediction!r}, sampler={self.sampler!r}, "
                f"num_train_timesteps={self.num_train_timesteps}, zero_snr={self.zero_snr})")

    @staticmethod
    def _check_sampler(objective: str, sampler: str) -> None:
        if sampler not in SAMPLERS[objective]:
            raise ValueError(
                f"sampler '{sampler}' does not sample a '{objective}' model; choose one of "
                f"{', '.join(SAMPLERS[objective])}")

    # -- training ---------------------------------------------------------------------------------
    def sample_timesteps(self, batch: int, generator: torch.Generator | None = None,
                         device: torch.device | str | None = None) -> torch.Tensor:
        """(batch,) training timesteps: long in [0, N-1] (ddpm) or float sigma * N (flow).

        Drawn on the generator's device, returned on `device`."""
        gen_device = generator.device if generator is not None else device
        N = self.num_train_timesteps
        if self.objective == "ddpm":
            t = torch.randint(0, N, (batch,), generator=generator, device=gen_device)
        else:
            from diffusers.training_utils import compute_density_for_timestep_sampling  # heavy import: lazy

            u = compute_density_for_timestep_sampling(
                self.timestep_density, batch, device=gen_device, generator=generator, **self.density_kwargs)  # (B,)
            index = (u * N).long().clamp(0, N - 1).cpu()  # (B,) index into the training schedule
            t = self.train_scheduler.timesteps[index]  # (B,) float, sigma * N
        return t.to(device) if device is not None else t

    def noise_level(self, t: torch.Tensor) -> torch.Tensor:
        """Timesteps (B,) -> fraction of the way to pure noise, (B,) in [0, 1]."""
        if self.objective == "ddpm":
            return t.float() / (self.num_train_timesteps - 1)
        return t.float() / self.num_train_timesteps

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x0, noise (B, C, h, w); t (B,) -> x_t (B, C, h, w), by the training scheduler."""
        if self.objective == "ddpm":
            return self.train_scheduler.add_noise(x0, noise, t.to(x0.device))
        return self.train_scheduler.scale_noise(x0, t.to(x0.device), noise)

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the model regresses: v, epsilon or x0 (ddpm), or the velocity noise - x0 (flow)."""
        if self.objective == "flow":
            return noise - x0
        if self.prediction == "v_prediction":
            return self.train_scheduler.get_velocity(x0, noise, t.to(x0.device))
        if self.prediction == "epsilon":
            return noise
        return x0

    def loss(
        self,
        model,
        x0: torch.Tensor,
        z_q: torch.Tensor | None = None,
        cond=None,
        generator: torch.Generator | None = None,
        cond_drop: float = 0.0,
        buckets: int = 4,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One training loss: draws t and noise from `generator`, drops the condition with
        probability `cond_drop` (for guidance), regresses the target with MSE.

        x0 (B, C, h, w) clean target; z_q (B, C, h, w) or None; cond as the model takes it.
        Returns (scalar loss, {"loss_t<lo>-<hi>": mean loss of the samples whose noise level lies in
        [lo, hi) percent}) for the non-empty of `buckets` equal noise-level buckets (detached).
        """
        B = x0.shape[0]
        if hasattr(model, "prepare_condition"):
            cond = model.prepare_condition(cond, x0.device)
        t = self.sample_timesteps(B, generator, x0.device)  # (B,)
        noise = randn(x0.shape, generator, x0.device, x0.dtype)  # (B, C, h, w)
        x_t = self.add_noise(x0, noise, t)  # (B, C, h, w)
        target = self.training_target(x0, noise, t)  # (B, C, h, w)
        if cond_drop > 0 and hasattr(model, "drop_condition"):
            cond = model.drop_condition(cond, cond_drop, generator)
        pred = model(x_t, t, z_q, cond)  # (B, C, h, w)
        per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(1)  # (B,)
        return per_sample.mean(), self.bucket_losses(per_sample.detach(), t, buckets)

    def bucket_losses(self, per_sample: torch.Tensor, t: torch.Tensor, buckets: int = 4) -> dict[str, torch.Tensor]:
        """Mean loss per noise-level bucket (only non-empty buckets): {"loss_t0-25": ..., ...}."""
        level = self.noise_level(t).to(per_sample.device)  # (B,)
        which = (level * buckets).long().clamp(0, buckets - 1)  # (B,)
        out = {}
        for k in range(buckets):
            sel = which == k
            if sel.any():
                lo, hi = round(100 * k / buckets), round(100 * (k + 1) / buckets)
                out[f"loss_t{lo}-{hi}"] = per_sample[sel].mean()
        return out

    # -- sampling ---------------------------------------------------------------------------------
    def make_sampler(self, sampler: str | None = None):
        """A fresh diffusers scheduler for sampling (schedulers keep per-run state: one per call)."""
        name = sampler or self.sampler
        self._check_sampler(self.objective, name)
        config = self.train_scheduler.config
        if self.objective == "ddpm":
            if name == "ddim":
                return DDIMScheduler.from_config(config, timestep_spacing="trailing")
            return DPMSolverMultistepScheduler.from_config(
                config, timestep_spacing="trailing", final_sigmas_type="zero", lower_order_final=True,
                algorithm_type="dpmsolver++", solver_order=2)
        if name == "euler":
            return FlowMatchEulerDiscreteScheduler.from_config(config)
        return DPMSolverMultistepScheduler(  # built from the flow config's values (its keys differ)
            num_train_timesteps=config.num_train_timesteps, use_flow_sigmas=True, prediction_type="flow_prediction",
            flow_shift=config.shift, final_sigmas_type="zero", lower_order_final=True, algorithm_type="dpmsolver++",
            solver_order=2)

    def most_steps(self, sampler: str | None = None) -> int | None:
        """The most sampling steps `sampler` can take distinct timesteps for: the training timesteps N for the
        discrete schedules (DDIM refuses more; DPM-Solver repeats timesteps past N), None (no limit) for the
        flow Euler sampler, whose sigmas are continuous."""
        name = sampler or self.sampler
        return None if (self.objective, name) == ("flow", "euler") else self.num_train_timesteps

    def ready_sampler(self, steps: int, sampler: str | None = None, device=None):
        """`make_sampler` with `steps` timesteps set.

        The flow Euler scheduler's own spacing, linspace(1, 1/num_train_timesteps, steps), ends its
        last step at sigma 0.001 and then takes a final step to 0 of almost nothing: N steps did the
        work of N - 1 (2 steps gave exactly the 1-step result). It gets equal steps instead,
        sigmas 1, (N-1)/N, ..., 1/N, then 0 (its shift still applies), like the trailing spacing
        the DDPM samplers use.
        """
        sched = self.make_sampler(sampler)
        if isinstance(sched, FlowMatchEulerDiscreteScheduler):
            sched.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps).tolist(), device=device)
        else:
            sched.set_timesteps(steps, device=device)
        return sched

    def timesteps(self, steps: int, sampler: str | None = None) -> torch.Tensor:
        """The sampling timesteps of `steps` steps, in the denoiser's units (first = noisiest)."""
        return self.ready_sampler(steps, sampler).timesteps

    @torch.no_grad()
    def sample(
        self,
        model,
        shape: tuple[int, ...],
        z_q: torch.Tensor | None = None,
        cond=None,
        steps: int = 4,
        generator: torch.Generator | None = None,
        cfg: float | None = 1.0,
        sampler: str | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Samples x0 (shape = (B, C, h, w)) in `steps` steps from pure noise.

        z_q (B, C, h, w) for a refiner; cond as the model takes it; `cfg` > 1 runs the conditional and
        the null condition in one doubled batch and mixes: null + cfg * (cond - null); None or 1 is
        unguided. The device is z_q's, else `device`, else the model's. All noise comes from `generator`.
        """
        if steps < 1:
            raise ValueError(f"sampling needs steps >= 1, got {steps}")
        if device is None:
            device = z_q.device if z_q is not None else next(model.parameters()).device
        sched = self.ready_sampler(steps, sampler, device)
        x = randn(shape, generator, device, torch.float32) * getattr(sched, "init_noise_sigma", 1.0)  # (B, C, h, w)
        B = shape[0]
        if hasattr(model, "prepare_condition"):
            cond = model.prepare_condition(cond, device)
        guided = cfg is not None and cfg != 1.0 and cond is not None and getattr(model, "condition", "none") != "none"
        if guided:
            cond_in = model.cat_condition(cond, model.null_condition(cond))  # 2B
            z_in = torch.cat([z_q, z_q]) if z_q is not None else None  # (2B, C, h, w)
        step_kwargs = {"generator": generator} if "generator" in inspect.signature(sched.step).parameters else {}
        for t in sched.timesteps:
            x_in = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x  # (B, C, h, w)
            t_batch = t.to(device).expand(B)  # (B,)
            if guided:
                out = model(torch.cat([x_in, x_in]), torch.cat([t_batch, t_batch]), z_in, cond_in)  # (2B, C, h, w)
                out_cond, out_null = out.float().chunk(2)
                out = out_null + cfg * (out_cond - out_null)  # (B, C, h, w)
            else:
                out = model(x_in, t_batch, z_q, cond).float()  # (B, C, h, w)
            x = sched.step(out, t, x, **step_kwargs).prev_sample  # (B, C, h, w)
        return x


def randn(shape, generator: torch.Generator | None, device, dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device, returned on `device`."""
    gen_device = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=dtype).to(device)


# ------------------------------------------------------------------------------------------------
# Refiner targets
# ------------------------------------------------------------------------------------------------


def _std(residual_std: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return residual_std.to(like.device, like.dtype).clamp(min=1e-6)[None, :, None, None]  # (1, C, 1, 1)


def refiner_target(z: torch.Tensor, z_q: torch.Tensor, residual_std: torch.Tensor,
                   target: str = "residual") -> torch.Tensor:
    """The refiner's x0: (z - z_q) / residual_std per channel ("residual") or z ("latent").

    z, z_q (B, C, h, w); residual_std (C,) -> (B, C, h, w)."""
    if target == "residual":
        return (z - z_q) / _std(residual_std, z)
    if target == "latent":
        return z
    raise ValueError(f"refiner target '{target}' is unknown; choose one of {', '.join(TARGETS)}")


def refiner_compose(x0: torch.Tensor, z_q: torch.Tensor, residual_std: torch.Tensor,
                    target: str = "residual") -> torch.Tensor:
    """Inverse of `refiner_target`: the refined latent z = z_q + x0 * residual_std (or x0). (B, C, h, w)."""
    if target == "residual":
        return z_q + x0 * _std(residual_std, x0)
    if target == "latent":
        return x0
    raise ValueError(f"refiner target '{target}' is unknown; choose one of {', '.join(TARGETS)}")
