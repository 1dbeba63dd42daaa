"""Renamed config keys (config.RENAMED): `train.token_hole` is now `model.token_hole`. The old name still loads
from files, `--set`, and what older versions saved (a run folder's config.yaml, a checkpoint's meta.json
config, an export's embedded config), and an old run folder still edits with the rule it names."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import yaml

from asset_dist.artifacts import read_export, write_export
from asset_dist.config import ConfigError, config_from_dict, load_config, save_config, to_dict
from asset_dist.models.tokens import token_hole
from asset_dist.train.resume import refused_changes
from tests.test_infer_common import check, cli, make_exports, square, write_inputs


def old_layout(d: dict, rule: str) -> dict:
    """A config dict as written before the rename: the rule under train, none under model."""
    d = json.loads(json.dumps(d))
    d["model"].pop("token_hole")
    d["train"]["token_hole"] = rule
    return d


def test_old_name_in_a_file_loads_with_a_warning(tmp_path):
    f = tmp_path / "old.yaml"
    f.write_text("train: {stage: guide, token_hole: nearest}\n")
    with pytest.warns(FutureWarning, match="train.token_hole is now model.token_hole"):
        cfg = load_config(f, require=False)
    assert cfg.model.token_hole == "nearest" and not hasattr(cfg.train, "token_hole")
    save_config(cfg, tmp_path / "saved.yaml")  # written with the new name only
    saved = yaml.safe_load((tmp_path / "saved.yaml").read_text())
    assert saved["model"]["token_hole"] == "nearest" and "token_hole" not in saved["train"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new name loads silently
        assert load_config(tmp_path / "saved.yaml", require=False).model.token_hole == "nearest"


def test_old_name_through_set_and_base_chains(tmp_path):
    (tmp_path / "base.yaml").write_text("model: {token_hole: any}\ntrain: {stage: guide}\ndata: {train_shards: x}\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\ntrain: {token_hole: nearest}\n")
    with pytest.warns(FutureWarning):
        assert load_config(tmp_path / "child.yaml", require=False).model.token_hole == "nearest"  # child wins
    assert load_config(tmp_path / "base.yaml", ["train.token_hole=nearest"], require=False).model.token_hole \
        == "nearest"
    with pytest.raises(ConfigError, match="'model.token_hole'"):
        load_config(tmp_path / "base.yaml", ["train.token_hole=centre"])
    (tmp_path / "both.yaml").write_text("model: {token_hole: any}\ntrain: {stage: guide, token_hole: nearest}\n")
    with pytest.raises(ConfigError, match=r"both.yaml: 'train.token_hole' \(the old name of 'model.token_hole'\) "
                                          r"is 'nearest' but 'model.token_hole' is 'any'"):
        load_config(tmp_path / "both.yaml")


def test_saved_configs_of_older_versions_load_and_resume(tmp_path):
    """meta.json / export configs go through config_from_dict; resuming compares the upgraded saved config with
    the current one, so an old checkpoint resumes under the same rule and refuses another."""
    cfg = load_config("configs/tiny_guide.yaml", ["model.token_hole=nearest"])
    old = old_layout(to_dict(cfg), "nearest")
    got = config_from_dict(old, "meta.json")
    assert got == cfg and "token_hole" in old["train"]  # the caller's dict is not changed
    assert refused_changes(to_dict(got), to_dict(cfg)) == []
    other = load_config("configs/tiny_guide.yaml")
    assert any("model.token_hole" in d for d in refused_changes(to_dict(got), to_dict(other)))


def test_an_old_run_folder_and_its_exports_still_edit(tmp_path):
    """An SGA run folder written before the rename (config.yaml and every export's embedded config say
    train.token_hole: nearest) edits with the nearest rule: the hole is the patches whose top-left pixel is
    masked (9 tokens here), not every touched patch (16)."""
    new_cfg = make_exports(tmp_path / "w")
    cfg = load_config(new_cfg)
    run = tmp_path / "old_run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(old_layout(to_dict(cfg), "nearest"), sort_keys=False))
    for stage in ("vqgan", "seg", "guide", "sga"):  # exports as older versions wrote them
        path = tmp_path / "w" / f"{stage}.pt"
        rec = read_export(path)
        write_export(path, stage=stage, network=rec["network"], state_dict=rec["state_dict"],
                     config=old_layout(rec["config"], "nearest"), lineage=rec["lineage"], step=rec["step"])
        assert config_from_dict(read_export(path)["config"], str(path)).model.token_hole == "nearest"
    img, seg = square(0, 256)
    mask = np.zeros((256, 256), np.uint8)
    mask[8:56, 8:56] = 255  # not on the 16 px token grid: the two rules differ
    m = torch.from_numpy(mask > 0).float()[None, None]
    assert (int(token_hole(m, "nearest").sum()), int(token_hole(m, "any").sum())) == (9, 16)
    files = write_inputs(tmp_path / "in", "e", img, seg, mask)
    p = cli(["edit", "--config", str(run / "config.yaml"), "--input", files["image"], "--seg", files["seg"],
             "--mask", files["mask"], "--class", "snow", "--device", "cpu", "--out", str(tmp_path / "o"),
             "--set", "infer.samples=1"])
    check(p)
    assert "train.token_hole is now model.token_hole" in p.stderr
    rec = json.loads((tmp_path / "o" / "e" / "record.json").read_text())
    assert rec["status"] == "ok" and rec["canvas"]["scale"] == 1.0 and rec["hole_tokens"] == 9
