"""The edit runner: edits -> guide picks (256) -> sampled hole tokens -> decoded, blended images.

One process per device (torchrun, or srun via slurm/edit_batch.sh). Rank r takes every world-th edit of the
sorted id list (`edits.split_for_rank`), so each edit is done exactly once with no communication. Several
edits and samples share one sampling call ((edit, sample) rows, `infer.batch_size` of them) even when their
masks differ; rows of one call must have the same image side.

Results depend only on the edit, the weights and the config: every random draw comes from a generator keyed
by (infer.seed, edit id, sample index, phase), tokenizers and the VQGAN decoder run one edit at a time, and
the guide's maps pass one row at a time (see sampler.py for the sampling rule).

Outputs under OUT (all written atomically):
    <edit_id>/sample_<k>.png   the k-th edited image (PNG: outside the blend band it equals the input)
    <edit_id>/preview.png      input | hole | edited labels | samples, side by side
    <edit_id>/record.json      status, timings, token counts, error; written last = the edit is done
    logs/rank<r>.jsonl         what each rank did, one line per edit (appended)
    run.json, config.yaml      the settings; a restart with other settings is refused
    manifest.jsonl             every record in id order, written by whichever rank finds all edits done
A killed run restarted with the same command skips edits that have a record.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image

from asset_dist.config import Config, save_config
from asset_dist.data.views import make_views
from asset_dist.infer import guides as G
from asset_dist.infer.blend import composite
from asset_dist.infer.edits import Edit, EditError, EditFiles, EditSet, decode_edit, png_bytes, split_for_rank
from asset_dist.infer.sampler import row_generator, sample_cached
from asset_dist.distenv import EXIT_REQUEUE, DistEnv, dist_env, pick_device
from asset_dist.models.tokens import FACTOR, Tokenizers, load_weights
from asset_dist.models.transformer import AssetTransformer
from asset_dist.utils import atomic_write_bytes, atomic_write_json, atomic_write_text

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
RECORD = "record.json"
MANIFEST = "manifest.jsonl"


def check_infer_config(cfg: Config) -> None:
    i = cfg.infer
    problems = []
    if i.precision not in DTYPES:
        problems.append(f"infer.precision must be one of {', '.join(DTYPES)} (got {i.precision!r})")
    for key, lo in (("samples", 1), ("batch_size", 1), ("blend_levels", 1), ("top_k", 0), ("blend_band", 0),
                    ("preview_size", 16)):
        if getattr(i, key) < lo:
            problems.append(f"infer.{key} must be >= {lo} (got {getattr(i, key)})")
    if i.temperature < 0:
        problems.append(f"infer.temperature must be >= 0 (got {i.temperature})")
    if problems:
        raise ValueError("; ".join(problems))


def weight_paths(cfg: Config) -> dict[str, str]:
    """infer.*_weights, falling back to train.*_weights (the SGA has no fallback: "" = guide-only)."""
    i, t = cfg.infer, cfg.train
    return {"vqgan": i.vqgan_weights or t.vqgan_weights, "seg": i.seg_weights or t.seg_weights,
            "guide": i.guide_weights or t.guide_weights, "sga": i.sga_weights}


@dataclass
class Models:
    tok: Tokenizers
    guide: AssetTransformer
    sga: Optional[AssetTransformer]
    device: torch.device
    guide_digest: str

    @property
    def mode(self) -> str:
        return "sga" if self.sga is not None else "guide-only"


def load_models(cfg: Config, device: torch.device, need_sga: bool = True) -> Models:
    from asset_dist.artifacts import file_digest

    paths = weight_paths(cfg)
    for key in ("vqgan", "seg", "guide"):
        if not paths[key]:
            raise ValueError(f"no {key} weights: set infer.{key}_weights (or train.{key}_weights) to an export")
    dtype = DTYPES[cfg.infer.precision]
    tok = Tokenizers(cfg, paths["vqgan"], paths["seg"]).to(device)
    guide = AssetTransformer(cfg.model.transformer)
    load_weights(guide, paths["guide"], "guide")
    guide.to(device=device, dtype=dtype).eval().requires_grad_(False)
    sga = None
    if need_sga and paths["sga"]:
        sga = AssetTransformer(cfg.model.transformer)
        load_weights(sga, paths["sga"], "sga")
        sga.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return Models(tok, guide, sga, device, file_digest(paths["guide"]))


# ----------------------------------------------------------------------------------------------------------
# One edit through the pipeline


@dataclass
class Prepared:
    files: EditFiles
    edit: Edit
    digest: str
    lr: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # 256 ids, cond, hole [1, 256]
    hr: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # full-size ids, cond, hole [1, L]
    timings: dict[str, float] = field(default_factory=dict)
    picks: dict[int, dict] = field(default_factory=dict)  # sample -> {key: [n, H, nb, K]}
    images: dict[int, np.ndarray] = field(default_factory=dict)
    guide_source: dict[int, str] = field(default_factory=dict)  # sample -> "loaded" | "computed"
    tokens: dict[str, int] = field(default_factory=lambda: {"guide": 0, "target": 0})
    error: Optional[str] = None

    @property
    def edit_id(self) -> str:
        return self.edit.edit_id

    @property
    def side(self) -> int:
        return self.edit.side


def _add(d: dict, key: str, value: float) -> None:
    d[key] = d.get(key, 0.0) + value


class EditRunner:
    """Runs batches of (edit, sample) rows; `guides_dir` supplies precomputed picks (missing/stale: computed)."""

    def __init__(self, cfg: Config, models: Models, samples: int, guides_dir: Optional[str] = None):
        self.cfg, self.m, self.samples = cfg, models, samples
        self.guides_dir = guides_dir or None
        t = cfg.model.transformer
        self.side_multiple = FACTOR * int(np.lcm(*[int(g) for g in t.block_grid]))

    # -------------------------------------------------------------------------------------------- prepare

    def fingerprint(self, digest: str) -> dict:
        i = self.cfg.infer
        return {"guide": self.m.guide_digest, "edit": digest, "seed": i.seed, "top_k": i.top_k,
                "temperature": i.temperature, "precision": i.precision, "token_hole": self.cfg.train.token_hole,
                "guide_k": self.cfg.model.transformer.guide_k, "causal_picks": self.cfg.model.transformer.causal_picks}

    def prepare(self, files: EditFiles, need_hr: bool = True) -> Prepared:
        """Decode, check and tokenize one edit (one at a time: tokens never depend on a batch)."""
        t0 = time.perf_counter()
        edit = decode_edit(files, self.cfg.model.seg.in_channels, self.side_multiple, self.cfg.train.token_hole,
                           self.cfg.data.label_shift)
        if need_hr and self.m.sga is None and edit.side != G.GUIDE_SIDE:
            raise EditError(f"edit {edit.edit_id!r}: image is {edit.side} px, but without SGA weights the guide "
                            f"samples only {G.GUIDE_SIDE} px edits: set infer.sga_weights to an SGA export")
        v = make_views(Image.fromarray(edit.image), edit.seg, edit.side, G.GUIDE_SIDE, None,
                       np.random.default_rng(0), False, short_side=edit.side, mask=edit.mask)
        dev = self.m.device
        tok = lambda s: self.m.tok(v["image" + s][None].to(dev), v["seg" + s][None].to(dev),  # noqa: E731
                                   v["mask" + s][None].to(dev))
        p = Prepared(files, edit, files.digest(), tok("_lr"), tok("") if need_hr else None)
        p.timings["prepare"] = time.perf_counter() - t0
        return p

    # -------------------------------------------------------------------------------------------- batches

    def _gens(self, rows, phase: str) -> list[torch.Generator]:
        return [row_generator(self.cfg.infer.seed, p.edit_id, k, phase) for p, k in rows]

    @staticmethod
    def _cat(rows, which: str) -> list[torch.Tensor]:
        return [torch.cat([getattr(p, which)[j] for p, _ in rows]) for j in range(3)]

    def guide_batch(self, rows: list[tuple[Prepared, int]], store: Optional[str] = None) -> None:
        """Fill p.picks[k] for the rows: from `guides_dir` when valid, else by running the guide (batched).
        store: also save computed picks there (precompute-guides)."""
        need = []
        for p, k in rows:
            got = G.load_picks(G.picks_path(self.guides_dir, p.edit_id, k), self.fingerprint(p.digest)) \
                if self.guides_dir else None
            if got is not None:
                p.picks[k], p.guide_source[k] = got[0], "loaded"
            else:
                need.append((p, k))
        if not need:
            return
        t0 = time.perf_counter()
        ids, cond, hole = self._cat(need, "lr")
        i = self.cfg.infer
        tokens, picks, _ = G.run_guide(self.m.guide, ids, cond, hole, self._gens(need, "guide"),
                                       top_k=i.top_k, temperature=i.temperature)
        dt = (time.perf_counter() - t0) / len(need)
        for j, (p, k) in enumerate(need):
            p.picks[k], p.guide_source[k] = G.row_picks(picks, j), "computed"
            p.tokens["guide"] += int(hole[j].sum())
            _add(p.timings, "guide", dt)
            if store:
                G.save_picks(G.picks_path(store, p.edit_id, k), p.picks[k], tokens[j], self.fingerprint(p.digest))

    def sample_batch(self, rows: list[tuple[Prepared, int]]) -> None:
        """Sample the hole tokens of the rows at full size, decode and blend each: p.images[k]."""
        i = self.cfg.infer
        ids, cond, hole = self._cat(rows, "hr")
        if self.m.sga is None:  # guide-only (256 px): the guide's own completion is the result
            model, guides, phase = self.m.guide, None, "guide"
        else:
            self.guide_batch(rows)
            model, phase = self.m.sga, "sga"
            guides = G.stack_picks([p.picks[k] for p, k in rows], ids.device)
        t0 = time.perf_counter()
        tokens, _ = sample_cached(model, ids, cond, hole, self._gens(rows, phase), guides=guides, top_k=i.top_k,
                                  temperature=i.temperature)
        dt = (time.perf_counter() - t0) / len(rows)
        for j, (p, k) in enumerate(rows):
            _add(p.timings, "sample", dt)
            p.tokens["target"] += int(hole[j].sum())
            t1 = time.perf_counter()
            out = self.m.tok.decode(tokens[j:j + 1], p.side, p.side)[0]  # one row: pixels never depend on a batch
            gen = ((out.float().permute(1, 2, 0).cpu().numpy() + 1.0) * 127.5).round().clip(0, 255).astype(np.uint8)
            p.images[k] = composite(gen, p.edit.image, p.edit.mask, i.blend_levels, i.blend_band)
            _add(p.timings, "decode_blend", time.perf_counter() - t1)

    def run_rows(self, rows: list[tuple[Prepared, int]], fn: Callable[[list], None]) -> None:
        """fn on batches of same-side rows; a failing batch is retried edit by edit, a failing edit recorded."""
        by_side: dict[int, list] = {}
        for r in rows:
            by_side.setdefault(r[0].side, []).append(r)
        bs = self.cfg.infer.batch_size
        for rs in by_side.values():
            for b in range(0, len(rs), bs):
                batch = [r for r in rs[b:b + bs] if r[0].error is None]
                if not batch:
                    continue
                try:
                    fn(batch)
                except Exception as e:  # noqa: BLE001 - isolate the edit that fails
                    edits = list({id(p): p for p, _ in batch}.values())
                    if len(edits) == 1:
                        edits[0].error = f"edit {edits[0].edit_id!r}: {type(e).__name__}: {e}"
                        continue
                    for p in edits:
                        try:
                            fn([r for r in batch if r[0] is p])
                        except Exception as e2:  # noqa: BLE001
                            p.error = f"edit {p.edit_id!r}: {type(e2).__name__}: {e2}"

    # -------------------------------------------------------------------------------------------- outputs

    def finish(self, p: Prepared, out: Path, env: DistEnv) -> dict:
        d = out / p.edit_id
        if p.error is not None:
            return failed_record(p.edit_id, p.error, env)
        t0 = time.perf_counter()
        names = []
        for k in range(self.samples):
            names.append(f"sample_{k}.png")
            atomic_write_bytes(d / names[-1], png_bytes(p.images[k]))
        atomic_write_bytes(d / "preview.png", png_bytes(preview(p.edit, [p.images[k] for k in range(self.samples)],
                                                                self.cfg.infer.preview_size)))
        p.timings["write"] = time.perf_counter() - t0
        hole = int(p.hr[2].sum())
        return {"edit": p.edit_id, "status": "ok", "error": None, "size": p.side, "class_id": p.edit.class_id,
                "class_name": p.edit.class_name, "mode": self.m.mode, "samples": self.samples,
                "hole_tokens": hole, "tokens_sampled": dict(p.tokens),
                "guides": sorted(set(p.guide_source.values())) or None,
                "timings_s": {k: round(v, 4) for k, v in p.timings.items()},
                "outputs": names + ["preview.png"], "rank": env.rank, "world_size": env.world_size}


def failed_record(edit_id: str, error: str, env: DistEnv) -> dict:
    return {"edit": edit_id, "status": "failed", "error": error, "rank": env.rank, "world_size": env.world_size}


PALETTE = np.random.default_rng(12345).integers(40, 256, (256, 3)).astype(np.uint8)


def preview(edit: Edit, samples: list[np.ndarray], size: int) -> np.ndarray:
    """input | input with the hole tinted | edited label map (fixed palette) | samples, each size x size."""
    m = edit.mask.astype(bool)[..., None]
    tint = np.where(m, (0.5 * edit.image + 0.5 * np.array([255, 0, 0])).astype(np.uint8), edit.image)
    tiles = [edit.image, tint, PALETTE[edit.seg]] + list(samples)
    small = [np.array(Image.fromarray(t).resize((size, size), Image.BOX if t.shape[0] >= size else Image.NEAREST))
             for t in tiles]
    return np.concatenate(small, 1)


# ----------------------------------------------------------------------------------------------------------
# Resumable distributed runs


def read_record(out: Path, edit_id: str) -> Optional[dict]:
    try:
        rec = json.loads((out / edit_id / RECORD).read_text())
        return rec if isinstance(rec, dict) and rec.get("status") in ("ok", "failed") else None
    except (OSError, ValueError):
        return None


def write_manifest_if_complete(out: Path, all_ids: list[str]) -> bool:
    """Every edit has a record -> OUT/manifest.jsonl (atomic; several ranks may write the same content)."""
    recs = []
    for eid in sorted(all_ids):
        rec = read_record(out, eid)
        if rec is None:
            return False
        recs.append(rec)
    atomic_write_text(out / MANIFEST, "".join(json.dumps(r, sort_keys=True) + "\n" for r in recs))
    return True


def _check_run_settings(out: Path, settings: dict, env: DistEnv) -> None:
    path = out / "run.json"
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = None
        if old is not None and old != settings:
            diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
            raise ValueError(f"{out} holds a run with other settings (saved vs now: {diff}); use another --out "
                             "or the same settings")
    if env.is_main:
        atomic_write_json(path, settings)


class _StopFlag:
    """USR1 (SLURM's time-limit warning) or TERM: finish the current chunk, then exit EXIT_REQUEUE."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self):
        self.set = False
        self.saved: dict = {}

    def __enter__(self) -> "_StopFlag":
        def handler(signum, frame):  # noqa: ARG001
            self.set = True
        self.saved = {sig: signal.signal(sig, handler) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self.saved.items():
            signal.signal(sig, old)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_batch_edits(cfg: Config, edits: str, out: str | Path, *, guides_dir: Optional[str] = None,
                    samples: Optional[int] = None, device: str = "auto", retry_failed: bool = False,
                    redo: bool = False, env: Optional[DistEnv] = None, edit_set=None) -> int:
    """edit-batch: this rank's share of the edits; returns 0, or EXIT_REQUEUE when stopped by a signal.
    edit_set: anything with `.ids` and `.load(id)` instead of shards; redo: ignore existing records."""
    check_infer_config(cfg)
    env = env or dist_env()
    samples = samples or cfg.infer.samples
    out = Path(out)
    eset = edit_set if edit_set is not None else EditSet(edits)
    all_ids = eset.ids
    mine = split_for_rank(all_ids, env.rank, env.world_size)
    out.mkdir(parents=True, exist_ok=True)
    paths = weight_paths(cfg)
    i = cfg.infer
    _check_run_settings(out, {"samples": samples, "seed": i.seed, "top_k": i.top_k, "temperature": i.temperature,
                              "precision": i.precision, "blend_levels": i.blend_levels, "blend_band": i.blend_band,
                              "token_hole": cfg.train.token_hole, "weights": paths}, env)
    if env.is_main:
        save_config(cfg, out / "config.yaml")
    pending = []
    for eid in mine:
        rec = read_record(out, eid)
        if redo or rec is None or (retry_failed and rec["status"] == "failed"):
            pending.append(eid)
    _log(f"[rank {env.rank}/{env.world_size}] {len(mine)} edit(s) of {len(all_ids)}, {len(mine) - len(pending)} "
         f"already done, {len(pending)} to do -> {out}")
    crashed = 0
    if pending:
        with _StopFlag() as stop:
            stopped, crashed = _run_pending(cfg, eset, pending, out, samples, guides_dir, device, env, stop)
            if stopped:
                return EXIT_REQUEUE
    if write_manifest_if_complete(out, all_ids):
        _log(f"[rank {env.rank}] all {len(all_ids)} edits done: {out / MANIFEST}")
    else:
        _log(f"[rank {env.rank}] finished its share; {out / MANIFEST} is written by the last rank to finish")
    if crashed:  # bad inputs are the data's problem (exit 0); an error while computing may be ours: say so
        _log(f"[rank {env.rank}] {crashed} edit(s) failed with an error while computing (see their records); "
             "rerun with --retry-failed after fixing the cause")
        return 1
    return 0


def _run_pending(cfg: Config, eset, pending: list[str], out: Path, samples: int, guides_dir: Optional[str],
                 device: str, env: DistEnv, stop: "_StopFlag") -> tuple[bool, int]:
    """The edits of `pending`, chunk by chunk -> (stopped by a signal, edits that failed while computing)."""
    from tqdm import tqdm

    i = cfg.infer
    models = load_models(cfg, pick_device(env, device))
    runner = EditRunner(cfg, models, samples, guides_dir)
    per_chunk = max(1, -(-i.batch_size // samples))
    log_path = out / "logs" / f"rank{env.rank}.jsonl"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(pending), desc=f"edits rank {env.rank}", unit="edit", disable=None, file=sys.stderr)
    n_failed = n_crashed = 0
    for c in range(0, len(pending), per_chunk):
        if stop.set:
            _log(f"[rank {env.rank}] stop signal: {len(pending) - c} edit(s) left for the restart")
            bar.close()
            return True, n_crashed
        preps, recs = [], {}
        for eid in pending[c:c + per_chunk]:
            for tmp in (out / eid).glob(".*.tmp"):  # left by a killed run: never complete
                tmp.unlink(missing_ok=True)
            try:
                preps.append(runner.prepare(eset.load(eid)))
            except EditError as e:
                recs[eid] = failed_record(eid, str(e), env)
        runner.run_rows([(p, k) for p in preps for k in range(samples)], runner.sample_batch)
        n_crashed += sum(p.error is not None for p in preps)
        recs.update({p.edit_id: runner.finish(p, out, env) for p in preps})
        for eid in pending[c:c + per_chunk]:
            rec = recs[eid]
            atomic_write_json(out / eid / RECORD, rec)
            with open(log_path, "a") as f:
                f.write(json.dumps({"edit": eid, "status": rec["status"], "rank": env.rank,
                                    "world_size": env.world_size, "time": time.time()}) + "\n")
            if rec["status"] != "ok":
                n_failed += 1
                _log(f"[rank {env.rank}] FAILED {rec['error']}")
            bar.update()
    bar.close()
    _log(f"[rank {env.rank}] done: {len(pending) - n_failed} ok, {n_failed} failed")
    return False, n_crashed


def run_precompute(cfg: Config, edits: str, out: str | Path, *, samples: Optional[int] = None,
                   device: str = "auto", env: Optional[DistEnv] = None) -> int:
    """precompute-guides: picks for every (edit, sample) of this rank's share; existing valid files are kept."""
    from tqdm import tqdm

    check_infer_config(cfg)
    env = env or dist_env()
    samples = samples or cfg.infer.samples
    out = Path(out)
    eset = EditSet(edits)
    mine = split_for_rank(eset.ids, env.rank, env.world_size)
    models = load_models(cfg, pick_device(env, device), need_sga=False)
    runner = EditRunner(cfg, models, samples, guides_dir=str(out))
    per_chunk = max(1, -(-cfg.infer.batch_size // samples))
    n_failed = n_kept = 0
    bar = tqdm(total=len(mine), desc=f"guides rank {env.rank}", unit="edit", disable=None, file=sys.stderr)
    for c in range(0, len(mine), per_chunk):
        preps = []
        for eid in mine[c:c + per_chunk]:
            try:
                files = eset.load(eid)
                fp = runner.fingerprint(files.digest())
                if all(G.load_picks(G.picks_path(out, eid, k), fp) is not None for k in range(samples)):
                    n_kept += 1  # resumable: this edit is complete already (cheap check, before tokenizing)
                    continue
                preps.append(runner.prepare(files, need_hr=False))
            except EditError as e:
                n_failed += 1
                atomic_write_json(out / eid / "failed.json", failed_record(eid, str(e), env))
                _log(f"[rank {env.rank}] FAILED {e}")
        runner.run_rows([(p, k) for p in preps for k in range(samples)],
                        lambda rows: runner.guide_batch(rows, store=str(out)))
        for p in preps:
            if p.error is not None:
                n_failed += 1
                atomic_write_json(out / p.edit_id / "failed.json", failed_record(p.edit_id, p.error, env))
                _log(f"[rank {env.rank}] FAILED {p.error}")
            else:
                (out / p.edit_id / "failed.json").unlink(missing_ok=True)
        bar.update(len(mine[c:c + per_chunk]))
    bar.close()
    _log(f"[rank {env.rank}/{env.world_size}] guides: {len(mine)} edit(s), {n_kept} already complete, "
         f"{n_failed} failed -> {out}")
    return 0
