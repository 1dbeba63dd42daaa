"""Config loading errors: each names the key path and the file, and says what is wrong."""
from __future__ import annotations

from pathlib import Path

import pytest

from asset_dist.config import ConfigError, DataConfig, MaskConfig, load_config, validate

OK = "train: {stage: vqgan}\ndata: {train_shards: shards/}\n"


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def _error(path, overrides=None) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides)
    return str(e.value)


def test_unknown_key_names_path_file_and_allowed_keys(tmp_path):
    p = _write(tmp_path, "a.yaml", OK + "model: {vqgan: {chh: 3}}\n")
    msg = _error(p)
    assert str(p) in msg and "unknown key 'model.vqgan.chh'" in msg and "ch_mult" in msg
    msg = _error(_write(tmp_path, "b.yaml", "train: {stage: vqgan}\ndata: {train_shards: x, mask: {kindd: coco}}\n"))
    assert "unknown key 'data.mask.kindd'" in msg and "max_ratio" in msg


def test_wrong_type_names_expected_and_got(tmp_path):
    msg = _error(_write(tmp_path, "a.yaml", OK.replace("{train_shards: shards/}",
                                                        "{train_shards: shards/, batch_size: two}")))
    assert "'data.batch_size' must be int, got str 'two'" in msg
    msg = _error(_write(tmp_path, "b.yaml", OK + "logging: {tensorboard: 1}\n"))
    assert "'logging.tensorboard' must be bool" in msg
    msg = _error(_write(tmp_path, "c.yaml", OK + "deepspeed: 3\n"))
    assert "'deepspeed' must be a mapping" in msg
    cfg = load_config(_write(tmp_path, "d.yaml", OK.replace("{train_shards: shards/}",
                                                            "{train_shards: shards/, mask: {max_ratio: 1}}")))
    assert cfg.data.mask.max_ratio == 1.0 and isinstance(cfg.data.mask.max_ratio, float)  # int -> float is lossless


def test_missing_required_value(tmp_path):
    msg = _error(_write(tmp_path, "a.yaml", "train: {stage: guide}\n"))
    assert "required value 'data.train_shards' is missing" in msg and "--set data.train_shards=" in msg
    msg = _error(_write(tmp_path, "b.yaml", "data: {train_shards: x}\n"))
    assert "required value 'train.stage' is missing" in msg
    cfg = load_config(_write(tmp_path, "c.yaml", "data: {train_shards: x}\n"), ["train.stage=sga"])
    assert cfg.train.stage == "sga"
    assert "config file not found" in _error(tmp_path / "nope.yaml")


def test_base_chain_merges_and_reports_loops(tmp_path):
    _write(tmp_path, "root.yaml", "train: {stage: vqgan, lr: 0.5}\ndata: {train_shards: a, batch_size: 4, "
                                  "mask: {kind: coco, max_ratio: 0.5}}\n")
    (tmp_path / "sub").mkdir()
    _write(tmp_path / "sub", "mid.yaml", "base: ../root.yaml\ndata: {batch_size: 8, mask: {max_ratio: 0.45}}\n")
    child = _write(tmp_path / "sub", "child.yaml", "base: mid.yaml\ntrain: {lr: 0.25}\n")
    cfg = load_config(child)
    assert (cfg.train.stage, cfg.train.lr) == ("vqgan", 0.25)  # child overrides, parent fills in
    assert (cfg.data.train_shards, cfg.data.batch_size) == ("a", 8)
    assert (cfg.data.mask.kind, cfg.data.mask.max_ratio) == ("coco", 0.45)  # nested sections merge key by key
    _write(tmp_path, "loop1.yaml", "base: loop2.yaml\n")
    loop2 = _write(tmp_path, "loop2.yaml", "base: loop1.yaml\n")
    assert "loops back" in _error(loop2)
    msg = _error(_write(tmp_path, "orphan.yaml", "base: missing.yaml\n"))
    assert "config file not found" in msg and "missing.yaml" in msg
    msg = _error(_write(tmp_path, "bad_child.yaml", "base: root.yaml\ndata: {batch_size: [1]}\n"))
    assert "bad_child.yaml" in msg and "'data.batch_size' must be int" in msg


def test_set_overrides(tmp_path):
    p = _write(tmp_path, "a.yaml", OK)
    cfg = load_config(p, ["data.batch_size=7", "data.mask.kind=coco", "train.betas=[0.9,0.95]",
                          "data.val_shards=v/"])
    assert (cfg.data.batch_size, cfg.data.mask.kind, cfg.train.betas, cfg.data.val_shards) == \
        (7, "coco", [0.9, 0.95], "v/")
    assert load_config(p, ["data.batch_size=1", "data.batch_size=5"]).data.batch_size == 5  # last wins
    assert "unknown key 'data.batchsize'" in _error(p, ["data.batchsize=3"])
    assert "'data.resolution' must be int, got str 'big'" in _error(p, ["data.resolution=big"])
    assert "expected key.path=value" in _error(p, ["data.batch_size"])
    assert "'batch_size' is not a section" in _error(p, ["data.batch_size=2", "data.batch_size.x=1"])
    assert "'data.mask.kind' must be one of landscape, coco (got 'strokes')" in _error(p, ["data.mask.kind=strokes"])


@pytest.mark.parametrize("field,value,text", [
    ("resize_short_side", 200, "'data.resize_short_side' must be 0 or >= resolution=256"),
    ("guide_resolution", 512, "'data.guide_resolution' must be in 1..resolution=256"),
    ("label_shift", 256, "'data.label_shift' must be in 0..255"),
    ("max_corrupt_fraction", 1.5, "'data.max_corrupt_fraction' must be in [0, 1]"),
    ("batch_size", 0, "'data.batch_size' must be >= 1"),
])
def test_data_section_validation(field, value, text):
    with pytest.raises(ConfigError, match=text.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        validate(DataConfig(train_shards="x", **{field: value}), "test", "data")
    with pytest.raises(ConfigError, match=r"'data\.mask\.max_ratio' must be in \(0, 1\]"):
        validate(DataConfig(train_shards="x", mask=MaskConfig(max_ratio=0.0)), "test", "data")
