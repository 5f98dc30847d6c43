"""The README's commands, run as a user would: from a fresh copy of the repository."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT, clean_env

README = (ROOT / "README.md").read_text()


def _fresh_copy(dst: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dst / f)
    return dst


def test_readme_names_the_two_commands():
    assert re.search(r"^scripts/train\.sh$", README, re.M)
    assert re.search(r"^scripts/test\.sh$", README, re.M)


@pytest.mark.multiprocess
def test_readme_train_command_from_a_fresh_copy(tmp_path):
    repo = _fresh_copy(tmp_path / "dgxtrain")
    assert not (repo / ".venv").exists()
    env = clean_env()
    env.pop("PYTHONPATH")
    env.pop("OMP_NUM_THREADS")
    p = subprocess.run(["scripts/train.sh"], cwd=repo, env=env, capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    summaries = list((repo / "outputs").glob("*/summary.json"))
    assert len(summaries) == 1
    s = json.loads(summaries[0].read_text())
    assert s["world_size"] == 2 and s["eval_r2"] > 0.9
    assert (repo / ".venv" / "bin" / "python").exists()  # set up from scratch in the copy
    # From a directory of the user's own, relative paths are theirs: a --config-dir beside
    # them (not the repository's conf/), and outputs/ where they stand.
    mine = tmp_path / "work"
    (mine / "my_conf" / "experiment").mkdir(parents=True)
    (mine / "my_conf" / "experiment" / "mine.yaml").write_text(
        "# @package _global_\nrun_name: from_my_conf\ndata: {dim: 8}\n"
        "trainer: {max_steps: 20, log_every: 10}\n")
    p = subprocess.run([str(repo / "scripts" / "train.sh"), "--config-dir", "my_conf",
                        "experiment=mine"], cwd=mine, env=env, capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    s = json.loads((mine / "outputs" / "from_my_conf" / "summary.json").read_text())
    assert s["steps"] == 20
    assert len(list((repo / "outputs").iterdir())) == 1  # nothing new in the repository
