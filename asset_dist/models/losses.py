"""Tokenizer training losses (docs/ASSET_NOTES.md §2.7 and §3).

- LPIPS: VGG16 features (torchvision layout, written here; torchvision is not needed) with the LPIPS linear heads.
- PatchDiscriminator: the pix2pix/taming PatchGAN (3 stride layers, ndf 64, BatchNorm, LeakyReLU 0.2, 4x4).
- VQGANLoss: L1 + LPIPS ("nll") + codebook loss + adaptive-weighted hinge GAN loss. `generator_loss` and
  `discriminator_loss` are separate calls, so a trainer can keep two optimizers / engines.
- SegLoss: cross-entropy (default) or the official BCE-with-logits over the one-hot map, plus codebook loss.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from asset_dist.config import DiscConfig, LossConfig

# ----------------------------------------------------------------------------------------------------------
# Perceptual loss

# VGG16 "features" up to relu5_3, in torchvision's indexing (so its state dict loads unchanged).
_VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
_LPIPS_TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
_LPIPS_CHANNELS = (64, 128, 256, 512, 512)
VGG16_HUB_FILE = "vgg16-397923af.pth"  # torchvision's ImageNet VGG16 in the torch hub cache
LPIPS_HEAD_FILES = ("vgg_lpips.pth", "vgg.pth")  # taming's / the lpips package's linear heads


def _vgg16_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    in_ch = 3
    for v in _VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(in_ch, v, 3, padding=1), nn.ReLU()]
            in_ch = v
    return nn.Sequential(*layers)  # indices 0..29, the last one is relu5_3


def _normalise_lpips_key(key: str) -> Optional[str]:
    """Map a key of a known layout onto ours ('features.N.*', 'lins.I.weight'); None = not a perceptual tensor.

    Layouts: ours; torchvision vgg16 ('features.N.*', 'classifier.*'); taming / lpips LPIPS ('net.sliceK.N.*',
    'linI.model.1.weight', 'scaling_layer.*'), also under 'loss.perceptual_loss.' or 'perceptual_loss.'.
    """
    for prefix in ("loss.perceptual_loss.", "perceptual_loss.", "module."):
        if key.startswith(prefix):
            key = key[len(prefix):]
    parts = key.split(".")
    if parts[0] == "features" or parts[0] == "lins":
        return key
    if parts[0] == "net" and len(parts) == 4 and parts[1].startswith("slice"):
        return f"features.{parts[2]}.{parts[3]}"  # taming's slices keep torchvision's global indices
    if parts[0].startswith("lin") and parts[0][3:].isdigit() and parts[1:] == ["model", "1", "weight"]:
        return f"lins.{parts[0][3:]}.weight"
    return None  # classifier.*, scaling_layer.* (constants), anything else


def _default_lpips_files() -> list[Path]:
    ckpt_dir = Path(torch.hub.get_dir()) / "checkpoints"
    files = [ckpt_dir / VGG16_HUB_FILE] + [ckpt_dir / n for n in LPIPS_HEAD_FILES]
    return [f for f in files if f.is_file()]


class LPIPS(nn.Module):
    """LPIPS distance with VGG16 features: per layer, unit-normalise channels, squared difference, learned
    non-negative 1x1 head, spatial mean; summed over the 5 layers. Inputs in [-1, 1]; returns [B].

    Weights: `weights_path` = one file or several joined by ',' (state dicts in any layout that
    `_normalise_lpips_key` knows, merged); "" = the torch hub cache (`<hub>/checkpoints/vgg16-397923af.pth`
    for the backbone plus `vgg_lpips.pth` or `vgg.pth` for the heads). Every tensor must be found, else a
    FileNotFoundError / ValueError says what is missing. `random_init=True` skips loading (tests only).
    The heads run without dropout: taming re-enables LPIPS dropout during training (docs/ASSET_NOTES.md §10.14), a
    quirk not reproduced. The module is frozen and stays in eval mode.
    """

    def __init__(self, weights_path: str = "", random_init: bool = False):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.features = _vgg16_features()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _LPIPS_CHANNELS)
        if random_init:
            for lin in self.lins:  # LPIPS heads are non-negative; keep the random stand-in a distance
                nn.init.uniform_(lin.weight, 0.0, 2.0 / lin.weight.shape[1])
        else:
            self.load_weights(weights_path)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)  # always eval: fixed metric

    def load_weights(self, weights_path: str = "") -> None:
        files = [Path(p.strip()) for p in weights_path.split(",") if p.strip()] if weights_path else \
            _default_lpips_files()
        if not files:
            raise FileNotFoundError(
                "no LPIPS/VGG16 weights: set loss.perceptual_weights_path to a state-dict file (or several, "
                "comma-separated) holding the VGG16 features and the LPIPS heads, or put "
                f"{VGG16_HUB_FILE} and {LPIPS_HEAD_FILES[0]} under {Path(torch.hub.get_dir()) / 'checkpoints'} "
                "(tests: loss.perceptual_random_init=true)")
        from asset_dist.utils import torch_load

        merged: dict[str, torch.Tensor] = {}
        for f in files:
            sd = torch_load(f)
            if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
                sd = sd["state_dict"]
            if not isinstance(sd, Mapping):
                raise ValueError(f"{f}: expected a state dict, got {type(sd).__name__}")
            for k, v in sd.items():
                name = _normalise_lpips_key(k)
                if name is not None and isinstance(v, torch.Tensor):
                    merged[name] = v
        own = self.state_dict()
        merged = {k: v for k, v in merged.items() if k in own}
        missing = sorted(set(own) - set(merged))
        bad = sorted(f"{k} {tuple(merged[k].shape)} != {tuple(own[k].shape)}"
                     for k in merged if merged[k].shape != own[k].shape)
        if missing or bad:
            raise ValueError(f"LPIPS weights from {', '.join(map(str, files))} are incomplete: "
                             f"missing {missing or 'none'}; mis-shaped {bad or 'none'}")
        self.load_state_dict(merged, strict=True)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        n = a.shape[0]
        h = (torch.cat([a, b]) - self.shift) / self.scale  # one pass over both images
        total = 0.0
        tap = 0
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i == _LPIPS_TAPS[tap]:
                f = h / (h.square().sum(dim=1, keepdim=True).sqrt() + 1e-10)
                d = (f[:n] - f[n:]).square()
                total = total + self.lins[tap](d).mean(dim=(1, 2, 3))
                tap += 1
                if tap == len(_LPIPS_TAPS):
                    break
        return total


# ----------------------------------------------------------------------------------------------------------
# Discriminator


class BatchNorm2dStats(nn.BatchNorm2d):
    """BatchNorm computed in the dtype of its running statistics. DeepSpeed's bf16/fp16 modes cast parameters
    but not buffers, and CPU batch_norm refuses bf16 inputs with fp32 statistics; fp32 statistics are also
    the better choice for a GAN discriminator. Same parameters, buffers and state-dict keys as BatchNorm2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = self.running_mean.dtype if self.running_mean is not None else x.dtype
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
        w = None if self.weight is None else self.weight.to(dt)
        b = None if self.bias is None else self.bias.to(dt)
        use_batch = self.training or self.running_mean is None
        return F.batch_norm(x.to(dt), self.running_mean, self.running_var, w, b, use_batch,
                            self.momentum, self.eps).to(x.dtype)


class PatchDiscriminator(nn.Module):
    """PatchGAN: conv4x4/s2 + LReLU, (n_layers-1) x [conv4x4/s2 + BN + LReLU], conv4x4/s1 + BN + LReLU,
    conv4x4/s1 -> 1 logit per patch (30x30 at 256). 2.77 M parameters at ndf 64, n_layers 3.
    Keys `main.N.*` follow taming's NLayerDiscriminator (official `loss.discriminator.main.*`)."""

    def __init__(self, cfg: DiscConfig):
        super().__init__()
        ndf, n = cfg.ndf, cfg.n_layers
        layers: list[nn.Module] = [nn.Conv2d(cfg.in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2)]
        mult = 1
        for i in range(1, n + 1):
            prev, mult = mult, min(2 ** i, 8)
            stride = 2 if i < n else 1
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=False), BatchNorm2dStats(ndf * mult),
                       nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():  # pix2pix init
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):  # includes BatchNorm2dStats
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4) -> torch.Tensor:
    """lambda = ||d nll / d W|| / (||d g / d W|| + 1e-4), clamped to [0, 1e4], detached (W = last decoder conv).

    Uses autograd.grad (no .grad accumulation, graph retained for the real backward). A partitioned parameter
    (e.g. ZeRO-3, where the local tensor is empty) has no usable gradient here: use a fixed weight instead.
    """
    if last_layer.numel() == 0:
        raise RuntimeError("the last-layer weight is empty (partitioned parameter, e.g. ZeRO-3); set "
                           "train.loss.adaptive_weight=false to use the fixed disc_weight")
    if not last_layer.requires_grad:
        raise RuntimeError("the last-layer weight does not require grad; the adaptive GAN weight needs it")
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    w = _upcast(nll_grad).norm() / (_upcast(g_grad).norm() + 1e-4)
    return w.clamp(0.0, max_weight).detach()


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """Loss arithmetic in at least fp32 (half/bf16 logits are upcast; fp64 stays fp64)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


@contextlib.contextmanager
def frozen_params(module: nn.Module) -> Iterator[None]:
    """Build the graph through `module` without its parameters (gradients still reach its input): the generator
    pass must not leave gradients in the discriminator, which another optimizer / engine owns."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


# ----------------------------------------------------------------------------------------------------------
# Full losses


class VQGANLoss(nn.Module):
    """VQGAN training loss, split into a generator step and a discriminator step.

        loss_g, logs = crit.generator_loss(x, xrec, qloss, step, last_layer=vq.last_layer())
        loss_d, logs = crit.discriminator_loss(x, xrec, step)

    generator:     nll = pixel_weight*|x - xrec| + perceptual_weight*LPIPS  (means, whole image incl. hole)
                   loss = nll + codebook_weight*qloss + f(step)*lambda*g,  g = -mean(D(xrec))
                   lambda = disc_weight*adaptive_weight(...) (or disc_weight if cfg.adaptive_weight is False)
    discriminator: loss = f(step) * 0.5*(mean relu(1 - D(x)) + mean relu(1 + D(xrec.detach())))
    f(step) = disc_factor from step disc_start on, 0 before (the GAN term is then not computed at all).
    `discriminator=` overrides self.discriminator (e.g. a wrapped engine of it). In eval / no-grad the adaptive
    weight cannot be computed and is 0, as in taming.
    """

    def __init__(self, cfg: LossConfig, disc_cfg: Optional[DiscConfig] = None):
        super().__init__()
        self.cfg = cfg
        self.perceptual = LPIPS(cfg.perceptual_weights_path, cfg.perceptual_random_init) \
            if cfg.perceptual_weight > 0 else None
        self.discriminator = PatchDiscriminator(disc_cfg or DiscConfig())

    def disc_factor(self, global_step: int) -> float:
        return self.cfg.disc_factor if global_step >= self.cfg.disc_start else 0.0

    def reconstruction_loss(self, x: torch.Tensor, xrec: torch.Tensor) -> tuple[torch.Tensor, dict]:
        l1 = (x - xrec).abs().mean()
        nll = self.cfg.pixel_weight * l1
        logs = {"l1": l1.detach()}
        if self.perceptual is not None:
            p = self.perceptual(x.contiguous(), xrec.contiguous()).mean()
            nll = nll + self.cfg.perceptual_weight * p
            logs["perceptual"] = p.detach()
        logs["nll"] = nll.detach()
        return nll, logs

    def generator_loss(self, x: torch.Tensor, xrec: torch.Tensor, codebook_loss: torch.Tensor, global_step: int,
                       last_layer: Optional[torch.Tensor] = None,
                       discriminator: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
                       ) -> tuple[torch.Tensor, dict]:
        nll, logs = self.reconstruction_loss(x, xrec)
        loss = nll + self.cfg.codebook_weight * codebook_loss
        logs["quant"] = codebook_loss.detach()
        factor = self.disc_factor(global_step)
        if factor > 0 and self.cfg.disc_weight > 0:
            disc = discriminator if discriminator is not None else self.discriminator
            with frozen_params(disc):
                logits_fake = disc(xrec.contiguous())
            g_loss = -_upcast(logits_fake).mean()
            if not self.cfg.adaptive_weight:
                d_weight = torch.tensor(self.cfg.disc_weight, device=x.device)
            elif torch.is_grad_enabled() and nll.requires_grad:
                if last_layer is None:
                    raise ValueError("generator_loss needs last_layer (the decoder's last conv weight) for the "
                                     "adaptive weight, or set loss.adaptive_weight=false")
                d_weight = adaptive_weight(nll, g_loss, last_layer) * self.cfg.disc_weight
            else:
                d_weight = torch.zeros((), device=x.device)
            loss = loss + d_weight * factor * g_loss
            logs.update(g_loss=g_loss.detach(), d_weight=d_weight.detach())
        logs["disc_factor"] = torch.tensor(factor)
        logs["total"] = loss.detach()
        return loss, logs

    def discriminator_loss(self, x: torch.Tensor, xrec: torch.Tensor, global_step: int,
                           discriminator: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
                           ) -> tuple[torch.Tensor, dict]:
        disc = discriminator if discriminator is not None else self.discriminator
        logits_real = _upcast(disc(x.detach().contiguous()))
        logits_fake = _upcast(disc(xrec.detach().contiguous()))
        # computed (times 0) before disc_start too, so every step has a graph for the discriminator's backward
        d_loss = self.disc_factor(global_step) * hinge_d_loss(logits_real, logits_fake)
        logs = {"d_loss": d_loss.detach(), "logits_real": logits_real.detach().mean(),
                "logits_fake": logits_fake.detach().mean()}
        return d_loss, logs


class SegLoss(nn.Module):
    """Seg-tokenizer loss: reconstruction + codebook_weight * quantizer loss.

    cfg.seg_recon = "ce":  cross-entropy of the logits against the label map (the issue's choice, default);
                    "bce": BCE-with-logits against the one-hot map, averaged over B*C*H*W (the official taming
                           `BCELossWithQuant`), computed as mean(softplus(l)) - sum(l[label])/(B*C*H*W) without
                           building the one-hot tensor.
    target: long labels [B,H,W] or a one-hot float map [B,C,H,W].
    """

    def __init__(self, cfg: LossConfig):
        super().__init__()
        if cfg.seg_recon not in ("ce", "bce"):
            raise ValueError(f"loss.seg_recon must be 'ce' or 'bce', got {cfg.seg_recon!r}")
        self.cfg = cfg

    def reconstruction_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        labels = target.argmax(dim=1) if target.is_floating_point() else target.long()
        logits = _upcast(logits)
        if self.cfg.seg_recon == "ce":
            return F.cross_entropy(logits, labels)
        picked = logits.gather(1, labels.unsqueeze(1)).sum()
        return F.softplus(logits).mean() - picked / logits.numel()

    def forward(self, logits: torch.Tensor, target: torch.Tensor, codebook_loss: torch.Tensor
                ) -> tuple[torch.Tensor, dict]:
        rec = self.reconstruction_loss(logits, target)
        loss = rec + self.cfg.codebook_weight * codebook_loss
        return loss, {"rec": rec.detach(), "quant": codebook_loss.detach(), "total": loss.detach()}


__all__ = ["LPIPS", "PatchDiscriminator", "VQGANLoss", "SegLoss", "hinge_d_loss", "adaptive_weight",
           "frozen_params"]
