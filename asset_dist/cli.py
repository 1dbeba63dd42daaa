"""`asset-dist` command line: each subcommand is a thin call into the module that does the work.

Subcommands register lazily (module path + function): only the command being run is imported, its
arguments come from a module without torch, so `asset-dist --help` stays fast and a missing optional
dependency of one command does not break the others.

Bad input (a config value, a missing or unreadable file, a bad edit set, a held output-folder lock, an output
folder that cannot be written) ends every command the same way: `error: <message naming it>` on stderr and
exit code 2, no traceback. ASSET_DIST_TRACEBACK=1 shows the traceback as well (for bug reports).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Optional

# name -> (module:function that adds the arguments, module:function that runs, one-line help). The argument
# modules import no torch, and only the command being run is imported at all: `asset-dist --help` and
# `asset-dist CMD --help` answer at once (tests/test_cli.py checks with torch made unimportable).
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("asset_dist.train.args:add_args", "asset_dist.train.engine:main",
              "train any stage (vqgan, seg, guide, sga)"),
    "submit": ("asset_dist.launch.submit:add_args", "asset_dist.launch.submit:main",
               "submit a training run through submitit (SLURM or local; checkpoint + resubmit on time limit)"),
    "pipeline": ("asset_dist.launch.pipeline:add_args", "asset_dist.launch.pipeline:main",
                 "submit the whole training chain as dependent jobs (finished stages are skipped)"),
    "precompute-guides": ("asset_dist.infer.commands:add_precompute_args", "asset_dist.infer.commands:precompute_main",
                          "store the guide's SGA block picks for an edit set"),
    "edit-batch": ("asset_dist.infer.commands:add_batch_args", "asset_dist.infer.commands:batch_main",
                   "edit every record of an edit set (distributed, resumable)"),
    "edit": ("asset_dist.infer.commands:add_edit_args", "asset_dist.infer.commands:edit_main",
             "one edit from image, label map and mask"),
    "gallery": ("asset_dist.infer.commands:add_gallery_args", "asset_dist.infer.gallery:main",
                "gallery.html + contact sheet for an edit-batch output (input, labels before/after, mask, samples)"),
    "evaluate": ("asset_dist.eval.cli:add_args", "asset_dist.eval.cli:main",
                 "evaluate tokenizers, SGA attention settings or an edit-batch output (tables in JSON + markdown)"),
    "import-official": ("asset_dist.official.args:add_args", "asset_dist.official.importer:main",
                        "import the official ASSET checkpoints as exports + config (compatibility modes on)"),
}


def _resolve(spec: str):
    mod, fn = spec.split(":")
    return getattr(importlib.import_module(mod), fn)


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The top-level parser; only `command`'s subparser (None: every one, for tools that list all options)
    gets its arguments, so nothing else is imported."""
    parser = argparse.ArgumentParser(prog="asset-dist", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (add_args, _run, helptext) in COMMANDS.items():
        p = sub.add_parser(name, help=helptext, description=helptext)
        if command is None or name == command:
            _resolve(add_args)(p)
    return parser


def _command_in(argv: list[str]) -> Optional[str]:
    """The subcommand named in argv: the first word that is not an option (top-level options take no value)."""
    for word in argv:
        if not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command_in(argv) or "")
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    from asset_dist.runlock import LockHeld

    try:
        rc = _resolve(COMMANDS[args.command][1])(args)
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
