"""Data: procedural dataset (determinism, vocabulary, holdout, captions), shards (round trip, exactly-once
evaluation, fixed-length training, skipping corrupt data), folder source, the Lightning data module."""

import io
import json
import os
import re
import tarfile
import warnings
from collections import Counter

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

import hybrid.data.shards as shards_module
from hybrid.data.attributes import ATTRIBUTES, COLORS, FILLS, GLYPHS, NUM_CLASSES, SHAPES, class_id
from hybrid.data.module import EpochIndexSampler, HybridDataModule, ShardedIndexSampler
from hybrid.data.procedural import (
    ProceduralDataset,
    caption,
    parse_holdout,
    render,
    sample_attributes,
    sample_second,
)
from hybrid.data.shards import (
    EvalShards,
    ShardWarning,
    SkipCounter,
    TrainShards,
    expand_shards,
    main,
    split_shards,
    write_folder,
    write_procedural,
)


def _attrs(**kw):
    base = {"shape": SHAPES.index("triangle"), "color": COLORS.index("red"), "position": 0, "size": 0,
            "background": 1, "fill": 1, "glyph": 0}
    base.update(kw)
    return base


# ----------------------------------------------------------------------------------------------
# Procedural dataset
# ----------------------------------------------------------------------------------------------


def test_deterministic_for_seed_split_index():
    a = ProceduralDataset(size=100, seed=3, split="train")
    b = ProceduralDataset(size=100, seed=3, split="train")
    for i in (0, 7, 99):
        x, y = a[i], b[i]
        assert torch.equal(x["image"], y["image"]) and x["caption"] == y["caption"] and x["attrs"] == y["attrs"]
    assert not torch.equal(a[0]["image"], a[1]["image"])
    assert not torch.equal(a[5]["image"], ProceduralDataset(size=100, seed=4)[5]["image"])
    assert not torch.equal(a[5]["image"], ProceduralDataset(size=100, seed=3, split="val")[5]["image"])
    # render() is a pure function of (attrs, rng state)
    img1 = render(_attrs(), np.random.default_rng(1), 32)
    img2 = render(_attrs(), np.random.default_rng(1), 32)
    assert img1.dtype == np.uint8 and img1.shape == (32, 32, 3) and np.array_equal(img1, img2)


def test_sample_fields_and_class_id():
    ds = ProceduralDataset(size=20, split="val")
    for i in range(20):
        s = ds[i]
        assert set(s) == {"image", "class_id", "caption", "attrs"}
        assert set(s["attrs"]) == set(ATTRIBUTES)
        assert s["class_id"] == class_id(s["attrs"]["shape"], s["attrs"]["color"]) and 0 <= s["class_id"] < NUM_CLASSES
        for key, value in s["attrs"].items():
            assert 0 <= value < len(ATTRIBUTES[key])
        is_glyph = s["attrs"]["shape"] == SHAPES.index("glyph")
        assert (s["attrs"]["glyph"] > 0) == is_glyph
        if is_glyph or s["attrs"]["shape"] == SHAPES.index("star"):
            assert s["attrs"]["fill"] == 0  # glyphs and stars are always solid


def test_stars_and_glyphs_are_solid_and_their_captions_never_name_a_fill():
    rng = np.random.default_rng(3)
    fills = {shape: Counter() for shape in range(len(SHAPES))}
    for _ in range(3000):
        a = sample_attributes(rng, glyph_prob=0.2)
        fills[a["shape"]][a["fill"]] += 1
    for shape, counts in fills.items():
        if SHAPES[shape] in ("star", "glyph"):
            assert set(counts) == {0}, SHAPES[shape]
        else:
            assert set(counts) == set(range(len(FILLS))), SHAPES[shape]  # the other shapes keep every pattern
    star = _attrs(shape=SHAPES.index("star"), fill=0)
    assert caption(star) == "a small red star at the top left on a gray background"


def test_every_attribute_value_appears():
    rng = np.random.default_rng(0)
    seen = {key: Counter() for key in ATTRIBUTES}
    for _ in range(4000):
        a = sample_attributes(rng, glyph_prob=0.5)
        for key, value in a.items():
            seen[key][value] += 1
    for key, values in ATTRIBUTES.items():
        assert set(seen[key]) == set(range(len(values))), f"{key}: missing {set(range(len(values))) - set(seen[key])}"
    # and the dataset really renders them (a few hundred images, toy size)
    ds = ProceduralDataset(image_size=16, size=300, split="val", glyph_prob=0.3)
    shapes = {ds.sample(i)[1]["shape"] for i in range(150)}
    assert shapes == set(range(len(SHAPES)))


def test_holdout_never_in_train():
    holdout = ["red:triangle", "blue:glyph", " Green : Star "]
    banned = parse_holdout(holdout)
    assert banned == {(SHAPES.index("triangle"), 0), (SHAPES.index("glyph"), 2), (SHAPES.index("star"), 1)}
    rng = np.random.default_rng(0)
    for _ in range(3000):
        a = sample_attributes(rng, holdout, glyph_prob=0.5)
        assert (a["shape"], a["color"]) not in banned
        b = sample_second(rng, a, holdout)
        assert (b["shape"], b["color"]) not in banned and b["position"] != a["position"]
    only = {(a["shape"], a["color"]) for a in (sample_attributes(rng, holdout, only_holdout=True) for _ in range(300))}
    assert only == set(banned)
    ds = ProceduralDataset(size=400, split="train", holdout=holdout, glyph_prob=0.5)
    assert all((ds.sample(i)[1]["shape"], ds.sample(i)[1]["color"]) not in banned for i in range(0, 400, 4))
    with pytest.raises(ValueError, match="teal"):
        parse_holdout(["teal:circle"])
    with pytest.raises(ValueError, match="blob"):
        ProceduralDataset(holdout=["red:blob"])
    with pytest.raises(ValueError, match="color:shape"):
        parse_holdout(["red-circle"])


def test_caption_contents():
    assert caption(_attrs()) == "a small red striped triangle at the top left on a gray background"
    glyph = _attrs(shape=SHAPES.index("glyph"), color=COLORS.index("blue"), position=4, size=1, background=2, fill=0,
                   glyph=GLYPHS.index("K"))
    assert caption(glyph) == "a large blue letter K at the center on a white background"
    digit = _attrs(glyph=GLYPHS.index("7"), shape=SHAPES.index("glyph"), fill=0)
    assert caption(digit).startswith("a small red digit 7 at")
    assert caption(_attrs(size=1, color=COLORS.index("orange"), fill=0, shape=0, position=3)) == \
        "a large orange solid circle on the left on a gray background"
    rng = np.random.default_rng(0)
    assert caption(_attrs(color=COLORS.index("orange")), rng, keep=0.0) == "a triangle"
    full = set(caption(_attrs()).split())
    lengths = set()
    for _ in range(200):
        text = caption(_attrs(), rng, keep=0.5)
        assert "triangle" in text and set(text.split()) <= full | {"an"}
        lengths.add(len(text.split()))
    assert len(lengths) > 4  # subsets of different lengths
    # training captions vary, validation captions name everything
    train = ProceduralDataset(size=50, split="train", caption_keep=0.5)
    val = ProceduralDataset(size=50, split="val")
    assert any(len(train[i]["caption"]) < len(caption(train[i]["attrs"])) for i in range(20))
    assert all(val[i]["caption"] == caption(val[i]["attrs"]) for i in range(20))


@pytest.mark.parametrize("size", [16, 64])
def test_image_range_and_shape(size):
    ds = ProceduralDataset(image_size=size, size=30, split="val", two_object_prob=0.5, glyph_prob=0.3)
    for i in range(12):
        x = ds[i]["image"]
        assert x.dtype == torch.float32 and x.shape == (3, size, size)
        assert x.min() >= -1.0 and x.max() <= 1.0 and x.std() > 0.01
    with pytest.raises(ValueError, match="image_size 8 is outside 16..256"):
        ProceduralDataset(image_size=8)


def test_first_object_stays_in_its_cell():
    """Large objects (shapes and glyphs, outlined glyphs too): the object's pixels lie inside its grid cell."""
    rng = np.random.default_rng(0)
    for trial in range(60):
        a = sample_attributes(rng, glyph_prob=0.4)
        a.update(size=1, background=2 * (trial % 2))
        img = render(a, rng, 48).astype(int)
        ink = np.abs(img - np.median(img.reshape(-1, 3), 0)).max(-1) > 60  # object pixels
        ys, xs = np.nonzero(ink)
        row, col = divmod(a["position"], 3)
        assert len(ys) > 20, f"trial {trial}: object not visible"
        assert ys.min() >= row * 16 and ys.max() < (row + 1) * 16 and xs.min() >= col * 16 and xs.max() < (col + 1) * 16


# ----------------------------------------------------------------------------------------------
# Shards
# ----------------------------------------------------------------------------------------------


def test_shards_round_trip_bit_exact(tmp_path):
    shards = write_procedural(tmp_path, count=25, image_size=32, per_shard=10, seed=5, split="train", progress=False)
    assert [os.path.basename(s) for s in shards] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    ds = ProceduralDataset(size=25, seed=5, split="train", caption_keep=1.0)
    seen = 0
    for s in EvalShards(str(tmp_path / "train-{000000..000002}.tar"), with_keys=True):
        ref = ds[int(s["key"].split("/")[1])]
        assert torch.equal(s["image"], ref["image"])
        assert s["class_id"] == ref["class_id"] and s["caption"] == ref["caption"] and s["attrs"] == ref["attrs"]
        seen += 1
    assert seen == 25


def test_cli_writes_shards(tmp_path, capsys):
    assert main(["write", "--out", str(tmp_path), "--count", "6", "--per-shard", "4", "--split", "val",
                 "--image-size", "16", "--no-progress"]) == 0
    assert "wrote 2 shard(s)" in capsys.readouterr().out
    assert len(list(EvalShards(str(tmp_path / "val-*.tar")))) == 6
    with pytest.raises(SystemExit) as exit_info:
        main(["write", "--out", str(tmp_path), "--source", "folder"])  # --folder missing
    assert exit_info.value.code == 2 and "--folder" in capsys.readouterr().err


def _keys(stream):
    return [s["key"] for s in stream]


@pytest.mark.parametrize("num_shards, per_shard", [(6, 4), (2, 9)])  # enough shards / fewer shards than processes
def test_eval_exactly_once_two_ranks_two_workers(tmp_path, num_shards, per_shard):
    write_procedural(tmp_path, count=num_shards * per_shard - 1, image_size=16, per_shard=per_shard, split="val",
                     progress=False)
    pattern = str(tmp_path / "val-*.tar")
    keys = []
    for rank in range(2):
        for worker in range(2):
            keys += _keys(EvalShards(pattern, rank=rank, world_size=2, with_keys=True, worker=(worker, 2)))
    assert len(keys) == num_shards * per_shard - 1 and len(set(keys)) == len(keys)
    # the same with real DataLoader worker processes for each simulated rank
    real = []
    for rank in range(2):
        loader = DataLoader(EvalShards(pattern, rank=rank, world_size=2, with_keys=True), batch_size=3, num_workers=2)
        real += [k for batch in loader for k in batch["key"]]
    assert sorted(real) == sorted(keys)


def test_split_shards_covers_everything_once():
    urls = [f"s{i}" for i in range(5)]
    for total_workers in (1, 2, 3):
        got = []
        for rank in range(2):
            for worker in range(total_workers):
                mine, keep = split_shards(urls, rank, 2, worker, total_workers)
                got += mine if keep is None else [(u, j) for j, u in enumerate(mine) if keep(j)]
        assert len(got) == len(set(got)) and len(got) == 5


def test_train_fixed_batches_per_rank_and_deterministic(tmp_path):
    write_procedural(tmp_path, count=30, image_size=16, per_shard=10, split="train", progress=False)
    pattern = str(tmp_path / "train-*.tar")
    counts = []
    for rank, workers in ((0, 0), (1, 2)):  # rank 0 without workers, rank 1 with 2 worker processes
        stream = TrainShards(pattern, batch_size=4, batches_per_epoch=5, seed=1, rank=rank, world_size=2,
                             shuffle_buffer=8)
        counts.append(sum(1 for b in DataLoader(stream, batch_size=4, num_workers=workers) if len(b["caption"]) == 4))
    assert counts == [5, 5]
    # workers split the batches: 5 = 3 + 2, never 5 per worker (webdataset's with_epoch would give 10)
    sizes = [len(list(TrainShards(pattern, batch_size=4, batches_per_epoch=5, worker=(w, 2)))) for w in range(2)]
    assert sizes == [12, 8]

    def captions(rank=0, epoch=0, seed=1):
        s = TrainShards(pattern, batch_size=4, batches_per_epoch=3, seed=seed, rank=rank, world_size=2,
                        caption_keep=0.5, shuffle_buffer=8, with_keys=True)
        s.set_epoch(epoch)
        return [(x["key"], x["caption"]) for x in s]

    assert captions() == captions()
    assert captions() != captions(epoch=1) and captions() != captions(rank=1) and captions() != captions(seed=2)


def _corrupt_shards(tmp_path):
    """good-000000.tar (5 good samples), bad-png shard (4 good + 1 corrupt PNG), truncated shard."""
    write_procedural(tmp_path / "a", count=10, image_size=16, per_shard=5, split="val", progress=False)
    good, second = sorted((tmp_path / "a").glob("val-*.tar"))
    samples = list(wds.WebDataset(str(second), shardshuffle=False, nodesplitter=None, workersplitter=None))
    with wds.TarWriter(str(tmp_path / "a" / "val-000002.tar")) as sink:
        for i, s in enumerate(samples):
            png = s["png"][:40] + b"garbage" if i == 2 else s["png"]
            sink.write({"__key__": s["__key__"] + "b", "png": png, "json": s["json"]})
    with tarfile.open(second) as tf:
        member = tf.getmembers()[5]  # a member of the third sample
    second.write_bytes(second.read_bytes()[: member.offset_data + member.size // 2])  # truncated mid-member
    return str(tmp_path / "a" / "val-*.tar")


def test_corrupt_png_and_truncated_shard_are_skipped_and_counted(tmp_path):
    pattern = _corrupt_shards(tmp_path)
    counter = SkipCounter()
    with pytest.warns(ShardWarning) as record:
        got = list(EvalShards(pattern, counter=counter, with_keys=True))
    messages = " ".join(str(w.message) for w in record)
    assert "val-000001.tar" in messages and "corrupt PNG" in messages
    assert counter.bad_shards == 1 and counter.bad_samples >= 1
    assert 5 + 4 <= len(got) < 15  # every good sample of the intact shards, and what precedes the truncation
    # training goes on with the same damaged shards and still gives its full epoch
    counter2 = SkipCounter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ShardWarning)
        stream = TrainShards(pattern, batch_size=4, batches_per_epoch=6, counter=counter2, shuffle_buffer=4)
        batches = list(DataLoader(stream, batch_size=4, num_workers=1))  # counts come back from the worker
    assert len(batches) == 6 and counter2.bad_shards >= 1 and counter2.bad_samples >= 1


def test_pattern_matching_nothing_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope-*.tar"))):
        expand_shards(str(tmp_path / "nope-*.tar"))
    write_procedural(tmp_path, count=2, per_shard=1, split="val", progress=False)
    assert len(expand_shards(str(tmp_path / "val-{000000..000001}.tar"))) == 2
    with pytest.raises(FileNotFoundError, match="missing"):
        expand_shards(str(tmp_path / "val-{000000..000005}.tar"))
    dm = HybridDataModule(batch_size=2, source="shards", shards=str(tmp_path / "train-{0..3}.tar"))
    with pytest.raises(FileNotFoundError, match="train-"):
        dm.setup("fit")


def test_a_pattern_with_unbalanced_braces_is_a_clear_error_naming_it_and_its_config_key(tmp_path):
    from hybrid.config import ConfigError, load_config

    write_procedural(tmp_path, count=2, per_shard=1, split="train", progress=False)
    bad = str(tmp_path / "train-{000000..000001.tar")  # was braceexpand's UnbalancedBracesError traceback
    with pytest.raises(ValueError, match=re.escape(f"shard pattern '{bad}' has unbalanced braces")):
        expand_shards(bad)
    for key, good in (("data.shards", None), ("data.val_shards", str(tmp_path))):
        overrides = ["data.source=shards", f"data.shards={good or bad}"] + ([f"data.val_shards={bad}"] if good else [])
        with pytest.raises(ConfigError, match=re.escape(f"config key '{key}': shard pattern '{bad}' has unbalanced")):
            load_config("configs/toy.yaml", overrides)


def _class_id_shard(path, class_ids):
    """A shard with one 16x16 sample per class id (-1: a sample written without one)."""
    buf = io.BytesIO()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(buf, format="PNG")
    with wds.TarWriter(str(path)) as sink:
        for i, cid in enumerate(class_ids):
            meta = {"caption": "x"} if cid == -1 else {"class_id": cid, "caption": "x"}
            sink.write({"__key__": f"{i:09d}", "png": buf.getvalue(), "json": json.dumps(meta).encode()})


@pytest.mark.parametrize("bad", [3, 7, -2])  # 3 == num_classes would silently train as the unconditional class
def test_class_id_outside_num_classes_is_an_error_naming_the_shard(tmp_path, bad):
    _class_id_shard(tmp_path / "train-000000.tar", [0, 2, -1, 1])
    _class_id_shard(tmp_path / "train-000001.tar", [0, bad, 1, 2])
    _class_id_shard(tmp_path / "val-000000.tar", [1, 0, bad])
    dm = HybridDataModule(batch_size=2, source="shards", shards=str(tmp_path / "train-*.tar"), image_size=16,
                          batches_per_epoch=4, shuffle_buffer=1, num_classes=3)
    dm.setup("fit")
    for loader, shard in ((dm.train_dataloader(), "train-000001.tar"), (dm.val_dataloader(), "val-000000.tar")):
        with pytest.raises(ValueError, match=rf"shard '[^']*{shard}'.*class id {bad}\b.*data\.num_classes"):
            list(loader)
    from hybrid.eval.evaluate import read_shard_images  # stage=eval asks the generators for these classes

    with pytest.raises(ValueError, match=rf"shard '[^']*val-000000.tar'.*class id {bad}\b"):
        read_shard_images(str(tmp_path / "val-*.tar"), 8, 16, num_classes=3)
    good = str(tmp_path / "train-000000.tar")
    ok = HybridDataModule(batch_size=2, source="shards", shards=good, val_shards=good, image_size=16,
                          batches_per_epoch=2, shuffle_buffer=1, num_classes=3)
    ok.setup("fit")
    assert [b["class_id"].tolist() for b in ok.train_dataloader()] == [[0, 2], [-1, 1]]  # -1: no class id
    assert [b["class_id"].tolist() for b in ok.val_dataloader()] == [[0, 2], [-1, 1]]
    _class_id_shard(tmp_path / "procedural.tar", [41, 0])  # data.num_classes=0: the procedural dataset's 42
    assert sum(len(b["caption"]) for b in EvalShards(str(tmp_path / "procedural.tar"), num_classes=NUM_CLASSES)) == 2


# ----------------------------------------------------------------------------------------------
# Folder source
# ----------------------------------------------------------------------------------------------


def test_folder_source_sidecar_captions_and_center_crop(tmp_path):
    root = tmp_path / "images"
    (root / "red_apple").mkdir(parents=True)
    (root / "blue-sky").mkdir()
    wide = np.zeros((32, 64, 3), np.uint8)  # w=64, h=32: center 32 columns red, sides blue
    wide[:, :16] = wide[:, 48:] = (0, 0, 255)
    wide[:, 16:48] = (255, 0, 0)
    Image.fromarray(wide).save(root / "red_apple" / "wide.png")
    (root / "red_apple" / "wide.txt").write_text("a shiny red apple\n")
    Image.fromarray(np.full((80, 40, 3), 200, np.uint8)).save(root / "blue-sky" / "tall.jpg")
    Image.fromarray(np.full((16, 16, 3), 10, np.uint8)).save(root / "blue-sky" / "small.png")
    (root / "blue-sky" / "broken.png").write_bytes(b"not a png")
    with pytest.warns(ShardWarning, match="broken.png"):
        shards = write_folder(tmp_path / "out", root, image_size=32, per_shard=2, progress=False)
    assert len(shards) == 2
    assert json.loads((tmp_path / "out" / "classes.json").read_text()) == {"blue-sky": 0, "red_apple": 1}
    got = {s["caption"]: s for s in EvalShards(str(tmp_path / "out" / "train-*.tar"))}
    assert set(got) == {"a shiny red apple", "blue sky"}
    apple = got["a shiny red apple"]
    assert apple["class_id"] == 1 and apple["image"].shape == (3, 32, 32)
    assert torch.allclose(apple["image"][:, :, 2:-2], torch.tensor([1.0, -1.0, -1.0])[:, None, None], atol=0.05)
    assert all(v == -1 for v in apple["attrs"].values())
    sky = [s for s in EvalShards(str(tmp_path / "out" / "train-*.tar")) if s["class_id"] == 0]
    assert len(sky) == 2 and all(s["caption"] == "blue sky" and s["image"].shape == (3, 32, 32) for s in sky)


def _class_folders(root, names):
    for name in names:
        (root / name).mkdir(parents=True)
        Image.fromarray(np.full((16, 16, 3), 40 * len(name), np.uint8)).save(root / name / f"{name}.png")


def test_folder_val_split_keeps_the_training_class_ids(tmp_path, capsys):
    """README's two writes (train folder, then a val folder with fewer classes) into one --out: the val split
    reuses classes.json's ids; a class that is not in it is an error naming the class and the file."""
    from hybrid.config import ConfigError, load_config

    _class_folders(tmp_path / "images", ["cat", "dog", "emu"])
    _class_folders(tmp_path / "images_val", ["dog", "emu"])
    out = tmp_path / "out"
    write_folder(out, tmp_path / "images", image_size=16, split="train", progress=False)
    write_folder(out, tmp_path / "images_val", image_size=16, split="val", progress=False)
    mapping = {"cat": 0, "dog": 1, "emu": 2}
    assert json.loads((out / "classes.json").read_text()) == mapping
    for split in ("train", "val"):
        for sample in wds.WebDataset(str(out / f"{split}-000000.tar"), shardshuffle=False):
            meta = json.loads(sample["json"])
            assert meta["class_id"] == mapping[meta["class_name"]], (split, meta)
    assert sorted(p.name for p in out.iterdir()) == ["classes.json", "train-000000.tar", "val-000000.tar"]

    _class_folders(tmp_path / "other", ["dog", "fox"])
    with pytest.raises(ValueError, match=f"'fox'.*{re.escape(str(out / 'classes.json'))}"):
        write_folder(out, tmp_path / "other", image_size=16, split="val", progress=False)
    assert json.loads((out / "classes.json").read_text()) == mapping  # never overwritten with another mapping
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:  # the CLI: one line, no traceback
        main(["write", "--source", "folder", "--folder", str(tmp_path / "other"), "--out", str(out), "--split",
              "val", "--image-size", "16", "--no-progress"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err, err
    error_lines = [line for line in err.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and "'fox'" in error_lines[0] and "classes.json" in error_lines[0], err
    (out / "classes.json").write_text("[1, 2")
    with pytest.raises(ValueError, match=re.escape(str(out / "classes.json"))):
        write_folder(out, tmp_path / "images_val", image_size=16, split="val", progress=False)
    # ids the writer never gives: were written into the shards as they stood (two classes trained as one), or
    # found at training as an id outside data.num_classes, whose advice (set data.num_classes) did not help
    for ids, problem in (({"cat": 0, "dog": 0, "emu": 1}, "id 0 is given to 2 classes"),
                         ({"cat": -1, "dog": 5, "emu": 1}, "id -1 is negative"),
                         ({"cat": 0, "dog": 5, "emu": 1}, "its ids must be 0..2, one per class, got [0, 1, 5]"),
                         ({"cat": "0", "dog": 1, "emu": 2}, "expected")):
        (out / "classes.json").write_text(json.dumps(ids))
        with pytest.raises(ValueError, match=re.escape(f"'{out / 'classes.json'}' is not a class mapping (")
                           + ".*" + re.escape(problem)):
            write_folder(out, tmp_path / "images_val", image_size=16, split="val", progress=False)
        if problem.startswith("id "):
            with pytest.raises(ConfigError, match=re.escape(f"config key 'data.shards': '{out / 'classes.json'}' is "
                                                            f"not a usable class mapping: {problem}")):
                load_config("configs/toy.yaml", ["data.source=shards", f"data.shards={out}", "data.num_classes=6"])
    # ids skipped by hand-built shards train (a review finding), with a class table that covers the largest
    (out / "classes.json").write_text(json.dumps({"cat": 0, "dog": 5, "emu": 1}))
    with pytest.raises(ConfigError, match=re.escape("lists 3 classes with ids up to 5: set data.num_classes=6")):
        load_config("configs/toy.yaml", ["data.source=shards", f"data.shards={out}", "data.num_classes=3"])
    load_config("configs/toy.yaml", ["data.source=shards", f"data.shards={out}", "data.num_classes=6"])
    (out / "classes.json").write_text(json.dumps(mapping))
    load_config("configs/toy.yaml", ["data.source=shards", f"data.shards={out}", "data.num_classes=3"])


def test_a_train_rewrite_adds_new_classes_after_the_existing_ids(tmp_path, capsys):
    """A class folder added after the train split was written: writing the train split again (--overwrite, the
    command the error used to refuse, advising to write every class) adds it to classes.json with the next id,
    with a note that data.num_classes must grow; the ids already there never change, so models trained on them and
    the val split stay consistent. A val class that is not in classes.json stays an error, whose advice works."""
    images, out = tmp_path / "images", tmp_path / "out"
    _class_folders(images, ["cat", "dog"])
    _class_folders(tmp_path / "images_val", ["ant", "dog"])
    common = ["write", "--source", "folder", "--out", str(out), "--image-size", "16", "--no-progress"]
    train = [*common, "--folder", str(images), "--split", "train"]
    val = [*common, "--folder", str(tmp_path / "images_val"), "--split", "val"]
    assert main(train) == 0
    with pytest.raises(SystemExit) as exit_info:
        main(val)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "class 'ant' of image folder" in err
    assert "write the train split with it first" in err and "then this val split" in err
    assert json.loads((out / "classes.json").read_text()) == {"cat": 0, "dog": 1}

    _class_folders(images, ["ant"])  # sorts first: ids from the sorted names would shift cat's and dog's
    assert main(train + ["--overwrite"]) == 0  # the advice, followed
    err = capsys.readouterr().err
    assert re.search(rf"^note: added class 'ant' to '{re.escape(str(out / 'classes.json'))}' as id 2 \(the existing "
                     r"ids are kept\): data\.num_classes must grow to 3 to train on these shards$", err, re.M), err
    assert main(val) == 0
    _class_folders(images, ["bee", "fox"])
    assert main(train + ["--overwrite"]) == 0
    assert "classes 'bee', 'fox' to" in capsys.readouterr().err
    mapping = {"cat": 0, "dog": 1, "ant": 2, "bee": 3, "fox": 4}
    assert json.loads((out / "classes.json").read_text()) == mapping
    names = {}
    for split in ("train", "val"):
        for sample in wds.WebDataset(str(out / f"{split}-000000.tar"), shardshuffle=False):
            meta = json.loads(sample["json"])
            assert meta["class_id"] == mapping[meta["class_name"]], (split, meta)
            names.setdefault(split, set()).add(meta["class_name"])
    assert names == {"train": set(mapping), "val": {"ant", "dog"}}
    assert sorted(p.name for p in out.iterdir()) == ["classes.json", "train-000000.tar", "val-000000.tar"]
    assert main(train + ["--overwrite"]) == 0 and "note:" not in capsys.readouterr().err  # nothing new: no note


def test_rewriting_a_split_refuses_or_replaces_exactly_its_old_shards(tmp_path, capsys, monkeypatch):
    """A second write of a split into the same --out would leave old shards that `train-*.tar` still reads
    (duplicated images): it is refused, naming how many are there; --overwrite replaces that split only, and the
    report lists exactly the shards this call wrote."""
    images, out = tmp_path / "images", tmp_path / "out"
    _class_folders(images, ["cat", "dog"])
    for i in range(5):
        Image.fromarray(np.full((16, 16, 3), 9 * i, np.uint8)).save(images / "cat" / f"{i}.png")
    write_folder(out, images, image_size=16, per_shard=2, progress=False)  # 7 images: 4 shards
    write_folder(out, images, image_size=16, split="val", progress=False)
    train = sorted(p.name for p in out.glob("train-*.tar"))
    assert len(train) == 4
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(FileExistsError, match=rf"'{re.escape(str(out))}' already holds 4 train shard.*--overwrite"):
        write_folder(out, images, image_size=16, progress=False)
    write_procedural(tmp_path / "p", count=4, image_size=16, per_shard=2, progress=False)
    with pytest.raises(FileExistsError, match="already holds 2 train shard"):
        write_procedural(tmp_path / "p", count=4, image_size=16, per_shard=2, progress=False)
    args = ["write", "--source", "folder", "--folder", str(images), "--out", str(out), "--image-size", "16",
            "--no-progress"]
    with pytest.raises(SystemExit) as exit_info:  # the CLI: one line, no traceback
        main(args)
    assert exit_info.value.code == 2 and "already holds 4 train shard(s)" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing written, nothing lost
    calls = []

    def interrupted(pixels):  # the write stops midway (Ctrl-C, a full disk): the old shards stay as they were
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return png_bytes(pixels)

    png_bytes = shards_module._png_bytes
    monkeypatch.setattr(shards_module, "_png_bytes", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_folder(out, images, image_size=16, per_shard=1, overwrite=True, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no hidden staging folder left either
    monkeypatch.undo()

    assert main(args + ["--overwrite"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote 1 shard(s) to {out}: train-000000.tar"
    assert sorted(p.name for p in out.iterdir()) == ["classes.json", "train-000000.tar", "val-000000.tar"]
    assert (out / "val-000000.tar").read_bytes() == before["val-000000.tar"]  # the other split is kept
    assert len(list(EvalShards(str(out / "train-*.tar")))) == 7  # every image once, no stale duplicates
    shards = write_procedural(out, count=5, image_size=16, per_shard=2, split="val", overwrite=True, progress=False)
    assert [os.path.basename(s) for s in shards] == ["val-000000.tar", "val-000001.tar", "val-000002.tar"]
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar", *map(os.path.basename, shards)]


def test_folder_without_a_readable_image_is_an_error_and_writes_nothing(tmp_path, capsys):
    """Every image unreadable: an error naming the folder (exit 2 from the CLI), no empty shard, no classes.json;
    with --overwrite the old shards stay."""
    bad = tmp_path / "allbad"
    (bad / "cat").mkdir(parents=True)
    (bad / "cat" / "a.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    with pytest.warns(ShardWarning, match="a.png"), \
            pytest.raises(ValueError, match=rf"none of the 1 image\(s\) of image folder '{re.escape(str(bad))}'"):
        write_folder(out, bad, image_size=16, progress=False)
    assert not out.exists()  # no empty shard, no classes.json
    with pytest.warns(ShardWarning), pytest.raises(SystemExit) as exit_info:
        main(["write", "--source", "folder", "--folder", str(bad), "--out", str(out), "--no-progress"])
    assert exit_info.value.code == 2 and "could be read" in capsys.readouterr().err and not out.exists()
    _class_folders(tmp_path / "good", ["cat"])
    write_folder(out, tmp_path / "good", image_size=16, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.warns(ShardWarning), pytest.raises(ValueError, match="could be read"):
        write_folder(out, bad, image_size=16, overwrite=True, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing already written is lost


@pytest.mark.parametrize("num_workers", [0, 1])
def test_training_shards_without_a_readable_sample_are_a_value_error_naming_the_pattern(tmp_path, num_workers):
    """Empty shards (what the writer made of a folder of unreadable images) and unreadable ones: training ends
    with a ValueError naming the pattern (train.py reports ValueErrors in one line), also from a DataLoader
    worker process, instead of a bare RuntimeError."""
    with wds.TarWriter(str(tmp_path / "train-000000.tar")):
        pass
    (tmp_path / "train-000001.tar").write_bytes(b"not a tar")
    pattern = str(tmp_path / "train-*.tar")
    stream = TrainShards(pattern, batch_size=2, batches_per_epoch=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ShardWarning)
        with pytest.raises(ValueError, match=rf"no readable sample .*'{re.escape(pattern)}'.*data\.shards"):
            list(DataLoader(stream, batch_size=2, num_workers=num_workers))


def test_folder_empty_class_and_images_outside_class_folders_are_warned(tmp_path):
    """An empty class subfolder keeps its class id (ids stay stable when it gets images later) and images at the
    folder's root are not written: each is one warning naming the folder, not silence and not an error."""
    root = tmp_path / "images"
    _class_folders(root, ["apple", "cherry"])
    (root / "banana").mkdir()
    (root / "banana" / "notes.txt").write_text("no image here")
    for name in ("loose1.png", "loose2.jpg"):
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / name)
    with pytest.warns(ShardWarning) as record:
        write_folder(tmp_path / "out", root, image_size=16, progress=False)
    messages = sorted(str(w.message) for w in record)
    assert len(messages) == 2, messages
    assert re.fullmatch(rf"1 class subfolder\(s\) of image folder '{re.escape(str(root))}' hold no image: 'banana'; "
                        r"they keep their class id but have no sample", messages[0])
    assert messages[1].startswith(f"2 image(s) directly in image folder '{root}' are in no class subfolder")
    assert json.loads((tmp_path / "out" / "classes.json").read_text()) == {"apple": 0, "banana": 1, "cherry": 2}
    got = sorted((s["class_id"], s["caption"]) for s in EvalShards(str(tmp_path / "out" / "train-*.tar")))
    assert got == [(0, "apple"), (2, "cherry")]
    for name in ("apple", "cherry"):
        (root / name / f"{name}.png").unlink()
    with pytest.raises(ValueError, match=r"has no images .*\(2 image\(s\) lie directly in it"):
        write_folder(tmp_path / "out2", root, image_size=16, progress=False)


def test_cli_prints_warnings_as_one_line_each(tmp_path):
    """The writer's warnings reach a CLI user as `warning: ...` lines, without the file, line number and source
    line (`shards = write_folder(...)`) of Python's default warning format."""
    import subprocess
    import sys

    root = tmp_path / "images"
    _class_folders(root, ["cat"])
    (root / "cat" / "broken.png").write_bytes(b"not a png")
    (root / "empty").mkdir()
    proc = subprocess.run([sys.executable, "-m", "hybrid.data.shards", "write", "--source", "folder", "--folder",
                           str(root), "--out", str(tmp_path / "out"), "--image-size", "16", "--no-progress"],
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 3, lines
    assert lines[0] == (f"warning: 1 class subfolder(s) of image folder '{root}' hold no image: 'empty'; they keep "
                        "their class id but have no sample")
    assert lines[1].startswith(f"warning: skipping unreadable image '{root / 'cat' / 'broken.png'}': ")
    assert lines[2] == "skipped 1 unreadable image(s)"
    assert proc.stdout == f"wrote 1 shard(s) to {tmp_path / 'out'}: train-000000.tar\n"


def _written_images(out) -> dict[str, torch.Tensor]:
    """{the image's path in its folder: (3, H, W) in [-1, 1]} of out's train shards."""
    return {json.loads(s["json"])["path"]: shards_module.decode_sample(s)["image"]
            for s in wds.WebDataset(str(out / "train-000000.tar"), shardshuffle=False)}


def test_folder_images_are_written_as_they_are_meant_to_be_seen(tmp_path):
    """Found by a review: 16-bit gray was written white (PIL's convert clips it at 255), phone photos sideways
    (EXIF orientation ignored), and transparent pixels in whatever colour they hide (alpha dropped)."""
    root = tmp_path / "images"
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    Image.fromarray(np.full((20, 20), 32768, np.uint16)).save(root / "cat" / "gray16.png")  # mid-gray, 16-bit
    Image.fromarray(np.full((20, 20), 128, np.uint8)).save(root / "cat" / "gray8.png")
    stored = np.zeros((32, 64, 3), np.uint8)  # stored 64 wide: left half red, right half blue
    stored[:, :32] = (255, 0, 0)
    stored[:, 32:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display (the left edge becomes the top)
    Image.fromarray(stored).save(root / "dog" / "phone.jpg", exif=exif, quality=95)
    clear = np.zeros((20, 20, 4), np.uint8)  # fully transparent, hiding black
    Image.fromarray(clear, "RGBA").save(root / "dog" / "clear.png")
    half = np.zeros((20, 20, 2), np.uint8)  # gray + alpha: black at half opacity over white = mid-gray
    half[..., 1] = 128
    Image.fromarray(half, "LA").save(root / "dog" / "half.png")
    write_folder(tmp_path / "out", root, image_size=16, progress=False)
    got = _written_images(tmp_path / "out")
    assert got["cat/gray16.png"].mean().item() == pytest.approx(0.0, abs=0.02)  # was 1.0 (white)
    assert torch.equal(got["cat/gray16.png"], got["cat/gray8.png"])  # 32768/65535 is 8-bit 128
    phone = got["dog/phone.jpg"]  # displayed 32 wide, 64 tall, center-cropped: red above, blue below
    assert torch.allclose(phone[:, :6].mean((1, 2)), torch.tensor([1.0, -1.0, -1.0]), atol=0.1)
    assert torch.allclose(phone[:, -6:].mean((1, 2)), torch.tensor([-1.0, -1.0, 1.0]), atol=0.1)
    assert torch.equal(got["dog/clear.png"], torch.ones(3, 16, 16))  # white, not the hidden black
    assert got["dog/half.png"].mean().item() == pytest.approx(0.0, abs=0.02)


def test_a_caption_file_that_is_not_utf8_is_named_and_the_rest_is_written(tmp_path, capsys):
    """One Latin-1 sidecar among many stopped the whole write with "'utf-8' codec can't decode byte 0xe9",
    naming no file, and left an empty --out behind."""
    root = tmp_path / "images"
    _class_folders(root, ["cafe", "tea"])
    (root / "cafe" / "cafe.txt").write_bytes("un café".encode("latin-1"))
    (root / "tea" / "tea.txt").write_bytes("\ufeffgreen tea".encode("utf-8"))  # a BOM is not part of the caption
    with pytest.warns(ShardWarning, match=rf"caption file '{re.escape(str(root / 'cafe' / 'cafe.txt'))}' is not "
                                          r"readable UTF-8 text .*captioned with its class name"):
        write_folder(tmp_path / "out", root, image_size=16, progress=False)
    captions = sorted(s["caption"] for s in EvalShards(str(tmp_path / "out" / "train-*.tar")))
    assert captions == ["cafe", "green tea"]


def test_a_write_that_fails_midway_leaves_no_empty_out_folder(tmp_path, monkeypatch):
    _class_folders(tmp_path / "images", ["cat", "dog"])

    def broken(pixels):
        raise OSError("disk full")

    monkeypatch.setattr(shards_module, "_png_bytes", broken)
    with pytest.raises(OSError, match="disk full"):
        write_folder(tmp_path / "new" / "out", tmp_path / "images", image_size=16, progress=False)
    assert not (tmp_path / "new" / "out").exists()
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "notes.md").write_text("mine")
    with pytest.raises(OSError, match="disk full"):
        write_folder(tmp_path / "kept", tmp_path / "images", image_size=16, progress=False)
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["notes.md"]  # a folder it did not create stays


def test_shards_in_a_folder_whose_name_has_glob_characters_are_found(tmp_path):
    """The writer wrote to 'run[1]' and the readers then said the pattern "matches no file": '[1]' was read as
    a character class."""
    _class_folders(tmp_path / "images", ["cat", "dog"])
    out = tmp_path / "run[1]"
    write_folder(out, tmp_path / "images", image_size=16, progress=False)
    shard = str(out / "train-000000.tar")
    for pattern in (str(out), shard, str(out / "train-*.tar"), str(out / "train-{000000..000000}.tar")):
        assert expand_shards(pattern) == [shard], pattern
    with pytest.raises(FileNotFoundError, match="matches no file"):
        expand_shards(str(out / "val-*.tar"))
    write_folder(out, tmp_path / "images", image_size=16, split="val", progress=False)
    dm = HybridDataModule(batch_size=2, source="shards", shards=str(out / "train-*.tar"), image_size=16)
    assert expand_shards(dm.resolve_val_pattern()) == [str(out / "val-000000.tar")]  # the sibling val split


def test_hidden_folders_are_skipped_at_any_depth_and_one_class_is_warned(tmp_path):
    """A class's '.thumbnails' copy was written as a second image; classes one level too deep were written as one
    class, silently."""
    root = tmp_path / "images"
    _class_folders(root, ["cat", "dog"])
    (root / "cat" / ".thumbnails").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "cat" / ".thumbnails" / "cat.png")
    (root / "cat" / "more").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "cat" / "more" / "kitten.png")
    write_folder(tmp_path / "out", root, image_size=16, progress=False)
    assert sorted(_written_images(tmp_path / "out")) == ["cat/cat.png", "cat/more/kitten.png", "dog/dog.png"]
    nested = tmp_path / "nested"
    _class_folders(nested / "images", ["cat", "dog"])
    with pytest.warns(ShardWarning, match=rf"one class subfolder, 'images': every image gets class id 0 \(it holds "
                                          rf"subfolders cat, dog: .*--folder '{re.escape(str(nested / 'images'))}'"):
        write_folder(tmp_path / "out2", nested, image_size=16, progress=False)


def test_cli_folder_source_follows_from_folder(tmp_path, capsys):
    _class_folders(tmp_path / "images", ["cat", "dog"])
    assert main(["write", "--folder", str(tmp_path / "images"), "--out", str(tmp_path / "out"), "--image-size", "16",
                 "--no-progress"]) == 0  # was "--source procedural needs --count"
    assert (tmp_path / "out" / "train-000000.tar").is_file()
    for argv, needle in ((["--source", "procedural", "--count", "4", "--folder", str(tmp_path / "images")],
                          "--folder is read with --source folder"),
                         (["--folder", str(tmp_path / "out" / "classes.json")], "is a file: give the folder"),
                         # was ignored without a word: every class written
                         (["--folder", str(tmp_path / "images"), "--holdout", "red:triangle"],
                          "--holdout picks procedural color:shape pairs (--source procedural)")):
        with pytest.raises(SystemExit) as exit_info:
            main(["write", "--out", str(tmp_path / "other"), "--no-progress", *argv])
        assert exit_info.value.code == 2 and needle in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


def test_cli_an_os_error_naming_no_path_names_the_out_folder(tmp_path, capsys, monkeypatch):
    """A full disk said "No space left on device" and no more."""
    import errno

    import hybrid.data.shards as shards

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shards, "write_procedural", full)
    with pytest.raises(SystemExit) as exit_info:
        main(["write", "--count", "4", "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and err[-1].endswith(
        f"error: No space left on device: writing into --out '{tmp_path / 'out'}'"), err


def test_cli_unwritable_out_and_a_folder_named_classes_json_are_one_line_errors(tmp_path, capsys):
    _class_folders(tmp_path / "images", ["cat", "dog"])
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "classes.json").mkdir()  # where the folder source keeps its class ids
    (tmp_path / "a_file").write_text("x")
    blocked = tmp_path / "a_file" / "below"  # its parent is a file: the folder cannot be made (NotADirectoryError)
    cases = ((["--count", "3", "--out", str(blocked)], f"'{blocked}'"),
             (["--folder", str(tmp_path / "images"), "--out", str(blocked)], f"'{blocked}'"),
             (["--count", "3", "--out", str(tmp_path / "a_file")], "is a file, not a folder"),
             (["--folder", str(tmp_path / "images"), "--out", str(tmp_path / "taken")],
              "classes.json' is not a file"))
    for argv, needle in cases:
        with pytest.raises(SystemExit) as exit_info:  # was a traceback (FileNotFoundError, IsADirectoryError)
            main(["write", "--image-size", "16", "--no-progress", *argv])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and needle in err and "Traceback" not in err
    assert sorted(p.name for p in (tmp_path / "taken").iterdir()) == ["classes.json"]  # no shard left behind


# ----------------------------------------------------------------------------------------------
# Data module
# ----------------------------------------------------------------------------------------------


def test_datamodule_procedural_batches_and_resume():
    from hybrid.config import DataConfig

    cfg = DataConfig(image_size=16, batches_per_epoch=3, val_size=10, train_size=1000, holdout=["red:circle"])
    dm = HybridDataModule.from_config(cfg, batch_size=4)
    dm.setup("fit")
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(batches) == 3
    b = batches[0]
    assert b["image"].shape == (4, 3, 16, 16) and b["class_id"].dtype == torch.long and len(b["caption"]) == 4
    assert set(b["attrs"]) == set(ATTRIBUTES) and b["attrs"]["color"].shape == (4,)
    again = list(dm.train_dataloader())  # a resumed run at the same epoch repeats the data
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(batches, again))
    loader.sampler.set_epoch(1)
    assert not torch.equal(next(iter(loader))["image"], batches[0]["image"])
    val = dm.val_dataloader()
    assert sum(len(v["caption"]) for v in val) == 10


def test_samplers_split_ranks():
    a = [list(EpochIndexSampler(100, 8, seed=0, rank=r, world_size=2)) for r in range(2)]
    assert len(a[0]) == len(a[1]) == 8 and a[0] != a[1]
    assert list(EpochIndexSampler(100, 8, seed=0, rank=0, world_size=2)) == a[0]
    idx = [i for r in range(2) for i in ShardedIndexSampler(7, r, 2)]
    assert sorted(idx) == list(range(7))


def test_datamodule_shards_source(tmp_path):
    write_procedural(tmp_path, count=12, image_size=16, per_shard=6, split="train", progress=False)
    write_procedural(tmp_path, count=5, image_size=16, per_shard=6, split="val", progress=False)
    dm = HybridDataModule(batch_size=4, source="shards", shards=str(tmp_path / "train-*.tar"), image_size=16,
                          batches_per_epoch=2, shuffle_buffer=4)
    dm.setup("fit")
    train = list(dm.train_dataloader())
    assert len(train) == 2 and train[0]["image"].shape == (4, 3, 16, 16)
    assert sum(len(b["caption"]) for b in dm.val_dataloader()) == 5  # sibling val-*.tar
    assert dm.skip_counts() == {"train_bad_samples": 0, "train_bad_shards": 0, "val_bad_samples": 0,
                                "val_bad_shards": 0}


def test_datamodule_lightning_smoke(tmp_path):
    """Two epochs under a real Trainer: every epoch has batches_per_epoch batches and new data."""
    import pytorch_lightning as pl

    class Probe(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen = []

        def training_step(self, batch, _):
            self.seen.append((self.current_epoch, batch["image"].sum().item(), len(batch["caption"])))
            return (self.w * batch["image"].mean()).sum()

        def validation_step(self, batch, _):
            self.log("v", batch["image"].mean(), batch_size=len(batch["caption"]))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    write_procedural(tmp_path, count=8, image_size=16, per_shard=4, split="train", progress=False)
    for dm in (HybridDataModule(batch_size=2, image_size=16, batches_per_epoch=3, val_size=4),
               HybridDataModule(batch_size=2, source="shards", shards=str(tmp_path / "train-*.tar"), image_size=16,
                                batches_per_epoch=3, val_size=4, shuffle_buffer=2)):
        probe = Probe()
        trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
        trainer.fit(probe, datamodule=dm)
        per_epoch = Counter(e for e, _, _ in probe.seen)
        assert per_epoch == {0: 3, 1: 3}
        sums = [[s for e, s, _ in probe.seen if e == epoch] for epoch in (0, 1)]
        assert sums[0] != sums[1]  # the epoch reached the sampler / the shard stream


def test_training_shards_whose_every_sample_is_corrupt_end_with_an_error_not_an_endless_loop(tmp_path, monkeypatch):
    """Shards that open but hold only undecodable images: the resampling reader drew them forever, warning each
    time. A run of BAD_SAMPLE_RUN failures in a row is a NoReadableShardError (a ValueError) naming the pattern."""
    import hybrid.data.shards as shards_module

    write_procedural(tmp_path / "src", count=3, image_size=16, per_shard=3, split="train", progress=False)
    (source,) = sorted((tmp_path / "src").glob("train-*.tar"))
    samples = list(wds.WebDataset(str(source), shardshuffle=False, nodesplitter=None, workersplitter=None))
    with wds.TarWriter(str(tmp_path / "train-000000.tar")) as sink:
        for s in samples:
            sink.write({"__key__": s["__key__"], "png": s["png"][:40] + b"garbage", "json": s["json"]})
    monkeypatch.setattr(shards_module, "BAD_SAMPLE_RUN", 20)
    pattern = str(tmp_path / "train-*.tar")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ShardWarning)
        with pytest.raises(ValueError, match=rf"last 20 samples drawn from '{re.escape(pattern)}'"):
            list(TrainShards(pattern, batch_size=2, batches_per_epoch=2, shuffle_buffer=2))
