"""The main job end to end on the toy config: train.py (all stages) -> metrics.json -> sample.py -> export."""

import json
import subprocess
import sys
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


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("e2e")
    run_dir = base / "run"
    out = _run(["train.py", "--config", "configs/toy.yaml", f"run_dir={run_dir}", f"cache_dir={base / 'cache'}",
                "trainer.progress_bar=false"])
    return run_dir, base, out.stdout


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
    assert "sample.py" in stdout  # the summary says how to sample


def test_rerun_skips_finished_stages(toy_run):
    run_dir, base, _ = toy_run
    out = _run(["train.py", "--config", "configs/toy.yaml", f"run_dir={run_dir}", f"cache_dir={base / 'cache'}",
                "stage=ar", "trainer.progress_bar=false"])
    assert "skipped" in out.stdout


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


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--class", "999"], "class id 999"),
        (["--prompt", ""], "empty"),
        (["--mode", "diffusion", "--class", "1"], "mode 'diffusion'"),
    ],
)
def test_sample_cli_errors_are_one_line(toy_run, args, needle):
    run_dir, base, _ = toy_run
    out = subprocess.run([sys.executable, "sample.py", "--run", str(run_dir), *args, "--out", str(base / "x")],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2
    assert needle in out.stderr and out.stderr.strip().count("\n") == 0, out.stderr


def test_sample_cli_missing_stage_is_a_clear_error(tmp_path):
    (tmp_path / "run").mkdir()
    out = subprocess.run([sys.executable, "sample.py", "--run", str(tmp_path / "run"), "--class", "1"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and "tokenizer" in out.stderr and "Traceback" not in out.stderr
