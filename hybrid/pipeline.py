"""Run directory (or exported folder) -> images: AR -> z_q -> refiner -> decoder.

    pipe = HybridPipeline.from_run("runs/default", device="cpu")
    images = pipe(prompts=["a red circle at the top left"], mode="hybrid", seed=0)  # (N, 3, H, W) in [-1, 1]
    pipe.save_pretrained("export/")          # safetensors + JSON, loads without unpickling anything
    pipe = HybridPipeline.from_pretrained("export/")

Modes: `hybrid` (AR tokens -> z_q -> refiner adds the residual -> decoder; with `refiner.coarse_scales`
= N the AR writes scales 1..N only and the refiner generates the rest), `ar` (the pure-AR
baseline: decode z_q alone), `diffusion` (the pure-diffusion baseline on the full latent, when
trained). Class ids are turned into captions ("a red circle") for text-conditioned stages; a prompt
given to a class-conditioned AR model is an error, and a class-conditioned refiner given only
prompts refines unconditionally (it was trained with condition dropout). The same seed, requests and
batch size give the same images on the same device (the images of a batch share its draws). Stages
with EMA weights (refiner, diffusion) are loaded with them.
"""

from __future__ import annotations

import json
import operator
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from hybrid.checkpoints import (
    CheckpointError,
    check_tokenizer_match,
    final_path,
    load_checkpoint,
    path_problem,
    sub_state_dict,
    train_command,
    weights_hash,
)
from hybrid.config import GenerationSettings, from_dict
from hybrid.data.attributes import class_name
from hybrid.devices import resolve_device
from hybrid.models import (
    build_ar,
    build_denoiser,
    build_diffusion,
    build_tokenizer,
    coarse_scales,
    num_classes,
    refiner_target_std,
    with_pretrained_config,
)

MODES = ("hybrid", "ar", "diffusion")
# the stages each mode runs (the tokenizer's own reconstructions are the evaluation's "tokenizer" mode)
MODE_STAGES = {"tokenizer": ("tokenizer",), "ar": ("ar",), "hybrid": ("ar", "refiner"), "diffusion": ("diffusion",)}
EXPORT_FORMAT = 1


class PipelineError(ValueError):
    """A request the loaded models cannot serve (missing stage, wrong condition, bad prompt)."""


class HybridPipeline:
    def __init__(self, tokenizer, configs: dict[str, dict], ar=None, refiner=None, diffusion=None) -> None:
        self.tokenizer = tokenizer.eval()
        self.configs = configs  # stage -> the resolved config (plain dict) it was trained with
        # parsed once: building a typed config from a dict took most of a small batch's call (profiled)
        self.parsed = {stage: from_dict(config) for stage, config in configs.items()}
        self.ar = ar.eval() if ar is not None else None
        self.refiner = refiner.eval() if refiner is not None else None
        self.diffusion = diffusion.eval() if diffusion is not None else None
        self.refiner_diffusion = build_diffusion(configs["refiner"], "refiner") if refiner is not None else None
        self.diffusion_diffusion = build_diffusion(configs["diffusion"], "diffusion") if diffusion is not None else None
        self.run_dir: Path | None = None  # the run directory it was loaded from (from_run), for hints

    # -- loading --------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.tokenizer.parameters()).device

    def to(self, device) -> HybridPipeline:
        """Moves every stage to `device` (auto, cpu, cuda, cuda:N or a torch.device)."""
        device = _device(device)
        for module in (self.tokenizer, self.ar, self.refiner, self.diffusion):
            if module is not None:
                module.to(device)
        return self

    @property
    def modes(self) -> list[str]:
        out = []
        if self.ar is not None:
            out.append("ar")
            if self.refiner is not None:
                out.append("hybrid")
        if self.diffusion is not None:
            out.append("diffusion")
        return out

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, device: str | torch.device = "cpu",
                 need_generator: bool = True) -> HybridPipeline:
        """Loads every trained stage of a run directory (each stage's `final.ckpt`). `need_generator=False`
        loads a run with a tokenizer alone too (the evaluation judges its reconstructions)."""
        run_dir, device = Path(run_dir), _device(device)
        if not run_dir.is_dir():
            raise PipelineError(f"run directory '{run_dir}' {path_problem(run_dir, 'folder')}")
        tok_path = final_path(run_dir, "tokenizer")
        if not tok_path.is_file():
            export = (" (it is an exported pipeline: load it with sample.py --export or "
                      "HybridPipeline.from_pretrained)" if (run_dir / "pipeline.json").is_file() else "")
            raise PipelineError(f"run directory '{run_dir}' has no trained tokenizer ({tok_path} "
                                f"{path_problem(tok_path) or 'is not a regular file'}){export}")
        stages = {stage: final_path(run_dir, stage) for stage in ("ar", "refiner", "diffusion")}
        for path in stages.values():
            if path.is_dir():  # was skipped as "no such stage"
                raise PipelineError(f"'{path}' is a folder, not a file: the stage's checkpoint")
        stages = {stage: path for stage, path in stages.items() if path.is_file()}
        if need_generator and "ar" not in stages and "diffusion" not in stages:
            raise PipelineError(f"run directory '{run_dir}' has no trained AR or diffusion stage yet")
        pipe = cls.from_checkpoints(tok_path, device=device, **stages)
        pipe.run_dir = run_dir
        return pipe

    @classmethod
    def from_checkpoints(cls, tokenizer: str | os.PathLike, ar=None, refiner=None, diffusion=None,
                         device: str | torch.device = "cpu") -> HybridPipeline:
        """Loads explicit stage checkpoints (Lightning `.ckpt` files), e.g. a refiner from another run.

        Every stage must have been trained with this tokenizer (checked by weights hash)."""
        device = _device(device)
        ckpt = load_checkpoint(tokenizer, expect_stage="tokenizer")
        configs = {"tokenizer": ckpt["hyper_parameters"]["config"]}
        tok = build_tokenizer(configs["tokenizer"], source=tokenizer)
        tok_state = sub_state_dict(ckpt["state_dict"], "tokenizer")
        tok.load_state_dict(tok_state)
        configs["tokenizer"] = with_pretrained_config(configs["tokenizer"], tok)  # what an export stores
        tok_hash = weights_hash(tok_state)
        models: dict[str, Any] = {}
        for stage, path in (("ar", ar), ("refiner", refiner), ("diffusion", diffusion)):
            if path is None:
                continue
            if not Path(path).is_file():
                raise PipelineError(f"{stage} checkpoint '{path}' {path_problem(path) or 'is not a regular file'}")
            ckpt = load_checkpoint(path, expect_stage=stage)
            check_tokenizer_match(ckpt, tok_hash, path)
            configs[stage] = ckpt["hyper_parameters"]["config"]
            model = build_ar(configs[stage], tok) if stage == "ar" else build_denoiser(configs[stage], stage, tok)
            _load_strict(model, sub_state_dict(ckpt["state_dict"], "model"), path)
            models[stage] = model
        return cls(tok, configs, **models).to(device)

    def export_files(self) -> list[str]:
        """The names `save_pretrained` writes into its folder."""
        return [*(f"{stage}.safetensors" for stage in self._stages()), "pipeline.json"]

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Writes every stage as `<stage>.safetensors` plus `pipeline.json` (configs, hashes)."""
        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise PipelineError(f"cannot export to '{folder}': it is a file, not a folder")
        blocked = [folder / name for name in self.export_files() if (folder / name).is_dir()]
        if blocked:  # found before any stage is written, not at the rename after some were
            raise PipelineError(f"cannot export to '{folder}': '{blocked[0]}' is a folder, where the export writes a "
                                f"file; move it away or export elsewhere")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise PipelineError(f"cannot export to '{folder}': {err.strerror}") from None
        manifest: dict[str, Any] = {"format": EXPORT_FORMAT, "stages": {}}
        manifest_tmp = folder / ".pipeline.json.tmp"
        manifest_tmp.unlink(missing_ok=True)  # one left by a killed export keeps its old mode
        manifest_tmp.write_text("")  # created first: the mode a file gets here (the umask's) is the weights' too
        mode = manifest_tmp.stat().st_mode & 0o777
        for stage, module in self._stages().items():
            state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
            tmp = folder / f".{stage}.safetensors.tmp"
            save_file(state, str(tmp))
            os.chmod(tmp, mode)  # as pipeline.json beside it (safetensors creates it 0600)
            os.replace(tmp, folder / f"{stage}.safetensors")
            manifest["stages"][stage] = {"config": self.configs[stage], "weights_hash": weights_hash(state)}
        manifest_tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(manifest_tmp, folder / "pipeline.json")
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, device: str | torch.device = "cpu") -> HybridPipeline:
        """Loads a `save_pretrained` folder: safetensors and JSON only, nothing is unpickled."""
        folder, device = Path(folder), _device(device)
        manifest_path = folder / "pipeline.json"
        if not folder.is_dir():
            raise PipelineError(f"export folder '{folder}' {path_problem(folder, 'folder')}")
        if not manifest_path.is_file():
            run = (" (it is a run directory: load it with sample.py --run or HybridPipeline.from_run)"
                   if final_path(folder, "tokenizer").is_file() else "")
            raise PipelineError(f"'{folder}' is not an exported pipeline: {manifest_path} "
                                f"{path_problem(manifest_path) or 'is not a regular file'}{run}")
        try:
            manifest = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise PipelineError(f"'{manifest_path}' is not valid JSON ({err}); export the pipeline again") from None
        if not isinstance(manifest, dict) or manifest.get("format") != EXPORT_FORMAT:
            found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
            raise PipelineError(f"'{manifest_path}' has export format {found}, expected {EXPORT_FORMAT}")
        stages = manifest.get("stages")
        if not isinstance(stages, dict) or not all(
                isinstance(info, dict) and {"config", "weights_hash"} <= set(info) for info in stages.values()):
            raise PipelineError(f"'{manifest_path}' is damaged: each of its 'stages' needs a config and a weights_hash")
        configs = {stage: info["config"] for stage, info in stages.items()}
        if "tokenizer" not in stages:
            raise PipelineError(f"'{folder}' holds no tokenizer")

        def weights(stage: str) -> dict[str, torch.Tensor]:
            path = folder / f"{stage}.safetensors"
            if not path.is_file():
                raise PipelineError(f"'{path}' {path_problem(path) or 'is not a regular file'} (listed in "
                                    f"{manifest_path})")
            try:
                state = load_file(str(path))
            except Exception as err:  # noqa: BLE001 - safetensors raises its own error type for a damaged file
                raise PipelineError(f"'{path}' is not a readable safetensors file ({err})") from None
            if weights_hash(state) != stages[stage]["weights_hash"]:
                raise PipelineError(f"'{path}' does not match the weights hash in {manifest_path}")
            return state

        bad = [stage for stage, config in configs.items() if not isinstance(config, dict)]
        if bad:
            raise PipelineError(f"'{manifest_path}' is damaged: the {bad[0]} stage's config is not a mapping")

        def built(stage: str, build):
            """The stage's network from its config, or a PipelineError naming the manifest (an edited config)."""
            try:
                return build()
            except (KeyError, TypeError, ValueError, AttributeError) as err:
                if isinstance(err, PipelineError | CheckpointError):
                    raise
                raise PipelineError(f"'{manifest_path}': the {stage} stage's config does not build a model "
                                    f"({type(err).__name__}: {err})") from None

        tokenizer = built("tokenizer", lambda: build_tokenizer(configs["tokenizer"], source=manifest_path))
        _load_strict(tokenizer, weights("tokenizer"), folder / "tokenizer.safetensors")
        configs["tokenizer"] = with_pretrained_config(configs["tokenizer"], tokenizer)
        models = {}
        for stage in ("ar", "refiner", "diffusion"):
            if stage in stages:
                model = built(stage, lambda stage=stage: build_ar(configs[stage], tokenizer) if stage == "ar"
                              else build_denoiser(configs[stage], stage, tokenizer))
                _load_strict(model, weights(stage), folder / f"{stage}.safetensors")
                models[stage] = model
        return cls(tokenizer, configs, **models).to(device)

    def _stages(self) -> dict[str, torch.nn.Module]:
        stages = {"tokenizer": self.tokenizer, "ar": self.ar, "refiner": self.refiner, "diffusion": self.diffusion}
        return {k: v for k, v in stages.items() if v is not None}

    def parameter_counts(self) -> dict[str, int]:
        return {stage: sum(p.numel() for p in m.parameters()) for stage, m in self._stages().items()}

    # -- conditions -----------------------------------------------------------------------------
    def _condition_for(self, stage: str, model, classes: torch.Tensor | None, prompts: list[str] | None):
        """The condition `model` takes, from class ids and/or prompts."""
        kind = getattr(model, "condition", "none")
        if kind == "none":
            return None
        if kind == "class":
            if classes is not None:
                return classes.to(self.device)
            if stage in ("ar", "diffusion"):  # the generator would ignore the prompts; a refiner behind a text AR
                model_name = {"ar": "AR model", "diffusion": "diffusion baseline"}[stage]  # takes its null class
                raise PipelineError(
                    f"this {model_name} is class-conditioned ({stage}.condition=class): pass class ids, not prompts")
            return torch.full((len(prompts),), model.class_embed.null_id if hasattr(model, "class_embed")
                              else num_classes(self.parsed[stage]), dtype=torch.long, device=self.device)
        # text
        if prompts is None:
            if self.parsed[stage].data.source != "procedural":
                raise PipelineError(f"this {stage} model is text-conditioned ({stage}.condition=text) and was trained "
                                    "on your own captions: pass prompts (--prompt), not class ids")
            prompts = [class_prompt(int(c)) for c in classes.tolist()]  # the procedural classes' names
        return list(prompts)

    def _check_request(self, classes, prompts, mode: str, batch_size: int = 1) -> int:
        if batch_size < 1:
            raise PipelineError(f"batch size must be >= 1, got {batch_size}")
        if mode not in MODES:
            raise PipelineError(f"mode '{mode}' is unknown; choose one of {', '.join(MODES)}")
        if mode not in self.modes:
            have = ", ".join(self.modes) or "none"
            what = {"ar": "an AR stage", "refiner": "a refiner", "diffusion": "the diffusion baseline"}
            lacking = [stage for stage in MODE_STAGES[mode] if self._stages().get(stage) is None]

            def how(stage: str) -> str:
                return train_command(self.run_dir, f"stage={stage}") if self.run_dir else \
                    f"python train.py stage={stage}"

            needs = " and ".join(f"{what[stage]} ({how(stage)})" for stage in lacking)
            raise PipelineError(f"mode '{mode}' needs {needs}, which this pipeline lacks (available modes: {have})")
        if (classes is None) == (prompts is None):
            raise PipelineError("pass either class ids or prompts")
        if prompts is not None:
            for p in prompts:
                if not p or not p.strip():
                    raise PipelineError("a prompt is empty")
                limit = self._text_limit(mode)
                if limit is not None and len(p.encode("utf-8")) > limit:
                    raise PipelineError(f"prompt {p!r} is {len(p.encode())} bytes; this model takes at most {limit}")
            return len(prompts)
        counts = self._class_counts(mode)
        n = min(counts.values())
        bad = [int(c) for c in classes.tolist() if not 0 <= int(c) < n]
        if bad:
            fewest = min(counts, key=counts.get)
            why = f" (the {fewest} stage's)" if len(set(counts.values())) > 1 else ""
            raise PipelineError(f"class id {bad[0]} is unknown; this model has classes 0..{n - 1}{why}")
        return len(classes)

    def check_request(self, classes=None, prompts=None, mode: str = "hybrid", batch_size: int = 16,
                      seed: int = 0, **settings: Any) -> int:
        """What `__call__` checks before it generates anything (requests, mode, batch size, seed, settings,
        the sampler against the mode's denoiser), as a PipelineError / ValueError; the number of images."""
        s = GenerationSettings(**settings)
        n = self._check_request(_as_ids(classes), _as_prompts(prompts), mode, batch_size)
        self._check_denoiser(mode, s)
        _seed(seed)
        return n

    def _check_denoiser(self, mode: str, s: GenerationSettings) -> None:
        """The settings of the mode's denoiser, refused before anything is written or generated: a sampler it
        cannot use (found after the first batch's AR tokens had been drawn), and more steps than its training
        timesteps (DDIM raised diffusers' own error, naming no flag, after --write-export had written;
        DPM-Solver silently repeated timesteps)."""
        from hybrid.names import SAMPLERS

        diffusion = {"hybrid": self.refiner_diffusion, "diffusion": self.diffusion_diffusion}.get(mode)
        if diffusion is None:
            return
        stage = "refiner" if mode == "hybrid" else "diffusion"
        if s.sampler is not None and s.sampler not in SAMPLERS[diffusion.objective]:
            raise PipelineError(f"sampler '{s.sampler}' does not sample this {stage} ({stage}.objective="
                                f"{diffusion.objective}); choose one of {', '.join(SAMPLERS[diffusion.objective])}")
        steps = s.steps or self.parsed[stage][stage].steps  # the stage's own default, as sampling takes it
        most = diffusion.most_steps(s.sampler)
        if most is not None and steps > most:
            raise PipelineError(f"steps={steps}: this {stage} was trained with {most} timesteps "
                                f"({stage}.num_train_timesteps), so its {s.sampler or diffusion.sampler} sampler "
                                f"takes at most {most} steps")

    def _class_counts(self, mode: str) -> dict[str, int]:
        """{stage: its number of classes} for the networks `mode` runs that take a condition, each from its own
        config (a stage trained after `data.num_classes` grew knows more classes than a reused tokenizer's
        config says); the tokenizer's when none takes one."""
        counts = {stage: num_classes(self.parsed[stage]) for stage in self._conditioned_stages(mode)}
        return counts or {"tokenizer": num_classes(self.parsed["tokenizer"])}

    def _conditioned_stages(self, mode: str) -> list[str]:
        """The networks `mode` runs that take a condition (class ids or prompts)."""
        stages = self._stages()
        return [stage for stage in MODE_STAGES[mode]
                if stage != "tokenizer" and getattr(stages.get(stage), "condition", "none") != "none"]

    def conditioned(self, mode: str = "hybrid") -> bool:
        """Whether any network `mode` runs takes a condition (class ids or prompts); an unconditional one
        (`<stage>.condition=none`) draws the same distribution whatever it is asked for."""
        return bool(self._conditioned_stages(mode))

    def _text_limit(self, mode: str) -> int | None:
        """The most UTF-8 bytes of prompt the mode's text-conditioned networks take (None: no text input)."""
        models = (self.diffusion,) if mode == "diffusion" else (self.ar, self.refiner if mode == "hybrid" else None)
        limits = [m.max_text_len for m in models if m is not None and getattr(m, "condition", "") == "text"]
        return min(limits) if limits else None

    def fit_prompts(self, prompts: list[str], mode: str = "hybrid") -> list[str]:
        """`prompts` cut to the bytes the mode's text encoders take (`max_text_len`), as training cut its
        captions (the evaluation asks for the data's own captions, some longer than that). `__call__`
        refuses a longer prompt instead, so a user's prompt is never shortened without a word."""
        from hybrid.nn.embeddings import fit_caption

        limit = self._text_limit(mode)
        return list(prompts) if limit is None else [fit_caption(p, limit) for p in prompts]

    # -- generation -----------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        classes: list[int] | torch.Tensor | None = None,
        prompts: list[str] | None = None,
        mode: str = "hybrid",
        seed: int = 0,
        batch_size: int = 16,
        generator: torch.Generator | None = None,
        return_tokens: bool = False,  # also the AR's codes per batch (hybrid: the refiner's coarse scales only)
        **settings: Any,
    ):
        """Generates one image per class id / prompt: (N, 3, H, W) in [-1, 1].

        settings: cfg, cfg_schedule, temperature, top_k, top_p (AR); steps, sampler, refiner_cfg
        (refiner / diffusion). The same seed, requests and batch size give the same images (a batch's images
        share its draws, so an image depends on its batch); `generator` overrides `seed`.
        """
        s = GenerationSettings(**settings)
        classes, prompts = _as_ids(classes), _as_prompts(prompts)
        n = self._check_request(classes, prompts, mode, batch_size)
        self._check_denoiser(mode, s)
        if generator is None:
            generator = torch.Generator(device=self.device).manual_seed(_seed(seed))
        images, tokens = [], []
        for part_classes, part_prompts in _batches(classes, prompts, n, batch_size):
            out = self._generate_batch(part_classes, part_prompts, mode, s, generator)
            images.append(out[0])
            tokens.append(out[1])
        images = torch.cat(images)
        return (images, tokens) if return_tokens else images

    @property
    def hybrid_shares_ar_tokens(self) -> bool:
        """Whether the `hybrid` mode draws every token scale exactly as the `ar` mode does (the refiner reads
        all scales, `refiner.coarse_scales` 0): then one AR pass serves both (`ar_and_hybrid`)."""
        return "hybrid" in self.modes and coarse_scales(self.parsed["refiner"], self.tokenizer) == len(
            self.tokenizer.scales)

    @torch.no_grad()
    def ar_and_hybrid(self, classes=None, prompts=None, seed: int = 0, batch_size: int = 16,
                      generator: torch.Generator | None = None, **settings: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(ar images, hybrid images) for one request from a single AR pass per batch.

        The hybrid images are what `self(..., mode="hybrid")` returns for the same seed; the ar images
        decode the same tokens without the refiner (a paired comparison of the refiner), for the cost
        of one AR pass instead of two. A request of one batch gives exactly `self(..., mode="ar")`'s
        images too: each batch draws its tokens first and the refiner's noise after them, so only
        later batches' tokens depend on the mode. Needs `hybrid_shares_ar_tokens`.
        """
        if not self.hybrid_shares_ar_tokens:
            raise PipelineError("ar_and_hybrid needs the ar and hybrid modes with a refiner that reads every "
                                "token scale (refiner.coarse_scales 0); generate each mode on its own instead")
        s = GenerationSettings(**settings)
        classes, prompts = _as_ids(classes), _as_prompts(prompts)
        self._check_request(classes, prompts, "ar", batch_size)
        n = self._check_request(classes, prompts, "hybrid", batch_size)
        self._check_denoiser("hybrid", s)
        if generator is None:
            generator = torch.Generator(device=self.device).manual_seed(_seed(seed))
        ar_images, hybrid_images = [], []
        for part_classes, part_prompts in _batches(classes, prompts, n, batch_size):
            ar_cond = self._condition_for("ar", self.ar, part_classes, part_prompts)
            indices = self.ar.generate(ar_cond, self.tokenizer, generator, **self.ar_sampling(s))
            z_q = self.tokenizer.indices_to_latent(indices)
            ar_images.append(self.tokenizer.decode(z_q).clamp(-1, 1))
            hybrid_images.append(self.refine(z_q, part_classes, part_prompts, s, generator))
        return torch.cat(ar_images), torch.cat(hybrid_images)

    def _generate_batch(self, classes, prompts, mode, s: GenerationSettings, generator):
        if mode == "diffusion":
            return self._sample_diffusion(classes, prompts, s, generator), None
        ar_cond = self._condition_for("ar", self.ar, classes, prompts)
        if mode == "ar":
            indices = self.ar.generate(ar_cond, self.tokenizer, generator, **self.ar_sampling(s))
            return self.tokenizer.decode(self.tokenizer.indices_to_latent(indices)).clamp(-1, 1), indices
        n = coarse_scales(self.parsed["refiner"], self.tokenizer)  # the AR writes only the scales the refiner reads
        indices = self.ar.generate(ar_cond, self.tokenizer, generator, num_scales=n, **self.ar_sampling(s))
        z_q = self.tokenizer.latent_from_scales(indices, n)
        return self.refine(z_q, classes, prompts, s, generator), indices

    def ar_sampling(self, s: GenerationSettings | None = None) -> dict[str, Any]:
        """The AR's sampling keywords for `ARModel.generate`: `s`'s where set, else the AR config's `ar.sample`."""
        s = s or GenerationSettings()
        a = self.parsed["ar"].ar.sample
        return {
            "cfg": a.cfg if s.cfg is None else s.cfg,
            "cfg_schedule": s.cfg_schedule or a.cfg_schedule,
            "temperature": a.temperature if s.temperature is None else s.temperature,
            "top_k": a.top_k if s.top_k is None else s.top_k,
            "top_p": a.top_p if s.top_p is None else s.top_p,
        }

    def refine(self, z_q, classes=None, prompts=None, s: GenerationSettings | None = None, generator=None):
        """z_q (B, C, h, w) -> decoded images with the refiner's residual added. z_q holds the refiner's
        `refiner.coarse_scales` first scales (all by default: `tokenizer.latent_from_scales`)."""
        from hybrid.refiner.diffusion import refiner_compose

        s = s or GenerationSettings()
        rcfg = self.parsed["refiner"].refiner
        if classes is None and prompts is None:
            cond = _null_condition(self.refiner, z_q.shape[0], z_q.device)
        else:
            cond = self._condition_for("refiner", self.refiner, classes, prompts)
        x0 = self.refiner_diffusion.sample(
            self.refiner, tuple(z_q.shape), z_q=z_q, cond=cond, steps=s.steps or rcfg.steps,
            generator=generator, cfg=s.refiner_cfg, sampler=s.sampler,
        )
        z = refiner_compose(x0, z_q, refiner_target_std(self.refiner, self.tokenizer), rcfg.target)
        return self.tokenizer.decode(z).clamp(-1, 1)

    def _sample_diffusion(self, classes, prompts, s: GenerationSettings, generator):
        dcfg = self.parsed["diffusion"].diffusion
        cond = self._condition_for("diffusion", self.diffusion, classes, prompts)
        B = len(classes) if classes is not None else len(prompts)
        C, h = self.tokenizer.latent_channels, self.tokenizer.latent_size
        x0 = self.diffusion_diffusion.sample(
            self.diffusion, (B, C, h, h), cond=cond, steps=s.steps or dcfg.steps, generator=generator,
            cfg=s.refiner_cfg, sampler=s.sampler, device=self.device,
        )
        z = self.tokenizer.unstandardize(x0)  # standardised latent -> z
        return self.tokenizer.decode(z).clamp(-1, 1)


def class_prompt(class_id: int) -> str:
    """A procedural class as a text model's prompt, in its captions' words: 'a red circle', 'an orange star'.
    (A glyph class reads 'a red glyph': captions name the glyph itself, 'letter K', which a class leaves open.)"""
    name = class_name(class_id)
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _seed(seed: int) -> int:
    """`seed`, checked: a torch generator takes -2**63 .. 2**64 - 1."""
    try:
        value = operator.index(seed)
    except TypeError:
        value = None
    if value is None or not -2**63 <= value < 2**64:
        raise PipelineError(f"seed {seed!r} is not an integer in -2**63 .. 2**64-1")
    return value


def _device(device: str | torch.device | None) -> torch.device:
    """A `device` argument as sample.py's --device reads it: auto is CUDA when available; a CUDA device on a
    machine without one is a PipelineError before any model is built."""
    try:
        return resolve_device(device, flag="device")
    except ValueError as err:
        raise PipelineError(str(err)) from None


def _as_ids(classes) -> torch.Tensor | None:
    """Class ids as a 1-D long tensor (None stays None; one int is one request). Raises PipelineError for
    anything that is not a sequence of whole numbers (a float id, a 2-D tensor, a string), or no request."""
    if classes is None:
        return None
    if isinstance(classes, str):
        raise PipelineError(f"class ids must be integers, got the string {classes!r} (prompts go in prompts=)")
    if not isinstance(classes, (torch.Tensor, int)) and not hasattr(classes, "__array__") and \
            hasattr(classes, "__iter__"):
        classes = list(classes)  # a generator, map, set, ...: read once
    try:
        ids = torch.as_tensor(classes)
    except (TypeError, ValueError, RuntimeError):
        raise PipelineError(f"class ids must be integers, got {classes!r}") from None
    if ids.numel() == 0:
        raise PipelineError("no class ids given: pass at least one")
    if ids.dim() > 1:
        raise PipelineError(f"class ids must be one id or a flat list of ids, got a tensor of shape {tuple(ids.shape)}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise PipelineError(f"class ids must be integers, got {ids.dtype} values")
    return ids.reshape(-1).long()


def _as_prompts(prompts) -> list[str] | None:
    """Prompts as a list (None stays None; one string is one prompt, not one per character). Raises
    PipelineError for a non-string prompt, or no request."""
    if prompts is None:
        return None
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise PipelineError("no prompts given: pass at least one")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise PipelineError(f"prompts must be strings, got {bad[0]!r}")
    return prompts


def _batches(classes: torch.Tensor | None, prompts: list[str] | None, n: int, batch_size: int):
    """(class ids, prompts) per batch of `batch_size` requests; the side not given stays None."""
    for start in range(0, n, batch_size):
        yield (classes[start : start + batch_size] if classes is not None else None,
               prompts[start : start + batch_size] if prompts is not None else None)


def _null_condition(model, batch: int, device):
    """The unconditional input of a denoiser for `batch` samples (None when it takes no condition)."""
    kind = getattr(model, "condition", "none")
    if kind == "none":
        return None
    if kind == "class":
        return torch.full((batch,), model.class_embed.null_id, dtype=torch.long, device=device)
    return [""] * batch


def _load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], path) -> None:
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shapes that differ: torch lists every one, one per line
        lines = [line.strip() for line in str(err).splitlines() if "size mismatch" in line]
        raise CheckpointError(f"'{path}' does not fit the model its config describes ({len(lines)} shape(s) differ; "
                              f"first: {lines[0] if lines else str(err).splitlines()[0]})") from None
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"'{path}' does not fit the model its config describes (missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]})"
        )

