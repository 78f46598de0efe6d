"""Where does the AR stage lose an attribute? Sample with the first scales taken from real images.

    python -m benchmarks.given_scales --run-dir DIR [--num-images 1000] [--sample cfg=4,...]
        [--device auto] [--config FILE] [--out FILE] [key=value ...]

For held-out procedural images, the tokenizer's codes of the first m scales are given to the AR
model (`ARModel.generate(given=...)`), which writes the remaining scales for the image's own class;
z_q of the result is decoded (the `ar` mode's images) and judged by the oracle against *that image's*
attributes (shape, color, position, size, fill, background), with FID against fresh real images.
m = 0 is plain class-conditional sampling (position, size, fill and background are then the AR's
free choice, so only shape and color are requests); m = K (every scale given) is the tokenizer's own
decode(z_q), the ceiling. The scale after which an attribute stops being kept is where the AR loses it. Each row also
judges the given codes alone (their accumulated latent decoded, no AR): what the coarse scales
hold by themselves, against what the AR's later scales add to or take from it.
Needs a run directory with a trained tokenizer and next-scale AR, and the cached oracle. Runs on `--device`
(default: CUDA when available), recorded as `machine.device`.
"""

from __future__ import annotations

import argparse
import sys

import hybrid as _hybrid  # noqa: F401 -- before torch loads: OpenMP's short spin (hybrid/__init__.py)

# isort: split

import torch

from benchmarks.common import (
    add_judging_arguments,
    at_least,
    fmt_ci,
    heldout_images,
    heldout_samples,
    machine,
    one_line_errors,
    start_judging,
    write_result,
)
from hybrid.config import GenerationSettings

EVAL_SEED = 43_001  # held-out images whose first scales are given
REAL_SEED = 43_002  # fresh real images for FID
ATTRS = ("shape", "color", "position", "size", "fill", "background")


def sample_with_given(pipe, indices: list[torch.Tensor], classes: torch.Tensor, m: int,
                      settings: GenerationSettings, batch: int = 100, seed: int = 0) -> torch.Tensor:
    """Decoded z_q (N, 3, H, W) of AR samples whose first m scales are `indices`' (one seed for all m), drawn with
    `settings` (`pipe.ar_sampling` fills what they leave unset from the AR's config)."""
    generator = torch.Generator(pipe.device).manual_seed(seed)
    kwargs = pipe.ar_sampling(settings)
    out = []
    for i in range(0, classes.shape[0], batch):
        given = [t[i:i + batch] for t in indices[:m]]
        tokens = pipe.ar.generate(classes[i:i + batch], pipe.tokenizer, generator, given=given, **kwargs)
        out.append(pipe.tokenizer.decode(pipe.tokenizer.indices_to_latent(tokens)).clamp(-1, 1))
    return torch.cat(out)


def decode_given_only(tok, indices: list[torch.Tensor], m: int, batch: int = 250) -> torch.Tensor:
    """Decoded latent accumulated from the first m scales' codes alone (no AR; m = 0 decodes a zero latent):
    what the given tokens hold without the scales the AR adds."""
    return torch.cat([tok.decode(tok.latent_from_scales([t[i:i + batch] for t in indices], m)).clamp(-1, 1)
                      for i in range(0, indices[0].shape[0], batch)])


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.given_scales", description=__doc__.split("\n\n")[0])
    add_judging_arguments(parser, "run directory with a trained tokenizer and AR",
                          "cfg, cfg_schedule, temperature, top_k, top_p")
    parser.add_argument("--num-images", type=at_least(2), default=1000, help="held-out images (>= 2: FID)")
    started = start_judging(parser, argv)
    if isinstance(started, int):
        return started
    args, settings, cfg, oracle = started
    generation = GenerationSettings(**settings)  # --sample as the pipeline takes it (its ranges checked already)
    from hybrid.pipeline import HybridPipeline, PipelineError
    try:
        pipe = HybridPipeline.from_run(args.run_dir, device=args.device)
    except (PipelineError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if pipe.ar is None or pipe.ar.order != "next_scale" or pipe.ar.condition != "class":
        print(f"error: {args.run_dir} needs a class-conditioned next_scale AR stage", file=sys.stderr)
        return 1
    from hybrid.eval.adherence import adherence
    from hybrid.eval.fid import bootstrap_fid, oracle_features

    tok = pipe.tokenizer
    data = heldout_samples(tok.image_size, args.num_images, EVAL_SEED, two_object_prob=cfg.data.two_object_prob,
                           glyph_prob=cfg.data.glyph_prob)
    classes, attrs = data["class_id"], {a: data["attrs"][a] for a in ATTRS}
    real = oracle_features(heldout_images(tok.image_size, args.num_images, REAL_SEED,
                                          two_object_prob=cfg.data.two_object_prob, glyph_prob=cfg.data.glyph_prob),
                           oracle)
    scales = list(tok.scales)
    rows = []
    print(f"{'given scales':>14} {'images':>19} {'FID [95% CI]':>24}  " + " ".join(f"{a:>10}" for a in ATTRS))
    with torch.no_grad():
        indices = [torch.cat(parts) for parts in zip(*(tok.encode(data["image"][i:i + 250].to(args.device)).indices
                                                       for i in range(0, args.num_images, 250)))]
        for m in range(len(scales) + 1):
            images = sample_with_given(pipe, indices, classes, m, generation)
            row = {"given": m, "given_scales": scales[:m],
                   "fid": bootstrap_fid(oracle_features(images, oracle), real, cfg.eval.bootstrap),
                   "adherence": adherence(images, attrs, oracle)}
            alone = decode_given_only(tok, indices, m)
            row["given_only"] = {"fid": bootstrap_fid(oracle_features(alone, oracle), real, cfg.eval.bootstrap),
                                 "adherence": adherence(alone, attrs, oracle)}
            rows.append(row)
            label = "none" if m == 0 else f"1..{scales[m - 1]}" + (" (all)" if m == len(scales) else "")
            for name, entry in (("AR writes the rest", row), ("given codes alone", row["given_only"])):
                print(f"{label:>14} {name:>19} {fmt_ci(entry['fid']):>24}  "
                      + " ".join(f"{100 * entry['adherence'][a]:9.1f}%" for a in ATTRS), flush=True)
    command = "python -m benchmarks.given_scales " + " ".join(sys.argv[1:] if argv is None else argv)
    write_result(args.out, {"machine": machine(args.device), "command": command, "num_images": args.num_images,
                            "settings": settings, "ar_sampling": pipe.ar_sampling(generation), "scales": scales,
                            "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
