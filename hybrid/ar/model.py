"""Stage 2: the coarse autoregressive token model, a decoder-only transformer over the tokenizer's codes.

The image is the tokenizer's multi-scale code sequence: scales s_1 < ... < s_K, coarse to fine,
row-major within a scale, L_img = sum_k s_k^2 tokens. One model class writes it in one of two orders:

- `next_scale` (VAR, Tian et al. 2024): all tokens of scale k are predicted in parallel from the
  condition and every token of scales < k. The input rows of scale k hold the latent accumulated from
  scales < k (at full h x w) downsampled to s_k x s_k, projected to the width; scale 1's rows hold the
  start token. Sampling is one forward pass per scale.
- `raster`: one token after another, as a language model writes text: the input at row t is the
  embedding of token t-1 (the start token first), with a causal mask. Sampling is one forward per token.

Sequence layout (T = text prefix length, 0 for class conditioning):

    next_scale: [ text bytes (T) | start x s_1^2 | z_<2 at s_2 x s_2 | ... | z_<K at s_K x s_K ]
                mask: staircase over the blocks (T, s_1^2, ..., s_K^2); the prefix is visible to all
    raster:     [ text bytes (T) | start | code_0 | code_1 | ... | code_{L_img - 2} ]
                mask: causal
    both:       padded text bytes are hidden from every query (key padding)

Every image row carries the position of the token it predicts: a 2D sin/cos embedding in one frame
shared by all scales (the finest grid's) plus a learned scale embedding. Text rows carry a learned
1D position. Conditioning: with `condition="class"` the start token is the class embedding (the null
class id is the dropped condition); with `condition="text"` the UTF-8 bytes of the prompt are a prefix
of the same sequence and the start token is a learned special token (the empty prompt is the dropped
condition). One vocabulary table serves the sequence: [text bytes 0..255 | image codes | start].

With `adaln=True` (the default) the condition also modulates every block and the output head
(adaLN-Zero, as VAR does): a class model uses its class embedding, a text model the mean of its
prompt's byte embeddings. Measured on the default experiment (issue #6, same schedule): with the
in-context start token alone, color adherence was 16% after 300 steps and 45% after 1200; with
adaLN, 40% after 300 and 65% after 450 (shape stayed near chance in both). Old checkpoints, whose
config has no `ar.adaln`, rebuild without it.
"""

from __future__ import annotations

from itertools import accumulate

import torch
import torch.nn.functional as F
from torch import nn

from hybrid.ar.sampling import CFG_SCHEDULES, guidance_scale, guide, sample_logits
from hybrid.nn.attention import AttnMask
from hybrid.nn.blocks import FinalLayer, KVCache, TransformerBlock
from hybrid.nn.embeddings import TEXT_VOCAB, ClassEmbedder, ScaleEmbedding, encode_text, sincos_2d

ORDERS = ("next_scale", "raster")
CONDITIONS = ("class", "text")
# ARConfig keys that are constructor arguments (the rest of ARModel's arguments come from the tokenizer/data).
MODEL_KEYS = ("order", "condition", "width", "depth", "heads", "mlp_ratio", "dropout", "drop_path", "cond_drop",
              "max_text_len")

# A condition is class ids (B,) long, or text as (ids (B, T) long, valid (B, T) bool); captions (list[str])
# are accepted wherever a condition is and encoded with `encode_text`.
Condition = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


class PreallocatedKVCache(KVCache):
    """A `KVCache` that writes into buffers allocated once for `max_len` tokens.

    The base cache grows by concatenation, which copies the whole cache at every decoding step; here a
    step writes only its new rows, so a step's cost grows with the cache only through attention itself.
    `k` / `v` are views (B, length, H, D) of the buffers.
    """

    def __init__(self, max_len: int) -> None:
        super().__init__()
        self.max_len = max_len
        self._k: torch.Tensor | None = None  # (B, max_len, H, D)
        self._v: torch.Tensor | None = None

    def reset(self) -> None:
        super().reset()
        self._k = self._v = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + k.shape[1]
        if end > self.max_len:
            raise ValueError(f"KV cache holds at most {self.max_len} tokens; {end} were appended")
        if self._k is None:
            self._k = k.new_empty(k.shape[0], self.max_len, *k.shape[2:])
            self._v = v.new_empty(v.shape[0], self.max_len, *v.shape[2:])
        self._k[:, start:end] = k
        self._v[:, start:end] = v
        self.k, self.v = self._k[:, :end], self._v[:, :end]  # (B, end, H, D) views
        return self.k, self.v

    def repeat(self, times: int) -> None:
        if self._k is not None:
            self._k, self._v = self._k.repeat(times, 1, 1, 1), self._v.repeat(times, 1, 1, 1)
            self.k, self.v = self._k[:, : self.length], self._v[:, : self.length]


class ARModel(nn.Module):
    """Coarse AR transformer. See the module docstring for orders, layout and conditioning.

    Args:
        scales: the tokenizer's scales (side lengths, increasing).
        codebook_size: number of image codes (the output vocabulary).
        latent_channels: channels of the tokenizer's latent (next_scale inputs).
        num_classes: class count for `condition="class"` (id `num_classes` is the null class).
        order, condition, width, depth, heads, mlp_ratio, dropout, drop_path, cond_drop, max_text_len, adaln:
            as in `ARConfig` (hybrid/config.py).
    """

    def __init__(
        self,
        *,
        scales: list[int],
        codebook_size: int,
        latent_channels: int,
        num_classes: int = 0,
        order: str = "next_scale",
        condition: str = "class",
        width: int = 256,
        depth: int = 6,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        drop_path: float = 0.0,
        cond_drop: float = 0.1,
        max_text_len: int = 64,
        adaln: bool = True,
    ) -> None:
        super().__init__()
        if order not in ORDERS:
            raise ValueError(f"ARModel: order '{order}' is unknown; choose one of {', '.join(ORDERS)}")
        if condition not in CONDITIONS:
            raise ValueError(f"ARModel: condition '{condition}' is unknown; choose one of {', '.join(CONDITIONS)}")
        if condition == "class" and num_classes < 1:
            raise ValueError("ARModel: condition 'class' needs num_classes >= 1")
        if list(scales) != sorted(set(scales)) or not scales or scales[0] < 1:
            raise ValueError(f"ARModel: scales must be strictly increasing positive ints, got {list(scales)}")
        self.order, self.condition = order, condition
        self.scales = [int(s) for s in scales]
        self.lengths = [s * s for s in self.scales]  # tokens per scale
        self.seq_len = sum(self.lengths)  # L_img
        self.codebook_size, self.latent_channels = codebook_size, latent_channels
        self.num_classes, self.cond_drop, self.max_text_len = num_classes, cond_drop, max_text_len

        # One vocabulary: [text bytes | image codes | start]; only built where something reads it.
        self.code_offset = TEXT_VOCAB
        self.start_id = TEXT_VOCAB + codebook_size
        if condition == "text" or order == "raster":
            self.tok_embed = nn.Embedding(TEXT_VOCAB + codebook_size + 1, width)
        if condition == "class":
            self.class_embed = ClassEmbedder(num_classes, width)  # the start token
        else:
            self.text_pos = nn.Parameter(torch.zeros(1, max_text_len, width))
        if order == "next_scale":
            self.latent_proj = nn.Linear(latent_channels, width)

        # Position of the token each image row predicts: shared-frame 2D sin/cos + learned scale embedding.
        img_pos = torch.cat([sincos_2d(s, s, width, extent=self.scales[-1]) for s in self.scales])  # (L_img, D)
        self.register_buffer("img_pos", img_pos, persistent=False)
        self.register_buffer("scale_ids", ScaleEmbedding.ids_for(self.scales), persistent=False)  # (L_img,)
        self.scale_embed = ScaleEmbedding(len(self.scales), width)

        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]  # stochastic depth, deeper = more
        self.adaln = adaln
        cond_dim = width if adaln else None
        self.blocks = nn.ModuleList(TransformerBlock(width, heads, mlp_ratio, dropout, r, cond_dim=cond_dim)
                                    for r in rates)
        self.head = FinalLayer(width, codebook_size, cond_dim=cond_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
        if self.condition == "text":
            nn.init.normal_(self.text_pos, std=0.02)
        nn.init.zeros_(self.head.linear.weight)  # start at uniform logits
        nn.init.zeros_(self.head.linear.bias)
        for m in self.modules():  # adaLN-Zero: every conditioned block starts as the identity
            if hasattr(m, "ada"):
                nn.init.zeros_(m.ada[1].weight)
                nn.init.zeros_(m.ada[1].bias)

    # ------------------------------------------------------------------------------------------
    # Conditions
    # ------------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.img_pos.device

    def prepare_condition(self, cond, device: torch.device | None = None) -> Condition:
        """Class ids (B,) / captions list[str] / (ids, valid) -> the model's condition on `device`.

        Captions are encoded to at most `max_text_len` bytes and trimmed to the longest one (at least 1
        column); trimming only drops padding, so it never changes the result.
        """
        device = device or self.device
        if self.condition == "class":
            if not torch.is_tensor(cond) or cond.dim() != 1:
                raise ValueError("ARModel(condition='class') takes class ids as a (B,) LongTensor")
            return cond.to(device=device, dtype=torch.long)
        if isinstance(cond, (list, tuple)) and all(isinstance(c, str) for c in cond):
            ids, valid = encode_text(list(cond), self.max_text_len, device)  # (B, max_text_len) each
            T = max(int(valid.sum(1).max()), 1) if len(cond) else 1
            return ids[:, :T], valid[:, :T]
        if isinstance(cond, tuple) and len(cond) == 2 and all(torch.is_tensor(t) for t in cond):
            ids, valid = cond
            if ids.shape != valid.shape or ids.dim() != 2:
                raise ValueError(f"ARModel: text ids {tuple(ids.shape)} and valid {tuple(valid.shape)} must be (B, T)")
            if ids.shape[1] > self.max_text_len:
                raise ValueError(f"ARModel: text prefix has {ids.shape[1]} bytes; this model takes {self.max_text_len}")
            return ids.to(device), valid.to(device=device, dtype=torch.bool)
        raise ValueError("ARModel(condition='text') takes captions (list[str]) or (ids (B, T), valid (B, T))")

    def null_condition(self, cond: Condition) -> Condition:
        """The dropped condition, same batch: the null class id, or an empty (fully padded) prompt."""
        if self.condition == "class":
            return torch.full_like(cond, self.class_embed.null_id)
        ids, valid = cond
        return torch.zeros_like(ids), torch.zeros_like(valid)

    def drop_condition(self, cond: Condition, prob: float, generator: torch.Generator | None = None) -> Condition:
        """Replaces each row's condition by the null one with probability `prob` (for guidance)."""
        batch = cond.shape[0] if self.condition == "class" else cond[0].shape[0]
        device = cond.device if self.condition == "class" else cond[0].device
        drop = torch.rand(batch, device=device, generator=generator) < prob  # (B,)
        null = self.null_condition(cond)
        if self.condition == "class":
            return torch.where(drop, null, cond)
        return tuple(torch.where(drop[:, None], n, c) for n, c in zip(null, cond))

    @staticmethod
    def _cat_conditions(a: Condition, b: Condition) -> Condition:
        if torch.is_tensor(a):
            return torch.cat([a, b])
        return torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])

    def _embed_condition(self, cond: Condition):
        """-> prefix (B, T, D) or None, prefix_valid (B, T) or None, start (B, D)."""
        if self.condition == "class":
            return None, None, self.class_embed(cond)  # (B, D)
        ids, valid = cond
        B, T = ids.shape
        prefix = self.tok_embed(ids) + self.text_pos[:, :T]  # (B, T, D)
        start = self.tok_embed.weight[self.start_id].expand(B, -1)  # (B, D)
        return prefix, valid, start

    # ------------------------------------------------------------------------------------------
    # Transformer
    # ------------------------------------------------------------------------------------------

    def _positions(self) -> torch.Tensor:
        return self.img_pos + self.scale_embed(self.scale_ids)  # (L_img, D)

    def _mask(self, lq: int, lk: int, n_prefix: int, key_valid: torch.Tensor | None) -> AttnMask | None:
        """The mask for `lq` queries at the end of `lk` keys; key_valid (B, Lk) bool or None."""
        if self.order == "raster":
            mask = AttnMask(causal=lq > 1, key_padding=key_valid)  # one last query sees every key
        else:
            blocks = ([n_prefix] if n_prefix else []) + self.lengths
            ends = list(accumulate(blocks))
            if lk not in ends:
                raise ValueError(f"ARModel: {lk} keys do not end on a scale boundary ({ends})")
            blocks = tuple(blocks[: ends.index(lk) + 1])
            staircase = blocks if lq > blocks[-1] else None  # queries within the last block see every key
            mask = AttnMask(scale_lengths=staircase, key_padding=key_valid)
        return None if mask.is_empty else mask

    def _cond_vector(self, prefix, prefix_valid, start) -> torch.Tensor | None:
        """The adaLN condition (B, D): the class embedding, or the mean of the valid prompt rows; None without adaLN."""
        if not self.adaln:
            return None
        if prefix is None:
            return start  # (B, D)
        w = prefix_valid.to(prefix.dtype)[..., None]  # (B, T, 1)
        return (prefix * w).sum(1) / w.sum(1).clamp_min(1.0)  # (B, D); an empty prompt -> 0

    def _transformer(self, x, n_prefix, key_valid, caches=None, c=None) -> torch.Tensor:
        """x (B, Lq, D) rows appended after the cached ones; c (B, D) adaLN condition -> hidden states (B, Lq, D)."""
        lk = x.shape[1] + (caches[0].length if caches else 0)
        mask = self._mask(x.shape[1], lk, n_prefix, None if key_valid is None else key_valid[:, :lk])
        extra = {"cond": c} if self.adaln else {}
        for i, block in enumerate(self.blocks):
            x = block(x, mask=mask, cache=caches[i] if caches else None, **extra)
        return x

    def forward(
        self,
        indices: list[torch.Tensor],
        cond,
        scale_inputs: list[torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Teacher-forced logits for every image token.

        Args:
            indices: K tensors (B, s_k, s_k) long, the target codes (raster reads them as inputs).
            cond: class ids (B,), or captions list[str] / (ids (B, T), valid (B, T)).
            scale_inputs: next_scale only: K-1 tensors (B, C, s_k, s_k) for k = 2..K, the latent
                accumulated from scales < k, downsampled (`tokenizer.next_scale_inputs(indices)`).
            generator: draws the condition drop (training mode); None = torch's global generator.
        Returns:
            logits (B, L_img, codebook_size).
        In training mode each row's condition is dropped with probability `cond_drop`.
        """
        if len(indices) != len(self.scales):
            raise ValueError(f"ARModel: got {len(indices)} scales of indices, the model has {len(self.scales)}")
        cond = self.prepare_condition(cond, indices[0].device)
        if self.training and self.cond_drop > 0:
            cond = self.drop_condition(cond, self.cond_drop, generator)
        prefix, prefix_valid, start = self._embed_condition(cond)
        B = start.shape[0]
        pos = self._positions()  # (L_img, D)
        n1 = self.lengths[0]
        if self.order == "next_scale":
            if scale_inputs is None or len(scale_inputs) != len(self.scales) - 1:
                got = "none" if scale_inputs is None else len(scale_inputs)
                raise ValueError(f"ARModel(order='next_scale') needs {len(self.scales) - 1} scale_inputs, got {got}")
            first = start[:, None].expand(B, n1, -1)  # (B, s_1^2, D)
            if scale_inputs:
                z = torch.cat([zk.flatten(2) for zk in scale_inputs], dim=2).transpose(1, 2)  # (B, L_img - n1, C)
                rest = self.latent_proj(z.to(self.latent_proj.weight.dtype))  # (B, L_img - n1, D)
                first = torch.cat([first, rest], dim=1)
            x = first + pos  # (B, L_img, D)
        else:
            codes = torch.cat([i.flatten(1) for i in indices], dim=1)  # (B, L_img)
            shifted = self.tok_embed(codes[:, :-1] + self.code_offset)  # (B, L_img - 1, D)
            x = torch.cat([start[:, None], shifted], dim=1) + pos  # (B, L_img, D)
        n_prefix, key_valid = 0, None
        if prefix is not None:
            n_prefix = prefix.shape[1]
            x = torch.cat([prefix, x], dim=1)  # (B, T + L_img, D)
            key_valid = torch.cat([prefix_valid, prefix_valid.new_ones(B, self.seq_len)], dim=1)  # (B, T + L_img)
        c = self._cond_vector(prefix, prefix_valid, start)  # (B, D) or None
        x = self._transformer(x, n_prefix, key_valid, c=c)  # (B, T + L_img, D)
        return self.head(x[:, n_prefix:], c)  # (B, L_img, V)

    def loss(self, indices: list[torch.Tensor], cond, scale_inputs: list[torch.Tensor] | None = None,
             generator: torch.Generator | None = None):
        """Cross-entropy over all image tokens (arguments as in `forward`) -> (loss, metrics).

        metrics: "loss", "acc" (token accuracy) and "acc/scale{s}" per scale, detached scalars.
        """
        logits = self(indices, cond, scale_inputs, generator)  # (B, L_img, V)
        target = torch.cat([i.flatten(1) for i in indices], dim=1)  # (B, L_img)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten())
        with torch.no_grad():
            correct = (logits.argmax(-1) == target).float()  # (B, L_img)
            metrics = {"loss": loss.detach(), "acc": correct.mean()}
            for s, part in zip(self.scales, correct.split(self.lengths, dim=1)):
                metrics[f"acc/scale{s}"] = part.mean()
        return loss, metrics

    # ------------------------------------------------------------------------------------------
    # Sampling
    # ------------------------------------------------------------------------------------------

    def check_layout(self, tokenizer) -> None:
        """Raises ValueError when `tokenizer`'s scales/codebook/channels differ from this model's."""
        if tokenizer is None:
            if self.order == "next_scale":
                raise ValueError("ARModel(order='next_scale') samples with a tokenizer (it builds each scale's input)")
            return
        for name, mine in (("scales", self.scales), ("latent_channels", self.latent_channels)):
            theirs = getattr(tokenizer, name)
            if (list(theirs) if name == "scales" else theirs) != mine:
                raise ValueError(f"ARModel: the tokenizer's {name} {theirs} differ from the model's {mine}")
        size = getattr(tokenizer, "codebook_size", self.codebook_size)
        if size != self.codebook_size:
            raise ValueError(
                f"ARModel: the tokenizer's codebook_size {size} differs from the model's {self.codebook_size}")

    @torch.no_grad()
    def generate(
        self,
        cond,
        tokenizer,
        generator: torch.Generator,
        cfg: float = 1.0,
        cfg_schedule: str = "constant",
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        double_batch: bool | None = None,
        return_logits: bool = False,
        given: list[torch.Tensor] | None = None,
        num_scales: int | None = None,
    ):
        """Samples codes with a KV cache: one forward per scale (next_scale) or per token (raster).

        Args:
            cond: class ids (B,), or captions list[str] / (ids (B, T), valid (B, T)).
            tokenizer: anything with `scales`, `latent_channels`, `accumulate(z_acc, idx, k)` and
                `downsample(z, s)` (the HybridTokenizer); may be None for raster order.
            generator: the source of all randomness (on the model's device).
            cfg: classifier-free guidance scale (1 = none); cond and null rows run as one doubled batch.
            cfg_schedule: "constant", or "linear" (rises from 1 to `cfg` over scales / tokens).
            temperature, top_k, top_p: sampling controls (temperature 0 = greedy; 0 / 1 = off).
            double_batch: run the null rows even when cfg == 1 (default: only when guiding).
            return_logits: also return the conditional logits (B, L_img, V) the tokens were drawn from.
            given: next_scale only: the codes of the first m scales, m tensors (B, s_k, s_k) long (e.g. a real
                image's, from `tokenizer.encode`); they are kept as they are and the model writes the scales
                after them (VAR-style variation of an image's detail; `benchmarks.given_scales` uses it to find
                the scale where samples lose an attribute). None or [] = sample every scale.
            num_scales: stop after this many scales (a refiner with `refiner.coarse_scales` reads no more);
                None = all K.
        Returns:
            K (or `num_scales`) tensors (B, s_k, s_k) long (and the logits when `return_logits`).
        """
        if cfg_schedule not in CFG_SCHEDULES:
            raise ValueError(f"cfg_schedule '{cfg_schedule}' is unknown; choose one of {', '.join(CFG_SCHEDULES)}")
        self.check_layout(tokenizer)
        given = list(given or [])
        if given and self.order != "next_scale":
            raise ValueError("ARModel.generate: `given` scales need next_scale order")
        K = len(self.scales) if num_scales is None else int(num_scales)
        if not 1 <= K <= len(self.scales):
            raise ValueError(f"ARModel.generate: num_scales={num_scales}, the model has {len(self.scales)} scales")
        if len(given) > K:
            raise ValueError(f"ARModel.generate: {len(given)} given scales, {K} to generate")
        device = self.device
        if generator.device.type != device.type:
            raise ValueError(f"ARModel.generate: the generator is on {generator.device}, the model on {device}")
        cond = self.prepare_condition(cond, device)
        doubled = (cfg != 1.0) if double_batch is None else double_batch
        if doubled:
            cond = self._cat_conditions(cond, self.null_condition(cond))  # rows: cond (B), then null (B)
        prefix, prefix_valid, start = self._embed_condition(cond)
        c = self._cond_vector(prefix, prefix_valid, start)  # (B2, D) or None
        B2 = start.shape[0]
        B = B2 // 2 if doubled else B2
        for k, g in enumerate(given):
            s = self.scales[k]
            if tuple(g.shape) != (B, s, s):
                raise ValueError(f"ARModel.generate: given scale {k} has shape {tuple(g.shape)}, expected {(B, s, s)}")
        n_prefix, key_valid = 0, None
        if prefix is not None:
            n_prefix = prefix.shape[1]
            key_valid = torch.cat([prefix_valid, prefix_valid.new_ones(B2, self.seq_len)], dim=1)  # (B2, T + L_img)
        pos = self._positions()  # (L_img, D)
        caches = [PreallocatedKVCache(n_prefix + self.seq_len) for _ in self.blocks]

        def step(x: torch.Tensor, t: int, n_out: int, num_steps: int) -> torch.Tensor:
            """Appends rows x (B2, Lq, D); samples the last n_out rows' tokens -> (B, n_out)."""
            h = self._transformer(x, n_prefix, key_valid, caches, c)  # (B2, Lq, D)
            logits = self.head(h[:, -n_out:], c).float()  # (B2, n_out, V)
            cond_logits = logits[:B]  # (B, n_out, V)
            if doubled:
                logits = guide(cond_logits, logits[B:], guidance_scale(cfg, cfg_schedule, t, num_steps))
            if return_logits:
                all_logits.append(cond_logits)
            return sample_logits(logits, generator, temperature, top_k, top_p)  # (B, n_out)

        def with_prefix(x: torch.Tensor) -> torch.Tensor:
            return x if prefix is None else torch.cat([prefix, x], dim=1)

        all_logits: list[torch.Tensor] = []
        tokens: list[torch.Tensor] = []
        if self.order == "next_scale":
            z_acc, offset = None, 0
            for k, (s, n) in enumerate(zip(self.scales[:K], self.lengths[:K])):
                if k == 0:
                    x = with_prefix(start[:, None].expand(B2, n, -1) + pos[:n])  # (B2, [T +] s_1^2, D)
                else:
                    z = tokenizer.downsample(z_acc, s)  # (B, C, s, s)
                    z = z.flatten(2).transpose(1, 2).to(self.latent_proj.weight.dtype)  # (B, s^2, C)
                    x = self.latent_proj(z.repeat(B2 // B, 1, 1)) + pos[offset : offset + n]  # (B2, s^2, D)
                idx = step(x, k, n, len(self.scales)).view(B, s, s)  # (B, s, s); guidance schedule over all K
                if k < len(given):  # the forward pass above still fills the KV cache for the later scales
                    idx = given[k].to(device=device, dtype=idx.dtype)
                tokens.append(idx)
                if k < K - 1:
                    z_acc = tokenizer.accumulate(z_acc, idx, k)  # (B, C, h, w)
                offset += n
        else:
            L = sum(self.lengths[:K])
            codes = []
            x = with_prefix(start[:, None] + pos[:1])  # (B2, [T +] 1, D)
            for t in range(L):
                idx = step(x, t, 1, self.seq_len)  # (B, 1)
                codes.append(idx)
                if t < L - 1:
                    x = self.tok_embed(idx.repeat(B2 // B, 1) + self.code_offset) + pos[t + 1 : t + 2]  # (B2, 1, D)
            codes = torch.cat(codes, dim=1)  # (B, L_img)
            tokens = [c.view(B, s, s) for c, s in zip(codes.split(self.lengths[:K], dim=1), self.scales)]
        if return_logits:
            return tokens, torch.cat(all_logits, dim=1)  # (B, L_img, V)
        return tokens
