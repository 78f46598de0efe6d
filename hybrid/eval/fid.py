"""FID in the oracle's feature space (with a bootstrap confidence interval) and Inception FID.

The oracle's pre-logit features (`Oracle.features`, <= 128 dims) replace Inception's 2048 pool
features: they are trained on exactly the attributes a prompt names, are cheap on a CPU and
need no downloaded weights. `OracleFeatures` wraps them as a torchmetrics feature extractor,
so `FrechetInceptionDistance(feature=OracleFeatures(oracle), normalize=True)` works as usual;
`compute_fid` computes the features once and bootstraps the distance from them.

Inception FID (`inception_fid`) is there for comparison with published numbers; it needs the
`fid` extra (torch-fidelity) and its InceptionV3 weights as a local file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchmetrics.image.fid import FrechetInceptionDistance, _compute_fid

FID_REAL_SEED = 20_011  # procedural val-split seed of the reference ("real") images
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth")


def _to_oracle_input(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [0, 255] or float [0, 1] images (B, 3, H, W) -> float [-1, 1] at size x size."""
    x = images.float() / 127.5 - 1.0 if images.dtype == torch.uint8 else images.float() * 2.0 - 1.0
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x  # (B, 3, size, size)


class OracleFeatures(nn.Module):
    """The oracle's pre-logit features as a torchmetrics FID feature extractor.

    torchmetrics hands a custom extractor the images unchanged: floats in [0, 1] with
    `normalize=True`, else whatever `update` got (uint8 [0, 255] by convention). Both are
    accepted; other sizes are resized (bilinear, antialiased) to the oracle's resolution.
    forward: images (B, 3, H, W) -> features (B, feature_dim). Always in eval mode.
    """

    def __init__(self, oracle: nn.Module):
        super().__init__()
        self.oracle = oracle.eval()
        self.num_features = int(oracle.feature_dim)  # torchmetrics reads this instead of probing a 299px image

    def train(self, mode: bool = True) -> OracleFeatures:
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.oracle.features(_to_oracle_input(images, self.oracle.image_size))  # (B, D)


def oracle_fid_metric(oracle: nn.Module, **kwargs) -> FrechetInceptionDistance:
    """A torchmetrics FID metric in oracle features; `update(images in [0, 1], real=...)`."""
    return FrechetInceptionDistance(feature=OracleFeatures(oracle), normalize=True, **kwargs)


# --------------------------------------------------------------------------------------------
# FID from features, with a bootstrap confidence interval
# --------------------------------------------------------------------------------------------


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run small linear algebra on one thread: on a busy CPU, OpenMP threads that wait for each
    other make 128x128 eigenproblems ~50x slower than one thread does."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """FID between two feature sets (Na, D) and (Nb, D), as torchmetrics computes it.

    Means and unbiased covariances in float64, then torchmetrics' `_compute_fid`
    (||mu_a - mu_b||^2 + tr(S_a + S_b - 2 sqrt(S_a S_b))).
    """
    if features_a.shape[0] < 2 or features_b.shape[0] < 2:
        raise ValueError(f"FID needs at least 2 samples per set, got {features_a.shape[0]} and {features_b.shape[0]}")
    with _one_thread():
        a, b = features_a.double(), features_b.double()
        mu_a, mu_b = a.mean(0), b.mean(0)  # (D,)
        cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)  # (D, D)
        return float(_compute_fid(mu_a, cov_a, mu_b, cov_b))


def bootstrap_fid(features_fake: torch.Tensor, features_real: torch.Tensor, bootstrap: int = 200,
                  seed: int = 0, level: float = 0.95) -> dict:
    """FID of two feature sets with a bootstrap confidence interval.

    Both sets are resampled with replacement `bootstrap` times. Resampling inflates FID by its
    finite-sample bias (duplicates shrink the effective sample), so the raw percentiles would
    sit above the estimate; the interval is therefore the bootstrap distribution's spread
    around the point estimate: [q_lo - bias, q_hi - bias], bias = mean(bootstrap) - fid,
    clipped below at 0. Returns {"fid", "ci": [lo, hi], "n": fake count, "n_real", "bootstrap"}.
    """
    fid = frechet_distance(features_fake, features_real)
    out = {"fid": fid, "ci": [fid, fid], "n": int(features_fake.shape[0]), "n_real": int(features_real.shape[0]),
           "bootstrap": int(bootstrap)}
    if bootstrap < 2:
        return out
    fake, real = features_fake.double().cpu(), features_real.double().cpu()
    lo, hi = _bootstrap_interval(lambda i, j: frechet_distance(fake[i], real[j]), fid, fake.shape[0],
                                 real.shape[0], bootstrap, seed, level)
    out["ci"] = [min(max(lo, 0.0), fid), max(hi, fid)]
    return out


def paired_fid_difference(features_a: torch.Tensor, features_b: torch.Tensor, features_real: torch.Tensor,
                          bootstrap: int = 200, seed: int = 0, level: float = 0.95) -> dict:
    """FID(a) - FID(b) for two generated sets whose row i answers the same request (the same prompt and
    seed, e.g. the hybrid's images and the pure AR's decoded from the same tokens), with a paired
    bootstrap interval: every resample draws one set of row indices for both a and b (and one for the
    real set), so what the two sets share cancels and only their difference is judged. That interval is
    far narrower than the two FIDs' own intervals; it excluding 0 says a and b differ for these
    requests. Returns {"difference", "ci": [lo, hi], "fid_a", "fid_b", "n", "bootstrap"}.
    """
    if features_a.shape != features_b.shape:
        raise ValueError(f"a paired FID difference needs two sets of the same shape (row i of each answering "
                         f"the same request), got {tuple(features_a.shape)} and {tuple(features_b.shape)}")
    a, b, real = features_a.double().cpu(), features_b.double().cpu(), features_real.double().cpu()
    fid_a, fid_b = frechet_distance(a, real), frechet_distance(b, real)
    diff = fid_a - fid_b
    out = {"difference": diff, "ci": [diff, diff], "fid_a": fid_a, "fid_b": fid_b, "n": int(a.shape[0]),
           "bootstrap": int(bootstrap)}
    if bootstrap >= 2:
        out["ci"] = list(_bootstrap_interval(
            lambda i, j: frechet_distance(a[i], real[j]) - frechet_distance(b[i], real[j]), diff, a.shape[0],
            real.shape[0], bootstrap, seed, level))
    return out


def _bootstrap_interval(statistic, estimate: float, n: int, n_real: int, bootstrap: int, seed: int,
                        level: float) -> tuple[float, float]:
    """The `level` interval of `statistic(fake rows, real rows)` over `bootstrap` resamples with
    replacement, shifted by the bootstrap's bias (mean of the resamples - `estimate`)."""
    gen = torch.Generator().manual_seed(seed)
    with _one_thread():
        stats = torch.tensor([statistic(torch.randint(n, (n,), generator=gen),
                                        torch.randint(n_real, (n_real,), generator=gen))
                              for _ in range(bootstrap)], dtype=torch.float64)  # (bootstrap,)
    alpha = (1.0 - level) / 2.0
    lo, hi = torch.quantile(stats, torch.tensor([alpha, 1.0 - alpha], dtype=stats.dtype)).tolist()
    bias = stats.mean().item() - estimate
    return lo - bias, hi - bias


@torch.no_grad()
def oracle_features(images: torch.Tensor, oracle: nn.Module, batch_size: int = 250) -> torch.Tensor:
    """images (N, 3, S, S) float in [-1, 1] (or uint8) -> oracle features (N, D) float64 on the CPU."""
    device = next(oracle.parameters()).device
    feats = []
    for start in range(0, images.shape[0], batch_size):
        x = images[start:start + batch_size].to(device)
        if x.dtype == torch.uint8:
            x = x.float() / 127.5 - 1.0
        feats.append(oracle.features(x.float()).double().cpu())  # (b, D)
    return torch.cat(feats)  # (N, D)


def real_images(oracle: nn.Module, num_samples: int = 2000, seed: int = FID_REAL_SEED,
                **dataset_kwargs) -> torch.Tensor:
    """`num_samples` fresh procedural images (val split, reserved seed) at the oracle's size: (N, 3, S, S) in [-1, 1].

    `dataset_kwargs` go to `ProceduralDataset` (e.g. two_object_prob, glyph_prob: match the
    generator's training data).
    """
    from hybrid.data.procedural import ProceduralDataset

    data = ProceduralDataset(image_size=oracle.image_size, size=num_samples, seed=seed, split="val", **dataset_kwargs)
    return torch.stack([data[i]["image"] for i in range(num_samples)])


def compute_fid(fake_images: torch.Tensor, real_images_or_none: torch.Tensor | None, oracle: nn.Module,
                num_samples: int = 2000, bootstrap: int = 200, seed: int = 0, batch_size: int = 250,
                real_kwargs: dict | None = None) -> dict:
    """FID in oracle features, with a 95% bootstrap confidence interval.

    fake_images: (N, 3, S, S) float in [-1, 1] (or uint8) at the oracle's size. real_images_or_none:
    the same, or None to render `num_samples` fresh procedural images with a held-out seed
    (`real_kwargs` go to `ProceduralDataset`). Returns {"fid": float, "ci": [lo, hi], "n": N,
    "n_real": int, "bootstrap": int}; see `bootstrap_fid` for the interval.
    """
    if real_images_or_none is None:
        real_images_or_none = real_images(oracle, num_samples, **(real_kwargs or {}))
    fake = oracle_features(fake_images, oracle, batch_size)  # (N, D)
    real = oracle_features(real_images_or_none, oracle, batch_size)  # (M, D)
    return bootstrap_fid(fake, real, bootstrap=bootstrap, seed=seed)


# --------------------------------------------------------------------------------------------
# Inception FID (torch-fidelity weights, local file)
# --------------------------------------------------------------------------------------------


class InceptionJudge:
    """Classic FID on InceptionV3 pool features (2048), via torchmetrics and torch-fidelity's network,
    against one real set whose features are computed once: `judge(fake) -> float`, any number of times.

    real: (N, 3, H, W) float in [-1, 1] (or uint8 [0, 255]); any size (resized to 299).
    weights_path: a local copy of torch-fidelity's InceptionV3 weights (`INCEPTION_WEIGHTS_URL`);
    nothing is downloaded. The file is first checked to hold plain tensors
    (`torch.load(weights_only=True)`) because torch-fidelity itself unpickles it.
    """

    def __init__(self, real: torch.Tensor, weights_path: str | os.PathLike, batch_size: int = 50):
        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(f"Inception weights '{path}' do not exist; download {INCEPTION_WEIGHTS_URL} "
                                    "and pass its local path (the 'fid' extra: pip install 'hybrid[fid]')")
        try:
            import torch_fidelity  # noqa: F401
        except ImportError:
            raise ImportError("Inception FID needs torch-fidelity: pip install 'hybrid[fid]'") from None
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # not a plain state dict
            raise ValueError(f"Inception weights '{path}' are not a plain tensor state dict: {err}") from None
        self.batch_size = batch_size
        # reset_real_features=False: reset() clears the fake statistics only, so the real ones are kept
        self.metric = FrechetInceptionDistance(feature=2048, normalize=True, reset_real_features=False,
                                               feature_extractor_weights_path=str(path)).to(real.device)
        self._update(real, is_real=True)

    def _update(self, images: torch.Tensor, is_real: bool) -> None:
        for start in range(0, images.shape[0], self.batch_size):
            x = images[start:start + self.batch_size]
            x = x.float() / 255.0 if x.dtype == torch.uint8 else ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)
            self.metric.update(x, real=is_real)

    def __call__(self, fake: torch.Tensor) -> float:
        self.metric.reset()
        self._update(fake, is_real=False)
        with _one_thread():  # a 2048x2048 eigenproblem
            return float(self.metric.compute())


def inception_fid(fake: torch.Tensor, real: torch.Tensor, weights_path: str | os.PathLike,
                  batch_size: int = 50) -> float:
    """Classic FID of `fake` against `real` on InceptionV3 features; see `InceptionJudge` (use it to
    judge several fake sets against one real set)."""
    return InceptionJudge(real, weights_path, batch_size)(fake)
