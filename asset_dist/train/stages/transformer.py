"""Stages 2 and 3: the guide transformer (256 px, dense attention) and the SGA transformer (512 / 1024 px,
sparse attention picked by the frozen guide on the 256 view of the same batch)."""
from __future__ import annotations

import torch
from torch import nn

import asset_dist.official.attention  # noqa: F401  registers transformer.sga_semantics "official"
from asset_dist.models.tokens import Tokenizers, load_weights
from asset_dist.models.transformer import AssetTransformer, guides_from_maps, param_groups
from asset_dist.train.stage import Stage, StepContext, StepOutput
from asset_dist.train.visual import to_unit


class GuideStage(Stage):
    """Cross-entropy on the hole tokens of the 256 crop; dense attention (fused SDPA)."""

    networks = ("model",)
    init_stages: tuple[str, ...] = ("guide",)

    def build(self) -> dict[str, nn.Module]:
        self.tok = Tokenizers(self.cfg)
        self.model = AssetTransformer(self.cfg.model.transformer)
        if self.cfg.train.init_from:
            load_weights(self.model, self.cfg.train.init_from, self.init_stages)
        return {"model": self.model}

    def param_groups(self, name, module):
        return param_groups(module, self.cfg.train.weight_decay)

    def shard_units(self, name: str, module: nn.Module) -> list[nn.Module]:
        """One unit per transformer layer; a layer's PEG is a unit of its own, because the encoder pass also
        runs the decoder layers' PEGs, outside those layers' forward."""
        units: list[nn.Module] = []
        for layer in [*module.encoder, *module.decoder]:
            if getattr(layer, "peg", None) is not None:
                units.append(layer.peg)
            units.append(layer)
        return units

    def to_device(self, device, dtype) -> None:
        self.tok.to(device)  # fp32: tokens must not depend on the training precision

    def tokens(self, batch: dict, suffix: str = ""):
        return self.tok(batch["image" + suffix].float(), batch["seg" + suffix], batch["mask" + suffix])

    def guides(self, batch: dict):
        return None

    def step(self, name: str, nets, batch: dict, ctx: StepContext) -> StepOutput:
        ids, cond, hole = self.tokens(batch)
        logits = nets["model"](ids, cond, hole, guides=self.guides(batch))
        loss = self.model.loss(logits, ids, hole)
        logs = {"loss/ce": loss.detach()}
        if ctx.log:
            with torch.no_grad():  # masked means: no data-dependent shapes, so no wait for the device
                lay = self.model.layout(ids.shape[1], device=ids.device)
                sel = hole[:, lay.perm].float()
                right = (logits.argmax(-1) == ids[:, lay.perm]).float()
                logs["metrics/hole_top1"] = (right * sel).sum() / sel.sum().clamp_min(1.0)
                logs["metrics/hole_fraction"] = hole.float().mean()
        return StepOutput(loss, logs)

    @torch.no_grad()
    def images(self, nets, batch) -> dict[str, torch.Tensor]:
        """input | hole | teacher-forced argmax prediction of the hole tokens, decoded."""
        b = {k: v[:2] for k, v in batch.items() if isinstance(v, torch.Tensor)}
        ids, cond, hole = self.tokens(b)
        logits = nets["model"](ids, cond, hole, guides=self.guides(b))
        pred = self.model.to_raster(logits.argmax(-1))
        filled = torch.where(hole, pred, ids)
        h, w = b["image"].shape[-2:]
        x = b["image"].float()
        masked = x * (1 - b["mask"].float())
        out = self.tok.decode(filled, h, w)
        rows = torch.stack([to_unit(x), to_unit(masked), to_unit(out)], 1).flatten(0, 1)
        return {"images/input|masked|prediction": rows}


class SGAStage(GuideStage):
    """The frozen guide runs on the 256 view (no grad) to pick, per layer, head and query block, the key
    blocks every SGA attention layer adds to its local window. The guide and tokenizers stay outside the
    backend, so a sharding backend never sees frozen parameters."""

    init_stages = ("guide", "sga")

    def build(self) -> dict[str, nn.Module]:
        nets = super().build()
        self.guide = AssetTransformer(self.cfg.model.transformer)
        load_weights(self.guide, self.cfg.train.guide_weights, "guide")
        self.guide.requires_grad_(False).eval()
        return nets

    def to_device(self, device, dtype) -> None:
        super().to_device(device, dtype)
        # bf16 on GPUs: the guide only ranks blocks; fp32 on CPU, where bf16 matmuls are slow
        self.guide.to(device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)

    @torch.no_grad()
    def guides(self, batch: dict):
        t = self.cfg.model.transformer
        ids, cond, hole = self.tokens(batch, "_lr")
        _, maps = self.guide(ids, cond, hole, return_attn=True)
        return guides_from_maps({k: v.float() for k, v in maps.items()}, t.block_grid, k=t.guide_k,
                                causal_mode=t.causal_picks)
