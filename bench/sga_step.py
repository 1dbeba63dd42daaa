"""One full training step (forward + backward) of the ASSET transformer at 1024 px (64 x 64 = 4096 tokens):
SGA attention against the same model with dense attention. Paper width (d 1024, 16 heads, FFN 4096).

    python bench/sga_step.py                      # CPU: 1 encoder + 1 decoder layer (a full step takes minutes)
    python bench/sga_step.py --device cuda --enc-layers 7 --dec-layers 15   # the paper's depth, bf16

Each variant runs in its own process, so peak memory (CPU: RSS high-water mark above the model; CUDA:
max_memory_allocated) is not polluted by the other. Timing: median of --repeats steps after one warm-up.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

WORKER = r"""
import json, resource, sys, time, torch
from asset_dist.config import TransformerConfig
from asset_dist.models.transformer import AssetTransformer
a = json.loads(sys.argv[1])
dev = torch.device(a["device"])
torch.set_num_threads(a["threads"])
cfg = TransformerConfig(encoder_layers=a["enc"], decoder_layers=a["dec"], attention_impl=a["impl"])
torch.manual_seed(0)
model = AssetTransformer(cfg).to(dev)
dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
L, B, nb, K = a["tokens"] ** 2, a["batch"], 64, 3
ids = torch.randint(0, cfg.vocab_size, (B, L), device=dev)
cond = torch.randint(0, cfg.cond_vocab_size, (B, L), device=dev)
hole = torch.zeros(B, L, dtype=torch.bool, device=dev); hole[:, L // 2:] = True
guides = None
if a["variant"] == "sga":
    g = torch.Generator().manual_seed(1)
    def picks(n_layers, causal):
        out = torch.full((n_layers, B, cfg.n_heads, nb, K), -1, dtype=torch.long)
        for b in range(nb):
            allowed = [x for x in range(nb) if (x < b - 2 if causal else abs(x - b) > 1)]
            for l in range(n_layers):
                for h in range(cfg.n_heads):
                    sel = torch.randperm(len(allowed), generator=g)[:K].tolist() if allowed else []
                    for j, s in enumerate(sel):
                        out[l, :, h, b, j] = allowed[s]
        return out.to(dev)
    guides = {"e_self": picks(cfg.encoder_layers, False), "d_causal": picks(cfg.decoder_layers, True),
              "d_cross": picks(cfg.decoder_layers, False)}
def step():
    with torch.autocast(dev.type, dtype=dtype, enabled=dev.type == "cuda"):
        logits = model(ids, cond, hole, guides=guides)
        loss = model.loss(logits, ids, hole)
    loss.backward()
    model.zero_grad(set_to_none=True)
def sync():
    if dev.type == "cuda": torch.cuda.synchronize()
base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
step(); sync()
if dev.type == "cuda": torch.cuda.reset_peak_memory_stats()
times = []
for _ in range(a["repeats"]):
    t = time.perf_counter(); step(); sync(); times.append(time.perf_counter() - t)
times.sort()
peak = (torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base_rss)
print(json.dumps({"variant": a["variant"], "s_per_step": times[len(times) // 2], "peak_mb": peak}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--enc-layers", type=int, default=1)
    ap.add_argument("--dec-layers", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=64, help="token grid side: 64 = 1024 px, 32 = 512 px")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--impl", default="auto", help="model.transformer.attention_impl for the SGA variant")
    ap.add_argument("--out", help="write the result rows as JSON here")
    args = ap.parse_args()
    rows = []
    for variant in ("dense", "sga"):
        spec = {"device": args.device, "enc": args.enc_layers, "dec": args.dec_layers, "tokens": args.tokens,
                "batch": args.batch, "repeats": args.repeats, "threads": args.threads, "impl": args.impl,
                "variant": variant}
        proc = subprocess.run([sys.executable, "-c", WORKER, json.dumps(spec)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{variant} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    d, s = rows
    print(f"| layers (enc+dec) | tokens | device | dense s/step | SGA s/step | speed-up | dense peak MB | "
          f"SGA peak MB | memory ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.enc_layers}+{args.dec_layers} | {args.tokens ** 2} | {args.device} | {d['s_per_step']:.2f} | "
          f"{s['s_per_step']:.2f} | {d['s_per_step'] / s['s_per_step']:.2f}x | {d['peak_mb']:.0f} | "
          f"{s['peak_mb']:.0f} | {s['peak_mb'] / max(d['peak_mb'], 1):.2f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
