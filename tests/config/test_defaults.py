"""One home for each default: the schemas hold them; conf/ states choices and real overrides;
the configuration reference shows what a run gets."""

from pathlib import Path
from typing import Any

import pytest
import yaml
from omegaconf import OmegaConf

from dgxtrain.config import compose
from dgxtrain.config.load import GROUP_SCHEMAS
from dgxtrain.config.schemas import Config
from dgxtrain.loop.train import train
from dgxtrain.tools import configdoc
from tests.conftest import ROOT

CONF = ROOT / "conf"


def _schema_defaults(node: type) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(node))


def _group_defaults(group: str, path: Path) -> dict[str, Any] | None:
    """The defaults a group file extends: its schema's, or those of the group file it names
    (`defaults: [dataset]`). None: a file with no schema (a `_target_`'s own arguments)."""
    for entry in yaml.safe_load(path.read_text()).get("defaults", []):
        name = entry.split("@")[0] if isinstance(entry, str) else None
        if (group, name) in GROUP_SCHEMAS:
            return _schema_defaults(GROUP_SCHEMAS[(group, name)])
        if name and (CONF / group / f"{name}.yaml").exists():
            return _group_defaults(group, CONF / group / f"{name}.yaml")
    return None


def _repeats(values: dict, defaults: dict, where: str = "") -> list[str]:
    out = []
    for key, value in values.items():
        if key == "defaults" or key not in defaults:
            continue
        if isinstance(value, dict) and isinstance(defaults[key], dict):
            out += _repeats(value, defaults[key], f"{where}{key}.")
        elif value == defaults[key]:
            out.append(f"{where}{key}={value!r}")
    return out


def _files(*skip: str) -> list[Path]:
    return [p for p in sorted(CONF.rglob("*.yaml")) if p.relative_to(CONF).parts[0] not in skip]


def test_no_yaml_value_repeats_its_schema_default():
    repeats, checked = [], 0
    for path in _files("experiment", "hydra"):
        rel, values = path.relative_to(CONF), yaml.safe_load(path.read_text()) or {}
        if len(rel.parts) == 1:  # the root config
            defaults = _schema_defaults(Config)
        else:
            group = rel.parts[0]
            defaults = _group_defaults(group, path)
            if defaults is None:
                continue
            if path.read_text().startswith("# @package _global_"):
                defaults = {**_schema_defaults(Config), group: defaults}
            else:
                values = {group: values}
                defaults = {group: defaults}
        checked += 1
        repeats += [f"{rel}: {r}" for r in _repeats(values, defaults)]
    assert checked >= 10  # the root config and the schema-backed group files
    assert not repeats, repeats


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_every_value_of_an_experiment_changes_what_the_run_gets(experiment):
    raw = yaml.safe_load((CONF / "experiment" / f"{experiment}.yaml").read_text())
    # The experiment's group choices alone: each of its values must change something.
    choices = [f"{k.split('/')[-1]}={v}" for d in raw.get("defaults", []) if isinstance(d, dict)
               for k, v in d.items()]
    base = OmegaConf.to_container(compose(choices), resolve=False)

    def leaves(node: dict, where: str = ""):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from leaves(value, f"{where}{key}.")
            elif key != "defaults" or where:
                yield f"{where}{key}", value

    same = [key for key, value in leaves(raw)
            if OmegaConf.select(OmegaConf.create(base), key, default=object()) == value]
    assert not same, f"{experiment}: these values are what the run gets anyway: {same}"


def test_a_classifier_without_named_metrics_trains_and_the_regression_data_adds_r2(tmp_path):
    assert list(compose([]).metrics) == ["loss", "r2"]  # data=synthetic
    digits = compose(["device=cpu", "data=digits", "model=digits_mlp", "loss=cross_entropy",
                      "data.num_workers=0", "trainer.max_steps=4", "trainer.warmup_steps=1",
                      "trainer.global_batch_size=32", "logger=none"])
    assert list(digits.metrics) == ["loss"]  # what every task can compute
    s = train(digits, tmp_path)
    assert s["steps"] == 4 and s["eval_loss"] > 0 and "eval_r2" not in s


def test_the_reference_shows_what_the_default_run_gets():
    text = configdoc.render()
    run = OmegaConf.to_container(compose([]), resolve=False)
    cells = {}
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(" | ")]
        if line.startswith("| `") and len(parts) == 4:
            cells.setdefault(parts[0].strip("| `"), parts[2])
    top = {k: v for k, v in run.items() if k not in ("hydra",) and not isinstance(v, dict)}
    sections = {f"{s}.{k}": v for s in configdoc.schemas.SECTIONS for k, v in run[s].items()}
    expected = {**top, **sections}
    assert set(expected) <= set(cells)
    for key, value in expected.items():
        assert cells[key].split("`")[1] == repr(value), (key, cells[key], value)
    # Where a group file sets a value the schema does not, the reference says which.
    assert "logger=wandb" in cells["logger.backend"] and "data=synthetic" in cells["metrics"]
