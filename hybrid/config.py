"""Experiment configuration: typed dataclass schemas, YAML files and `key=value` overrides.

`load_config(path, overrides)` merges, in order: the schema's defaults, the YAML file, the
command-line overrides; validates the result against the schemas and returns an OmegaConf
`DictConfig` typed by `ExperimentConfig`. Every problem is raised as `ConfigError`, a one-line
message naming the key (and the closest valid keys for a misspelt one).
"""

from __future__ import annotations

import difflib
import math
import os
import re
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from hybrid.names import CFG_SCHEDULES, SAMPLERS, TIMESTEP_DENSITIES  # what the model code dispatches on

STAGES = ("tokenizer", "oracle", "ar", "refiner", "diffusion", "eval", "all")


class ConfigError(ValueError):
    """A configuration problem, with a one-line message that names the key."""


# --------------------------------------------------------------------------------------------
# Schemas
# --------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Optimisation and logging knobs of one stage (each stage has its own copy)."""

    max_steps: int = 1000
    max_minutes: float = 0.0  # wall-clock cap for the stage; 0 = none
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup_steps: int = 50
    lr_final: float = 0.1  # the cosine decay ends at lr * lr_final at max_steps (1 = constant after the warm-up)
    batch_size: int = 64  # per device; the log states the global batch size
    grad_clip: float = 1.0  # 0 = off
    accumulate: int = 1
    log_every: int = 25
    image_every: int = 500  # PNG grid every N steps; 0 = only at the end
    ckpt_every: int = 200  # last.ckpt every N steps (atomic write)
    val_every: int = 0  # validation every N steps; 0 = at the end of the stage only
    ema_decay: float = 0.999  # stages with EMA (refiner, diffusion)
    ema_warmup: float = 10.0  # effective decay = min(ema_decay, (1 + step) / (ema_warmup + step))


@dataclass
class DataConfig:
    source: str = "procedural"  # procedural | shards
    image_size: int = 32
    shards: str = ""  # training shards (brace pattern, e.g. data/train-{000000..000009}.tar)
    val_shards: str = ""  # evaluation shards; empty = procedural validation split or shards' own
    train_size: int = 1_000_000  # procedural: distinct training indices
    val_size: int = 1000  # validation images (procedural) per evaluation pass
    batches_per_epoch: int = 200  # resampled training: batches per epoch on every rank
    num_workers: int = 0
    seed: int = 0
    holdout: list[str] = field(default_factory=list)  # "color:shape" pairs never seen in training
    caption_keep: float = 0.7  # probability that a training caption names each attribute
    two_object_prob: float = 0.3
    glyph_prob: float = 0.2  # probability that the first object is a glyph
    num_classes: int = 0  # class count for class conditioning; 0 = the procedural dataset's (shape x color)


@dataclass
class AttentionConfig:
    backend: str = "auto"  # auto | xformers | sdpa | math


@dataclass
class TrainerConfig:
    accelerator: str = "auto"  # auto | cpu | gpu (Lightning's cuda, mps, tpu too)
    devices: Any = "auto"  # int, list or "auto"
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | fsdp (ddp_spawn is refused: `validate`)
    precision: str = "auto"  # auto = bf16-mixed on GPU and on CPUs with hardware bf16, else 32-true (hybrid.precision)
    # torch.compile the AR / denoiser training step; auto = on for CPU runs with a C++ compiler (hybrid.precision)
    compile: Any = "auto"
    deterministic: bool = False
    progress_bar: bool = True


@dataclass
class TokenizerConfig:
    pretrained: str = ""  # local diffusers AutoencoderKL folder (frozen); empty = train our own
    # filled by the tokenizer stage from `pretrained` (the AutoencoderKL's architecture, as diffusers' config), so
    # its checkpoints and exports rebuild it without the folder (the weights are in their state dict); not set by hand
    pretrained_config: dict[str, Any] = field(default_factory=dict)
    downsample: int = 4  # 4 or 8
    # 16: the continuous latent carries detail (texture, exact edges) that the shared 1024-code
    # quantizer cannot, so the residual is worth refining. Measured at 400 steps on 1000 held-out
    # images (benchmarks.tokenizer): reconstruction FID continuous / discrete 94.7 / 96.0 with 4
    # channels, 89.6 / 96.8 with 8, 79.9 / 87.5 with 16, at the same PSNR (28.7-29.0 / 28.2-28.4 dB).
    latent_channels: int = 16
    # conv channels per resolution level (padded with the last entry); [32, 64] with patch_size 2: a
    # batch-64 32x32 step is ~0.3 s on 2 CPU cores ([64, 128, 128] without the stem costs ~14x the FLOPs)
    channels: list[int] = field(default_factory=lambda: [32, 64])
    layers_per_block: int = 1
    patch_size: int = 2  # space-to-depth stem: the convs run at image_size / patch_size
    shortcut: bool = True  # fixed low-pass shortcut around the conv stacks (DC-AE style residual autoencoding)
    # token grid sides, increasing, ending at the latent size (image_size / downsample)
    scales: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 6, 8])
    # true lets scales end below the latent size: a coarser token grid, the residual keeps the finer detail.
    # Measured at 900 steps (version-2 oracle, 2,000 images): [1,2,3,4,6] decodes z at FID 141 against 60
    # with the full grid, so it is off by default
    coarse_grid: bool = False
    codebook_size: int = 1024
    commitment: float = 0.25
    discrete_prob: float = 0.5  # probability that a batch trains the decoder on z_q
    # a z_q batch's gradient reaches the encoder; false = only z batches (and the commitment loss) train it.
    # Measured with scales [1,2,3,4,6], commitment 0.05, 900 steps (version-2 oracle, 2,000 images): false
    # decodes z at FID 190.7 against 117.1 with it (discrete_prob 0.5 vs 0.3, so not a one-key comparison)
    straight_through: bool = True
    loss: str = "l1"  # l1 | mse
    dead_code_steps: int = 50  # restart codes unused for this many steps
    ema_decay: float = 0.99  # EMA codebook decay
    phi_ratio: float = 0.0  # VAR-style shared refinement conv on upsampled codes; 0 = none (0.5 with pretrained)
    checkpoint: str = ""  # take the tokenizer from this file (copied into the run) instead of training it
    # 900 steps: the stage fits its 8-minute budget on a 2-core CPU (~0.17 s/step at batch 64 in bf16). Longer
    # tokenizers give much better FID (2400 steps: decode(z_q) FID 12.7, shape 93.9%, against 44.3 / 84.7%), but
    # within the default experiment's 30 minutes their time comes off the AR stage: 1500 tokenizer + 800 AR steps
    # scored AR FID 34.8 against 44.5 and shape 52.2% against 58.6% (docs/results.md, "The 30-minute default",
    # 2026-11-28).
    # lr 3e-3 (was 1e-3), measured at 900 steps on 5,000 held-out images (benchmarks.tokenizer, version-2 oracle),
    # decode(z_q) FID / shape adherence: 1e-3 62.4 [59.2, 65.2] / 75.2%, 2e-3 48.2 / 82.2%, 3e-3 44.3 [41.9, 46.5] /
    # 84.7%, 4e-3 41.3 / 85.0% (seed 1: 37.2 / 85.3%); 8e-3 diverged near step 250, so 3e-3 keeps a margin below it
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=900, lr=3e-3))


@dataclass
class OracleConfig:
    backbone: str = "resnet10t"  # any timm model name (no pretrained weights)
    feature_dim: int = 128  # pre-logit feature vector (the FID space)
    stem_stride: int = 2  # ResNets: stem downsamples by 1 or 2 instead of 4 (small inputs); 0 = model's own stem
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model arguments
    path: str = ""  # empty = <cache_dir>/oracle-<image_size>-data<version>.safetensors (hybrid.eval.oracle)
    # color:shape pairs whose accuracy is measured and stored separately: the pairs composition tests
    # hold out of the generators' data (data.holdout). The oracle itself trains on them unless
    # exclude_holdout: an oracle that never saw them learns color->shape shortcuts (measured: shape
    # 84.3%, fill 89.4% on them vs 98.9% / 96.6% on fresh samples) and would misjudge exactly those images.
    holdout: list[str] = field(default_factory=lambda: ["red:triangle", "blue:circle", "green:star"])
    exclude_holdout: bool = False
    glyph_prob: float = 0.3  # training only: probability that the first object is a glyph
    num_workers: int = 0  # DataLoader workers rendering images; 0 measured faster on a 2-core CPU (0.78 vs 1.16 s/step)
    eval_samples: int = 5000  # fresh images for the stored/printed accuracy
    holdout_samples: int = 2000  # images of held-out color:shape combinations
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=2000, lr=2e-3, batch_size=128))


@dataclass
class SampleConfig:
    # cfg 4 rising linearly over the scales (was 2, constant): on the same AR checkpoints (default tokenizer, lr 2e-3,
    # 1,000 class prompts, version-2 oracle) FID / shape 65.2 / 58.1% against 75.5 / 47.6% after the 1200-step stage,
    # 88.0 / 23.5% against 93.0 / 22.8% after a 450-step one, 88.5 / 31.3% against 95.5 / 25.3% after a 600-step one
    cfg: float = 4.0  # classifier-free guidance scale
    cfg_schedule: str = "linear"  # constant | linear (rises from 1 to cfg over scales/tokens)
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


@dataclass
class ARConfig:
    order: str = "next_scale"  # next_scale | raster
    condition: str = "class"  # class | text
    # 4.28 M params with adaLN (2.88 M without); a batch-64 step on 2 CPU cores: 1.29 s fp32, 0.74 s bf16-mixed
    width: int = 192
    depth: int = 6
    heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    drop_path: float = 0.0
    cond_drop: float = 0.1  # probability of the null condition in training (for guidance)
    max_text_len: int = 64  # bytes
    adaln: bool = True  # the condition also modulates every block (adaLN-Zero); false = in-context start token only
    token_cache: bool = True  # train on a pool of pre-encoded images (no tokenizer encoder in the step)
    token_cache_size: int = 20000  # images in that pool at least (at most max_steps x batch_size are encoded)
    # the pool grows past token_cache_size so that no image is drawn more often than this (0 = fixed size): with a
    # 20,000 pool a 6000-step AR (19 draws per image) fell from shape 78.0 to 71.6% between steps 4500 and 6000;
    # with 100,000 (3.8) it rose to 86.0% (configs/long.yaml tokenizer, 1,000 class prompts, 2026-12-05)
    # 2 instead of 4 on a 9000-step AR: shape 85.9 / 89.3% at steps 7500 / 9000 against 89.0 / 86.0%, within the
    # +-2-point noise, so no lift for twice the encoding (2026-12-06)
    token_cache_passes: float = 4.0
    checkpoint: str = ""  # take the AR from this file (copied into the run) instead of training it
    sample: SampleConfig = field(default_factory=SampleConfig)
    # lr 2e-3 (was 5e-4): measured side by side on the default tokenizer (version-2 data and oracle, 1,000 class
    # prompts), at 150 / 300 / 450 steps color adherence 67.8 / 85.2 / 91.4% against 18.3 / 45.3 / 68.6%, shape
    # 14.2 / 19.3 / 28.1% against 13.8 / 14.1 / 15.9%, FID 121.1 / 97.7 / 99.8 against 253.9 / 157.9 / 109.3.
    # lr 4e-3 (was 2e-3): the complete 1200-step stage on the lr-3e-3 tokenizer, one run each (2026-11-28, 1,000 class
    # prompts, cfg 4 linear), at 600 / 900 / 1200 steps shape 42.1 / 58.0 / 65.7% against 36.7 / 49.6 / 54.1%,
    # color 95.1% against 91.4% and FID 47.4 [42.4, 51.8] against 51.8 [47.0, 57.0] at 1200; stable, no seed repeat
    # 1000 steps (was 1200), for the default experiment's 30-minute budget: two 1000-step seeds scored shape 60.4 /
    # 65.8%, FID 44.23 / 42.96 against one 1200-step run's 64.2%, 43.02, judged alike (1,000 class prompts, 2026-11-28)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=1000, lr=4e-3, weight_decay=0.05))


@dataclass
class DenoiserConfig:
    arch: str = "dit"  # dit | mlp
    width: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    condition: str = "class"  # none | class | text
    objective: str = "ddpm"  # ddpm | flow
    prediction: str = "v_prediction"  # ddpm only: v_prediction | epsilon | sample
    sampler: str = "ddim"  # ddim | dpm (ddpm trainer); euler | dpm (flow trainer)
    # on AR-sampled tokens 1 step beat decode(z_q) and 2-8 steps did not (docs/results.md, the paired test)
    steps: int = 1
    num_train_timesteps: int = 1000
    cond_drop: float = 0.1
    max_text_len: int = 64  # bytes (condition=text)
    timestep_density: str = "logit_normal"  # flow only: logit_normal | uniform | mode (diffusers.training_utils)
    flow_shift: float = 1.0  # flow only: sigma shift of the training and sampling schedules
    checkpoint: str = ""  # take this denoiser from this file (copied into the run) instead of training it


@dataclass
class RefinerConfig(DenoiserConfig):
    target: str = "residual"  # residual | latent
    corrupt_prob: float = 0.1  # fraction of coarse tokens replaced by other codes in training (repair)
    # token scales in the refiner's coarse input; 0 = all of the tokenizer's. N > 0: z_q holds scales 1..N only,
    # the refiner generates the rest (the finer scales' codes and the continuous residual) and the hybrid uses
    # only the AR's first N scales. Its target (z - z_q) is scaled by its own per-channel std, measured on the
    # first training batch and saved with the weights (`target_std`)
    coarse_scales: int = 0
    corrupt_neighbors: int = 8  # a replacement is one of the k codes nearest the true one; 0 = any code
    # 900 steps (was 1200), for the default experiment's 30-minute budget; at 1200 the refiner did not beat z_q either
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=900, lr=5e-4))


@dataclass
class DiffusionConfig(DenoiserConfig):
    width: int = 192
    depth: int = 8  # 5.51 M params: AR with adaLN (4.28 M) + refiner (1.28 M) = 5.56 M (the showdown's +-20% match)
    steps: int = 25
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=800, lr=5e-4))


@dataclass
class GenerationSettings:
    """Per-call sampling settings (the pipeline's keywords, `sample.py`'s flags, `eval.settings`); None = the
    stage's config default."""

    cfg: float | None = None  # AR classifier-free guidance
    cfg_schedule: str | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    steps: int | None = None  # refiner / diffusion steps
    sampler: str | None = None
    refiner_cfg: float = 1.0

    def __post_init__(self) -> None:
        """Ranges no sampler can use are a ValueError naming the setting (temperature 0 is greedy, top_k 0 and
        top_p 1 are off); which samplers a denoiser takes is checked where its objective is known."""
        rules = {"steps": (self.steps, lambda v: v >= 1, ">= 1"), "top_k": (self.top_k, lambda v: v >= 0, ">= 0"),
                 "top_p": (self.top_p, lambda v: 0 < v <= 1, "in (0, 1]"),
                 "temperature": (self.temperature, lambda v: v >= 0, ">= 0 (0 is greedy)"),
                 "cfg": (self.cfg, lambda v: v >= 0, ">= 0 (1 is unguided)"),
                 "refiner_cfg": (self.refiner_cfg, lambda v: v >= 0, ">= 0 (1 is unguided)"),
                 "cfg_schedule": (self.cfg_schedule, lambda v: v in CFG_SCHEDULES,
                                  f"one of {', '.join(CFG_SCHEDULES)}")}
        for name, (value, ok, rule) in rules.items():
            if isinstance(value, float) and not math.isfinite(value):  # cfg=inf picked codes past the codebook
                raise ValueError(f"generation setting {name}={value}: it must be a finite number, {rule}")
            if value is not None and not ok(value):
                raise ValueError(f"generation setting {name}={value}: it must be {rule}")

    @classmethod
    def parse(cls, text: str) -> dict[str, Any]:
        """"cfg=4,temperature=0.5,top_k=10" -> {"cfg": 4.0, "temperature": 0.5, "top_k": 10}, typed by
        the field; an unknown key, a missing '=' or a value of the wrong type is a ValueError naming it."""
        kinds = {f.name: str(f.type) for f in fields(cls)}
        out: dict[str, Any] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = part.partition("=")
            key = key.strip()
            if not sep or key not in kinds:
                raise ValueError(f"generation setting '{part}': expected KEY=VALUE with KEY one of {', '.join(kinds)}")
            if key in out:  # the last one silently won
                raise ValueError(f"generation setting '{key}' is given twice; give each once")
            kind = int if kinds[key].startswith("int") else float if kinds[key].startswith("float") else str
            try:
                out[key] = kind(value.strip())
            except ValueError:
                raise ValueError(f"generation setting '{part}': {key} takes {kind.__name__}, got '{value}'") from None
        return out


@dataclass
class EvalConfig:
    num_samples: int = 2000
    # Real images FID compares against (procedural data): 0 = as many as num_samples. Rendering and judging
    # a real image costs about a twentieth of generating one, so a larger real set narrows FID's interval
    # cheaply; every real image is one row of the bootstrap's resampling.
    num_real: int = 0
    batch_size: int = 100
    bootstrap: int = 200
    modes: list[str] = field(default_factory=lambda: ["tokenizer", "ar", "hybrid"])
    # A local copy of torch-fidelity's InceptionV3 weights (the 'fid' extra): adds classic Inception
    # FID beside the oracle's; with data.source=shards it is the only FID (the oracle judges the
    # procedural data only). Nothing is downloaded.
    inception_weights: str = ""
    # Generation settings for every judged mode, as `GenerationSettings.parse` reads them: "steps=1" (refiner
    # or diffusion steps), "cfg=3,temperature=0.9", ...; empty = each stage's own config.
    settings: str = ""
    # Which set of class/glyph requests and generation seeds to judge on: 0 (the default; sampling settings
    # were chosen on it), or another draw to check a setting chosen on draw 0 on requests it was not chosen on
    # (the "fresh prompts" numbers of README.md and docs/results.md are draw 1; the showdown's seed s is
    # draw s). The real images stay the same.
    draw: int = 0
    # Also judge every mode against the real images through the run's tokenizer, decode(encode(x).z): the
    # `*_decoded_ref` fields of metrics.json. It costs one tokenizer pass per real image, 2.1-2.4x what the
    # real set costs (measured on the 2-core CPU): seconds by default, most of an hour at 1,500,000 real images;
    # and a second copy of the real features in memory (about 1 kB per real image).
    decoded_reference: bool = True


@dataclass
class ExperimentConfig:
    name: str = "default"
    run_dir: str = ""  # empty = runs/<name>
    cache_dir: str = "cache"  # shared between runs (the oracle lives here)
    stage: str = "all"
    seed: int = 0
    retrain: bool = False  # retrain a stage whose checkpoint exists
    with_diffusion: bool = False  # stage=all also trains the pure-diffusion baseline
    init_from: str = ""  # warm-start the stage from another run's checkpoint
    init_strict: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    oracle: OracleConfig = field(default_factory=OracleConfig)
    ar: ARConfig = field(default_factory=ARConfig)
    refiner: RefinerConfig = field(default_factory=RefinerConfig)
    diffusion: DiffusionConfig = field(default_factory=lambda: DiffusionConfig(condition="class"))
    eval: EvalConfig = field(default_factory=EvalConfig)


CHOICES: dict[str, tuple[str, ...]] = {
    "stage": STAGES,
    "data.source": ("procedural", "shards"),
    "attention.backend": ("auto", "xformers", "sdpa", "math"),
    "trainer.accelerator": ("auto", "cpu", "gpu", "cuda", "mps", "tpu"),  # Lightning's
    "trainer.strategy": ("auto", "ddp", "fsdp"),
    # Lightning's Trainer precisions and their aliases (32 = 32-true, 16 = 16-mixed, bf16 = bf16-mixed,
    # 64 = 64-true), plus auto (hybrid.precision); not transformer-engine, which needs a package we do not ship
    "trainer.precision": ("auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true",
                          "32", "16", "bf16", "64"),
    "trainer.compile": ("auto", True, False),
    "tokenizer.loss": ("l1", "mse"),
    "tokenizer.downsample": (4, 8),
    "oracle.stem_stride": (0, 1, 2),
    "ar.order": ("next_scale", "raster"),
    "ar.condition": ("class", "text"),
    "refiner.arch": ("dit", "mlp"),
    "refiner.condition": ("none", "class", "text"),
    "refiner.objective": ("ddpm", "flow"),
    "refiner.prediction": ("v_prediction", "epsilon", "sample"),
    "refiner.target": ("residual", "latent"),
    "diffusion.arch": ("dit", "mlp"),
    "diffusion.condition": ("none", "class", "text"),
    "diffusion.objective": ("ddpm", "flow"),
    "diffusion.prediction": ("v_prediction", "epsilon", "sample"),
    # names the model code dispatches on (hybrid/names.py); `sampler` is checked against `objective` by the
    # trainer x sampler matrix (SAMPLERS) in `validate`
    "ar.sample.cfg_schedule": CFG_SCHEDULES,
    "refiner.timestep_density": TIMESTEP_DENSITIES,
    "diffusion.timestep_density": TIMESTEP_DENSITIES,
}
# Keys whose value is a list of choices: the modes stage=eval judges (hybrid.eval.evaluate; diffusion is judged
# whenever the run has one)
LIST_CHOICES: dict[str, tuple[str, ...]] = {"eval.modes": ("tokenizer", "ar", "hybrid", "diffusion")}

TRAINED_STAGES = ("tokenizer", "oracle", "ar", "refiner", "diffusion")  # the sections with a `train` block

# Counts that must be >= 1, and counts that may be 0 (off, none, all: see the schemas) but not negative.
POSITIVE_KEYS = (
    "data.train_size", "data.val_size", "data.batches_per_epoch", "trainer.num_nodes", "tokenizer.latent_channels",
    "tokenizer.codebook_size", "oracle.feature_dim", "oracle.eval_samples", "ar.width", "ar.depth", "ar.heads",
    "ar.max_text_len", "eval.num_samples", "eval.batch_size",
    *(f"{name}.{key}" for name in ("refiner", "diffusion")
      for key in ("width", "depth", "heads", "steps", "num_train_timesteps", "max_text_len")),
    *(f"{stage}.train.{key}" for stage in TRAINED_STAGES for key in ("batch_size", "accumulate")),
)
NON_NEGATIVE_KEYS = (
    "seed", "data.seed", "data.num_workers", "data.num_classes", "tokenizer.dead_code_steps", "oracle.num_workers",
    "tokenizer.layers_per_block",
    "oracle.holdout_samples", "ar.token_cache_size", "ar.sample.top_k", "refiner.coarse_scales",
    "refiner.corrupt_neighbors", "eval.draw",
    *(f"{stage}.train.{key}" for stage in TRAINED_STAGES
      for key in ("warmup_steps", "log_every", "image_every", "ckpt_every", "val_every")),
)

# Float keys and their ranges. Each of these once went unchecked: a value out of range failed only when its stage
# built its model or optimizer, after the stages before it had trained ("Invalid weight_decay value: -1.0", naming
# no key), or trained something else without a word (mlp_ratio 0: blocks with no MLP; negative max_minutes: no
# time limit).
PROBABILITY_KEYS = ("data.caption_keep", "data.two_object_prob", "data.glyph_prob", "oracle.glyph_prob",
                    "tokenizer.discrete_prob", "ar.cond_drop", "ar.dropout", "ar.drop_path", "refiner.cond_drop",
                    "refiner.corrupt_prob", "diffusion.cond_drop")
# decays and mixing ratios; train.ema_decay 0 = no EMA
FRACTION_KEYS = ("tokenizer.ema_decay", "tokenizer.phi_ratio",
                 *(f"{stage}.train.{key}" for stage in TRAINED_STAGES for key in ("ema_decay", "lr_final")))
NON_NEGATIVE_FLOAT_KEYS = ("tokenizer.commitment", *(f"{stage}.train.{key}" for stage in TRAINED_STAGES
                                                      for key in ("weight_decay", "grad_clip", "ema_warmup",
                                                                  "max_minutes")))
POSITIVE_FLOAT_KEYS = ("ar.mlp_ratio", "refiner.mlp_ratio", "diffusion.mlp_ratio", "refiner.flow_shift",
                       "diffusion.flow_shift")

# Keys that name files or folders which must exist when set.
PATH_KEYS = ("tokenizer.pretrained", "tokenizer.checkpoint", "ar.checkpoint", "refiner.checkpoint",
             "diffusion.checkpoint", "init_from", "eval.inception_weights")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _all_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    if isinstance(node, DictConfig):
        for k in node.keys():
            full = f"{prefix}{k}"
            keys.append(full)
            keys.extend(_all_keys(node._get_node(k), full + "."))
    return keys


def _unknown_key_error(key: str, schema: DictConfig, source: str) -> ConfigError:
    valid = _all_keys(schema)
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    if not close:  # a misspelt last part: compare against siblings
        parent = key.rsplit(".", 1)[0] + "." if "." in key else ""
        close = [k for k in valid if k.startswith(parent) and k.count(".") == key.count(".")][:6]
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"unknown config key '{key}' ({source}){hint}")


def _check_devices(devices) -> None:
    """`trainer.devices` as Lightning takes it: a count >= 1, -1 (all), auto, a list of distinct device ids, or
    those as text ("2", "0,1"). Anything else failed only when the stage's Trainer was built, in Lightning's words
    (`devices` selected with `CPUAccelerator` should be an int > 0), naming no key."""
    fix = "give a count >= 1, -1 (all), auto, or a list of distinct device ids such as [0,1]"
    ids = None
    if isinstance(devices, bool):
        raise ConfigError(f"config key 'trainer.devices' is {devices}; {fix}")
    if isinstance(devices, int):
        if devices == 0 or devices < -1:
            raise ConfigError(f"config key 'trainer.devices' is {devices}; {fix}")
        return
    if isinstance(devices, str):
        text = devices.strip()
        if text == "auto" or re.fullmatch(r"-1|[1-9]\d*", text):
            return
        if not re.fullmatch(r"\d+(\s*,\s*\d+)*,?", text) or text == "0":  # "0": no device, as the int 0
            raise ConfigError(f"config key 'trainer.devices' is {devices!r}; {fix}")
        ids = [int(part) for part in text.split(",") if part.strip()]
    elif isinstance(devices, (list, tuple, ListConfig)):
        ids = list(devices)
        if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise ConfigError(f"config key 'trainer.devices' is {list(devices)}; {fix}")
    else:
        raise ConfigError(f"config key 'trainer.devices' is {devices!r}; {fix}")
    if len(set(ids)) != len(ids):
        raise ConfigError(f"config key 'trainer.devices' lists device ids {ids} with repeats; {fix}")


def _section_given_a_value(base: DictConfig, other: DictConfig, prefix: str = "") -> str | None:
    """The dotted key, at any depth, that is a section of keys in `base` but a plain value in `other`."""
    for k in other:
        if not isinstance(base, DictConfig) or k not in base:
            continue
        node, given = base._get_node(k), other._get_node(k)
        if isinstance(node, DictConfig) and not isinstance(given, DictConfig):
            return f"{prefix}{k}"
        if isinstance(node, DictConfig):
            found = _section_given_a_value(node, given, f"{prefix}{k}.")
            if found:
                return found
    return None


def _merge_checked(base: DictConfig, other: DictConfig, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except (ConfigKeyError, ConfigAttributeError) as err:
        key = getattr(err, "full_key", None) or str(err)
        raise _unknown_key_error(str(key), base, source) from None
    except ValidationError as err:
        key = getattr(err, "full_key", None)
        if not key:  # a whole section given a plain value (`ar: 5`, `ar.train=3`): omegaconf names no key
            key = _section_given_a_value(base, other) or "?"
            if key != "?":
                section = OmegaConf.select(base, key)
                raise ConfigError(f"config key '{key}' ({source}) is a section of keys (e.g. {key}."
                                  f"{next(iter(section))}), not the value "
                                  f"{OmegaConf.select(other, key)!r}") from None
        if "is not a ListConfig" in str(err):
            raise ConfigError(f"config key '{key}' ({source}) takes a list: write it in brackets and quote it "
                              f'for the shell, e.g. "{key}=[a,b]"') from None
        raise ConfigError(f"config key '{key}' ({source}): {_first_line(err)}") from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"{source}: {_first_line(err)}") from None


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def parse_overrides(overrides: list[str]) -> DictConfig:
    """`["a.b=1", "c=x"]` -> DictConfig; values are parsed as YAML (ints, floats, lists, bools)."""
    dotlist = []
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key = item.split("=", 1)[0]
        if "" in key.split("."):
            raise ConfigError(f"override '{item}': the key '{key}' has an empty part; write dotted keys as "
                              f"section.key=value, e.g. ar.train.lr=3e-4")
        dotlist.append(item + "''" if item.endswith("=") else item)  # `key=` clears a text key (not None)
    for item in dotlist:  # one at a time, so that the error names the override (values are YAML)
        try:
            OmegaConf.from_dotlist([item])
        except Exception as err:  # omegaconf's errors, and yaml's parser and scanner errors (an unclosed bracket)
            hint = (' (quote lists for the shell, e.g. "tokenizer.scales=[1,2,4]")'
                    if "[" in item.split("=", 1)[1] else "")
            raise ConfigError(f"override '{item}': the value is not valid YAML: {_first_line(err)}{hint}") from None
    try:
        return OmegaConf.from_dotlist(dotlist)
    except Exception as err:  # each is valid alone, not together: `eval.modes=[ar] eval.modes.5=1`
        raise ConfigError(f"overrides: {_first_line(err)}") from None


def _resolve_interpolations(cfg: DictConfig) -> None:
    """Resolve every `${...}` interpolation in place (a value may name another key, e.g.
    `refiner.train.lr=${ar.train.lr}`), so that validation, `--print-config` and the saved config.yaml see
    values; one that cannot be resolved is a ConfigError naming its key."""
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        raise ConfigError(f"config key '{key or '?'}': {_first_line(err)}") from None


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> DictConfig:
    """Schema defaults <- YAML file <- overrides, validated. Raises ConfigError."""
    cfg = OmegaConf.structured(ExperimentConfig)
    if path is not None:
        p = Path(path)
        if not p.is_file():
            from hybrid.checkpoints import path_problem

            raise ConfigError(f"config file '{p}' {path_problem(p) or 'is not a regular file'}")
        try:
            loaded = OmegaConf.load(p)
        except Exception as err:  # yaml errors come in many types
            raise ConfigError(f"config file '{p}' is not valid YAML: {_first_line(err)}") from None
        if loaded is not None and not isinstance(loaded, DictConfig):
            raise ConfigError(f"config file '{p}' must hold a mapping of config keys (as configs/default.yaml "
                              f"does), not a {type(loaded).__name__.replace('Config', '').lower()}")
        if loaded is None:  # an empty file: the defaults
            loaded = OmegaConf.create({})
        cfg = _merge_checked(cfg, loaded, f"in {p}")
    if overrides:
        cfg = _merge_checked(cfg, parse_overrides(overrides), "on the command line")
    try:  # run_dir's default first: `cache_dir=${run_dir}/cache` means the run's folder, not /cache
        if not cfg.run_dir and cfg.name.strip() not in ("", ".", ".."):  # else validate refuses the name
            cfg.run_dir = str(run_dir_of(cfg))
    except OmegaConfBaseException:  # an unresolvable name=${...}: named by the resolution below
        pass
    _resolve_interpolations(cfg)
    validate(cfg)
    return cfg


def run_dir_of(cfg: DictConfig) -> Path:
    """The run directory: `run_dir`, or runs/<name> when it is empty."""
    return Path(cfg.run_dir or Path("runs") / cfg.name)


def load_cli_config(path: str | os.PathLike | None, overrides: list[str] | None) -> DictConfig | None:
    """`load_config` for the command-line tools: no --config means configs/default.yaml (when it
    exists); a ConfigError is printed as one line and None is returned (the tool exits with 2)."""
    if path is None and Path("configs/default.yaml").is_file():
        path = "configs/default.yaml"
    try:
        return load_config(path, overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return None


def suggested_scales(latent: int) -> list[int]:
    """Token grid sides for a `latent`-sided latent, in the default's pattern: the sizes 2^k and 3*2^k below
    it, then `latent` itself (8 gives the default [1, 2, 3, 4, 6, 8]; 16 gives [1, 2, 3, 4, 6, 8, 12, 16])."""
    sides = sorted({b << k for b in (1, 3) for k in range(latent.bit_length()) if (b << k) < latent})
    return [*sides, latent]


def stage_plan(cfg: DictConfig) -> list[str]:
    """The stages `train.py` runs for this config, in order (`stage=all`: the default experiment)."""
    if cfg.stage != "all":
        return [cfg.stage]
    # The oracle judges the procedural data only: on the user's own shards it is not trained.
    plan = ["tokenizer", "oracle", "ar", "refiner"]
    if cfg.data.source != "procedural":
        plan.remove("oracle")
    if cfg.with_diffusion or cfg.diffusion.checkpoint:
        plan.append("diffusion")
    return plan + ["eval"]


def _set_aside(path: str) -> bool:
    """Whether `path` lay in a stage folder that `retrain=true` set aside: the runner reads it from there
    (`runner.followed`), e.g. when a requeued `stage=ar retrain=true init_from=RUN/ar/final.ckpt` starts again."""
    from hybrid.checkpoints import set_aside_copy

    return set_aside_copy(path) is not None


def _builds_tokenizer_from_folder(cfg: DictConfig) -> bool:
    """Whether this command builds a tokenizer from `tokenizer.pretrained`'s folder: it runs the tokenizer stage
    and that stage has not finished in the run (or is retrained). Later stages, sample.py and exports rebuild the
    autoencoder from the config its checkpoints store, without the folder."""
    if not cfg.tokenizer.pretrained or cfg.tokenizer.checkpoint or "tokenizer" not in stage_plan(cfg):
        return False
    from hybrid.checkpoints import final_path

    return bool(cfg.retrain) or not final_path(run_dir_of(cfg), "tokenizer").is_file()


def _pretrained_downsample(folder: str) -> int | None:
    """The downsampling factor (2 ** (levels - 1)) of the diffusers AutoencoderKL in `folder`, from its
    config.json; None when that is unreadable (the tokenizer stage names the problem when it loads the folder)."""
    import json

    try:
        return 2 ** (len(json.loads((Path(folder) / "config.json").read_text())["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _classes_json(pattern: str) -> tuple[Path, dict] | None:
    """(path, {class name: id}) of the `classes.json` beside the first shard of `pattern`, found as the reader
    expands the pattern (folders, globs, brace ranges, `~`, `::`), or, when it matches no shard yet (the data
    module names such a pattern), in the folder the pattern names; None when there is none (shards written
    elsewhere, captions only)."""
    import json

    from hybrid.data.shards import expand_shards

    try:
        folder = Path(expand_shards(pattern)[0]).parent
    except FileNotFoundError:
        first = Path(pattern.split("::")[0].strip()).expanduser()
        folder = first if first.is_dir() else Path(str(first).split("{", 1)[0]).parent
    try:
        path = folder / "classes.json"
        ids = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return (path, ids) if isinstance(ids, dict) else None


def _check_num_classes_against_classes_json(cfg: DictConfig) -> None:
    """`data.num_classes` against the `classes.json` the shards writer puts beside the shards: 0 (the procedural
    data's 42) or fewer than it lists would build a class table that does not fit the shards. Validation shards
    with their own `classes.json` (written to another --out) must give every class the training shards' id:
    theirs start again at 0, and the evaluation would ask for one class and judge against another."""
    train = _classes_json(cfg.data.shards)
    if train is None:
        return
    path, ids = train
    from hybrid.data.shards import class_ids_problem

    problem = class_ids_problem(ids, dense=False)  # a hand-edited file; a validation mapping must match it (below)
    if problem:
        raise ConfigError(f"config key 'data.shards': '{path}' is not a usable class mapping: {problem} (write the "
                          f"shards again with python -m hybrid.data.shards write ... --overwrite)")
    needed = max(ids.values(), default=-1) + 1  # ids may skip some when the shards were built by hand
    if cfg.data.num_classes < needed:
        given = "0 (the procedural data's classes)" if cfg.data.num_classes == 0 else str(cfg.data.num_classes)
        listed = f"lists {len(ids)} classes" + (f" with ids up to {needed - 1}" if needed != len(ids) else "")
        raise ConfigError(f"config key 'data.num_classes' is {given}, but '{path}' {listed}: "
                          f"set data.num_classes={needed}")
    val = _classes_json(cfg.data.val_shards) if cfg.data.val_shards else None
    if val is None or val[0].resolve() == path.resolve():
        return
    val_path, val_ids = val
    wrong = [name for name, cid in val_ids.items() if ids.get(name) != cid]
    if wrong:
        name = wrong[0]
        theirs = f"id {ids[name]}" if name in ids else "no id (it is not a training class)"
        raise ConfigError(
            f"config key 'data.val_shards': '{val_path}' gives class '{name}' id {val_ids[name]}, but the training "
            f"shards' '{path}' gives it {theirs}" + (f" ({len(wrong)} classes differ)" if len(wrong) > 1 else "")
            + f"; write the validation folder into the training shards' folder (python -m hybrid.data.shards write "
            f"--folder VAL --split val --out {path.parent}), which keeps their ids")


def _nan_key(node: Any, prefix: str = "") -> str | None:
    """The first dotted key, at any depth, of a plain config (`OmegaConf.to_container`) whose value is a float
    nan: every comparison with nan is False, so a range check would let it through."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, value in items:
        key = f"{prefix}[{k}]" if isinstance(node, list) else f"{prefix}.{k}" if prefix else str(k)
        if isinstance(value, float) and math.isnan(value):
            return key
        found = _nan_key(value, key)
        if found:
            return found
    return None


def validate(cfg: DictConfig) -> None:
    """Checks that the schema's types cannot express: choices, ranges, files that must exist."""
    if not cfg.run_dir and cfg.name.strip() in ("", ".", ".."):
        raise ConfigError(f"config key 'name' is {cfg.name!r} and run_dir is empty: the run would write its stage "
                          f"folders into {os.path.normpath(Path('runs') / cfg.name.strip())}/ itself; give a name "
                          f"(its run goes to runs/<name>) or a run_dir")
    if cfg.trainer.strategy == "ddp_spawn":  # offered until 2026-12-07, when it was found never to have started
        raise ConfigError("config key 'trainer.strategy' is 'ddp_spawn', which the stage runner does not support: it "
                          "starts each rank by pickling the Trainer, whose callbacks (the SLURM requeue, the resume "
                          "messages, the EMA's kept raw weights) cannot be, and whose results would stay in the "
                          "spawned processes; use trainer.strategy=ddp, which starts the ranks itself (on CPUs too)")
    not_a_number = _nan_key(OmegaConf.to_container(cfg))
    if not_a_number:
        raise ConfigError(f"config key '{not_a_number}' is nan; give it a number")
    for key, choices in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in choices:
            raise ConfigError(f"config key '{key}' is {value!r}; choose one of {', '.join(map(str, choices))}")
    for key, choices in LIST_CHOICES.items():
        for value in OmegaConf.select(cfg, key):
            if value not in choices:
                raise ConfigError(f"config key '{key}' has {value!r}; choose among {', '.join(map(str, choices))}")
    if not cfg.eval.modes:
        raise ConfigError("config key 'eval.modes' is empty; name the modes to judge, e.g. \"eval.modes=[ar,hybrid]\" "
                          "(the diffusion baseline is judged whenever the run has it)")
    if cfg.eval.num_samples < 2:
        raise ConfigError(f"config key 'eval.num_samples' is {cfg.eval.num_samples}; FID needs at least 2 images")
    if cfg.eval.num_real < 0 or cfg.eval.num_real == 1:
        raise ConfigError(f"config key 'eval.num_real' is {cfg.eval.num_real}; FID needs at least 2 real images "
                          "(0 = as many as eval.num_samples)")
    for keys, low in ((POSITIVE_KEYS, 1), (NON_NEGATIVE_KEYS, 0)):
        for key in keys:
            value = OmegaConf.select(cfg, key)
            if value < low:
                raise ConfigError(f"config key '{key}' is {value}; it must be >= {low}")
    if cfg.tokenizer.codebook_size < 2:
        raise ConfigError(f"config key 'tokenizer.codebook_size' is {cfg.tokenizer.codebook_size}; it must be >= 2")
    for stage in TRAINED_STAGES:
        train = cfg[stage].train
        if not 0 < train.lr < math.inf:
            raise ConfigError(f"config key '{stage}.train.lr' is {train.lr}; it must be a finite number > 0")
        if train.max_steps < 1 and not (train.max_steps == -1 and train.max_minutes > 0):
            raise ConfigError(f"config key '{stage}.train.max_steps' is {train.max_steps}; it must be >= 1 (or -1, no "
                              f"step limit, with {stage}.train.max_minutes > 0)")
    _check_devices(cfg.trainer.devices)
    for name in ("refiner", "diffusion"):  # sampling's default step count, within the training timesteps
        section = cfg[name]
        if section.steps > section.num_train_timesteps and (section.objective, section.sampler) != ("flow", "euler"):
            raise ConfigError(f"config key '{name}.steps' is {section.steps}, more than {name}.num_train_timesteps "
                              f"({section.num_train_timesteps}): its {section.sampler} sampler has no more timesteps "
                              f"(only the flow objective's euler sampler takes any count)")
    if cfg.eval.bootstrap < 2:
        raise ConfigError(f"config key 'eval.bootstrap' is {cfg.eval.bootstrap}; it must be >= 2: fewer resamples "
                          f"give zero-width intervals, which every 'outside the interval' verdict would pass")
    sample = cfg.ar.sample
    try:  # the AR's default sampling settings obey the same ranges as sample.py's flags and eval.settings
        GenerationSettings(cfg=sample.cfg, cfg_schedule=sample.cfg_schedule, temperature=sample.temperature,
                           top_k=sample.top_k, top_p=sample.top_p)
    except ValueError as err:
        raise ConfigError(f"config key 'ar.sample': {err}") from None
    for key in PATH_KEYS:
        value = OmegaConf.select(cfg, key)
        if value and value.startswith("~"):  # `key=~/x` on a command line reaches us unexpanded
            value = os.path.expanduser(value)
            OmegaConf.update(cfg, key, value)
        if key == "tokenizer.pretrained" and not _builds_tokenizer_from_folder(cfg):
            continue  # the run's trained tokenizer carries the autoencoder; its folder may have moved
        if value and not Path(value).exists() and not (key == "init_from" and _set_aside(value)):
            raise ConfigError(f"config key '{key}': '{value}' does not exist")
        if value and key != "tokenizer.pretrained" and Path(value).is_dir():  # a checkpoint or weights file
            raise ConfigError(f"config key '{key}': '{value}' is a folder, not a file"
                              + (f" (the stage's checkpoint is {Path(value) / 'final.ckpt'})"
                                 if (Path(value) / "final.ckpt").is_file() else ""))
    if cfg.tokenizer.pretrained_config:
        raise ConfigError("config key 'tokenizer.pretrained_config' is filled by the tokenizer stage from "
                          "tokenizer.pretrained (its checkpoints store it); leave it empty")
    if cfg.init_from and cfg.stage not in ("tokenizer", "ar", "refiner", "diffusion"):
        raise ConfigError(f"config key 'init_from' warm-starts one stage, but stage is {cfg.stage}: add the stage "
                          "the checkpoint belongs to (e.g. stage=ar)")
    if cfg.data.source == "shards" and not cfg.data.shards:
        raise ConfigError("config key 'data.shards' must name the training shards when data.source=shards")
    if cfg.data.source != "shards" and (cfg.data.shards or cfg.data.val_shards):
        key = "data.shards" if cfg.data.shards else "data.val_shards"
        raise ConfigError(f"config key '{key}' is set, but data.source is {cfg.data.source}, which does not read it: "
                          "add data.source=shards")
    if cfg.data.source == "shards":
        from hybrid.data.shards import expand_shards

        for key in ("data.shards", "data.val_shards"):
            try:
                if OmegaConf.select(cfg, key):
                    expand_shards(OmegaConf.select(cfg, key))
            except ValueError as err:  # a malformed pattern (unbalanced braces)
                raise ConfigError(f"config key '{key}': {err}") from None
            except FileNotFoundError:  # no shard yet: the data module names the pattern when it reads
                pass
        _check_num_classes_against_classes_json(cfg)
    if not 16 <= cfg.data.image_size <= 256:
        raise ConfigError(f"config key 'data.image_size' is {cfg.data.image_size}; it must be within 16..256")
    downsample, source = cfg.tokenizer.downsample, f"tokenizer.downsample {cfg.tokenizer.downsample}"
    known = not cfg.tokenizer.pretrained  # the latent size, unless a pretrained folder's config.json says it
    if cfg.tokenizer.pretrained and _builds_tokenizer_from_folder(cfg):
        factor = _pretrained_downsample(cfg.tokenizer.pretrained)
        if factor is not None:
            downsample, known = factor, True
            source = f"the downsampling {factor} of tokenizer.pretrained '{cfg.tokenizer.pretrained}'"
    if known and cfg.data.image_size % downsample:
        raise ConfigError(f"config key 'data.image_size' is {cfg.data.image_size}, which {source} does not divide")
    latent = cfg.data.image_size // downsample
    scales = list(cfg.tokenizer.scales)
    if scales != sorted(set(scales)) or not scales or scales[0] < 1:
        raise ConfigError(f"config key 'tokenizer.scales' must be strictly increasing positive ints, got {scales}")
    sizes = f"(data.image_size {cfg.data.image_size} / {source})"
    fix = f'e.g. "tokenizer.scales=[{",".join(map(str, suggested_scales(latent)))}]"'  # copy-pasteable
    if known and scales[-1] > latent:
        raise ConfigError(
            f"config key 'tokenizer.scales' must not exceed the latent size {latent} {sizes}, got {scales}; {fix}")
    if known and scales[-1] < latent and not cfg.tokenizer.coarse_grid:
        raise ConfigError(
            f"config key 'tokenizer.scales' must end at the latent size {latent} {sizes}, got {scales}; {fix}, "
            "or set tokenizer.coarse_grid=true for a token grid coarser than the latent")
    if cfg.data.source == "shards" and cfg.ar.condition == "class" and cfg.refiner.condition == "text":
        raise ConfigError("config key 'refiner.condition' is text with ar.condition=class on your own shards: the "
                          "hybrid mode is asked class ids, which carry no caption for the refiner; use the same "
                          "condition for both (or refiner.condition=class / none)")
    coarse = cfg.refiner.coarse_scales
    plan = stage_plan(cfg)
    # only against a tokenizer this command trains: another's scales (a checkpoint's, a run's) are checked at build
    if coarse > len(scales) and "tokenizer" in plan and not cfg.tokenizer.checkpoint:
        raise ConfigError(f"config key 'refiner.coarse_scales' is {coarse}; the tokenizer has {len(scales)} scales "
                          f"({scales}), so choose 0 (all) to {len(scales)}")
    for name in ("refiner", "diffusion"):
        sec = cfg[name]
        ok = SAMPLERS[sec.objective]
        if sec.sampler not in ok:
            raise ConfigError(
                f"config key '{name}.sampler' is '{sec.sampler}', which does not sample a '{sec.objective}' "
                f"model; choose one of {', '.join(ok)}")
    for name in ("ar", "refiner", "diffusion"):
        sec = cfg[name]
        if sec.width % 4:
            raise ConfigError(f"config key '{name}.width' is {sec.width}; it must be a multiple of 4 "
                              "(the 2D sin/cos positions)")
        # the AR's blocks, a DiT denoiser's blocks and a text-conditioned denoiser's text encoder attend
        if (name == "ar" or sec.arch == "dit" or sec.condition == "text") and sec.width % sec.heads:
            divisors = [h for h in range(1, 17) if sec.width % h == 0]
            raise ConfigError(f"config key '{name}.heads' is {sec.heads}; it must divide {name}.width {sec.width} "
                              f"(e.g. {', '.join(map(str, divisors))})")
    try:
        settings = GenerationSettings.parse(cfg.eval.settings)
    except ValueError as err:
        raise ConfigError(f"config key 'eval.settings': {err}") from None
    _check_generation_settings(cfg, settings)
    from hybrid.data.attributes import parse_holdout

    for key in ("data.holdout", "oracle.holdout"):  # here, not after the oracle has trained
        try:
            parse_holdout(OmegaConf.select(cfg, key))
        except ValueError as err:
            raise ConfigError(f"config key '{key}': {err}") from None
    if cfg.ar.token_cache_passes < 0:
        raise ConfigError(f"config key 'ar.token_cache_passes' is {cfg.ar.token_cache_passes}; it must be >= 0 "
                          f"(0 keeps the pool at ar.token_cache_size)")
    for key in PROBABILITY_KEYS:
        value = OmegaConf.select(cfg, key)
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"config key '{key}' is {value}; it must be a probability in [0, 1]")
    for key in FRACTION_KEYS:
        value = OmegaConf.select(cfg, key)
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"config key '{key}' is {value}; it must be within [0, 1]")
    for key in NON_NEGATIVE_FLOAT_KEYS:
        value = OmegaConf.select(cfg, key)
        if not value >= 0.0:
            raise ConfigError(f"config key '{key}' is {value}; it must be >= 0")
    for key in POSITIVE_FLOAT_KEYS:
        value = OmegaConf.select(cfg, key)
        if not value > 0.0:
            raise ConfigError(f"config key '{key}' is {value}; it must be > 0")
    if not cfg.tokenizer.channels or min(cfg.tokenizer.channels) < 1:
        raise ConfigError(f"config key 'tokenizer.channels' must be a list of positive ints (conv channels per "
                          f"level), got {list(cfg.tokenizer.channels)}")
    for name in ("ar", "refiner", "diffusion"):  # a block's MLP has int(width x mlp_ratio) hidden units
        sec = cfg[name]
        if int(sec.width * sec.mlp_ratio) < 1:
            raise ConfigError(f"config key '{name}.mlp_ratio' is {sec.mlp_ratio}; with {name}.width {sec.width} its "
                              "MLP would have no hidden unit")


def _check_generation_settings(cfg: DictConfig, settings: dict[str, Any]) -> None:
    """`eval.settings`' values, as the config's own keys are checked: stage=eval runs after every stage has
    trained, so a value that fails there must fail here. `sampler` must sample every denoiser it reaches: the
    refiner's (when `eval.modes` has hybrid) and the diffusion baseline's (when it is trained or asked for)."""
    def bad(key: str, rule: str) -> ConfigError:
        return ConfigError(f"config key 'eval.settings' sets {key}={settings[key]}; {rule}")

    try:
        GenerationSettings(**settings)
    except ValueError as err:
        raise ConfigError(f"config key 'eval.settings': {err}") from None
    sampler = settings.get("sampler")
    known = list(dict.fromkeys(name for names in SAMPLERS.values() for name in names))
    if sampler is not None and sampler not in known:
        raise bad("sampler", f"choose one of {', '.join(known)}")
    # against the objective of a denoiser this command trains; one trained earlier (stage=eval on a run) has its
    # own, which the evaluation checks when it loads it
    plan = stage_plan(cfg)
    judged = [name for name, mode in (("refiner", "hybrid"), ("diffusion", "diffusion"))
              if name in plan and (mode in cfg.eval.modes or name == "diffusion")]
    for name in judged:
        section = cfg[name]
        steps, uses = settings.get("steps"), sampler or section.sampler
        if steps is not None and steps > section.num_train_timesteps and (section.objective, uses) != ("flow", "euler"):
            raise bad("steps", f"{name}.num_train_timesteps is {section.num_train_timesteps}, and its {uses} sampler "
                      f"has no more timesteps (only the flow objective's euler sampler takes any count)")
        objective = section.objective
        if sampler is not None and sampler not in SAMPLERS[objective]:
            model = {"refiner": "the refiner", "diffusion": "the diffusion baseline"}[name]
            raise bad("sampler", f"it does not sample {model}'s '{objective}' model ({name}.objective); "
                      f"choose one of {', '.join(SAMPLERS[objective])}")


def to_dict(cfg: DictConfig) -> dict:
    """The resolved config as a plain dict of builtins (safe for `torch.load(weights_only=True)`)."""
    return OmegaConf.to_container(cfg, resolve=True)


def from_dict(data: dict) -> DictConfig:
    """Rebuild a typed config from `to_dict`'s output (e.g. one stored in a checkpoint).

    Keys the current schema no longer has are dropped, so old checkpoints stay loadable.
    """
    schema = OmegaConf.structured(ExperimentConfig)
    return OmegaConf.merge(schema, _filter_known(schema, data))


def _filter_known(schema: DictConfig, data: dict) -> dict:
    out = {}
    for key, value in data.items():
        if key not in schema:
            continue
        node = schema._get_node(key)
        # a schema section is filtered in turn; a free-form dict key (oracle.backbone_kwargs,
        # tokenizer.pretrained_config) keeps all its entries
        section = isinstance(node, DictConfig) and OmegaConf.get_type(node) is not dict
        out[key] = _filter_known(node, value) if section and isinstance(value, dict) else value
    return out


def config_groups() -> str:
    """One line per top-level group with its keys, for `train.py --help`."""
    schema = OmegaConf.structured(ExperimentConfig)
    lines = []
    for key in schema.keys():
        node = schema._get_node(key)
        if isinstance(node, DictConfig):
            lines.append(f"  {key}: {', '.join(str(k) for k in node.keys())}")
        else:
            lines.append(f"  {key}")
    return "\n".join(lines)
