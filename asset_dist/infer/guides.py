"""The guide at 256 px: its own sampled completion of each edit, then the SGA block picks
(docs/ASSET_NOTES.md §5.2, §7.2-7.3).

Per (edit, sample) row: sample the 256 hole tokens with the KV cache (dense attention), run the guide once
more teacher-forced on that completion to get its attention maps, and pool them into the block picks for
encoder self-, decoder causal- and cross-attention (`guides_from_maps`). The maps pass runs one row at a time,
so a row's picks never depend on what else was in the batch (top-3 of pooled maps has many near-ties).

Storage (`save_picks` / `load_picks`): DIR/<edit_id>/guide_<k>.npz, written atomically, holding
e_self [n_enc, H, nb, K], d_causal / d_cross [n_dec, H, nb, K] as int8 (int16 above 127 blocks), the guide's
256 completion (int16) and a JSON fingerprint (guide weights digest, edit content digest, seed, sampling
settings). A file whose fingerprint differs from the current run's is stale and recomputed.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from asset_dist.models.transformer import GUIDE_KEYS, AssetTransformer, Guides, guides_from_maps
from asset_dist.infer.sampler import SampleStats, sample_cached
from asset_dist.utils import atomic_write

GUIDE_SIDE = 256


@torch.no_grad()
def picks_for_rows(guide: AssetTransformer, tokens: torch.Tensor, cond: torch.Tensor, hole: torch.Tensor
                   ) -> Guides:
    """Teacher-forced dense pass per row on completed 256 tokens [B, 256] -> picks {key: [n, B, H, nb, K]}."""
    t = guide.cfg
    rows = []
    for i in range(tokens.shape[0]):
        _, maps = guide(tokens[i:i + 1], cond[i:i + 1], hole[i:i + 1], return_attn=True)
        maps = {k: v if v.dtype == torch.float64 else v.float() for k, v in maps.items()}
        rows.append(guides_from_maps(maps, t.block_grid, k=t.guide_k, causal_mode=t.causal_picks))
    return {k: torch.cat([r[k] for r in rows], 1) for k in GUIDE_KEYS}


@torch.no_grad()
def run_guide(guide: AssetTransformer, ids: torch.Tensor, cond: torch.Tensor, hole: torch.Tensor,
              gens: Sequence[torch.Generator], *, top_k: int, temperature: float
              ) -> tuple[torch.Tensor, Guides, SampleStats]:
    """256 tokens of B rows (raster [B, 256]) -> (the guide's sampled completion, picks, stats)."""
    tokens, stats = sample_cached(guide, ids, cond, hole, gens, top_k=top_k, temperature=temperature)
    return tokens, picks_for_rows(guide, tokens, cond, hole), stats


def row_picks(picks: Guides, i: int) -> Guides:
    return {k: v[:, i] for k, v in picks.items()}


def stack_picks(rows: Sequence[Guides], device=None) -> Guides:
    """Per-row picks {key: [n, H, nb, K]} -> the batched model input {key: [n, B, H, nb, K]} (long)."""
    return {k: torch.stack([torch.as_tensor(r[k]) for r in rows], 1).long().to(device) for k in GUIDE_KEYS}


def picks_path(root: str | Path, edit_id: str, sample: int) -> Path:
    return Path(root) / edit_id / f"guide_{sample}.npz"


def save_picks(path: str | Path, picks: Guides, tokens: torch.Tensor, fingerprint: dict) -> None:
    """One row's picks {key: [n, H, nb, K]} + its 256 completion, compact and atomic."""
    nb = int(next(iter(picks.values())).shape[-2])
    dt = np.int8 if nb <= 127 else np.int16
    arrays = {k: picks[k].cpu().numpy().astype(dt) for k in GUIDE_KEYS}
    arrays["tokens"] = tokens.cpu().numpy().astype(np.int16 if int(tokens.max()) < 32768 else np.int32)
    arrays["fingerprint"] = np.array(json.dumps(fingerprint, sort_keys=True))

    def write(f) -> None:
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        f.write(buf.getvalue())

    atomic_write(path, write)


def load_picks(path: str | Path, fingerprint: dict) -> Optional[tuple[Guides, torch.Tensor]]:
    """(picks {key: long [n, H, nb, K]}, tokens) or None when the file is missing, unreadable or stale."""
    p = Path(path)
    if not p.is_file():
        return None
    try:
        with np.load(p, allow_pickle=False) as z:
            if json.loads(str(z["fingerprint"])) != json.loads(json.dumps(fingerprint, sort_keys=True)):
                return None
            picks = {k: torch.from_numpy(z[k].astype(np.int64)) for k in GUIDE_KEYS}
            tokens = torch.from_numpy(z["tokens"].astype(np.int64))
    except (OSError, ValueError, KeyError):
        return None
    return picks, tokens
