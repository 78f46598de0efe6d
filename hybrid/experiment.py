"""`python train.py`: parse, build, run the asked-for stages. The logic behind the thin train.py."""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from pathlib import Path

from hybrid.config import ConfigError, config_groups, load_cli_config, stage_plan, to_dict

USAGE_EPILOG = """\
overrides are key=value pairs on the config schema, e.g.
  python train.py stage=tokenizer tokenizer.train.max_steps=500 run_dir=runs/try
  python train.py --config configs/toy.yaml run_dir=/tmp/toy

stages: tokenizer | oracle | ar | refiner | diffusion | eval | all (default: all =
tokenizer, oracle (procedural data only), ar, refiner, [diffusion when with_diffusion=true], eval)

config groups and their keys:
"""


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Train the hybrid AR + diffusion image generator, stage by stage, into runs/<name>/.",
        epilog=USAGE_EPILOG + config_groups(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", default=None, help="YAML experiment file (default: configs/default.yaml)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    return parser.parse_intermixed_args(argv)  # key=value overrides may come before and after --config


def run_stage(cfg, stage: str) -> None:
    if stage == "eval":  # stages given by <stage>.checkpoint are judged too: adopt them into the run first
        from hybrid.lit.runner import TRAINABLE_STAGES, adopt_checkpoint

        for name in TRAINABLE_STAGES:
            if cfg[name].checkpoint:
                adopt_checkpoint(cfg, name)
    if stage == "oracle":
        from hybrid.eval.oracle import ensure_oracle
        from hybrid.precision import stage_device

        ensure_oracle(cfg, device=stage_device(cfg))
    elif stage == "eval":
        from hybrid.checkpoints import is_rank_zero
        from hybrid.eval.evaluate import run_evaluation

        if is_rank_zero():  # one process judges and writes metrics.json; the others are done
            run_evaluation(cfg)
    else:
        from hybrid.lit.runner import fit_stage

        fit_stage(cfg, stage)


def error_line(err: BaseException) -> str:
    """The message of an error train.py reports. PyTorch re-raises an error of a DataLoader worker process
    (data.num_workers > 0) as the same type with "Caught X in DataLoader worker process N." and the worker's
    traceback in front of the message: that gives back the worker's own message, from the traceback's last
    "X: " line on."""
    text = str(err)
    if not text.startswith(f"Caught {type(err).__name__} in DataLoader worker process"):
        return text
    lines = list(re.finditer(rf"^(?:[\w.]+\.)?{re.escape(type(err).__name__)}: ", text, re.MULTILINE))
    return text[lines[-1].end():].strip() if lines else text


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_cli_config(args.config, args.overrides)
    if cfg is None:
        return 2
    if args.print_config:
        from omegaconf import OmegaConf

        print(OmegaConf.to_yaml(cfg), end="")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from hybrid.nn.attention import set_default_backend

    set_default_backend(cfg.attention.backend)
    from hybrid.checkpoints import is_rank_zero, write_text_atomic

    run_dir = Path(cfg.run_dir)
    saved = run_dir / "config.yaml"  # this command's, even when it is refused: the hints it prints name it
    if is_rank_zero():
        from omegaconf import OmegaConf

        try:
            write_text_atomic(saved, OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg))))
        except OSError as err:
            print(f"error: cannot write the run's config to {saved} (run_dir={cfg.run_dir}): {err}", file=sys.stderr)
            return 1
    from hybrid.checkpoints import CheckpointError
    from hybrid.lit.base import NonFiniteLossError
    from hybrid.lit.runner import TRAINABLE_STAGES, check_trainer_devices, will_train

    start = time.time()
    try:
        plan = stage_plan(cfg)
        if any(will_train(cfg, stage) for stage in plan):
            check_trainer_devices(cfg)  # before the oracle trains outside Lightning, not at the first Trainer
        if "oracle" in plan:
            from hybrid.eval.oracle import check_given_oracle_path

            check_given_oracle_path(cfg)  # before the tokenizer trains, not after
        if cfg.retrain:  # the whole plan at once: an interrupted retrain goes on without retrain=true
            from hybrid.lit.runner import retraining, set_aside_for_retrain

            for stage in plan:
                if stage in TRAINABLE_STAGES and retraining(cfg, stage):
                    set_aside_for_retrain(cfg, stage)
        for stage in plan:
            run_stage(cfg, stage)
    except (ConfigError, CheckpointError, FileNotFoundError, NonFiniteLossError, ValueError,
            FloatingPointError) as err:  # FloatingPointError: the oracle's non-finite loss
        print(f"error: {error_line(err)}", file=sys.stderr)
        return 1
    except Exception as err:  # Lightning's own refusals (an accelerator this machine lacks, ...) are one line too
        if type(err).__name__ != "MisconfigurationException":
            raise
        print(f"error: {error_line(err)} (trainer.* keys)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # outside a fit (the oracle, the evaluation); a fit says how to resume itself
        print("\ninterrupted (a finished stage is kept; re-run the same command to go on)", file=sys.stderr)
        return 130
    finally:
        _destroy_process_group()
    if is_rank_zero():
        print_summary(cfg, time.time() - start, evaluated="eval" in stage_plan(cfg))
    return 0


def print_summary(cfg, seconds: float, evaluated: bool = True) -> None:
    run_dir = Path(cfg.run_dir)
    print(f"\nfinished in {seconds / 60:.1f} min; outputs in {run_dir}/")
    metrics = run_dir / "metrics.json"
    if metrics.is_file() and not evaluated:
        # this command's whole config (config.yaml, written at its start), so the data, sizes and oracle match
        from hybrid.checkpoints import train_command

        print(f"  {metrics} is from an earlier evaluation, not of what this command trained; judge again with: "
              f"{train_command(run_dir, 'stage=eval')}")
    elif metrics.is_file():
        import json

        data = json.loads(metrics.read_text())
        for mode, values in data.items():
            if not isinstance(values, dict) or "fid" not in values:
                continue
            if values["fid"] is None:
                print(f"  {mode:10s} FID not measured (no judge for these images; see metrics.json)")
            elif values.get("fid_ci"):
                ci = values["fid_ci"]
                print(f"  {mode:10s} FID {values['fid']:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]")
            else:
                print(f"  {mode:10s} FID {values['fid']:.2f} ({values.get('fid_judge') or 'oracle'})")
            if values.get("fid_decoded_ref") is not None:
                ci = values["fid_decoded_ref_ci"]
                print(f"  {'':10s} FID {values['fid_decoded_ref']:.2f} [{ci[0]:.2f}, {ci[1]:.2f}] against the real "
                      "images through the tokenizer")
            if values.get("fid_vs_ar"):
                d = values["fid_vs_ar"]
                print(f"  {'':10s} {mode} - ar {d['difference']:+.2f} [{d['ci'][0]:+.2f}, {d['ci'][1]:+.2f}] "
                      "(paired: the same requests; below 0 outside the interval, the refiner helps)")
            if values.get("fid_vs_ar_decoded_ref"):
                d = values["fid_vs_ar_decoded_ref"]
                print(f"  {'':10s} {mode} - ar {d['difference']:+.2f} [{d['ci'][0]:+.2f}, {d['ci'][1]:+.2f}] "
                      "against the real images through the tokenizer (paired)")
        print(f"  all metrics: {metrics}")
    if (run_dir / "ar" / "final.ckpt").is_file():
        request = "--prompt 'a red circle'" if cfg.ar.condition == "text" else "--class 0"
        mode = "" if (run_dir / "refiner" / "final.ckpt").is_file() else " --mode ar"
        print(f"sample with: python sample.py --run {run_dir} {request}{mode} -n 16 --out {run_dir}/samples")


def _destroy_process_group() -> None:
    """Under srun, runs that end without destroying the process group sometimes abort at exit."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - best effort at exit
        pass
