"""`asset-dist` command line: each subcommand is a thin call into the module that does the work.

Subcommands register lazily (module path + function), so `asset-dist --help` stays fast and a
missing optional dependency of one command does not break the others.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, function that adds arguments, function that runs, one-line help)
COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "train": ("asset_dist.train.engine", "add_args", "main", "train any stage (vqgan, seg, guide, sga)"),
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
    rc = getattr(importlib.import_module(mod), run)(args)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
