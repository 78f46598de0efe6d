"""`train.py stage=eval`: every trained mode of a run, judged by the oracle, into `<run_dir>/metrics.json`.

One object per mode — `tokenizer` (reconstructions: decode(z) and decode(z_q)), `ar` (pure AR:
decode the AR's z_q), `hybrid` (AR + refiner), `diffusion` (when trained) — each with `fid` and
`fid_ci` (oracle features, `eval.num_samples` images against `eval.num_real` fresh real ones, as many by
default, 95% bootstrap interval; `fid_n` and `fid_n_real` say how many), `adherence` ({"class":
per-attribute accuracy for class prompts, "text": for full-caption prompts}, text only for
text-conditioned models), `glyph_accuracy` (glyph prompts), `images_per_s` (batch 16), `ms_per_image_b1`,
and `params` (per stage of that mode). `hybrid` also has `fid_vs_ar`:
FID(hybrid) - FID(ar) on the same class requests row for row (the same AR tokens when the refiner reads
every scale, `same_tokens`), with a paired bootstrap interval (`fid.paired_fid_difference`): below 0
outside the interval, the refiner measurably helps.

A second reference (`eval.decoded_reference`, on by default): the same real images passed through the run's
tokenizer, decode(encode(x).z). Every mode gets `fid_decoded_ref` and `fid_decoded_ref_ci` against it (the
tokenizer also `fid_discrete_decoded_ref`), and `hybrid` gets `fid_vs_ar_decoded_ref`. The decoder is
blurrier than the data, and FID against the real images is dominated by detail it cannot make: a fixed
sharpening filter on decode(z_q) lowers it about as much as a perfect refiner would. The decoded reference shares
the decoder, so it judges what the generating stages control, the latents (docs/results.md, "What the
oracle's FID rewards"). `generation_settings`: `eval.settings` as parsed
({} = each stage's own sampling config), used for every generating mode. `eval_draw`: `eval.draw`, which
set of requests and generation seeds was judged.

Requests are drawn like the validation data (fixed seed, `data.glyph_prob`), so FID compares like with
like: class prompts carry the first object's shape and color; text prompts are the first object's full
caption (every attribute it names: a star's or glyph's fill is never named, yet `adherence["text"]`
scores fill and glyph on every row, so its `fill`, `glyph` and `all` include attributes the prompt
implied rather than said).

Every set of generated (and reconstructed) images is judged batch by batch as it is made (oracle features
and predictions kept, the images not), and the real images are rendered a chunk at a time, so memory grows
by about a kilobyte per request and per real image rather than by the images; the bootstrap adds two
transient copies of the real features (about 3 kB per real image at its peak).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from hybrid.checkpoints import write_json
from hybrid.data.attributes import ATTRIBUTES, class_id
from hybrid.data.procedural import caption, sample_attributes
from hybrid.devices import Stopwatch
from hybrid.images import save_grid
from hybrid.progress import progress_bar

EVAL_REQUEST_SEED = 20_261_127
DEFAULT_GLYPH_PROB = 0.2  # data.glyph_prob's default: requests drawn with it are the ones every number so far used
INCEPTION_DIMS = 2048
TIMING_BATCH = 16


def _warn_if_singular(n: int, n_real: int, dims: int, what: str) -> None:
    """FID from no more samples than feature dimensions: a covariance is singular, so the number is
    comparable only with FIDs from the same sample sizes (a published Inception FID uses 50,000)."""
    if min(n, n_real) <= dims:
        which = ("both covariances are" if max(n, n_real) <= dims else
                 "the generated images' covariance is" if n <= dims else "the real images' covariance is")
        warnings.warn(f"FID from {n} samples against {n_real} real ones in {what} ({dims} dimensions): {which} "
                      f"singular, so it is comparable only with FIDs from the same counts (eval.num_samples, "
                      f"eval.num_real)", stacklevel=3)


def make_requests(n: int, seed: int = EVAL_REQUEST_SEED, glyph_prob: float = DEFAULT_GLYPH_PROB, holdout=(),
                  only_holdout: bool = False) -> dict:
    """n attribute requests as the data draws them: {"attrs": {name: (n,) long}, "classes": (n,), "captions"}."""
    rng = np.random.default_rng(seed)
    rows = [sample_attributes(rng, holdout=holdout, only_holdout=only_holdout, glyph_prob=glyph_prob)
            for _ in range(n)]
    attrs = {name: torch.tensor([r[name] for r in rows], dtype=torch.long) for name in ATTRIBUTES}
    classes = torch.tensor([class_id(r["shape"], r["color"]) for r in rows], dtype=torch.long)
    return {"attrs": attrs, "classes": classes, "captions": [caption(r) for r in rows]}


def class_request_attrs(attrs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a class prompt asks for: shape and color; the rest is not requested (-1)."""
    return {k: (v if k in ("shape", "color") else torch.full_like(v, -1)) for k, v in attrs.items()}


def request_seed(draw: int = 0) -> int:
    """The class requests' seed of draw `draw` (`eval.draw`); its glyph requests use the next seed. Draw s
    is the showdown's seed s."""
    return EVAL_REQUEST_SEED + 101 * draw


def generation_seed(draw: int, start: int) -> int:
    """The pipeline seed of the batch that begins at request `start` in draw `draw` (the showdown's too)."""
    return draw * 100_003 + start


def _fitted(pipe, mode: str, request: dict) -> dict:
    """The request with its prompts cut to what the mode's text encoders take, as training cut captions."""
    return {"prompts": pipe.fit_prompts(request["prompts"], mode)} if "prompts" in request else request


def _mode_batches(pipe, modes, batch_size: int, settings: dict | None = None, suffix: str = "", draw: int = 0,
                  **request) -> Iterator[dict[str, torch.Tensor]]:
    """{mode: one batch of images (on the CPU)} for every mode of `modes`, batch after batch of one request
    (`classes=` or `prompts=`), with one progress bar: an evaluation keeps what it needs of each batch rather
    than every image. `ar` and `hybrid` come from one AR pass (`HybridPipeline.ar_and_hybrid`, the same
    images as two passes) when the pipeline allows it. Each mode's prompts are cut to what its text encoder
    takes (`_fitted`)."""
    modes = list(modes)
    if not modes:
        return
    shared = "ar" in modes and "hybrid" in modes and pipe.hybrid_shares_ar_tokens
    fitted = {mode: _fitted(pipe, mode, request) for mode in modes}
    key = "classes" if "classes" in request else "prompts"
    desc = f"eval {'+'.join(modes)}{suffix}"
    # each batch's seed follows from its first index (`generation_seed`), so every mode is asked the same
    # requests with the same seeds
    for start in progress_bar(range(0, len(request[key]), batch_size), desc=desc, leave=False, unit="batch"):
        seed = generation_seed(draw, start)
        piece = {mode: {key: fitted[mode][key][start:start + batch_size]} for mode in modes}
        out = {}
        if shared:
            ar, hybrid = pipe.ar_and_hybrid(**piece["hybrid"], seed=seed, batch_size=batch_size, **(settings or {}))
            out["ar"], out["hybrid"] = ar.cpu(), hybrid.cpu()
        for mode in modes:
            if mode not in out:
                out[mode] = pipe(**piece[mode], mode=mode, seed=seed, batch_size=batch_size, **(settings or {})).cpu()
        yield out


def _generate_modes(pipe, modes, batch_size: int, settings: dict | None = None, suffix: str = "", draw: int = 0,
                    **request) -> dict[str, torch.Tensor]:
    """{mode: all images} for one request: `_mode_batches`, concatenated."""
    parts: dict[str, list[torch.Tensor]] = {mode: [] for mode in modes}
    for batch in _mode_batches(pipe, modes, batch_size, settings, suffix, draw, **request):
        for mode, images in batch.items():
            parts[mode].append(images)
    return {mode: torch.cat(images) for mode, images in parts.items() if images}


def _generate(pipe, mode: str, batch_size: int, settings: dict | None = None, draw: int = 0,
              **request) -> torch.Tensor:
    """All images of one mode for one request (`_generate_modes` of that mode alone)."""
    return _generate_modes(pipe, [mode], batch_size, settings, draw=draw, **request)[mode]


class ImageTally:
    """What the evaluation keeps of one set of generated images, added batch by batch: oracle features (FID)
    and predictions (adherence, glyph accuracy) from one oracle pass, the first `keep` images (the grid), and
    Inception statistics when there is an Inception judge. At about a kilobyte per image (128 float64
    features; none with `keep_features=False`, for sets judged on adherence only) instead of the image
    itself, hundreds of thousands of requests fit in memory."""

    def __init__(self, oracle, inception=None, keep: int = 64, chunk: int = 250, keep_features: bool = True) -> None:
        self.oracle, self.keep, self.chunk, self.keep_features = oracle, keep, chunk, keep_features
        self.device = next(oracle.parameters()).device
        self.inception = inception.stream() if inception is not None else None
        self._features: list[torch.Tensor] = []
        self._predictions: dict[str, list[torch.Tensor]] = {}
        self._first: list[torch.Tensor] = []
        self._kept = 0

    @torch.no_grad()
    def add(self, images: torch.Tensor) -> None:
        """images (B, 3, S, S) in [-1, 1]."""
        for start in range(0, images.shape[0], self.chunk):
            logits, feats = self.oracle.forward_with_features(images[start:start + self.chunk].to(self.device).float())
            if self.keep_features:
                self._features.append(feats.double().cpu())  # (b, D)
            for name, value in logits.items():
                self._predictions.setdefault(name, []).append(value.argmax(-1).cpu())  # (b,)
        if self._kept < self.keep:
            self._first.append(images[: self.keep - self._kept].cpu())
            self._kept += self._first[-1].shape[0]
        if self.inception is not None:
            self.inception.update(images)

    def features(self) -> torch.Tensor:
        return torch.cat(self._features)  # (N, D)

    def predictions(self) -> dict[str, torch.Tensor]:
        return {name: torch.cat(parts) for name, parts in self._predictions.items()}  # {attr: (N,)}

    def first(self) -> torch.Tensor:
        return torch.cat(self._first)  # (min(N, keep), 3, S, S)

    def inception_fid(self) -> float:
        return self.inception.compute()


def _tally_modes(pipe, modes, oracle, inception, batch_size: int, settings: dict | None = None, suffix: str = "",
                 draw: int = 0, keep_features: bool = True, **request) -> dict[str, ImageTally]:
    """{mode: ImageTally of its images for one request}, generated batch by batch (`_mode_batches`)."""
    tallies = {mode: ImageTally(oracle, inception, keep_features=keep_features) for mode in modes}
    for batch in _mode_batches(pipe, modes, batch_size, settings, suffix, draw, **request):
        for mode, images in batch.items():
            tallies[mode].add(images)
    return tallies


def fill_batch(requests, n: int):
    """The first `n` of `requests` (class ids, a tensor, or prompts, a list), repeated to fill `n` when there are
    fewer: a speed or cost per image is of a whole batch of `n`, not of a smaller one divided by `n`."""
    reps = -(-n // len(requests))
    return requests.repeat(reps)[:n] if isinstance(requests, torch.Tensor) else (list(requests) * reps)[:n]


def measure_speed(pipe, mode: str, classes: torch.Tensor | None, repeats: int = 3,
                  prompts: list[str] | None = None, **settings) -> dict:
    """images/s at batch 16 and ms/image at batch 1, medians of `repeats` after a warm-up, for the first
    class ids of `classes` (or, when it is None, the first `prompts`), repeated to fill the batch where there are
    fewer; `settings` go to the pipeline.
    Each call is timed on the pipeline's device (`Stopwatch`: a CUDA device is synchronized)."""
    def median_seconds(batch: int) -> float:
        # fewer requests than the batch (a small eval.num_samples, a few real images) are repeated to fill it:
        # images/s is of a whole batch of 16
        request = ({"classes": fill_batch(classes, batch)} if classes is not None
                   else _fitted(pipe, mode, {"prompts": fill_batch(prompts, batch)}))
        pipe(**request, mode=mode, seed=0, batch_size=batch, **settings)
        times = []
        for r in range(repeats):
            with Stopwatch(pipe.device) as watch:
                pipe(**request, mode=mode, seed=r + 1, batch_size=batch, **settings)
            times.append(watch.seconds)
        return float(np.median(times))

    return {
        "images_per_s": TIMING_BATCH / median_seconds(TIMING_BATCH),
        "ms_per_image_b1": 1000 * median_seconds(1),
    }


def _fid_fields(result: dict) -> dict:
    return {"fid": result["fid"], "fid_ci": result["ci"], "fid_n": result["n"], "fid_n_real": result["n_real"]}


@torch.no_grad()
def evaluate_run(run_dir, oracle, num_samples: int = 2000, batch_size: int = 100, bootstrap: int = 200,
                 modes=("tokenizer", "ar", "hybrid", "diffusion"), device="cpu", real_kwargs: dict | None = None,
                 timing: bool = True, pipe=None, inception_weights: str = "", settings: dict | None = None,
                 keep_features: dict | None = None, draw: int = 0, num_real: int = 0,
                 decoded_reference: bool = True) -> dict:
    """Evaluates the run's trained modes (see the module docstring); returns the metrics dict.

    `num_real` (`eval.num_real`): how many real images FID compares against (0 = `num_samples`). The real
    set's own sampling error is about half of an FID interval's variance when both sets are as large; a real
    image costs about a twentieth of a generated one, so a larger real set narrows the interval cheaply.
    `pipe`: an already loaded `HybridPipeline` to judge instead of the run's (benchmarks swap in
    intermediate weights); `run_dir` still receives the PNG grids. `inception_weights`: a local
    InceptionV3 weights file; adds `inception_fid` (against the same real images) to every mode.
    `settings`: generation settings for every generating mode (`GenerationSettings` keys: cfg,
    temperature, top_k, ...); None = each stage's config defaults. `keep_features`: a dict that receives
    the oracle features of each generating mode's class-prompt images ({mode: (N, D)}) and of the real
    images ("real"), for paired comparisons across calls (the same requests and seeds give the same rows).
    `draw` (`eval.draw`): which set of requests and generation seeds (0 = the one every earlier number used;
    another draw checks a setting chosen on draw 0 on requests it was not chosen on). The real images and
    the tokenizer's held-out images are the same in every draw. `decoded_reference`
    (`eval.decoded_reference`): also judge every mode against the real images through the tokenizer (module
    docstring); `keep_features` then also receives them as "real_decoded"."""
    if draw < 0:
        raise ValueError(f"eval.draw must be >= 0, got {draw}")
    num_real = num_real or num_samples
    if num_real < 2:
        raise ValueError(f"eval.num_real must be 0 (as many as eval.num_samples) or at least 2, got {num_real}")
    from hybrid.data.procedural import ProceduralDataset
    from hybrid.eval.adherence import adherence_from_logits, glyph_accuracy_from_predictions
    from hybrid.eval.fid import (
        InceptionJudge,
        RealResamples,
        bootstrap_fid,
        paired_fid_difference,
        real_features,
    )
    from hybrid.pipeline import HybridPipeline

    run_dir = Path(run_dir)
    if pipe is None:
        pipe = HybridPipeline.from_run(run_dir, device=device, need_generator=False)
    counts = pipe.parameter_counts()
    # on the CPU, as before and as for the user's own shards: the same weights give the same numbers
    inception = InceptionJudge(None, inception_weights) if inception_weights else None
    # rendered and judged a chunk at a time: a million real images never sit in memory at once
    decoded_chunks = []  # oracle features of the real images through the tokenizer, chunk by chunk

    def on_real_chunk(images: torch.Tensor) -> None:
        if inception is not None:
            inception.add_real(images)
        if decoded_reference:
            decoded_chunks.append(decoded_features(pipe.tokenizer, oracle, images, pipe.device, batch_size))

    real_feats = real_features(oracle, num_real, on_chunk=on_real_chunk, **(real_kwargs or {}))  # (num_real, D)
    resampled = RealResamples(real_feats)  # every FID below reuses the real set's resampled moments
    decoded_feats = torch.cat(decoded_chunks) if decoded_reference else None  # (num_real, D)
    decoded = RealResamples(decoded_feats) if decoded_reference else None
    # the class requests are drawn as the real images are: another data.glyph_prob gave a set of other
    # shapes than the real one, and FID counted the difference against the model
    requests = make_requests(num_samples, seed=request_seed(draw),
                             glyph_prob=(real_kwargs or {}).get("glyph_prob", DEFAULT_GLYPH_PROB))
    _warn_if_singular(num_samples, num_real, real_feats.shape[1], "the oracle's features")
    if inception is not None:
        _warn_if_singular(num_samples, num_real, INCEPTION_DIMS, "Inception's pool features")
    glyph_requests = make_requests(max(1, num_samples // 4), seed=request_seed(draw) + 1, glyph_prob=1.0)
    metrics: dict[str, dict] = {}

    if "tokenizer" in modes:
        data = ProceduralDataset(image_size=pipe.tokenizer.image_size, size=num_samples, seed=1, split="val",
                                 **(real_kwargs or {}))

        def held_out():
            for start in progress_bar(range(0, num_samples, batch_size), desc="eval tokenizer", leave=False,
                                      unit="batch"):
                yield torch.stack([data[i]["image"] for i in range(start, min(start + batch_size, num_samples))])

        # judged batch by batch, as the generated images are
        cont, disc = ImageTally(oracle, inception, keep=16), ImageTally(oracle, keep=16)
        psnr_c, psnr_d = [], []
        for images, recon_c, recon_d in _reconstructions(pipe, held_out()):
            cont.add(recon_c)
            disc.add(recon_d)
            psnr_c.append(_psnr_per_image(recon_c, images))
            psnr_d.append(_psnr_per_image(recon_d, images))
        first = torch.stack([data[i]["image"] for i in range(min(16, num_samples))])
        _save_tokenizer_grid(first, disc.first(), cont.first(), run_dir)
        fid_c = bootstrap_fid(cont.features(), resampled, bootstrap)
        fid_d = bootstrap_fid(disc.features(), resampled, bootstrap)
        metrics["tokenizer"] = {
            **_fid_fields(fid_c), "fid_discrete": fid_d["fid"], "fid_discrete_ci": fid_d["ci"],
            "psnr_continuous": float(torch.cat(psnr_c).mean()), "psnr_discrete": float(torch.cat(psnr_d).mean()),
            "params": {"tokenizer": counts["tokenizer"]},
        }
        if decoded is not None:
            fid_c, fid_d = (bootstrap_fid(t.features(), decoded, bootstrap) for t in (cont, disc))
            metrics["tokenizer"].update(fid_decoded_ref=fid_c["fid"], fid_decoded_ref_ci=fid_c["ci"],
                                        fid_discrete_decoded_ref=fid_d["fid"], fid_discrete_decoded_ref_ci=fid_d["ci"])
        if inception is not None:
            metrics["tokenizer"]["inception_fid"] = cont.inception_fid()

    generating = _generating_modes(pipe, modes)
    text_modes = [m for m in generating if _condition(pipe, m) == "text"]
    # each set is judged batch by batch as it is generated (`ImageTally`): its images are not kept
    tally = {"class": _tally_modes(pipe, generating, oracle, inception, batch_size, settings, draw=draw,
                                   classes=requests["classes"])}
    # text and glyph prompts are judged for adherence only: no Inception statistics for them
    tally["text"] = _tally_modes(pipe, text_modes, oracle, None, batch_size, settings, " text", draw,
                                 keep_features=False, prompts=requests["captions"])
    tally["glyph"] = _tally_modes(pipe, text_modes, oracle, None, batch_size, settings, " glyphs", draw,
                                  keep_features=False, prompts=glyph_requests["captions"])
    features = {}
    for mode in generating:
        judged = tally["class"][mode]
        features[mode] = judged.features()
        entry = _fid_fields(bootstrap_fid(features[mode], resampled, bootstrap))
        if decoded is not None:
            fid = bootstrap_fid(features[mode], decoded, bootstrap)
            entry.update(fid_decoded_ref=fid["fid"], fid_decoded_ref_ci=fid["ci"])
        if inception is not None:
            entry["inception_fid"] = judged.inception_fid()
        entry["adherence"] = {"class": adherence_from_logits(judged.predictions(),
                                                             class_request_attrs(requests["attrs"]))}
        save_grid(judged.first(), run_dir / "eval" / f"{mode}-class.png")
        if mode in text_modes:
            text, glyphs = tally["text"][mode], tally["glyph"][mode]
            entry["adherence"]["text"] = adherence_from_logits(text.predictions(), requests["attrs"])
            entry["glyph_accuracy"] = glyph_accuracy_from_predictions(glyphs.predictions()["glyph"],
                                                                      glyph_requests["attrs"])
            save_grid(text.first(), run_dir / "eval" / f"{mode}-text.png")
        else:
            entry["adherence"]["text"] = None
            entry["glyph_accuracy"] = None
        if timing:
            entry.update(measure_speed(pipe, mode, requests["classes"], **(settings or {})))
        entry["params"] = _mode_params(mode, counts)
        metrics[mode] = entry
    if "ar" in features and "hybrid" in features:
        # The same class requests, row for row (and, when the refiner reads every scale, the same tokens):
        # whether the refiner changes FID, judged on the difference itself.
        paired = paired_fid_difference(features["hybrid"], features["ar"], resampled, bootstrap)
        metrics["hybrid"]["fid_vs_ar"] = {"difference": paired["difference"], "ci": paired["ci"],
                                          "same_tokens": pipe.hybrid_shares_ar_tokens}
        if decoded is not None:
            paired = paired_fid_difference(features["hybrid"], features["ar"], decoded, bootstrap)
            metrics["hybrid"]["fid_vs_ar_decoded_ref"] = {"difference": paired["difference"], "ci": paired["ci"]}
    if keep_features is not None:
        keep_features.update(features, real=real_feats)
        if decoded_feats is not None:
            keep_features["real_decoded"] = decoded_feats
    return metrics


def _generating_modes(pipe, modes) -> list[str]:
    """The asked-for generating modes (ar, hybrid, diffusion) that the pipeline can run."""
    return [m for m in ("ar", "hybrid", "diffusion") if m in modes and m in pipe.modes]


def _condition(pipe, mode: str) -> str:
    """'class', 'text' or 'none': what the generating model of `mode` is conditioned on."""
    return getattr(pipe.diffusion if mode == "diffusion" else pipe.ar, "condition", "class")


def _mode_params(mode: str, counts: dict[str, int]) -> dict[str, int]:
    used = {"ar": ("tokenizer", "ar"), "hybrid": ("tokenizer", "ar", "refiner"),
            "diffusion": ("tokenizer", "diffusion")}[mode]
    return {k: counts[k] for k in used if k in counts}


def through_tokenizer(tokenizer, images: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """decode(encode(x).z) of a batch (B, 3, S, S) in [-1, 1], computed on `device`, returned on the CPU: what a
    perfect generator of latents would give (the second FID reference)."""
    return tokenizer.decode(tokenizer.encode(images.to(device)).z).clamp(-1, 1).cpu()


@torch.no_grad()
def decoded_features(tokenizer, oracle, images: torch.Tensor, device: torch.device | str = "cpu",
                     batch_size: int = 100) -> torch.Tensor:
    """Oracle features (N, D) of `images` through the tokenizer (`through_tokenizer`), `batch_size` at a time: the
    second FID reference's rows for a chunk of real images."""
    from hybrid.eval.fid import oracle_features

    return torch.cat([oracle_features(through_tokenizer(tokenizer, images[start:start + batch_size], device), oracle)
                      for start in range(0, images.shape[0], batch_size)])


def _reconstructions(pipe, batches) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(images, decode(z), decode(z_q)) on the CPU for each batch of `batches` ((B, 3, S, S) in [-1, 1])."""
    for images in batches:
        enc = pipe.tokenizer.encode(images.to(pipe.device))
        yield images, pipe.tokenizer.decode(enc.z).clamp(-1, 1).cpu(), pipe.tokenizer.decode(enc.z_q).clamp(-1, 1).cpu()


def _save_tokenizer_grid(images: torch.Tensor, recon_d: torch.Tensor, recon_c: torch.Tensor, run_dir: Path) -> None:
    """Rows of 16: the images, decode(z_q), decode(z)."""
    save_grid(torch.cat([images[:16], recon_d[:16], recon_c[:16]]), run_dir / "eval" / "tokenizer.png", nrow=16)


def _reconstruct(pipe, images: torch.Tensor, batch_size: int, run_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """decode(z) and decode(z_q) of `images` (each (N, 3, S, S) in [-1, 1]); saves the comparison grid."""
    batches = (images[start : start + batch_size] for start in progress_bar(
        range(0, images.shape[0], batch_size), desc="eval tokenizer", leave=False, unit="batch"))
    parts = list(_reconstructions(pipe, batches))
    recon_c, recon_d = torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts])
    _save_tokenizer_grid(images, recon_d, recon_c, run_dir)
    return recon_c, recon_d


def read_shard_images(pattern: str, num_samples: int, image_size: int, num_classes: int | None = None) -> dict:
    """The first `num_samples` readable samples of `pattern` (corrupt ones skipped and warned):
    {"images": (N, 3, S, S) in [-1, 1], "classes": (N,) long, "captions": [str]}; N <= num_samples.
    Raises ValueError naming the pattern when it holds no readable image, and naming the shard when a
    class id is outside 0..num_classes-1 (given num_classes)."""
    from hybrid.data.shards import eval_shards

    images, classes, captions = [], [], []
    for sample in eval_shards(pattern, image_size=image_size, num_classes=num_classes):
        images.append(sample["image"])
        classes.append(sample["class_id"])
        captions.append(sample["caption"])
        if len(images) == num_samples:
            break
    if not images:
        raise ValueError(f"evaluation shards '{pattern}' hold no readable image")
    return {"images": torch.stack(images), "classes": torch.tensor(classes, dtype=torch.long), "captions": captions}


@torch.no_grad()
def evaluate_shards_run(run_dir, real: dict, batch_size: int = 100,
                        modes=("tokenizer", "ar", "hybrid", "diffusion"), device="cpu", inception_weights: str = "",
                        timing: bool = True, real_source: str = "", settings: dict | None = None,
                        draw: int = 0) -> dict:
    """Evaluation on the user's own images (data.source=shards), where the oracle cannot judge.

    `real`: `read_shard_images`' output. Generators are asked for the real images' classes (or their
    captions, for text-conditioned models), so the two sets compare like with like. FID is
    Inception FID when `inception_weights` is given, else null (no judge for these images: the
    oracle knows the procedural attributes only); adherence and glyph accuracy are null. The
    tokenizer's PSNR, images/s, ms/image and parameter counts are measured either way. `settings`:
    generation settings for every generating mode (None = each stage's config). `draw`: which generation
    seeds (the requests are the real images' own)."""
    from hybrid.eval.fid import InceptionJudge
    from hybrid.pipeline import HybridPipeline

    run_dir = Path(run_dir)
    pipe = HybridPipeline.from_run(run_dir, device=device, need_generator=False)
    counts = pipe.parameter_counts()
    images, classes = real["images"], real["classes"]
    n = images.shape[0]
    judge = "inception" if inception_weights else None
    inception = InceptionJudge(images, inception_weights) if inception_weights else None

    def fid_fields(fake: torch.Tensor) -> dict:
        return {"fid": inception(fake) if inception else None, "fid_ci": None, "fid_n": n, "fid_judge": judge}

    metrics: dict[str, dict] = {"judge": {
        "source": "shards", "real_images": real_source, "n": n, "fid_features": judge or "none",
        "note": None if judge else "no FID: set eval.inception_weights=PATH (a local InceptionV3 weights file, "
                                   "pip install 'hybrid[fid]'); the oracle judges the procedural data only"}}
    if "tokenizer" in modes:
        recon_c, recon_d = _reconstruct(pipe, images, batch_size, run_dir)
        metrics["tokenizer"] = {**fid_fields(recon_c),
                                "fid_discrete": inception(recon_d) if inception else None,
                                "psnr_continuous": _psnr(recon_c, images), "psnr_discrete": _psnr(recon_d, images),
                                "params": {"tokenizer": counts["tokenizer"]}}
    generating = _generating_modes(pipe, modes)
    requests = {}
    for mode in generating:
        condition = _condition(pipe, mode)
        if condition == "class" and bool((classes < 0).any()):
            raise ValueError(f"evaluation shards '{real_source}' have samples without a class id; a class-conditioned "
                             f"{mode} model needs one per image")
        requests[mode] = {"prompts": real["captions"]} if condition == "text" else {"classes": classes}
    fakes = {}
    for condition in ("text", "class", "none"):  # modes asked for the same request share one call (ar + hybrid)
        same = [m for m in generating if _condition(pipe, m) == condition]
        if same:
            fakes.update(_generate_modes(pipe, same, batch_size, settings, draw=draw, **requests[same[0]]))
    for mode in generating:
        condition = _condition(pipe, mode)
        request = requests[mode]
        fake = fakes.pop(mode)
        entry = {**fid_fields(fake), "adherence": None, "glyph_accuracy": None}
        save_grid(fake[:64], run_dir / "eval" / f"{mode}-{'text' if condition == 'text' else 'class'}.png")
        if timing:
            entry.update(measure_speed(pipe, mode, None, prompts=request["prompts"], **(settings or {}))
                         if condition == "text" else measure_speed(pipe, mode, classes, **(settings or {})))
        entry["params"] = _mode_params(mode, counts)
        metrics[mode] = entry
    return metrics


def _psnr_per_image(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PSNR (dB) of each image in [-1, 1] (a peak-to-peak range of 2): (N,)."""
    mse = (recon.float() - target.float()).pow(2).flatten(1).mean(1).clamp(min=1e-10)
    return 10 * torch.log10(4.0 / mse)


def _psnr(recon: torch.Tensor, target: torch.Tensor) -> float:
    return float(_psnr_per_image(recon, target).mean())


def run_evaluation(cfg) -> dict:
    """`train.py stage=eval`: loads (or trains) the oracle, evaluates the run, writes metrics.json."""
    from hybrid.config import GenerationSettings
    from hybrid.devices import describe_machine
    from hybrid.eval.oracle import ensure_oracle, load_oracle
    from hybrid.models import num_classes
    from hybrid.precision import stage_device

    device = stage_device(cfg)
    modes = judged_modes(cfg)
    settings = GenerationSettings.parse(cfg.eval.settings) or None  # checked when the config loaded
    if settings:
        print(f"[eval] generation settings for every mode (eval.settings): {cfg.eval.settings}")
    if cfg.data.source == "shards":
        if cfg.eval.num_real:
            print(f"[eval] eval.num_real={cfg.eval.num_real} is for the procedural data; with data.source=shards the "
                  "real images are the shards' first eval.num_samples, whose classes or captions are the requests")
        pattern, source = eval_shard_pattern(cfg)
        real = read_shard_images(pattern, cfg.eval.num_samples, cfg.data.image_size,
                                 num_classes(cfg))
        n = len(real["images"])
        print(f"[eval] real images: the first {n} readable samples of {source} '{pattern}'"
              + (f" (all there are; eval.num_samples is {cfg.eval.num_samples})" if n < cfg.eval.num_samples else ""))
        if not cfg.eval.inception_weights:
            print("[eval] no FID for your own images without a judge: set eval.inception_weights=PATH (a local "
                  "InceptionV3 weights file; the oracle judges the procedural data only)")
        metrics = evaluate_shards_run(cfg.run_dir, real, batch_size=cfg.eval.batch_size, modes=modes, device=device,
                                      inception_weights=cfg.eval.inception_weights, real_source=pattern,
                                      settings=settings, draw=cfg.eval.draw)
    else:
        oracle = load_oracle(ensure_oracle(cfg, device=device), device=device).eval()
        real_kwargs = {"two_object_prob": cfg.data.two_object_prob, "glyph_prob": cfg.data.glyph_prob}
        metrics = evaluate_run(cfg.run_dir, oracle, num_samples=cfg.eval.num_samples, batch_size=cfg.eval.batch_size,
                               bootstrap=cfg.eval.bootstrap, modes=modes, device=device, real_kwargs=real_kwargs,
                               inception_weights=cfg.eval.inception_weights, settings=settings, draw=cfg.eval.draw,
                               num_real=cfg.eval.num_real, decoded_reference=cfg.eval.decoded_reference)
    metrics["generation_settings"] = settings or {}  # eval.settings; {} = each stage's own config
    metrics["eval_draw"] = cfg.eval.draw  # which requests and seeds (0: every earlier metrics.json's)
    metrics["machine"] = describe_machine(device)  # where images_per_s and ms_per_image_b1 were timed
    write_json(Path(cfg.run_dir) / "metrics.json", _finite(metrics))
    print(f"[eval] wrote {Path(cfg.run_dir) / 'metrics.json'}")
    return metrics


def judged_modes(cfg) -> tuple[str, ...]:
    """The modes `stage=eval` judges: `eval.modes` that the run has trained, and the diffusion baseline
    whenever it has one. Each asked-for mode the run lacks is said in one line with the command that trains
    what it needs; a run with nothing to judge is an error (its metrics.json is left as it is)."""
    from hybrid.checkpoints import final_path, train_command
    from hybrid.pipeline import MODE_STAGES

    def missing(mode: str) -> list[str]:
        return [s for s in MODE_STAGES[mode] if not final_path(cfg.run_dir, s).is_file()]

    judged = []
    for mode in dict.fromkeys([*cfg.eval.modes, "diffusion"]):
        lacking = missing(mode)
        if not lacking:
            judged.append(mode)
        elif mode in cfg.eval.modes:
            how = " and ".join(train_command(cfg.run_dir, f"stage={s}") for s in lacking)
            print(f"[eval] not judging {mode}: the run has no {' or '.join(lacking)} stage (train it with: {how})")
    if not judged:
        raise ValueError(f"nothing to judge in '{cfg.run_dir}': it has none of the stages eval.modes="
                         f"[{','.join(cfg.eval.modes)}] needs")
    return tuple(judged)


def eval_shard_pattern(cfg) -> tuple[str, str]:
    """(pattern, what it is) of the real images for data.source=shards: data.val_shards, else the
    sibling val-*.tar of the training shards, else the training shards themselves (with a warning:
    FID against training images flatters a model that memorises)."""
    from hybrid.data.module import HybridDataModule

    dm = HybridDataModule.from_config(cfg.data, batch_size=cfg.eval.batch_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # resolve_val_pattern warns about missing validation data; said below
        pattern = dm.resolve_val_pattern()
    if pattern:
        return pattern, "data.val_shards" if cfg.data.val_shards else "the validation shards"
    warnings.warn(f"no validation shards (data.val_shards is empty, no val-*.tar beside '{cfg.data.shards}'): "
                  "evaluating against the training shards", stacklevel=2)
    return cfg.data.shards, "the training shards"


def _finite(value):
    """JSON has no NaN: write null instead."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
