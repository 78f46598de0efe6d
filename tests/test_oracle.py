"""The oracle (attribute classifier), FID in its features (+ bootstrap), adherence, Inception FID."""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torchmetrics.image.fid import FrechetInceptionDistance

from hybrid.config import ConfigError, load_config
from hybrid.data.attributes import ATTRIBUTES, SHAPES
from hybrid.data.procedural import DATA_VERSION
from hybrid.eval.adherence import (
    adherence,
    adherence_from_logits,
    glyph_accuracy,
    glyph_accuracy_from_predictions,
    paired_adherence_difference,
    proportion_interval,
)
from hybrid.eval.fid import (
    InceptionJudge,
    OracleFeatures,
    RealResamples,
    bootstrap_fid,
    compute_fid,
    frechet_distance,
    inception_fid,
    oracle_features,
    oracle_fid_metric,
    paired_fid_difference,
    real_features,
    real_images,
)
from hybrid.eval.oracle import FORMAT, Oracle, ensure_oracle, load_oracle, main, oracle_path, save_oracle, sidecar_path

TINY = {"channels": [8, 16, 16, 16], "layers": [1, 1, 1, 1]}  # a toy timm ResNet


def tiny_oracle(feature_dim: int = 16, image_size: int = 16) -> Oracle:
    torch.manual_seed(0)
    return Oracle("resnet18", feature_dim=feature_dim, image_size=image_size, stem_stride=2, backbone_kwargs=TINY)


def images(n: int = 8, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1  # (N, 3, S, S) in [-1, 1]


def test_forward_shapes_and_feature_dim():
    oracle = tiny_oracle()
    logits, feats = oracle.forward_with_features(images(2))
    assert feats.shape == (2, 16)
    assert {k: v.shape for k, v in logits.items()} == {k: (2, len(v)) for k, v in ATTRIBUTES.items()}
    assert oracle.predict(images(2))["glyph"].dtype == torch.long
    with pytest.raises(ValueError, match="16, 16"):
        oracle(images(2, size=32))
    default = load_config()  # the default config's oracle keeps the FID space small
    assert default.oracle.feature_dim <= 128
    # the deep-stem ResNet of the toy config adapts too
    small = Oracle("resnet10t", feature_dim=8, image_size=16, stem_stride=2)
    assert small.features(images(2)).shape == (2, 8)


def test_save_load_round_trip_identical(tmp_path):
    oracle = tiny_oracle()
    oracle.train()
    oracle(images(8))  # move the BatchNorm running statistics away from their init
    oracle.eval()
    path = save_oracle(oracle, tmp_path / "oracle-16.safetensors", {"accuracy": {"fresh": {"shape": 1.0}}})
    assert sidecar_path(path).is_file()
    loaded = load_oracle(path)
    x = images(4, seed=1)
    with torch.no_grad():
        ref, out = oracle(x), loaded(x)
    for name in ref:
        assert torch.equal(ref[name], out[name]), name
    assert torch.equal(oracle.features(x), loaded.features(x))
    assert loaded.meta["accuracy"]["fresh"]["shape"] == 1.0
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())


def test_load_refuses_a_pickle(tmp_path):
    path = save_oracle(tiny_oracle(), tmp_path / "o.safetensors")
    torch.save({"x": torch.zeros(1)}, path)  # a pickle where safetensors should be
    with pytest.raises(ValueError, match="o.safetensors' could not be read as safetensors"):
        load_oracle(path)


@pytest.mark.parametrize("sidecar", ["[1, 2]", '{"format": "%s", "model": [1]}', "\udcff", "data_version",
                                     "attributes", "feature_dim"])
def test_a_damaged_sidecar_is_a_value_error_naming_it(tmp_path, sidecar):
    path = save_oracle(tiny_oracle(), tmp_path / "o.safetensors")
    side = sidecar_path(path)
    if sidecar == "data_version":  # a valid sidecar but for this one field
        meta = json.loads(side.read_text())
        side.write_text(json.dumps({**meta, "data_version": "two"}))
    elif sidecar in ("attributes", "feature_dim"):  # a hand-edited model argument
        meta = json.loads(side.read_text())
        meta["model"][sidecar] = [1, 2] if sidecar == "attributes" else "abc"
        side.write_text(json.dumps(meta))
    elif sidecar == "\udcff":
        side.write_bytes(b"\xff\xfe not utf-8")
    else:
        side.write_text(sidecar.replace("%s", FORMAT))
    with pytest.raises(ValueError, match=r"o\.json"):  # was AttributeError / UnicodeDecodeError
        load_oracle(path)


def test_weights_of_another_model_than_the_sidecar_s_are_named_with_the_keys_that_differ(tmp_path):
    """The message stopped at torch's heading, "Error(s) in loading state_dict for Oracle:", with no detail."""
    path = save_oracle(tiny_oracle(feature_dim=16), tmp_path / "o.safetensors")
    side = sidecar_path(path)
    meta = json.loads(side.read_text())
    meta["model"]["feature_dim"] = 24  # the sidecar of another oracle
    side.write_text(json.dumps(meta))
    with pytest.raises(ValueError) as err:
        load_oracle(path)
    message = str(err.value)
    assert message.startswith(f"oracle weights '{path}' do not match the model in '{side}' (size mismatch for ")
    assert "torch.Size([16" in message and "torch.Size([24" in message and "retrain the oracle" in message, message


def test_missing_oracle_names_file_and_command(tmp_path):
    missing = tmp_path / "cache" / "oracle-32.safetensors"
    with pytest.raises(FileNotFoundError) as err:
        load_oracle(missing)
    assert str(missing) in str(err.value)
    assert "python -m hybrid.eval.oracle train" in str(err.value)
    cfg = load_config(None, [f"cache_dir={tmp_path}/c"])
    with pytest.raises(FileNotFoundError, match=f"oracle-32-data{DATA_VERSION}.safetensors"):
        load_oracle(cfg=cfg)


def test_fid_self_zero_shift_positive():
    oracle = tiny_oracle().eval()
    x = images(64)
    same = compute_fid(x, x, oracle, bootstrap=0)
    assert abs(same["fid"]) < 1e-6 and same["n"] == 64
    shifted = compute_fid((x * 0.3 + 0.6).clamp(-1, 1), x, oracle, bootstrap=0)
    assert shifted["fid"] > 0.1


def test_bootstrap_ci_contains_point_estimate():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 8, generator=g)
    b = torch.randn(300, 8, generator=g) * 1.2 + 0.3
    out = bootstrap_fid(a, b, bootstrap=50, seed=0)
    lo, hi = out["ci"]
    assert lo <= out["fid"] <= hi and lo < hi
    assert out["fid"] == pytest.approx(frechet_distance(a, b))
    assert bootstrap_fid(a, b, bootstrap=50, seed=0)["ci"] == out["ci"]  # seeded
    self_out = bootstrap_fid(a, a, bootstrap=20)
    assert self_out["ci"][0] <= self_out["fid"] <= self_out["ci"][1]


def test_real_resamples_shared_between_fids_give_each_its_own_bootstrap():
    """The evaluation resamples its (up to a million) real rows once and reuses them for every mode's FID and the
    paired difference: each interval must be the one a call of its own gives."""
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(120, 6, generator=g), torch.randn(120, 6, generator=g) + 0.2
    real = torch.randn(300, 6, generator=g)
    shared = RealResamples(real)
    paired = paired_fid_difference(a, b, shared, bootstrap=30)  # the first caller draws the resamples
    assert bootstrap_fid(a, shared, bootstrap=30) == bootstrap_fid(a, real, bootstrap=30)
    assert bootstrap_fid(b, shared, bootstrap=30) == bootstrap_fid(b, real, bootstrap=30)
    assert paired == paired_fid_difference(a, b, real, bootstrap=30)
    assert bootstrap_fid(a, shared, bootstrap=30)["n_real"] == 300
    assert len(shared._resampled) == 30  # computed once, not per call


def test_paired_fid_difference_sees_a_shift_the_marginal_intervals_cannot():
    """A small shift applied to every row of a set: the two sets' own FID intervals overlap, the paired
    interval of their difference excludes 0, and identical sets differ by exactly 0."""
    g = torch.Generator().manual_seed(0)
    real = torch.randn(400, 8, generator=g)
    a = torch.randn(400, 8, generator=g)
    b = a.clone()
    b[:, 0] += 0.3  # b is a, slightly worse, row for row
    fa, fb = bootstrap_fid(a, real, bootstrap=100), bootstrap_fid(b, real, bootstrap=100)
    assert fb["ci"][0] < fa["ci"][1]  # the marginal intervals overlap
    out = paired_fid_difference(b, a, real, bootstrap=100)
    assert out["difference"] == pytest.approx(fb["fid"] - fa["fid"]) and out["difference"] > 0
    assert 0 < out["ci"][0] <= out["difference"] <= out["ci"][1]
    assert out["fid_a"] == pytest.approx(fb["fid"]) and out["n"] == 400
    same = paired_fid_difference(a, a, real, bootstrap=20)
    assert same["difference"] == 0 and same["ci"] == [0.0, 0.0]
    # two independent draws of one distribution: the interval holds 0
    other = paired_fid_difference(torch.randn(400, 8, generator=g), a, real, bootstrap=100)
    assert other["ci"][0] < 0 < other["ci"][1]
    with pytest.raises(ValueError, match="same shape"):
        paired_fid_difference(a[:300], a, real)


class _Identity(nn.Module):
    """A torchmetrics feature 'extractor' that is handed features already."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = dim

    def forward(self, x):
        return x


def test_fid_matches_torchmetrics():
    g = torch.Generator().manual_seed(1)
    real = torch.randn(200, 8, generator=g)
    fake = torch.randn(150, 8, generator=g) @ torch.randn(8, 8, generator=g) * 0.5 + 0.2
    metric = FrechetInceptionDistance(feature=_Identity(8))
    metric.update(real, real=True)
    metric.update(fake, real=False)
    assert frechet_distance(fake, real) == pytest.approx(float(metric.compute()), rel=1e-5, abs=1e-8)
    # the torchmetrics wrapper around the oracle takes [0, 1] images and agrees with compute_fid on [-1, 1] ones
    oracle = tiny_oracle().eval()
    x_real, x_fake = images(40, seed=2), (images(40, seed=3) * 0.5).clamp(-1, 1)
    metric = oracle_fid_metric(oracle)
    assert isinstance(metric.inception, OracleFeatures)
    metric.update((x_real + 1) / 2, real=True)
    metric.update((x_fake + 1) / 2, real=False)
    ours = compute_fid(x_fake, x_real, oracle, bootstrap=0)["fid"]
    assert ours == pytest.approx(float(metric.compute()), rel=1e-4)


def _one_hot_logits(targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, values in ATTRIBUTES.items():
        t = targets[name].clamp(min=0)
        out[name] = torch.nn.functional.one_hot(t, len(values)).float() * 5.0
    return out


def _requests(n: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    req = {name: torch.randint(len(values), (n,), generator=g) for name, values in ATTRIBUTES.items()}
    req["fill"][:2] = -1  # not requested
    req["background"][:] = -1  # never requested: absent from the result
    req["shape"][:3] = SHAPES.index("glyph")
    req["glyph"][:3] = torch.tensor([1, 5, 9])
    return req


def test_adherence_on_matching_logits_is_one():
    req = _requests()
    result = adherence_from_logits(_one_hot_logits(req), req)
    assert "background" not in result
    assert all(v == 1.0 for v in result.values()) and result["all"] == 1.0
    wrong = _one_hot_logits(req)
    wrong["color"] = wrong["color"].roll(1, dims=1)  # every color wrong
    result = adherence_from_logits(wrong, req)
    assert result["color"] == 0.0 and result["shape"] == 1.0 and result["all"] == 0.0


def test_a_requested_attribute_the_oracle_has_no_head_for_is_refused_not_dropped():
    req = _requests()
    logits = _one_hot_logits(req)
    del logits["glyph"]  # e.g. an oracle trained without the glyph head
    with pytest.raises(ValueError, match=r"no head for requested attribute\(s\) \['glyph'\]"):
        adherence_from_logits(logits, req)
    with pytest.raises(ValueError, match=r"\['glyph'\]"):
        paired_adherence_difference(logits, _one_hot_logits(req), req, bootstrap=0)
    with pytest.raises(ValueError, match=r"\['glyph'\]"):
        paired_adherence_difference(_one_hot_logits(req), logits, req, bootstrap=0)
    req["glyph"][:] = -1  # never requested: no head needed, in either set
    assert "glyph" not in adherence_from_logits(logits, req)
    assert "glyph" not in paired_adherence_difference(logits, _one_hot_logits(req), req, bootstrap=0)
    assert "glyph" not in paired_adherence_difference(_one_hot_logits(req), logits, req, bootstrap=0)


def test_paired_adherence_difference_counts_only_the_rows_where_the_two_sets_disagree():
    n = 400
    g = torch.Generator().manual_seed(1)
    req = {"shape": torch.randint(4, (n,), generator=g), "color": torch.randint(3, (n,), generator=g),
           "fill": torch.full((n,), -1)}  # fill never requested: absent
    req["color"][:100] = -1  # not requested on the first 100 rows
    a = {k: torch.nn.functional.one_hot(req[k].clamp(min=0), k_).float() for k, k_ in (("shape", 4), ("color", 3))}
    b = {k: v.clone() for k, v in a.items()}
    b["shape"][:40] = b["shape"][:40].roll(1, dims=1)  # b misreads 40 shapes a gets right
    a["shape"][40:50] = a["shape"][40:50].roll(1, dims=1)  # a misreads 10 others
    out = paired_adherence_difference(a, b, req, bootstrap=500)
    assert set(out) == {"shape", "color"}
    assert out["shape"]["difference"] == pytest.approx(30 / n) and out["shape"]["n"] == n
    assert out["shape"]["difference"] == pytest.approx(
        adherence_from_logits(a, req)["shape"] - adherence_from_logits(b, req)["shape"])
    lo, hi = out["shape"]["ci"]
    assert 0 < lo < 30 / n < hi < 2 * 30 / n  # 50 disagreeing rows of 400: clearly above 0, not exact
    # identical: no spread at all, no discordant row
    assert out["color"] == {"difference": 0.0, "ci": [0.0, 0.0], "n": n - 100, "worse": 0, "better": 0,
                            "p_lower": 1.0}
    assert (out["shape"]["worse"], out["shape"]["better"]) == (10, 40)
    swapped = paired_adherence_difference(b, a, req, bootstrap=500)
    assert swapped["shape"]["difference"] == pytest.approx(-30 / n) and swapped["shape"]["ci"][1] < 0
    assert (swapped["shape"]["worse"], swapped["shape"]["better"]) == (40, 10)
    assert swapped["shape"]["p_lower"] == pytest.approx(sum(math.comb(50, i) for i in range(40, 51)) / 2 ** 50)
    assert out["shape"]["p_lower"] > 0.99  # a is better: no evidence that it is lower
    with pytest.raises(ValueError, match="shape"):
        paired_adherence_difference({"shape": a["shape"][:10]}, b, req)


def test_the_sign_test_and_holm_s_procedure():
    """The refiner benchmark's family-wise check that no attribute of the refined images is lower than z_q's."""
    from hybrid.eval.adherence import holm_rejected, sign_test_p

    assert sign_test_p(4, 4) == pytest.approx(1 / 16)  # 4 of 4 discordant rows one way: not enough at 5%
    assert sign_test_p(0, 0) == 1.0 and sign_test_p(0, 10) == 1.0
    assert sign_test_p(5, 10) == pytest.approx(638 / 1024)
    with pytest.raises(ValueError, match="k=11, n=10"):
        sign_test_p(11, 10)
    assert sign_test_p(10000, 20000) == pytest.approx(0.5 + math.comb(20000, 10000) / 2 ** 20001)  # and fast
    assert sign_test_p(60, 100) == pytest.approx(sum(math.comb(100, i) for i in range(60, 101)) / 2 ** 100)
    # Holm at 5%: 0.01 <= 0.05 / 3 and 0.02 <= 0.05 / 2 are rejected, then 0.2 > 0.05 stops
    assert holm_rejected({"a": 0.2, "b": 0.01, "c": 0.02}, alpha=0.05) == ["b", "c"]
    assert holm_rejected({"a": 0.02, "b": 0.03, "c": 0.9}, alpha=0.05) == []  # 0.02 > 0.05 / 3, though < 0.05
    assert holm_rejected({"a": 0.04}, alpha=0.05) == ["a"] and holm_rejected({}) == []
    # the default, 2.5%: the lower side of a 95% interval
    assert holm_rejected({"a": 0.2, "b": 0.008, "c": 0.02}) == ["b"] and holm_rejected({"a": 0.03}) == []
    # with no real difference, "some attribute lower" stays near 2.5% over seven attributes, where seven separate
    # 95% intervals say it far more often
    g = torch.Generator().manual_seed(0)
    runs, holm_says, interval_says = 200, 0, 0
    for _ in range(runs):
        req = {f"x{j}": torch.zeros(400, dtype=torch.long) for j in range(7)}
        a = {k: (torch.rand(400, generator=g) < 0.1).long() for k in req}  # each wrong on 10% of rows at random
        b = {k: (torch.rand(400, generator=g) < 0.1).long() for k in req}
        out = paired_adherence_difference(a, b, req, bootstrap=200, seed=int(torch.randint(10**6, (1,), generator=g)))
        holm_says += bool(holm_rejected({k: v["p_lower"] for k, v in out.items()}))
        interval_says += any(v["ci"][1] < 0 for v in out.values())
    # measured: 7 of 200 (Holm at 2.5%) against 43 of 200 (any 95% interval below 0)
    assert holm_says / runs <= 0.025 + 0.02 and interval_says > 3 * holm_says, (holm_says, interval_says)


def test_adherence_is_an_exact_fraction_like_the_paired_difference():
    """Adherence in float32 (31/48 - 32/48 = -0.0208333731) disagreed with the paired difference (-1/48) by more
    than 1e-6 relative: the refiner benchmark's own consistency check failed on some toy runs."""
    req = {"shape": torch.zeros(48, dtype=torch.long)}
    hits = torch.zeros(48, dtype=torch.long)
    a, b = {"shape": hits.clone()}, {"shape": hits.clone()}
    a["shape"][31:] = 1  # right on 31 rows
    b["shape"][32:] = 1  # right on 32 rows
    assert adherence_from_logits(a, req)["shape"] == 31 / 48
    paired = paired_adherence_difference(a, b, req, bootstrap=0)["shape"]["difference"]
    assert adherence_from_logits(a, req)["shape"] - adherence_from_logits(b, req)["shape"] == pytest.approx(
        paired, rel=1e-12, abs=0)


def test_proportion_interval_is_the_wilson_score_interval():
    lo, hi = proportion_interval(0.5, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    # near the shape target: 89.3% of 1,000 prompts cannot be told from 90%; of 10,000 it can
    lo, hi = proportion_interval(0.893, 1000)
    assert lo < 0.893 < hi and hi > 0.90 and hi - lo == pytest.approx(0.038, abs=0.002)
    assert proportion_interval(0.893, 10_000)[1] < 0.90
    lo, hi = proportion_interval(0.0, 50)  # all wrong: the interval still has width, inside [0, 1]
    assert lo == 0.0 and 0.0 < hi < 0.1
    assert proportion_interval(1.0, 50)[1] == 1.0
    with pytest.raises(ValueError, match="n >= 1"):
        proportion_interval(0.5, 0)


def test_request_draws_are_new_requests_and_seeds_and_draw_0_is_the_old_set():
    from hybrid.eval.evaluate import EVAL_REQUEST_SEED, generation_seed, make_requests, request_seed

    assert request_seed(0) == EVAL_REQUEST_SEED  # every number judged before draws existed
    assert [generation_seed(0, s) for s in (0, 100, 200)] == [0, 100, 200]
    first, again, other = make_requests(300), make_requests(300, seed=request_seed(0)), make_requests(
        300, seed=request_seed(1))
    assert torch.equal(first["classes"], again["classes"])
    assert not torch.equal(first["classes"], other["classes"])
    seeds = {generation_seed(d, s) for d in range(3) for s in range(0, 10_000, 100)}
    assert len(seeds) == 300  # no batch of one draw shares its seed with a batch of another


class _LookupOracle(nn.Module):
    """Returns stored logits for the images' index (written into pixel [0, 0, 0])."""

    def __init__(self, logits: dict[str, torch.Tensor]):
        super().__init__()
        self.logits = logits
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        idx = x[:, 0, 0, 0].round().long()
        return {k: v[idx] for k, v in self.logits.items()}


def test_adherence_and_glyph_accuracy_through_an_oracle():
    req = _requests()
    logits = _one_hot_logits(req)
    logits["glyph"][1] = logits["glyph"][1].roll(1)  # one of the three glyph images is misread
    x = torch.zeros(6, 3, 4, 4)
    x[:, 0, 0, 0] = torch.arange(6).float()
    fake = _LookupOracle(logits)
    result = adherence(x, req, fake, batch_size=4)
    assert result["shape"] == 1.0 and result["glyph"] == pytest.approx(5 / 6)
    assert glyph_accuracy(x, req, fake) == pytest.approx(2 / 3)
    no_glyphs = {k: v.clone() for k, v in req.items()}
    no_glyphs["shape"][:] = 0
    assert math.isnan(glyph_accuracy(x, no_glyphs, fake))
    # the streamed evaluation's path: the same accuracy from predictions of every row
    predicted = fake(x)["glyph"].argmax(-1)
    assert glyph_accuracy_from_predictions(predicted, req) == pytest.approx(2 / 3)
    assert math.isnan(glyph_accuracy_from_predictions(predicted, no_glyphs))
    with pytest.raises(ValueError, match="5 predictions for 6 requests"):
        glyph_accuracy_from_predictions(predicted[:5], req)


def test_real_features_in_chunks_are_the_rows_of_all_real_images_at_once():
    """The evaluation renders a million real images a chunk at a time; the rows must be those of one batch, and
    the first rows of a larger set those of a smaller one (image i depends on the seed and i only)."""
    oracle = tiny_oracle().eval()
    whole = oracle_features(real_images(oracle, 23, two_object_prob=0.3), oracle)
    seen = []
    chunked = real_features(oracle, 23, chunk=10, on_chunk=seen.append, two_object_prob=0.3)
    assert [s.shape[0] for s in seen] == [10, 10, 3]
    # the same images, bit for bit; their features to float32 rounding, since the CPU's convolution kernels may
    # sum in another order at another batch size (an AMD EPYC differed by 3.6e-7 where a Xeon gave equal rows)
    torch.testing.assert_close(torch.cat([real_images(oracle, 10, two_object_prob=0.3)[:3],
                                          real_images(oracle, 23, two_object_prob=0.3)[3:]]),
                               real_images(oracle, 23, two_object_prob=0.3), rtol=0, atol=0)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(real_features(oracle, 7, chunk=4, two_object_prob=0.3), whole[:7], rtol=1e-5, atol=1e-5)


def test_cli_config_error_and_missing_oracle(tmp_path, capsys):
    assert main(["train", "oracle.nope=1"]) == 2
    assert "oracle.nope" in capsys.readouterr().err
    assert main(["eval", f"oracle.path={tmp_path}/none.safetensors"]) == 1
    err = capsys.readouterr().err
    assert "none.safetensors" in err and "python -m hybrid.eval.oracle train" in err
    # overrides after --options (the documented usage: train [--config FILE] [key=value ...])
    toy = str(Path(__file__).parents[1] / "configs" / "toy.yaml")
    assert main(["eval", "--config", toy, f"oracle.path={tmp_path}/none.safetensors"]) == 1
    assert "none.safetensors" in capsys.readouterr().err


def test_ensure_oracle_trains_once_and_caches(tmp_path, capsys):
    cfg = load_config(None, [
        f"cache_dir={tmp_path}", "data.image_size=16", "trainer.progress_bar=false", "tokenizer.scales=[1, 2, 4]",
        "oracle.backbone=resnet18",
        "oracle.backbone_kwargs={channels: [8, 16, 16, 16], layers: [1, 1, 1, 1]}", "oracle.feature_dim=16",
        "oracle.train.max_steps=3", "oracle.train.batch_size=8", "oracle.train.warmup_steps=1",
        "oracle.num_workers=0", "oracle.eval_samples=16", "oracle.holdout_samples=8"])
    path = ensure_oracle(cfg, device="cpu")
    assert path == tmp_path / f"oracle-16-data{DATA_VERSION}.safetensors" and path.is_file()
    assert "it/s" not in capsys.readouterr().out  # trainer.progress_bar=false hides the oracle's bar too
    oracle = load_oracle(cfg=cfg)
    assert oracle.meta["data_version"] == DATA_VERSION
    acc = oracle.meta["accuracy"]
    assert set(ATTRIBUTES) <= set(acc["fresh"]) and acc["fresh"]["n"] == 16 and acc["holdout"]["n"] == 8
    assert oracle.meta["steps"] == 3 and oracle.meta["config"]["oracle"]["feature_dim"] == 16
    mtime = path.stat().st_mtime
    capsys.readouterr()
    assert ensure_oracle(cfg, device="cpu") == path and path.stat().st_mtime == mtime  # cached
    assert capsys.readouterr().out.strip() == f"using the cached oracle {path}"
    # a changed training recipe keeps the cache (the file name names only size and data version), but says so
    other = cfg.copy()
    other.oracle.train.batch_size = 4
    assert ensure_oracle(other, device="cpu") == path and path.stat().st_mtime == mtime
    assert "trained with different oracle.train.batch_size (8 there, 4 here)" in capsys.readouterr().out
    # a mistyped oracle.path is an error, not a new judge trained there; stage=oracle trains one there
    typo = cfg.copy()
    typo.oracle.path = str(tmp_path / "orcale.safetensors")
    with pytest.raises(FileNotFoundError, match="oracle.path .*orcale.safetensors' does not exist"):
        ensure_oracle(typo, device="cpu")
    assert not (tmp_path / "orcale.safetensors").exists()
    # a path that cannot hold the weights and their sidecar is refused before training, not at the save after it
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_folder").mkdir()
    for bad, needle in (("a_folder", "is the folder"), ("o.json", "ends in .json"),
                        ("a_file/o.safetensors", "is a file, not a folder")):
        wrong = cfg.copy()
        wrong.stage, wrong.oracle.path = "oracle", str(tmp_path / bad)
        with pytest.raises(ConfigError, match=f"config key 'oracle.path' .*{needle}"):
            ensure_oracle(wrong, retrain=True, device="cpu")  # as `python -m hybrid.eval.oracle train` calls it
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("a_", "o."))) == ["a_file", "a_folder"]
    assert list((tmp_path / "a_folder").iterdir()) == []
    with pytest.raises(FileNotFoundError, match="a_folder' is a folder, not a file"):  # was "does not exist"
        load_oracle(tmp_path / "a_folder")
    # stage=oracle retrain=true replaces the shared oracle and keeps the old one beside it
    again = cfg.copy()
    again.stage, again.retrain = "oracle", True
    assert ensure_oracle(again, device="cpu") == path and path.stat().st_mtime != mtime
    kept = sorted(p.name for p in tmp_path.glob("*.before-retrain-*"))
    assert len(kept) == 2 and kept[0].endswith(".json") and kept[1].endswith(".safetensors"), kept


def test_an_oracle_of_older_data_is_not_picked_up_and_warns_when_loaded(tmp_path):
    old = save_oracle(tiny_oracle(), tmp_path / "oracle-16.safetensors", {"data_version": DATA_VERSION - 1})
    cfg = load_config(None, [f"cache_dir={tmp_path}", "data.image_size=16", "tokenizer.scales=[1, 2, 4]"])
    assert oracle_path(cfg) != old  # the default cache path carries the data version
    with pytest.warns(UserWarning, match=f"data version {DATA_VERSION - 1}"):
        load_oracle(old)
    current = save_oracle(tiny_oracle(), tmp_path / "current.safetensors", {"data_version": DATA_VERSION})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_oracle(current)


def test_a_given_oracle_of_another_image_size_is_refused_naming_both_sizes(tmp_path, capsys):
    """stage=eval printed a note, then blamed the tokenizer: "tokenizer.encode: images of shape (3, 32, 32)"."""
    given = save_oracle(tiny_oracle(image_size=16), tmp_path / "o16.safetensors", {"data_version": DATA_VERSION})
    cfg = load_config(None, [f"cache_dir={tmp_path}", "data.image_size=32", f"oracle.path={given}"])
    with pytest.raises(ConfigError, match=re.escape(f"config key 'oracle.path': the oracle '{given}' is trained at "
                                                    f"16px, but data.image_size is 32")):
        ensure_oracle(cfg, device="cpu")
    same = load_config(None, [f"cache_dir={tmp_path}", "data.image_size=16", "tokenizer.scales=[1, 2, 4]",
                              f"oracle.path={given}"])
    assert ensure_oracle(same, device="cpu") == given


def test_inception_fid_needs_local_plain_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        inception_fid(images(4), images(4), tmp_path / "missing.pth")
    bad = tmp_path / "pickled.pth"
    torch.save({"net": nn.Linear(2, 2)}, bad)  # a pickled module, not a plain state dict
    with pytest.raises(ValueError, match="pickled.pth"):
        inception_fid(images(4), images(4), bad)
    # a readable file of something else: "...: 105" (torch's unpickler on text) or torch's page of missing keys
    text = tmp_path / "notes.pth"
    text.write_text("inception weights go here\n")
    nested = tmp_path / "final.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "hyper_parameters": {"stage": "ar"}}, nested)
    other = tmp_path / "linear.pth"
    torch.save(nn.Linear(2, 2).state_dict(), other)
    pytest.importorskip("torch_fidelity")
    plain = r"are not a plain tensor state dict \("
    for path, detail in ((text, plain), (nested, plain + r"a dict of other things\)"),
                         (other, r"do not fit torch-fidelity's InceptionV3 \(Error\(s\) in loading state_dict")):
        with pytest.raises(ValueError, match=re.escape(f"Inception weights '{path}' ") + detail + ".*download "):
            InceptionJudge(None, path)


@pytest.mark.slow  # InceptionV3 at 299 px and a 2048x2048 eigenproblem: ~30 s on a 2-core CPU
def test_inception_fid_with_local_random_weights(random_inception_weights):
    weights = random_inception_weights
    same = inception_fid(images(3, seed=0), images(3, seed=0), weights)
    other = inception_fid(images(3, seed=0), -images(3, seed=1), weights)
    assert math.isfinite(same) and math.isfinite(other)
    assert abs(same) < 1e-3 * max(1.0, abs(other)) and other > same
    # one judge, several fake sets: the real features are kept, the fake ones reset between calls
    judge = InceptionJudge(images(3, seed=0), weights)
    tol = 1e-3 * max(1.0, abs(other))
    assert judge(-images(3, seed=1)) == pytest.approx(other, abs=tol)
    assert judge(images(3, seed=0)) == pytest.approx(same, abs=tol)
    assert judge(-images(3, seed=1)) == pytest.approx(other, abs=tol)
    # torchmetrics' own FID with the same weights gives the same number
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=2048, normalize=True, feature_extractor_weights_path=str(weights))
    metric.update((images(3, seed=0) + 1) / 2, real=True)
    metric.update((-images(3, seed=1) + 1) / 2, real=False)
    assert float(metric.compute()) == pytest.approx(other, abs=tol)
    # the same numbers batch by batch: real images added in parts, two fake sets streamed side by side
    parts = InceptionJudge(None, weights)
    parts.add_real(images(3, seed=0)[:2])
    parts.add_real(images(3, seed=0)[2:])
    near, far = parts.stream(), parts.stream()
    for i in range(3):
        near.update(images(3, seed=0)[i:i + 1])
        far.update(-images(3, seed=1)[i:i + 1])
    assert near.compute() == pytest.approx(same, abs=tol)
    assert far.compute() == pytest.approx(other, abs=tol)
    with pytest.raises(ValueError, match="at least 2 real and 2 generated"):
        parts.stream().compute()


def test_oracle_trains_under_bf16_autocast_when_the_precision_says_so(tmp_path):
    from hybrid.eval.oracle import train_oracle

    def train(precision):
        cfg = load_config(None, [
            f"cache_dir={tmp_path}", "data.image_size=16", "tokenizer.scales=[1, 2, 4]",
            f"trainer.precision={precision}", "oracle.backbone=resnet18",
            "oracle.backbone_kwargs={channels: [8, 16, 16, 16], layers: [1, 1, 1, 1]}", "oracle.feature_dim=16",
            "oracle.train.max_steps=3", "oracle.train.batch_size=8", "oracle.train.warmup_steps=1",
            "oracle.eval_samples=16", "oracle.holdout_samples=8"])
        oracle, meta = train_oracle(cfg, device="cpu", progress=False)
        return oracle.state_dict(), meta

    fp32, meta32 = train("32-true")
    again, _ = train("32-true")
    bf16, meta16 = train("bf16-mixed")
    assert meta32["precision"] == "32-true" and meta16["precision"] == "bf16-mixed"
    assert all(v.dtype != torch.bfloat16 for v in bf16.values())  # the weights stay fp32
    assert all(torch.equal(fp32[k], again[k]) for k in fp32)  # same precision, same seed: same weights
    assert any(not torch.equal(fp32[k], bf16[k]) for k in fp32 if fp32[k].is_floating_point())  # bf16 really ran


def test_the_oracle_trains_on_a_time_limit_alone(tmp_path):
    """oracle.train.max_steps -1 with max_minutes (what the config allows for every stage) trains until the time is
    up, with the decay over the time; it was 'dataset size must be >= 1, got -8' before the first step."""
    from hybrid.eval.oracle import train_oracle

    cfg = load_config(None, [
        f"cache_dir={tmp_path}", "data.image_size=16", "tokenizer.scales=[1, 2, 4]", "oracle.backbone=resnet18",
        "oracle.backbone_kwargs={channels: [8, 16, 16, 16], layers: [1, 1, 1, 1]}", "oracle.feature_dim=16",
        "oracle.train.max_steps=-1", "oracle.train.max_minutes=0.02", "oracle.train.batch_size=8",
        "oracle.train.warmup_steps=1", "oracle.eval_samples=16", "oracle.holdout_samples=8"])
    _, meta = train_oracle(cfg, device="cpu", progress=True)
    assert meta["steps"] > 1 and meta["images_seen"] == 8 * meta["steps"]
    assert 1.2 <= meta["train_seconds"] < 30  # stopped by the time limit
