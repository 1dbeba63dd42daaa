"""Typed configuration: YAML files -> nested dataclasses, with `--set a.b.c=value` overrides.

Every command loads its config through `load_config`, so errors look the same everywhere: unknown keys,
wrong types, missing required values and values out of range (each section's `validate`, then the checks across
sections in `Config.validate`) fail at start-up, before any heavy work, with the key path, the value, what is
allowed and the file name. Commands print them as `error: ...` and exit 2.
A YAML file may name a parent with `base: other.yaml` (relative to itself); the child overrides it.
"""
from __future__ import annotations

import dataclasses
import os
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from asset_dist import registry
from asset_dist.utils import InputError

MISSING = "???"  # a required value; YAML files set it, or `--set` must
# sga_attention kernels ("auto" = fastest measured per device); kept here so config stays torch-free.
ATTENTION_IMPLS = ("auto", "gather", "sdpa_gather", "flex", "flex_eager", "dense_mask")


class ConfigError(InputError):
    """A config problem, with the key path and the file it came from."""


PRECISIONS = ("fp32", "bf16", "fp16")
INFER_PRECISIONS = ("fp32", "bf16", "fp16", "fp64")
TOKEN = 16  # pixels per token: every tokenizer downsamples by 16 (5 levels of ch_mult)


class Checks:
    """Problems found while validating one config; each names the key, the value and what is allowed."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def bad(self, key: str, value: Any, allowed: str) -> None:
        self.problems.append(f"'{key}' must be {allowed} (got {value!r})")

    def at_least(self, key: str, value: Any, lo: float) -> None:
        if not value >= lo:  # also catches NaN
            self.bad(key, value, f">= {lo}")

    def within(self, key: str, value: Any, lo: float, hi: float, hi_open: bool = False) -> None:
        if not (lo <= value < hi if hi_open else lo <= value <= hi):
            self.bad(key, value, f"in [{lo:g}, {hi:g}{')' if hi_open else ']'}")

    def one_of(self, key: str, value: Any, options: typing.Sequence[str]) -> None:
        if value not in options:
            self.bad(key, value, "one of " + ", ".join(options))


# ----------------------------------------------------------------------------------------------------------
# Sections. Defaults are the paper's (docs/ASSET_NOTES.md); tiny_*.yaml shrink them for CPU tests.


@dataclass
class VQConfig:
    """A factor-16 VQ autoencoder: the image VQGAN (masked encoder) or the semantic-map tokenizer."""

    in_channels: int = 3  # 3 for images; number of label classes for the seg tokenizer
    out_channels: int = 3  # 3 for images; number of classes for the seg tokenizer (its logits)
    ch: int = 128  # base channel width (paper 128; every ch x ch_mult must be a multiple of norm_groups)
    # width multiplier per level; len(ch_mult) - 1 halvings (5 levels = factor 16)
    ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    num_res_blocks: int = 2  # residual blocks per encoder level
    # feature-map sides (at `resolution`) that get a self-attention block
    attn_resolutions: list[int] = field(default_factory=lambda: [16])
    resolution: int = 256  # nominal resolution, fixes which level has attention
    z_channels: int = 256  # encoder output channels
    embed_dim: int = 256  # code vector size
    n_embed: int = 1024  # codebook size
    dropout: float = 0.0  # dropout in the residual blocks
    masked: bool = True  # partial conv + region norm in the encoder (image VQGAN); False for seg
    # "true": region norm over known pixels; "official": the official code's arithmetic (c*mean, k/(cHW)).
    region_norm: str = "true"
    legacy_downsample: bool = False  # pad-then-conv downsample (seg model) vs. mask-aware padding
    decoder_res_blocks: Optional[int] = None  # None: num_res_blocks + 1, as the paper
    # GroupNorm / RegionNorm groups (paper 32 at ch 128: 4 channels per group). With one channel per group
    # (ch 32) every norm is an instance norm that erases a flat region's colour: keep >= 2 channels per group
    norm_groups: int = 32

    def widths(self) -> list[int]:
        """Every level's channel width (ch x ch_mult)."""
        return sorted({self.ch} | {self.ch * m for m in self.ch_mult})

    def widths_off_groups(self) -> list[int]:
        """The widths norm_groups does not divide (all of them when norm_groups < 1)."""
        return [w for w in self.widths() if self.norm_groups < 1 or w % self.norm_groups]

    def validate(self, c: Checks, at: str) -> None:
        for key in ("in_channels", "out_channels", "z_channels", "embed_dim", "resolution"):
            c.at_least(f"{at}.{key}", getattr(self, key), 1)
        c.at_least(f"{at}.n_embed", self.n_embed, 2)
        c.at_least(f"{at}.norm_groups", self.norm_groups, 1)
        if self.ch < 1 or (self.norm_groups >= 1 and self.widths_off_groups()):
            c.bad(f"{at}.ch", self.ch, f"positive, with every level's width (ch x ch_mult = {self.widths()}) a "
                  f"multiple of norm_groups={self.norm_groups} (GroupNorm / RegionNorm)")
        if len(self.ch_mult) != 5 or min(self.ch_mult) < 1:
            c.bad(f"{at}.ch_mult", self.ch_mult, f"5 positive integers (4 halvings: a factor-{TOKEN} tokenizer)")
        c.at_least(f"{at}.num_res_blocks", self.num_res_blocks, 0)
        if self.decoder_res_blocks is not None:
            c.at_least(f"{at}.decoder_res_blocks", self.decoder_res_blocks, 0)
        if any(r < 1 for r in self.attn_resolutions):
            c.bad(f"{at}.attn_resolutions", self.attn_resolutions, "a list of positive feature-map sides")
        c.within(f"{at}.dropout", self.dropout, 0.0, 1.0, hi_open=True)
        c.one_of(f"{at}.region_norm", self.region_norm, ("true", "official"))


@dataclass
class DiscConfig:
    in_channels: int = 3  # PatchGAN discriminator input channels
    ndf: int = 64  # its base width
    n_layers: int = 3  # its stride-2 conv layers

    def validate(self, c: Checks, at: str) -> None:
        for key in ("in_channels", "ndf", "n_layers"):
            c.at_least(f"{at}.{key}", getattr(self, key), 1)


@dataclass
class TransformerConfig:
    vocab_size: int = 1024  # image codebook size V; [mask] = V, [start] = V + 1
    cond_vocab_size: int = 1024  # seg codebook size
    d_model: int = 1024  # hidden size
    n_heads: int = 16  # attention heads (paper: 64-dim heads)
    ffn_dim: int = 4096  # feed-forward hidden size
    encoder_layers: int = 7  # encoder (seg tokens + known image tokens) layers
    decoder_layers: int = 15  # decoder (image tokens, causal in strip order) layers
    # token blocks per side [rows, cols] of the SGA grid: 16 x 4 blocks (64 blocks of nt tokens)
    block_grid: list[int] = field(default_factory=lambda: [16, 4])
    # learned position table of max_position_embeddings + 1 rows; only the last ([start]) row is used, the rest
    # exists for official-checkpoint compatibility (and the paper's parameter count)
    max_position_embeddings: int = 256
    peg: list[str] = field(default_factory=lambda: ["E_all", "D_0"])  # E_all | E_<i> | D_all | D_<i>
    peg_kernel: int = 5  # depthwise conv kernel of the position-encoding generator
    dropout: float = 0.0  # residual / FFN dropout
    attention_dropout: float = 0.0  # dropout on attention probabilities
    guide_k: int = 3  # guide-picked key blocks per query block (on top of the 3-block window)
    # "fixed": forbid blocks >= b-2 for every causal row; "official": reproduce the rows-5/6 leak.
    causal_picks: str = "fixed"
    attention_impl: str = "auto"  # one of ATTENTION_IMPLS (asset_dist.attention.sga_attention's impl)
    # SGA key set per query block. "union": window UNION picks (a repeated block counts once, nothing after the
    # query is visible). "official": the official concatenation (repeats count twice, a causal self-pick shows the
    # whole own block, causal blocks 0-4 dense), asset_dist.official.attention; for imported official weights.
    sga_semantics: str = "union"

    def validate(self, c: Checks, at: str) -> None:
        for key in ("vocab_size", "cond_vocab_size", "d_model", "n_heads", "ffn_dim", "encoder_layers",
                    "decoder_layers", "peg_kernel"):
            c.at_least(f"{at}.{key}", getattr(self, key), 1)
        if self.n_heads >= 1 and self.d_model % self.n_heads:
            c.bad(f"{at}.n_heads", self.n_heads, f"a divisor of d_model={self.d_model}")
        if len(self.block_grid) != 2 or min(self.block_grid) < 1:
            c.bad(f"{at}.block_grid", self.block_grid, "[rows, cols], two positive integers")
        c.at_least(f"{at}.guide_k", self.guide_k, 1)
        c.at_least(f"{at}.max_position_embeddings", self.max_position_embeddings, 0)
        if self.peg_kernel % 2 == 0:
            c.bad(f"{at}.peg_kernel", self.peg_kernel, "odd (a centred depthwise conv)")
        for item in self.peg:
            side, _, which = item.partition("_")
            n = {"E": self.encoder_layers, "D": self.decoder_layers}.get(side, 0)
            if not n or not (which == "all" or (which.isdigit() and int(which) < n)):
                c.bad(f"{at}.peg", item, f"E_all, E_<i> (i < {self.encoder_layers}), D_all or D_<i> "
                                         f"(i < {self.decoder_layers})")
        c.within(f"{at}.dropout", self.dropout, 0.0, 1.0, hi_open=True)
        c.within(f"{at}.attention_dropout", self.attention_dropout, 0.0, 1.0, hi_open=True)
        c.one_of(f"{at}.causal_picks", self.causal_picks, ("fixed", "official"))
        c.one_of(f"{at}.sga_semantics", self.sga_semantics, ("union", "official"))
        c.one_of(f"{at}.attention_impl", self.attention_impl, ATTENTION_IMPLS)


@dataclass
class ModelConfig:
    vqgan: VQConfig = field(default_factory=VQConfig)
    seg: VQConfig = field(
        default_factory=lambda: VQConfig(in_channels=182, out_channels=182, masked=False, legacy_downsample=True)
    )
    disc: DiscConfig = field(default_factory=DiscConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    # which tokens are unknown (resampled when editing, predicted when training; the tokenizers' hole): "any" = a
    # token whose 16x16 patch has any masked pixel; "nearest" = official, the patch's top-left pixel decides
    token_hole: str = "any"

    def validate(self, c: Checks, at: str) -> None:
        for name in ("vqgan", "seg", "disc", "transformer"):
            getattr(self, name).validate(c, f"{at}.{name}")
        c.one_of(f"{at}.token_hole", self.token_hole, ("any", "nearest"))


HALVES = ("top", "bottom", "left", "right")


@dataclass
class MaskConfig:
    kind: str = "landscape"  # landscape (dilated segment) | coco (dilated segment or bounding box)
    max_ratio: float = 0.6  # largest masked fraction of the image; bigger segments are halved until below
    sample_resolution: int = 0  # 0: min(data.resolution, 512), as the paper (the 1024 stage samples at 512)
    # halves the sampler may clear from a too-large hole (and use as the fallback hole); the paper: all four. The
    # long-range benchmark keeps [top, bottom]: its rules copy across the horizontal midline, so a left/right
    # half hole would mask a token's source too
    halves: list[str] = field(default_factory=lambda: list(HALVES))

    def validate(self, c: Checks, at: str) -> None:
        c.one_of(f"{at}.kind", self.kind, ("landscape", "coco"))
        if not self.halves or any(h not in HALVES for h in self.halves) or len(set(self.halves)) != len(self.halves):
            c.bad(f"{at}.halves", self.halves, f"a non-empty list of distinct halves from {list(HALVES)}")
        if not 0.0 < self.max_ratio <= 1.0:
            c.bad(f"{at}.max_ratio", self.max_ratio, "in (0, 1]")
        if self.sample_resolution < 0 or self.sample_resolution % TOKEN:
            c.bad(f"{at}.sample_resolution", self.sample_resolution, f"0 or a positive multiple of {TOKEN}")


@dataclass
class DataConfig:
    train_shards: str = MISSING  # brace pattern, directory with manifest.json, or a manifest path
    val_shards: str = ""  # held-out shards; "" = the val split of train_shards' manifest
    resolution: int = 256  # high-resolution crop side: 256, 512 or 1024
    guide_resolution: int = 256  # side of the low-resolution view the guide sees
    resize_short_side: int = 0  # 0: = resolution (landscape); COCO uses 296 / 592
    # training crops start on multiples of this many pixels of the resized image (1 = anywhere); 16 keeps
    # content drawn on the token grid (data_tools/make_longrange.py's mosaics) aligned with the tokens
    crop_grid: int = 1
    num_classes: int = 182  # label classes (landscape 182; COCO 183 with 0 = unlabeled)
    label_shift: int = 0  # COCO: +1 in uint8 (255 unlabeled -> 0)
    batch_size: int = 2  # per-rank batch (global = batch_size x world size x train.grad_accum)
    num_workers: int = 2  # dataloader worker processes per rank (0 = in the training process)
    shuffle_buffer: int = 64  # samples in each worker's shuffle buffer
    drop_last: bool = False  # drop each worker's short last batch of an epoch
    max_corrupt_fraction: float = 0.01  # stop with an error naming the shard above this fraction of corrupt samples
    seed: int = 23  # shuffling, crops and masks (with the epoch and sample key)
    # shard sources starting with `pipe:` run a shell command (webdataset): refused unless this is true
    allow_pipe: bool = False
    # check training and edit shards against their manifest: size at start-up, sha256 when a process first reads one
    verify: bool = True
    mask: MaskConfig = field(default_factory=MaskConfig)

    def validate(self, c: Checks, at: str) -> None:
        if self.resolution <= 0 or self.resolution % TOKEN:
            c.bad(f"{at}.resolution", self.resolution, f"a positive multiple of {TOKEN}")
        elif not 0 < self.guide_resolution <= self.resolution:
            c.bad(f"{at}.guide_resolution", self.guide_resolution, f"in 1..resolution={self.resolution}")
        if self.resize_short_side and self.resize_short_side < self.resolution:
            c.bad(f"{at}.resize_short_side", self.resize_short_side, f"0 or >= resolution={self.resolution}")
        c.within(f"{at}.num_classes", self.num_classes, 1, 256)
        c.at_least(f"{at}.crop_grid", self.crop_grid, 1)
        c.at_least(f"{at}.batch_size", self.batch_size, 1)
        c.at_least(f"{at}.num_workers", self.num_workers, 0)
        c.at_least(f"{at}.shuffle_buffer", self.shuffle_buffer, 0)
        if not 0 <= self.label_shift <= 255:
            c.bad(f"{at}.label_shift", self.label_shift, "in 0..255")
        c.within(f"{at}.max_corrupt_fraction", self.max_corrupt_fraction, 0.0, 1.0)
        for key in ("train_shards", "val_shards"):
            spec = getattr(self, key)  # "" is fine here (editing needs no shards); training checks it
            if not self.allow_pipe and any(u.strip().startswith("pipe:") for u in spec.split("::")):
                c.bad(f"{at}.{key}", spec, f"a path: a 'pipe:' source runs a shell command, allowed only with "
                                           f"{at}.allow_pipe=true")
        self.mask.validate(c, f"{at}.mask")


@dataclass
class LossConfig:
    codebook_weight: float = 1.0  # VQ loss weight
    beta: float = 0.25  # legacy VQ: codebook-side weight (commitment side has weight 1); the quantizer's beta
    pixel_weight: float = 1.0  # L1 reconstruction weight
    perceptual_weight: float = 1.0  # LPIPS weight
    perceptual_weights_path: str = ""  # local LPIPS/VGG weights; "" -> torch cache
    perceptual_random_init: bool = False  # tests only: run the VGG path with random weights
    disc_weight: float = 0.8  # GAN weight (times the adaptive lambda)
    disc_start: int = 10000  # step at which the discriminator starts
    disc_factor: float = 1.0  # GAN factor once started
    # lambda = ||grad nll|| / ||grad g|| at the decoder's last conv weight (taming). False: fixed disc_weight,
    # for setups where that weight is partitioned (ZeRO-3) and autograd.grad cannot see it whole.
    adaptive_weight: bool = True
    seg_recon: str = "ce"  # seg tokenizer: "ce" cross-entropy | "bce" official BCE-with-logits on one-hot
    # codebook start: "uniform" = taming's +-1/n_embed (paper); "data" = k-means++ picks among the freshly
    # initialised encoder's latents of the first training batches (the same on every rank). At CPU scale the
    # uniform codes are ~100x smaller than the latents: the commitment term shrinks the latents onto a handful
    # of near-zero codes and the tokenizer stalls (BENCHMARKS.md, tokenizer recipe)
    codebook_init: str = "uniform"
    codebook_init_batches: int = 8  # training batches whose latents seed the codebook ("data")

    def validate(self, c: Checks, at: str) -> None:
        for key in ("codebook_weight", "beta", "pixel_weight", "perceptual_weight", "disc_weight", "disc_factor",
                    "disc_start"):
            c.at_least(f"{at}.{key}", getattr(self, key), 0)
        c.one_of(f"{at}.seg_recon", self.seg_recon, ("ce", "bce"))


@dataclass
class TrainConfig:
    stage: str = MISSING  # vqgan | seg | guide | sga
    # deepspeed: DeepSpeed engines, ZeRO 0-3 (the deepspeed section); fsdp2: torch fully_shard + distributed checkpoint
    backend: str = "deepspeed"
    max_steps: int = 1000  # optimizer steps of the run (not micro-steps)
    lr: float = 7.2e-5  # peak learning rate
    optimizer: str = "adam"  # adam | adamw
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9])  # Adam betas
    weight_decay: float = 0.0  # AdamW decay (0 for the paper's Adam stages)
    warmup_steps: int = 0  # linear warm-up from 0
    schedule: str = "constant"  # constant | cosine
    min_lr_ratio: float = 0.1  # cosine schedule floor, as a fraction of lr
    grad_clip: float = 0.0  # max global grad norm (0 = off)
    grad_accum: int = 1  # micro-batches per optimizer step
    precision: str = "fp32"  # fp32 | bf16 | fp16
    activation_checkpointing: bool = False  # recompute transformer blocks / VQGAN levels in backward (memory for time)
    seed: int = 23  # model init and dropout
    ckpt_every: int = 500  # steps between checkpoints (also at the end and on signals)
    keep_last: int = 3  # checkpoints kept (older ones are deleted after a newer one is complete)
    # steps between the checks all ranks agree on (non-finite loss, stop signal), also made at log / checkpoint
    # steps: a signal is acted on within this many steps; 1 checks every step (a host sync per step)
    sync_every: int = 10
    loss: LossConfig = field(default_factory=LossConfig)
    # parents: exported single-file weights of earlier stages
    vqgan_weights: str = ""
    seg_weights: str = ""  # seg tokenizer export (seg.pt)
    guide_weights: str = ""  # guide export: SGA picks come from it (frozen)
    init_from: str = ""  # initialise the trained model from this export (SGA from guide, 1024 from 512)

    def validate(self, c: Checks, at: str) -> None:
        c.one_of(f"{at}.stage", self.stage, tuple(registry.STAGES))  # a new stage: a file + a line in registry.py
        c.one_of(f"{at}.backend", self.backend, tuple(registry.BACKENDS))
        for key in ("max_steps", "grad_accum", "ckpt_every", "keep_last", "sync_every"):
            c.at_least(f"{at}.{key}", getattr(self, key), 1)
        if not self.lr > 0 or self.lr == float("inf"):
            c.bad(f"{at}.lr", self.lr, "a finite number > 0")
        c.one_of(f"{at}.optimizer", self.optimizer, ("adam", "adamw"))
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            c.bad(f"{at}.betas", self.betas, "[beta1, beta2], each in [0, 1)")
        for key in ("weight_decay", "warmup_steps", "grad_clip"):
            c.at_least(f"{at}.{key}", getattr(self, key), 0)
        c.one_of(f"{at}.schedule", self.schedule, ("constant", "cosine"))
        c.within(f"{at}.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        c.one_of(f"{at}.precision", self.precision, PRECISIONS)
        self.loss.validate(c, f"{at}.loss")


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 2  # 0 (DDP-like), 1 optimizer, 2 + gradients, 3 + parameters partitioned
    offload_optimizer: bool = False  # ZeRO optimizer state in CPU memory
    overlap_comm: bool = False  # overlap gradient reduction with backward
    extra: dict[str, Any] = field(default_factory=dict)  # merged into the generated DeepSpeed JSON

    def validate(self, c: Checks, at: str) -> None:
        c.within(f"{at}.zero_stage", self.zero_stage, 0, 3)


@dataclass
class LoggingConfig:
    tensorboard: bool = True  # write RUN/tensorboard (scalars + image grids)
    log_every: int = 10  # steps between scalar logs
    image_every: int = 200  # steps between image grids (0 = never)

    def validate(self, c: Checks, at: str) -> None:
        c.at_least(f"{at}.log_every", self.log_every, 1)
        c.at_least(f"{at}.image_every", self.image_every, 0)


@dataclass
class PathsConfig:
    run_dir: str = "runs/default"  # checkpoints, exports, logs and the resolved config go here

    def validate(self, c: Checks, at: str) -> None:
        if not self.run_dir.strip():
            c.bad(f"{at}.run_dir", self.run_dir, "a folder (empty would write into the current folder)")


@dataclass
class InferConfig:
    """Editing (asset_dist/infer). Weights "" fall back to train.*_weights; sga_weights "" = the guide samples
    alone (256 px edits only)."""

    vqgan_weights: str = ""  # image VQGAN export
    seg_weights: str = ""  # seg tokenizer export
    guide_weights: str = ""  # guide export (256 px completion and the SGA picks)
    sga_weights: str = ""  # SGA export
    edits: str = ""  # default --edits of edit-batch / precompute-guides (shards, folder or manifest)
    guides: str = ""  # default --guides: precomputed block picks
    samples: int = 2  # samples per edit
    # (edit, sample) rows per sampling call; results do not depend on it. Rows share each decoder weight read:
    # cached decoding is ~20x the official re-run at 16 rows vs ~16x at 8 (BENCHMARKS.md, Editing)
    batch_size: int = 16
    top_k: int = 100  # sample among the k most likely tokens
    temperature: float = 1.0  # 0 = greedy
    seed: int = 0  # with the edit id and sample index, fixes every random draw
    precision: str = "fp32"  # transformers: fp32 | bf16 | fp16 | fp64 (tokenizers always fp32)
    # working resolution R: each edit is sampled on a window of at most R x R px of its photo (native pixels when
    # the hole and its context fit, else downscaled; any photo size and aspect: asset_dist/infer/canvas.py).
    # 0 = data.resolution (the SGA model's training resolution); guide-only editing uses 256
    resolution: int = 0
    blend_levels: int = 5  # Laplacian pyramid levels (paper: 5)
    blend_band: int = 16  # px: pixels outside the mask dilated by this are byte-identical to the input
    preview_size: int = 256  # tile side of the side-by-side preview
    class_names: str = ""  # class table file: one name per line (0-based) or JSON {name: id}; "" = COCO-Stuff
    classes: dict[str, int] = field(default_factory=dict)  # extra name -> id (model convention), wins
    # edit-batch hands out the sorted edit ids in chunks of this many, each claimed by whichever worker needs
    # work next (a claim file on the shared filesystem: asset_dist/infer/claims.py), so workers of any speed
    # finish together and `edit-batch --join` adds workers to a running batch. Smaller: a shorter tail at the
    # end, more files in OUT/claims (one per chunk). 0 = the old static split (rank r takes every world-th edit;
    # kept as the benchmark baseline, no joining)
    claim_chunk: int = 8
    # seconds without a heartbeat (the claim file's mtime, touched every lease/4) after which a worker's claims
    # are taken over by the others (a worker on the same host whose process is gone: at once). Must exceed the
    # filesystem's attribute caching (NFS actimeo, up to 60 s) plus lease/4, and the nodes' clock skew
    claim_lease_s: float = 120.0

    def validate(self, c: Checks, at: str) -> None:
        c.one_of(f"{at}.precision", self.precision, INFER_PRECISIONS)
        c.at_least(f"{at}.claim_chunk", self.claim_chunk, 0)
        if not self.claim_lease_s > 0:  # also catches NaN
            c.bad(f"{at}.claim_lease_s", self.claim_lease_s, "> 0 seconds")
        for key, lo in (("samples", 1), ("batch_size", 1), ("blend_levels", 1), ("top_k", 0), ("blend_band", 0),
                        ("preview_size", 16)):
            c.at_least(f"{at}.{key}", getattr(self, key), lo)
        c.at_least(f"{at}.temperature", self.temperature, 0.0)
        for name, cid in self.classes.items():
            if not isinstance(cid, int) or isinstance(cid, bool) or cid < -1:
                c.bad(f"{at}.classes.{name}", cid, "a class id (an integer >= -1; -1 = none)")


@dataclass
class DistConfig:
    """The process group of `train` and `evaluate` (edit-batch ranks do not exchange data, only the output
    folder's lock, asset_dist/runlock.py, with its own timeouts: a lost node's claimed edits are taken over by
    the other workers after infer.claim_lease_s)."""

    # seconds any collective (all-reduce, barrier, broadcast) may wait for a peer before this rank fails with
    # an error instead of hanging (gloo and NCCL; torch's own default is 10-30 min and it reads no environment
    # variable). Must exceed the longest legitimate wait: rank 0 writing a checkpoint or the export while the
    # others wait. A dead node is also found by SLURM (SlurmdTimeout, 300 s by default), which then requeues a
    # --requeue job; this bound covers what SLURM does not see (a frozen process, a cut link between nodes).
    timeout_s: float = 600.0

    def validate(self, c: Checks, at: str) -> None:
        if not self.timeout_s > 0:  # also catches NaN
            c.bad(f"{at}.timeout_s", self.timeout_s, "> 0 seconds")


@dataclass
class Config:
    name: str = "asset"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def validate(self, c: Checks) -> None:
        """Each section, then what must agree across sections (the model with the data and with itself)."""
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if dataclasses.is_dataclass(v):
                v.validate(c, f.name)
        m, d, t = self.model, self.data, self.model.transformer
        if t.vocab_size < m.vqgan.n_embed:
            c.bad("model.transformer.vocab_size", t.vocab_size,
                  f">= model.vqgan.n_embed={m.vqgan.n_embed} (the transformer predicts the VQGAN's codes)")
        if t.cond_vocab_size < m.seg.n_embed:
            c.bad("model.transformer.cond_vocab_size", t.cond_vocab_size,
                  f">= model.seg.n_embed={m.seg.n_embed} (the encoder reads the seg tokenizer's codes)")
        if m.seg.in_channels != d.num_classes:
            c.bad("model.seg.in_channels", m.seg.in_channels,
                  f"data.num_classes={d.num_classes} (the seg tokenizer reads one-hot label maps)")
        if m.seg.out_channels != m.seg.in_channels:
            c.bad("model.seg.out_channels", m.seg.out_channels, f"model.seg.in_channels={m.seg.in_channels}")
        if self.train.stage in ("guide", "sga") and len(t.block_grid) == 2 and min(t.block_grid) >= 1:
            sides = {"data.resolution": d.resolution} | ({"data.guide_resolution": d.guide_resolution}
                                                          if self.train.stage == "sga" else {})
            for key, side in sides.items():
                n = side // TOKEN
                if side % TOKEN or n % t.block_grid[0] or n % t.block_grid[1]:
                    c.bad(key, side, f"a multiple of {TOKEN} whose {TOKEN}-px token grid splits into "
                                     f"model.transformer.block_grid={t.block_grid}")


# ----------------------------------------------------------------------------------------------------------
# Loading

# Keys that moved: old name -> new name. Files, `--set` overrides and saved configs (run folders' config.yaml,
# checkpoints' meta.json, exports) that use the old name still load; both names with different values is an
# error. Configs are always written with the new name.
RENAMED = {"train.token_hole": "model.token_hole"}


def upgrade_keys(data: dict, src: str) -> dict:
    """`data` (one file's or one saved config's mapping) with every RENAMED key (`section.key` names) under its
    new name; the caller's mapping is left as it is."""
    out = data
    for old, new in RENAMED.items():
        (osec, okey), (nsec, nkey) = old.split("."), new.split(".")
        sec = out.get(osec)
        if not isinstance(sec, dict) or okey not in sec:
            continue
        value = sec[okey]
        out = {**out, osec: {k: v for k, v in sec.items() if k != okey}}
        target = out.get(nsec, {})
        if not isinstance(target, dict):
            continue  # not a section: the type check names it
        if nkey in target and target[nkey] != value:
            raise ConfigError(f"{src}: '{old}' (the old name of '{new}') is {value!r} but '{new}' is "
                              f"{target[nkey]!r}; keep only '{new}'")
        out[nsec] = {**target, nkey: value}
    return out


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str, src: str) -> Any:
    """Check `value` against the annotation `tp` (after YAML parsing) and return it, converted if lossless."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], path, src)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{src}: '{path}' must be a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, path, src)
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{src}: '{path}' must be a list, got {type(value).__name__} {value!r}")
        (inner,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, inner, f"{path}[{i}]", src) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{src}: '{path}' must be a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads `1e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{src}: '{path}' must be {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _build(cls: type, data: dict, prefix: str, src: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else key
            raise ConfigError(f"{src}: unknown key '{where}' (allowed in {cls.__name__}: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            where = f"{prefix}.{f.name}" if prefix else f.name
            kwargs[f.name] = _coerce(data[f.name], hints[f.name], where, src)
    return cls(**kwargs)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(path: Path, seen: tuple = ()) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    base = data.pop("base", None)
    new = upgrade_keys(data, str(path))  # before the merge: a child's old name still overrides its base
    if new is not data:
        old = [k for k in RENAMED if k.split(".")[1] in (data.get(k.split(".")[0]) or {})]
        warnings.warn(f"{path}: {', '.join(f'{k} is now {RENAMED[k]}' for k in old)} (the old name still "
                      "loads; rename it)", FutureWarning, stacklevel=2)
        data = new
    if base:
        parent = _read_yaml((path.parent / base), seen + (path.resolve(),))
        data = _merge(parent, data)
    return data


def parse_override(item: str) -> tuple[list[str], Any]:
    """'a.b.c=value' -> (['a','b','c'], parsed value). Values are parsed as YAML scalars/lists."""
    if "=" not in item:
        raise ConfigError(f"--set '{item}': expected key.path=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = _merge({}, data)
    for item in overrides or []:
        keys, value = parse_override(item)
        keys = RENAMED.get(".".join(keys), ".".join(keys)).split(".")
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set '{item}': '{k}' is not a section")
        node[keys[-1]] = value
    return data


def _check_required(obj: Any, prefix: str, src: str) -> None:
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        where = f"{prefix}.{f.name}" if prefix else f.name
        if v == MISSING:
            raise ConfigError(f"{src}: required value '{where}' is missing (set it in the file or with --set {where}=...)")
        if dataclasses.is_dataclass(v):
            _check_required(v, where, src)


def validate(cfg: Any, src: str = "<config>", at: str = "") -> None:
    """Every problem of `cfg` (a Config, or one section of it found at key `at`, e.g. a DataConfig at "data")
    in one ConfigError naming key, value and what is allowed; nothing when all is well."""
    c = Checks()
    cfg.validate(c) if isinstance(cfg, Config) else cfg.validate(c, at)
    if c.problems:
        head = f"{src}: " + ("" if len(c.problems) == 1 else f"{len(c.problems)} problems: ")
        raise ConfigError(head + "; ".join(c.problems))


def load_config(path: Optional[str | os.PathLike] = None, overrides: Optional[list[str]] = None,
                require: bool = True) -> Config:
    """Load a YAML config (or the defaults when path is None), apply `--set` overrides, type-check, validate."""
    src = str(path) if path else "<defaults>"
    data = _read_yaml(Path(path)) if path else {}
    data = apply_overrides(data, overrides or [])
    cfg = _build(Config, data, "", src)
    if require:
        _check_required(cfg, "", src)
        validate(cfg, src)
    return cfg


def config_from_dict(data: dict, src: str = "<dict>") -> Config:
    cfg = _build(Config, upgrade_keys(data, src), "", src)
    return cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config atomically (next to every run's outputs)."""
    from asset_dist.utils import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))


def add_config_args(parser) -> None:
    """The standard `--config` / `--set` pair every command takes."""
    parser.add_argument("--config", required=True, type=path_arg, help="YAML config file (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.max_steps=10 (repeatable)")


# ----------------------------------------------------------------------------------------------------------
# Command-line values: argparse `type=` checkers, so a bad value fails at parse time (argparse's usage error,
# exit 2) with the option, the value and what is allowed.


def int_arg(lo: int, hi: Optional[int] = None, multiple: int = 1):
    """type= for an integer option in [lo, hi] (hi None: no upper bound) that is a multiple of `multiple`."""
    import argparse

    allowed = f">= {lo}" if hi is None else f"in {lo}..{hi}"
    if multiple > 1:
        allowed += f" and a multiple of {multiple}"

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer {allowed} (got {text!r})") from None
        if v < lo or (hi is not None and v > hi) or v % multiple:
            raise argparse.ArgumentTypeError(f"must be {allowed} (got {v})")
        return v

    parse.__name__ = "integer"
    return parse


def float_arg(lo: float, hi: float, lo_open: bool = False):
    """type= for a float option in [lo, hi] ((lo, hi] with lo_open)."""
    import argparse

    allowed = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}]"

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number {allowed} (got {text!r})") from None
        if not ((lo < v if lo_open else lo <= v) and v <= hi):
            raise argparse.ArgumentTypeError(f"must be {allowed} (got {v:g})")
        return v

    parse.__name__ = "number"
    return parse


def path_arg(text: str) -> str:
    """type= for a file or folder option: not empty (an empty --out would write into the current folder)."""
    import argparse

    if not text.strip():
        raise argparse.ArgumentTypeError("must name a file or folder (got an empty path)")
    return text
