"""The one place that saves, loads, verifies and exports stage weights.

Run directory layout (one subfolder per stage):

    runs/<name>/config.yaml                 the resolved config of the last command
    runs/<name>/<stage>/checkpoints/last.ckpt   written every `train.ckpt_every` steps (atomic)
    runs/<name>/<stage>/final.ckpt          written when the stage finishes; later stages read it
                                            (with EMA: the average in state_dict, the final step's
                                            raw weights in current_model_state)
    runs/<name>/<stage>/metrics.csv, images/*.png

Every checkpoint is a Lightning checkpoint whose `hyper_parameters` hold `config` (the resolved
config as a plain dict) and `stage`, so it loads with `torch.load(weights_only=True)` — nothing in
it runs code — and rebuilds its model from the checkpoint alone. Stages that depend on the tokenizer
also record the tokenizer checkpoint's path and a hash of its weights (`tokenizer_hash`).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch

FINAL = "final.ckpt"
LAST = "last.ckpt"


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or of the wrong kind; the message names the file."""


def stage_dir(run_dir: str | os.PathLike, stage: str) -> Path:
    return Path(run_dir) / stage


def final_path(run_dir: str | os.PathLike, stage: str) -> Path:
    return stage_dir(run_dir, stage) / FINAL


def last_path(run_dir: str | os.PathLike, stage: str) -> Path:
    return stage_dir(run_dir, stage) / "checkpoints" / LAST


def hpc_paths(run_dir: str | os.PathLike, stage: str) -> list[Path]:
    """The stage's SLURM requeue checkpoints (`hpc_ckpt_<n>.ckpt`, hybrid/lit/slurm.py), oldest first. One deleted
    between the listing and its `stat` (rank 0 drops the older ones after each new save) is left out."""
    found = []
    for p in stage_dir(run_dir, stage).glob("hpc_ckpt_*.ckpt"):
        try:
            found.append((p.stat().st_mtime, p))
        except FileNotFoundError:
            continue
    return [p for _, p in sorted(found)]


def set_aside_copy(path: str | os.PathLike) -> Path | None:
    """Where a file that lay in a stage folder `retrain=true` set aside (`<folder>.before-retrain-<time>`, the
    newest first) is now, or None: e.g. `init_from=RUN/ar/final.ckpt` in `stage=ar retrain=true`."""
    p = Path(path)
    for parent in p.parents:
        for aside in sorted(parent.parent.glob(f"{glob.escape(parent.name)}.before-retrain-*"), reverse=True):
            moved = aside / p.relative_to(parent)
            if moved.exists():
                return moved
    return None


def resumable_paths(run_dir: str | os.PathLike, stage: str) -> list[Path]:
    """The stage's checkpoints on disk that a re-run could resume from: last.ckpt and the hpc checkpoints."""
    return [p for p in (last_path(run_dir, stage), *hpc_paths(run_dir, stage)) if p.is_file()]


def load_checkpoint(path: str | os.PathLike, expect_stage: str | None = None, map_location="cpu") -> dict[str, Any]:
    """Loads a checkpoint without executing code from it (`weights_only=True`).

    Raises CheckpointError naming the file when it is missing, not a checkpoint (a crafted pickle is
    refused before any of its code runs), or a checkpoint of another stage than `expect_stage`.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' {path_problem(path) or 'is not a regular file'}")
    with open(path, "rb") as f:
        head = f.read(4)
    if not head.startswith(b"PK") and not head.startswith(b"\x80"):  # neither torch's zip format nor a pickle
        kind = "empty" if not head else ("text" if _looks_like_text(path) else "another kind of file")
        raise CheckpointError(f"'{path}' is not a checkpoint: it is {kind}, not a torch checkpoint file (a .ckpt "
                              f"that train.py saved, e.g. RUN/STAGE/final.ckpt)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointError(
            f"'{path}' is not a safe checkpoint: it needs code to unpickle and was refused ({first[:200]})"
        ) from None
    except Exception as err:  # noqa: BLE001 - zip, pickle and I/O errors all mean "not a checkpoint"
        detail = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"'{path}' is not a checkpoint (or is truncated): {detail}") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"'{path}' is not a hybrid checkpoint: it has no 'state_dict'")
    hparams = ckpt.get("hyper_parameters") or {}
    stage = hparams.get("stage")
    if "config" not in hparams or stage is None:
        raise CheckpointError(f"'{path}' is not a hybrid checkpoint: it carries no config/stage")
    if expect_stage is not None and stage != expect_stage:
        raise CheckpointError(f"'{path}' is a '{stage}' checkpoint, but a '{expect_stage}' checkpoint is needed here")
    return ckpt


def _looks_like_text(path: Path) -> bool:
    """Whether the file's first KiB decodes as UTF-8 without control bytes (a YAML, JSON or log file)."""
    with open(path, "rb") as f:
        start = f.read(1024)
    start = start.removeprefix(b"\xef\xbb\xbf")  # a byte-order mark is text too
    text = start.decode("utf-8", errors="ignore")
    return (len(text.encode("utf-8")) >= len(start) - 3  # all of it UTF-8 but a character cut at the end
            and all(c.isprintable() or c in "\n\r\t" for c in text))


def checkpoint_config(ckpt: dict[str, Any]):
    """The typed config stored in a checkpoint."""
    from hybrid.config import from_dict

    return from_dict(ckpt["hyper_parameters"]["config"])


def weights_hash(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors (sorted by name) — identifies the exact weights a stage was trained on."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        value = state_dict[name]
        if not isinstance(value, torch.Tensor):
            continue
        h.update(name.encode())
        t = value.detach().to("cpu").contiguous().reshape(-1)  # 0-dim tensors (counters) too
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def sub_state_dict(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under `prefix.` with the prefix removed (e.g. 'model.' of a LightningModule)."""
    n = len(prefix) + 1
    return {k[n:]: v for k, v in state_dict.items() if k.startswith(prefix + ".")}


def check_tokenizer_match(ckpt: dict[str, Any], tokenizer_hash: str, path: str | os.PathLike) -> None:
    """Refuses a stage checkpoint trained on other tokenizer weights than the ones given."""
    hparams = ckpt["hyper_parameters"]
    recorded = hparams.get("tokenizer_hash")
    if recorded is not None and recorded != tokenizer_hash:
        raise CheckpointError(
            f"'{path}' was trained with tokenizer {hparams.get('tokenizer_path', '?')} (weights {recorded}), "
            f"not with the tokenizer given here (weights {tokenizer_hash}); retrain the stage or pass the "
            "matching tokenizer checkpoint"
        )


def init_weights(module: torch.nn.Module, path: str | os.PathLike, stage: str, strict: bool = True) -> list[str]:
    """Warm-starts `module` (a stage's LightningModule) from another run's checkpoint of that stage.

    The checkpoint's `state_dict` holds its EMA weights where the stage has EMA (Lightning's weight
    averaging stores them there), so those become the model's weights. Mismatched keys or shapes are
    listed in a CheckpointError unless `strict=False`, which skips them; returns the skipped keys.
    Keys under the module's `not_warm_started` prefixes (the frozen tokenizer, the refiner's measured
    `target_std`) are neither loaded nor compared.
    """
    ckpt = load_checkpoint(path, expect_stage=stage)
    # The frozen tokenizer (and what was measured on it) stays this run's own: the stage trains on the
    # tokenizer recorded in its hparams (`tokenizer_hash`), whatever tokenizer the other run used.
    kept = tuple(getattr(module, "not_warm_started", ()))
    source = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith(kept)}
    target = {k: v for k, v in module.state_dict().items() if not k.startswith(kept)}
    problems, loadable = [], {}
    for key, value in source.items():
        if key not in target:
            problems.append(f"unexpected {key}")
        elif target[key].shape != value.shape:
            problems.append(f"shape {key}: checkpoint {tuple(value.shape)} vs model {tuple(target[key].shape)}")
        else:
            loadable[key] = value
    problems += [f"missing {key}" for key in target if key not in source]
    if problems and strict:
        shown = "; ".join(problems[:10]) + (f"; ... {len(problems) - 10} more" if len(problems) > 10 else "")
        raise CheckpointError(
            f"init_from '{path}' does not fit this model ({shown}); set init_strict=false to skip them"
        )
    module.load_state_dict(loadable, strict=False)
    return problems


def is_rank_zero() -> bool:
    """Whether this process writes the run's shared files (config, oracle, metrics): global rank 0 under
    torchrun (`RANK`), srun (`SLURM_PROCID`) and Lightning's own launcher, which starts the other
    processes of `trainer.devices=N` with `LOCAL_RANK` and `NODE_RANK` set (and, inside an sbatch
    script without srun, the `SLURM_PROCID=0` they inherit). Rank 0 is the process where every one of
    them that is set is 0."""
    ranks = (os.environ.get(name, "").strip() for name in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"))
    return all(int(r) == 0 for r in ranks if r)


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Writes JSON atomically (temporary file, then rename), so a reader never sees half a file."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def path_problem(path: str | os.PathLike, want: str = "file") -> str | None:
    """Why `path` is not the `want` ("file" or "folder") a command expected, for its message: "does not exist",
    "is a folder, not a file" or "is a file, not a folder"; None when it is one. A folder given where a file
    was expected used to be reported as missing, which sends the user looking for a path that is there."""
    path = Path(path)
    if want == "file" and path.is_dir():
        return "is a folder, not a file"
    if want == "folder" and path.exists() and not path.is_dir():
        return "is a file, not a folder"
    if not path.exists():
        return "does not exist"
    return None


def nearest_existing(path: str | os.PathLike) -> Path:
    """`path` itself when it exists, else its nearest existing ancestor: where a file or folder to be made at
    `path` would be created (so whether it can be is known before any work)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Writes a text file atomically (temporary file beside it, then rename): never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # per process: two writers never share one
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # left only when the write or the rename failed


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temporary file in the same folder, then rename: never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train_command(run_dir: str | os.PathLike, *overrides: str) -> str:
    """A train.py command line for a hint about a run: with the run's `config.yaml` (the last command's whole
    config, so the data, sizes and paths it set come along) where there is one. The last command's one-off keys
    are undone: `init_from` (a warm start of that command's stage) and `retrain` (which would set finished
    stages aside). A run copied or moved elsewhere keeps its old `run_dir` in config.yaml: the hint names this
    one, so it does not train into the original."""
    import shlex

    config = Path(run_dir) / "config.yaml"
    if not config.is_file():
        return " ".join(["python train.py", shlex.quote(f"run_dir={run_dir}"), *overrides])
    from omegaconf import OmegaConf

    try:
        saved = OmegaConf.load(config)
        one_off = [key for key, on in (("init_from=", saved.get("init_from")), ("retrain=false", saved.get("retrain")))
                   if on]
        kept = saved.get("run_dir")
        if kept and os.path.abspath(str(kept)) != os.path.abspath(run_dir):  # a copied or moved run: train here
            one_off.insert(0, shlex.quote(f"run_dir={run_dir}"))
    except Exception:  # noqa: BLE001 - a hint never fails the command it is part of
        one_off = []
    return " ".join(["python train.py --config", shlex.quote(str(config)), *one_off, *overrides])
