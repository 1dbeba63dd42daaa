"""The README's commands stay true: every command it shows (code blocks and inline `asset-dist ...`,
`python ...`, `torchrun ...`, `sbatch ...`, `make ...`) parses with the real argument parser, names files that
exist, and its configs load with its `--set` / KEY=VALUE overrides. What they do is tested elsewhere (the
quickstart test runs the main job; each command has its own tests). Also: docs/CONFIG.md is current."""
from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from asset_dist import cli
from asset_dist.config import load_config
from asset_dist.config_reference import render

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PREFIXES = ("asset-dist ", "python ", "torchrun ", "sbatch ", "make ", "bash ", "RUN_DIR=", "CONFIG=")


def commands() -> list[str]:
    out = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                out.append(line)
    for span in re.findall(r"`([^`\n]+)`", README):
        if span.startswith(PREFIXES) and " --" in span:  # a full command, not a mention
            out.append(span)
    return out


def strip_optional(cmd: str) -> str:
    """Drop `[...]` optional groups and `|` alternatives shown as usage."""
    while re.search(r"\[[^\[\]]*\]", cmd):
        cmd = re.sub(r"\s*\[[^\[\]]*\]", "", cmd)
    return cmd


def check_config(cfg: str, overrides: list[str]) -> None:
    path = ROOT / cfg
    if cfg.startswith("configs/"):
        assert path.is_file(), cfg
        load_config(path, overrides)


def check_cli(argv: list[str]) -> None:
    try:
        args = cli.build_parser().parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"asset-dist {' '.join(argv)}: argument error ({e})")
    cfg = getattr(args, "config", None)
    if isinstance(cfg, list):  # submit takes several
        for c in cfg:
            check_config(c, [o for o in getattr(args, "overrides", []) if not o.startswith("data.")])
    elif cfg and args.command != "pipeline":
        check_config(cfg, getattr(args, "overrides", []) or [])
    elif cfg:
        assert (ROOT / cfg).is_file(), cfg


def check_script(path: str, argv: list[str]) -> None:
    spec = importlib.util.spec_from_file_location(Path(path).stem, ROOT / path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    try:
        mod.build_parser().parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"{path} {' '.join(argv)}: argument error ({e})")


def check(cmd: str) -> str:
    words = shlex.split(strip_optional(cmd))
    while words and re.match(r"^[A-Z_]+=", words[0]):  # environment assignments
        words.pop(0)
    head, rest = words[0], words[1:]
    if head == "make":
        targets = re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M)
        assert all(t in targets for t in rest), cmd
        return "make"
    if head == "bash":
        assert (ROOT / rest[0]).is_file(), cmd
        return "bash"
    if head == "asset-dist":
        check_cli(rest)
        return "cli"
    if head == "torchrun":
        i = rest.index("-m")
        assert rest[i + 1] == "asset_dist.cli", cmd
        check_cli(rest[i + 2:])
        return "cli"
    if head == "python":
        if rest[0] == "-m":
            if rest[1] == "asset_dist.cli":
                check_cli(rest[2:])
            else:
                assert importlib.util.find_spec(rest[1]) is not None, cmd
            return "cli"
        assert (ROOT / rest[0]).is_file(), cmd
        if rest[0].startswith("data_tools/"):
            check_script(rest[0], rest[1:])
        return "script"
    if head == "sbatch":
        script = next(w for w in rest if w.startswith("slurm/"))
        assert (ROOT / script).is_file(), cmd
        after = rest[rest.index(script) + 1:]
        if after and after[0].endswith(".yaml"):
            check_config(after[0], [w for w in after[1:] if "=" in w and "..." not in w])
        return "sbatch"
    return "other"


CMDS = commands()


def test_readme_shows_the_commands():
    kinds = [check(c) for c in CMDS]
    assert kinds.count("cli") >= 15 and kinds.count("sbatch") >= 4 and "make" in kinds and "script" in kinds


@pytest.mark.parametrize("cmd", CMDS)
def test_readme_command_is_valid(cmd):
    check(cmd)


def test_config_reference_is_current():
    doc = (ROOT / "docs" / "CONFIG.md").read_text()
    assert doc == render(), "docs/CONFIG.md is stale: python -m asset_dist.config_reference > docs/CONFIG.md"
    for key in ("model.transformer.guide_k", "data.mask.max_ratio", "train.loss.disc_start", "infer.blend_band",
                "deepspeed.zero_stage"):
        assert f"| `{key}` |" in doc
