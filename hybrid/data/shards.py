"""WebDataset shards: a writer CLI and two readers (resampled training, exactly-once evaluation).

Writing::

    python -m hybrid.data.shards write --out DIR --source procedural --count N --image-size 32 \\
        --per-shard 1000 [--seed S] [--split train|val] [--holdout red:triangle,blue:star] [--overwrite]
    python -m hybrid.data.shards write --out DIR --source folder --folder PATH --image-size 32

Shards are `DIR/{split}-000000.tar, ...`. A split that DIR already holds is an error (its old shards
would be read together with the new ones); `--overwrite` replaces that split's shards, and only those,
once the new ones are complete. Each sample is `KEY.png` (RGB, image_size x
image_size) and `KEY.json` = {"class_id", "caption", "attrs", ...}. Procedural samples store
their full caption and all attributes (sample i of a shard set equals `ProceduralDataset(...)[i]`
pixel for pixel); folder samples take the class from the subfolder name (`DIR/classes.json`
maps names to ids; a later split written to DIR keeps its ids, and a later train split adds its new classes
with new ids after them; an empty class subfolder keeps its id and images outside class subfolders are not
written, each with a warning), the caption from a sidecar
`NAME.txt` next to the image when there is one, else from the class name, and store no
attributes (readers fill them with -1). Folder images are made 8-bit RGB as they are meant to be seen
(`to_rgb`: EXIF orientation, 16-bit gray scaled, transparency over white); other sizes are resized
(shorter side) and center-cropped; hidden files and folders are skipped at any depth; their order is
shuffled with `--seed` so that shards mix classes.

Reading (the rank and world size are arguments, never read from torch.distributed here):

- `TrainShards` / `train_shards(...)` — training. Every (rank, DataLoader worker) draws
  shards with replacement from its own RNG, seeded from (seed, rank, worker, epoch) only
  (webdataset's default also mixes in the pid and the clock), shuffles samples in a seeded
  buffer, and stops after a fixed number of samples, so that every rank gives exactly
  `batches_per_epoch` batches per epoch and no rank waits for another under DDP. No node or
  worker splitter is involved: resampling streams are independent by construction.
- `EvalShards` / `eval_shards(...)` — evaluation. The finite set is read exactly once across
  all ranks and workers: with at least world_size * num_workers shards, the shard list is split
  (shard i goes to the process with flat id i mod (world_size * num_workers), flat id = rank *
  num_workers + worker); with fewer shards, every process reads every shard and keeps sample j
  when j mod (world_size * num_workers) equals its flat id.

A sample whose PNG or JSON cannot be decoded, and a shard that cannot be opened or read to its
end (truncated), are skipped with a `ShardWarning` and counted in a `SkipCounter` (shared with
DataLoader worker processes); reading goes on. A pattern that matches no file raises
`FileNotFoundError` naming the pattern, when the reader is built (before training starts); training
shards without one readable sample raise `NoReadableShardError` (a ValueError) naming the pattern.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import multiprocessing
import multiprocessing.context
import os
import random
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from itertools import islice
from pathlib import Path

import braceexpand
import numpy as np
import torch
import webdataset as wds
from PIL import Image, ImageOps
from torch.utils.data import IterableDataset
from webdataset import tariterators
from webdataset.utils import make_seed

from hybrid.checkpoints import write_json
from hybrid.data.attributes import ATTRIBUTES, class_id
from hybrid.data.procedural import SPLITS, ProceduralDataset, caption, to_tensor, unknown_attrs

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


class ShardWarning(UserWarning):
    """A corrupt sample or an unreadable shard was skipped."""


BAD_SAMPLE_RUN = 1000  # corrupt samples in a row after which training shards count as unreadable


class NoReadableShardError(ValueError):
    """Training drew shard after shard of a pattern without one readable sample: they are empty or unreadable.

    A ValueError, so train.py reports it in one line."""


# ----------------------------------------------------------------------------------------------
# Shard lists and skip counters
# ----------------------------------------------------------------------------------------------


def expand_shards(pattern: str | Sequence[str]) -> list[str]:
    """Shard paths of a pattern: brace ranges (`d/train-{000000..000009}.tar`), globs (`d/*.tar`),
    a directory (its `*.tar`), or several of these separated by `::` (or given as a list).

    Raises FileNotFoundError naming the pattern when it matches no file, or naming the files that
    a brace range lists but that do not exist; ValueError naming a pattern with unbalanced braces.
    """
    parts = list(pattern) if not isinstance(pattern, str) else [p for p in pattern.split("::") if p.strip()]
    if not parts:
        raise FileNotFoundError("empty shard pattern: set data.shards (e.g. data/train-{000000..000009}.tar)")
    urls: list[str] = []
    missing: list[str] = []
    for part in parts:
        part = os.path.expanduser(part.strip())
        if os.path.isdir(part):  # escaped: a folder named 'run[1]' is that folder, not a character class
            urls.extend(sorted(glob.glob(os.path.join(glob.escape(part), "*.tar"))))
            continue
        if os.path.isfile(part):  # a literal file, whatever characters its name holds
            urls.append(part)
            continue
        try:
            expanded = list(braceexpand.braceexpand(part))
        except braceexpand.UnbalancedBracesError:
            raise ValueError(f"shard pattern '{part}' has unbalanced braces; write a range as "
                             f"train-{{000000..000009}}.tar") from None
        for item in expanded:
            if glob.has_magic(item):
                # 'out[1]/train-*.tar': when the pattern as a whole matches nothing, its folder is taken literally
                found = glob.glob(item) or glob.glob(os.path.join(glob.escape(os.path.dirname(item)),
                                                                  os.path.basename(item)))
                urls.extend(sorted(found))
            elif os.path.isfile(item):
                urls.append(item)
            else:
                missing.append(item)
    if not urls:
        raise FileNotFoundError(f"shard pattern '{pattern}' matches no file")
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise FileNotFoundError(f"shard pattern '{pattern}' lists {len(missing)} missing file(s): {shown}")
    return urls


class SkipCounter:
    """Counts skipped samples and shards, shared between a process and its DataLoader workers.

    The counts live in shared memory (a `multiprocessing.Array`), so the main process (e.g. the
    data module, to log them) sees what its worker processes skipped. Copying the counter
    outside process creation (deepcopy, pickle) gives an independent counter with the current
    counts.
    """

    def __init__(self, bad_samples: int = 0, bad_shards: int = 0):
        self._counts = multiprocessing.Array("q", [bad_samples, bad_shards])

    def add_sample(self, n: int = 1) -> None:
        with self._counts.get_lock():
            self._counts[0] += n

    def add_shard(self, n: int = 1) -> None:
        with self._counts.get_lock():
            self._counts[1] += n

    @property
    def bad_samples(self) -> int:
        return int(self._counts[0])

    @property
    def bad_shards(self) -> int:
        return int(self._counts[1])

    def as_dict(self) -> dict[str, int]:
        return {"bad_samples": self.bad_samples, "bad_shards": self.bad_shards}

    def reset(self) -> None:
        with self._counts.get_lock():
            self._counts[0] = self._counts[1] = 0

    def __repr__(self) -> str:
        return f"SkipCounter(bad_samples={self.bad_samples}, bad_shards={self.bad_shards})"

    def __getstate__(self):
        if multiprocessing.context.get_spawning_popen() is not None:  # a worker being started: share
            return {"counts": self._counts}
        return {"values": (self.bad_samples, self.bad_shards)}

    def __setstate__(self, state):
        if "counts" in state:
            self._counts = state["counts"]
        else:
            self._counts = multiprocessing.Array("q", list(state["values"]))


def _worker_info(override: tuple[int, int] | None) -> tuple[int, int]:
    """(worker id, number of workers) of the calling DataLoader worker; (0, 1) outside workers."""
    if override is not None:
        return override
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


# ----------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is `size` (bicubic, antialiased), then crop the center square."""
    w, h = image.size
    if (w, h) == (size, size):
        return image
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (nw - size) // 2, (nh - size) // 2
    return image.crop((left, top, left + size, top + size))


_WIDE_GRAY = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # 16- and 32-bit single-channel modes


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB image as it is meant to be seen: turned by its EXIF orientation (phone photos store their
    pixels sideways), 16-bit gray scaled to 8 bits (PIL's convert clips it at 255: white), and transparency
    composited over white (convert drops alpha and shows whatever colour the hidden pixels hold)."""
    image = ImageOps.exif_transpose(image)
    if image.mode in _WIDE_GRAY:
        pixels = np.asarray(image, dtype=np.float64)
        wide = image.mode.startswith("I;16") or pixels.max(initial=0) > 255  # 16-bit range, as PNG stores it
        pixels = np.clip(pixels * (255 / 65535 if wide else 1.0) + 0.5, 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels, "L")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image)
    return image.convert("RGB")


def decode_sample(sample: dict, image_size: int | None = None) -> dict:
    """Raw shard sample {"png": bytes, "json": bytes, ...} -> {"image" (3,H,W) in [-1,1], "class_id",
    "caption", "attrs"}. Raises ValueError (naming the sample) when a part is missing or corrupt."""
    where = f"sample '{sample.get('__key__')}' of shard '{sample.get('__url__')}'"
    if "png" not in sample or "json" not in sample:
        raise ValueError(f"{where} lacks its .png or .json part (has {sorted(k for k in sample if k[0] != '_')})")
    try:
        with Image.open(io.BytesIO(sample["png"])) as im:
            im = to_rgb(im)
        if image_size is not None:
            im = resize_center_crop(im, image_size)
        pixels = np.asarray(im)
    except Exception as err:  # PIL raises many types for corrupt data
        raise ValueError(f"{where}: corrupt PNG ({type(err).__name__}: {err})") from None
    try:
        meta = json.loads(sample["json"])
        attrs = unknown_attrs()
        attrs.update({k: int(v) for k, v in meta.get("attrs", {}).items() if k in ATTRIBUTES})
        out = {"image": to_tensor(pixels), "class_id": int(meta.get("class_id", -1)),
               "caption": str(meta.get("caption", "")), "attrs": attrs}
    except Exception as err:
        raise ValueError(f"{where}: bad JSON ({type(err).__name__}: {err})") from None
    return out


class _ShardReader:
    """Shared machinery of both readers: per-shard tar iteration with skip accounting."""

    def __init__(self, pattern, image_size: int | None, counter: SkipCounter | None, with_keys: bool,
                 worker: tuple[int, int] | None, num_classes: int | None):
        self.pattern = pattern
        self.urls = expand_shards(pattern)
        self.image_size = image_size
        self.num_classes = num_classes
        self.counter = counter if counter is not None else SkipCounter()
        self.with_keys = with_keys
        self.worker = worker

    def _read_shard(self, url: str, count_errors: bool = True) -> Iterator[dict]:
        """Raw samples of one shard; an unreadable or truncated shard ends early and is counted once."""
        failed = False

        def handler(exn: BaseException) -> bool:
            nonlocal failed
            if not failed and count_errors:
                self.counter.add_shard()
                reason = exn.args[0] if exn.args else exn  # webdataset appends the stream and url to args
                warnings.warn(f"skipping the rest of unreadable shard '{url}': {type(exn).__name__}: {reason}",
                              ShardWarning, stacklevel=2)
            failed = True
            return True

        try:
            stream = wds.gopen(url)
        except Exception as err:
            handler(err)
            return
        try:
            files = tariterators.tar_file_expander([{"url": url, "stream": stream}], handler=handler)
            yield from tariterators.group_by_keys(files, handler=handler)
        finally:
            stream.close()

    def _decode(self, raw: dict) -> dict | None:
        try:
            out = decode_sample(raw, self.image_size)
        except ValueError as err:
            self.counter.add_sample()
            warnings.warn(f"skipping {err}", ShardWarning, stacklevel=2)
            return None
        if self.num_classes is not None and not -1 <= out["class_id"] < self.num_classes:
            # The models' class table has num_classes rows plus the null class: a larger id would fail
            # there (IndexError, a CUDA device-side assert), and id num_classes would train as unconditional.
            n = self.num_classes
            raise ValueError(f"sample '{raw.get('__key__')}' of shard '{raw.get('__url__')}' has class id "
                             f"{out['class_id']}, outside 0..{n - 1} (data.num_classes: {n} classes; id {n} is the "
                             f"unconditional class): set data.num_classes to the shards' number of classes (the "
                             f"entries of their classes.json)")
        if self.with_keys:
            out["key"] = f"{os.path.basename(raw.get('__url__', ''))}/{raw.get('__key__')}"
        return out


# ----------------------------------------------------------------------------------------------
# Training: resampled shards, fixed batches per epoch on every rank
# ----------------------------------------------------------------------------------------------


class TrainShards(_ShardReader, IterableDataset):
    """Infinite-source training stream with a fixed length per epoch (IterableDataset of samples).

    Each (rank, worker) draws shards with `webdataset.ResampledShards` seeded deterministically
    from (seed, rank, worker, epoch), shuffles samples in a buffer seeded the same way, and
    yields exactly `n_w * batch_size` decoded samples, where worker w of W gets
    n_w = batches_per_epoch // W (+1 for w < batches_per_epoch % W) batches: with the DataLoader
    batching `batch_size` consecutive samples of one worker, a rank yields exactly
    `batches_per_epoch` full batches whatever its number of workers. (webdataset's own
    `with_epoch(n)` counts per worker, so it would give W times as many.)

    Call `set_epoch(epoch)` (or `start_pass(epoch, skip_batches)` to resume mid-epoch) before each
    pass; the data module's `ShardLoader` does this.
    Use non-persistent workers, so each epoch's workers receive the new epoch.
    If a training caption_keep < 1 is given, captions of samples with known attributes are
    redrawn with that keep probability (as the procedural training split does). With `num_classes`,
    a sample whose class id is outside -1..num_classes-1 (-1: none) is an error naming its shard.
    """

    def __init__(self, pattern, *, batch_size: int, batches_per_epoch: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, image_size: int | None = None, caption_keep: float = 1.0,
                 shuffle_buffer: int = 1000, counter: SkipCounter | None = None, with_keys: bool = False,
                 worker: tuple[int, int] | None = None, num_classes: int | None = None):
        super().__init__(pattern, image_size, counter, with_keys, worker, num_classes)
        if batch_size < 1 or batches_per_epoch < 1:
            raise ValueError(f"batch_size ({batch_size}) and batches_per_epoch ({batches_per_epoch}) must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        self.batch_size = batch_size
        self.batches_per_epoch = batches_per_epoch
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.caption_keep = caption_keep
        self.shuffle_buffer = shuffle_buffer
        self.epoch = 0
        self.skip_batches = 0  # batches of this epoch (all workers together) already trained on

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.skip_batches = 0

    def start_pass(self, epoch: int, skip_batches: int = 0) -> None:
        """The next pass: epoch `epoch`, without its first `skip_batches` batches (a resumed run)."""
        self.epoch = int(epoch)
        self.skip_batches = int(skip_batches)

    def skipped_for_worker(self, worker: int, num_workers: int) -> int:
        """How many of worker `worker`'s batches fall among the first `skip_batches` batches.

        The DataLoader hands out the workers' batches in turn (batch j comes from worker j % W), and
        a worker's count differs from another's by at most one, so this holds to the epoch's end.
        """
        return max(0, (self.skip_batches - worker + num_workers - 1) // num_workers)

    def batches_for_worker(self, worker: int, num_workers: int) -> int:
        return self.batches_per_epoch // num_workers + (worker < self.batches_per_epoch % num_workers)

    def __len__(self) -> int:
        """Samples per epoch on this rank (all workers together)."""
        return self.batches_per_epoch * self.batch_size

    def _readable(self, raw: Iterator[dict]) -> Iterator[dict]:
        """The decoded samples of `raw`, the corrupt ones skipped. Shards that open but whose samples all fail to
        decode would be drawn again forever: BAD_SAMPLE_RUN failures in a row end it with NoReadableShardError."""
        bad_run = 0
        for sample in raw:
            out = self._decode(sample)
            if out is not None:
                bad_run = 0
                yield out
                continue
            bad_run += 1
            if bad_run >= BAD_SAMPLE_RUN:
                raise NoReadableShardError(
                    f"the last {bad_run} samples drawn from '{self.pattern}' could not be decoded (corrupt images or "
                    "JSON): write the shards again (python -m hybrid.data.shards write ... --overwrite) or set "
                    "data.shards to other shards")

    def _shard_urls(self, worker: int) -> Iterator[str]:
        shards = wds.ResampledShards(self.urls, seed=self.seed, deterministic=True,
                                     worker_seed=lambda: make_seed(self.rank, worker))
        shards.epoch = self.epoch - 1  # its __iter__ increments the epoch before seeding
        for item in shards:
            yield item["url"]

    def _raw_samples(self, worker: int) -> Iterator[dict]:
        empty_run = 0
        for url in self._shard_urls(worker):
            got = False
            for sample in self._read_shard(url):
                got = True
                yield sample
            empty_run = 0 if got else empty_run + 1
            if empty_run > 2 * len(self.urls) + 10:
                raise NoReadableShardError(
                    f"no readable sample in {empty_run} consecutive shards drawn from '{self.pattern}' "
                    f"({len(self.urls)} file(s)): they are empty or unreadable; write them again "
                    f"(python -m hybrid.data.shards write ... --overwrite) or set data.shards to other shards")

    def __iter__(self) -> Iterator[dict]:
        worker, num_workers = _worker_info(self.worker)
        # The DataLoader takes its first batch from worker process 0; after skipping s batches the
        # next one is the (s % W)-th stream's, so process k plays stream (k + s) % W.
        worker = (worker + self.skip_batches) % num_workers
        count = self.batches_for_worker(worker, num_workers) * self.batch_size
        skip = min(count, self.skipped_for_worker(worker, num_workers) * self.batch_size)
        rng = random.Random(make_seed(self.seed, self.rank, worker, self.epoch, 1))
        raw = _shuffle(self._raw_samples(worker), self.shuffle_buffer, rng)
        decoded = self._readable(raw)
        if self.caption_keep < 1.0:
            decoded = self._recaption(decoded, worker)
        yield from islice(decoded, skip, count)

    def _recaption(self, samples: Iterator[dict], worker: int) -> Iterator[dict]:
        for i, sample in enumerate(samples):
            attrs = sample["attrs"]
            if min(attrs.values()) >= 0:
                rng = np.random.default_rng([self.seed, self.rank, worker, self.epoch, i, 7])
                sample["caption"] = caption(attrs, rng, self.caption_keep)
            yield sample


def _shuffle(items: Iterator, bufsize: int, rng: random.Random) -> Iterator:
    """Buffer shuffle with an explicit RNG (webdataset's default seeds from the pid and the clock)."""
    if bufsize <= 1:
        yield from items
        return
    buf: list = []
    for item in items:
        if len(buf) < bufsize:
            buf.append(item)
            continue
        j = rng.randrange(bufsize)
        buf[j], item = item, buf[j]
        yield item
    rng.shuffle(buf)
    yield from buf


def train_shards(pattern, **kwargs) -> TrainShards:
    """Training stream; see `TrainShards` for the keyword arguments."""
    return TrainShards(pattern, **kwargs)


# ----------------------------------------------------------------------------------------------
# Evaluation: every sample exactly once across ranks and workers
# ----------------------------------------------------------------------------------------------


def split_shards(urls: Sequence[str], rank: int, world_size: int, worker: int, num_workers: int):
    """(shards this process reads, sample filter or None) for exactly-once reading.

    Node and worker splitting in one: flat id = rank * num_workers + worker among
    world_size * num_workers processes. Enough shards: shard i goes to flat id i mod total.
    Fewer shards than processes: every process reads all shards, and the returned filter keeps
    sample j (in the global read order) when j mod total == flat id.
    """
    total = world_size * num_workers
    flat = rank * num_workers + worker
    if len(urls) >= total:
        return list(urls[flat::total]), None
    return list(urls), (lambda j: j % total == flat)


class EvalShards(_ShardReader, IterableDataset):
    """Finite evaluation stream: every sample exactly once across ranks x workers (see `split_shards`).

    Ranks can differ by a batch (no padding, no duplicates): log validation metrics with
    epoch-level reduction, not per-step collectives. `num_classes`: as for `TrainShards`.
    """

    def __init__(self, pattern, *, rank: int = 0, world_size: int = 1, image_size: int | None = None,
                 counter: SkipCounter | None = None, with_keys: bool = False, worker: tuple[int, int] | None = None,
                 num_classes: int | None = None):
        super().__init__(pattern, image_size, counter, with_keys, worker, num_classes)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        self.rank = rank
        self.world_size = world_size

    def __iter__(self) -> Iterator[dict]:
        worker, num_workers = _worker_info(self.worker)
        urls, keep = split_shards(self.urls, self.rank, self.world_size, worker, num_workers)
        # In sample-split mode every process reads every shard: only flat id 0 reports broken shards.
        count_errors = keep is None or self.rank * num_workers + worker == 0
        j = 0
        for url in urls:
            for raw in self._read_shard(url, count_errors):
                mine = keep is None or keep(j)
                j += 1
                if mine and (sample := self._decode(raw)) is not None:
                    yield sample


def eval_shards(pattern, **kwargs) -> EvalShards:
    """Evaluation stream; see `EvalShards` for the keyword arguments."""
    return EvalShards(pattern, **kwargs)


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def _png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _progress(total: int, desc: str, enabled: bool):
    from hybrid.progress import progress_bar

    return progress_bar(total=total, desc=desc, unit="img", disable=not enabled, dynamic_ncols=True)


def class_ids_problem(ids: dict, dense: bool = True) -> str | None:
    """What is wrong with a `classes.json` mapping, or None: each class needs its own non-negative integer id (two
    names on one id would train as one class; a model's class table has rows 0..data.num_classes-1), and the
    writer, which gives a new class the next id, numbers n classes 0..n-1 (`dense`; shards built by hand may skip
    ids, which data.num_classes then covers)."""
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in ids.values()):
        return "its ids must be integers"
    values = sorted(ids.values())
    if values == list(range(len(ids))):
        return None
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        return f"id {repeated[0]} is given to {values.count(repeated[0])} classes; each class needs its own id"
    if values and values[0] < 0:
        return f"id {values[0]} is negative"
    return f"its ids must be 0..{len(ids) - 1}, one per class, got {values}" if dense else None


def old_shards(out: str | os.PathLike, split: str, overwrite: bool = False) -> list[Path]:
    """The split's shards already in `out` (`OUT/SPLIT-*.tar`, what a `SPLIT-*.tar` pattern reads).

    Raises FileExistsError naming `out` and how many there are, unless `overwrite`: writing the split again
    beside them would leave old shards that the pattern still reads (duplicated or stale images).
    """
    old = sorted(Path(out).glob(f"{split}-*.tar"))
    if old and not overwrite:
        shown = old[0].name if len(old) == 1 else f"{old[0].name} .. {old[-1].name}"
        raise FileExistsError(f"'{out}' already holds {len(old)} {split} shard(s) ({shown}), which a "
                              f"'{split}-*.tar' pattern would read together with the new ones: pass --overwrite to "
                              f"replace them (other splits and classes.json are kept), or use another --out")
    return old


def _write_shards(out: str | os.PathLike, split: str, per_shard: int, samples: Iterator[dict],
                  replace: Sequence[Path] = ()) -> list[str]:
    """Write `samples` as `OUT/SPLIT-000000.tar, ...`; returns exactly the shards written ([] without a sample).

    The shards go to a hidden folder inside `out` first and are moved into place only once all of them are
    complete, so an error or an interrupt midway leaves `out` as it was (an `out` this call created is removed
    again), and no sample leaves no shard. Then the
    shards of `replace` (the split's old ones, see `old_shards`) that the new ones did not overwrite are removed.
    """
    created = not Path(out).exists()
    Path(out).mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{split}-writing-", dir=out))
    written: list[str] = []
    try:
        pattern = str(staging / split).replace("%", "%%") + "-%06d.tar"
        with wds.ShardWriter(pattern, maxcount=per_shard, verbose=0, post=written.append) as sink:
            count = 0
            for sample in samples:
                sink.write(sample)
                count += 1
        if count == 0:  # the ShardWriter opened an empty first shard: it stays in the staging folder
            return []
        shards = []
        for path in map(Path, written):
            shards.append(str(Path(out) / path.name))
            os.replace(path, shards[-1])
        for path in replace:
            if str(path) not in shards and path.exists():
                path.unlink()
        return shards
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not any(Path(out).iterdir()):  # no sample, or an error midway: no empty --out left behind
            Path(out).rmdir()


def write_procedural(out: str | os.PathLike, count: int, image_size: int = 32, per_shard: int = 1000, seed: int = 0,
                     split: str = "train", holdout: Sequence[str] = (), two_object_prob: float = 0.3,
                     glyph_prob: float = 0.2, overwrite: bool = False, progress: bool = True) -> list[str]:
    """Write samples 0..count-1 of `ProceduralDataset(split, seed, ...)` with full captions; returns the shards.

    The split's shards already in `out` are an error (FileExistsError), or are replaced with `overwrite`.
    """
    if count < 1:
        raise ValueError(f"--count must be >= 1, got {count}")
    old = old_shards(out, split, overwrite)
    ds = ProceduralDataset(image_size=image_size, size=count, seed=seed, split=split, holdout=holdout,
                           caption_keep=1.0, two_object_prob=two_object_prob, glyph_prob=glyph_prob)

    def samples() -> Iterator[dict]:
        with _progress(count, f"procedural {split}", progress) as bar:
            for i in range(count):
                pixels, attrs, text = ds.sample(i)
                meta = {"class_id": class_id(attrs["shape"], attrs["color"]), "caption": text, "attrs": attrs,
                        "index": i, "source": "procedural", "split": split, "seed": seed}
                yield {"__key__": f"{i:09d}", "png": _png_bytes(pixels), "json": json.dumps(meta).encode()}
                bar.update()

    return _write_shards(out, split, per_shard, samples(), old)


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def folder_items(folder: str | os.PathLike) -> tuple[list[str], list[tuple[Path, int]]]:
    """(class names, [(image path, class id)]) of an image folder with one subfolder per class.

    Warns (ShardWarning) about class subfolders without an image -- they keep their class id, so the
    ids do not shift when images are added there later -- and about images directly in the folder,
    which belong to no class and are not written.
    """
    root = Path(folder).expanduser()
    if root.is_file():
        raise FileNotFoundError(f"image folder '{root}' is a file: give the folder that holds one subfolder per class")
    if not root.is_dir():
        raise FileNotFoundError(f"image folder '{root}' does not exist")
    loose = sum(1 for p in root.iterdir() if _is_image(p))
    hint = f" ({loose} image(s) lie directly in it: move them into {root}/<class>/)" if loose else ""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"image folder '{root}' has no class subfolders (expected {root}/<class>/<image>){hint}")
    items, empty = [], []
    for cid, name in enumerate(classes):
        found = [path for path in sorted((root / name).rglob("*")) if _is_image(path)
                 and not any(part.startswith(".") for part in path.relative_to(root / name).parts)]
        items.extend((path, cid) for path in found)
        if not found:
            empty.append(name)
    if not items:
        raise ValueError(f"image folder '{root}' has no images ({', '.join(IMAGE_EXTENSIONS)}) in its class "
                         f"subfolders{hint}")
    if empty:
        shown = ", ".join(f"'{name}'" for name in empty)
        warnings.warn(f"{len(empty)} class subfolder(s) of image folder '{root}' hold no image: {shown}; they keep "
                      f"their class id but have no sample", ShardWarning, stacklevel=3)
    if loose:
        warnings.warn(f"{loose} image(s) directly in image folder '{root}' are in no class subfolder and are not "
                      f"written (move them into {root}/<class>/)", ShardWarning, stacklevel=3)
    if len(classes) == 1:
        inner = sorted(p.name for p in (root / classes[0]).iterdir() if p.is_dir() and not p.name.startswith("."))
        more = (f" (it holds subfolders {', '.join(inner[:5])}: are they the classes? then give --folder "
                f"'{root / classes[0]}')") if inner else ""
        warnings.warn(f"image folder '{root}' has one class subfolder, '{classes[0]}': every image gets class id 0"
                      f"{more}", ShardWarning, stacklevel=3)
    return classes, items


def class_caption(name: str) -> str:
    """Caption of an image without a sidecar: its class name, with '_' and '-' as spaces."""
    return name.replace("_", " ").replace("-", " ").strip()


def folder_class_ids(out: str | os.PathLike, classes: Sequence[str], folder: str | os.PathLike,
                     split: str = "train") -> tuple[dict[str, int], list[str]]:
    """(class name -> id, the classes new to `out/classes.json`) for writing `folder` (with class subfolders
    `classes`) as `split` into `out`.

    An existing `out/classes.json` (written with an earlier split) keeps its ids, so models trained on the
    shards and the other split stay consistent. A train split adds the classes that are not in it, with new ids
    after the existing ones (data.num_classes must grow with them); any other split must hold only classes that
    are in it, so a validation folder with fewer classes keeps the training ids. Without the file, the sorted
    names get ids 0, 1, .... The caller writes a new or extended mapping (once the shards are complete).
    Raises ValueError naming the file when it is not a mapping or (not a train split) lacks a class of `folder`.
    """
    path = Path(out) / "classes.json"
    if path.exists() and not path.is_file():
        raise ValueError(f"'{path}' is not a file: this --out keeps its class ids there; move it away or use another "
                         f"--out")
    if not path.is_file():
        return {name: i for i, name in enumerate(classes)}, []
    try:
        ids = json.loads(path.read_text())
        if not isinstance(ids, dict) or not all(isinstance(v, int) for v in ids.values()):
            raise ValueError(f"expected {{\"class name\": id, ...}}, got {type(ids).__name__}")
        problem = class_ids_problem(ids)
        if problem:
            raise ValueError(problem)
    except ValueError as err:
        raise ValueError(f"'{path}' is not a class mapping ({err})") from None
    missing = [name for name in classes if name not in ids]
    if missing and split != "train":
        shown = ", ".join(f"'{name}'" for name in missing)
        many = len(missing) > 1
        raise ValueError(f"class{'es' if many else ''} {shown} of image folder '{folder}' {'are' if many else 'is'} "
                         f"not in '{path}' ({', '.join(ids)}), which an earlier write to this --out made: write the "
                         f"train split with {'them' if many else 'it'} first (it adds its new classes to classes.json; "
                         f"add --overwrite when this --out holds train shards), then this {split} split, or use "
                         f"another --out")
    if missing:
        start = max(ids.values(), default=-1) + 1
        ids = {**ids, **{name: start + i for i, name in enumerate(missing)}}
    return ids, missing


def _sidecar_caption(image: Path, bar) -> str:
    """The caption in `NAME.txt` beside an image, "" without one; a sidecar that is not UTF-8 text is named in a
    warning and the class name captions the image instead (one such file used to stop the whole write with a
    codec error that named no file)."""
    sidecar = image.with_suffix(".txt")
    if not sidecar.is_file():
        return ""
    try:
        return sidecar.read_text(encoding="utf-8-sig").strip()
    except (UnicodeDecodeError, OSError) as err:
        with bar.external_write_mode(file=sys.stderr):
            warnings.warn(f"caption file '{sidecar}' is not readable UTF-8 text ({type(err).__name__}: {err}); its "
                          "image is captioned with its class name", ShardWarning, stacklevel=5)
        return ""


def write_folder(out: str | os.PathLike, folder: str | os.PathLike, image_size: int = 32, per_shard: int = 1000,
                 seed: int = 0, split: str = "train", count: int | None = None, overwrite: bool = False,
                 progress: bool = True) -> list[str]:
    """Write an image folder (class = subfolder) as shards plus `out/classes.json`; returns the shards.

    Class ids come from `out/classes.json` when an earlier split wrote it; a train split adds its new classes
    there, with new ids after the existing ones (see `folder_class_ids`).
    Images are shuffled with `seed`, resized/center-cropped to image_size; unreadable images are
    skipped with a warning. The split's shards already in `out` are an error (FileExistsError), or are
    replaced with `overwrite`.
    """
    if count is not None and count < 1:
        raise ValueError(f"--count must be >= 1, got {count}")
    classes, items = folder_items(folder)
    ids, added = folder_class_ids(out, classes, folder, split)
    old = old_shards(out, split, overwrite)
    random.Random(seed).shuffle(items)
    if count is not None:
        items = items[:count]
    skipped = 0

    def samples() -> Iterator[dict]:
        nonlocal skipped
        with _progress(len(items), f"folder {split}", progress) as bar:
            for i, (path, cid) in enumerate(items):
                bar.update()
                try:
                    with Image.open(path) as im:
                        pixels = np.asarray(resize_center_crop(to_rgb(im), image_size))
                except Exception as err:
                    skipped += 1
                    with bar.external_write_mode(file=sys.stderr):  # on its own line, not after the progress bar
                        warnings.warn(f"skipping unreadable image '{path}': {type(err).__name__}: {err}",
                                      ShardWarning, stacklevel=4)
                    continue
                text = _sidecar_caption(path, bar)
                name = classes[cid]
                meta = {"class_id": ids[name], "caption": text or class_caption(name), "attrs": {},
                        "class_name": name, "path": str(path.relative_to(folder)), "source": "folder"}
                yield {"__key__": f"{i:09d}", "png": _png_bytes(pixels), "json": json.dumps(meta).encode()}

    shards = _write_shards(out, split, per_shard, samples(), old)
    if not shards:
        raise ValueError(f"none of the {len(items)} image(s) of image folder '{folder}' could be read (see the "
                         f"warnings above): nothing written to '{out}'")
    path = Path(out) / "classes.json"
    if added or not path.is_file():  # written (or extended) with the split's shards, not before
        write_json(path, ids)  # atomic
    if added:
        shown = ", ".join(f"'{name}'" for name in added)
        many = len(added) > 1
        print(f"note: added class{'es' if many else ''} {shown} to '{path}' as id{'s' if many else ''} "
              f"{', '.join(str(ids[name]) for name in added)} (the existing ids are kept): data.num_classes must grow "
              f"to {max(ids.values()) + 1} to train on these shards", file=sys.stderr)
    if skipped:
        print(f"skipped {skipped} unreadable image(s)", file=sys.stderr)
    return shards


def _error_line(err: OSError | ValueError, out: str) -> str:
    """One line for a write that failed: our own errors say what to do; an operating-system error (an --out
    that cannot be made, a permission, a full disk) gives its reason and the path(s) it names, or `out` when it
    names none, not a traceback. Nothing is left half-written (see `_write_shards`)."""
    if not isinstance(err, OSError) or err.errno is None:
        return str(err)
    paths = " -> ".join(f"'{p}'" for p in (err.filename, err.filename2) if p is not None)
    return f"{err.strerror or err}: " + (paths or f"writing into --out '{out}'")


def _warning_line(message, category, filename, lineno, line=None) -> str:
    """The CLI's warnings, one line each: Python's default format adds the file, line number and source line of
    the call that warned (`shards = write_folder(...)`), which tell a user of the CLI nothing."""
    return f"warning: {message}\n"


def main(argv: Sequence[str] | None = None) -> int:
    default_format, warnings.formatwarning = warnings.formatwarning, _warning_line
    try:
        return _write_cli(argv)
    finally:
        warnings.formatwarning = default_format


def _write_cli(argv: Sequence[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hybrid.data.shards", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="write WebDataset shards from the procedural dataset or an image folder")
    w.add_argument("--out", required=True, help="output directory (shards are OUT/SPLIT-000000.tar, ...)")
    w.add_argument("--source", choices=("procedural", "folder"), default=None,
                   help="procedural (needs --count) or folder (needs --folder); default: folder when --folder is given")
    w.add_argument("--count", type=int, default=None, help="number of samples (procedural: required; folder: cap)")
    w.add_argument("--image-size", type=int, default=32)
    w.add_argument("--per-shard", type=int, default=1000)
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--split", choices=tuple(SPLITS), default="train")
    w.add_argument("--folder", default=None, help="image folder with one subfolder per class (--source folder)")
    w.add_argument("--holdout", default="", help="procedural: comma-separated color:shape pairs never drawn in train")
    w.add_argument("--overwrite", action="store_true",
                   help="replace the split's shards already in OUT (OUT/SPLIT-*.tar; other splits and the ids in "
                        "classes.json are kept, and a train split adds its new classes there); without it, writing a "
                        "split that OUT already holds is an error")
    w.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    if args.source is None:
        args.source = "folder" if args.folder else "procedural"
    if args.source == "procedural" and args.folder:
        parser.error("--folder is read with --source folder, not --source procedural")
    if args.source == "folder" and args.holdout.strip():  # it was ignored without a word
        parser.error("--holdout picks procedural color:shape pairs (--source procedural); an image folder's classes "
                     "are its subfolders: leave out the ones to hold out")
    if not 16 <= args.image_size <= 256:
        parser.error(f"--image-size {args.image_size} is outside 16..256")
    if args.per_shard < 1:
        parser.error("--per-shard must be >= 1")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        parser.error(f"--out '{args.out}' is a file, not a folder: shards are written into a folder")
    if args.source == "procedural":
        if args.count is None:
            parser.error("--source procedural needs --count")
        holdout = [h for h in args.holdout.split(",") if h.strip()]
        try:
            shards = write_procedural(args.out, args.count, args.image_size, args.per_shard, args.seed, args.split,
                                      holdout, overwrite=args.overwrite, progress=not args.no_progress)
        except (OSError, ValueError) as err:
            parser.error(_error_line(err, args.out))
    else:
        if not args.folder:
            parser.error("--source folder needs --folder PATH")
        try:
            shards = write_folder(args.out, args.folder, args.image_size, args.per_shard, args.seed, args.split,
                                  args.count, overwrite=args.overwrite, progress=not args.no_progress)
        except (OSError, ValueError) as err:
            parser.error(_error_line(err, args.out))
    names = [os.path.basename(s) for s in shards]
    print(f"wrote {len(names)} shard(s) to {args.out}: {names[0]}" + (f" .. {names[-1]}" if len(names) > 1 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
