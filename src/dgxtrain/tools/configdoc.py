"""`python -m dgxtrain.tools.configdoc [--check]`: docs/configuration.md, generated from the
config schemas' field docstrings (config.py), so the reference cannot drift from the code.
--check exits 1 if the file is not what this would write."""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

from dgxtrain.config import groups, schemas

SOURCES = [Path(schemas.__file__), Path(groups.__file__)]
DOC = Path(__file__).resolve().parents[3] / "docs" / "configuration.md"
# (heading, the group file that selects it) for the schemas of the _target_ groups.
GROUPS = {"LinearModelConfig": "model=linear", "MLPModelConfig": "model=mlp",
          "SyntheticDataConfig": "data=synthetic", "DatasetDataConfig": "data=dataset",
          "AdamWConfig": "optim=adamw",
          "SGDConfig": "optim=sgd"}


def _default(node: ast.expr | None) -> str:
    if node is None:
        return "required"
    if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "field":
        for kw in node.keywords:
            if kw.arg == "default_factory":
                return ast.unparse(kw.value.body if isinstance(kw.value, ast.Lambda)
                                   else kw.value) + ("" if isinstance(kw.value, ast.Lambda)
                                                     else "()")
    text = ast.unparse(node)
    return "required" if text == "MISSING" else text


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
        rows = [r for r in rows if r[0] != name] + [(name, kind, _default(node.value), doc)]
    return section, rows


def _table(section: str, rows: list[tuple]) -> list[str]:
    out = ["| key | type | default | what it does |", "|---|---|---|---|"]
    for name, kind, default, doc in rows:
        key = f"{section}.{name}" if section else name
        doc = doc or ("The class instantiated." if name == "_target_" else "")
        out.append(f"| `{key}` | `{kind.replace('|', chr(92) + '|')}` | `{default}` | "
                   f"{doc.replace('|', '/')} |")
    return out


def render() -> str:
    classes = {k: v for src in SOURCES for k, v in _classes(ast.parse(src.read_text())).items()}
    lines = ["# Configuration reference", "",
             "Generated from the schemas in `src/dgxtrain/config/schemas.py` and `groups.py` by "
             "`python -m dgxtrain.tools.configdoc`; a test fails when it is stale. Every key "
             "is a Hydra override: `python -m dgxtrain trainer.max_steps=200 optim.lr=3e-4`. "
             "A bad value fails before any GPU work, with one line naming the key and the fix.",
             ""]
    for name in ("Config", "TrainerConfig", "CheckpointConfig", "DistConfig",
                 "PreemptionConfig", "FaultConfig", "LoggerConfig"):
        section, rows = _fields(classes[name], classes)
        rows = [r for r in rows if r[0] not in schemas.SECTIONS]  # their own tables
        lines += [f"## `{section or 'top level'}`", ""] + _table(section, rows) + [""]
    lines += ["## The `_target_` groups", "",
              "`model`, `data` and `optim` are instantiated from their `_target_`; the other "
              "keys are its arguments. The group files below extend these schemas; a `_target_`"
              " of your own takes the keys of its own class.", ""]
    for name, choice in GROUPS.items():
        section, rows = _fields(classes[name], classes)
        lines += [f"### `{choice}`", ""] + _table(section, rows) + [""]
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
