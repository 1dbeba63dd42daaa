"""`asset-dist --help` and `asset-dist CMD --help` import no torch (they answer at once, even on a login node
without torch), and running a command imports only that command."""
from __future__ import annotations

import subprocess
import sys

import pytest

from asset_dist.cli import COMMANDS

BLOCK = ("import sys\n"
         "for m in ('torch', 'deepspeed', 'numpy.random', 'webdataset'): sys.modules[m] = None  # import -> error\n"
         "from asset_dist.cli import main\n"
         "sys.exit(main(sys.argv[1:]))\n")


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK, *argv], capture_output=True, text=True, timeout=120)


def test_top_level_help_needs_no_torch():
    proc = run("--help")
    assert proc.returncode == 0, proc.stderr
    for name in COMMANDS:
        assert name in proc.stdout


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_command_help_needs_no_torch(name):
    proc = run(name, "--help")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith(f"usage: asset-dist {name}"), proc.stdout[:300]


def test_blocking_really_blocks():
    """The check above could not fail if the block did not work: importing a command module that needs torch
    must fail under it."""
    proc = subprocess.run([sys.executable, "-c", BLOCK.replace("from asset_dist.cli import main",
                                                              "import asset_dist.train.engine\nmain = None")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "torch" in proc.stderr


def test_only_the_command_run_is_imported():
    code = ("import sys\nfrom asset_dist.cli import build_parser, _command_in\n"
            "build_parser(_command_in(['evaluate', '--help']))\n"
            "print(sorted(m for m in sys.modules if m.startswith('asset_dist.')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    assert "asset_dist.eval.cli" in out
    for other in ("asset_dist.train.args", "asset_dist.infer.commands", "asset_dist.launch.submit"):
        assert other not in out, out
