"""The main job end to end on the toy config: train.py (all stages) -> metrics.json -> sample.py -> export."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
MODE_FIELDS = ("fid", "fid_ci", "adherence", "glyph_accuracy", "images_per_s", "ms_per_image_b1", "params")


def _run(args, cwd=ROOT, timeout=900):
    out = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{args} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def _copy_stages(toy_run, dest: Path, stages) -> Path:
    """A new run directory `dest` holding copies of the toy run's `stages` (so a benchmark reuses them)."""
    import shutil

    for stage in stages:
        shutil.copytree(toy_run[0] / stage, dest / stage)
    return dest


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("e2e")
    run_dir = base / "run"
    out = _run(["train.py", "--config", "configs/toy.yaml", f"run_dir={run_dir}", f"cache_dir={base / 'cache'}",
                "trainer.progress_bar=false"])
    return run_dir, base, out.stdout


def test_text_conditioned_run_is_evaluated_on_captions_longer_than_its_text_encoder(toy_run):
    """The data's captions run to ~75 bytes; a text model takes `max_text_len` (32 in the toy config). Training
    cuts captions to that, and so must the evaluation (it stopped with 'prompt ... is 63 bytes' after all the
    training), while sample.py still refuses a user's prompt that is too long."""
    run_dir = _copy_stages(toy_run, toy_run[1] / "text", ["tokenizer"])
    _run(["train.py", "--config", "configs/toy.yaml", f"run_dir={run_dir}", f"cache_dir={toy_run[1] / 'cache'}",
          "trainer.progress_bar=false", "ar.condition=text", "refiner.condition=text", "ar.max_text_len=32",
          "refiner.max_text_len=24", "ar.train.max_steps=5", "refiner.train.max_steps=5", "eval.num_samples=64"])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for mode in ("ar", "hybrid"):
        assert set(metrics[mode]["adherence"]["text"]) >= {"shape", "color"}, mode
        assert metrics[mode]["glyph_accuracy"] is not None, mode
    long = "a small orange solid circle at the center on a white background"
    out = subprocess.run([sys.executable, "sample.py", "--run", str(run_dir), "--prompt", long, "-n", "1",
                          "--out", str(run_dir / "samples")], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode != 0 and "at most 24" in out.stderr, out.stderr[-2000:]
    from hybrid.pipeline import HybridPipeline, PipelineError

    pipe = HybridPipeline.from_run(run_dir)
    assert pipe(classes=[1], mode="ar").shape[0] == 1  # procedural classes have names to prompt with
    pipe.parsed["ar"].data.source = "shards"  # as if trained on a user's own captions: ids have no names
    with pytest.raises(PipelineError, match="pass prompts"):
        pipe(classes=[1], mode="ar")


def test_train_writes_every_stage_and_metrics(toy_run):
    run_dir, _, stdout = toy_run
    for stage in ("tokenizer", "ar", "refiner"):
        assert (run_dir / stage / "final.ckpt").is_file(), stage
        assert (run_dir / stage / "logs" / "metrics.csv").is_file(), stage
    assert (run_dir / "config.yaml").is_file()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    tok = metrics["tokenizer"]
    for key in ("fid", "fid_ci", "fid_discrete", "psnr_continuous", "psnr_discrete", "params"):
        assert key in tok, key
    for mode in ("ar", "hybrid"):
        entry = metrics[mode]
        for key in MODE_FIELDS:
            assert key in entry, (mode, key)
        assert np.isfinite(entry["fid"]) and entry["fid_ci"][0] <= entry["fid"] <= entry["fid_ci"][1]
        assert set(entry["adherence"]["class"]) >= {"shape", "color"}
        assert entry["images_per_s"] > 0 and entry["ms_per_image_b1"] > 0
    assert metrics["hybrid"]["params"]["refiner"] > 0
    paired = metrics["hybrid"]["fid_vs_ar"]  # the refiner's effect, judged on the same requests
    assert paired["difference"] == pytest.approx(metrics["hybrid"]["fid"] - metrics["ar"]["fid"])
    assert paired["ci"][0] <= paired["difference"] <= paired["ci"][1] and paired["same_tokens"] is True
    # and against the real images through the tokenizer (eval.decoded_reference, on by default)
    paired = metrics["hybrid"]["fid_vs_ar_decoded_ref"]
    decoded_fids = metrics["hybrid"]["fid_decoded_ref"], metrics["ar"]["fid_decoded_ref"]
    assert paired["difference"] == pytest.approx(decoded_fids[0] - decoded_fids[1])
    assert paired["ci"][0] <= paired["difference"] <= paired["ci"][1]
    assert "against the real images through the tokenizer (paired)" in stdout  # the summary shows it
    assert "sample.py" in stdout  # the summary says how to sample
    where = metrics["machine"]  # where images_per_s and ms_per_image_b1 were timed
    assert where["device"].startswith("cuda" if torch.cuda.is_available() else "cpu") and where["torch_threads"] >= 1


def test_eval_settings_judge_every_mode_at_other_sampling_settings(toy_run, tmp_path):
    """`stage=eval eval.settings=steps=1` re-judges a run with one refiner step (the toy refiner's config says 2):
    the pure-AR images, and so their FID, stay bit for bit; the hybrid's change; metrics.json records the
    settings. A bad setting is a one-line error naming the key, before anything is judged."""
    run_dir, base, _ = toy_run
    run = _copy_stages(toy_run, tmp_path / "again", ("tokenizer", "ar", "refiner"))
    common = ["train.py", "--config", "configs/toy.yaml", "stage=eval", f"run_dir={run}", f"cache_dir={base / 'cache'}",
              "trainer.progress_bar=false"]
    out = subprocess.run([sys.executable, *common, "eval.settings=stepz=1"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and "eval.settings" in out.stderr and "stepz" in out.stderr
    assert out.stderr.strip().count("\n") == 0 and not (run / "metrics.json").exists()
    _run([*common, "eval.settings=steps=1"])
    before = json.loads((run_dir / "metrics.json").read_text())
    after = json.loads((run / "metrics.json").read_text())
    assert before["generation_settings"] == {} and after["generation_settings"] == {"steps": 1}
    assert after["ar"]["fid"] == before["ar"]["fid"]
    assert after["hybrid"]["fid"] != before["hybrid"]["fid"]
    assert after["hybrid"]["fid_vs_ar"]["difference"] == pytest.approx(after["hybrid"]["fid"] - after["ar"]["fid"])
    # eval.draw=1: other requests and seeds for the generators; the tokenizer's held-out images stay
    _run([*common, "eval.settings=steps=1", "eval.draw=1"])
    drawn = json.loads((run / "metrics.json").read_text())
    assert before["eval_draw"] == 0 and drawn["eval_draw"] == 1
    assert drawn["tokenizer"]["fid"] == before["tokenizer"]["fid"]
    assert drawn["ar"]["fid"] != before["ar"]["fid"] and drawn["hybrid"]["fid"] != after["hybrid"]["fid"]


def test_eval_says_which_asked_for_modes_the_run_lacks_and_keeps_metrics_when_it_has_none(toy_run, tmp_path):
    """A mode the run cannot judge used to be dropped without a word; with none left, metrics.json was
    rewritten holding no mode at all."""
    _, base, _ = toy_run
    run = _copy_stages(toy_run, tmp_path / "no-ar", ("tokenizer", "refiner"))
    (run / "metrics.json").write_text('{"earlier": 1}')
    common = ["train.py", "--config", "configs/toy.yaml", "stage=eval", f"run_dir={run}", f"cache_dir={base / 'cache'}",
              "trainer.progress_bar=false", "eval.num_samples=16"]
    out = subprocess.run([sys.executable, *common, "eval.modes=[ar,hybrid]"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 1 and "nothing to judge" in out.stderr and "Traceback" not in out.stderr, out.stderr
    for mode in ("ar", "hybrid"):
        assert f"not judging {mode}: the run has no ar stage" in out.stdout, out.stdout
    assert f"--config {run / 'config.yaml'} stage=ar" in out.stdout
    assert (run / "metrics.json").read_text() == '{"earlier": 1}'
    out = _run([*common, "eval.modes=[tokenizer,hybrid]"])
    assert "not judging hybrid: the run has no ar stage" in out.stdout
    assert set(json.loads((run / "metrics.json").read_text())) >= {"tokenizer", "machine"}
    assert "hybrid" not in json.loads((run / "metrics.json").read_text())


@pytest.mark.slow  # InceptionV3 at 299 px on the toy run's images: ~1 min on 2 cores
def test_eval_adds_inception_fid_when_given_local_weights(toy_run, tmp_path, random_inception_weights):
    import shutil

    run_dir, base, _ = toy_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    _run(["train.py", "--config", "configs/toy.yaml", f"run_dir={copy}", f"cache_dir={base / 'cache'}", "stage=eval",
          f"eval.inception_weights={random_inception_weights}", "trainer.progress_bar=false"])
    metrics = json.loads((copy / "metrics.json").read_text())
    for mode in ("tokenizer", "ar", "hybrid"):
        assert np.isfinite(metrics[mode]["inception_fid"]), mode
        assert np.isfinite(metrics[mode]["fid"])  # the oracle's FID stays beside it
    missing = subprocess.run([sys.executable, "train.py", "--config", "configs/toy.yaml", f"run_dir={copy}",
                              "stage=eval", f"eval.inception_weights={tmp_path / 'none.pth'}"],
                             cwd=ROOT, capture_output=True, text=True)
    assert missing.returncode != 0 and "eval.inception_weights" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_rerun_skips_finished_stages(toy_run):
    run_dir, base, _ = toy_run
    before = (run_dir / "ar" / "final.ckpt").stat().st_mtime_ns
    out = _run(["train.py", "--config", "configs/toy.yaml", f"run_dir={run_dir}", f"cache_dir={base / 'cache'}",
                "stage=ar", "trainer.progress_bar=false"])
    final = run_dir / "ar" / "final.ckpt"
    assert f"[ar] {final} exists: skipped" in out.stdout, out.stdout
    assert final.stat().st_mtime_ns == before  # not trained or written again


def test_sample_cli_writes_images_and_is_deterministic(toy_run):
    run_dir, base, _ = toy_run
    grids = []
    for name in ("a", "b"):
        out_dir = base / f"samples-{name}"
        out = _run(["sample.py", "--run", str(run_dir), "--class", "3", "-n", "4", "--seed", "7", "--steps", "2",
                    "--out", str(out_dir)])
        assert "images/s" in out.stdout
        assert sorted(p.name for p in out_dir.glob("*.png")) == ["0000.png", "0001.png", "0002.png", "0003.png",
                                                                 "grid.png"]
        grids.append(np.asarray(Image.open(out_dir / "grid.png")))
    assert np.array_equal(grids[0], grids[1])


def test_sample_cli_takes_the_guidance_schedule_the_config_reference_lists(toy_run, tmp_path, capsys):
    """`cfg_schedule` is a generation setting (eval.settings, the pipeline), but sample.py had no flag for it."""
    from hybrid.sample_cli import main

    run_dir, _, _ = toy_run
    grids = {}
    for schedule in ("constant", "linear"):
        out_dir = tmp_path / schedule
        assert main(["--run", str(run_dir), "--class", "3", "-n", "4", "--cfg", "4", "--cfg-schedule", schedule,
                     "--mode", "ar", "--out", str(out_dir)]) == 0
        grids[schedule] = np.asarray(Image.open(out_dir / "grid.png"))
    assert not np.array_equal(grids["constant"], grids["linear"])  # the flag reaches the AR
    with pytest.raises(SystemExit):
        main(["--run", str(run_dir), "--class", "3", "--cfg-schedule", "cosine", "--out", str(tmp_path / "bad")])
    assert "invalid choice: 'cosine'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_export_loads_and_gives_the_same_images(toy_run):
    from hybrid.pipeline import HybridPipeline

    run_dir, base, _ = toy_run
    pipe = HybridPipeline.from_run(run_dir)
    export = pipe.save_pretrained(base / "export")
    assert sorted(p.name for p in export.iterdir()) == ["ar.safetensors", "pipeline.json", "refiner.safetensors",
                                                         "tokenizer.safetensors"]
    loaded = HybridPipeline.from_pretrained(export)
    for mode in ("ar", "hybrid"):
        a = pipe(classes=[0, 5, 9], mode=mode, seed=3, steps=2)
        b = loaded(classes=[0, 5, 9], mode=mode, seed=3, steps=2)
        assert torch.equal(a, b)
    out = _run(["sample.py", "--export", str(export), "--class", "1", "-n", "2", "--out", str(base / "s-export"),
                "--no-individual"])
    assert "images/s" in out.stdout and (base / "s-export" / "grid.png").is_file()
    assert not (base / "s-export" / "0000.png").exists()


def test_one_ar_pass_gives_the_ar_and_hybrid_images_of_two(toy_run):
    """The evaluation draws the ar and hybrid images from one AR pass: the hybrid mode's images, and its tokens
    decoded without the refiner, which are the ar mode's images batch for batch (a short last batch included)."""
    from hybrid.eval.evaluate import _generate, _generate_modes
    from hybrid.pipeline import HybridPipeline

    pipe = HybridPipeline.from_run(toy_run[0])
    assert pipe.hybrid_shares_ar_tokens
    classes = [0, 5, 9, 2, 7]
    ar, hybrid = pipe.ar_and_hybrid(classes=classes, seed=4, batch_size=2, steps=2)
    expected, tokens = pipe(classes=classes, mode="hybrid", seed=4, batch_size=2, steps=2, return_tokens=True)
    assert torch.equal(hybrid, expected)
    decoded = torch.cat([pipe.tokenizer.decode(pipe.tokenizer.indices_to_latent(t)).clamp(-1, 1) for t in tokens])
    assert torch.equal(ar, decoded)
    assert not torch.equal(ar, hybrid)  # the refiner did add something
    one_batch = pipe.ar_and_hybrid(classes=classes[:2], seed=4, batch_size=2, steps=2)
    assert torch.equal(one_batch[0], pipe(classes=classes[:2], mode="ar", seed=4, batch_size=2))
    # the evaluation asks batch by batch, each with its own seed: both modes' images are exactly the separate ones
    both = _generate_modes(pipe, ["ar", "hybrid"], 2, {"steps": 2}, classes=torch.tensor(classes))
    for mode in ("ar", "hybrid"):
        assert torch.equal(both[mode], _generate(pipe, mode, 2, {"steps": 2}, classes=torch.tensor(classes)))


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--class", "999"], "class id 999"),
        (["--prompt", ""], "empty"),
        (["--mode", "diffusion", "--class", "1"], "config.yaml stage=diffusion"),  # the run's own config
        (["--class", "1", "--batch-size", "0"], "batch size must be >= 1"),
        (["--class", "1", "--steps", "0"], "steps=0"),
        (["--class", "1", "--cfg", "-5"], "cfg=-5"),
        (["--class", "1", "--top-p", "0"], "top_p=0"),
    ],
)
def test_sample_cli_errors_are_one_line(toy_run, args, needle):
    run_dir, base, _ = toy_run
    out = subprocess.run([sys.executable, "sample.py", "--run", str(run_dir), *args, "--out", str(base / "x")],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2
    assert needle in out.stderr and out.stderr.strip().count("\n") == 0, out.stderr


def test_the_summary_of_a_command_without_eval_does_not_pass_old_metrics_off_as_new(toy_run):
    run_dir, base, stdout = toy_run
    assert f"sample with: python sample.py --run {run_dir} --class 0 -n 16" in stdout and "FID" in stdout
    out = _run(["train.py", "--config", "configs/toy.yaml", f"run_dir={run_dir}", f"cache_dir={base / 'cache'}",
                "trainer.progress_bar=false", "stage=refiner"])
    assert "is from an earlier evaluation" in out.stdout and "stage=eval" in out.stdout, out.stdout
    assert "FID" not in out.stdout.split("finished in", 1)[1]
    hint = out.stdout.split("judge again with: python ", 1)[1].split()  # the toy run's own config, not the default's
    assert hint[:3] == ["train.py", "--config", str(run_dir / "config.yaml")] and hint[3] == "stage=eval", hint
    judged = _run(hint[:4])
    assert "FID" in judged.stdout.split("finished in", 1)[1] and "training the oracle" not in judged.stdout


def test_damaged_exports_and_export_targets_are_one_line_errors(toy_run, tmp_path):
    import shutil

    from hybrid.pipeline import HybridPipeline

    run_dir, base, _ = toy_run
    export = HybridPipeline.from_run(run_dir).save_pretrained(tmp_path / "export")

    def sample(*args):
        out = [] if "--out" in args else ["--out", str(tmp_path / "out")]
        return subprocess.run([sys.executable, "sample.py", *args, "--class", "1", "-n", "1", *out], cwd=ROOT,
                              capture_output=True, text=True)

    cut = shutil.copytree(export, tmp_path / "cut")
    data = (cut / "ar.safetensors").read_bytes()
    (cut / "ar.safetensors").write_bytes(data[: len(data) // 3])
    broken = shutil.copytree(export, tmp_path / "broken")
    (broken / "pipeline.json").write_text("{not json")
    keyless = shutil.copytree(export, tmp_path / "keyless")
    (keyless / "pipeline.json").write_text(json.dumps({"format": 1, "stages": {"tokenizer": {}}}))
    (tmp_path / "a-file").write_text("x")
    blocked = tmp_path / "blocked"
    (blocked / "pipeline.json").mkdir(parents=True)
    (tmp_path / "taken" / "grid.png").mkdir(parents=True)
    # valid JSON whose config does not fit the weights (the hash covers only the weights): a size-mismatch traceback
    manifest = json.loads((export / "pipeline.json").read_text())
    edited = shutil.copytree(export, tmp_path / "edited")
    manifest["stages"]["ar"]["config"]["ar"]["width"] += 8
    (edited / "pipeline.json").write_text(json.dumps(manifest))
    nulled = shutil.copytree(export, tmp_path / "nulled")
    manifest["stages"]["ar"]["config"] = None
    (nulled / "pipeline.json").write_text(json.dumps(manifest))
    written = (export / "pipeline.json").stat().st_mtime_ns
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "tokenizer.safetensors").write_bytes(b"someone's weights")
    for args, needle in ((["--export", str(cut)], str(cut / "ar.safetensors")),
                         (["--export", str(broken)], str(broken / "pipeline.json")),
                         (["--export", str(keyless)], "damaged"),
                         (["--export", str(edited)], f"'{edited / 'ar.safetensors'}' does not fit the model its "
                                                     "config describes"),
                         (["--export", str(nulled)], "the ar stage's config is not a mapping"),
                         (["--run", str(run_dir), "--write-export", str(tmp_path / "a-file")], "is a file"),
                         (["--run", str(run_dir), "--write-export", str(export)],
                          "already holds tokenizer.safetensors, ar.safetensors, "),
                         # a folder with a stage's weights but no pipeline.json: they were replaced, silently
                         (["--run", str(run_dir), "--write-export", str(partial)],
                          f"--write-export {partial} already holds tokenizer.safetensors: pass --overwrite to replace "
                          f"it, or give another folder"),
                         (["--export", str(export), "--cfg", "inf"], "cfg=inf: it must be a finite number"),
                         # a folder where a file is written: a traceback at the rename, after generating or writing
                         (["--run", str(run_dir), "--write-export", str(blocked)],  # not "holds an export"
                          f"'{blocked / 'pipeline.json'}' is a folder, where the export writes a file"),
                         (["--export", str(export), "--out", str(tmp_path / "taken")],
                          f"'{tmp_path / 'taken' / 'grid.png'}' is a folder, where this command writes an image")):
        out = sample(*args)
        assert out.returncode == 2 and needle in out.stderr, out.stderr[-2000:]
        assert out.stderr.strip().count("\n") == 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert (export / "pipeline.json").stat().st_mtime_ns == written  # the export refused above was not rewritten
    assert [p.name for p in blocked.iterdir()] == ["pipeline.json"]  # no stage written before the refusal
    assert [p.name for p in partial.iterdir()] == ["tokenizer.safetensors"]
    assert (partial / "tokenizer.safetensors").read_bytes() == b"someone's weights"
    umask = os.umask(0)
    os.umask(umask)
    assert {p.name: p.stat().st_mode & 0o777 for p in export.iterdir()} == {  # the weights were 0600, the JSON not
        p.name: 0o666 & ~umask for p in export.iterdir()}


def test_sample_cli_missing_stage_is_a_clear_error(tmp_path):
    (tmp_path / "run").mkdir()
    out = subprocess.run([sys.executable, "sample.py", "--run", str(tmp_path / "run"), "--class", "1"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and "tokenizer" in out.stderr and "Traceback" not in out.stderr


def test_generation_settings_parse_types_each_key_and_names_bad_ones():
    from hybrid.pipeline import GenerationSettings

    parsed = GenerationSettings.parse("cfg=4, temperature=0.5,top_k=10,cfg_schedule=linear,")
    assert parsed == {"cfg": 4.0, "temperature": 0.5, "top_k": 10, "cfg_schedule": "linear"}
    assert isinstance(parsed["top_k"], int) and isinstance(parsed["cfg"], float)
    GenerationSettings(**parsed)  # every parsed key is a field
    assert GenerationSettings.parse("") == {}
    for bad, named in (("temprature=1", "temprature"), ("top_k=ten", "top_k"), ("cfg", "cfg")):
        with pytest.raises(ValueError, match=named):
            GenerationSettings.parse(bad)


def test_curve_benchmark_trains_ar_with_snapshots_and_judges_each(toy_run, tmp_path):
    """benchmarks/curve.py on a copy of the toy run without its AR stage: snapshots at the asked steps,
    their training times, and a judged row per snapshot for both ar and hybrid."""
    base = toy_run[1]
    curve_run = _copy_stages(toy_run, tmp_path / "curve", ("tokenizer", "refiner"))
    out_json = tmp_path / "curve.json"
    out = _run(["-m", "benchmarks.curve", "--config", "configs/toy.yaml", "--run-dir", str(curve_run),
                "--at", "10", "30", "--num-samples", "40", "--out", str(out_json), f"cache_dir={base / 'cache'}",
                "trainer.progress_bar=false", "--device", "cpu"])
    assert (curve_run / "ar" / "final.ckpt").is_file()
    result = json.loads(out_json.read_text())
    assert result["machine"]["device"] == "cpu" and "gpu" not in result["machine"]  # the numbers' device
    assert [row["step"] for row in result["rows"]] == [10, 30]
    first, last = result["rows"]
    assert 0 < first["ar_minutes"] < last["ar_minutes"]
    for row in result["rows"]:
        for mode in ("ar", "hybrid"):
            entry = row[mode]
            assert np.isfinite(entry["fid"]) and entry["fid_ci"][0] <= entry["fid"] <= entry["fid_ci"][1]
            assert 0 <= entry["adherence"]["shape"] <= 1
        # the paired difference on the same prompts and tokens, and its interval around it
        paired = row["hybrid"]["fid_vs_ar"]
        assert paired["ci"][0] <= paired["difference"] <= paired["ci"][1]
        assert paired["difference"] == pytest.approx(row["hybrid"]["fid"] - row["ar"]["fid"], abs=1e-6)
    assert "(paired)" in out.stdout
    for mode in ("ar", "hybrid"):  # adherence with its interval over the 40 prompts
        for attr in ("shape", "color"):
            lo, hi = last[mode]["adherence_ci"][attr]
            assert lo <= last[mode]["adherence"][attr] <= hi and hi - lo > 0.1
    assert result["draw"] == 0
    # different weights at the two points: the step-10 and step-30 snapshots are judged as themselves
    assert first["ar"]["fid"] != last["ar"]["fid"]
    assert result["stage_minutes"]["tokenizer"] > 0 and result["stage_minutes"]["refiner"] > 0
    assert "step" in out.stdout and result["settings"] == {}

    # --sample judges the same snapshots with other generation settings (no retraining): greedy AR
    # tokens give other images, so another FID, and the settings are recorded
    mtime = (curve_run / "ar" / "final.ckpt").stat().st_mtime
    greedy_json = tmp_path / "curve-greedy.json"
    _run(["-m", "benchmarks.curve", "--config", "configs/toy.yaml", "--run-dir", str(curve_run), "--at", "30",
          "--num-samples", "40", "--sample", "temperature=0,cfg=1,steps=2", "--out", str(greedy_json),
          f"cache_dir={base / 'cache'}", "trainer.progress_bar=false"])
    greedy = json.loads(greedy_json.read_text())
    assert (curve_run / "ar" / "final.ckpt").stat().st_mtime == mtime
    assert greedy["settings"] == {"temperature": 0.0, "cfg": 1.0, "steps": 2}
    assert greedy["machine"]["device"] == ("cuda" if torch.cuda.is_available() else "cpu")  # --device auto
    assert greedy["rows"][0]["ar"]["fid"] != last["ar"]["fid"]
    # its grids go to their own folder, beside (not over) the default settings' grids
    curve_dir = curve_run / "ar" / "curve"
    assert (curve_dir / "eval-30" / "eval" / "ar-class.png").is_file()
    assert (curve_dir / "eval-30-temperature0.0-cfg1.0-steps2" / "eval" / "ar-class.png").is_file()
    bad = subprocess.run([sys.executable, "-m", "benchmarks.curve", "--run-dir", str(curve_run), "--at", "30",
                          "--sample", "temprature=0"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "temprature" in bad.stderr and "Traceback" not in bad.stderr

    # eval.draw=1: the same snapshot judged on other requests and seeds (a check of a setting chosen on draw 0)
    draw_json = tmp_path / "curve-draw1.json"
    _run(["-m", "benchmarks.curve", "--config", "configs/toy.yaml", "--run-dir", str(curve_run), "--at", "30",
          "--num-samples", "40", "--out", str(draw_json), f"cache_dir={base / 'cache'}", "trainer.progress_bar=false",
          "eval.draw=1"])
    drawn = json.loads(draw_json.read_text())
    assert drawn["draw"] == 1 and drawn["rows"][0]["ar"]["fid"] != last["ar"]["fid"]
    assert (curve_dir / "eval-30-draw1" / "eval" / "ar-class.png").is_file()
    bad = subprocess.run([sys.executable, "-m", "benchmarks.curve", "--run-dir", str(curve_run), "--at", "30",
                          "--num-samples", "40", "eval.draw=-1"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "eval.draw" in bad.stderr and "Traceback" not in bad.stderr


def test_pipeline_from_explicit_checkpoints_matches_the_run(toy_run, tmp_path):
    from hybrid.pipeline import HybridPipeline, PipelineError

    run_dir, _, _ = toy_run
    paths = {stage: run_dir / stage / "final.ckpt" for stage in ("tokenizer", "ar", "refiner")}
    explicit = HybridPipeline.from_checkpoints(paths["tokenizer"], ar=paths["ar"], refiner=paths["refiner"])
    whole = HybridPipeline.from_run(run_dir)
    assert explicit.modes == whole.modes == ["ar", "hybrid"]
    a = explicit(classes=torch.tensor([0, 3]), mode="hybrid", seed=5)
    b = whole(classes=torch.tensor([0, 3]), mode="hybrid", seed=5)
    assert torch.equal(a, b)
    assert HybridPipeline.from_checkpoints(paths["tokenizer"], ar=paths["ar"]).modes == ["ar"]
    with pytest.raises(PipelineError, match="refiner checkpoint .*missing.ckpt"):
        HybridPipeline.from_checkpoints(paths["tokenizer"], ar=paths["ar"], refiner=tmp_path / "missing.ckpt")


def test_tokenizer_benchmark_judges_both_reconstruction_paths(toy_run, tmp_path):
    """benchmarks.tokenizer --reuse on the toy run: PSNR, FID and per-attribute adherence of decode(z) and of
    decode(z_q) against the held-out images' own attributes (the ceiling for any generator of its latents)."""
    base = toy_run[1]
    out_json = tmp_path / "tokenizer.json"
    out = _run(["-m", "benchmarks.tokenizer", "--config", "configs/toy.yaml", "--run-dir", str(toy_run[0]), "--reuse",
                "--num-images", "48", "--bootstrap", "20", "--out", str(out_json), f"cache_dir={base / 'cache'}",
                "--device", "cpu"])
    result = json.loads(out_json.read_text())
    assert "stage_seconds" not in result  # reused, not trained
    assert result["machine"]["device"] == "cpu" and result["images_per_s"] > 0
    for path in ("continuous", "discrete"):
        adh = result[f"adherence_{path}"]
        assert {"shape", "color", "position", "all"} <= set(adh)
        assert all(0 <= v <= 1 for v in adh.values())
        assert f"adherence {path}" in out.stdout
    # the two paths decode different latents, so their images (and FIDs) differ
    assert result["fid_continuous"]["fid"] != result["fid_discrete"]["fid"]


def test_tokenizer_benchmark_refuses_a_tokenizer_checkpoint_and_points_at_reuse(toy_run, tmp_path):
    """With tokenizer.checkpoint the stage takes that file instead of training, and the benchmark reported a
    training time of ~0 s, an empty curve and the stage<=8min target as met. It is a one-line error (exit 2,
    before anything is written) pointing at --reuse --run-dir, the mode that measures a trained tokenizer (the
    test above follows that advice on the same run). --help says that every training run sets the previous
    tokenizer folder aside, so repeated runs keep old copies."""
    base, ckpt = toy_run[1], toy_run[0] / "tokenizer" / "final.ckpt"
    bench = tmp_path / "bench"
    out = subprocess.run([sys.executable, "-m", "benchmarks.tokenizer", "--config", "configs/toy.yaml", "--run-dir",
                          str(bench), "--num-images", "48", "--bootstrap", "20", "--curve-every", "1000",
                          f"cache_dir={base / 'cache'}", "--device", "cpu", f"tokenizer.checkpoint={ckpt}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 2, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr
    assert f"tokenizer.checkpoint={ckpt}" in out.stderr and f"--reuse --run-dir {toy_run[0]}" in out.stderr
    assert not bench.exists()  # nothing taken over, nothing trained
    wide = subprocess.run([sys.executable, "-m", "benchmarks.tokenizer", "--help"], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "COLUMNS": "1000"})  # no line wrapped inside the name
    assert wide.returncode == 0 and "RUN_DIR/tokenizer.before-retrain-<time>" in wide.stdout


@pytest.mark.parametrize("command", ["benchmarks.tokenizer", "benchmarks.given_scales"])
def test_a_truncated_checkpoint_ends_a_benchmark_in_one_line_naming_it(toy_run, tmp_path, capsys, command):
    """A truncated final.ckpt (a copy cut short, a full disk) ended `--reuse` and given_scales in a CheckpointError
    traceback; every benchmark that loads checkpoints now prints its one line (exit 1)."""
    import importlib

    run = _copy_stages(toy_run, tmp_path / "cut", ("tokenizer", "ar"))
    ckpt = run / "tokenizer" / "final.ckpt"
    ckpt.write_bytes(ckpt.read_bytes()[:4096])
    argv = ["--config", "configs/toy.yaml", "--run-dir", str(run), "--num-images", "8", "--device", "cpu",
            f"cache_dir={toy_run[1] / 'cache'}"]
    if command == "benchmarks.tokenizer":
        argv = ["--reuse", *argv]
    code = importlib.import_module(command).main(argv)
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: ") and f"'{ckpt}'" in err and "truncated" in err, err
    assert err.strip().count("\n") == 0


def test_refiner_benchmark_judges_z_q_z_noise_and_each_sampler_on_a_trained_run(toy_run, tmp_path):
    base = toy_run[1]
    bench_run = _copy_stages(toy_run, tmp_path / "refbench", ("tokenizer", "refiner"))
    out_json = tmp_path / "refiner.json"
    out = _run(["-m", "benchmarks.refiner", "--config", "configs/toy.yaml", "--run-dir", str(bench_run),
                "--tokenizer", str(bench_run / "tokenizer" / "final.ckpt"), "--num-images", "48", "--steps", "1,2",
                "--bootstrap", "20", "--out", str(out_json), f"cache_dir={base / 'cache'}", "--device", "cpu",
                "--baseline", "--baseline-steps", "2"])
    result = json.loads(out_json.read_text())
    assert set(result["train_minutes"]) == {"diffusion"}  # tokenizer and refiner were reused
    # the class-conditional baseline is judged on what a class asks for, not on the held-out images' other attributes
    baseline = result["baseline"]["steps"]["2"]
    assert set(baseline["adherence"]) == {"shape", "color", "all"} and baseline["images_per_s"] > 0
    assert result["machine"]["device"] == "cpu" and result["refiner_forward_ms_per_image"] > 0
    assert set(result["ablation"]) == {"ddim/1", "ddim/2", "dpm/1", "dpm/2"}
    for entry in [result["z_q"], result["z"], result["z_q_plus_noise"], *result["ablation"].values()]:
        fid, (lo, hi) = entry["fid"]["fid"], entry["fid"]["ci"]
        assert np.isfinite(fid) and lo <= fid <= hi
    # the floor row really adds noise: its images, and so its FID, differ from z_q's
    assert result["z_q_plus_noise"]["fid"]["fid"] != result["z_q"]["fid"]["fid"]
    assert "refined(ddim/2)_fid_below_z_q_plus_noise" in result["targets"]
    # every later row is judged against decode(z_q) of the same images too, paired
    assert "fid_vs_z_q" not in result["z_q"]
    for entry in [result["z"], result["z_q_plus_noise"], *result["ablation"].values()]:
        paired = entry["fid_vs_z_q"]
        assert paired["difference"] == pytest.approx(entry["fid"]["fid"] - result["z_q"]["fid"]["fid"])
        assert paired["ci"][0] <= paired["difference"] <= paired["ci"][1]
    assert "refined(ddim/2)_fid_below_z_q_by_paired_interval" in result["targets"]
    # and per attribute, adherence(row) - adherence(z_q) on the same images, paired
    for entry in [result["z"], *result["ablation"].values()]:
        for attr, d in entry["adherence_vs_z_q"].items():
            assert d["difference"] == pytest.approx(entry["adherence"][attr] - result["z_q"]["adherence"][attr])
            assert d["ci"][0] <= d["difference"] <= d["ci"][1]
    assert {"shape", "color"} <= set(result["ablation"]["ddim/1"]["adherence_vs_z_q"])
    assert "refined_adherence_not_lower_than_z_q_by_paired_interval" in result["targets"]
    # and as one family: a sign test per attribute on the discordant rows, Holm-corrected
    from hybrid.eval.adherence import holm_rejected

    pairs = result["ablation"]["ddim/2"]["adherence_vs_z_q"]
    assert result["targets"]["refined_adherence_not_lower_than_z_q_by_holm_sign_test"] == (
        not holm_rejected({a: d["p_lower"] for a, d in pairs.items() if a != "all"}))
    assert all(0 < d["p_lower"] <= 1 and d["worse"] + d["better"] <= d["n"] for d in pairs.values())
    assert "adherence ddim/2 - z_q (paired, points): shape" in out.stdout
    assert "noise of the residual's scale" in out.stdout
    # EMA against the raw weights of the same (final) step, on the same images and noise, paired
    raw, setting = result["raw_weights"], result["raw_weights"]["setting"]
    assert raw["fid"]["fid"] != result["ablation"][setting]["fid"]["fid"]  # other weights, other images
    paired = raw["fid_vs"]
    assert paired["row"] == setting
    assert paired["difference"] == pytest.approx(raw["fid"]["fid"] - result["ablation"][setting]["fid"]["fid"])
    assert paired["ci"][0] <= paired["difference"] <= paired["ci"][1]
    assert "ema_fid_below_raw_by_paired_interval" in result["targets"]
    # the second reference, the real images through the tokenizer: every row, with its paired difference
    rows = [result["z_q"], result["z"], result["z_q_plus_noise"], result["z_q_sharpened"], raw,
            *result["ablation"].values()]
    for entry in rows:
        fid, (lo, hi) = entry["fid_decoded_ref"]["fid"], entry["fid_decoded_ref"]["ci"]
        assert np.isfinite(fid) and lo <= fid <= hi
        assert fid != entry["fid"]["fid"]  # another reference, another FID
    for entry in rows[1:]:
        paired = entry["fid_vs_z_q_decoded_ref"]
        assert paired["difference"] == pytest.approx(
            entry["fid_decoded_ref"]["fid"] - result["z_q"]["fid_decoded_ref"]["fid"])
        assert paired["ci"][0] <= paired["difference"] <= paired["ci"][1]
    paired = raw["fid_vs_decoded_ref"]
    assert paired["row"] == setting and paired["ci"][0] <= paired["difference"] <= paired["ci"][1]
    assert paired["difference"] == pytest.approx(
        raw["fid_decoded_ref"]["fid"] - result["ablation"][setting]["fid_decoded_ref"]["fid"])
    # the judge check: decode(z_q) through the unsharp mask, paired with decode(z_q) against both references
    sharpened = result["z_q_sharpened"]
    assert sharpened["fid_vs_z_q"]["difference"] == pytest.approx(
        sharpened["fid"]["fid"] - result["z_q"]["fid"]["fid"])
    assert sharpened["fid_vs_z_q"]["difference"] != 0  # other images than decode(z_q)
    assert "refined(ddim/2)_fid_below_z_q_by_paired_interval_against_decoded_real" in result["targets"]
    assert "refined(ddim/2)_fid_below_z_q_outside_ci_against_decoded_real" in result["targets"]
    # z_q, z, noise, sharpened, 4 refined, raw, baseline
    assert out.stdout.count("against decoded real images: FID") == 10
    assert "unsharp mask 0.2 (judge check" in out.stdout


def test_a_refiner_of_the_first_scales_trains_benchmarks_samples_and_exports(toy_run, tmp_path):
    """refiner.coarse_scales=2 (of the toy's 3): the refiner benchmark trains it and refines the 2-scale z_q; the
    pipeline's hybrid mode and its export use the measured target_std and give the same images."""
    from hybrid.pipeline import HybridPipeline

    base = toy_run[1]
    run = _copy_stages(toy_run, tmp_path / "coarse", ("tokenizer", "ar"))
    out_json = tmp_path / "refiner.json"
    _run(["-m", "benchmarks.refiner", "--config", "configs/toy.yaml", "--run-dir", str(run),
          "--tokenizer", str(run / "tokenizer" / "final.ckpt"), "--num-images", "48", "--steps", "1",
          "--bootstrap", "20", "--out", str(out_json), f"cache_dir={base / 'cache'}", "refiner.coarse_scales=2",
          "refiner.train.max_steps=10", "trainer.progress_bar=false"])
    result = json.loads(out_json.read_text())
    assert result["refiner"]["coarse_scales"] == 2 and result["train_minutes"]["refiner"] > 0
    # the 2-scale z_q lacks the finest scale's codes, so it decodes to other images than the full z_q
    assert result["z_q_coarse"]["fid"]["fid"] != result["z_q"]["fid"]["fid"]
    assert result["z_q_coarse"]["fid_vs_z_q_decoded_ref"]["difference"] != 0  # and against the decoded reference
    pipe = HybridPipeline.from_run(run)
    assert bool((pipe.refiner.target_std > 0).all())
    loaded = HybridPipeline.from_pretrained(pipe.save_pretrained(tmp_path / "export"))
    assert torch.equal(loaded.refiner.target_std, pipe.refiner.target_std)
    a = pipe(classes=[0, 5], mode="hybrid", seed=3, steps=2)
    assert torch.equal(a, loaded(classes=[0, 5], mode="hybrid", seed=3, steps=2))
    assert a.shape == (2, 3, 16, 16) and bool(torch.isfinite(a).all())
    # its AR writes 2 scales in hybrid mode, so the evaluation cannot share the ar mode's pass: it asks twice
    from hybrid.eval.evaluate import _generate_modes
    from hybrid.pipeline import PipelineError

    assert not pipe.hybrid_shares_ar_tokens
    with pytest.raises(PipelineError, match="coarse_scales"):
        pipe.ar_and_hybrid(classes=[0, 5], seed=3)
    both = _generate_modes(pipe, ["ar", "hybrid"], 2, {"steps": 2}, classes=torch.tensor([0, 5]))
    assert torch.equal(both["hybrid"], pipe(classes=[0, 5], mode="hybrid", seed=0, batch_size=2, steps=2))
    assert torch.equal(both["ar"], pipe(classes=[0, 5], mode="ar", seed=0, batch_size=2))


def test_given_scales_benchmark_keeps_the_given_codes(toy_run, tmp_path):
    """benchmarks.given_scales on the toy run: one row per number of given scales; with every scale given the AR
    writes nothing, so its images (and FID) are the given codes' own."""
    base = toy_run[1]
    out_json = tmp_path / "given.json"
    out = _run(["-m", "benchmarks.given_scales", "--config", "configs/toy.yaml", "--run-dir", str(toy_run[0]),
                "--num-images", "40", "--out", str(out_json), f"cache_dir={base / 'cache'}", "eval.bootstrap=20",
                "--device", "cpu"])
    result = json.loads(out_json.read_text())
    assert result["machine"]["device"] == "cpu" and "gpu" not in result["machine"]
    assert [row["given"] for row in result["rows"]] == [0, 1, 2, 3] and result["scales"] == [1, 2, 4]
    last = result["rows"][-1]
    assert last["fid"] == last["given_only"]["fid"] and last["adherence"] == last["given_only"]["adherence"]
    first = result["rows"][0]
    assert first["fid"]["fid"] != first["given_only"]["fid"]["fid"]  # sampled images, not a zero latent's
    assert {"shape", "color", "position"} <= set(first["adherence"])
    assert "given codes alone" in out.stdout

    # --sample reaches the AR's sampler (it crashed: the parsed dict went where GenerationSettings belongs):
    # greedy tokens change the sampled rows, not the row where every scale is given
    greedy_json = tmp_path / "given-greedy.json"
    _run(["-m", "benchmarks.given_scales", "--config", "configs/toy.yaml", "--run-dir", str(toy_run[0]),
          "--num-images", "40", "--sample", "cfg=2,temperature=0", "--out", str(greedy_json),
          f"cache_dir={base / 'cache'}", "eval.bootstrap=20", "--device", "cpu"])
    greedy = json.loads(greedy_json.read_text())
    assert greedy["settings"] == {"cfg": 2.0, "temperature": 0.0}
    assert greedy["ar_sampling"]["cfg"] == 2.0 and greedy["ar_sampling"]["temperature"] == 0.0
    assert greedy["ar_sampling"]["top_k"] == result["ar_sampling"]["top_k"]  # unset: the AR config's
    assert greedy["rows"][0]["fid"]["fid"] != first["fid"]["fid"]
    assert greedy["rows"][-1]["fid"] == last["fid"]


def test_noise_residual_has_the_residual_scale_and_follows_the_seed():
    from benchmarks.refiner import noise_residual

    z_q = torch.randn(64, 3, 8, 8)
    std = torch.tensor([0.5, 1.0, 2.0])
    noisy = noise_residual(z_q, std, seed=3)
    per_channel = (noisy - z_q).transpose(0, 1).flatten(1).std(1)
    torch.testing.assert_close(per_channel, std, rtol=0.05, atol=0)
    torch.testing.assert_close(noise_residual(z_q, std, seed=3), noisy)
    assert not torch.equal(noise_residual(z_q, std, seed=4), noisy)


def test_repair_benchmark_trains_each_variant_and_judges_hybrid_samples(toy_run, tmp_path):
    base = toy_run[1]
    bench_run = _copy_stages(toy_run, tmp_path / "repair", ("tokenizer", "ar"))
    out_json = tmp_path / "repair.json"
    _run(["-m", "benchmarks.repair", "--config", "configs/toy.yaml", "--run-dir", str(bench_run),
          "--variant", "repair:refiner.corrupt_prob=0.5", "--variant", "plain:refiner.corrupt_prob=0",
          "--num-samples", "40", "--out", str(out_json), f"cache_dir={base / 'cache'}", "trainer.progress_bar=false",
          "--device", "cpu"])
    result = json.loads(out_json.read_text())
    assert result["machine"]["device"] == "cpu"
    assert set(result["variants"]) == {"repair", "plain"}
    assert result["variants"]["repair"]["corrupt_prob"] == 0.5 and result["variants"]["plain"]["corrupt_prob"] == 0
    for entry in [result["ar"], *result["variants"].values()]:
        assert np.isfinite(entry["fid"]) and entry["fid_ci"][0] <= entry["fid"] <= entry["fid_ci"][1]
        assert 0 <= entry["adherence"]["shape"] <= 1
    for name in ("repair", "plain"):
        assert (bench_run / "repair" / name / "refiner" / "final.ckpt").is_file()
    # the two refiners differ, so their hybrid images (same AR tokens, same seeds) do too
    repair, plain = result["variants"]["repair"], result["variants"]["plain"]
    assert repair["fid"] != plain["fid"]
    # paired differences on the same requests and tokens: against pure AR, and the second variant against the first
    for entry, other, key in ((repair, result["ar"], "fid_vs_ar"), (plain, result["ar"], "fid_vs_ar"),
                              (plain, repair, "fid_vs_first")):
        d = entry[key]
        assert d["difference"] == pytest.approx(entry["fid"] - other["fid"], abs=1e-6)
        assert d["ci"][0] <= d["difference"] <= d["ci"][1] and d["ci"][0] < d["ci"][1]
    assert plain["fid_vs_first"]["row"] == "repair" and "fid_vs_first" not in repair
    bad = subprocess.run([sys.executable, "-m", "benchmarks.repair", "--run-dir", str(tmp_path / "nothing")],
                         cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 1 and "no trained tokenizer" in bad.stderr


def test_showdown_trains_every_system_and_measures_them_side_by_side(toy_run, tmp_path):
    """benchmarks/showdown.py on the toy run's tokenizer: trains AR (next-scale and raster), refiner and
    a FLOP-matched diffusion baseline with half-budget snapshots, then judges every system."""
    import shutil

    run_dir, base, _ = toy_run
    show_run, out_dir = tmp_path / "show", tmp_path / "report"
    shutil.copytree(run_dir / "tokenizer", show_run / "tokenizer")
    common = ["--config", "configs/toy.yaml", "--run-dir", str(show_run), "--out", str(out_dir),
              f"cache_dir={base / 'cache'}", "trainer.progress_bar=false"]
    _run(["benchmarks/showdown.py", *common, "--num-samples", "32", "--seeds", "2", "--sweep-samples", "16",
          "--cfg-sweep", "1", "2", "--refiner-steps", "1", "2", "--diffusion-steps", "2", "4", "--device", "cpu"])
    result = json.loads((out_dir / "showdown.json").read_text())
    assert result["machine"]["device"] == "cpu" and "gpu" not in result["machine"]  # the speeds' device
    systems = result["systems"]
    assert set(systems) == {"ar", "raster", "diffusion", "hybrid"}
    scales = [1, 2, 4]  # configs/toy.yaml
    decoder = {"decoder": 1}
    expected_evals = {  # counted by hooks while one batch is generated
        ("ar", None): {"ar": len(scales), **decoder},
        ("raster", None): {"ar": sum(s * s for s in scales), **decoder},
        ("hybrid", 1): {"ar": len(scales), "refiner": 1, **decoder},
        ("hybrid", 2): {"ar": len(scales), "refiner": 2, **decoder},
        ("diffusion", 2): {"diffusion": 2, **decoder},
        ("diffusion", 4): {"diffusion": 4, **decoder},
    }
    for name, entry in systems.items():
        assert [r["steps"] for r in entry["rows"]] == {"hybrid": [1, 2], "diffusion": [2, 4]}.get(name, [None])
        assert entry["operating_point"] in [r["steps"] for r in entry["rows"]]
        assert len(entry["sweep"]) >= 2
        for row in entry["rows"]:
            assert row["network_evals"] == expected_evals[(name, row["steps"])], (name, row["steps"])
            assert np.isfinite(row["fid"]) and row["fid_ci"][0] <= row["fid"] <= row["fid_ci"][1]
            # against the real images through the run's tokenizer too (eval.decoded_reference, on by default);
            # the reference itself is checked in _check_the_judge_s_decoded_reference
            assert row["fid_decoded_ref_ci"][0] < row["fid_decoded_ref_ci"][1]
            assert np.isfinite(row["fid_decoded_ref"]) and row["fid_decoded_ref"] != pytest.approx(row["fid"])
            assert row["fid_n"] == 64 and len(row["fid_per_seed"]) == 2
            assert row["images_per_s"] > 0 and row["ms_per_image_b1"] > 0 and row["flops_per_image"] > 0
            assert 0 <= row["adherence"]["shape"] <= 1
        assert set(entry["composition"]) >= {"shape", "color"}  # held-out pairs (oracle.holdout by default)
        assert entry["half_budget"] is not None and np.isfinite(entry["half_budget"]["fid"])
        assert entry["half_budget"]["n"] == 16  # seed 0's first --sweep-samples requests
        assert entry["glyph_accuracy"] is None  # class-conditioned: a class names no character
    # more refiner / diffusion steps cost more FLOPs per image
    for name in ("hybrid", "diffusion"):
        flops = [r["flops_per_image"] for r in systems[name]["rows"]]
        assert flops[0] < flops[1]
    stages = result["stages"]
    for key in ("ar", "refiner", "raster", "diffusion"):
        assert Path(stages[key]["half"]).is_file(), key
        assert stages[key]["reused"] is False and stages[key]["seconds"] > 0, key
    assert set(result["seconds"]["eval"]) == {"ar", "raster", "diffusion", "hybrid", "half_budget", "side_by_side"}
    target = stages["ar"]["flops"] + stages["refiner"]["flops"]
    assert abs(stages["diffusion"]["steps"] * stages["diffusion"]["flops_per_step"] - target) \
        <= stages["diffusion"]["flops_per_step"]  # the baseline's budget matches AR + refiner to one step
    assert result["fairness"]["flops"]["within_20_percent"]
    params = result["fairness"]["params"]
    assert params["ratio"] == pytest.approx(params["diffusion"] / params["hybrid"])
    assert set(result["verdicts"]) == {"hybrid_vs_diffusion", "hybrid_vs_ar"}
    why = result["verdicts"]["hybrid_vs_diffusion"]  # the speed-up splits into FLOP ratio x FLOP/s ratio
    rate = why["gflops_per_s"]
    assert why["speedup"] == pytest.approx(why["flop_ratio"] * rate["hybrid"] / rate["diffusion"])
    # the verdicts' speed ratios come from the interleaved side-by-side timing of the operating points
    sbs = result["side_by_side"]["images_per_s"]
    assert set(sbs) == set(systems) and all(v > 0 for v in sbs.values())
    assert why["speedup"] == pytest.approx(sbs["hybrid"] / sbs["diffusion"])
    assert result["verdicts"]["hybrid_vs_ar"]["ar_over_hybrid_speed"] == pytest.approx(sbs["ar"] / sbs["hybrid"])
    # each hybrid row against pure AR's operating point, paired (the same requests and seeds), against real images
    # and against the decoded reference
    for suffix, verdict_key in (("", "paired_difference"), ("_decoded_ref", "paired_difference_decoded_ref")):
        op_pair, ar_fid = None, systems["ar"]["rows"][0][f"fid{suffix}"]
        for row in systems["hybrid"]["rows"]:
            paired = row[f"fid_vs_ar{suffix}"]
            assert paired["difference"] == pytest.approx(row[f"fid{suffix}"] - ar_fid) and paired["n"] == 64
            assert paired["ci"][0] <= paired["difference"] <= paired["ci"][1]
            if row["steps"] == systems["hybrid"]["operating_point"]:
                op_pair = paired
        assert result["verdicts"]["hybrid_vs_ar"][verdict_key] == op_pair, suffix
    report = (out_dir / "showdown.md").read_text()
    assert "paired 95% interval" in report and "| FID vs decoded real |" in report
    assert "the same pairs against the decoded real images (not part of the verdict)" in report
    for name in ("showdown.md", "fid_vs_speed.png", "fid_vs_refiner_steps.png"):
        assert (out_dir / name).is_file(), name
    assert "The debate, measured" in (out_dir / "showdown.md").read_text()
    # --retime: only the side-by-side timing again, verdicts and markdown rewritten, nothing re-judged
    (out_dir / "showdown.md").write_text("stale")
    cached = sorted((out_dir / "cache").iterdir())
    _run(["benchmarks/showdown.py", "--retime", "--run-dir", str(show_run), "--out", str(out_dir), "--device", "cpu"])
    again = json.loads((out_dir / "showdown.json").read_text())
    assert again["side_by_side"]["retimed"]["seconds"] > 0 and again["systems"] == systems
    assert again["side_by_side"]["retimed"]["machine"]["device"] == "cpu"
    assert again["verdicts"]["hybrid_vs_diffusion"]["speedup"] == pytest.approx(
        again["side_by_side"]["images_per_s"]["hybrid"] / again["side_by_side"]["images_per_s"]["diffusion"])
    assert "Speeds compared side by side" in (out_dir / "showdown.md").read_text()
    assert sorted((out_dir / "cache").iterdir()) == cached

    # --confirm-samples: the hybrid's and pure AR's operating points again on fresh prompts, each FID with its own
    # interval; everything else comes from the cache
    confirm_out = _run(["benchmarks/showdown.py", *common, "--systems", "ar", "hybrid", "--num-samples", "32",
                        "--seeds", "2", "--sweep-samples", "16", "--cfg-sweep", "1", "2", "--refiner-steps", "1", "2",
                        "--confirm-samples", "40", "--device", "cpu"])
    confirmed = json.loads((out_dir / "showdown.json").read_text())
    for before, now in zip(systems["hybrid"]["rows"], confirmed["systems"]["hybrid"]["rows"], strict=True):
        assert (now["fid"], now["fid_ci"]) == (before["fid"], before["fid_ci"])  # from the cache, unchanged
    c = confirmed["confirmation"]
    assert c["n"] == 40 and c["draw"] == 1000 and "confirmation" in confirmed["seconds"]["eval"]
    for name in ("ar", "hybrid"):
        assert c[name]["fid_ci"][0] <= c[name]["fid"] <= c[name]["fid_ci"][1]
        assert c[name]["fid"] != confirmed["systems"][name]["rows"][0]["fid"]  # other prompts, other images
    d = c["paired_difference"]
    assert d["difference"] == pytest.approx(c["hybrid"]["fid"] - c["ar"]["fid"])
    d = c["paired_difference_decoded_ref"]  # the confirmation's images against the decoded reference too
    assert d["difference"] == pytest.approx(c["hybrid"]["fid_decoded_ref"] - c["ar"]["fid_decoded_ref"])
    assert d["ci"][0] <= d["difference"] <= d["ci"][1]
    assert c["fid_better_outside_interval"] == (c["hybrid"]["fid_ci"][1] < c["ar"]["fid_ci"][0])
    verdict = confirmed["verdicts"]["hybrid_vs_ar"]
    assert verdict["confirmation_n"] == 40
    assert verdict["fid_better_outside_interval_confirmed"] == c["fid_better_outside_interval"]
    # the confirmation decides, whatever the rows' own intervals say
    assert verdict["met"] == (c["fid_better_outside_interval"] and verdict["ar_over_hybrid_speed"] <= 1.5)
    report = (out_dir / "showdown.md").read_text()
    assert "on 40 fresh prompts (--confirm-samples)" in report
    assert "the same images against the decoded real images: pure AR" in report
    assert (f"FID better outside the two intervals on 40 fresh prompts (the confirmation, which decides): "
            f"{c['fid_better_outside_interval']} (on the rows' images: {verdict['fid_better_outside_interval']})"
            in report)
    assert "confirmation on 40 fresh prompts" in confirm_out.stdout
    # --retime recomputes the verdicts after minutes of timing: what they read is checked before any timing, and
    # a damaged file is left as it was
    damaged = json.loads(json.dumps(confirmed))
    del damaged["confirmation"]["fid_better_outside_interval"]  # the markdown reads the stored verdict instead
    (out_dir / "showdown.json").write_text(json.dumps(damaged))
    bad = subprocess.run([sys.executable, "benchmarks/showdown.py", "--retime", "--run-dir", str(show_run), "--out",
                          str(out_dir), "--device", "cpu"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "cannot be re-timed" in bad.stderr and "fid_better_outside_interval" in bad.stderr
    assert "Traceback" not in bad.stderr and json.loads((out_dir / "showdown.json").read_text()) == damaged
    (out_dir / "showdown.json").write_text(json.dumps(confirmed))
    _check_the_confirmation_pass_gives_the_images_of_two(confirmed, show_run, base, tmp_path)
    _check_the_judge_s_decoded_reference(confirmed, show_run, base, tmp_path)

    # a re-run reuses the stages and the judged images: same numbers, no training; without the decoded reference
    # the real-image FIDs are bit for bit the same
    again = _run(["benchmarks/showdown.py", *common, "eval.decoded_reference=false", "--systems", "ar",
                  "--num-samples", "32", "--seeds", "2", "--sweep-samples", "16", "--cfg-sweep", "1", "2"])
    assert "exists: skipped" in again.stdout
    rerun = json.loads((out_dir / "showdown.json").read_text())
    assert rerun["stages"]["ar"]["reused"] is True
    rerun = rerun["systems"]["ar"]
    assert rerun["rows"][0]["fid"] == systems["ar"]["rows"][0]["fid"]
    assert rerun["rows"][0]["fid_ci"] == systems["ar"]["rows"][0]["fid_ci"]
    assert "fid_decoded_ref" not in rerun["rows"][0]
    report = (out_dir / "showdown.md").read_text()  # no column, no line for what was not judged
    assert "FID vs decoded real" not in report and "against the decoded real images" not in report
    # stages trained with other held-out pairs are refused, in one line
    bad = subprocess.run([sys.executable, "benchmarks/showdown.py", *common, "--systems", "ar", "--no-holdout"],
                         cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "data.holdout" in bad.stderr and "Traceback" not in bad.stderr


def test_the_showdown_refuses_samplers_no_denoiser_can_use_before_it_trains(toy_run, tmp_path):
    """A --samplers list the refiner cannot use was found by the sweep, after every stage had trained."""
    run_dir, base, _ = toy_run
    out = subprocess.run([sys.executable, "benchmarks/showdown.py", "--config", "configs/toy.yaml", "--run-dir",
                          str(tmp_path / "show"), "--out", str(tmp_path / "out"), f"cache_dir={base / 'cache'}",
                          "--systems", "ar", "hybrid", "--samplers", "euler", "--device", "cpu"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "--samplers" in out.stderr and "euler" in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "show" / "tokenizer").exists()  # nothing trained


def test_the_showdown_refuses_a_reused_stage_trained_on_a_time_limit(toy_run, tmp_path):
    """A reused stage's steps come from its checkpoint: one trained with max_steps -1 gave a negative FLOP budget."""
    show = _copy_stages(toy_run, tmp_path / "show", ("tokenizer", "ar"))
    final = show / "ar" / "final.ckpt"
    ckpt = torch.load(final, map_location="cpu", weights_only=True)
    ckpt["hyper_parameters"]["config"]["ar"]["train"].update(max_steps=-1, max_minutes=1.0)
    torch.save(ckpt, final)
    out = subprocess.run([sys.executable, "benchmarks/showdown.py", "--config", "configs/toy.yaml", "--run-dir",
                          str(show), "--out", str(tmp_path / "out"), f"cache_dir={toy_run[1] / 'cache'}", "--systems",
                          "ar", "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and f"{final} was trained on a time limit alone" in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr


def test_the_showdown_counts_every_accumulated_batch_of_a_training_step(toy_run):
    """An optimizer step of train.accumulate=k batches does k forward and backward passes: the FLOP match between
    the diffusion baseline and AR + refiner counted one."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.showdown import training_flops
    from hybrid.config import load_config

    run_dir, base, _ = toy_run

    def counted(accumulate):
        cfg = load_config("configs/toy.yaml", [f"run_dir={run_dir}", f"cache_dir={base / 'cache'}",
                                               "refiner.train.batch_size=2", "refiner.train.max_steps=3",
                                               f"refiner.train.accumulate={accumulate}"])
        return training_flops(cfg, "refiner")

    one, three = counted(1), counted(3)
    assert one["flops_per_step"] > 0 and three["accumulate"] == 3
    assert three["flops_per_step"] == 3 * one["flops_per_step"] and three["flops"] == 3 * one["flops"]


def _check_the_confirmation_pass_gives_the_images_of_two(result, show_run, base, tmp_path):
    """`Judge.sample_pair` (one AR pass for both modes) gives exactly the features that two `sample_set` calls
    (one pass per mode) give for the same requests and seeds."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.showdown import Judge, load_pipes, op_row
    from hybrid.config import load_config
    from hybrid.eval.oracle import load_oracle

    cfg = load_config("configs/toy.yaml", [f"run_dir={show_run}", f"cache_dir={base / 'cache'}"])
    oracle = load_oracle(cfg=cfg, device=torch.device("cpu"))
    pipes = load_pipes(show_run, result["stages"], torch.device("cpu"))
    settings = {name: op_row(result["systems"][name])["settings"] for name in ("ar", "hybrid")}
    settings["hybrid"] = {**settings["ar"], "steps": 2}  # the AR sampled alike: the shared pass
    one, two = (Judge(oracle, cfg, tmp_path / name, 8, 1, 10, 4) for name in ("one-pass", "two-passes"))
    shared = one.sample_pair((*pipes["ar"], settings["ar"]), (*pipes["hybrid"], settings["hybrid"]), 7, 12)
    for entry, mode in zip(shared, ("ar", "hybrid")):
        alone = two.sample_set(*pipes[mode], mode, settings[mode], 7, 12)
        assert torch.equal(entry["features"], alone["features"]) and entry["adherence"] == alone["adherence"], mode
    assert len(list((tmp_path / "one-pass" / "cache").glob("*.pt"))) == 2  # under sample_set's own keys:
    assert sorted(p.name for p in (tmp_path / "one-pass" / "cache").glob("*.pt")) == sorted(
        p.name for p in (tmp_path / "two-passes" / "cache").glob("*.pt"))  # a later sample_set call finds them


def _check_the_judge_s_decoded_reference(result, show_run, base, tmp_path):
    """`Judge`'s second reference is the oracle features of its real images through the tokenizer; more real images
    than it holds come cached, each reference in its own file, the real one under the key it had before."""
    import hashlib

    sys.path.insert(0, str(ROOT))
    from benchmarks.showdown import Judge, file_tag, load_pipes
    from hybrid.config import load_config
    from hybrid.eval.fid import oracle_features, real_images
    from hybrid.eval.oracle import load_oracle

    cfg = load_config("configs/toy.yaml", [f"run_dir={show_run}", f"cache_dir={base / 'cache'}"])
    oracle = load_oracle(cfg=cfg, device=torch.device("cpu"))
    tok = load_pipes(show_run, result["stages"], torch.device("cpu"))["ar"][0].tokenizer
    tokenizer = (tok, torch.device("cpu"), file_tag(show_run / "tokenizer" / "final.ckpt"))
    # a showdown folder from before the second reference: 24 real images' features cached under the old key
    plain = Judge(oracle, cfg, tmp_path / "refs", 8, 2, 10, 4)
    old_real, none = plain.references(24)
    assert none is None and plain.decoded is None and plain.fid([{"features": old_real[:4]}], decoded=True) is None
    meta = getattr(oracle, "meta", {})
    old_key = (f"real|24|{sorted(plain.real_kwargs.items())}|"
               f"{Path(getattr(oracle, 'path', 'oracle')).name}@{meta.get('created', '')}")
    old_file = tmp_path / "refs" / "cache" / f"{hashlib.sha1(old_key.encode()).hexdigest()[:16]}.pt"
    assert sorted((tmp_path / "refs" / "cache").glob("*.pt")) == [old_file]
    stamp = old_file.stat().st_mtime_ns
    judge = Judge(oracle, cfg, tmp_path / "refs", 8, 2, 10, 4, tokenizer)
    images = real_images(oracle, 16, **judge.real_kwargs)
    with torch.no_grad():
        through = tok.decode(tok.encode(images).z).clamp(-1, 1)
    torch.testing.assert_close(judge.real, oracle_features(images, oracle))
    torch.testing.assert_close(judge.decoded, oracle_features(through, oracle), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(judge.decoded, judge.real, atol=1e-3)  # the tokenizer changed the images
    # more than it holds: 24 real images (image i the same as before); the real ones come from the old file, which
    # is kept as it was, and only the decoded ones are computed and cached, in a file of their own
    real, decoded = judge.references(24)
    assert torch.equal(real, old_real) and old_file.stat().st_mtime_ns == stamp
    torch.testing.assert_close(real[:16], judge.real)
    torch.testing.assert_close(decoded[:16], judge.decoded, rtol=1e-4, atol=1e-5)
    new_files = sorted(set((tmp_path / "refs" / "cache").glob("*.pt")) - {old_file})
    assert len(new_files) == 1 and torch.equal(torch.load(new_files[0], weights_only=True), decoded)
    with torch.no_grad():
        later = tok.decode(tok.encode(real_images(oracle, 24, **judge.real_kwargs)[16:]).z).clamp(-1, 1)
    torch.testing.assert_close(decoded[16:], oracle_features(later, oracle), rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # the toy stages on a folder of images, then InceptionV3 at 299 px: ~2 min on 2 cores
def test_own_images_folder_to_shards_to_train_to_eval(tmp_path, random_inception_weights):
    """The README's bring-your-own-images path: folder -> shards CLI -> train.py (all stages) -> metrics.json
    -> sample.py. The procedural oracle is neither trained nor used; FID comes only from a local Inception."""
    rng = np.random.default_rng(0)
    for name, channel in (("apples", 0), ("sky", 2)):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(12):
            pixels = rng.integers(0, 80, (24, 20, 3), dtype=np.uint8)
            pixels[..., channel] += 170
            Image.fromarray(pixels).save(tmp_path / "images" / name / f"{i}.png")
    shards = tmp_path / "shards"
    for split in ("train", "val"):
        _run(["-m", "hybrid.data.shards", "write", "--source", "folder", "--folder", str(tmp_path / "images"),
              "--out", str(shards), "--image-size", "16", "--split", split])
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    common = ["train.py", "--config", "configs/toy.yaml", f"run_dir={run_dir}", f"cache_dir={cache}",
              "data.source=shards", f"data.shards={shards / 'train-*.tar'}", "data.num_classes=2",
              "eval.num_samples=16", "trainer.progress_bar=false"]
    out = _run(common)
    assert not any(cache.glob("oracle*"))  # no procedural oracle trained
    assert "FID not measured" in out.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["judge"]["fid_features"] == "none" and metrics["judge"]["n"] == 16
    assert "val-" in metrics["judge"]["real_images"]  # the sibling validation shards, not the training ones
    assert np.isfinite(metrics["tokenizer"]["psnr_continuous"]) and metrics["tokenizer"]["fid"] is None
    for mode in ("ar", "hybrid"):
        entry = metrics[mode]
        assert entry["fid"] is None and entry["adherence"] is None
        assert entry["images_per_s"] > 0 and entry["ms_per_image_b1"] > 0 and entry["params"]["ar"] > 0
        assert (run_dir / "eval" / f"{mode}-class.png").is_file()

    out = _run(common + ["stage=eval", f"eval.inception_weights={random_inception_weights}", "eval.num_samples=40"])
    assert "the first 24 readable samples" in out.stdout and "all there are; eval.num_samples is 40" in out.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["judge"]["fid_features"] == "inception" and metrics["judge"]["n"] == 24
    for mode in ("tokenizer", "ar", "hybrid"):
        assert np.isfinite(metrics[mode]["fid"]) and metrics[mode]["fid_judge"] == "inception", mode

    sample = _run(["sample.py", "--run", str(run_dir), "--class", "1", "-n", "2", "--out", str(tmp_path / "s")])
    assert "images/s" in sample.stdout
    bad = subprocess.run([sys.executable, "sample.py", "--run", str(run_dir), "--class", "2", "--out",
                          str(tmp_path / "s2")], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "class id 2" in bad.stderr


def test_the_python_api_takes_one_prompt_or_one_class_as_one_request(toy_run, tmp_path):
    """pipe(prompts='red') made one image per character; pipe(classes=3) raised a TypeError."""
    from hybrid.pipeline import HybridPipeline

    pipe = HybridPipeline.from_run(toy_run[0])
    assert torch.equal(pipe(classes=3, mode="ar", seed=1), pipe(classes=[3], mode="ar", seed=1))
    assert torch.equal(pipe(classes=torch.tensor(3), mode="ar", seed=1), pipe(classes=[3], mode="ar", seed=1))
    from hybrid.pipeline import _as_prompts

    assert _as_prompts("a red circle") == ["a red circle"] and _as_prompts(["a", "b"]) == ["a", "b"]
    (tmp_path / "a-file").write_text("kept")
    out = subprocess.run([sys.executable, "sample.py", "--run", str(toy_run[0]), "--class", "1", "--out",
                          str(tmp_path / "a-file")], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and "is a file" in out.stderr and "Traceback" not in out.stderr, out.stderr[-1500:]
    assert (tmp_path / "a-file").read_text() == "kept"


def test_python_api_requests_and_devices_that_cannot_be_served_are_one_line_errors(toy_run, monkeypatch):
    """Each of these used to end in a TypeError/AttributeError/RuntimeError from deep inside, or (a float id,
    a prompt to a class-conditioned diffusion baseline) to generate something other than what was asked."""
    import numpy as np

    from hybrid.pipeline import HybridPipeline, PipelineError

    pipe = HybridPipeline.from_run(toy_run[0], device="auto")  # auto: CUDA where there is one, as --device
    assert pipe.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert torch.equal(pipe(classes=np.int64(3), mode="ar", seed=1), pipe(classes=[3], mode="ar", seed=1))
    assert torch.equal(pipe(classes=(c for c in [3, 1]), mode="ar"), pipe(classes=np.array([3, 1]), mode="ar"))
    for request, needle in (({"classes": []}, "no class ids"), ({"prompts": []}, "no prompts"),
                            ({"classes": torch.tensor([3.7])}, "integers"), ({"classes": [[1, 2]]}, r"shape \(1, 2\)"),
                            ({"classes": "3"}, "the string '3'"), ({"prompts": [3]}, "must be strings, got 3"),
                            ({"classes": [1], "seed": 10**20}, "seed 100000000000000000000")):
        with pytest.raises(PipelineError, match=needle):
            pipe(mode="ar", **request)
    # a class-conditioned diffusion baseline refuses prompts as the AR does (it gave unconditional images)
    pipe.diffusion, pipe.diffusion_diffusion = pipe.refiner, pipe.refiner_diffusion  # a stand-in class denoiser
    pipe.parsed["diffusion"] = pipe.parsed["refiner"]
    assert pipe.diffusion.condition == "class"
    with pytest.raises(PipelineError, match=r"diffusion baseline is class-conditioned .*pass class ids"):
        pipe(prompts=["a red circle"], mode="diffusion")
    # a mode names the stages it lacks (a run without an AR: not "needs a refiner", which it has)
    pipe.ar = None
    with pytest.raises(PipelineError, match=r"needs an AR stage \(python train.py --config .*config.yaml stage=ar\)"):
        pipe(classes=[1], mode="hybrid")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(PipelineError, match="device cuda: CUDA is not available"):
        HybridPipeline.from_run(toy_run[0], device="cuda")


def test_sample_cli_file_errors_are_one_line_and_found_before_generating(toy_run, tmp_path):
    run_dir = toy_run[0]
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "latin1.txt").write_bytes("a red circle\ncaf\xe9\n".encode("latin-1"))
    (tmp_path / "bom.txt").write_text("\ufeffa red circle\n", encoding="utf-8")

    def sample(*args):
        return subprocess.run([sys.executable, "sample.py", "--run", str(run_dir), *args], cwd=ROOT,
                              capture_output=True, text=True)

    for args, needle in ((["--class", "1", "--out", str(tmp_path / "a-file" / "sub")], "cannot create --out"),
                         (["--class", "1", "--write-export", str(tmp_path / "a-file" / "x"), "--out",
                           str(tmp_path / "o")], "cannot export to"),
                         (["--prompts-file", str(tmp_path)], "is a folder"),
                         (["--prompts-file", str(tmp_path / "latin1.txt")], "is not UTF-8 text (byte 0xe9"),
                         (["--class", "1", "--seed", str(10**25)], "seed 1000")):
        out = sample(*args)
        assert out.returncode == 2 and needle in out.stderr, (args, out.stderr[-2000:])
        assert out.stderr.strip().count("\n") == 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
    from hybrid.sample_cli import _requests, parse_args

    _, prompts = _requests(parse_args(["--run", "x", "--prompts-file", str(tmp_path / "bom.txt"), "-n", "1"]))
    assert prompts == ["a red circle"]  # not "\ufeffa red circle"
    out = sample("--class", "999", "--out", str(tmp_path / "new"))  # a failed command leaves no folder behind
    assert out.returncode == 2 and not (tmp_path / "new").exists(), out.stderr
    out = sample("--class", "1", "-n", "2", "--no-grid", "--no-individual", "--out", str(tmp_path / "none"))
    assert out.returncode == 0 and "nothing written" in out.stdout and not (tmp_path / "none").exists()


def test_sample_cli_refuses_to_mix_two_runs_images_in_one_out(toy_run, tmp_path):
    """A second, smaller run into the same --out left the first run's 0002.png.. beside the new grid.png (and
    --no-grid kept a stale grid), silently. Now it is refused; --overwrite replaces only the earlier images."""
    run_dir = toy_run[0]
    out_dir = tmp_path / "samples"

    def sample(*args):
        return subprocess.run([sys.executable, "sample.py", "--run", str(run_dir), "--mode", "ar", "--out",
                               str(out_dir), *args], cwd=ROOT, capture_output=True, text=True)

    first = sample("--class", "3", "-n", "3")
    assert first.returncode == 0, first.stderr[-2000:]
    (out_dir / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in out_dir.iterdir()}
    refused = sample("--class", "5", "-n", "2", "--no-grid")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
    assert "already holds 4 image file(s) of an earlier run (0000.png, 0001.png, 0002.png, ...)" in refused.stderr
    assert "--overwrite" in refused.stderr and refused.stderr.strip().count("\n") == 0
    assert {p.name: p.read_bytes() for p in out_dir.iterdir()} == before  # nothing already written is lost
    replaced = sample("--class", "5", "-n", "2", "--no-grid", "--overwrite")
    assert replaced.returncode == 0, replaced.stderr[-2000:]
    assert sorted(p.name for p in out_dir.iterdir()) == ["0000.png", "0001.png", "notes.txt"]
    assert (out_dir / "notes.txt").read_text() == "mine"  # not an image of an earlier run: kept
    assert (out_dir / "0000.png").read_bytes() != before["0000.png"]  # class 5 now, not class 3


def test_sample_cli_keeps_the_earlier_images_when_writing_the_new_ones_fails(toy_run, tmp_path, monkeypatch, capsys):
    """--overwrite deleted the earlier images first; a full disk then lost them, with a bare OSError traceback and
    a stray 0011.png.tmp.png beside 11 new images."""
    import errno

    import hybrid.images
    from hybrid.sample_cli import main

    out_dir = tmp_path / "samples"
    base = ["--run", str(toy_run[0]), "--mode", "ar", "--out", str(out_dir), "-n", "3"]
    assert main([*base, "--class", "3"]) == 0
    before = {p.name: p.read_bytes() for p in out_dir.iterdir()}
    assert sorted(before) == ["0000.png", "0001.png", "0002.png", "grid.png"]
    real_save = hybrid.images.Image.Image.save
    calls = []

    def disk_full_at_the_second_image(self, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) == 2:
            Path(fp).write_bytes(b"half")  # what a full disk leaves
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(hybrid.images.Image.Image, "save", disk_full_at_the_second_image)
    capsys.readouterr()
    assert main([*base, "--class", "5", "--overwrite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: cannot write the images to --out {out_dir}: No space left on device; the earlier images "
                   f"there are kept"], err
    assert {p.name: p.read_bytes() for p in out_dir.iterdir()} == before  # no stray file, nothing lost
    calls.clear()
    assert main([*base, "--class", "5", "--overwrite", "--out", str(tmp_path / "new" / "deeper")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: cannot write the images to --out {tmp_path / 'new' / 'deeper'}: No space left on device"]
    assert not (tmp_path / "new").exists()  # the folders this command made are not left behind
    monkeypatch.setattr(hybrid.images.Image.Image, "save", real_save)
    assert main([*base, "--class", "5", "--overwrite", "-n", "2", "--no-grid"]) == 0  # still replaces them
    assert sorted(p.name for p in out_dir.iterdir()) == ["0000.png", "0001.png"]
    assert (out_dir / "0000.png").read_bytes() != before["0000.png"]


def test_the_request_is_checked_before_the_export_is_written_or_the_ar_runs(toy_run, tmp_path, monkeypatch):
    """--write-export wrote its folder before the class id was checked (the command then failed with exit 2);
    a sampler the refiner cannot use was found only after the first batch's AR tokens had been drawn."""
    from hybrid.pipeline import HybridPipeline, PipelineError

    run_dir = toy_run[0]
    out = subprocess.run([sys.executable, "sample.py", "--run", str(run_dir), "--class", "999", "--write-export",
                          str(tmp_path / "export"), "--out", str(tmp_path / "out")], cwd=ROOT, capture_output=True,
                         text=True)
    assert out.returncode == 2 and "class id 999" in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "export").exists() and not (tmp_path / "out").exists()
    pipe = HybridPipeline.from_run(run_dir)

    def no_ar(*_, **__):
        raise AssertionError("the AR ran before the sampler was checked")

    monkeypatch.setattr(pipe.ar, "generate", no_ar)
    objective = pipe.refiner_diffusion.objective
    for call in (lambda: pipe(classes=[1], sampler="bogus"), lambda: pipe.ar_and_hybrid(classes=[1], sampler="bogus"),
                 lambda: pipe.check_request(classes=[1], sampler="bogus")):
        with pytest.raises(PipelineError, match=f"sampler 'bogus' does not sample this refiner "
                                                f"\\(refiner.objective={objective}\\)"):
            call()
    assert pipe.check_request(classes=[1, 2], mode="ar", sampler="bogus") == 2  # ar mode runs no sampler
    # more steps than the refiner's training timesteps: diffusers' own error (naming no flag) after the export was
    # written (ddim), or repeated timesteps (dpm)
    most = pipe.refiner_diffusion.num_train_timesteps
    out = subprocess.run([sys.executable, "sample.py", "--run", str(run_dir), "--class", "1", "--steps", str(most + 1),
                          "--write-export", str(tmp_path / "export"), "--out", str(tmp_path / "out")], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 2 and f"steps={most + 1}: this refiner was trained with {most} timesteps" in out.stderr
    assert not (tmp_path / "export").exists() and not (tmp_path / "out").exists()
    for call in (lambda: pipe(classes=[1], steps=most + 1), lambda: pipe.ar_and_hybrid(classes=[1], steps=most + 1)):
        with pytest.raises(PipelineError, match=f"at most {most} steps"):
            call()
    pipe.parsed["refiner"].refiner.steps = most + 1  # the default step count (an old or edited config) too
    with pytest.raises(PipelineError, match=f"steps={most + 1}: this refiner"):
        pipe.check_request(classes=[1])
    if objective == "flow":  # the flow Euler sampler's sigmas are continuous: no limit
        pipe.check_request(classes=[1], steps=most + 1, sampler="euler")


def test_class_ids_are_checked_against_the_stages_that_take_them(toy_run):
    """The class range came from the tokenizer's config. An AR trained after data.num_classes grew (the tokenizer
    reused) had its new classes refused; one trained with fewer classes took an id at or past its null class:
    unconditional images, or an IndexError from the embedding table."""
    import copy

    from hybrid.models import build_ar, num_classes
    from hybrid.pipeline import HybridPipeline, PipelineError

    pipe = HybridPipeline.from_run(toy_run[0])
    tokenizer_classes = num_classes(pipe.parsed["tokenizer"])

    def with_ar_classes(n: int) -> HybridPipeline:
        configs = copy.deepcopy(pipe.configs)
        configs["ar"]["data"]["num_classes"] = n
        return HybridPipeline(pipe.tokenizer, configs, ar=build_ar(configs["ar"], pipe.tokenizer),
                              refiner=pipe.refiner)

    more = with_ar_classes(tokenizer_classes + 8)
    images = more(classes=[tokenizer_classes + 3], mode="ar", seed=0)  # a class only the AR knows
    assert images.shape[0] == 1 and torch.isfinite(images).all()
    with pytest.raises(PipelineError, match=f"class id {tokenizer_classes + 8} is unknown; this model has "
                                            f"classes 0..{tokenizer_classes + 7}"):
        more(classes=[tokenizer_classes + 8], mode="ar")
    fewer = with_ar_classes(5)
    for mode, why in (("ar", ""), ("hybrid", " \\(the ar stage's\\)" if pipe.refiner.condition != "none" else "")):
        for bad in (5, 6):  # 5 is the AR's null class (unconditional images), 6 was an IndexError
            with pytest.raises(PipelineError, match=f"class id {bad} is unknown; this model has classes 0..4{why}$"):
                fewer(classes=[bad], mode=mode)


def test_an_unconditional_diffusion_baseline_says_it_ignores_the_request(toy_run, tmp_path):
    """With diffusion.condition=none, --class 3 and --class 5 gave the same images without a word."""
    run_dir, base, _ = toy_run
    dest = _copy_stages(toy_run, tmp_path / "run", ["tokenizer"])
    _run(["train.py", "--config", "configs/toy.yaml", f"run_dir={dest}", f"cache_dir={base / 'cache'}",
          "stage=diffusion", "diffusion.condition=none", "diffusion.train.max_steps=2", "trainer.progress_bar=false"])
    grids = []
    for class_id in ("3", "5"):
        out = _run(["sample.py", "--run", str(dest), "--mode", "diffusion", "--class", class_id, "-n", "2",
                    "--steps", "1", "--out", str(tmp_path / f"out-{class_id}")])
        assert "note: the diffusion model takes no condition (diffusion.condition=none)" in out.stderr, out.stderr
        grids.append((tmp_path / f"out-{class_id}" / "grid.png").read_bytes())
    assert grids[0] == grids[1]  # what the note says: the class changes nothing
    conditioned = _run(["sample.py", "--run", str(run_dir), "--mode", "ar", "--class", "3", "-n", "1",
                        "--out", str(tmp_path / "out-ar")])
    assert "takes no condition" not in conditioned.stderr


def test_the_streamed_evaluation_judges_the_images_it_would_have_kept(toy_run, tmp_path):
    """`evaluate_run` judges each batch as it is generated (or reconstructed) and keeps only features and
    predictions (a 335,000-prompt evaluation held 23 GB of images otherwise). Its numbers must be those of all
    images at once, made here without the evaluation's own batching code: FID against `num_real` real images
    (more than the generated ones here), adherence, the paired difference, the tokenizer's FID and PSNR."""
    from hybrid.config import load_config
    from hybrid.data.procedural import ProceduralDataset
    from hybrid.eval.adherence import adherence
    from hybrid.eval.evaluate import class_request_attrs, evaluate_run, generation_seed, make_requests, request_seed
    from hybrid.eval.fid import bootstrap_fid, oracle_features, paired_fid_difference, real_images
    from hybrid.eval.oracle import load_oracle
    from hybrid.pipeline import HybridPipeline

    run_dir, base, _ = toy_run
    cfg = load_config("configs/toy.yaml", [f"run_dir={run_dir}", f"cache_dir={base / 'cache'}"])
    oracle = load_oracle(cfg=cfg, device=torch.device("cpu")).eval()
    pipe = HybridPipeline.from_run(run_dir)
    kept = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 30 samples: the singular-covariance warning
        metrics = evaluate_run(tmp_path / "run", oracle, num_samples=30, num_real=70, batch_size=8, bootstrap=4,
                               modes=("tokenizer", "ar", "hybrid"), timing=False, pipe=pipe, keep_features=kept)
    real = oracle_features(real_images(oracle, 70), oracle)
    torch.testing.assert_close(kept["real"], real)
    # the reference: every image at once, each batch of 8 asked of the pipeline directly
    classes = make_requests(30, seed=request_seed(0))
    images = {mode: torch.cat([pipe(classes=classes["classes"][start:start + 8], mode=mode,
                                    seed=generation_seed(0, start), batch_size=8) for start in range(0, 30, 8)])
              for mode in ("ar", "hybrid")}
    for mode in ("ar", "hybrid"):
        entry = metrics[mode]
        feats = oracle_features(images[mode], oracle)
        torch.testing.assert_close(kept[mode], feats, rtol=1e-4, atol=1e-5)  # float32 features, other batches
        reference = bootstrap_fid(feats, real, 4)
        assert entry["fid_n"] == 30 and entry["fid_n_real"] == 70, mode
        assert entry["fid"] == pytest.approx(reference["fid"], rel=1e-4), mode
        assert entry["fid_ci"] == pytest.approx(reference["ci"], rel=1e-4), mode
        assert entry["adherence"]["class"] == adherence(images[mode], class_request_attrs(classes["attrs"]), oracle)
        assert (tmp_path / "run" / "eval" / f"{mode}-class.png").is_file()
    paired = paired_fid_difference(kept["hybrid"], kept["ar"], real, 4)
    assert metrics["hybrid"]["fid_vs_ar"]["difference"] == pytest.approx(paired["difference"], rel=1e-4, abs=1e-4)
    # the tokenizer's reconstructions of the 30 held-out images, all at once
    data = ProceduralDataset(image_size=pipe.tokenizer.image_size, size=30, seed=1, split="val")
    held_out = torch.stack([data[i]["image"] for i in range(30)])
    with torch.no_grad():
        enc = pipe.tokenizer.encode(held_out)
        recon = {"continuous": pipe.tokenizer.decode(enc.z).clamp(-1, 1),
                 "discrete": pipe.tokenizer.decode(enc.z_q).clamp(-1, 1)}
    tok = metrics["tokenizer"]
    for kind, key in (("continuous", "fid"), ("discrete", "fid_discrete")):
        assert tok[key] == pytest.approx(bootstrap_fid(oracle_features(recon[kind], oracle), real, 4)["fid"],
                                         rel=1e-4), kind
        mse = (recon[kind] - held_out).pow(2).flatten(1).mean(1)
        assert tok[f"psnr_{kind}"] == pytest.approx(float((10 * torch.log10(4.0 / mse)).mean()), rel=1e-4), kind
    assert tok["fid_n"] == 30 and tok["fid_n_real"] == 70
    assert (tmp_path / "run" / "eval" / "tokenizer.png").is_file()
    # the second reference: the same 70 real images through the tokenizer, all at once
    with torch.no_grad():
        decoded = pipe.tokenizer.decode(pipe.tokenizer.encode(real_images(oracle, 70)).z).clamp(-1, 1)
    decoded = oracle_features(decoded, oracle)
    torch.testing.assert_close(kept["real_decoded"], decoded, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(decoded, real, atol=1e-3)  # the tokenizer changed the images
    for mode in ("ar", "hybrid"):
        reference = bootstrap_fid(kept[mode], decoded, 4)
        assert metrics[mode]["fid_decoded_ref"] == pytest.approx(reference["fid"], rel=1e-4), mode
        assert metrics[mode]["fid_decoded_ref_ci"] == pytest.approx(reference["ci"], rel=1e-4), mode
        assert metrics[mode]["fid_decoded_ref"] != pytest.approx(metrics[mode]["fid"], rel=1e-3), mode
    paired = paired_fid_difference(kept["hybrid"], kept["ar"], decoded, 4)
    assert metrics["hybrid"]["fid_vs_ar_decoded_ref"]["difference"] == pytest.approx(paired["difference"], rel=1e-4,
                                                                                      abs=1e-4)
    assert metrics["hybrid"]["fid_vs_ar_decoded_ref"]["ci"] == pytest.approx(paired["ci"], rel=1e-4, abs=1e-4)
    for kind, key in (("continuous", "fid_decoded_ref"), ("discrete", "fid_discrete_decoded_ref")):
        assert tok[key] == pytest.approx(bootstrap_fid(oracle_features(recon[kind], oracle), decoded, 4)["fid"],
                                         rel=1e-4), kind
    # eval.decoded_reference=false: none of it, and the real-image FIDs bit for bit the same
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = evaluate_run(tmp_path / "plain", oracle, num_samples=30, num_real=70, batch_size=8, bootstrap=4,
                             modes=("ar", "hybrid"), timing=False, pipe=pipe, decoded_reference=False)
    for mode in ("ar", "hybrid"):
        assert "fid_decoded_ref" not in plain[mode] and plain[mode]["fid"] == metrics[mode]["fid"], mode
    assert "fid_vs_ar_decoded_ref" not in plain["hybrid"]


def test_a_singular_covariance_warning_says_which_set_is_too_small():
    from hybrid.eval.evaluate import _warn_if_singular

    with pytest.warns(UserWarning, match="the real images' covariance is singular"):
        _warn_if_singular(3000, 100, 128, "the oracle's features")
    with pytest.warns(UserWarning, match="the generated images' covariance is singular"):
        _warn_if_singular(100, 3000, 128, "the oracle's features")
    with pytest.warns(UserWarning, match="both covariances are singular"):
        _warn_if_singular(100, 100, 128, "the oracle's features")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_if_singular(3000, 3000, 128, "the oracle's features")


def test_requests_are_drawn_with_the_data_glyph_prob_of_the_real_images(toy_run, tmp_path, monkeypatch):
    """The real images followed data.glyph_prob while the class requests always used 0.2: with any other value
    the generated set asked for other shapes than the real set shows, and FID counted that against the model.
    The evaluation and the showdown's judge now draw both alike; the default draws the requests of before."""
    import warnings

    sys.path.insert(0, str(ROOT))
    import hybrid.eval.evaluate as evaluate
    from benchmarks.showdown import Judge
    from hybrid.config import load_config
    from hybrid.data.attributes import SHAPES
    from hybrid.eval.oracle import load_oracle
    from hybrid.pipeline import HybridPipeline

    run_dir, base, _ = toy_run
    asked = []

    def spy(n, *args, **kwargs):
        requests = make(n, *args, **kwargs)
        asked.append(requests)
        return requests

    make = evaluate.make_requests
    monkeypatch.setattr(evaluate, "make_requests", spy)
    cfg = load_config("configs/toy.yaml", [f"run_dir={run_dir}", f"cache_dir={base / 'cache'}"])
    oracle = load_oracle(cfg=cfg, device=torch.device("cpu"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        evaluate.evaluate_run(tmp_path / "run", oracle, num_samples=40, batch_size=20, bootstrap=5, modes=("ar",),
                              timing=False, pipe=HybridPipeline.from_run(run_dir), real_kwargs={"glyph_prob": 1.0})
    glyph = SHAPES.index("glyph")
    assert (asked[0]["attrs"]["shape"] == glyph).all()  # the class requests: glyphs only, as the real images
    assert "FID from 40 samples against 40 real ones in the oracle's features" in " ".join(str(w.message)
                                                                                          for w in caught)
    default = make(40, seed=evaluate.request_seed(0))
    assert not (default["attrs"]["shape"] == glyph).all()
    monkeypatch.setattr(evaluate, "make_requests", make)
    judges = {p: Judge(oracle, load_config("configs/toy.yaml", [f"run_dir={run_dir}", f"data.glyph_prob={p}"]),
                       tmp_path / f"judge-{p}", 40, 1, 5, 20) for p in (0.2, 1.0)}
    assert torch.equal(judges[0.2].requests[0]["classes"], default["classes"])  # the default: the old requests
    assert (judges[1.0].requests[0]["attrs"]["shape"] == glyph).all()
    pipe = HybridPipeline.from_run(run_dir)
    keys = {p: j._cache_path(pipe, "t", "ar", {}, 0, 40, "class") for p, j in judges.items()}
    assert keys[0.2].name != keys[1.0].name  # a cached set of the default's requests is not reused for others


def test_a_text_model_asked_for_a_class_gets_its_captions_grammar():
    from hybrid.data.attributes import COLORS, SHAPES, class_id
    from hybrid.pipeline import class_prompt

    assert class_prompt(class_id(SHAPES.index("circle"), COLORS.index("red"))) == "a red circle"
    assert class_prompt(class_id(SHAPES.index("circle"), COLORS.index("orange"))) == "an orange circle"


def test_threads_benchmark_times_generation_per_setting_in_fresh_processes(toy_run, tmp_path):
    """`benchmarks.threads --run-dir`: each setting generates in its own process (its environment reaches that
    process's OpenMP), rounds interleaved; a run without an AR is refused in one line before anything runs."""
    out_json = tmp_path / "threads.json"
    out = _run(["-m", "benchmarks.threads", "--steps", "1", "--settings", "one", "spin10k", "--run-dir",
                str(toy_run[0]), "--rounds", "2", "--reps", "1", "--out", str(out_json)])
    gen = json.loads(out_json.read_text())["generation"]
    assert set(gen) == {"one", "spin10k"}
    assert gen["one"]["threads"] == 1  # OMP_NUM_THREADS=1 reached that process
    # what OpenMP read as torch loaded: no spin count of hybrid's in a row that is not asked for one
    assert gen["one"]["gomp_spincount"] == "unset" and gen["spin10k"]["gomp_spincount"] == "10000"
    for name, row in gen.items():
        assert row["mode"] == "hybrid" and len(row["rounds"]) == 2  # the toy run has a refiner
        assert row["ms_per_image_b1"] == pytest.approx(sorted(r["ms_per_image_b1"] for r in row["rounds"])[0] / 2
                                                       + sorted(r["ms_per_image_b1"] for r in row["rounds"])[1] / 2)
        assert row["images_per_s_b16"] > 0
        assert f"{name:8s} generation (hybrid, cfg 4)" in out.stdout
    no_ar = _copy_stages(toy_run, tmp_path / "no-ar", ("tokenizer",))
    bad = subprocess.run([sys.executable, "-m", "benchmarks.threads", "--settings", "one", "--run-dir", str(no_ar)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "ar/final.ckpt is missing" in bad.stderr and "Traceback" not in bad.stderr
