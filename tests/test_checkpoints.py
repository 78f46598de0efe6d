"""Checkpoint loading never runs code from the file, and names what is wrong."""

import os
import pickle

import pytest
import torch

from hybrid.checkpoints import (
    CheckpointError,
    atomic_torch_save,
    init_weights,
    load_checkpoint,
    weights_hash,
)


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['EXPLOIT_MARKER']}",))


def test_crafted_pickle_is_refused_without_running(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("EXPLOIT_MARKER", str(marker))
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {}, "payload": _Exploit()}, f)
    torch.save({"state_dict": {}, "payload": _Exploit()}, tmp_path / "evil2.ckpt")
    for p in (path, tmp_path / "evil2.ckpt"):
        with pytest.raises(CheckpointError, match="refused|not a checkpoint"):
            load_checkpoint(p)
    assert not marker.exists()


def _fake_ckpt(stage="ar", **extra):
    hparams = {"config": {"name": "x"}, "stage": stage, **extra}
    return {"state_dict": {"model.w": torch.ones(2)}, "hyper_parameters": hparams}


def test_wrong_stage_and_non_checkpoints_are_clear_errors(tmp_path):
    torch.save(_fake_ckpt("ar"), tmp_path / "ar.ckpt")
    with pytest.raises(CheckpointError, match="'ar' checkpoint.*'tokenizer'"):
        load_checkpoint(tmp_path / "ar.ckpt", expect_stage="tokenizer")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="notes.txt' is not a checkpoint: it is text"):  # was "pop from empty
        load_checkpoint(tmp_path / "notes.txt")  # list", or torch's advice to load it with weights_only=False
    (tmp_path / "bom.yaml").write_bytes("\ufeffrun_dir: x\n".encode())  # a byte-order mark is still text
    with pytest.raises(CheckpointError, match="bom.yaml' is not a checkpoint: it is text"):
        load_checkpoint(tmp_path / "bom.yaml")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.ckpt' is not a checkpoint: it is empty"):
        load_checkpoint(tmp_path / "empty.ckpt")
    torch.save({"weights": torch.ones(1)}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="no 'state_dict'"):
        load_checkpoint(tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.ckpt")
    (tmp_path / "a_folder").mkdir()
    with pytest.raises(CheckpointError, match="a_folder' is a folder, not a file"):  # was "does not exist"
        load_checkpoint(tmp_path / "a_folder")
    good = load_checkpoint(tmp_path / "ar.ckpt", expect_stage="ar")
    assert torch.equal(good["state_dict"]["model.w"], torch.ones(2))


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    torch.save(_fake_ckpt(), tmp_path / "full.ckpt")
    data = (tmp_path / "full.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut.ckpt' is not a checkpoint \(or is truncated\)"):
        load_checkpoint(tmp_path / "cut.ckpt")


def test_weights_hash_tracks_values():
    a = {"w": torch.ones(3), "b": torch.zeros(1)}
    b = {"b": torch.zeros(1), "w": torch.ones(3)}
    c = {"w": torch.ones(3) * 2, "b": torch.zeros(1)}
    assert weights_hash(a) == weights_hash(b) != weights_hash(c)
    counter = {"w": torch.ones(3), "n": torch.tensor(5)}  # 0-dim buffers (e.g. the quantizer's update count)
    assert weights_hash(counter) != weights_hash({**counter, "n": torch.tensor(6)})


def test_init_weights_strict_and_lenient(tmp_path):
    module = torch.nn.Module()
    module.model = torch.nn.Linear(2, 2)
    ckpt = _fake_ckpt("ar")
    ckpt["state_dict"] = {
        "model.weight": torch.full((2, 2), 3.0),
        "model.bias": torch.zeros(3),
        "extra.x": torch.ones(1),
    }
    torch.save(ckpt, tmp_path / "src.ckpt")
    with pytest.raises(CheckpointError) as info:
        init_weights(module, tmp_path / "src.ckpt", "ar", strict=True)
    assert "model.bias" in str(info.value) and "extra.x" in str(info.value) and "init_strict=false" in str(info.value)
    skipped = init_weights(module, tmp_path / "src.ckpt", "ar", strict=False)
    assert torch.equal(module.model.weight, torch.full((2, 2), 3.0)) and len(skipped) == 2


def test_atomic_save_leaves_no_temporary(tmp_path):
    atomic_torch_save({"a": torch.ones(1)}, tmp_path / "x.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.pt"]


def test_a_folder_given_for_a_file_or_a_file_for_a_folder_is_named_as_such(tmp_path):
    """These were all reported as missing ("does not exist", "is missing"), which sends the user looking for a
    path that is there."""
    from hybrid.config import ConfigError, load_config
    from hybrid.pipeline import HybridPipeline, PipelineError

    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_folder").mkdir()
    with pytest.raises(ConfigError, match="config file '.*a_folder' is a folder, not a file"):
        load_config(tmp_path / "a_folder")
    for key in ("tokenizer.checkpoint", "ar.checkpoint", "init_from", "eval.inception_weights"):
        with pytest.raises(ConfigError, match=f"config key '{key}': '.*a_folder' is a folder, not a file$"):
            load_config(None, [f"{key}={tmp_path / 'a_folder'}"])
    run = tmp_path / "run"
    (run / "ar").mkdir(parents=True)
    (run / "ar" / "final.ckpt").write_text("x")
    with pytest.raises(ConfigError, match=r"is a folder, not a file \(the stage's checkpoint is .*ar/final.ckpt\)"):
        load_config(None, [f"init_from={run / 'ar'}", "stage=ar"])
    with pytest.raises(PipelineError, match="run directory '.*a_file' is a file, not a folder"):
        HybridPipeline.from_run(tmp_path / "a_file")
    with pytest.raises(PipelineError, match="export folder '.*a_file' is a file, not a folder"):
        HybridPipeline.from_pretrained(tmp_path / "a_file")
    (run / "tokenizer" / "final.ckpt").mkdir(parents=True)  # a folder where the checkpoint should be
    with pytest.raises(PipelineError, match="tokenizer/final.ckpt is a folder, not a file"):
        HybridPipeline.from_run(run)
    (run / "tokenizer" / "final.ckpt").rmdir()
    (run / "tokenizer" / "final.ckpt").write_text("x")
    (run / "refiner" / "final.ckpt").mkdir(parents=True)
    with pytest.raises(PipelineError, match="refiner/final.ckpt' is a folder, not a file"):  # was skipped unsaid
        HybridPipeline.from_run(run)
    with pytest.raises(PipelineError, match="pipeline.json does not exist \\(it is a run directory: load it with "
                                            "sample.py --run"):
        HybridPipeline.from_pretrained(run)
    export = tmp_path / "export"
    export.mkdir()
    (export / "pipeline.json").write_text("{}")
    with pytest.raises(PipelineError, match="final.ckpt does not exist\\) \\(it is an exported pipeline: load it with "
                                            "sample.py --export"):
        HybridPipeline.from_run(export)


def test_a_hint_about_a_copied_run_trains_into_the_copy(tmp_path):
    """A run copied elsewhere keeps the original's run_dir in its config.yaml: the hint `--config COPY/config.yaml`
    alone would have trained into the original run."""
    from hybrid.checkpoints import train_command

    original, copy = tmp_path / "original", tmp_path / "copy"
    for run in (original, copy):
        run.mkdir()
        (run / "config.yaml").write_text(f"run_dir: {original}\nretrain: true\n")
    assert train_command(original, "stage=ar") == (f"python train.py --config {original / 'config.yaml'} "
                                                   f"retrain=false stage=ar")
    assert train_command(copy, "stage=ar") == (f"python train.py --config {copy / 'config.yaml'} run_dir={copy} "
                                               f"retrain=false stage=ar")
