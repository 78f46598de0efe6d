"""Multi-scale residual vector quantizer (next-scale style, as in VAR) with one shared codebook.

For scales s_1 < ... < s_K <= h (h = the latent size; usually s_K = h):

    rest = z
    for k:  idx_k = nearest_code(area_downsample(rest, s_k))          # (B, s_k, s_k)
            h_k   = phi(bicubic_upsample(codebook[idx_k], h))          # (B, C, h, w)
            z_q  += h_k ;  rest = z - z_q

z_q is the sum of the upsampled codes, r = z - z_q the continuous residual. With s_K < h the token
grid is coarser than the latent, so r holds the detail finer than s_K as well as the quantization
error (measured in issue #5: at the default budget that costs the continuous path more than it
gives the refiner). Codes are summed as raw vectors and matched by plain L2 distance. `phi` is an
optional shared 3x3 conv with a residual ratio (VAR's "phi"): h = (1 - ratio) * h + ratio * conv(h),
identity at initialisation; it is part of `code_to_latent` so `indices -> z_q` is exact.

Codebook learning: exponential moving averages of the assigned vectors (k-means style, decay `ema_decay`,
Laplace-smoothed counts), pooled over all scales; no optimizer touches the codebook. Codes unused for
`dead_code_steps` updates are restarted from residual vectors at random positions of the current batch
(a scale drawn uniformly, then a position). The codebook starts "all dead" and is filled from the first
training batch the same way. Under torch.distributed the statistics are all-reduced and restart vectors
broadcast from rank 0, so every rank holds the same codebook. Statistics are updated only when
`forward(..., update=True)`.
"""

from __future__ import annotations

import zlib

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def area_downsample(z: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, size, size) by area averaging (identity at full size)."""
    if z.shape[-2:] == (size, size):
        return z
    return F.interpolate(z, size=(size, size), mode="area")


def code_counts(indices: list[torch.Tensor], codebook_size: int) -> torch.Tensor:
    """How often each code is used at each scale: list of (B, s, s) -> (K_scales, codebook_size) long."""
    return torch.stack([torch.bincount(idx.flatten(), minlength=codebook_size) for idx in indices])


def usage_stats(counts: torch.Tensor, prefix: str = "") -> dict[str, torch.Tensor]:
    """Codebook usage from per-scale code counts (K_scales, codebook_size) (e.g. summed over batches).

    usage = codes used / min(codebook size, positions); perplexity = exp(entropy of the code histogram).
    Keys: `{prefix}usage/s{k}`, `{prefix}perplexity/s{k}` per scale k (0-based), `{prefix}usage_pooled`
    (codes used at any scale / min(codebook size, all positions)), `{prefix}perplexity_pooled`,
    `{prefix}usage_finest`.
    """
    counts = counts.double()
    codebook_size = counts.shape[1]
    out = {}

    def one(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = c.sum()
        used = (c > 0).sum().double()
        usage = used / n.clamp(1, codebook_size)
        p = c / n.clamp_min(1)
        perplexity = torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())
        return usage.float(), perplexity.float()

    for k in range(counts.shape[0]):
        out[f"{prefix}usage/s{k}"], out[f"{prefix}perplexity/s{k}"] = one(counts[k])
    out[f"{prefix}usage_pooled"], out[f"{prefix}perplexity_pooled"] = one(counts.sum(0))
    out[f"{prefix}usage_finest"] = out[f"{prefix}usage/s{counts.shape[0] - 1}"]
    return out


class MultiScaleQuantizer(nn.Module):
    """Residual VQ over scales with one EMA codebook (K, C).

    Args:
        dim: code dimension = latent channels C.
        latent_size: h = w of the latent.
        scales: strictly increasing, at most latent_size (usually ending at it).
        codebook_size: K.
        dead_code_steps: restart codes unused for this many updates.
        ema_decay: decay of the codebook EMA.
        phi_ratio: residual ratio of the shared refinement conv; 0 = no conv.
    """

    def __init__(self, dim: int, latent_size: int, scales: list[int], codebook_size: int = 1024,
                 dead_code_steps: int = 50, ema_decay: float = 0.99, phi_ratio: float = 0.0, eps: float = 1e-5):
        super().__init__()
        scales = [int(s) for s in scales]
        if not scales or scales != sorted(set(scales)) or scales[0] < 1:
            raise ValueError(f"tokenizer.scales must be strictly increasing positive ints, got {scales}")
        if scales[-1] > latent_size:
            raise ValueError(f"tokenizer.scales must not exceed the latent size {latent_size}, got {scales}")
        if not 0.0 <= phi_ratio <= 1.0:
            raise ValueError(f"tokenizer.phi_ratio must be within [0, 1], got {phi_ratio}")
        self.dim = dim
        self.latent_size = latent_size
        self.scales = scales
        self.codebook_size = codebook_size
        self.dead_code_steps = dead_code_steps
        self.ema_decay = ema_decay
        self.phi_ratio = phi_ratio
        self.eps = eps
        self.phi = None
        self.last_restarts = 0  # codes restarted by the latest update (a statistic, not state)
        self.seed = 0  # with the update count, seeds the random draws of (re)initialisation (set by the trainer)
        if phi_ratio > 0:
            self.phi = nn.Conv2d(dim, dim, 3, padding=1)
            with torch.no_grad():  # identity at initialisation
                self.phi.weight.zero_()
                self.phi.weight[:, :, 1, 1] = torch.eye(dim)
                self.phi.bias.zero_()
        self.register_buffer("codebook", torch.randn(codebook_size, dim) * 0.01)  # (K, C)
        self.register_buffer("ema_count", torch.zeros(codebook_size))  # (K,)
        self.register_buffer("ema_sum", torch.zeros(codebook_size, dim))  # (K, C)
        self.register_buffer("code_age", torch.full((codebook_size,), dead_code_steps, dtype=torch.long))  # (K,)
        # EMA updates so far: saved with the weights, so a resumed run draws the same restarts
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    # ---- the deterministic maps (used identically by encode and indices_to_latent) ----

    def lookup(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (B, s, s) long -> code vectors (B, C, s, s)."""
        return F.embedding(idx, self.codebook).permute(0, 3, 1, 2)  # (B, C, s, s)

    def code_to_latent(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (B, s, s) -> its contribution to z_q at full size (B, C, h, w): upsample, then phi."""
        h = self.lookup(idx)  # (B, C, s, s)
        if h.shape[-1] != self.latent_size:
            h = F.interpolate(h, size=(self.latent_size, self.latent_size), mode="bicubic", align_corners=False)
        if self.phi is not None:
            h = (1 - self.phi_ratio) * h + self.phi_ratio * self.phi(h)
        return h  # (B, C, h, w)

    def accumulate(self, z_acc: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor:
        """z_acc (B, C, h, w) or None + the contribution of one scale's codes idx (B, s, s)."""
        h = self.code_to_latent(idx)
        return h if z_acc is None else z_acc + h

    def indices_to_latent(self, indices: list[torch.Tensor]) -> torch.Tensor:
        """One (B, s_k, s_k) index map per scale -> z_q (B, C, h, w)."""
        if len(indices) != len(self.scales):
            raise ValueError(f"indices_to_latent: got {len(indices)} index maps for {len(self.scales)} scales")
        z_q = None
        for idx in indices:
            z_q = self.accumulate(z_q, idx)
        return z_q

    @torch.no_grad()
    def nearest(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, C) -> index of the nearest code by L2 distance (N,)."""
        cb = self.codebook.float()
        dist2 = x.pow(2).sum(1, keepdim=True) - 2 * x @ cb.t() + cb.pow(2).sum(1)[None]  # (N, K)
        return dist2.argmin(1)

    # ---- quantization ----

    def forward(self, z: torch.Tensor, update: bool = False):
        """z (B, C, h, w) -> (indices: list[(B, s, s)], z_q (B, C, h, w)).

        z_q carries gradients into phi only (the codes are fixed vectors); with `update` the EMA
        codebook statistics are updated and dead codes restarted (training only).
        """
        if z.shape[1:] != (self.dim, self.latent_size, self.latent_size):
            raise ValueError(f"quantizer: latent shape {tuple(z.shape[1:])} != "
                             f"{(self.dim, self.latent_size, self.latent_size)}")
        z = z.detach().float()
        if update and bool((self.code_age >= self.dead_code_steps).all()):
            self._init_codebook(z)
        indices, targets = [], []
        z_q = None
        for s in self.scales:
            rest = z if z_q is None else z - z_q.detach()  # (B, C, h, w), the part not yet explained
            r_s = area_downsample(rest, s)  # (B, C, s, s)
            flat = r_s.permute(0, 2, 3, 1).reshape(-1, self.dim)  # (B*s*s, C)
            idx = self.nearest(flat).view(z.shape[0], s, s)  # (B, s, s)
            z_q = self.accumulate(z_q, idx)
            indices.append(idx)
            targets.append(flat)
        if update:
            self._update(indices, targets)
        return indices, z_q

    @torch.no_grad()
    def _init_codebook(self, z: torch.Tensor) -> None:
        """Fill the codebook with the batch's latent vectors at every scale (before the first update)."""
        pools = [area_downsample(z, s).permute(0, 2, 3, 1).reshape(-1, self.dim) for s in self.scales]
        self.codebook.copy_(self._sample(pools, self.codebook_size))
        self.ema_sum.copy_(self.codebook)
        self.ema_count.fill_(1.0)
        self.code_age.zero_()

    @torch.no_grad()
    def _sample(self, pools: list[torch.Tensor], n: int) -> torch.Tensor:
        """n random vectors from per-scale pools [(N_k, C)], equal on every rank.

        The draws come from a generator seeded with (`seed`, update count), not from the global RNG,
        so an interrupted and resumed run (whose global RNG restarts from the seed) restarts the same
        codes with the same vectors as an uninterrupted one. Each draw picks a scale uniformly, then a
        random row of it: the few coarse-scale vectors get as many codes as the many fine-scale
        residuals (a uniform draw over positions would leave the coarse scales with a handful of codes,
        i.e. almost no information in the first tokens).
        """
        device = pools[0].device
        gen = torch.Generator(device=device).manual_seed(
            zlib.crc32(f"quantizer:{self.seed}:{int(self.updates)}".encode()))
        sizes = torch.tensor([p.shape[0] for p in pools], device=device)  # (S,)
        starts = torch.cumsum(sizes, 0) - sizes  # (S,)
        scale = torch.randint(len(pools), (n,), device=device, generator=gen)  # (n,)
        pick = torch.rand(n, device=device, generator=gen)  # (n,)
        rows = starts[scale] + (pick * sizes[scale]).long().clamp_max(sizes[scale] - 1)
        flat = torch.cat(pools).float()  # (N, C)
        jitter = torch.randn(n, self.dim, device=device, generator=gen)  # (n, C)
        picked = flat[rows] + 1e-3 * flat.std() * jitter  # (n, C) jittered
        if _distributed():
            dist.broadcast(picked, src=0)
        return picked

    @torch.no_grad()
    def _update(self, indices: list[torch.Tensor], targets: list[torch.Tensor]) -> None:
        """EMA k-means step on the vectors each scale quantized, then restart dead codes."""
        idx = torch.cat([i.flatten() for i in indices])  # (N,)
        vecs = torch.cat(targets)  # (N, C)
        count = torch.bincount(idx, minlength=self.codebook_size).float()  # (K,)
        total = torch.zeros_like(self.ema_sum).index_add_(0, idx, vecs)  # (K, C)
        if _distributed():
            dist.all_reduce(count)
            dist.all_reduce(total)
        d = self.ema_decay
        self.ema_count.mul_(d).add_(count, alpha=1 - d)
        self.ema_sum.mul_(d).add_(total, alpha=1 - d)
        n = self.ema_count.sum()
        smoothed = (self.ema_count + self.eps) / (n + self.codebook_size * self.eps) * n  # Laplace smoothing
        self.codebook.copy_(self.ema_sum / smoothed[:, None])
        self.code_age.add_(1)
        self.code_age[count > 0] = 0
        self.updates.add_(1)
        self.last_restarts = self.restart_dead_codes(targets)

    @torch.no_grad()
    def restart_dead_codes(self, pools: list[torch.Tensor] | torch.Tensor) -> int:
        """Codes unused for `dead_code_steps` updates -> random vectors of the per-scale pools [(N_k, C)]
        (see `_sample`). Returns how many were restarted."""
        dead = self.code_age >= self.dead_code_steps  # (K,)
        num = int(dead.sum())
        if num == 0:
            return 0
        new = self._sample([pools] if torch.is_tensor(pools) else pools, num)  # (num, C)
        self.codebook[dead] = new
        self.ema_sum[dead] = new
        self.ema_count[dead] = 1.0
        self.code_age[dead] = 0
        return num

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, latent_size={self.latent_size}, scales={self.scales}, "
                f"codebook_size={self.codebook_size}, phi_ratio={self.phi_ratio}")

