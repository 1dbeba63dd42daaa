"""Import directions (README "Code layout"): each layer imports only the layers below it.

    cli                                   anything (thin: imports the one command it runs)
    eval, infer | train, launch           applications | trainer and launchers: siblings, never each other
    official                              compatibility with the official release, built on the layer below
    models, attention, data               plain PyTorch / numpy
    ground                                config, jobspec, utils, distenv, exitcodes, artifacts, runlock
Checked on the source (every import statement, including those inside functions), so a lazy import
cannot hide a wrong direction.
"""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "asset_dist"

LAYER = {"models": "lib", "attention": "lib", "data": "lib", "train": "trainer", "launch": "trainer",
         "official": "compat", "eval": "apps", "infer": "apps", "cli": "cli"}
ALLOWED = {"ground": {"ground"}, "lib": {"ground", "lib"}, "compat": {"ground", "lib", "compat"},
           "trainer": {"ground", "lib", "compat", "trainer"}, "apps": {"ground", "lib", "compat", "apps"},
           "cli": {"ground", "lib", "compat", "trainer", "apps", "cli"}}


def layer_of(module: str) -> str:
    parts = module.split(".")
    return LAYER.get(parts[1], "ground") if len(parts) > 1 else "ground"


def imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("asset_dist")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("asset_dist"):
            if node.module == "asset_dist":  # `from asset_dist import models` names a subpackage
                out += [(node.lineno, f"asset_dist.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, node.module))
    return out


def test_every_module_imports_only_the_layers_below_it():
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        me = layer_of(".".join(rel.parts))
        for line, mod in imports(path):
            if layer_of(mod) not in ALLOWED[me]:
                bad.append(f"{path.relative_to(PKG.parent)}:{line} ({me}) imports {mod} ({layer_of(mod)})")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_the_checker_sees_a_wrong_direction(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from asset_dist.train.engine import Trainer\n")
    assert imports(f) == [(2, "asset_dist.train.engine")]
    assert layer_of("asset_dist.train.engine") not in ALLOWED[layer_of("asset_dist.models.vqgan")]


def test_official_compatibility_code_lives_in_one_package():
    stray = [str(p.relative_to(PKG.parent)) for p in PKG.rglob("*official*")
             if p.relative_to(PKG).parts[0] != "official"]
    assert not stray, f"official-compatibility modules outside asset_dist/official: {stray}"


def test_the_official_rule_reaches_the_model_only_through_its_registry():
    """models/ never imports official/: a model asking for sga_semantics "official" before anything registered it
    gets a named error, and one built after `asset_dist.official.attention` is imported runs its kernels."""
    code = ("import torch\n"
            "from asset_dist.config import TransformerConfig\n"
            "from asset_dist.models.transformer import AssetTransformer\n"
            "from asset_dist.models import decoding as D\n"
            "cfg = TransformerConfig(vocab_size=8, cond_vocab_size=4, d_model=16, n_heads=2, ffn_dim=16,\n"
            "    encoder_layers=1, decoder_layers=1, block_grid=[2, 2], sga_semantics='official')\n"
            "try:\n"
            "    AssetTransformer(cfg)\n"
            "except ValueError as e:\n"
            "    print('ERR', e)\n"
            "import asset_dist.official.attention as AO\n"
            "m = AssetTransformer(cfg)\n"
            "print('OK', m.sga_fn is AO.official_sga_attention, D.block_kernel(m) is AO.official_block_attention)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(PKG.parent)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("ERR transformer.sga_semantics: 'official' is not registered")
    assert "asset_dist.official.attention" in lines[0]
    assert lines[1] == "OK True True"


def test_the_readme_table_shows_these_layers():
    """README "Code layout": one row per package or ground module, in the layer this file enforces."""
    readme = (PKG.parent / "README.md").read_text().split("## Code layout", 1)[1].split("\n## ", 1)[0]
    shown = {}
    for row in readme.splitlines():
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0] in ALLOWED:
            for name in re.findall(r"`([\w.]+)/?`", cells[1]):
                shown[name.removesuffix(".py")] = cells[0]
    packages = {p.name for p in PKG.iterdir() if (p / "__init__.py").is_file()}
    modules = {p.stem for p in PKG.glob("*.py") if p.stem != "__init__"}
    assert set(shown) == packages | modules, f"README table vs the package: {sorted(set(shown) ^ (packages | modules))}"
    assert all(layer_of(f"asset_dist.{name}") == layer for name, layer in shown.items()), shown
