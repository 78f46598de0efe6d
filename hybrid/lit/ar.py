"""Stage 2 in Lightning: the coarse AR model over the frozen tokenizer's codes.

`ARModule` reads the frozen tokenizer (`TokenizerConsumer`) and trains an `ARModel` (held as
`self.model`, so the pipeline finds its weights under the "model." prefix) with teacher forcing:
cross-entropy over every image token, token accuracy overall and per scale in the logs. For
`ar.order=next_scale` the tokenizer builds each scale's input from the indices
(`next_scale_inputs`). The condition (class id or caption, cut to `ar.max_text_len` bytes) is dropped
with probability `ar.cond_drop`, drawn from the step's generator (resumable).

Token cache (`ar.token_cache=true`, the default): the training step never runs the tokenizer's
encoder. Before the first step a pool of training images (`token_pool_size`: `ar.token_cache_size`,
grown so that no image is drawn more than `ar.token_cache_passes` times, and never more than the run
draws) is read once (the data module's own sampler, rank 0's stream, so every rank builds the same
pool) and encoded; batches of {"indices", "class_id", "caption"} are then drawn from the pool
(`EpochIndexSampler`: per epoch and rank). The pool is saved as `<run_dir>/ar/token_cache.pt`, keyed by
the tokenizer's weight hash, the data config and the pool size, and reused when a run resumes.
With `token_cache=false` each batch of images is encoded on the fly (fresh images every step).

Previews: the tokenizer's discrete reconstruction of data images / AR samples of the same conditions
(guidance as in `ar.sample`). Validation (when `train.val_every` > 0): loss and accuracy on the
validation images, no condition dropping.
"""

from __future__ import annotations

import math
import time
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import Dataset

from hybrid.checkpoints import atomic_torch_save
from hybrid.config import to_dict
from hybrid.data.module import EpochIndexSampler, HybridDataModule, ResumableLoader
from hybrid.lit.base import TokenizerConsumer, eager
from hybrid.models import build_ar
from hybrid.nn.embeddings import fit_caption
from hybrid.progress import progress_bar

TOKEN_CACHE_FILE = "token_cache.pt"


class TokenPool(Dataset):
    """Pre-encoded training images: item i -> {"indices": [(s_k, s_k) int16], "class_id": int, "caption": str}."""

    def __init__(self, indices: list[torch.Tensor], class_ids: torch.Tensor, captions: list[str]) -> None:
        self.indices = indices  # K tensors (N, s_k, s_k) int16
        self.class_ids = class_ids  # (N,) long
        self.captions = captions

    def __len__(self) -> int:
        return len(self.class_ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"indices": [t[i] for t in self.indices], "class_id": int(self.class_ids[i]),
                "caption": self.captions[i]}


def token_pool_size(ar_cfg, max_steps: int, batch_size: int) -> int:
    """Images in the AR's token pool: `token_cache_size`, grown so that `max_steps` batches of
    `batch_size` draw no image more than `token_cache_passes` times (0: no growth), and never more
    images than those batches draw. A pool drawn too often is memorised: see `ARConfig.token_cache_passes`.
    Counted for one rank: under DDP every rank draws from the same pool, so W ranks draw each image about
    W times as often (raise `token_cache_size` or lower `token_cache_passes` to match). With `max_steps` -1 (a
    time limit only) the draws are unknown: the pool is `token_cache_size`."""
    if int(max_steps) == -1:
        return max(1, int(ar_cfg.token_cache_size))
    draws = max(1, int(max_steps) * int(batch_size))
    size = int(ar_cfg.token_cache_size)
    if ar_cfg.token_cache_passes > 0:
        size = max(size, math.ceil(draws / ar_cfg.token_cache_passes))
    return max(1, min(size, draws))


class TokenCacheDataModule(pl.LightningDataModule):
    """Training batches from the module's token pool; validation images from the usual data module."""

    def __init__(self, module: ARModule) -> None:
        super().__init__()
        self.module = module
        cfg = module.cfg
        self.batch_size = int(module.tcfg.batch_size)
        self.batches_per_epoch = int(cfg.data.batches_per_epoch)
        self.seed = int(cfg.data.seed)
        self.pool_size = token_pool_size(cfg.ar, int(module.tcfg.max_steps), self.batch_size)
        # read once, never attached to the trainer: rank 0's stream on every rank, so all build the same pool
        self.pool_images = HybridDataModule.from_config(cfg.data, batch_size=self.batch_size,
                                                        batches_per_epoch=math.ceil(self.pool_size / self.batch_size))
        self.images = HybridDataModule.from_config(cfg.data, batch_size=self.batch_size)

    def setup(self, stage: str | None = None) -> None:
        self.pool_images.setup(stage)
        self.images.setup(stage)

    def train_dataloader(self) -> ResumableLoader:
        pool = self.module.token_pool(self.pool_images, self.pool_size)
        trainer = self.trainer
        rank, world = (0, 1) if trainer is None else (int(trainer.global_rank), int(trainer.world_size))
        sampler = EpochIndexSampler(len(pool), self.batches_per_epoch * self.batch_size, self.seed, rank, world)
        return ResumableLoader(pool, sampler, self.batch_size)  # a run resumed mid-epoch sees the same batches

    def val_dataloader(self):
        self.images.trainer = self.trainer  # validation is split across ranks
        return self.images.val_dataloader()

    @property
    def source(self) -> str:
        """The data source (`data.source`), as the end-of-fit skip report asks of a data module."""
        return self.images.source

    def skip_counts(self) -> dict[str, int]:
        """Samples and shards skipped so far (`HybridDataModule.skip_counts`): the pool's reads of the training
        shards and the validation reads. Every rank reads the same pool stream, so rank 0 alone counts it (the
        report sums the ranks)."""
        rank = 0 if self.trainer is None else int(self.trainer.global_rank)
        pool = self.pool_images.skip_counts()
        return {key: value + (pool[key] if rank == 0 else 0) for key, value in self.images.skip_counts().items()}


class ARModule(TokenizerConsumer):
    """The coarse AR stage: p(tokens | class or prompt)."""

    stage = "ar"
    preview_count = 8

    def __init__(self, config: dict, **kwargs: Any) -> None:
        """kwargs: tokenizer_path (fresh run) or tokenizer_config/tokenizer_hash (from a checkpoint)."""
        super().__init__(config, **kwargs)
        self.section = self.cfg.ar
        self.model = build_ar(self.cfg, self.tokenizer)
        self._preview: dict[str, Any] | None = None

    # -- data -----------------------------------------------------------------------------------
    def make_datamodule(self) -> pl.LightningDataModule:
        """What the runner trains on: the token pool (ar.token_cache) or images encoded per step."""
        if self.section.token_cache:
            return TokenCacheDataModule(self)
        return HybridDataModule.from_config(self.cfg.data, batch_size=self.tcfg.batch_size)

    @torch.no_grad()
    def token_pool(self, images: HybridDataModule, size: int) -> TokenPool:
        """The first `size` training images of `images` encoded by the frozen tokenizer (cached on disk)."""
        key = {"tokenizer_hash": self.hparams.get("tokenizer_hash"), "size": size,
               "data": to_dict(self.cfg.data), "scales": list(self.tokenizer.scales)}
        path = self.stage_dir / TOKEN_CACHE_FILE
        if path.is_file():
            try:
                saved = torch.load(path, map_location="cpu", weights_only=True)
                unreadable = None if isinstance(saved, dict) else f"it holds a {type(saved).__name__}"
            except Exception as err:  # noqa: BLE001 - truncated, text, another format: a cache, so encode again
                saved, unreadable = {}, (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            if unreadable:
                print(f"[ar] token cache {path} cannot be read ({unreadable}): encoding again")
            elif saved.get("key") == key:
                print(f"[ar] token cache: {size} encoded images from {path}")
                return TokenPool(saved["indices"], saved["class_id"], saved["caption"])
            else:
                print(f"[ar] token cache {path} was made for other data or another tokenizer: encoding again")
        start = time.time()
        was_training = self.tokenizer.training
        self.tokenizer.eval()
        # Written into tensors allocated once: keeping each batch's small code tensors instead (and
        # concatenating at the end) pinned glibc's heap between the encoder's large transient buffers, so
        # the process grew by ~8 MB per batch of 64 (23 GB, killed, at a 144,000-image pool on 24 GB).
        indices: list[torch.Tensor] = []  # K tensors (size, s_k, s_k) int16: codebooks stay below 32768
        class_id = torch.empty(size, dtype=torch.long)
        captions: list[str] = []
        n = 0
        progress = progress_bar(total=size, desc="[ar] encoding the token pool", unit="img", leave=False,
                        disable=self.global_rank != 0 or not self.cfg.trainer.progress_bar)
        for batch in images.train_dataloader():
            enc = self.tokenizer.encode(batch["image"].to(self.device))
            if not indices:
                indices = [torch.empty((size, *i.shape[1:]), dtype=torch.int16) for i in enc.indices]
            take = min(batch["image"].shape[0], size - n)
            for out, i in zip(indices, enc.indices):
                out[n:n + take] = i[:take].to("cpu", torch.int16)
            class_id[n:n + take] = batch["class_id"][:take].cpu()
            captions += list(batch["caption"][:take])
            n += take
            progress.update(take)
            if n >= size:
                break
        progress.close()
        self.tokenizer.train(was_training)
        if n < size:  # the data ran out first: keep what was encoded
            indices, class_id = [t[:n].clone() for t in indices], class_id[:n].clone()
        print(f"[ar] token cache: encoded {len(class_id)} images in {time.time() - start:.0f} s")
        if self.global_rank == 0:
            atomic_torch_save({"key": key, "indices": indices, "class_id": class_id, "caption": captions}, path)
        return TokenPool(indices, class_id, captions)

    def tokens_of(self, batch: dict) -> list[torch.Tensor]:
        """The batch's codes, K tensors (B, s_k, s_k) long: from the token cache, or encoded now."""
        if "indices" in batch:
            return [i.to(self.device, torch.long) for i in batch["indices"]]
        with torch.no_grad():
            return self.tokenizer.encode(batch["image"]).indices

    def condition_of(self, batch: dict):
        if self.model.condition == "class":
            return batch["class_id"].to(self.device)
        return [fit_caption(c, self.model.max_text_len) for c in batch["caption"]]

    def scale_inputs(self, indices: list[torch.Tensor]) -> list[torch.Tensor] | None:
        if self.model.order != "next_scale":
            return None
        with torch.no_grad():
            return self.tokenizer.next_scale_inputs(indices)  # K-1 tensors (B, C, s_k, s_k)

    # -- steps ----------------------------------------------------------------------------------
    def compute_loss(self, batch: dict):
        indices = self.tokens_of(batch)
        if self._preview is None:
            n = self.preview_count
            self._preview = {"indices": [i[:n].detach().clone() for i in indices],
                             "class_id": batch["class_id"][:n].clone(), "caption": list(batch["caption"][:n])}
        loss, metrics = self.model.loss(indices, self.condition_of(batch), self.scale_inputs(indices),
                                        generator=self.step_generator())
        return loss, {k: v for k, v in metrics.items() if k != "loss"}

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        indices = self.tokens_of(batch)
        with eager():  # under trainer.compile: no recompilation for eval mode and the validation batch shape
            _, metrics = self.model.loss(indices, self.condition_of(batch), self.scale_inputs(indices))
        B = indices[0].shape[0]
        self.log("val/loss", metrics["loss"], sync_dist=True, batch_size=B)
        self.log("val/acc", metrics["acc"], sync_dist=True, batch_size=B)

    # -- sampling -------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, cond, generator: torch.Generator | None = None, **settings) -> list[torch.Tensor]:
        """Codes for `cond` (class ids or captions) with the `ar.sample` settings unless overridden."""
        s = self.section.sample
        kw = {"cfg": s.cfg, "cfg_schedule": s.cfg_schedule, "temperature": s.temperature, "top_k": s.top_k,
              "top_p": s.top_p, **settings}
        if generator is None:
            generator = torch.Generator(device=self.device).manual_seed(int(self.cfg.seed))
        return self.model.generate(cond, self.tokenizer, generator, **kw)

    def preview_images(self):
        if self._preview is None:
            return None
        indices = [i.to(self.device) for i in self._preview["indices"]]
        samples = self.generate(self.condition_of(self._preview))
        decode = self.tokenizer.decode
        data = decode(self.tokenizer.indices_to_latent(indices))
        sampled = decode(self.tokenizer.indices_to_latent(samples))
        # rows: data images through the tokenizer (z_q) / AR samples of the same conditions
        return {"samples": torch.cat([data, sampled]).clamp(-1, 1)}
