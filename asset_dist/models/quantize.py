"""Vector quantizer of the VQGAN / seg tokenizer (docs/ASSET_NOTES.md §2.2).

Nearest code by squared L2, straight-through gradient, the "legacy" loss weighting that taming-transformers
(and so ASSET) keeps:  loss = mean||sg(e) - z||^2 + beta * mean||e - sg(z)||^2, beta = 0.25.
The state_dict is `embedding.weight` [n_embed, embed_dim], the same name as the official VectorQuantizer2.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class VectorQuantizer(nn.Module):
    def __init__(self, n_embed: int, embed_dim: int, beta: float = 0.25, legacy: bool = True):
        super().__init__()
        self.n_embed = n_embed
        self.embed_dim = embed_dim
        self.beta = beta
        self.legacy = legacy
        self.embedding = nn.Embedding(n_embed, embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_embed, 1.0 / n_embed)

    @torch.no_grad()
    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """z [B,C,h,w] -> indices [B,h,w] (int64) of the nearest code by squared L2 distance."""
        b, c, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, c)
        e = self.embedding.weight.to(flat.dtype)
        # ||z||^2 + ||e||^2 - 2 z.e  (the official formula; argmin ties are measure-zero)
        d = flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2.0 * flat @ e.t()
        return d.argmin(dim=1).view(b, h, w)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z [B,C,h,w] -> (z_q straight-through [B,C,h,w], loss scalar, indices [B,h,w])."""
        indices = self.nearest(z)
        z_q = self.lookup(indices).to(z.dtype)
        commit = F.mse_loss(z, z_q.detach())  # mean||sg(e) - z||^2
        codebook = F.mse_loss(z_q, z.detach())  # mean||e - sg(z)||^2
        loss = commit + self.beta * codebook if self.legacy else self.beta * commit + codebook
        z_q = z + (z_q - z).detach()  # straight-through: forward = e, backward = identity to z
        return z_q, loss, indices

    @torch.no_grad()
    def init_from_latents(self, z: torch.Tensor, generator: torch.Generator) -> None:
        """k-means++ seeding of the codebook from latents z [N, embed_dim]: each next code is a latent drawn with
        probability proportional to its squared distance to the codes so far, so codes spread over the latent
        distribution at its scale. Duplicate latents (flat image regions) cannot be drawn twice while a distinct
        one is left; when none is left the rest are drawn uniformly."""
        z = z.detach().float().reshape(-1, self.embed_dim).cpu()
        if z.shape[0] == 0:
            raise ValueError("no latents to initialise the codebook from")
        codes = [z[int(torch.randint(z.shape[0], (1,), generator=generator))]]
        d2 = (z - codes[0]).square().sum(1)
        for _ in range(self.n_embed - 1):
            total = float(d2.sum())
            i = int(torch.multinomial(d2 / total, 1, generator=generator)) if total > 0 else \
                int(torch.randint(z.shape[0], (1,), generator=generator))
            codes.append(z[i])
            d2 = torch.minimum(d2, (z - z[i]).square().sum(1))
        self.embedding.weight.copy_(torch.stack(codes).to(self.embedding.weight))

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """indices [B,h,w] -> code vectors [B,C,h,w]."""
        return self.embedding(indices).permute(0, 3, 1, 2).contiguous()

    @torch.no_grad()
    def codebook_stats(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """Usage statistics for logging: perplexity of the code histogram and the fraction of codes used."""
        counts = torch.bincount(indices.reshape(-1), minlength=self.n_embed).float()
        p = counts / counts.sum().clamp_min(1.0)
        perplexity = torch.exp(-(p * torch.log(p + 1e-10)).sum())
        usage = (counts > 0).float().mean()
        return {"perplexity": perplexity, "usage": usage}
