"""Stage 1: the image VQGAN (generator + PatchGAN discriminator, one DeepSpeed engine each) and the
semantic-map tokenizer."""
from __future__ import annotations

import torch
from torch import nn

from asset_dist.models.losses import PatchDiscriminator, SegLoss, VQGANLoss, frozen_params
from asset_dist.models.seg_vq import SegVQModel
from asset_dist.models.vqgan import VQModel
from asset_dist.train.stage import Stage, StepOutput
from asset_dist.train.visual import colorize_labels, to_unit


def _floats(logs: dict, prefix: str) -> dict[str, float]:
    return {f"{prefix}/{k}": float(v) for k, v in logs.items()}


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
    weight) and a pass through the discriminator, and DeepSpeed hooks the outputs of every engine
    forward so that any backward through them runs that engine's ZeRO backward machinery (this is what
    breaks DeepSpeed's own GAN example at ZeRO-2). So the loss is computed on `leaf = xrec.detach()`,
    its gradient G w.r.t. the reconstruction is taken there, and the generator engine backpropagates
    the surrogate `sum(xrec * G)`, which has exactly the same parameter gradients. The adaptive weight
    needs gradients w.r.t. the decoder's last conv weight: they are computed from G and that conv's input
    with `conv2d_weight`, which never touches the (possibly ZeRO-3 partitioned) weight itself.

    The discriminator (2.8 M parameters) runs at ZeRO <= 2: the generator step calls its module with
    frozen parameters outside its engine, which ZeRO-3's parameter partitioning would not allow, and
    sharding 2.8 M parameters saves nothing.
    """

    networks = ("gen", "disc")

    def build(self) -> dict[str, nn.Module]:
        m = self.cfg.model
        self.crit = VQGANLoss(self.cfg.train.loss, m.disc)
        self.crit.discriminator = None  # the trained discriminator is the engine's, not the loss's copy
        gen = VQModel(m.vqgan)
        prepare_codebook(gen, self.cfg, lambda b: (b["image"], b["mask"]))
        self._last_input: list[torch.Tensor] = []
        gen.decoder.conv_out.register_forward_hook(lambda mod, inp, out: self._last_input.append(inp[0].detach()))
        return {"gen": gen, "disc": PatchDiscriminator(m.disc)}

    def zero_stage(self, name: str, requested: int) -> int:
        return min(requested, 2) if name == "disc" else requested

    def to_device(self, device: torch.device, dtype: torch.dtype) -> None:
        self.crit.to(device=device, dtype=dtype).eval()  # LPIPS is frozen; eval keeps its dropout off

    def _last_layer_grad_norm(self, grad_out: torch.Tensor, h: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
        w = torch.nn.grad.conv2d_weight(h.float(), conv.weight.ds_shape if hasattr(conv.weight, "ds_shape")
                                        else conv.weight.shape, grad_out.float(),
                                        stride=conv.stride, padding=conv.padding)
        return w.norm()

    def step(self, name, nets, batch, step, scratch) -> StepOutput:
        x, mask = batch["image"], batch["mask"]
        lc = self.cfg.train.loss
        if name == "disc":
            loss, logs = self.crit.discriminator_loss(x, scratch["xrec"], step, discriminator=nets["disc"])
            return StepOutput(loss, _floats(logs, "disc"))

        self._last_input.clear()
        xrec, qloss, idx = nets["gen"](x, mask)
        h = self._last_input[-1]
        leaf = xrec.detach().requires_grad_(True)
        with torch.enable_grad():
            nll, logs = self.crit.reconstruction_loss(x, leaf)
            total = nll
            factor = self.crit.disc_factor(step)
            if factor > 0 and lc.disc_weight > 0:
                disc = nets["disc"].module
                with frozen_params(disc):
                    g_loss = -disc(leaf).float().mean()
                if lc.adaptive_weight:
                    conv = nets["gen"].module.decoder.conv_out
                    g_nll = torch.autograd.grad(nll, leaf, retain_graph=True)[0]
                    g_g = torch.autograd.grad(g_loss, leaf, retain_graph=True)[0]
                    lam = (self._last_layer_grad_norm(g_nll, h, conv)
                           / (self._last_layer_grad_norm(g_g, h, conv) + 1e-4)).clamp(0, 1e4).detach()
                    d_weight = lam * lc.disc_weight
                else:
                    d_weight = torch.tensor(lc.disc_weight, device=x.device)
                total = total + d_weight * factor * g_loss
                logs.update(g_loss=g_loss.detach(), d_weight=d_weight)
            grad_rec = torch.autograd.grad(total, leaf)[0]
        # same parameter gradients as total + codebook_weight * qloss, through the engine's own graph
        loss = (xrec * grad_rec.to(xrec.dtype)).sum() + lc.codebook_weight * qloss
        logs.update(quant=qloss.detach(), disc_factor=factor, total=(total + lc.codebook_weight * qloss).detach())
        scratch["xrec"] = xrec.detach()
        stats = nets["gen"].module.quantize.codebook_stats(idx)
        return StepOutput(loss, {**_floats(logs, "loss"), **_floats(stats, "codebook")})

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
        model = SegVQModel(self.cfg.model.seg)
        prepare_codebook(model, self.cfg, lambda b: (b["seg"], None))
        return {"model": model}

    def step(self, name, nets, batch, step, scratch) -> StepOutput:
        seg = batch["seg"]
        logits, qloss, idx = nets["model"](seg)
        loss, logs = self.crit(logits, seg, qloss)
        stats = nets["model"].module.quantize.codebook_stats(idx)
        return StepOutput(loss, {**_floats(logs, "loss"), **_floats(stats, "codebook")})

    @torch.no_grad()
    def images(self, nets, batch) -> dict[str, torch.Tensor]:
        seg = batch["seg"][:4]
        logits, _, _ = nets["model"](seg)
        pred = logits.argmax(1)
        n = self.cfg.model.seg.in_channels
        rows = torch.stack([colorize_labels(seg, n), colorize_labels(pred, n)], 1).flatten(0, 1)
        return {"images/labels|reconstruction": rows}
