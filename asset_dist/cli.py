"""`asset-dist` command line: each subcommand is a thin call into the module that does the work.

Subcommands register lazily (module path + function), so `asset-dist --help` stays fast and a
missing optional dependency of one command does not break the others.

Bad input (a config value, a missing or unreadable file, a bad edit set, a held output-folder lock, an output
folder that cannot be written) ends every command the same way: `error: <message naming it>` on stderr and
exit code 2, no traceback. ASSET_DIST_TRACEBACK=1 shows the traceback as well (for bug reports).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> (module, function that adds arguments, function that runs, one-line help)
COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "train": ("asset_dist.train.engine", "add_args", "main", "train any stage (vqgan, seg, guide, sga)"),
    "submit": ("asset_dist.launch.submit", "add_args", "main",
               "submit a training run through submitit (SLURM or local; checkpoint + resubmit on time limit)"),
    "pipeline": ("asset_dist.launch.pipeline", "add_args", "main",
                 "submit the whole training chain as dependent jobs (finished stages are skipped)"),
    "precompute-guides": ("asset_dist.infer.commands", "add_precompute_args", "precompute_main",
                          "store the guide's SGA block picks for an edit set"),
    "edit-batch": ("asset_dist.infer.commands", "add_batch_args", "batch_main",
                   "edit every record of an edit set (distributed, resumable)"),
    "edit": ("asset_dist.infer.commands", "add_edit_args", "edit_main", "one edit from image, label map and mask"),
    "gallery": ("asset_dist.infer.gallery", "add_args", "main",
                "gallery.html + contact sheet for an edit-batch output (input, labels before/after, mask, samples)"),
    "evaluate": ("asset_dist.eval.cli", "add_args", "main",
                 "evaluate tokenizers, SGA attention settings or an edit-batch output (tables in JSON + markdown)"),
    "import-official": ("asset_dist.official.importer", "add_args", "main",
                        "import the official ASSET checkpoints as exports + config (compatibility modes on)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asset-dist", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (mod, add_args, _run, helptext) in COMMANDS.items():
        p = sub.add_parser(name, help=helptext, description=helptext)
        getattr(importlib.import_module(mod), add_args)(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    mod, _add, run, _h = COMMANDS[args.command]
    from asset_dist.runlock import LockHeld

    try:
        rc = getattr(importlib.import_module(mod), run)(args)
    except (ValueError, OSError, LockHeld) as e:  # InputError and ConfigError are ValueErrors
        if os.environ.get("ASSET_DIST_TRACEBACK") == "1":
            raise
        return report_error(e)
    return int(rc or 0)


def error_text(e: BaseException) -> str:
    """One line for an error: an OSError as 'path: reason', anything else as its message."""
    if isinstance(e, OSError) and e.filename is not None:
        return f"{e.filename}: {e.strerror or e}"
    return str(e) or type(e).__name__


def report_error(e: BaseException) -> int:
    from asset_dist.exitcodes import EXIT_BAD_INPUT

    print(f"error: {error_text(e)}", file=sys.stderr, flush=True)
    return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
