"""`python sample.py`: generate images from a run directory or an exported folder."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from hybrid.devices import Stopwatch, resolve_device
from hybrid.names import CFG_SCHEDULES
from hybrid.pipeline import MODES, HybridPipeline, PipelineError


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="sample.py",
        description="Generate images with a trained hybrid pipeline (AR -> z_q -> refiner -> decoder).",
        epilog=("example: python sample.py --run runs/default --class 3 -n 16 --out out/ "
                "(a run trained with ar.condition=text takes --prompt 'a red circle at the top left')"),
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run directory written by train.py")
    src.add_argument("--export", help="folder written by --write-export / HybridPipeline.save_pretrained")
    cond = p.add_mutually_exclusive_group()
    cond.add_argument("--prompt", help="one text prompt (repeated -n times)")
    cond.add_argument("--class", dest="class_id", type=int, help="one class id (repeated -n times)")
    cond.add_argument("--prompts-file", help="a text file with one prompt per line")
    p.add_argument("-n", "--num", type=int, default=16, help="images per prompt / class (default 16)")
    p.add_argument("--mode", choices=MODES, default="hybrid", help="hybrid | ar | diffusion (default hybrid)")
    p.add_argument("--steps", type=int, default=None, help="refiner / diffusion steps (default: the config's)")
    p.add_argument("--sampler", default=None, help="ddim | dpm (ddpm-trained) or euler | dpm (flow-trained)")
    p.add_argument("--cfg", type=float, default=None,
                   help="AR classifier-free guidance scale (default: the AR's ar.sample.cfg)")
    p.add_argument("--cfg-schedule", choices=CFG_SCHEDULES, default=None,
                   help="how the AR's guidance runs over the scales (default: the AR's ar.sample.cfg_schedule)")
    p.add_argument("--refiner-cfg", type=float, default=1.0,
                   help="guidance of the refiner / diffusion model (default 1.0: unguided)")
    p.add_argument("--temperature", type=float, default=None, help="AR sampling temperature (default: the config's)")
    p.add_argument("--top-k", type=int, default=None, help="AR top-k, 0 = off (default: the config's)")
    p.add_argument("--top-p", type=float, default=None, help="AR nucleus top-p, 1 = off (default: the config's)")
    p.add_argument("--seed", type=int, default=0, help="the same seed and batch size give the same images (default 0)")
    p.add_argument("--batch-size", type=int, default=16, help="images generated at once (default 16)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--out", default="samples", help="output folder (default samples/)")
    p.add_argument("--grid", action=argparse.BooleanOptionalAction, default=True, help="write grid.png")
    p.add_argument("--individual", action=argparse.BooleanOptionalAction, default=True,
                   help="write every image as its own PNG")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the images (NNNN.png, grid.png) an earlier run left in --out, and an export "
                        "already in --write-export's folder; without it such a folder is refused, so two runs' "
                        "images never mix and no export is replaced by accident")
    p.add_argument("--write-export", default=None, help="also export the loaded pipeline to this folder")
    return p.parse_args(argv)


def _requests(args) -> tuple[list[int] | None, list[str] | None]:
    if args.num < 1:
        raise PipelineError(f"-n must be >= 1, got {args.num}")
    if args.prompts_file:
        path = Path(args.prompts_file)
        if path.is_dir():
            raise PipelineError(f"--prompts-file {path} is a folder; give a text file with one prompt per line")
        if not path.is_file():
            raise PipelineError(f"prompts file '{path}' does not exist")
        try:
            text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is not part of the first prompt
        except UnicodeDecodeError as err:
            raise PipelineError(f"prompts file '{path}' is not UTF-8 text (byte {err.object[err.start]:#04x} at "
                                f"position {err.start})") from None
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
        if not prompts:
            raise PipelineError(f"prompts file '{path}' holds no prompt")
        return None, [p for p in prompts for _ in range(args.num)]
    if args.prompt is not None:
        return None, [args.prompt] * args.num
    if args.class_id is not None:
        return [args.class_id] * args.num, None
    raise PipelineError("give --prompt, --class or --prompts-file")


def _earlier_samples(folder: Path) -> list[Path]:
    """The files an earlier sample.py run wrote into `folder` (NNNN.png and grid.png), sorted."""
    if not folder.is_dir():
        return []
    return sorted(f for f in folder.iterdir()
                  if f.is_file() and (f.name == "grid.png" or (f.suffix == ".png" and f.stem.isdigit())))


def _write_samples(out: Path, images, individual: bool, grid: bool) -> None:
    """Writes NNNN.png and grid.png into a hidden folder in `out`, then moves them over the earlier run's images
    (which `--overwrite` allowed) and removes that run's others: a write that fails (a full disk) loses none of
    the earlier images, and leaves no half of the new set beside them. Raises OSError."""
    from hybrid.images import save_grid, save_png, to_uint8

    staging = Path(tempfile.mkdtemp(prefix=".sample-", suffix=".partial", dir=out))
    try:
        if individual:
            for i, image in enumerate(to_uint8(images)):
                save_png(image, staging / f"{i:04d}.png")
        if grid:
            save_grid(images, staging / "grid.png")
        new = sorted(staging.iterdir())
        names = {path.name for path in new}
        for path in new:
            os.replace(path, out / path.name)
        for earlier in _earlier_samples(out):  # only this run's images remain
            if earlier.name not in names:
                earlier.unlink()
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _check_creatable(folder: Path) -> None:
    """Raises PipelineError unless `folder` is a folder or can be made (its nearest existing ancestor is a
    writable folder), without making it."""
    from hybrid.checkpoints import nearest_existing

    parent = nearest_existing(folder)
    if parent == folder:
        if not os.access(folder, os.W_OK):
            raise PipelineError(f"--out {folder} is not writable")
        return
    if not parent.is_dir():
        raise PipelineError(f"cannot create --out {folder}: {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PipelineError(f"cannot create --out {folder}: {parent} is not writable")


def main(argv=None) -> int:
    args = parse_args(argv)
    from hybrid.checkpoints import CheckpointError

    try:
        device = resolve_device(args.device)
        classes, prompts = _requests(args)
        out = Path(args.out)
        writes = args.individual or args.grid
        if out.exists() and not out.is_dir():  # found before generating, not after
            raise PipelineError(f"--out {out} is a file; give a folder")
        if writes:
            _check_creatable(out)  # created after generating: a failed command leaves no empty folder behind
            earlier = _earlier_samples(out)
            if earlier and not args.overwrite:
                names = ", ".join(f.name for f in earlier[:3]) + (", ..." if len(earlier) > 3 else "")
                raise PipelineError(f"--out {out} already holds {len(earlier)} image file(s) of an earlier run "
                                    f"({names}): pass --overwrite to replace them, or give another --out")
        if args.run:
            pipe = HybridPipeline.from_run(args.run, device=device)
        else:
            pipe = HybridPipeline.from_pretrained(args.export, device=device)
        settings = dict(cfg=args.cfg, cfg_schedule=args.cfg_schedule, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, steps=args.steps, sampler=args.sampler, refiner_cfg=args.refiner_cfg)
        # the whole request is checked before anything is written (--write-export) or generated
        n = pipe.check_request(classes=classes, prompts=prompts, mode=args.mode, seed=args.seed,
                               batch_size=args.batch_size, **settings)
        targets = (([out / "grid.png"] if args.grid else [])
                   + ([out / f"{i:04d}.png" for i in range(n)] if args.individual else []))
        blocked = [path for path in targets if path.is_dir()]
        if blocked:  # found before generating, not when the images are saved
            raise PipelineError(f"--out {out}: '{blocked[0]}' is a folder, where this command writes an image; move "
                                f"it away or give another --out")
        if not pipe.conditioned(args.mode):
            print(f"note: the {args.mode} model takes no condition ({args.mode}.condition=none): --class and "
                  "--prompt only set how many images are drawn", file=sys.stderr)
        if args.write_export:
            held = [name for name in pipe.export_files() if (Path(args.write_export) / name).is_file()]
            if held and not args.overwrite:  # any of them: a folder with tokenizer.safetensors alone is not an export
                raise PipelineError(f"--write-export {args.write_export} already holds {', '.join(held)}: pass "
                                    f"--overwrite to replace {'them' if len(held) > 1 else 'it'}, or give another "
                                    f"folder")
            pipe.save_pretrained(args.write_export)
            print(f"exported to {args.write_export}")
        unused = [flag for flag, value in (("--steps", args.steps), ("--sampler", args.sampler),
                                           ("--refiner-cfg", None if args.refiner_cfg == 1.0 else args.refiner_cfg))
                  if value is not None]
        if args.mode == "ar" and unused:
            print(f"note: {', '.join(unused)} set the refiner, which --mode ar does not run", file=sys.stderr)
        ar_only = [flag for flag, value in (("--cfg", args.cfg), ("--cfg-schedule", args.cfg_schedule),
                                            ("--temperature", args.temperature), ("--top-k", args.top_k),
                                            ("--top-p", args.top_p)) if value is not None]
        if args.mode == "diffusion" and ar_only:
            print(f"note: {', '.join(ar_only)} set the AR, which --mode diffusion does not run (its guidance is "
                  "--refiner-cfg)", file=sys.stderr)
        with Stopwatch(device) as watch:
            images = pipe(classes=classes, prompts=prompts, mode=args.mode, seed=args.seed,
                          batch_size=args.batch_size, **settings)
    except (PipelineError, CheckpointError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if writes:
        made = None  # the outermost folder this command creates (mkdir makes the missing parents too)
        for folder in (out, *out.parents):
            if folder.exists():
                break
            made = folder
        held = bool(_earlier_samples(out))
        try:
            out.mkdir(parents=True, exist_ok=True)
            _write_samples(out, images, args.individual, args.grid)
        except OSError as err:  # a full disk, a quota: the earlier images (--overwrite) are still there
            if made is not None:
                shutil.rmtree(made, ignore_errors=True)
            kept = "; the earlier images there are kept" if held else ""
            print(f"error: cannot write the images to --out {out}: {err.strerror or err}{kept}", file=sys.stderr)
            return 2
    n, seconds = images.shape[0], watch.seconds
    where = f"written to {out}/" if writes else "nothing written (--no-grid --no-individual)"
    print(f"{n} images ({args.mode}) in {seconds:.2f} s = {n / seconds:.1f} images/s on {device}; {where}")
    return 0
