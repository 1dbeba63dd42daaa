"""`asset-dist evaluate tokenizer | transformer | edits | fid`: argument parsing; the work is in the modules.

Each writes OUT/eval_<what>.json and OUT/eval_<what>.md (rank 0) and prints the table. Exit codes: 0 done,
1 the edit check failed (pixels outside the blend band changed, or samples missing), 2 bad config or input.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from asset_dist.config import ConfigError, add_config_args, int_arg, path_arg
from asset_dist.exitcodes import EXIT_BAD_INPUT, EXIT_FAILED as EXIT_CHECK_FAILED
from asset_dist.utils import InputError, writable_dir

TRUST_HELP = ("the extractor file is a program (TorchScript, or a torch.export .pt2 that is unpickled): loading it "
              "runs code stored in it. Required with an extractor; pass it only for files you trust")


def _device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: the local rank's GPU when CUDA is available, else CPU")


def _data_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    p.add_argument("--max-samples", type=int_arg(0), default=0,
                   help="evaluate at most N val samples in total (0 = the whole val split)")
    p.add_argument("--out", default=None, type=path_arg,
                   help="folder for eval_*.json / eval_*.md (default paths.run_dir)")
    _device(p)


def add_args(p: argparse.ArgumentParser) -> None:
    p.description = ("Evaluate tokenizers and transformers on the held-out (val) split of the shards "
                     "(data.val_shards, else the manifest's val split), or an edit-batch output. Single process, "
                     "or torchrun/srun: each rank reads its share and the sums are all-reduced.")
    sub = p.add_subparsers(dest="eval_command", metavar="WHAT")
    p.set_defaults(eval_parser=p)

    t = sub.add_parser("tokenizer", help="reconstruction PSNR / seg accuracy and codebook usage",
                       description="VQGAN: PSNR of the reconstruction (and of the known pixels with the val hole "
                                   "masked); seg tokenizer: pixel accuracy, mIoU; both: codebook usage and "
                                   "perplexity. On the val split at data.resolution.")
    _data_args(t)
    t.add_argument("--weights", default=None, type=path_arg,
                   help="one vqgan or seg export (its stage decides); default: train.vqgan_weights and "
                        "train.seg_weights, each that is set")

    m = sub.add_parser("transformer", help="hole-token NLL / top-1 of an SGA model under several attention settings",
                       description="Teacher-forced hole-token NLL and top-1 accuracy of one SGA model on val crops "
                                   "at data.resolution with guided picks (the paper), window only, random picks, "
                                   "and the dense guide at 256 for reference. The config is the SGA stage's "
                                   "(train.vqgan_weights, seg_weights, guide_weights).")
    _data_args(m)
    m.add_argument("--weights", default=None, type=path_arg,
                   help="the SGA export to evaluate (default infer.sga_weights, else paths.run_dir/export/sga.pt); "
                        "a guide export works too (SGA's starting point)")
    m.add_argument("--settings", default="guided,window,random,guide256",
                   help="comma-separated rows among guided, window, random, dense (full attention, same weights), "
                        "guide256 (default: %(default)s)")
    m.add_argument("--seed", type=int, default=0, help="seed of the random picks (with each sample's key)")

    a = sub.add_parser("ablation", help="does the guide matter? guided vs window vs random picks, with 95 %% CIs",
                       description="Teacher-forced hole-token NLL and top-1 of one SGA model on val crops with the "
                                   "guide's block picks, random picks and the window alone: pooled over hole "
                                   "tokens, bootstrap 95 %% intervals over samples and paired intervals of the "
                                   "differences; with --sources, how often picks land on the block holding each "
                                   "hole's true source; --figure N writes a PNG of N samples (input, hole, "
                                   "tokenizer reconstruction, guided / window / random samples). Any shards and "
                                   "exports: the config is the SGA stage's.")
    _data_args(a)
    a.add_argument("--weights", default=None,
                   help="the SGA export (default infer.sga_weights, else paths.run_dir/export/sga.pt)")
    a.add_argument("--sources", default=None,
                   help="sources.json of data_tools/make_longrange.py (per sample key, where each pixel's content "
                        "comes from): adds the guide's pick hit rate and a per-rule breakdown")
    a.add_argument("--figure", type=int, default=4, help="samples in eval_ablation.png (0 = no figure; default "
                                                         "%(default)s)")
    a.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples (default %(default)s)")
    a.add_argument("--seed", type=int, default=0, help="seed of the random picks and the bootstrap")

    e = sub.add_parser("edits", help="check and score an edit-batch output folder",
                       description="Pixels outside the blend band unchanged (must be 100 %; exit 1 otherwise), "
                                   "diversity between samples inside the mask (pixel L1; LPIPS with local "
                                   "weights), timings per phase from OUT/manifest.jsonl, FID with a local "
                                   "feature extractor.")
    e.add_argument("--edit-out", required=True, type=path_arg,
                   help="the edit-batch output folder (holds manifest.jsonl)")
    e.add_argument("--edits", default=None, type=path_arg,
                   help="the edit inputs given to edit-batch (shards folder or manifest); default: infer.edits of "
                        "EDIT_OUT/config.yaml")
    e.add_argument("--band", type=int_arg(0), default=None,
                   help="blend band in pixels (default: blend_band of EDIT_OUT/run.json)")
    e.add_argument("--out", default=None, type=path_arg, help="folder for eval_edits.json / .md (default EDIT_OUT)")
    e.add_argument("--class-stats", default=None, type=path_arg,
                   help="training shards (or a class_colours.json made from them) for the label-following "
                        "score: per-class colour histograms; default data.train_shards of EDIT_OUT/config.yaml "
                        "when it exists. Computed stats are cached as OUT/class_colours.json")
    e.add_argument("--lpips-weights", default="",
                   help="LPIPS weights file(s), comma-separated (default: the torch hub cache, if present)")
    e.add_argument("--fid-extractor", default=None, type=path_arg,
                   help="TorchScript (.pt) or torch.export (.pt2) feature extractor for FID inputs-vs-samples (e.g. "
                        "inception-2015-12-05.pt); needs --trust-extractor")
    e.add_argument("--trust-extractor", action="store_true", help=TRUST_HELP)
    _device(e)

    f = sub.add_parser("fid", help="FID between two image folders or feature files",
                       description="Frechet distance between the feature statistics of REAL and FAKE: each a .npy "
                                   "[N, D] feature file or an image folder (then --extractor is needed). No "
                                   "network access: the extractor is a local TorchScript file.")
    f.add_argument("--real", required=True, type=path_arg, help=".npy features (read without pickle) or image folder")
    f.add_argument("--fake", required=True, type=path_arg, help=".npy features (read without pickle) or image folder")
    f.add_argument("--extractor", default=None, type=path_arg,
                   help="TorchScript (.pt) or torch.export (.pt2) feature extractor, called as "
                        "model(x, return_features=True) on float [N,3,H,W] in 0..255 (e.g. inception-2015-12-05.pt); "
                        "needs --trust-extractor")
    f.add_argument("--trust-extractor", action="store_true", help=TRUST_HELP)
    f.add_argument("--out", default=None, type=path_arg, help="also write eval_fid.json / .md here")
    _device(f)


def _print_written(paths) -> None:
    for p in paths:
        print(f"wrote {p}", flush=True)


def _run(args) -> int:
    import torch

    with torch.no_grad():  # a context, not set_grad_enabled: callers (tests, notebooks) keep their grad mode
        return _run_body(args)


def _run_body(args) -> int:
    import torch

    from asset_dist.eval import common as C

    if args.eval_command in ("tokenizer", "transformer", "ablation"):
        from asset_dist.config import load_config

        cfg = load_config(args.config, args.overrides)
        out = writable_dir(args.out or cfg.paths.run_dir, "evaluate --out")
        try:
            if args.eval_command == "tokenizer":
                from asset_dist.eval.tokenizer import evaluate_tokenizer, tokenizer_markdown

                rep = evaluate_tokenizer(cfg, args.weights, args.max_samples, args.device)
                md = tokenizer_markdown(rep)
            elif args.eval_command == "ablation":
                from asset_dist.eval.ablation import ablation_markdown, evaluate_ablation

                if args.bootstrap < 1 or args.figure < 0:
                    raise ValueError("--bootstrap must be >= 1 and --figure >= 0")
                rep = evaluate_ablation(cfg, args.weights, args.max_samples, args.seed, args.sources,
                                        args.bootstrap, args.figure, Path(out) / "eval_ablation.png", args.device)
                md = ablation_markdown(rep)
            else:
                from asset_dist.eval.transformer import evaluate_transformer, transformer_markdown

                settings = [s.strip() for s in args.settings.split(",") if s.strip()]
                rep = evaluate_transformer(cfg, args.weights, args.max_samples, settings, args.seed, args.device)
                md = transformer_markdown(rep)
            rep["config"], rep["overrides"] = str(args.config), list(args.overrides)
            from asset_dist.distenv import dist_env

            if dist_env().is_main:
                print(md, flush=True)
                _print_written(C.write_report(out, args.eval_command, rep, md))
        finally:
            C.finish()
        return 0
    extractor = args.fid_extractor if args.eval_command == "edits" else args.extractor
    if extractor and not args.trust_extractor:
        raise InputError(f"feature extractor {extractor}: loading it runs code stored in the file (TorchScript, or a "
                         "torch.export program that is unpickled); pass --trust-extractor if you trust where it "
                         "comes from")
    if args.eval_command == "edits":
        from asset_dist.eval.edits import edits_markdown, evaluate_edits, load_extractor, load_lpips

        writable_dir(args.out or args.edit_out, "evaluate edits --out")
        dev = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
        lpips, note = load_lpips(args.lpips_weights, dev)
        ext = load_extractor(args.fid_extractor, dev, args.trust_extractor) if args.fid_extractor else None
        stats = _class_stats(args)
        rep = evaluate_edits(args.edit_out, args.edits, args.band, lpips, ext, lpips_note=note, class_stats=stats)
        md = edits_markdown(rep)
        print(md, flush=True)
        _print_written(C.write_report(args.out or args.edit_out, "edits", rep, md))
        if not rep["preservation"]["passed"]:
            print(f"error: edit check FAILED: {rep['preservation']['pixels_changed']} pixel(s) outside the "
                  f"{rep['band']} px blend band differ from the input; {rep['problem_count']} missing or mis-sized "
                  f"sample(s) (details in eval_edits.json)", file=sys.stderr, flush=True)
            return EXIT_CHECK_FAILED
        return 0
    from asset_dist.eval.edits import evaluate_fid

    dev = "cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu"
    if args.out:
        writable_dir(args.out, "evaluate fid --out")
    rep = evaluate_fid(args.real, args.fake, args.extractor, dev, args.trust_extractor)
    md = (f"# FID\n\n{C.fmt(rep['fid'])} ({rep['n_real']} real, {rep['n_fake']} fake, {rep['feature_dim']}-d "
          f"features)\n")
    print(md, flush=True)
    if args.out:
        _print_written(C.write_report(Path(args.out), "fid", rep, md))
    return 0


def _class_stats(args):
    """The label-following statistics for `evaluate edits` (None when no training shards are known)."""
    from asset_dist.eval.edits import run_settings
    from asset_dist.eval.labels import load_or_compute_stats

    _, cfg = run_settings(Path(args.edit_out))
    data = cfg.get("data") or {}
    spec = args.class_stats or data.get("train_shards") or ""
    if not spec or (not args.class_stats and not Path(str(spec)).exists()):
        return None
    seg = ((cfg.get("model") or {}).get("seg") or {})
    num_classes = int(seg.get("in_channels") or data.get("num_classes") or 256)
    cache = Path(args.out or args.edit_out) / "class_colours.json"
    return load_or_compute_stats(str(spec), int(data.get("label_shift") or 0), num_classes, cache)


def main(args: argparse.Namespace) -> int:
    if not getattr(args, "eval_command", None):
        args.eval_parser.print_help()
        return EXIT_BAD_INPUT
    from asset_dist.eval.common import EvalError

    try:
        return _run(args)
    except (ConfigError, EvalError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
