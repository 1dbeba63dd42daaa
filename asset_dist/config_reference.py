"""The config reference (docs/CONFIG.md), generated from the dataclasses in config.py so it cannot drift:
every key with its type, default and the comment written next to it. tests/test_readme.py checks the file is
current. Regenerate with `python -m asset_dist.config_reference > docs/CONFIG.md`."""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import typing

from asset_dist import config as C

HEADER = """# Config reference

Generated from `asset_dist/config.py` by `python -m asset_dist.config_reference > docs/CONFIG.md` (a test keeps
it current). Defaults are the paper's (docs/ASSET_NOTES.md); `configs/*.yaml` set what differs per stage and dataset,
`base: other.yaml` inherits a file, `--set a.b.c=value` overrides on any command. `???` = required.
"""


def field_comments(cls: type) -> dict[str, str]:
    """name -> the comment on its line, or the comment lines right above it."""
    out: dict[str, str] = {}
    above: list[str] = []
    for line in inspect.getsource(cls).splitlines()[1:]:
        s = line.strip()
        if s.startswith(("def ", "@")):
            break  # the fields come first; methods (validation) follow
        if s.startswith("#"):
            above.append(s.lstrip("# ").strip())
            continue
        m = re.match(r"(\w+)\s*:[^#]*?(?:#\s*(.*))?$", s)
        if m and not s.startswith(('"""', "def ", "@")):
            out[m.group(1)] = " ".join(above + ([m.group(2)] if m.group(2) else []))
        above = []
    return out


def _value(v: typing.Any) -> str:
    return "`" + ('""' if v == "" else str(v)) + "`"


def _type(tp: typing.Any) -> str:
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return f"{_type(args[0])} or null" if len(args) == 1 else " or ".join(_type(a) for a in args)
    if typing.get_origin(tp) is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def rows(obj: typing.Any, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, meaning) of every leaf; defaults from the instance (a section's own factory, such
    as model.seg's 182 classes, wins over the class defaults)."""
    cls = type(obj)
    hints = typing.get_type_hints(cls)
    notes = field_comments(cls)
    out = []
    for f in dataclasses.fields(cls):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            out += rows(v, f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", _type(hints[f.name]), _value(v), notes.get(f.name, "")))
    return out


def render() -> str:
    parts = [HEADER]
    cfg = C.Config()
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if not dataclasses.is_dataclass(v):
            parts.append(f"\n`{f.name}` (default {_value(v)}): the run's name.\n")
            continue
        doc = (inspect.getdoc(type(v)) or "").split("\n\n")[0].replace("\n", " ")
        if doc.startswith(type(v).__name__ + "("):  # dataclass auto-doc, not ours
            doc = ""
        parts.append(f"\n## `{f.name}`\n\n" + (f"{doc}\n\n" if doc else ""))
        parts.append("| key | type | default | meaning |\n|---|---|---|---|\n")
        for key, t, d, note in rows(v, f"{f.name}."):
            parts.append(f"| `{key}` | {t} | {d} | {note.replace('|', '/')} |\n")
    return "".join(parts) + render_renamed() + render_launch()


def render_renamed() -> str:
    """Deprecated key names (config.RENAMED) that still load."""
    parts = ["\n## Renamed keys (deprecated names)\n\n",
             "The old name still loads, from files (with a warning), `--set`, and saved configs (run folders' "
             "`config.yaml`, checkpoints, exports); giving both names with different values is an error. "
             "Configs are written with the new name: rename the old one in your files.\n\n",
             "| deprecated | use |\n|---|---|\n"]
    parts += [f"| `{old}` | `{new}` |\n" for old, new in C.RENAMED.items()]
    return "".join(parts)


def render_launch() -> str:
    """Pipeline files and job resources (asset_dist/jobspec.py): not part of a stage config."""
    from asset_dist import jobspec as spec

    parser = argparse.ArgumentParser()
    spec.add_resource_args(parser)
    flags = {a.dest: a.option_strings[0] for a in parser._actions if a.option_strings}
    parts = ["\n# Pipeline files and job resources\n\n",
             "`asset-dist pipeline --config configs/pipelines/<name>.yaml` reads a pipeline file (not a stage "
             "config): its keys, then the keys of each entry under `stages`.\n\n",
             "| key | meaning |\n|---|---|\n"]
    parts += [f"| `{k}` | {v} |\n" for k, v in spec.PIPELINE_KEYS.items()]
    parts.append("\n| `stages.<name>.` key | meaning |\n|---|---|\n")
    parts += [f"| `{k}` | {v} |\n" for k, v in spec.STAGE_KEYS.items()]
    doc = (inspect.getdoc(spec.Resources) or "").replace("\n", " ")
    parts.append(f"\n## `resources`\n\n{doc} A flag given to `asset-dist pipeline` overrides that resource for "
                 "every stage.\n\n| key | type | default | flag | meaning |\n|---|---|---|---|---|\n")
    for key, t, d, note in rows(spec.Resources()):
        parts.append(f"| `{key}` | {t} | {d} | `{flags.get(key, '')}` | {note.replace('|', '/')} |\n")
    return "".join(parts)


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description="Print the config reference (markdown) generated from config.py.",
                            ).parse_args(argv)
    print(render(), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
