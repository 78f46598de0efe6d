"""`HybridDataModule`: the procedural dataset or WebDataset shards, train and val, for Lightning.

Batches (default collate): {"image": (B, 3, H, W) float in [-1, 1], "class_id": (B,) long,
"caption": list[str], "attrs": {name: (B,) long}} with attrs -1 where unknown (shards written
from an image folder).

Training is epoch-based with a fixed length on every rank (`batches_per_epoch`), so no rank
waits for another under DDP and a resumed run repeats the same data:
- procedural: `EpochIndexSampler` draws batches_per_epoch * batch_size indices in
  [0, train_size) from (seed, epoch, rank);
- shards: `shards.TrainShards` (resampled shards seeded from (seed, rank, worker, epoch)).
Shard class ids are checked against `num_classes` (the models' class count): an id outside
-1..num_classes-1 (-1: none) is an error naming the shard.
Validation reads a finite set exactly once across ranks: the first `val_size` indices of the
procedural val split (`ShardedIndexSampler`), or `val_shards` (`shards.EvalShards`). With
source=shards and no val_shards, sibling `val-*.tar` files of the training shards are used when
they exist, else there is no validation (with a warning).

The rank and world size come from the attached trainer (0 and 1 without one).

Resume: both training loaders (`ResumableLoader` for procedural data, `ShardLoader` for shards)
are stateful: Lightning stores their `state_dict` -- epoch and batches handed out -- in every
checkpoint and hands it back on resume, so a run killed at any step continues with exactly the
batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import glob
import inspect
import os
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import pytorch_lightning as pl
from torch.utils.data import DataLoader, DistributedSampler

from hybrid.data.attributes import NUM_CLASSES
from hybrid.data.procedural import ProceduralDataset, parse_holdout
from hybrid.data.shards import EvalShards, SkipCounter, TrainShards, expand_shards


class EpochIndexSampler(DistributedSampler):
    """`num_samples` indices in [0, dataset_size) per epoch and rank, drawn from (seed, epoch, rank).

    A `DistributedSampler` subclass so that Lightning calls `set_epoch` on it and does not wrap it
    in another distributed sampler. Indices are drawn with replacement: `train_size` can be far
    larger than what an epoch visits (the procedural dataset renders any index on demand).
    """

    def __init__(self, dataset_size: int, num_samples: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        # No super().__init__: it needs a dataset and would query torch.distributed.
        self.dataset_size = int(dataset_size)
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.rank = int(rank)
        self.num_replicas = int(world_size)
        self.epoch = 0
        self.shuffle = True
        self.drop_last = True
        self.total_size = self.num_samples * self.num_replicas
        self._next_pass: tuple[int, int] | None = None  # (epoch, samples to skip), set by a ResumableLoader

    def start_pass(self, epoch: int, skip: int = 0) -> None:
        """Fixes the next pass: `epoch`'s indices from the `skip`-th on (a `set_epoch` before it is ignored)."""
        self.epoch = int(epoch)
        self._next_pass = (int(epoch), int(skip))

    def __iter__(self) -> Iterator[int]:
        (epoch, skip), self._next_pass = self._next_pass or (self.epoch, 0), None
        self.epoch = epoch
        rng = np.random.default_rng([self.seed, epoch, self.rank, 0x5A])
        return iter(rng.integers(0, self.dataset_size, self.num_samples).tolist()[skip:])

    def __len__(self) -> int:
        return self.num_samples


class _PassCounter:
    """Mixin for a DataLoader that Lightning can resume at any step (it is "stateful").

    It counts epochs itself: each pass continues where the previous one stopped (the next epoch
    after a complete pass). `state_dict()` -> {"epoch", "batches"}: the pass's epoch and the batches
    handed out in it. Lightning asks when it saves a checkpoint (its fit loop fetches no batch ahead
    from a loader with a length, so these are exactly the batches trained on) and gives it back to
    `load_state_dict()` on resume; the next pass then starts after them (`_start_pass` tells the
    sampler or dataset to skip them). Lightning's own `set_epoch` is not used: after resuming from
    a checkpoint written at the end of an epoch its sampler epoch (`epoch_progress.current.processed`)
    can lag the real epoch (seen with Lightning 2.6.6), which would repeat an epoch's data.
    """

    _epoch = 0  # the current pass's epoch
    _done = 0  # batches handed out in it (skipped ones included)
    _resume: dict[str, int] | None = None

    def _start_pass(self, epoch: int, batches_done: int) -> None:
        raise NotImplementedError

    def __iter__(self):
        state, self._resume = self._resume or self.state_dict(), None
        self._epoch, self._done = int(state["epoch"]), int(state["batches"])
        self._start_pass(self._epoch, self._done)
        return self._counted(super().__iter__())

    def _counted(self, batches):
        for batch in batches:
            self._done += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        if self._done >= len(self):  # after the epoch's last batch: the next epoch, from its start
            return {"epoch": self._epoch + 1, "batches": 0}
        return {"epoch": self._epoch, "batches": self._done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = {"epoch": int(state["epoch"]), "batches": int(state["batches"])}


class ResumableLoader(_PassCounter, DataLoader):
    """A resumable DataLoader (see `_PassCounter`) over an `EpochIndexSampler`: on resume the sampler
    skips the indices of the batches already trained on, so nothing is loaded twice."""

    def __init__(self, dataset, sampler: EpochIndexSampler, batch_size: int, **kwargs):
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, **kwargs)

    def _start_pass(self, epoch: int, batches_done: int) -> None:
        self.sampler.start_pass(epoch, batches_done * self.batch_size)


class ShardedIndexSampler(DistributedSampler):
    """Indices rank, rank + world_size, ... of range(size): every index exactly once across ranks.

    Unlike `DistributedSampler(shuffle=False)` it neither pads nor drops, so ranks can differ by
    one sample (and one batch).
    """

    def __init__(self, size: int, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        self.size = int(size)
        self.rank = int(rank)
        self.num_replicas = int(world_size)
        self.epoch = 0
        self.shuffle = False
        self.drop_last = False
        self.num_samples = len(range(self.rank, self.size, self.num_replicas))
        self.total_size = self.size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.size, self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples


class ShardLoader(_PassCounter, DataLoader):
    """A resumable DataLoader (see `_PassCounter`) over `shards.TrainShards`.

    Each pass tells the stream its epoch and how many of the epoch's batches to skip (their
    samples are still read and decoded, so the stream, its shuffle buffer and its corrupt-sample
    skips stay exactly those of an uninterrupted pass). Lightning calls `set_epoch` only on
    samplers, which an IterableDataset cannot have. Workers are never persistent here, so each
    pass's workers get the new epoch.
    """

    def _start_pass(self, epoch: int, batches_done: int) -> None:
        self.dataset.start_pass(epoch, batches_done)


class HybridDataModule(pl.LightningDataModule):
    """Train/val data from `source="procedural"` (rendered on the fly) or `source="shards"`.

    Keyword arguments are the `DataConfig` fields (see hybrid/config.py) plus `batch_size`
    (per device) and optional `val_batch_size` / `shuffle_buffer`.
    """

    def __init__(self, batch_size: int = 64, source: str = "procedural", image_size: int = 32, shards: str = "",
                 val_shards: str = "", train_size: int = 1_000_000, val_size: int = 1000, batches_per_epoch: int = 200,
                 num_workers: int = 0, seed: int = 0, holdout: Sequence[str] = (), caption_keep: float = 0.7,
                 two_object_prob: float = 0.3, glyph_prob: float = 0.2, num_classes: int = 0,
                 val_batch_size: int | None = None, shuffle_buffer: int = 1000):
        super().__init__()
        if source not in ("procedural", "shards"):
            raise ValueError(f"data source '{source}' is unknown; choose procedural or shards")
        if source == "shards" and not shards:
            raise ValueError("data.source=shards needs data.shards (a pattern, e.g. data/train-{000000..000009}.tar)")
        if batch_size < 1 or batches_per_epoch < 1:
            raise ValueError(f"batch_size ({batch_size}) and batches_per_epoch ({batches_per_epoch}) must be >= 1")
        self.batch_size = int(batch_size)
        self.val_batch_size = int(val_batch_size or batch_size)
        self.source = source
        self.image_size = int(image_size)
        self.shards = shards
        self.val_shards = val_shards
        self.train_size = int(train_size)
        self.val_size = int(val_size)
        self.batches_per_epoch = int(batches_per_epoch)
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.holdout = [str(h) for h in holdout]
        parse_holdout(self.holdout)  # unknown names fail here, before training starts
        self.caption_keep = float(caption_keep)
        self.two_object_prob = float(two_object_prob)
        self.glyph_prob = float(glyph_prob)
        self.shuffle_buffer = int(shuffle_buffer)
        self.num_classes = int(num_classes)  # the models' class count: shard class ids are checked against it
        self.train_skips = SkipCounter()
        self.val_skips = SkipCounter()
        self._val_pattern: str | None = None  # None: procedural val split; "": no validation
        self._val_resolved = False

    @classmethod
    def from_config(cls, data_cfg, batch_size: int, **overrides) -> HybridDataModule:
        """Build from a `DataConfig`-like object (dataclass, OmegaConf node: read by attribute)."""
        names = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "batch_size")]
        kwargs = {name: getattr(data_cfg, name) for name in names if hasattr(data_cfg, name)}
        if "holdout" in kwargs:
            kwargs["holdout"] = list(kwargs["holdout"])
        kwargs.update(overrides)
        return cls(batch_size=batch_size, **kwargs)

    @property
    def class_count(self) -> int:
        """The models' number of classes: data.num_classes, 0 = the procedural dataset's."""
        return self.num_classes or NUM_CLASSES

    # ------------------------------------------------------------------------------------------

    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return int(trainer.global_rank), int(trainer.world_size)

    def resolve_val_pattern(self) -> str | None:
        """val_shards, else (source=shards) sibling val-*.tar or "" (none), else None (procedural val split)."""
        if self.val_shards:
            return self.val_shards
        if self.source != "shards":
            return None
        first = expand_shards(self.shards)[0]
        siblings = sorted(glob.glob(os.path.join(glob.escape(os.path.dirname(first)), "val-*.tar")))
        if siblings:
            return os.path.join(os.path.dirname(first), "val-*.tar")
        warnings.warn(f"no validation data: data.val_shards is empty and there is no val-*.tar next to "
                      f"'{first}'", stacklevel=2)
        return ""

    def setup(self, stage: str | None = None) -> None:
        """Check shard patterns (clear errors before training starts)."""
        if self.source == "shards":
            expand_shards(self.shards)
        self._val_pattern, self._val_resolved = self.resolve_val_pattern(), True
        if self._val_pattern:
            expand_shards(self._val_pattern)

    def _loader_kwargs(self) -> dict:
        return {"num_workers": self.num_workers, "persistent_workers": False, "pin_memory": False}

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        if self.source == "procedural":
            data = ProceduralDataset(image_size=self.image_size, size=self.train_size, seed=self.seed, split="train",
                                     holdout=self.holdout, caption_keep=self.caption_keep,
                                     two_object_prob=self.two_object_prob, glyph_prob=self.glyph_prob)
            per_rank = self.batches_per_epoch * self.batch_size
            sampler = EpochIndexSampler(self.train_size, per_rank, self.seed, rank, world)
            return ResumableLoader(data, sampler, self.batch_size, **self._loader_kwargs())
        stream = TrainShards(self.shards, batch_size=self.batch_size, batches_per_epoch=self.batches_per_epoch,
                             seed=self.seed, rank=rank, world_size=world, image_size=self.image_size,
                             caption_keep=self.caption_keep, shuffle_buffer=self.shuffle_buffer,
                             counter=self.train_skips, num_classes=self.class_count)
        return ShardLoader(stream, batch_size=self.batch_size, **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader | list:
        rank, world = self._rank_world()
        if not self._val_resolved:
            self._val_pattern, self._val_resolved = self.resolve_val_pattern(), True
        if self._val_pattern:
            stream = EvalShards(self._val_pattern, rank=rank, world_size=world, image_size=self.image_size,
                                counter=self.val_skips, num_classes=self.class_count)
            return DataLoader(stream, batch_size=self.val_batch_size, **self._loader_kwargs())
        if self.source == "shards":
            return []  # no validation data (warned in resolve_val_pattern)
        data = ProceduralDataset(image_size=self.image_size, size=self.val_size, seed=self.seed, split="val",
                                 two_object_prob=self.two_object_prob, glyph_prob=self.glyph_prob)
        return DataLoader(data, batch_size=self.val_batch_size, sampler=ShardedIndexSampler(self.val_size, rank, world),
                          **self._loader_kwargs())

    # ------------------------------------------------------------------------------------------

    def skip_counts(self) -> dict[str, int]:
        """Samples and shards skipped so far (corrupt PNG/JSON, unreadable shards; a training shard counts once per
        read), reported at the end of each stage (`_SkipReport`, hybrid/lit/runner.py)."""
        return {"train_bad_samples": self.train_skips.bad_samples, "train_bad_shards": self.train_skips.bad_shards,
                "val_bad_samples": self.val_skips.bad_samples, "val_bad_shards": self.val_skips.bad_shards}
