"""Stage 1: the image VQGAN (generator + PatchGAN discriminator, each its own network in the backend) and
the semantic-map tokenizer."""
from __future__ import annotations

import torch
from torch import nn

from asset_dist.models.losses import PatchDiscriminator, SegLoss, VQGANLoss
from asset_dist.models.seg_vq import SegVQModel
from asset_dist.models.vqgan import VQModel
from asset_dist.train.stage import Stage, StepContext, StepOutput
from asset_dist.train.visual import colorize_labels, to_unit


def _prefixed(logs: dict, prefix: str) -> dict:
    return {f"{prefix}/{k}": v for k, v in logs.items()}


def prepare_codebook(model: VQModel, cfg, inputs) -> None:
    """The quantizer's beta from train.loss.beta, and with loss.codebook_init "data" the codebook seeded from the
    fresh encoder's latents on the first training batches. Runs in build(), before the engines exist: every rank
    reads the same batches (one reader of the whole train split) with the same seed, so the codes are identical
    everywhere, and a resumed run overwrites them with the checkpoint's."""
    lc = cfg.train.loss
    model.quantize.beta = lc.beta
    if lc.codebook_init == "uniform":
        return
    if lc.codebook_init != "data":
        raise ValueError(f"train.loss.codebook_init must be 'uniform' or 'data', got {lc.codebook_init!r}")
    from asset_dist.data import build_loader

    zs = []
    with torch.no_grad():
        for i, batch in enumerate(build_loader(cfg.data, "train", rank=0, world_size=1)):
            if i >= max(1, lc.codebook_init_batches):
                break
            zs.append(model.encode_pre_quant(*inputs(batch)).permute(0, 2, 3, 1).reshape(-1, model.quantize.embed_dim))
    if not zs:
        raise ValueError("train.loss.codebook_init=data: the train split gave no batch")
    model.quantize.init_from_latents(torch.cat(zs), torch.Generator().manual_seed(cfg.train.seed))


class VQGANStage(Stage):
    """Generator step: L1 + LPIPS + codebook + adaptive-weighted GAN term. Discriminator step: hinge loss
    on the generator's (detached) reconstruction of the same batch.

    Why the generator loss goes through a detached leaf: the GAN loss needs autograd.grad (the adaptive
    weight) and a pass through the discriminator, and a backend may hook the outputs of a training forward
    so that any backward through them runs its own machinery (DeepSpeed does: this is what breaks its own
    GAN example at ZeRO-2). So the loss is computed on `leaf = xrec.detach()`, its gradient G w.r.t. the
    reconstruction is taken there, and the generator backpropagates the surrogate `sum(xrec * G)`, which
    has exactly the same parameter gradients. The adaptive weight needs gradients w.r.t. the decoder's last
    conv weight: they are computed from G and that conv's input with `conv2d_weight` and the weight's shape
    recorded at build time, so the (possibly sharded) weight itself is never touched.

    The discriminator runs frozen inside the generator step (`nets.frozen("disc")`): gradients reach the
    leaf, never its parameters, which the discriminator's own step updates.
    """

    networks = ("gen", "disc")
    frozen_use = ("disc",)

    def build(self) -> dict[str, nn.Module]:
        m = self.cfg.model
        self.crit = VQGANLoss(self.cfg.train.loss, m.disc)
        self.crit.discriminator = None  # the trained discriminator is the backend's network, not the loss's copy
        self.gen = VQModel(m.vqgan)
        prepare_codebook(self.gen, self.cfg, lambda b: (b["image"], b["mask"]))
        conv = self.gen.decoder.conv_out
        self._conv_out = (tuple(conv.weight.shape), conv.stride, conv.padding)
        self._last_input: list[torch.Tensor] = []
        conv.register_forward_hook(lambda mod, inp, out: self._last_input.append(inp[0].detach()))
        return {"gen": self.gen, "disc": PatchDiscriminator(m.disc)}

    def shard_units(self, name: str, module: nn.Module) -> list[nn.Module]:
        return [module.encoder, module.decoder] if name == "gen" else []

    def to_device(self, device: torch.device, dtype: torch.dtype) -> None:
        self.crit.to(device=device, dtype=dtype).eval()  # LPIPS is frozen; eval keeps its dropout off

    def _last_layer_grad_norm(self, grad_out: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        shape, stride, padding = self._conv_out
        return torch.nn.grad.conv2d_weight(h.float(), shape, grad_out.float(), stride=stride, padding=padding).norm()

    def step(self, name: str, nets, batch: dict, ctx: StepContext) -> StepOutput:
        x, mask = batch["image"], batch["mask"]
        lc = self.cfg.train.loss
        if name == "disc":
            loss, logs = self.crit.discriminator_loss(x, ctx.scratch["xrec"], ctx.step, discriminator=nets["disc"])
            return StepOutput(loss, _prefixed(logs, "disc"))

        self._last_input.clear()
        xrec, qloss, idx = nets["gen"](x, mask)
        h = self._last_input[-1]
        leaf = xrec.detach().requires_grad_(True)
        with torch.enable_grad():
            nll, logs = self.crit.reconstruction_loss(x, leaf)
            total = nll
            factor = self.crit.disc_factor(ctx.step)
            if factor > 0 and lc.disc_weight > 0:
                with nets.frozen("disc") as disc:
                    g_loss = -disc(leaf).float().mean()
                    if lc.adaptive_weight:
                        g_nll = torch.autograd.grad(nll, leaf, retain_graph=True)[0]
                        g_g = torch.autograd.grad(g_loss, leaf, retain_graph=True)[0]
                        lam = (self._last_layer_grad_norm(g_nll, h)
                               / (self._last_layer_grad_norm(g_g, h) + 1e-4)).clamp(0, 1e4).detach()
                        d_weight = lam * lc.disc_weight
                    else:
                        d_weight = torch.tensor(lc.disc_weight, device=x.device)
                    total = total + d_weight * factor * g_loss
                    grad_rec = torch.autograd.grad(total, leaf)[0]
                logs.update(g_loss=g_loss.detach(), d_weight=d_weight)
            else:
                grad_rec = torch.autograd.grad(total, leaf)[0]
        # same parameter gradients as total + codebook_weight * qloss, through the backend's own graph
        loss = (xrec * grad_rec.to(xrec.dtype)).sum() + lc.codebook_weight * qloss
        logs.update(quant=qloss.detach(), disc_factor=factor, total=(total + lc.codebook_weight * qloss).detach())
        ctx.scratch["xrec"] = xrec.detach()
        out = _prefixed(logs, "loss")
        if ctx.log:
            out.update(_prefixed(self.gen.quantize.codebook_stats(idx), "codebook"))
        return StepOutput(loss, out)

    @torch.no_grad()
    def images(self, nets, batch) -> dict[str, torch.Tensor]:
        x, mask = batch["image"][:4], batch["mask"][:4]
        xrec, _, _ = nets["gen"](x, mask)
        masked = x * (1 - mask) + mask * x.new_tensor([1.0, -1.0, 1.0]).view(1, 3, 1, 1)  # hole in magenta
        rows = torch.stack([to_unit(x), to_unit(masked), to_unit(xrec)], 1).flatten(0, 1)
        return {"images/input|masked|reconstruction": rows}

    def export_name(self) -> str:
        return "gen"


class SegStage(Stage):
    """Semantic-map tokenizer: cross-entropy (or the official BCE) reconstruction + quantizer loss."""

    networks = ("model",)

    def build(self) -> dict[str, nn.Module]:
        self.crit = SegLoss(self.cfg.train.loss)
        self.model = SegVQModel(self.cfg.model.seg)
        prepare_codebook(self.model, self.cfg, lambda b: (b["seg"], None))
        return {"model": self.model}

    def shard_units(self, name: str, module: nn.Module) -> list[nn.Module]:
        return [module.encoder, module.decoder]

    def step(self, name: str, nets, batch: dict, ctx: StepContext) -> StepOutput:
        seg = batch["seg"]
        logits, qloss, idx = nets["model"](seg)
        loss, logs = self.crit(logits, seg, qloss)
        out = _prefixed(logs, "loss")
        if ctx.log:
            out.update(_prefixed(self.model.quantize.codebook_stats(idx), "codebook"))
        return StepOutput(loss, out)

    @torch.no_grad()
    def images(self, nets, batch) -> dict[str, torch.Tensor]:
        seg = batch["seg"][:4]
        logits, _, _ = nets["model"](seg)
        pred = logits.argmax(1)
        n = self.cfg.model.seg.in_channels
        rows = torch.stack([colorize_labels(seg, n), colorize_labels(pred, n)], 1).flatten(0, 1)
        return {"images/labels|reconstruction": rows}
