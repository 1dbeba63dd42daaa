"""The streaming loader: exact views, rank x worker split, mid-epoch resume, corrupt data."""
from __future__ import annotations

import dataclasses
import io
import json
import tarfile
from collections import Counter
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from asset_dist.config import DataConfig, MaskConfig
from asset_dist.data import build_loader, iter_forever, make_views, sample_mask, sample_rng
from asset_dist.data.loader import finalize_batch
from asset_dist.data.shards import DataError, Shard, reader_parts, resolve_shards
from asset_dist.data.shardwriter import run_sharding, write_tar

torch.set_num_threads(1)


def _cfg(shards, **kw) -> DataConfig:
    base = dict(train_shards=str(shards), resolution=256, batch_size=3, num_workers=0, shuffle_buffer=8)
    return DataConfig(**{**base, **kw})


def _manifest_meta(shards: Path, split: str) -> dict[str, dict]:
    """key -> the sample's .json member, read with tarfile."""
    m = json.loads((shards / "manifest.json").read_text())
    out = {}
    for s in m["splits"][split]["shards"]:
        with tarfile.open(shards / s["name"]) as tf:
            for member in tf.getmembers():
                if member.name.endswith(".json"):
                    out[member.name[: -len(".json")]] = json.loads(tf.extractfile(member).read())
    return out


def _manifest_keys(shards: Path, split: str) -> list[str]:
    return list(_manifest_meta(shards, split))


def _nearest(n_out: int, n_in: int) -> np.ndarray:
    """Oracle for nearest resizing: the source pixel under each output pixel's centre, exact."""
    return np.array([((2 * x + 1) * n_in) // (2 * n_out) for x in range(n_out)])


def test_val_views_exact(sflckr_shards, sample_data):
    src = sample_data / "sflckr"
    cfg = _cfg(sflckr_shards, batch_size=2)
    batches = list(build_loader(cfg, "val", 0, 1))
    keys = [k for b in batches for k in b["key"]]
    assert sorted(keys) == sorted(_manifest_keys(sflckr_shards, "val")) and len(keys) == 5
    b = batches[0]
    assert b["image"].shape == (2, 3, 256, 256) and b["image"].dtype == torch.float32
    assert b["seg"].dtype == torch.long and b["mask"].shape == (2, 1, 256, 256) and b["seg_lr"].shape == (2, 256, 256)
    assert b["image"].min() >= -1 and b["image"].max() <= 1
    files = {p.relative_to(src / "images").with_suffix("").as_posix().replace("/", "_"): p
             for p in (src / "images").rglob("*.jpg")}
    for b in batches:
        for i, key in enumerate(b["key"]):
            img = Image.open(files[key]).convert("RGB")
            lab = np.asarray(Image.open(str(files[key]).replace("/images/", "/segmentations/")[:-4] + ".png"))
            w, h = img.size
            s = 256 / min(w, h)
            nw, nh = max(256, round(w * s)), max(256, round(h * s))
            x0, y0 = (nw - 256) // 2, (nh - 256) // 2  # centre crop for validation
            seg = lab[np.ix_(_nearest(nh, h), _nearest(nw, w))][y0:y0 + 256, x0:x0 + 256]
            np.testing.assert_array_equal(b["seg"][i].numpy(), seg)  # exact label values
            ref = np.asarray(img.resize((nw, nh), Image.BOX if s <= 1 else Image.BILINEAR))[y0:y0 + 256, x0:x0 + 256]
            ref = torch.from_numpy(ref.copy()).permute(2, 0, 1).float() / 127.5 - 1
            assert (b["image"][i] - ref).abs().max() <= 1 / 127.5 + 1e-6
            mask = sample_mask(seg, cfg.mask, sample_rng(cfg.seed, 0, key), 256)
            np.testing.assert_array_equal(b["mask"][i, 0].numpy(), mask)
            v = make_views(img, lab, 256, 256, cfg.mask, sample_rng(cfg.seed, 0, key), False)  # the public API
            for k in ("image", "seg", "mask", "image_lr", "seg_lr", "mask_lr"):  # bit for bit: one conversion
                assert v[k].dtype == b[k].dtype and torch.equal(v[k], b[k][i]), k
    # uint8 batches (for conversion on the device) hold the same values
    raw = next(iter(build_loader(cfg, "val", 0, 1, convert=False)))
    assert raw["image"].dtype == torch.uint8 and raw["seg"].dtype == torch.uint8
    fin = finalize_batch(raw)
    for k in ("image", "seg", "mask", "image_lr", "seg_lr", "mask_lr"):
        assert fin[k].dtype == batches[0][k].dtype and torch.equal(fin[k], batches[0][k]), k


def test_lowres_view_is_the_downsampled_crop(sflckr_shards, sample_data):
    cfg = _cfg(sflckr_shards, resolution=512, batch_size=4, mask=MaskConfig(max_ratio=0.6))
    loader = build_loader(cfg, "train", 0, 1)
    with pytest.warns(UserWarning, match="upscaled"):
        batches = list(loader)
    small = [k for k, m in _manifest_meta(sflckr_shards, "train").items() if min(m["width"], m["height"]) < 512]
    assert loader.stats["upscaled"] == len(small) > 0 and loader.stats["samples"] == 20
    for b in batches:
        assert b["image"].shape[-1] == 512 and b["image_lr"].shape[-1] == 256
        pooled = F.avg_pool2d(b["image"], 2)  # area resize by 2 = 2x2 mean; the view is rounded to uint8
        assert (b["image_lr"] - pooled).abs().max() <= 1 / 127.5 + 1e-5
        assert torch.equal(b["seg_lr"], b["seg"][:, 1::2, 1::2])
        assert torch.equal(b["mask_lr"], b["mask"][:, :, 1::2, 1::2])
        assert set(b["mask"].unique().tolist()) <= {0.0, 1.0} and (b["mask"].sum((1, 2, 3)) > 0).all()

    # 1024 stage: the mask is sampled at 512 and upsampled; images smaller than 1024 are upscaled (counted)
    img = Image.open(next((sample_data / "sflckr" / "images").rglob("*.jpg")))
    seg = np.random.default_rng(0).integers(0, 3, (img.size[1] // 8, img.size[0] // 8)).astype(np.uint8)
    v = make_views(img, seg, 1024, 256, MaskConfig(), np.random.default_rng(0), True)
    assert v["upscaled"] and v["image"].shape == (3, 1024, 1024)
    assert torch.equal(v["mask"][0, ::2, ::2], v["mask"][0, 1::2, 1::2])  # 2x2 blocks: sampled at 512
    assert torch.equal(v["seg_lr"], v["seg"][2::4, 2::4])
    assert (v["image_lr"] - F.avg_pool2d(v["image"][None], 4)[0]).abs().max() <= 1 / 127.5 + 1e-5


@pytest.fixture(scope="module")
def coco_shards(sample_data, tmp_path_factory) -> Path:
    src = sample_data / "coco_stuff"
    out = tmp_path_factory.mktemp("coco_shards")
    run_sharding(src / "images", src / "segmentations", out, samples_per_shard=12, log=lambda m: None)
    return out


def test_coco_label_shift_and_wrong_convention_error(coco_shards, sample_data):
    src = sample_data / "coco_stuff" / "segmentations"
    cfg = _cfg(coco_shards, label_shift=1, num_classes=183, resize_short_side=296, batch_size=5,
               mask=MaskConfig(kind="coco"))
    n, zeros = 0, 0
    for b in build_loader(cfg, "train", 0, 1):
        for i, key in enumerate(b["key"]):
            raw = np.unique(np.asarray(Image.open(src / f"{key}.png")))
            shifted = set(((raw.astype(int) + 1) % 256).tolist())
            got = set(b["seg"][i].unique().tolist())
            assert got <= shifted and max(got) <= 182
            zeros += 0 in got
            n += 1
    assert n == 35 and zeros > 0  # 255 (unlabeled) became 0
    with pytest.raises(DataError, match=r"train-\d{6}\.tar: label value 255 >= data.num_classes=182.*label_shift=1"):
        list(build_loader(_cfg(coco_shards, batch_size=5), "train", 0, 1))


def test_split_covers_every_sample_once_pure():
    for n_shards in (1, 3, 5, 8):
        shards = [Shard(f"s{i:02d}.tar", 7 + i) for i in range(n_shards)]
        for world in (1, 2, 3):
            for workers in (1, 2, 4):
                for epoch in (0, 1):
                    seen = Counter()
                    for rank in range(world):
                        for w in range(workers):
                            parts = reader_parts(shards, seed=5, epoch=epoch, shuffle=True, rank=rank,
                                                 world_size=world, worker=w, num_workers=workers)
                            assert parts, "every reader has work"
                            for p in parts:
                                seen.update((p.shard.url, i) for i in range(p.offset, p.shard.samples, p.stride))
                    want = {(s.url, i) for s in shards for i in range(s.samples)}
                    assert set(seen) == want and set(seen.values()) == {1}


@pytest.mark.parametrize("split", ["train", "val"])  # 5 train shards; 2 val shards (< 4 readers: interleaved)
def test_world2_workers2_reads_every_sample_once(sflckr_shards, split):
    cfg = _cfg(sflckr_shards, num_workers=2, batch_size=2)
    keys = [k for rank in range(2) for b in build_loader(cfg, split, rank, 2) for k in b["key"]]
    assert Counter(keys) == Counter(_manifest_keys(sflckr_shards, split))


def _take(it, n):
    return [{k: v for k, v in b.items()} for b in islice(it, n)]


def _same(a: list[dict], b: list[dict]) -> None:
    assert [x["key"] for x in a] == [x["key"] for x in b]
    for x, y in zip(a, b):
        for k in ("image", "mask", "seg_lr"):
            assert torch.equal(x[k], y[k]), k


@pytest.mark.parametrize("workers,cut", [(0, 3), (2, 3), (2, 8)])
def test_resume_mid_epoch_continues_the_sequence(sflckr_shards, workers, cut):
    # rank 0 of 2 reads 3 shards (12 samples): with 2 workers one worker runs dry first (8 vs 4 samples)
    cfg = _cfg(sflckr_shards, num_workers=workers, batch_size=3, resolution=128, guide_resolution=64,
               resize_short_side=128)
    total = 11  # batches: crosses two epoch boundaries
    ref = _take(iter_forever(build_loader(cfg, "train", 0, 2)), total)
    first = build_loader(cfg, "train", 0, 2)
    a = _take(iter_forever(first), cut)
    state = json.loads(json.dumps(first.state_dict()))  # JSON-able
    if workers:  # the round-robin resumes at worker 1 (exercises the worker rotation)
        assert state["next_worker"] == 1 and state["epoch"] == cut // 5
    second = build_loader(cfg, "train", 0, 2)
    second.load_state_dict(state)
    b = _take(iter_forever(second), total - cut)
    _same(ref, a + b)
    assert len({tuple(x["key"]) for x in ref}) > 1


def test_epochs_reshuffle_deterministically(sflckr_shards):
    cfg = _cfg(sflckr_shards, resolution=128, guide_resolution=64, resize_short_side=128)
    loader = build_loader(cfg, "train", 0, 1)
    e0 = [k for b in loader for k in b["key"]]
    assert [k for b in build_loader(cfg, "train", 0, 1) for k in b["key"]] == e0
    loader.set_epoch(1)
    e1 = [k for b in loader for k in b["key"]]
    assert sorted(e0) == sorted(e1) and e0 != e1
    with pytest.raises(ValueError, match="world_size"):
        build_loader(cfg, "train", 0, 2).load_state_dict(loader.state_dict())
    with pytest.raises(ValueError, match="'train' split"):
        build_loader(cfg, "val", 0, 1).load_state_dict(loader.state_dict())
    other = build_loader(cfg, "train", 0, 2)
    with pytest.warns(UserWarning, match="restarting epoch 1"):
        other.load_state_dict(loader.state_dict(), strict=False)
    assert other.epoch == 1 and other.state_dict()["consumed"] == [0]


def _jpeg(seed: int, size=(300, 270)) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


def _png(size=(300, 270)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0]), 3, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_corrupt_samples_are_counted_then_stop_the_run(tmp_path):
    good = [(f"k{i}", {"jpg": _jpeg(i), "seg.png": _png(), "json": b"{}"}) for i in range(4)]
    bad = [("bad0", {"jpg": b"\xff\xd8 not a jpeg", "seg.png": _png(), "json": b"{}"}),
           ("bad1", {"jpg": _jpeg(9), "json": b"{}"})]  # no label map
    write_tar(tmp_path / "a-000000.tar", good[:2] + bad)
    write_tar(tmp_path / "a-000001.tar", good[2:])
    pattern = str(tmp_path / "a-{000000..000001}.tar")
    loader = build_loader(_cfg(pattern, max_corrupt_fraction=0.5), "train", 0, 1)
    keys = [k for b in loader for k in b["key"]]
    assert sorted(keys) == ["k0", "k1", "k2", "k3"] and loader.stats["corrupt"] == 2
    # the counts travel with the loader's checkpoint state (the training logs report them as running totals)
    again = build_loader(_cfg(pattern, max_corrupt_fraction=0.5), "train", 0, 1)
    again.load_state_dict(json.loads(json.dumps(loader.state_dict())))
    assert again.stats["corrupt"] == 2 and again.stats["samples"] == 4
    with pytest.raises(DataError, match=r"2 of 6 samples corrupt.*a-000000\.tar"):
        list(build_loader(_cfg(pattern, max_corrupt_fraction=0.1), "train", 0, 1))
    # a truncated shard file: the lost samples count as corrupt and the error names the shard
    data = (tmp_path / "a-000001.tar").read_bytes()
    (tmp_path / "a-000001.tar").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"a-000001\.tar.*unreadable shard"):
        list(build_loader(_cfg(str(tmp_path / "a-000001.tar"), max_corrupt_fraction=0.1), "train", 0, 1))


def test_shard_sources(sflckr_shards):
    by_dir = resolve_shards(str(sflckr_shards), "train")
    by_manifest = resolve_shards(str(sflckr_shards / "manifest.json"), "train")
    by_pattern = resolve_shards(str(sflckr_shards / "train-{000000..000004}.tar"), "train")
    assert by_dir == by_manifest == by_pattern and [s.samples for s in by_dir] == [4] * 5
    with pytest.raises(ValueError, match="not found"):
        resolve_shards(str(sflckr_shards / "train-{000000..000009}.tar"), "train")
    with pytest.raises(ValueError, match="no 'test' split"):
        resolve_shards(str(sflckr_shards), "test")
    assert build_loader(_cfg(sflckr_shards), "val", 1, 2).num_samples + \
        build_loader(_cfg(sflckr_shards), "val", 0, 2).num_samples == 5


def test_reused_worker_buffers_never_change_batches_the_caller_holds(sflckr_shards):
    """Workers fill reused shared-memory slots, handed back only once no tensor uses them: batches kept by
    the caller (all of them: more than a worker's slots) or dropped at once hold the in-process values."""
    cfg = _cfg(sflckr_shards, resolution=64, guide_resolution=32, resize_short_side=64, batch_size=1)
    ref = {b["key"][0]: b for b in build_loader(cfg, "train", 0, 1, convert=False)}  # in-process, fresh buffers
    fields = ("image", "image_lr", "seg", "seg_lr", "mask", "mask_lr")
    workers = dataclasses.replace(cfg, num_workers=2)
    held = list(build_loader(workers, "train", 0, 1, convert=False))  # 10 batches per worker > MAX_SLOTS
    assert len(held) == 20
    streamed = 0
    for b in build_loader(workers, "train", 0, 1, convert=False):  # each batch dropped once checked
        assert all(torch.equal(b[k], ref[b["key"][0]][k]) for k in fields)
        streamed += 1
    floats = list(build_loader(workers, "train", 0, 1))  # converted into reused output buffers
    assert streamed == 20 and len(floats) == 20
    for b in held:
        assert all(torch.equal(b[k], ref[b["key"][0]][k]) for k in fields), b["key"]
    for b in floats:
        want = finalize_batch(ref[b["key"][0]])
        assert all(torch.equal(b[k], want[k]) for k in fields), b["key"]


def test_without_torchs_use_count_batches_are_copied_out(sflckr_shards, monkeypatch):
    """A torch without the private storage use count: slot reuse cannot be tracked, so lent batches are
    copies and the caller's held batches still never change."""
    from asset_dist.data import buffers

    monkeypatch.setattr(buffers, "_SOLE", -1)
    cfg = _cfg(sflckr_shards, resolution=64, guide_resolution=32, resize_short_side=64, batch_size=1)
    ref = {b["key"][0]: b for b in build_loader(cfg, "train", 0, 1, convert=False)}
    held = list(build_loader(dataclasses.replace(cfg, num_workers=2), "train", 0, 1, convert=False))
    assert len(held) == 20
    for b in held:
        assert all(torch.equal(b[k], ref[b["key"][0]][k]) for k in ("image", "seg", "mask", "image_lr")), b["key"]


@pytest.mark.parametrize("workers", [0, 1])
def test_shards_are_checked_against_their_manifest(tmp_path, sflckr_shards, workers):
    """A shard of another size is refused at start; one of the same size but other bytes (another valid tar) on
    first read, through a worker too, as a DataError naming it; data.verify=false skips the sha256 only."""
    import shutil

    d = tmp_path / "s"
    shutil.copytree(sflckr_shards, d)
    name = json.loads((d / "manifest.json").read_text())["splits"]["train"]["shards"][2]["name"]
    data = bytearray((d / name).read_bytes())
    with tarfile.open(d / name) as tf:  # flip one byte of the first image: same size, still a valid tar
        first = next(m for m in tf.getmembers() if m.name.endswith(".jpg"))
    data[first.offset_data + first.size // 2] ^= 0xFF
    (d / name).write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"{name}: sha256 .* differs from its manifest"):
        list(build_loader(_cfg(d, num_workers=workers), "train", 0, 1))
    assert len(list(build_loader(_cfg(d, num_workers=workers, verify=False), "train", 0, 1))) > 0
    (d / name).write_bytes(bytes(data[:-512]))
    with pytest.raises(DataError, match=rf"{name}: \d+ bytes, its manifest says \d+"):
        build_loader(_cfg(d, num_workers=workers), "train", 0, 1)


def test_pipe_sources_need_the_config_switch(tmp_path):
    marker = tmp_path / "ran"
    with pytest.raises(ValueError, match="runs a shell command.*data.allow_pipe=true"):
        build_loader(_cfg(f"pipe:touch {marker}"), "train", 0, 1)
    assert not marker.exists()
    assert resolve_shards(f"pipe:cat {tmp_path}/x.tar", "train", allow_pipe=True)[0].url.startswith("pipe:")


def test_workers_report_the_shards_they_verified(sflckr_shards):
    """A worker hashes a shard once; the key reaches the main process with the next batch, so the next epoch's
    workers (forked from it) do not hash the shard again."""
    from asset_dist.data import shards as S

    S._VERIFIED.clear()
    loader = build_loader(_cfg(sflckr_shards, num_workers=2), "train", 0, 1)
    assert len(list(loader)) > 0
    assert {k[0] for k in S._VERIFIED} == {s.url for s in loader.shards}
