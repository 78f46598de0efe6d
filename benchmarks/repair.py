"""Does repair training help where it matters? Hybrid samples from AR-sampled tokens, per refiner variant (issue #6).

    python -m benchmarks.repair --run-dir runs/main --out runs/bench/repair.json \\
        [--variant repair:refiner.corrupt_prob=0.1 --variant plain:refiner.corrupt_prob=0] \\
        [--num-samples 2000] [--device auto] [--config FILE] [key=value ...]

The run directory must hold a trained tokenizer and AR stage. Each `--variant NAME:key=value,...`
is a refiner trained (when `<run-dir>/repair/NAME/refiner/final.ckpt` is missing) exactly as
`python train.py stage=refiner` trains one, on the run's tokenizer, with those overrides; one already there is
reused only when its stored config has the values those overrides ask for (else an error, before anything
trains: delete its folder or give the variant another name), and `trained_with` records, from the checkpoint,
the values its refiner was trained with. Each NAME is given once, and not `ar` or `real` (the benchmark's own
rows). Then the
run's AR model samples tokens for the same class prompts (same seeds) and each refiner refines them:
FID (oracle features, 95% bootstrap interval) and class-prompt adherence per variant, beside the
pure-AR images (z_q decoded alone). Every row answers the same requests with the same AR tokens, so
each variant also gets paired differences (one bootstrap draws the same rows of both): FID(variant) -
FID(pure AR) as `fid_vs_ar`, and, after the first variant, FID(variant) - FID(first variant) as
`fid_vs_first`; an interval that excludes 0 says the two differ. `refiner.corrupt_prob` is the repair
knob (the fraction of coarse tokens replaced by near-miss codes in training); 0 trains on clean tokens only.
The samples are generated and judged on `--device` (default: CUDA when available), recorded as
`machine.device`; the refiners train on `trainer.accelerator`'s device.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import hybrid as _hybrid  # noqa: F401 -- before torch loads: OpenMP's short spin (hybrid/__init__.py)

# isort: split

from benchmarks.common import (
    add_device_argument,
    at_least,
    benchmark_device,
    config_and_oracle,
    judge_class_prompts,
    machine,
    one_line_errors,
    output_file,
    parse_with_overrides,
    write_result,
)

DEFAULT_VARIANTS = ["repair:refiner.corrupt_prob=0.1", "plain:refiner.corrupt_prob=0"]
# the names of this benchmark's own rows: pure AR's (its features, its grids under <run-dir>/repair/ar) and the
# real images' features; a variant of either name overwrote them
RESERVED_NAMES = ("ar", "real")


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, rest = text.partition(":")
    if not name or not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"--variant '{text}': expected NAME:key=value,... with a plain NAME")
    if name in RESERVED_NAMES:
        raise ValueError(f"--variant '{text}': the name '{name}' is taken by the benchmark's own rows "
                         f"({', '.join(RESERVED_NAMES)}); give the variant another name")
    overrides = [o for o in rest.split(",") if o]
    for o in overrides:
        if "=" not in o:
            raise ValueError(f"--variant '{text}': '{o}' is not key=value")
    return name, overrides


def parse_variants(texts: list[str]) -> list[tuple[str, list[str]]]:
    """`parse_variant` of each; a name given twice is refused: one row and one refiner folder stood for both,
    trained with the first one's overrides and recorded with the last one's."""
    variants = [parse_variant(text) for text in texts]
    names = [name for name, _ in variants]
    twice = [name for name in names if names.count(name) > 1]
    if twice:
        raise ValueError(f"--variant: the name '{twice[0]}' is given more than once; give each variant its own name")
    return variants


_UNKNOWN = object()  # a key a checkpoint's stored config has no value for


def override_keys(extra: list[str]) -> list[str]:
    """The dotted keys of key=value overrides, in order, once each."""
    return list(dict.fromkeys(item.split("=", 1)[0] for item in extra))


def trained_settings(path: Path, keys: list[str]) -> dict:
    """{key: its value in the config the refiner checkpoint at `path` was trained with (its `hyper_parameters`),
    `_UNKNOWN` where the stored config has no such key} for each dotted key."""
    from hybrid.checkpoints import load_checkpoint

    config = load_checkpoint(path, expect_stage="refiner")["hyper_parameters"]["config"]
    out = {}
    for key in keys:
        node = config
        for part in key.split("."):
            node = node[part] if isinstance(node, dict) and part in node else _UNKNOWN
            if node is _UNKNOWN:
                break
        out[key] = node
    return out


def reuse_problem(name: str, extra: list[str], vcfg, path: Path) -> str | None:
    """Why the refiner already at `path` (which `fit_stage` would reuse, not train) cannot stand for variant `name`:
    a key its overrides name has another value in the config the checkpoint was trained with (the JSON recorded
    the new overrides beside the old refiner's results). A key the stored config lacks cannot be told: the JSON's
    `trained_with` records it as null. None when it can stand."""
    from omegaconf import OmegaConf

    diffs = []
    for key, then in trained_settings(path, override_keys(extra)).items():
        now = OmegaConf.select(vcfg, key)
        now = OmegaConf.to_container(now, resolve=True) if OmegaConf.is_config(now) else now
        if then is not _UNKNOWN and then != now:
            diffs.append(f"{key}={then!r}, not {now!r}")
    if not diffs:
        return None
    return (f"variant '{name}': its refiner {path} was trained with {'; '.join(diffs)}; delete {path.parent} "
            f"to train it with these overrides, or give the variant another name")


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--variant", action="append", default=None, help="NAME:key=value,... (repeatable)")
    parser.add_argument("--num-samples", type=at_least(2), default=2000, help="class prompts per row (>= 2: FID)")
    parser.add_argument("--config", default=None)
    parser.add_argument("--out", default=None, type=output_file)
    add_device_argument(parser)
    args, overrides = parse_with_overrides(parser, argv)
    device = benchmark_device(args.device)
    if device is None:
        return 2
    try:
        variants = parse_variants(args.variant or DEFAULT_VARIANTS)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from hybrid.checkpoints import final_path
    from hybrid.config import load_cli_config
    from hybrid.lit.runner import fit_stage
    from hybrid.pipeline import HybridPipeline

    run_dir = Path(args.run_dir)
    tok_path, ar_path = final_path(run_dir, "tokenizer"), final_path(run_dir, "ar")
    for what, path in (("tokenizer", tok_path), ("AR stage", ar_path)):
        if not path.is_file():
            print(f"error: {run_dir} has no trained {what} ({path} is missing)", file=sys.stderr)
            return 1
    vcfgs = {}  # each variant's config, and a refiner it would reuse checked against it, before anything trains
    for name, extra in variants:
        vdir = run_dir / "repair" / name
        vcfg = load_cli_config(args.config, [*overrides, *extra, f"run_dir={vdir}", f"tokenizer.checkpoint={tok_path}"])
        if vcfg is None:
            return 2
        # an adopted refiner.checkpoint is a copy whose config is its own (adopt_checkpoint compares the copy)
        if final_path(vdir, "refiner").is_file() and not vcfg.retrain and not vcfg.refiner.checkpoint:
            problem = reuse_problem(name, extra, vcfg, final_path(vdir, "refiner"))
            if problem:
                print(f"error: {problem}", file=sys.stderr)
                return 2
        vcfgs[name] = vcfg
    cfg, oracle = config_and_oracle(args.config, [f"run_dir={run_dir}", *overrides], device)
    if cfg is None:
        return oracle
    result = {"machine": machine(device), "command": "python -m benchmarks.repair " + " ".join(
        sys.argv[1:] if argv is None else argv), "num_samples": args.num_samples, "variants": {}}

    from hybrid.eval.fid import paired_fid_difference

    features = {}  # oracle features per judged row: the same prompts and seeds give the same AR tokens in every row

    def judge(pipe, name: str, mode: str) -> dict:
        kept = {}
        entry = judge_class_prompts(pipe, oracle, cfg, run_dir / "repair" / name, (mode,), args.num_samples,
                                    keep_features=kept)[mode]
        features[name], features["real"] = kept[mode], kept["real"]
        return entry

    def paired(name: str, other: str) -> dict:
        """FID(name) - FID(other) on the same requests and tokens, with a paired bootstrap interval."""
        d = paired_fid_difference(features[name], features[other], features["real"], cfg.eval.bootstrap)
        return {"row": other, "difference": d["difference"], "ci": d["ci"]}

    def paired_text(d: dict) -> str:
        return f"{d['difference']:+.2f} [{d['ci'][0]:+.2f}, {d['ci'][1]:+.2f}] vs {d['row']}"

    def line(name: str, entry: dict) -> str:
        lo, hi = entry["fid_ci"]
        adh = entry["adherence"]
        return (f"{name:12s} FID {entry['fid']:7.2f} [{lo:6.2f}, {hi:6.2f}]  shape {100 * adh['shape']:5.1f}%  "
                f"color {100 * adh['color']:5.1f}%")

    for name, extra in variants:
        vcfg = vcfgs[name]
        t0 = time.time()
        trained = not final_path(vcfg.run_dir, "refiner").is_file()
        fit_stage(vcfg, "refiner")
        # what the judged refiner was trained with, from its checkpoint (a reused one's checked above); null: not
        # in its stored config
        keys = list(dict.fromkeys(["refiner.corrupt_prob", "refiner.corrupt_neighbors", *override_keys(extra)]))
        trained_with = {key: None if value is _UNKNOWN else value
                        for key, value in trained_settings(final_path(vcfg.run_dir, "refiner"), keys).items()}
        result["variants"][name] = {"overrides": extra, "trained_with": trained_with,
                                    "corrupt_prob": trained_with["refiner.corrupt_prob"],
                                    "corrupt_neighbors": trained_with["refiner.corrupt_neighbors"],
                                    "train_minutes": round((time.time() - t0) / 60, 2) if trained else None}
    pipe = HybridPipeline.from_checkpoints(tok_path, ar=ar_path, device=device)
    result["ar"] = judge(pipe, "ar", "ar")
    print(line("pure AR", result["ar"]), flush=True)
    first = variants[0][0]
    for name, _ in variants:
        pipe = HybridPipeline.from_checkpoints(tok_path, ar=ar_path, refiner=final_path(run_dir / "repair" / name,
                                                                                        "refiner"), device=device)
        entry = result["variants"][name]
        entry.update(judge(pipe, name, "hybrid"))
        entry["fid_vs_ar"] = paired(name, "ar")
        text = f"  {paired_text(entry['fid_vs_ar'])}"
        if name != first:
            entry["fid_vs_first"] = paired(name, first)
            text += f"; {paired_text(entry['fid_vs_first'])}"
        print(line(name, entry) + text, flush=True)
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
