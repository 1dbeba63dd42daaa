"""The edit runner: edits -> guide picks (256) -> sampled hole tokens -> decoded, blended images.

One process per device (torchrun, or srun via slurm/edit_batch.sh), plus any helpers started with `--join`.
Workers claim chunks of `infer.claim_chunk` edits of the sorted id list on the shared filesystem as they need
work (`claims.py`: exclusive claim files with heartbeats, expired ones taken over), so each edit is done exactly
once, fast and slow workers finish together and a dead worker's edits are redone by the others;
`infer.claim_chunk=0` keeps the static split (rank r takes every world-th id: `edits.split_for_rank`). The
(edit, sample) rows of all its edits feed one queue of the continuous sampler (`scheduler.py`), which keeps
`infer.batch_size` rows sampling, each at its own position, whatever their masks (rows of other image sizes
wait for their own lane); the runner only feeds the queue and collects finished rows.

Results depend only on the edit, the weights and the config: every random draw comes from a generator keyed
by (infer.seed, edit id, sample index, phase), tokenizers and the VQGAN decoder run one edit at a time, and
the guide's maps pass one row at a time (see sampler.py for the sampling rule).

Outputs under OUT (all written atomically):
    <edit_id>/sample_<k>.png   the k-th edited image (PNG: outside the blend band it equals the input)
    <edit_id>/preview.png      input | hole | edited labels | samples, side by side
    <edit_id>/record.json      status, timings, token counts, error; written last = the edit is done
    logs/<worker>.jsonl        what each worker (rank<r>, a helper rank<r>-<id>) wrote, one line per edit
    claims/                    the claim session: session.json and one file per chunk (claims.py)
    run.json, config.yaml      the settings; a restart with other settings is refused
    logs/<worker>.stats.jsonl  the sampling schedule and timing of each session of each worker
    manifest.jsonl             every record in id order, written by whichever worker finds all edits done
    summary.json               with the manifest: per worker hole tokens, decode steps, batch size, rows active per
                               step, efficiency (steps x batch / hole tokens), edits written, busy time and idle
                               time at the end; per node; in total
A killed run restarted with the same command skips edits that have a record.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from PIL import Image

import asset_dist.official.attention  # noqa: F401  registers transformer.sga_semantics "official"
from asset_dist.config import Config, save_config, validate
from asset_dist.data.views import image_to_unit
from asset_dist.infer import canvas as C
from asset_dist.infer import claims
from asset_dist.infer import guides as G
from asset_dist.infer.classes import table_for_config
from asset_dist.infer.edits import Edit, EditError, EditFiles, EditSet, decode_edit, png_bytes, split_for_rank
from asset_dist.infer.progress import Progress
from asset_dist.infer.results import FORMATS, open_results
from asset_dist.infer.sampler import row_generator
from asset_dist.infer.scheduler import ContinuousSampler, Row, ScheduleStats
from asset_dist.distenv import DistEnv, dist_env, pick_device
from asset_dist.exitcodes import EXIT_REQUEUE
from asset_dist.models.tokens import Tokenizers, load_weights
from asset_dist.models.transformer import AssetTransformer
from asset_dist.runlock import job_lock
from asset_dist.utils import InputError, atomic_write_json, atomic_write_text, check_id, inside, writable_dir

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
MANIFEST = "manifest.jsonl"


def weight_paths(cfg: Config) -> dict[str, str]:
    """infer.*_weights, falling back to train.*_weights (the SGA has no fallback: "" = guide-only)."""
    i, t = cfg.infer, cfg.train
    return {"vqgan": i.vqgan_weights or t.vqgan_weights, "seg": i.seg_weights or t.seg_weights,
            "guide": i.guide_weights or t.guide_weights, "sga": i.sga_weights}


def canvas_resolution(cfg: Config) -> int:
    """R of `canvas.plan`: infer.resolution, else the SGA model's training resolution; guide-only: 256."""
    if not weight_paths(cfg)["sga"]:
        return C.GUIDE
    return cfg.infer.resolution or cfg.data.resolution


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
    canvas: C.Canvas  # where the edit is sampled (a window of the photo at the model's scale)
    lr: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # the guide's view: ids, cond, hole [1, Lg]
    hr: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # the working canvas: ids, cond, hole [1, L]
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
    def geometry(self) -> tuple:
        """Rows of the same geometry can share a sampling call."""
        return self.canvas.hw, self.canvas.guide_hw


def _add(d: dict, key: str, value: float) -> None:
    d[key] = d.get(key, 0.0) + value


class EditRunner:
    """Runs batches of (edit, sample) rows; `guides_dir` supplies precomputed picks (missing/stale: computed)."""

    def __init__(self, cfg: Config, models: Models, samples: int, guides_dir: Optional[str] = None):
        self.cfg, self.m, self.samples = cfg, models, samples
        self.guides_dir = guides_dir or None
        self.classes = table_for_config(cfg)
        self.resolution = canvas_resolution(cfg)

    # -------------------------------------------------------------------------------------------- prepare

    def fingerprint(self, digest: str) -> dict:
        i = self.cfg.infer
        return {"guide": self.m.guide_digest, "edit": digest, "seed": i.seed, "top_k": i.top_k,
                "temperature": i.temperature, "precision": i.precision, "token_hole": self.cfg.model.token_hole,
                "guide_k": self.cfg.model.transformer.guide_k, "causal_picks": self.cfg.model.transformer.causal_picks,
                "resolution": self.resolution, "blend_band": i.blend_band}  # these two place the canvas

    def prepare(self, files: EditFiles, need_hr: bool = True) -> Prepared:
        """Decode and check one edit, place it on its canvas and tokenize the working image and the guide's view
        (one edit at a time: tokens never depend on a batch)."""
        t0 = time.perf_counter()
        edit = decode_edit(files, self.cfg.model.seg.in_channels, self.cfg.model.token_hole,
                           self.cfg.data.label_shift)
        canvas = C.plan(edit.edit_id, edit.mask, self.resolution, self.cfg.infer.blend_band)
        v = C.working_views(canvas, edit.image, edit.seg, edit.mask)
        dev = self.m.device

        def tok(s: str):
            image = image_to_unit(torch.tensor(v["image" + s]).permute(2, 0, 1)[None].to(dev))
            seg = torch.tensor(v["seg" + s], dtype=torch.long)[None].to(dev)
            mask = torch.tensor(v["mask" + s], dtype=torch.float32)[None, None].to(dev)
            return self.m.tok(image, seg, mask)
        p = Prepared(files, edit, files.digest(), canvas, tok("_lr"), tok("") if need_hr else None)
        if need_hr and not bool(p.hr[2].any()):
            raise EditError(f"edit {edit.edit_id!r}: the mask yields no hole token on the {canvas.W}x{canvas.H} "
                            f"working canvas under the '{self.cfg.model.token_hole}' token-hole rule; enlarge it "
                            "or use model.token_hole=any")
        p.timings["prepare"] = time.perf_counter() - t0
        return p

    # -------------------------------------------------------------------------------------------- batches

    def _gens(self, rows, phase: str) -> list[torch.Generator]:
        return [row_generator(self.cfg.infer.seed, p.edit_id, k, phase) for p, k in rows]

    @staticmethod
    def _cat(rows, which: str) -> list[torch.Tensor]:
        return [torch.cat([getattr(p, which)[j] for p, _ in rows]) for j in range(3)]

    def guide_batch(self, rows: list[tuple[Prepared, int]], store: Optional[str] = None, on_step=None) -> None:
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
                                       top_k=i.top_k, temperature=i.temperature, on_step=on_step,
                                       hw=need[0][0].canvas.guide_hw)
        dt = (time.perf_counter() - t0) / len(need)
        for j, (p, k) in enumerate(need):
            p.picks[k], p.guide_source[k] = G.row_picks(picks, j), "computed"
            p.tokens["guide"] += int(hole[j].sum())
            _add(p.timings, "guide", dt)
            if store:
                G.save_picks(G.picks_path(store, p.edit_id, k), p.picks[k], tokens[j], self.fingerprint(p.digest))

    @property
    def sampling_model(self) -> AssetTransformer:
        """The model that samples the full-size hole: SGA, or in guide-only mode the guide itself."""
        return self.m.guide if self.m.sga is None else self.m.sga

    def sample_rows(self, p: Prepared) -> list[Row]:
        """The edit's (edit, sample) rows for the sampler (SGA: its picks must be in p.picks). Row key (p, k)."""
        ids, cond, hole = (t[0] for t in p.hr)
        phase = "guide" if self.m.sga is None else "sga"
        return [Row((p, k), ids, cond, hole, row_generator(self.cfg.infer.seed, p.edit_id, k, phase), p.canvas.hw,
                    None if self.m.sga is None else {key: torch.as_tensor(v) for key, v in p.picks[k].items()})
                for k in range(self.samples)]

    def sampled(self, row: Row, tokens: torch.Tensor) -> None:
        """A row's sampled tokens [L] (raster): decode (one row: pixels never depend on a batch) and blend."""
        p, k = row.key
        i = self.cfg.infer
        _add(p.timings, "sample", row.seconds)
        p.tokens["target"] += int(row.n_hole)
        t1 = time.perf_counter()
        c = p.canvas
        out = self.m.tok.decode(tokens.view(1, -1).to(self.m.device), c.H, c.W)[0]
        gen = ((out.float().permute(1, 2, 0).cpu().numpy() + 1.0) * 127.5).round().clip(0, 255).astype(np.uint8)
        p.images[k] = C.paste(c, gen, p.edit.image, p.edit.mask, i.blend_levels, i.blend_band)
        _add(p.timings, "decode_blend", time.perf_counter() - t1)

    def run_rows(self, rows: list[tuple[Prepared, int]], fn: Callable[[list], None]) -> None:
        """fn on batches of same-geometry rows; a failing batch is retried edit by edit, a failing edit recorded."""
        by_side: dict[tuple, list] = {}
        for r in rows:
            by_side.setdefault(r[0].geometry, []).append(r)
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

    def class_name(self, edit: Edit) -> str:
        """The class table's one spelling of the edit's class, whatever alias the edit set stores (e.g. the
        official "waterother" for "water-other"); "None" (-1) for no class (an edited label map)."""
        return self.classes.name(edit.class_id)

    def outputs(self, p: Prepared, env: DistEnv) -> tuple[dict[str, bytes], dict]:
        """The edit's files (sample PNGs, preview; none when it failed) and its record."""
        if p.error is not None:
            return {}, failed_record(p.edit_id, p.error, env)
        t0 = time.perf_counter()
        files = {f"sample_{k}.png": png_bytes(p.images[k]) for k in range(self.samples)}
        files["preview.png"] = png_bytes(preview(p.edit, [p.images[k] for k in range(self.samples)],
                                                 self.cfg.infer.preview_size))
        p.timings["encode_png"] = time.perf_counter() - t0
        hole = int(p.hr[2].sum())
        e = p.edit
        return files, {"edit": p.edit_id, "status": "ok", "error": None, "size": max(e.width, e.height),
                       "width": e.width, "height": e.height, "canvas": p.canvas.to_dict(), "class_id": e.class_id,
                       "class_name": self.class_name(e), "mode": self.m.mode, "samples": self.samples,
                       "hole_tokens": hole, "tokens_sampled": dict(p.tokens),
                       "guides": sorted(set(p.guide_source.values())) or None,
                       "timings_s": {k: round(v, 4) for k, v in p.timings.items()},
                       "outputs": list(files), "rank": env.rank, "world_size": env.world_size, "time": time.time()}


def failed_record(edit_id: str, error: str, env: DistEnv) -> dict:
    return {"edit": edit_id, "status": "failed", "error": error, "rank": env.rank, "world_size": env.world_size}


PALETTE = np.random.default_rng(12345).integers(40, 256, (256, 3)).astype(np.uint8)


def preview(edit: Edit, samples: list[np.ndarray], size: int) -> np.ndarray:
    """input | input with the hole tinted | edited label map (fixed palette) | samples, each `size` px tall
    (the photo's aspect kept)."""
    m = edit.mask.astype(bool)[..., None]
    tint = np.where(m, (0.5 * edit.image + 0.5 * np.array([255, 0, 0])).astype(np.uint8), edit.image)
    tiles = [edit.image, tint, PALETTE[edit.seg]] + list(samples)
    w = max(1, round(size * edit.width / edit.height))
    small = [np.array(Image.fromarray(t).resize((w, size), Image.BOX if t.shape[0] >= size else Image.NEAREST))
             for t in tiles]
    return np.concatenate(small, 1)


# ----------------------------------------------------------------------------------------------------------
# Resumable distributed runs


def read_record(out: Path, edit_id: str) -> Optional[dict]:
    """The record of one edit of an edit-batch output (either layout)."""
    return open_results(out).read_record(edit_id)


def write_manifest_if_complete(out: Path, all_ids: list[str], store=None) -> bool:
    """Every edit has a record -> OUT/manifest.jsonl (atomic; several ranks may write the same content), and for
    shards OUT/shards.json."""
    store = store or open_results(out)
    recs = []
    for eid in sorted(all_ids):
        rec = store.read_record(eid)
        if rec is None:
            return False
        recs.append(rec)
    atomic_write_text(out / MANIFEST, "".join(json.dumps(r, sort_keys=True) + "\n" for r in recs))
    store.finish()
    return True


def _check_run_settings(out: Path, settings: dict, write: bool) -> None:
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
    if write:
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
                    redo: bool = False, env: Optional[DistEnv] = None, edit_set=None, out_format: str = "files",
                    shard_size: int = 100, join: bool = False) -> int:
    """edit-batch: this worker's part of the edits; returns 0, or EXIT_REQUEUE when stopped by a signal.
    edit_set: anything with `.ids` and `.load(id)` instead of shards; redo: ignore existing records (and claim
    nothing: the single-edit command); out_format: "files" (OUT/<id>/...) or "shards" (tars of shard_size edits
    per worker: results.py); join: help the edit-batch already running in `out` (same settings and edits: else
    JoinRefused), or start it when none runs.
    Checks come first (config, --samples, a writable output folder, the weight files), then the output folder's
    lock for the whole job (another run writing there is refused with LockHeld), then the work."""
    if out_format not in FORMATS:
        raise InputError(f"--out-format must be one of {', '.join(FORMATS)} (got {out_format!r})")
    if shard_size < 1:
        raise InputError(f"--shard-size must be >= 1 (got {shard_size})")
    env, samples, out = start_run(cfg, out, samples, env, "edit-batch --out")
    eset = edit_set if edit_set is not None else EditSet(edits, verify=cfg.data.verify)
    settings = _settings(cfg, samples, out_format)
    chunk = 0 if redo else cfg.infer.claim_chunk
    plan = _plan(cfg, eset, settings, chunk, out_format, shard_size)
    lease = cfg.infer.claim_lease_s

    def setup(lock) -> dict:
        _check_run_settings(out, settings, write=True)
        save_config(cfg, out / "config.yaml")
        if redo:  # the single-edit command: nobody joins it, no claims folder in its output
            return {"session": lock.me["token"], "chunk": 0, "role": "primary"}
        return {**claims.open_session(out, lock.me["token"], plan, lease), "role": "primary"}

    def join_running(holder: dict) -> dict:
        sess = claims.join_session(out, plan, holder)
        _check_run_settings(out, settings, write=False)
        return {**sess, "role": "helper"}

    # with claims no final wait for every rank: a rank stops at once (a dead peer's node would hold it until
    # SLURM kills the job), and a later run's new session voids whatever a straggler still holds
    with job_lock(out, "edit-batch", env, setup=setup, join=join_running if join else None,
                  wait_all=lambda sess: not sess.get("chunk")) as sess:
        return _batch_edits(cfg, eset, out, guides_dir, samples, device, retry_failed, redo, env, out_format,
                            shard_size, sess)


def start_run(cfg: Config, out: str | Path, samples: Optional[int], env: Optional[DistEnv], what: str,
              need_sga: bool = True) -> tuple[DistEnv, int, Path]:
    """The checks every editing command makes before any heavy work -> (env, samples, output folder)."""
    validate(cfg, "config")
    if samples is not None and samples < 1:
        raise InputError(f"samples must be >= 1 (got {samples})")
    for key, path in weight_paths(cfg).items():
        if path and (key != "sga" or need_sga) and not Path(path).is_file():
            raise InputError(f"{key} weights {path}: no such file (infer.{key}_weights"
                             + (")" if key == "sga" else f" or train.{key}_weights)"))
    return env or dist_env(), samples or cfg.infer.samples, writable_dir(out, what)


def edit_dir(out: Path, edit_id: str) -> Path:
    """OUT/<edit_id>, refused (UnsafeName) unless the id is safe and the folder lies inside OUT."""
    return inside(out, check_id(edit_id))


def _settings(cfg: Config, samples: int, out_format: str) -> dict:
    """What the outputs depend on (OUT/run.json): a restart or a joining worker must have the same."""
    i = cfg.infer
    settings = {"samples": samples, "seed": i.seed, "top_k": i.top_k, "temperature": i.temperature,
                "precision": i.precision, "blend_levels": i.blend_levels, "blend_band": i.blend_band,
                "token_hole": cfg.model.token_hole, "weights": weight_paths(cfg), "resolution": canvas_resolution(cfg)}
    if out_format != "files":  # absent for the default: outputs of earlier versions stay resumable
        settings["out_format"] = out_format
    return settings


def _plan(cfg: Config, eset, settings: dict, chunk: int, out_format: str, shard_size: int) -> dict:
    """The batch as a joining worker must see it: digest of the settings, the edit set and the chunking."""
    import hashlib

    parts = {"settings": settings, "edits": {"count": len(eset.ids), "digest": claims.edit_set_digest(eset)},
             "claim_chunk": chunk, "shard_size": shard_size if out_format == "shards" else None,
             "preview_size": cfg.infer.preview_size}
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    return {"digest": digest, "parts": parts, "chunk": chunk,
            "n_chunks": -(-len(eset.ids) // chunk) if chunk else 0}


def _wanted(store, eid: str, redo: bool, retry_failed: bool) -> bool:
    """Does edit `eid` still need computing? (no record, or a failed one under --retry-failed)"""
    if redo:
        return True
    rec = store.read_record(eid)
    return rec is None or (retry_failed and rec["status"] == "failed")


def _batch_edits(cfg: Config, eset, out: Path, guides_dir: Optional[str], samples: int, device: str,
                 retry_failed: bool, redo: bool, env: DistEnv, out_format: str, shard_size: int, sess: dict) -> int:
    all_ids = eset.ids
    helper = sess["role"] == "helper"
    hid = uuid.uuid4().hex[:6] if helper else ""
    worker = f"rank{env.rank}" + (f"-{hid}" if hid else "")
    store = open_results(out, out_format, env.rank, shard_size, f"r{env.rank:04d}" + (f"x{hid}" if hid else ""))
    me = claims.owner(env.rank, worker)
    chunk = sess["chunk"]
    host = me["host"]
    if chunk:
        board = claims.Board(out, sess["session"], sess["n_chunks"], me, sess["lease_s"],
                             log=lambda m: _log(f"[{worker}] {m}"))
        parts = claims.chunks(all_ids, chunk)
        line = (f"[rank {env.rank}/{env.world_size}] {len(all_ids)} edit(s) of the batch in {len(parts)} chunk(s) "
                f"of {chunk}, claimed as they go by every worker; {worker} on {host}"
                + (" (joined the running batch)" if helper else ""))
        if env.is_main and not helper:
            todo = sum(_wanted(store, e, redo, retry_failed) for e in all_ids)
            line += f": {len(all_ids) - todo} already done, {todo} to do"
        _log(f"{line} -> {out}")
    else:
        board, mine = None, split_for_rank(all_ids, env.rank, env.world_size)
        pending = [e for e in mine if _wanted(store, e, redo, retry_failed)]
        parts = [pending]
        _log(f"[rank {env.rank}/{env.world_size}] {len(mine)} edit(s) of {len(all_ids)}, {len(mine) - len(pending)} "
             f"already done, {len(pending)} to do -> {out}")
    work = _Work(board, parts, store, redo, retry_failed)
    if board is not None:
        board.start()
    try:
        with _StopFlag() as stop:
            crashed, report = _run_pending(cfg, eset, work, out, samples, guides_dir, device, env, stop, store,
                                           worker, sess)
    except claims.SessionGone as e:
        _log(f"[{worker}] {e}: the edits it had not written are dropped (the new run redoes them); "
             "run `edit-batch --join` again to help it")
        return EXIT_REQUEUE
    finally:
        if board is not None:
            board.stop()
            board.release_all()  # unfinished chunks (a stop signal, an error): free for the others at once
    _log(f"[rank {env.rank}] {worker} on {host}: {report['edits']} edit(s) written here, busy {report['busy_s']:.1f} "
         f"s, idle at the end {report['wait_s']:.1f} s" + (" (waiting for the other workers' last chunks)" if board
                                                             else ""))
    complete = write_manifest_if_complete(out, all_ids, open_results(out, out_format, env.rank, shard_size))
    if stop.set and not complete:
        return EXIT_REQUEUE
    if complete:
        with _summary_mutex(out):
            summ = write_summary(out)
        _log(f"[rank {env.rank}] all {len(all_ids)} edits done: {out / MANIFEST}, {out / SUMMARY}")
        for n in summ["nodes"]:
            _log(f"  node {n['host']}: {n['workers']} worker(s), {n['edits']} edit(s), busy {n['busy_s']:.1f} s, "
                 f"idle at the end {n['idle_end_s']:.1f} s")
    else:
        _log(f"[rank {env.rank}] finished its share; {out / MANIFEST} is written by the last worker to finish")
    if crashed:  # bad inputs are the data's problem (exit 0); an error while computing may be ours: say so
        _log(f"[rank {env.rank}] {crashed} edit(s) failed with an error while computing (see their records); "
             "rerun with --retry-failed after fixing the cause")
        return 1
    return 0


class _Work:
    """Where a worker's edits come from: a static share (board None: parts = [its pending ids]) or chunks claimed
    one at a time (parts: every chunk's ids). `chunk_of` and `left` follow the chunks being edited until all
    their edits are written; `keep` is the store's check that a chunk is still ours before its edits go out."""

    def __init__(self, board: Optional["claims.Board"], parts: list[list[str]], store, redo: bool,
                 retry_failed: bool):
        self.board, self.parts, self.store = board, parts, store
        self.redo, self.retry_failed = redo, retry_failed
        self.chunk_of: dict[str, int] = {}
        self.left: dict[int, int] = {}
        self.first: Optional[int] = None  # a chunk claimed while waiting: the next pass starts with it
        self.static_given = False

    def chunks(self, stop: "_StopFlag") -> Iterator[list[str]]:
        """The ids to edit, a chunk at a time (claimed just before it is needed); ends when nothing is free."""
        if self.board is None:
            if not self.static_given and self.parts[0]:
                self.static_given = True
                yield list(self.parts[0])
            return
        while not stop.set:
            i, self.first = (self.first, None) if self.first is not None else (self.board.next_chunk(), None)
            if i is None:
                return
            self.store.refresh()  # tars other workers wrote (a chunk taken over may be partly done)
            todo = [e for e in self.parts[i] if _wanted(self.store, e, self.redo, self.retry_failed)]
            if not todo:
                self.board.done(i, {"edits": 0})
                continue
            self.left[i] = len(todo)
            for e in todo:
                self.chunk_of[e] = i
            yield todo

    def keep(self, ids: list[str]) -> set[str]:
        if self.board is None:
            return set(ids)
        owned = {i: self.board.owns(i) for i in {self.chunk_of[e] for e in ids if e in self.chunk_of}}
        return {e for e in ids if owned.get(self.chunk_of.get(e), True)}

    def written(self, ids: list[str]) -> None:
        for e in ids:
            i = self.chunk_of.pop(e, None)
            if i is None or i not in self.left:
                continue
            self.left[i] -= 1
            if self.left[i] == 0:
                del self.left[i]
                self.board.done(i, {"edits": len(self.parts[i])})

    def wait_for_others(self, stop: "_StopFlag", poll_s: float) -> bool:
        """Nothing free: wait until every chunk is done (True), taking over any claim that expires (False: the
        next pass starts with it). A stop signal ends the wait too (False)."""
        if self.board is None:
            return True
        while not stop.set:
            if self.board.all_done():
                return True
            i = self.board.next_chunk()
            if i is not None:
                self.first = i
                return False
            time.sleep(poll_s)
        return False


class _Settle:
    """Hands each edit's outputs and record to the store once all its samples are settled (sampled or failed);
    logs every edit the store has written (shards: when its tar is complete)."""

    def __init__(self, runner: "EditRunner", store, env: DistEnv, log_path: Path, progress: Progress, work: _Work,
                 worker: str):
        self.runner, self.store, self.env, self.log_path, self.progress = runner, store, env, log_path, progress
        self.work, self.worker = work, worker
        self.left: dict[int, int] = {}  # id(Prepared) -> rows not settled yet
        self.status: dict[str, str] = {}
        self.failed = self.crashed = self.written = 0

    def expect(self, p: Prepared, n: int) -> None:
        self.left[id(p)] = n

    def row(self, p: Prepared) -> None:
        self.left[id(p)] -= 1
        if self.left[id(p)] == 0:
            del self.left[id(p)]
            self.crashed += p.error is not None
            self.record(p.edit_id, *self.runner.outputs(p, self.env)[::-1])

    def record(self, eid: str, rec: dict, files: Optional[dict] = None) -> None:
        self.status[eid] = rec["status"]
        if rec["status"] != "ok":
            self.failed += 1
            _log(f"[rank {self.env.rank}] FAILED {rec['error']}")
        rec["worker"] = self.worker
        self.log(self.store.put(eid, files or {}, rec, keep=self.work.keep))
        self.progress.edit_done()

    def log(self, ids: list[str]) -> None:
        with open(self.log_path, "a") as f:
            for eid in ids:
                f.write(json.dumps({"edit": eid, "status": self.status.pop(eid), "rank": self.env.rank,
                                    "worker": self.worker, "world_size": self.env.world_size,
                                    "time": time.time()}) + "\n")
        self.written += len(ids)
        self.work.written(ids)

    def close(self) -> None:
        self.log(self.store.flush(keep=self.work.keep))


def _run_pending(cfg: Config, eset, work: _Work, out: Path, samples: int, guides_dir: Optional[str],
                 device: str, env: DistEnv, stop: "_StopFlag", store, worker: str, sess: dict
                 ) -> tuple[int, dict]:
    """The edits `work` gives -> (edits that failed while computing, this worker's report).

    Edits are read and prepared a window at a time (tokenizers, guide picks for the window's rows); their
    (edit, sample) rows feed the continuous sampler's queue, which keeps `infer.batch_size` rows sampling; an
    edit's images and record are written as soon as its last row is sampled. With claims a pass lasts while free
    chunks do; then the worker waits for the others' last chunks, taking over any whose claim expires. The models
    are loaded when the first edit to compute turns up (a finished batch loads nothing)."""
    i = cfg.infer
    t_start = time.time()
    log_path = out / "logs" / f"{worker}.jsonl"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    total_edits = len(eset.ids) if work.board is not None else len(work.parts[0])
    batch = min(i.batch_size, max(1, total_edits) * samples)  # slots hold whole caches: no more than there are rows
    per_window = max(1, -(-i.batch_size // samples))
    stats = ScheduleStats(batch_size=0)
    report = {"edits": 0, "busy_s": 0.0, "wait_s": 0.0, "load_s": 0.0}
    progress = Progress(f"[rank {env.rank}] sampling" + (" (chunks claimed so far)" if work.board else ""),
                        0 if work.board is not None else total_edits)
    m: dict = {}  # models, runner, sampler: loaded on first use

    def load() -> None:
        t0 = time.perf_counter()
        m["models"] = load_models(cfg, pick_device(env, device))
        m["runner"] = EditRunner(cfg, m["models"], samples, guides_dir)
        m["sampler"] = ContinuousSampler(m["runner"].sampling_model, batch, top_k=i.top_k,
                                         temperature=i.temperature, lookahead=2 * batch)
        report["load_s"] = time.perf_counter() - t0

    settle = _Settle(None, store, env, log_path, progress, work, worker)

    def rows(todos):
        runner = m["runner"]
        for todo in todos:
            if work.board is not None:
                progress.edits += len(todo)
            for c in range(0, len(todo), per_window):
                if stop.set:
                    break
                preps = []
                for eid in todo[c:c + per_window]:
                    store.begin(eid)
                    try:
                        preps.append(runner.prepare(eset.load(eid)))
                    except EditError as e:
                        settle.record(eid, failed_record(eid, str(e), env))
                    except Exception as e:  # noqa: BLE001 - one edit never stops the batch; counted as a crash
                        settle.crashed += 1
                        settle.record(eid, failed_record(eid, f"edit {eid!r}: {type(e).__name__}: {e}", env))
                if m["models"].sga is not None:
                    runner.run_rows([(p, k) for p in preps for k in range(samples)], runner.guide_batch)
                for p in preps:
                    settle.expect(p, samples)
                    if p.error is not None:  # the guide failed on it
                        progress.queued(0, 1)
                        for _ in range(samples):
                            settle.row(p)
                        continue
                    rs = runner.sample_rows(p)
                    progress.queued(sum(r.n_hole for r in rs), 1)
                    yield from rs
                progress.queued(0, len(todo[c:c + per_window]) - len(preps))  # failed to prepare: nothing to sample
            if stop.set:
                _log(f"[rank {env.rank}] stop signal: the edits not started are left for the restart")
                return

    def done(row: Row, tokens: torch.Tensor) -> None:
        p = row.key[0]
        if p.error is None:
            try:
                m["runner"].sampled(row, tokens)
            except Exception as e:  # noqa: BLE001 - isolate the edit that fails
                p.error = f"edit {p.edit_id!r}: {type(e).__name__}: {e}"
        settle.row(p)

    def failed(row: Row, e: BaseException) -> None:
        p = row.key[0]
        p.error = p.error or f"edit {p.edit_id!r}: {type(e).__name__}: {e}"
        settle.row(p)

    poll_s = min(2.0, max(0.05, i.claim_lease_s / 8))
    work_end = time.time()
    while True:
        t1 = time.perf_counter()
        todos = work.chunks(stop)
        first = next(todos, None)
        if first is not None:
            if not m:
                load()
                settle.runner = m["runner"]
            try:
                stats.add(m["sampler"].run(rows(itertools.chain([first], todos)), done, failed,
                                           on_step=progress.sampled))
            finally:
                settle.close()  # the worker's last, partial tar (shards): its chunks are done once it is written
            report["busy_s"] += time.perf_counter() - t1
            work_end = time.time()
        t2 = time.perf_counter()
        finished = stop.set or work.wait_for_others(stop, poll_s)
        report["wait_s"] += time.perf_counter() - t2
        if finished:
            break
    report["edits"] = settle.written
    if not m:  # nothing computed here: no schedule to report
        return settle.crashed, report
    progress.close()
    append_stats(out, env, stats, {"worker": worker, "host": socket.gethostname(), "session": sess.get("session"),
                                   "role": sess.get("role"), "claim_chunk": sess.get("chunk", 0),
                                   "started": t_start, "work_end": work_end, "ended": time.time(),
                                   "edits": settle.written, "load_s": round(report["load_s"], 3),
                                   "busy_s": round(report["busy_s"], 3), "wait_s": round(report["wait_s"], 3)})
    _log(f"[rank {env.rank}] done: {settle.written - settle.failed} ok, {settle.failed} failed; sampling: "
         f"{stats.sampled} hole tokens in {stats.steps} steps of {stats.batch_size} rows "
         f"(efficiency {stats.efficiency:.3f}, 1.0 = every row busy every step)")
    return settle.crashed, report


# ----------------------------------------------------------------------------------------------------------
# Run summary


STATS = "stats.jsonl"
SUMMARY = "summary.json"


def append_stats(out: Path, env: DistEnv, stats: ScheduleStats, extra: Optional[dict] = None) -> None:
    """One line per session of this worker (a resumed run adds one): OUT/logs/<worker>.stats.jsonl."""
    worker = (extra or {}).get("worker", f"rank{env.rank}")
    with open(out / "logs" / f"{worker}.{STATS}", "a") as f:
        f.write(json.dumps({"rank": env.rank, "world_size": env.world_size, "time": time.time(),
                            **stats.to_dict(), **(extra or {})}) + "\n")


@contextlib.contextmanager
def _summary_mutex(out: Path, wait_s: float = 60.0) -> Iterator[None]:
    """Serializes the summary's writers: each appends its stats first, so the last to write sees every line.
    A mutex left by a dead process is broken after wait_s."""
    path = out / "logs" / ".summary.lock"
    deadline = time.monotonic() + wait_s
    while True:
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            break
        except FileExistsError:
            if time.monotonic() > deadline:
                path.unlink(missing_ok=True)
                deadline = time.monotonic() + wait_s
            time.sleep(0.05)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def write_summary(out: Path) -> dict:
    """OUT/summary.json: per worker (a rank of the job or a helper that joined; summed over its sessions) the
    sampling schedule - efficiency = decode steps x batch size / hole tokens sampled (1.0 = every row of the
    batch sampled one of its own hole tokens at every step) - and the load balance: edits written, busy time,
    idle time at the end (the session's last worker to run out of work, minus this one); then per node and in
    total."""
    lines = []
    for path in sorted((out / "logs").glob(f"rank*.{STATS}")):
        for line in path.read_text().splitlines():
            try:
                lines.append(json.loads(line))
            except ValueError:
                continue
    session_end: dict = {}
    for r in lines:
        if "work_end" in r:
            session_end[r.get("session")] = max(session_end.get(r.get("session"), 0.0), r["work_end"])
    per: dict[str, dict] = {}
    for r in lines:
        w = r.get("worker", f"rank{r['rank']}")
        a = per.setdefault(w, {"worker": w, "rank": int(r["rank"]), "host": r.get("host", ""), "sessions": 0,
                               "batch_size": 0, "hole_tokens_sampled": 0, "decode_steps": 0, "rows": 0,
                               "row_steps": 0.0, "encode_s": 0.0, "step_s": 0.0, "edits": 0, "busy_s": 0.0,
                               "idle_end_s": 0.0})
        a["sessions"] += 1
        a["batch_size"] = max(a["batch_size"], int(r["batch_size"]))
        for k in ("hole_tokens_sampled", "decode_steps", "rows", "encode_s", "step_s", "edits", "busy_s"):
            a[k] += r.get(k, 0)
        a["row_steps"] += r["mean_rows_active"] * r["decode_steps"]
        if "work_end" in r:
            a["idle_end_s"] += session_end[r.get("session")] - r["work_end"]

    def finish(a: dict) -> dict:
        steps, tok = a["decode_steps"], a["hole_tokens_sampled"]
        a["mean_rows_active"] = round(a.pop("row_steps") / steps, 3) if steps else 0.0
        a["efficiency"] = round(steps * a["batch_size"] / tok, 4) if tok else None
        for k in ("encode_s", "step_s", "busy_s", "idle_end_s"):
            a[k] = round(a[k], 2)
        return a

    ranks = [finish(a) for _, a in sorted(per.items(), key=lambda kv: (kv[1]["rank"], kv[0]))]
    nodes: dict[str, dict] = {}
    for r in ranks:
        n = nodes.setdefault(r["host"], {"host": r["host"], "workers": 0, "edits": 0, "busy_s": 0.0,
                                         "idle_end_s": 0.0})
        n["workers"] += 1
        for k in ("edits", "busy_s", "idle_end_s"):
            n[k] = round(n[k] + r[k], 2)
    total = {k: sum(r[k] for r in ranks) for k in ("hole_tokens_sampled", "decode_steps", "rows", "edits")}
    busy, idle = sum(r["busy_s"] for r in ranks), sum(r["idle_end_s"] for r in ranks)
    total.update(busy_s=round(busy, 2), idle_end_s=round(idle, 2),
                 idle_fraction=round(idle / (busy + idle), 4) if busy + idle > 0 else 0.0)
    summary = {"ranks": ranks, "nodes": list(nodes.values()), "total": total,
               "note": "ranks: one entry per worker (a rank of the job, or a helper that joined with --join); "
                       "efficiency = decode_steps x batch_size / hole_tokens_sampled (1.0 ideal); idle_end_s = "
                       "time from the worker running out of edits to the last worker of its session doing so"}
    atomic_write_json(out / SUMMARY, summary)
    return summary


def run_precompute(cfg: Config, edits: str, out: str | Path, *, samples: Optional[int] = None,
                   device: str = "auto", env: Optional[DistEnv] = None) -> int:
    """precompute-guides: picks for every (edit, sample) of this rank's share; existing valid files are kept."""
    env, samples, out = start_run(cfg, out, samples, env, "precompute-guides --out", need_sga=False)
    with job_lock(out, "precompute-guides", env):
        return _precompute(cfg, edits, out, samples, device, env)


def _precompute(cfg: Config, edits: str, out: Path, samples: int, device: str, env: DistEnv) -> int:
    eset = EditSet(edits, verify=cfg.data.verify)
    mine = split_for_rank(eset.ids, env.rank, env.world_size)
    models = load_models(cfg, pick_device(env, device), need_sga=False)
    runner = EditRunner(cfg, models, samples, guides_dir=str(out))
    per_chunk = max(1, -(-cfg.infer.batch_size // samples))
    n_failed = n_kept = 0
    progress = Progress(f"[rank {env.rank}] guides", len(mine))
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
            except Exception as e:  # noqa: BLE001 - a bad edit (EditError) or any other error: that edit fails
                msg = str(e) if isinstance(e, EditError) else f"edit {eid!r}: {type(e).__name__}: {e}"
                n_failed += 1
                atomic_write_json(edit_dir(out, eid) / "failed.json", failed_record(eid, msg, env))
                _log(f"[rank {env.rank}] FAILED {msg}")
        progress.queued(sum(int(p.lr[2].sum()) * samples for p in preps), len(mine[c:c + per_chunk]))
        runner.run_rows([(p, k) for p in preps for k in range(samples)],
                        lambda rows: runner.guide_batch(rows, store=str(out), on_step=progress.sampled))
        for p in preps:
            if p.error is not None:
                n_failed += 1
                atomic_write_json(edit_dir(out, p.edit_id) / "failed.json", failed_record(p.edit_id, p.error, env))
                _log(f"[rank {env.rank}] FAILED {p.error}")
            else:
                (edit_dir(out, p.edit_id) / "failed.json").unlink(missing_ok=True)
        progress.edit_done(len(mine[c:c + per_chunk]))
    progress.close()
    _log(f"[rank {env.rank}/{env.world_size}] guides: {len(mine)} edit(s), {n_kept} already complete, "
         f"{n_failed} failed -> {out}")
    return 0
