"""What the benchmarks share: --device, machine description, held-out images, JSON output."""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys

import torch

from hybrid.devices import describe_machine as machine  # noqa: F401 - the benchmarks' name for it


def one_line_errors(main):
    """Decorator of a benchmark's `main(argv)`: a checkpoint, pipeline or config error (each names its file or
    key) ends the benchmark with that one line and exit 1, not a traceback (a truncated `final.ckpt` under
    `--reuse`, a stage folder without its checkpoint). Any other error keeps its traceback."""
    @functools.wraps(main)
    def guarded(argv=None):
        try:
            return main(argv)
        except ValueError as err:
            from hybrid.checkpoints import CheckpointError
            from hybrid.config import ConfigError
            from hybrid.pipeline import PipelineError

            if not isinstance(err, (CheckpointError, ConfigError, PipelineError)):
                raise
            print(f"error: {err}", file=sys.stderr)
            return 1
    return guarded


def _writable_target(text: str, kind: str) -> str:
    """`text` unless a `kind` ("file" or "folder") cannot be written there: an existing path of the other kind,
    or a nearest existing parent that is not a writable folder."""
    path = os.path.abspath(os.path.expanduser(text))
    if kind == "file" and os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"'{text}' is a folder; give a JSON file path")
    if kind == "folder" and os.path.exists(path) and not os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"'{text}' is a file; give a folder")
    from hybrid.checkpoints import nearest_existing

    parent = str(nearest_existing(path if kind == "folder" and os.path.isdir(path) else os.path.dirname(path)))
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"'{text}' cannot be written: '{parent}' is not a writable folder")
    return text


def output_file(text: str) -> str:
    """argparse `type` of `--out FILE`: checked when the arguments are parsed, so a path that cannot be written
    fails before the work, not after it (the results would be lost)."""
    return _writable_target(text, "file")


def output_folder(text: str) -> str:
    """argparse `type` of `--out FOLDER` (the showdown's): as `output_file`, for a folder."""
    return _writable_target(text, "folder")


def at_least(minimum: int, multiple_of: int = 1):
    """argparse `type` of an integer flag that must be >= `minimum` and a multiple of `multiple_of` (a count,
    a step, a width): a bad value is argparse's error naming the flag and the value (exit 2) when the arguments
    are parsed, before any work, not a traceback from deep inside it (an empty median, FID of one sample)."""
    def parse(text: str) -> int:
        value = int(text)  # not an integer: argparse's "invalid int value: 'abc'"
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        if value % multiple_of:
            raise argparse.ArgumentTypeError(f"must be a multiple of {multiple_of}, got {value}")
        return value

    parse.__name__ = "int"
    return parse


def non_negative_float(text: str) -> float:
    """argparse `type` of a float flag that must be >= 0 (a guidance scale)."""
    value = float(text)  # not a number: argparse's "invalid float value"
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


non_negative_float.__name__ = "float"


def positive_float(text: str) -> float:
    """argparse `type` of a float flag that must be finite and > 0 (a ratio, a time budget)."""
    value = float(text)
    if not math.isfinite(value):  # nan and inf: a count derived from it was a traceback (int(nan)) or endless
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


positive_float.__name__ = "float"


def int_list(minimum: int = 1, maximum: int | None = None):
    """argparse `type` of comma-separated integers, each in minimum..maximum: '1,2,4' -> [1, 2, 4]. An empty entry
    ('1,,2', '1,2,') is refused, not skipped: it is a typo for a value that was meant."""
    def parse(text: str) -> list[int]:
        parts = text.split(",")
        if not text.strip():
            raise argparse.ArgumentTypeError("expected at least one integer")
        if any(not part.strip() for part in parts):
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}' (an empty entry)")
        try:
            values = [int(part) for part in parts]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None
        for value in values:
            if value < minimum or (maximum is not None and value > maximum):
                span = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"
                raise argparse.ArgumentTypeError(f"each value must be {span}, got {value}")
        return values

    return parse


def add_device_argument(parser, where: str = "images are generated and judged") -> None:
    """--device, for the benchmarks that generate or time on a device (`benchmark_device` resolves it)."""
    parser.add_argument("--device", default="auto", help=f"where {where}: auto (CUDA when available), cpu, cuda "
                        "or cuda:N; the JSON records the device used")


def benchmark_device(name: str) -> torch.device | None:
    """--device as a torch.device, or None after printing why it cannot be used (one line; exit code 2)."""
    import sys

    from hybrid.devices import resolve_device

    try:
        return resolve_device(name)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return None


def config_and_oracle(config: str | None, overrides: list[str], device: torch.device, refuse=None):
    """(resolved config, trained oracle on `device`), or (None, exit code) after printing why (bad config, or one
    that `refuse(cfg)` returns a reason against, checked before the oracle is loaded: 2; no oracle: 1)."""
    import sys

    from hybrid.config import load_cli_config
    from hybrid.eval.oracle import load_oracle

    cfg = load_cli_config(config, overrides)
    if cfg is None:
        return None, 2
    reason = refuse(cfg) if refuse is not None else None
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return None, 2
    try:
        return cfg, load_oracle(cfg=cfg, device=device)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return None, 1


def add_judging_arguments(parser, run_dir_help: str, sample_keys: str) -> None:
    """--run-dir, --config, --out, --sample (generation settings `sample_keys`) and --device, shared by the judging
    benchmarks."""
    parser.add_argument("--run-dir", required=True, help=run_dir_help)
    parser.add_argument("--config", default=None, help="experiment YAML (default: configs/default.yaml)")
    parser.add_argument("--out", default=None, type=output_file, help="write the results as JSON here")
    parser.add_argument("--sample", default="", help=f"generation settings, comma-separated KEY=VALUE ({sample_keys}); "
                        "default: the stages' configs")
    parser.set_defaults(sample_keys=tuple(key.strip() for key in sample_keys.split(",")))
    add_device_argument(parser)


def parse_with_overrides(parser: argparse.ArgumentParser, argv: list[str] | None):
    """(args, key=value overrides): the arguments the parser does not know are config overrides, which may come
    between the flags; one that starts with '-' is a mistyped or unknown flag, refused by argparse (exit 2), not
    reported as a malformed override."""
    args, overrides = parser.parse_known_args(argv)
    flags = [item for item in overrides if item.startswith("-")]
    if flags:
        parser.error(f"unrecognized arguments: {' '.join(flags)}")
    return args, overrides


def start_judging(parser, argv: list[str] | None, refuse=None):
    """A judging benchmark's start (its parser has `add_judging_arguments`; unknown arguments are key=value
    overrides): (args with --device resolved to a torch.device, generation settings parsed from --sample,
    resolved config with run_dir set, oracle on that device), or an exit code after printing why (bad
    --device, --sample or config, or one that `refuse(args, cfg)` returns a reason against: 2; no oracle: 1).
    --sample's values are range-checked here, before the oracle loads or a stage trains."""
    import sys

    from hybrid.names import SAMPLERS
    from hybrid.pipeline import GenerationSettings

    args, overrides = parse_with_overrides(parser, argv)
    args.device = benchmark_device(args.device)
    if args.device is None:
        return 2
    try:
        settings = GenerationSettings.parse(args.sample)
        GenerationSettings(**settings)  # the ranges: top_p in (0, 1], steps >= 1, ...
        known = list(dict.fromkeys(name for names in SAMPLERS.values() for name in names))
        if settings.get("sampler", known[0]) not in known:
            raise ValueError(f"generation setting sampler={settings['sampler']}: choose one of {', '.join(known)}")
        ignored = [key for key in settings if key not in args.sample_keys]
        if ignored:
            raise ValueError(f"{', '.join(ignored)} would change nothing here: this benchmark's generation takes "
                             f"{', '.join(args.sample_keys)}")
    except ValueError as err:
        print(f"error: --sample: {err}", file=sys.stderr)
        return 2
    cfg, oracle = config_and_oracle(args.config, [f"run_dir={args.run_dir}", *overrides], args.device,
                                    refuse=None if refuse is None else functools.partial(refuse, args))
    return oracle if cfg is None else (args, settings, cfg, oracle)


def judge_class_prompts(pipe, oracle, cfg, out_dir, modes, num_samples: int, settings: dict | None = None,
                        keep_features: dict | None = None) -> dict:
    """`train.py stage=eval`'s judgement of a loaded pipeline, class prompts only, no timing:
    {mode: {"fid", "fid_ci", "adherence" (per attribute)}}; PNG grids go to `out_dir`. `settings`:
    generation settings (cfg, temperature, top_k, ...; None = the stages' config defaults). The requests and
    seeds are `cfg.eval.draw`'s.
    With `cfg.eval.decoded_reference`, also "fid_decoded_ref" (and the hybrid's "fid_vs_ar_decoded_ref"): against
    the real images through the tokenizer. `keep_features` receives the oracle features per mode and of the real
    images (see `evaluate_run`)."""
    from hybrid.eval.evaluate import evaluate_run

    torch.manual_seed(0)
    real_kwargs = {"two_object_prob": cfg.data.two_object_prob, "glyph_prob": cfg.data.glyph_prob}
    metrics = evaluate_run(out_dir, oracle, num_samples=num_samples, batch_size=cfg.eval.batch_size,
                           bootstrap=cfg.eval.bootstrap, modes=tuple(modes), real_kwargs=real_kwargs, timing=False,
                           pipe=pipe, settings=settings, keep_features=keep_features, draw=cfg.eval.draw,
                           num_real=cfg.eval.num_real, decoded_reference=cfg.eval.decoded_reference)
    kept = ("fid", "fid_ci", "fid_decoded_ref", "fid_decoded_ref_ci")  # the second reference: see evaluate_run
    out = {mode: {**{k: metrics[mode][k] for k in kept if k in metrics[mode]},
                  "adherence": metrics[mode]["adherence"]["class"]} for mode in modes}
    for key in ("fid_vs_ar", "fid_vs_ar_decoded_ref"):  # paired: the same requests (and tokens)
        if key in metrics.get("hybrid", {}):
            out["hybrid"][key] = metrics["hybrid"][key]
    return out


def heldout_samples(image_size: int, n: int, seed: int, two_object_prob: float = 0.3,
                    glyph_prob: float = 0.2) -> dict:
    """n procedural validation samples (a seed no training run draws) as one batch:
    {"image": (n, 3, S, S) in [-1, 1], "class_id": (n,), "attrs": {name: (n,)}, "caption": [str]}."""
    from torch.utils.data import default_collate

    from hybrid.data.procedural import ProceduralDataset

    data = ProceduralDataset(image_size=image_size, size=n, seed=seed, split="val", two_object_prob=two_object_prob,
                             glyph_prob=glyph_prob)
    return default_collate([data[i] for i in range(n)])


def heldout_images(image_size: int, n: int, seed: int, **kwargs) -> torch.Tensor:
    """The images of `heldout_samples`: (n, 3, S, S) in [-1, 1]."""
    return heldout_samples(image_size, n, seed, **kwargs)["image"]


def median_seconds(fn, device: torch.device, repeats: int = 3) -> float:
    """Median wall time of fn() on `device` (`Stopwatch`: a CUDA device is synchronized) over `repeats`
    calls, after one warm-up call."""
    import statistics

    from hybrid.devices import Stopwatch

    fn()
    times = []
    for _ in range(repeats):
        with Stopwatch(device) as watch:
            fn()
        times.append(watch.seconds)
    return statistics.median(times)


def write_result(path: str | os.PathLike | None, result: dict) -> None:
    if not path:
        return
    from hybrid.checkpoints import write_json

    try:
        write_json(path, result)  # atomic: `--retime` rewrites the JSON of a long run in place
    except OSError as err:  # e.g. the disk filled up during the run: the results are not lost, they go to stdout
        import json

        print(json.dumps(result, indent=2, default=str))
        raise SystemExit(f"error: cannot write {path} ({err}); the results are printed above as JSON") from None
    print(f"wrote {path}")


def fmt_ci(entry: dict) -> str:
    """'12.34 [11.90, 12.80]' from a bootstrap_fid result."""
    lo, hi = entry["ci"]
    return f"{entry['fid']:.2f} [{lo:.2f}, {hi:.2f}]"


def disjoint(better: dict, worse: dict) -> bool:
    """True when `better`'s FID interval lies wholly below `worse`'s."""
    return better["ci"][1] < worse["ci"][0]
