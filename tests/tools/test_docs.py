"""docs/configuration.md is what the schemas' field docstrings generate, and every page the
README links to exists."""

import re

from dgxtrain.tools import configdoc
from tests.conftest import ROOT


def test_configuration_page_is_current():
    assert configdoc.main(["--check"]) == 0, "run: python -m dgxtrain.tools.configdoc"


def test_configuration_page_documents_every_field():
    from dataclasses import fields

    from dgxtrain import config

    page = configdoc.render()
    for schema in (config.TrainerConfig, config.DistConfig, config.CheckpointConfig,
                   config.PreemptionConfig, config.FaultConfig, config.LoggerConfig):
        for f in fields(schema):
            row = next(ln for ln in page.splitlines() if f"`{schema.section}.{f.name}`" in ln)
            assert not row.rstrip().endswith("|  |"), f"{schema.section}.{f.name}: no docstring"


def test_readme_links_resolve_and_stay_a_front_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for target in re.findall(r"\]\(((?:docs/)[^)#]+)", readme):
        assert (ROOT / target).exists(), target
