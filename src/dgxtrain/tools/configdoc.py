"""`python -m dgxtrain.tools.configdoc [--check]`: docs/configuration.md, generated from the
config schemas' field docstrings (config/schemas.py, config/groups.py) and the values the
default run composes to, so the reference cannot drift from the code or from conf/.
--check exits 1 if the file is not what this would write."""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from dgxtrain.config import compose, groups, schemas

SOURCES = [Path(schemas.__file__), Path(groups.__file__)]
DOC = Path(__file__).resolve().parents[3] / "docs" / "configuration.md"
CONF = Path(__file__).resolve().parents[3] / "conf"
# (heading, the group file that selects it) for the schemas of the _target_ groups.
GROUPS = {"LinearModelConfig": "model=linear", "MLPModelConfig": "model=mlp",
          "SyntheticDataConfig": "data=synthetic", "DatasetDataConfig": "data=dataset",
          "AdamWConfig": "optim=adamw",
          "SGDConfig": "optim=sgd"}


def _classes(tree: ast.Module) -> dict[str, ast.ClassDef]:
    return {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}


def _fields(cls: ast.ClassDef, classes: dict[str, ast.ClassDef]) -> tuple[str, list[tuple]]:
    """(section, [(name, type, default, doc)]) with the fields of dataclass bases first."""
    section, rows = "", []
    for base in cls.bases:
        if isinstance(base, ast.Name) and base.id in classes and base.id != "Checked":
            section, rows = _fields(classes[base.id], classes)
    body = cls.body
    for i, node in enumerate(body):
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        name, kind = node.target.id, ast.unparse(node.annotation)
        if kind.startswith("ClassVar"):
            section = ast.literal_eval(node.value) if node.value is not None else section
            continue
        nxt = body[i + 1] if i + 1 < len(body) else None
        doc = (" ".join(nxt.value.value.split()) if isinstance(nxt, ast.Expr)
               and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)
               else "")
        rows = [r for r in rows if r[0] != name] + [(name, kind, doc)]
    return section, rows


def _value(node: dict[str, Any], name: str) -> str:
    value = node.get(name, "???")
    return "required" if value == "???" else repr(value)


def _set_by(section: str, name: str, choices: dict[str, str]) -> str | None:
    """The default choice whose group file sets this key, if one does."""
    for group, choice in choices.items():
        values = yaml.safe_load((CONF / group / f"{choice}.yaml").read_text()) or {}
        if not (CONF / group / f"{choice}.yaml").read_text().startswith("# @package _global_"):
            values = {group: values}
        if name in ((values.get(section) or {}) if section else values):
            return f"{group}={choice}"
    return None


def _table(section: str, rows: list[tuple], run: dict[str, Any], schema: dict[str, Any],
           choices: dict[str, str]) -> list[str]:
    """One row per key: its type, what a run gets (and which group file set it, where
    that is not the schema's default), and what it does."""
    out = ["| key | type | a run gets | what it does |", "|---|---|---|---|"]
    for name, kind, doc in rows:
        key = f"{section}.{name}" if section else name
        doc = doc or ("The class instantiated." if name == "_target_" else "")
        got = f"`{_value(run, name)}`"
        if isinstance(run.get(name), dict) and name in choices:  # a group: its table below
            got = f"`{name}={choices[name]}`"
        elif _value(run, name) != _value(schema, name):
            by = _set_by(section, name, choices)
            got += f" ({by}; schema: `{_value(schema, name)}`)" if by else ""
        out.append(f"| `{key}` | `{kind.replace('|', chr(92) + '|')}` | {got} | "
                   f"{doc.replace('|', '/')} |")
    return out


def _default_choices() -> dict[str, str]:
    """The group files config.yaml chooses, by group."""
    entries = yaml.safe_load((CONF / "config.yaml").read_text())["defaults"]
    return {k: v for e in entries if isinstance(e, dict) for k, v in e.items()
            if "/" not in k and not k.startswith("optional") and v}


def render() -> str:
    classes = {k: v for src in SOURCES for k, v in _classes(ast.parse(src.read_text())).items()}
    choices = _default_choices()
    run = OmegaConf.to_container(compose([]), resolve=False)
    lines = ["# Configuration reference", "",
             "Generated from the schemas in `src/dgxtrain/config/schemas.py` and `groups.py` and "
             "from what the default run composes to, by `python -m dgxtrain.tools.configdoc`; a "
             "test fails when it is stale. Every key is a Hydra override: `python -m dgxtrain "
             "trainer.max_steps=200 optim.lr=3e-4`. A bad value fails before any GPU work, with "
             "one line naming the key and the fix.", "",
             "The default run chooses " + ", ".join(f"`{g}={c}`" for g, c in choices.items())
             + ". *A run gets* is its value there; where a group file sets it, the file and "
             "the schema's own default are named.", ""]
    for name in ("Config", "TrainerConfig", "CheckpointConfig", "DistConfig",
                 "PreemptionConfig", "FaultConfig", "LoggerConfig"):
        section, rows = _fields(classes[name], classes)
        rows = [r for r in rows if r[0] not in schemas.SECTIONS]  # their own tables
        node = getattr(schemas, name)
        schema = OmegaConf.to_container(OmegaConf.structured(node))
        got = run[section] if section else run
        lines += [f"## `{section or 'top level'}`", ""]
        lines += _table(section, rows, got, schema, choices) + [""]
    lines += ["## The `_target_` groups", "",
              "`model`, `data` and `optim` are instantiated from their `_target_`; the other "
              "keys are its arguments. The group files below extend these schemas; a `_target_`"
              " of your own takes the keys of its own class. *A run gets* is the value with "
              "that group file chosen.", ""]
    for name, choice in GROUPS.items():
        section, rows = _fields(classes[name], classes)
        schema = OmegaConf.to_container(OmegaConf.structured(getattr(groups, name)))
        got = OmegaConf.to_container(compose([choice]), resolve=False)[section]
        lines += [f"### `{choice}`", ""] + _table(section, rows, got, schema, {}) + [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dgxtrain.tools.configdoc",
                                description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    args = p.parse_args(argv)
    text = render()
    if args.check:
        current = DOC.read_text() if DOC.exists() else ""
        if current != text:
            sys.stderr.write(f"{DOC} is stale; fix: python -m dgxtrain.tools.configdoc\n")
            return 1
        return 0
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
