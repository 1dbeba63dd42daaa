"""Import directions (README "Layers"): each layer imports only the layers below it.

    cli                                   anything (thin: imports the one command it runs)
    eval, infer, official | train, launch applications | trainer and launchers: siblings, never each other
    models, attention, data               plain PyTorch / numpy
    ground                                config, utils, distenv, exitcodes, artifacts, runlock
Checked on the source (every import statement, including those inside functions), so a lazy import
cannot hide a wrong direction.
"""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "asset_dist"

LAYER = {"models": "lib", "attention": "lib", "data": "lib", "train": "trainer", "launch": "trainer",
         "eval": "apps", "infer": "apps", "official": "apps", "cli": "cli"}
ALLOWED = {"ground": {"ground"}, "lib": {"ground", "lib"}, "trainer": {"ground", "lib", "trainer"},
           "apps": {"ground", "lib", "apps"}, "cli": {"ground", "lib", "trainer", "apps", "cli"}}


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
