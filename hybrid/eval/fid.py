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

from hybrid.progress import progress_bar

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


def _moments(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean (D,), unbiased covariance (D, D)) of feature rows (N, D), in float64. On every thread: for
    the hundreds of thousands of rows a large evaluation has, this product is what takes the time."""
    x = features.double()
    return x.mean(0), torch.cov(x.T)


def _fid_of(moments_a: tuple[torch.Tensor, torch.Tensor], moments_b: tuple[torch.Tensor, torch.Tensor]) -> float:
    """FID from two (mean, covariance) pairs: torchmetrics' `_compute_fid`, its small eigenproblem on one thread."""
    with _one_thread():
        return float(_compute_fid(moments_a[0], moments_a[1], moments_b[0], moments_b[1]))


def _check_sizes(n_a: int, n_b: int) -> None:
    if n_a < 2 or n_b < 2:
        raise ValueError(f"FID needs at least 2 samples per set, got {n_a} and {n_b}")


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """FID between two feature sets (Na, D) and (Nb, D), as torchmetrics computes it.

    Means and unbiased covariances in float64, then torchmetrics' `_compute_fid`
    (||mu_a - mu_b||^2 + tr(S_a + S_b - 2 sqrt(S_a S_b))).
    """
    _check_sizes(features_a.shape[0], features_b.shape[0])
    return _fid_of(_moments(features_a), _moments(features_b))


class RealResamples:
    """A real feature set (N, D) and its bootstrap resamples, each kept as (mean, covariance) once computed, so
    that every FID judged against the set (each mode's, the paired difference) reuses them: with a million
    real rows, the resampled covariances are most of a bootstrap's time. Resample k is the same for every
    caller (its own generator, seeded by `seed`), so each interval stays an ordinary bootstrap of its own."""

    def __init__(self, features: torch.Tensor, seed: int = 0) -> None:
        self.features = features.double().cpu()
        self.n = int(self.features.shape[0])
        self.full = _moments(self.features) if self.n >= 2 else None
        self._generator = torch.Generator().manual_seed(seed + 1)  # not the fake rows' stream (seed)
        self._resampled: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, covariance) of resample k (0, 1, ...): rows drawn with replacement."""
        while len(self._resampled) <= k:
            rows = torch.randint(self.n, (self.n,), generator=self._generator)
            self._resampled.append(_moments(self.features[rows]))
        return self._resampled[k]


def _real_resamples(real: torch.Tensor | RealResamples, seed: int) -> RealResamples:
    return real if isinstance(real, RealResamples) else RealResamples(real, seed)


def bootstrap_fid(features_fake: torch.Tensor, features_real: torch.Tensor | RealResamples, bootstrap: int = 200,
                  seed: int = 0, level: float = 0.95) -> dict:
    """FID of two feature sets with a bootstrap confidence interval.

    Both sets are resampled with replacement `bootstrap` times. Resampling inflates FID by its
    finite-sample bias (duplicates shrink the effective sample), so the raw percentiles would
    sit above the estimate; the interval is therefore the bootstrap distribution's spread
    around the point estimate: [q_lo - bias, q_hi - bias], bias = mean(bootstrap) - fid,
    clipped below at 0. `features_real` may be a `RealResamples` shared between calls (its own seed
    then draws the real rows). Returns {"fid", "ci": [lo, hi], "n": fake count, "n_real", "bootstrap"}.
    """
    real = _real_resamples(features_real, seed)
    _check_sizes(features_fake.shape[0], real.n)
    fid = _fid_of(_moments(features_fake), real.full)
    out = {"fid": fid, "ci": [fid, fid], "n": int(features_fake.shape[0]), "n_real": real.n,
           "bootstrap": int(bootstrap)}
    if bootstrap < 2:
        return out
    fake = features_fake.double().cpu()
    lo, hi = _bootstrap_interval(lambda i, k: _fid_of(_moments(fake[i]), real[k]), fid, fake.shape[0], real.n,
                                 bootstrap, seed, level)
    out["ci"] = [min(max(lo, 0.0), fid), max(hi, fid)]
    return out


def paired_fid_difference(features_a: torch.Tensor, features_b: torch.Tensor,
                          features_real: torch.Tensor | RealResamples, bootstrap: int = 200, seed: int = 0,
                          level: float = 0.95) -> dict:
    """FID(a) - FID(b) for two generated sets whose row i answers the same request (the same prompt and
    seed, e.g. the hybrid's images and the pure AR's decoded from the same tokens), with a paired
    bootstrap interval: every resample draws one set of row indices for both a and b (and one for the
    real set), so what the two sets share cancels and only their difference is judged. That interval is
    far narrower than the two FIDs' own intervals; it excluding 0 says a and b differ for these
    requests. `features_real` may be a `RealResamples` shared between calls. Returns {"difference",
    "ci": [lo, hi], "fid_a", "fid_b", "n", "bootstrap"}.
    """
    if features_a.shape != features_b.shape:
        raise ValueError(f"a paired FID difference needs two sets of the same shape (row i of each answering "
                         f"the same request), got {tuple(features_a.shape)} and {tuple(features_b.shape)}")
    a, b = features_a.double().cpu(), features_b.double().cpu()
    real = _real_resamples(features_real, seed)
    _check_sizes(a.shape[0], real.n)
    fid_a, fid_b = _fid_of(_moments(a), real.full), _fid_of(_moments(b), real.full)
    diff = fid_a - fid_b
    out = {"difference": diff, "ci": [diff, diff], "fid_a": fid_a, "fid_b": fid_b, "n": int(a.shape[0]),
           "bootstrap": int(bootstrap)}
    if bootstrap >= 2:
        def statistic(i: torch.Tensor, k: int) -> float:  # one set of rows for both sets, one real resample
            return _fid_of(_moments(a[i]), real[k]) - _fid_of(_moments(b[i]), real[k])

        out["ci"] = list(_bootstrap_interval(statistic, diff, a.shape[0], real.n, bootstrap, seed, level))
    return out


def _bootstrap_interval(statistic, estimate: float, n: int, n_real: int, bootstrap: int, seed: int,
                        level: float) -> tuple[float, float]:
    """The `level` interval of `statistic(fake rows, k)` (k: the real set's resample, `RealResamples[k]`) over
    `bootstrap` resamples with replacement, shifted by the bootstrap's bias (mean of the resamples - `estimate`)."""
    gen = torch.Generator().manual_seed(seed)
    stats = []
    for k in progress_bar(range(bootstrap), desc="bootstrap", leave=False, unit="resample",
                          disable=n + n_real < 100_000):
        stats.append(statistic(torch.randint(n, (n,), generator=gen), k))
    stats = torch.tensor(stats, dtype=torch.float64)  # (bootstrap,)
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


@torch.no_grad()
def real_features(oracle: nn.Module, num_samples: int = 2000, seed: int = FID_REAL_SEED, chunk: int = 5000,
                  on_chunk=None, **dataset_kwargs) -> torch.Tensor:
    """Oracle features (N, D) float64 of `real_images(oracle, num_samples, seed, **dataset_kwargs)`, rendered
    `chunk` images at a time so that a million real images never sit in memory at once (the same rows as
    `oracle_features(real_images(...))`: image i depends on the seed and i only). `on_chunk(images)`, when
    given, sees every chunk too (an `InceptionJudge.add_real`)."""
    from hybrid.data.procedural import ProceduralDataset

    data = ProceduralDataset(image_size=oracle.image_size, size=num_samples, seed=seed, split="val", **dataset_kwargs)
    feats = []
    for start in progress_bar(range(0, num_samples, chunk), desc="real images", leave=False, unit="chunk",
                              disable=num_samples <= chunk):
        images = torch.stack([data[i]["image"] for i in range(start, min(start + chunk, num_samples))])
        feats.append(oracle_features(images, oracle))
        if on_chunk is not None:
            on_chunk(images)
    return torch.cat(feats)  # (N, D)


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


class FeatureMoments:
    """Running count, sum and sum of outer products of feature rows, in float64: the mean and covariance of
    any number of rows without keeping them (what torchmetrics' FID keeps, too)."""

    def __init__(self) -> None:
        self.n = 0
        self.sum: torch.Tensor | None = None
        self.outer: torch.Tensor | None = None

    def add(self, features: torch.Tensor) -> None:
        f = features.detach().double().reshape(features.shape[0], -1).cpu()  # (B, D)
        if self.sum is None:
            self.sum, self.outer = f.new_zeros(f.shape[1]), f.new_zeros(f.shape[1], f.shape[1])
        self.n += f.shape[0]
        self.sum += f.sum(0)
        self.outer += f.T @ f

    def mean_cov(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean (D,), unbiased covariance (D, D)); needs at least 2 rows."""
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 feature rows, got {self.n}")
        mean = self.sum / self.n
        return mean, (self.outer - self.n * torch.outer(mean, mean)) / (self.n - 1)


class InceptionJudge:
    """Classic FID on InceptionV3 pool features (2048), with torch-fidelity's network (through torchmetrics),
    against one real set whose statistics are computed once: `judge(fake) -> float`, any number of times, or
    `judge.stream()` to add one fake set batch by batch (several at once: one stream per set).

    real: (N, 3, H, W) float in [-1, 1] (or uint8 [0, 255]); any size (resized to 299). None: add the real
    images with `add_real(images)`, in as many batches as you like, before judging. device: where the
    network runs (default: real's device, else the CPU); images are moved there.
    weights_path: a local copy of torch-fidelity's InceptionV3 weights (`INCEPTION_WEIGHTS_URL`);
    nothing is downloaded. The file is first checked to hold plain tensors
    (`torch.load(weights_only=True)`) because torch-fidelity itself unpickles it.
    """

    def __init__(self, real: torch.Tensor | None, weights_path: str | os.PathLike, batch_size: int = 50,
                 device: str | torch.device | None = None):
        path = Path(weights_path)
        if not path.is_file():
            from hybrid.checkpoints import path_problem

            raise FileNotFoundError(f"Inception weights '{path}' {path_problem(path) or 'is not a regular file'}; "
                                    f"download {INCEPTION_WEIGHTS_URL} "
                                    "and pass its local path (the 'fid' extra: pip install 'hybrid[fid]')")
        try:
            import torch_fidelity  # noqa: F401
        except ImportError:
            raise ImportError("Inception FID needs torch-fidelity: pip install 'hybrid[fid]'") from None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - not a plain state dict
            detail = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise ValueError(f"Inception weights '{path}' are not a plain tensor state dict ({detail}); download "
                             f"{INCEPTION_WEIGHTS_URL} and pass its local path") from None
        if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"Inception weights '{path}' are not a plain tensor state dict (a "
                             f"{type(state).__name__} of other things); download {INCEPTION_WEIGHTS_URL} and pass "
                             f"its local path")
        self.batch_size = batch_size
        try:
            metric = FrechetInceptionDistance(feature=2048, normalize=True, feature_extractor_weights_path=str(path))
        except RuntimeError as err:  # a state dict of another network (e.g. a hybrid checkpoint's weights)
            detail = (str(err).strip().splitlines() or [""])[0][:200]
            raise ValueError(f"Inception weights '{path}' do not fit torch-fidelity's InceptionV3 ({detail} ...); "
                             f"download {INCEPTION_WEIGHTS_URL} and pass its local path") from None
        device = device if device is not None else real.device if real is not None else "cpu"
        self.network = metric.inception.eval().to(device)  # torch-fidelity's InceptionV3, taking uint8 images
        self.real = FeatureMoments()
        if real is not None:
            self.add_real(real)

    @torch.no_grad()
    def add_to(self, moments: FeatureMoments, images: torch.Tensor) -> None:
        """Adds the pool features of `images` to `moments`, `batch_size` images at a time."""
        device = next(self.network.parameters()).device
        for start in range(0, images.shape[0], self.batch_size):
            x = images[start:start + self.batch_size]
            # the uint8 images torchmetrics' FID makes of [0, 1] floats with normalize=True
            x = x if x.dtype == torch.uint8 else ((((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)) * 255).byte()
            moments.add(self.network(x.to(device)))

    def add_real(self, images: torch.Tensor) -> None:
        self.add_to(self.real, images)

    def stream(self) -> InceptionStream:
        return InceptionStream(self)

    def __call__(self, fake: torch.Tensor) -> float:
        stream = self.stream()
        stream.update(fake)
        return stream.compute()


class InceptionStream:
    """One fake set judged by an `InceptionJudge`, added batch by batch: `update(images)`, then `compute()`."""

    def __init__(self, judge: InceptionJudge) -> None:
        self.judge, self.fake = judge, FeatureMoments()

    def update(self, images: torch.Tensor) -> None:
        self.judge.add_to(self.fake, images)

    def compute(self) -> float:
        if self.judge.real.n < 2 or self.fake.n < 2:
            raise ValueError(f"Inception FID needs at least 2 real and 2 generated images, got {self.judge.real.n} "
                             f"and {self.fake.n}")
        return _fid_of(self.judge.real.mean_cov(), self.fake.mean_cov())


def inception_fid(fake: torch.Tensor, real: torch.Tensor, weights_path: str | os.PathLike,
                  batch_size: int = 50) -> float:
    """Classic FID of `fake` against `real` on InceptionV3 features; see `InceptionJudge` (use it to
    judge several fake sets against one real set)."""
    return InceptionJudge(real, weights_path, batch_size)(fake)
