"""Config: YAML + overrides, typed validation, one-line errors that name the key."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hybrid.config import ConfigError, from_dict, load_config, suggested_scales, to_dict


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("name: exp\nar:\n  width: 64\n")
    cfg = load_config(path, ["ar.depth=3", "data.holdout=[red:circle]"])
    assert cfg.name == "exp" and cfg.ar.width == 64 and cfg.ar.depth == 3
    assert list(cfg.data.holdout) == ["red:circle"]
    assert cfg.run_dir == "runs/exp"


@pytest.mark.parametrize(
    "override, needle",
    [
        ("ar.widht=3", "ar.width"),
        ("tokenizer.lr=3", "tokenizer.train"),
        ("ar.width=wide", "ar.width"),
        ("ar.order=spiral", "next_scale"),
        ("refiner.sampler=euler", "refiner.sampler"),
        ("data.image_size=8", "data.image_size"),
        ("tokenizer.pretrained=/nonexistent/vae", "tokenizer.pretrained"),
        ("refiner.corrupt_prob=1.5", "refiner.corrupt_prob"),
        ("novalue", "key=value"),
        ("tokenizer.scales=[1,2,16]", "tokenizer.scales' must not exceed the latent size 8"),
        ("tokenizer.scales=[1,3,2]", "tokenizer.scales"),
    ],
)
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    message = str(info.value)
    assert needle in message and "\n" not in message


def test_token_grids_coarser_than_the_latent_need_coarse_grid():
    with pytest.raises(ConfigError, match="set tokenizer.coarse_grid=true"):  # e.g. a new image size, old scales
        load_config(None, ["data.image_size=64"])
    cfg = load_config(None, ["tokenizer.scales=[1,2,3,4,6]", "tokenizer.coarse_grid=true"])
    assert list(cfg.tokenizer.scales) == [1, 2, 3, 4, 6]


@pytest.mark.parametrize("image_size, downsample", [(64, 4), (48, 4), (128, 8), (16, 4)])
def test_scale_errors_suggest_scales_that_validate(image_size, downsample):
    """A new image size with the old scales: the error names a scales list, and that list loads as given."""
    sizes = [f"data.image_size={image_size}", f"tokenizer.downsample={downsample}"]
    with pytest.raises(ConfigError) as info:
        load_config(None, sizes)
    suggestion = str(info.value).split('e.g. "', 1)[1].split('"', 1)[0]
    cfg = load_config(None, [*sizes, suggestion])
    latent = image_size // downsample
    assert cfg.tokenizer.scales[-1] == latent and cfg.tokenizer.scales[0] == 1
    assert suggested_scales(8) == [1, 2, 3, 4, 6, 8]  # the default's pattern


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent.yaml")


def test_round_trip_through_plain_dict_and_weights_only_load(tmp_path):
    cfg = load_config(None, ["ar.width=48"])
    plain = to_dict(cfg)
    torch.save({"config": plain}, tmp_path / "c.pt")
    loaded = torch.load(tmp_path / "c.pt", weights_only=True)["config"]
    assert from_dict(loaded).ar.width == 48
    loaded["removed_key"] = 1  # keys an older schema had are dropped, not fatal
    assert from_dict(loaded).ar.width == 48


def test_cli_error_is_one_line_and_nonzero():
    out = subprocess.run([sys.executable, "train.py", "ar.widht=3"], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "ar.width" in out.stderr
    assert "Traceback" not in out.stderr


def test_cli_help_and_print_config():
    out = subprocess.run([sys.executable, "train.py", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "tokenizer:" in out.stdout and "refiner:" in out.stdout
    out = subprocess.run([sys.executable, "train.py", "--print-config", "ar.depth=3"], capture_output=True, text=True)
    assert out.returncode == 0 and "depth: 3" in out.stdout


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_validates_and_names_its_run_after_its_file(path):
    cfg = load_config(path)  # validated: a key the schema lacks or a bad value raises ConfigError
    assert cfg.name == path.stem  # runs/<name>: two configs never share a run directory by default
