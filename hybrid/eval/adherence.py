"""Instruction following, measured by the oracle: does each image show the attributes it was asked for?

`requested` is a batch of attribute requests in the data's collate format, {attribute: (N,)
long}, where -1 means "not requested" (e.g. a caption that left the attribute out, or shard
data without attributes); those entries are skipped. An attribute that some row requests but the oracle has
no head for is a ValueError naming it (it would drop out of its own score and of "all").
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from hybrid.data.attributes import SHAPES

GLYPH = SHAPES.index("glyph")


@torch.no_grad()
def oracle_logits(images: torch.Tensor, oracle: nn.Module, batch_size: int = 250) -> dict[str, torch.Tensor]:
    """images (N, 3, S, S) in [-1, 1] -> {attribute: logits (N, K)} on the CPU, in batches."""
    device = next(oracle.parameters()).device
    chunks: dict[str, list[torch.Tensor]] = {}
    for start in range(0, images.shape[0], batch_size):
        out = oracle(images[start:start + batch_size].to(device).float())
        for name, logits in out.items():
            chunks.setdefault(name, []).append(logits.cpu())
    return {name: torch.cat(parts) for name, parts in chunks.items()}


def _check_heads(requested: dict[str, torch.Tensor], logits: dict[str, torch.Tensor]) -> None:
    """Refuse a request the oracle cannot judge: an attribute requested by some row but with no oracle head would
    otherwise drop out of its own score and of "all" without a word."""
    missing = [name for name, req in requested.items()
               if name not in logits and bool((torch.as_tensor(req) >= 0).any())]
    if missing:
        raise ValueError(f"the oracle has no head for requested attribute(s) {missing} (its heads: "
                         f"{sorted(logits)}); train an oracle with these attributes (python -m hybrid.eval.oracle "
                         f"train) or leave them unrequested (-1)")


def adherence_from_logits(logits: dict[str, torch.Tensor], requested: dict[str, torch.Tensor]) -> dict[str, float]:
    """Accuracy per requested attribute from oracle logits {attr: (N, K)} (or predictions {attr: (N,)}).

    Returns {attribute: fraction of images, among those that requested it, whose prediction
    equals the request} for every attribute requested at least once, plus "all": the fraction
    of images (with at least one request) whose every requested attribute is right.
    """
    result: dict[str, float] = {}
    all_ok = any_req = None
    _check_heads(requested, logits)
    for name, req in requested.items():
        if name not in logits:
            continue  # never requested (checked above)
        req = torch.as_tensor(req).long().cpu()  # (N,)
        pred = logits[name].cpu()
        pred = pred.argmax(-1) if pred.ndim == 2 else pred.long()  # (N,)
        if pred.shape[0] != req.shape[0]:
            raise ValueError(f"attribute '{name}': {pred.shape[0]} predictions for {req.shape[0]} requests")
        mask = req >= 0
        if all_ok is None:
            all_ok = torch.ones_like(mask)
            any_req = torch.zeros_like(mask)
        if not mask.any():
            continue
        hit = (pred == req) | ~mask  # unrequested counts as satisfied
        result[name] = hit[mask].double().mean().item()  # double: exact fractions, as the paired difference
        all_ok &= hit
        any_req |= mask
    if any_req is not None and any_req.any():
        result["all"] = all_ok[any_req].double().mean().item()
    return result


def paired_adherence_difference(logits_a: dict[str, torch.Tensor], logits_b: dict[str, torch.Tensor],
                                requested: dict[str, torch.Tensor], bootstrap: int = 1000, seed: int = 0,
                                level: float = 0.95) -> dict[str, dict]:
    """Adherence(a) - adherence(b) per requested attribute, for two sets of oracle logits whose row i
    answers the same request (e.g. refined images and the z_q they were refined from), with a paired
    bootstrap interval: each resample draws one set of rows for both, so only their disagreements count.

    Returns {attribute: {"difference", "ci": [lo, hi], "n", "worse", "better", "p_lower"}} for every attribute
    requested at least once (n = rows that requested it; worse / better = rows where a alone is wrong / right;
    p_lower = `sign_test_p(worse, worse + better)`, the exact one-sided test that a follows it less often). An
    interval below 0 says a follows that attribute less often than b; one that holds 0 says the two sets cannot be
    told apart on it with these rows.
    """
    out: dict[str, dict] = {}
    gen = torch.Generator().manual_seed(seed)
    alpha = (1.0 - level) / 2.0
    _check_heads(requested, logits_a)
    _check_heads(requested, logits_b)
    for name, req in requested.items():
        if name not in logits_a or name not in logits_b:
            continue  # never requested (checked above)
        req = torch.as_tensor(req).long().cpu()  # (N,)
        preds = []
        for logits in (logits_a, logits_b):
            pred = logits[name].cpu()
            preds.append(pred.argmax(-1) if pred.ndim == 2 else pred.long())  # (N,)
        if not preds[0].shape == preds[1].shape == req.shape:
            raise ValueError(f"attribute '{name}': paired adherence needs as many rows in both sets as requests, "
                             f"got {preds[0].shape[0]}, {preds[1].shape[0]} and {req.shape[0]}")
        mask = req >= 0
        n = int(mask.sum())
        if n == 0:
            continue
        d = ((preds[0] == req).double() - (preds[1] == req).double())[mask]  # (n,) in {-1, 0, 1}
        diff = d.mean().item()
        ci = [diff, diff]
        if bootstrap >= 2:
            stats = d[torch.randint(n, (bootstrap, n), generator=gen)].mean(1)  # (bootstrap,)
            ci = torch.quantile(stats, torch.tensor([alpha, 1.0 - alpha], dtype=stats.dtype)).tolist()
        worse, better = int((d < 0).sum()), int((d > 0).sum())  # the discordant rows: a wrong where b is right, ...
        out[name] = {"difference": diff, "ci": ci, "n": n, "worse": worse, "better": better,
                     "p_lower": sign_test_p(worse, worse + better)}
    return out


def sign_test_p(k: int, n: int) -> float:
    """One-sided exact sign test (McNemar's, exact): P(X >= k) for X ~ Binomial(n, 1/2), the chance of at least k
    of n discordant rows going one way when neither set is better. 1.0 with no discordant rows."""
    if not 0 <= k <= n:
        raise ValueError(f"a sign test needs 0 <= k <= n, got k={k}, n={n}")
    if k == 0:
        return 1.0
    # log-space terms (exact big-integer sums took seconds at 10,000 discordant rows)
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2) for i in range(k, n + 1)]
    top = max(logs)
    return min(1.0, math.exp(top) * sum(math.exp(v - top) for v in logs))


def holm_rejected(p_values: dict[str, float], alpha: float = 0.025) -> list[str]:
    """The hypotheses Holm's step-down procedure rejects at family-wise error `alpha` (default 2.5%, the one side
    of a 95% interval that a "lower" verdict reads): sorted by p, the i-th smallest (from 0) is rejected while
    p <= alpha / (m - i). With one 95% interval per attribute instead, seven attributes that do not differ show
    "some attribute lower" in about one run of five."""
    rejected = []
    for i, (name, p) in enumerate(sorted(p_values.items(), key=lambda item: item[1])):
        if p > alpha / (len(p_values) - i):
            break
        rejected.append(name)
    return rejected


def adherence(images: torch.Tensor, requested_attrs: dict[str, torch.Tensor], oracle: nn.Module,
              batch_size: int = 250) -> dict[str, float]:
    """Per-attribute adherence of generated images (N, 3, S, S) in [-1, 1] to their requests.

    requested_attrs: {attribute: (N,) long}, -1 = not requested (skipped). Returns
    {attribute: accuracy} (requested attributes only) and "all" (every request met at once).
    """
    return adherence_from_logits(oracle_logits(images, oracle, batch_size), requested_attrs)


def proportion_interval(fraction: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval (95% for z=1.96) of an accuracy `fraction` measured on `n` independent images:
    what an adherence number can be told apart from (about +-2 points at n=1000 near 85%)."""
    if n <= 0:
        raise ValueError(f"an interval needs n >= 1 images, got {n}")
    centre = (fraction + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(fraction * (1 - fraction) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def glyph_accuracy_from_predictions(predicted_glyph: torch.Tensor, requested_attrs: dict[str, torch.Tensor]) -> float:
    """Text rendering from the oracle's glyph predictions (N,) (or logits (N, K)): accuracy among the rows whose
    requested shape is a glyph. NaN when no row requested a glyph."""
    shape = torch.as_tensor(requested_attrs["shape"]).long().cpu()
    glyph = torch.as_tensor(requested_attrs["glyph"]).long().cpu()
    pred = predicted_glyph.cpu()
    pred = pred.argmax(-1) if pred.ndim == 2 else pred.long()  # (N,)
    if pred.shape[0] != glyph.shape[0]:
        raise ValueError(f"glyph accuracy: {pred.shape[0]} predictions for {glyph.shape[0]} requests")
    mask = (shape == GLYPH) & (glyph > 0)  # (N,)
    if not mask.any():
        return math.nan
    return (pred[mask] == glyph[mask]).float().mean().item()


def glyph_accuracy(images: torch.Tensor, requested_attrs: dict[str, torch.Tensor], oracle: nn.Module,
                   batch_size: int = 250) -> float:
    """Text rendering: oracle accuracy on the glyph attribute for images whose requested shape is a glyph.

    NaN when no image requested a glyph.
    """
    shape = torch.as_tensor(requested_attrs["shape"]).long().cpu()
    glyph = torch.as_tensor(requested_attrs["glyph"]).long().cpu()
    mask = (shape == GLYPH) & (glyph > 0)  # (N,)
    if not mask.any():
        return math.nan
    logits = oracle_logits(images[mask.to(images.device)], oracle, batch_size)
    return glyph_accuracy_from_predictions(logits["glyph"], {"shape": shape[mask], "glyph": glyph[mask]})
