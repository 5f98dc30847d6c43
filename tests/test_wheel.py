"""The wheel installs: built with `pip wheel .`, installed in a fresh venv outside the
checkout, it trains from any directory with its own configuration, and a user's
`--config-dir` extends its groups."""

import json
import os
import site
import subprocess
import sys
import zipfile

import yaml

from tests.conftest import ROOT


def _run(args: list, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=600,
                       **kw)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def test_the_wheel_trains_outside_the_checkout(tmp_path):
    # The build uses this venv's setuptools: no download of the build backend.
    _run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation",
          "-q", "-w", tmp_path / "wheels"], cwd=ROOT)
    (wheel,) = (tmp_path / "wheels").glob("dgxtrain-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "dgxtrain/conf/config.yaml" in names and "dgxtrain/conf/experiment/smoke.yaml" in names

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    py = venv / "bin" / "python"
    # Its dependencies (torch, hydra, ...) from this venv's site-packages, as plain path
    # entries: the editable dgxtrain there is not on them (a .pth file's finder would be).
    purelib = _run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    venv_site = purelib.stdout.strip()
    with open(os.path.join(venv_site, "deps.pth"), "w") as f:
        f.write("\n".join(site.getsitepackages()) + "\n")
    _run([sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-index",
          "-q", wheel])

    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "my_conf" / "data").mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RANK", "WORLD_SIZE")}
    env.update(WANDB_MODE="offline", OMP_NUM_THREADS="1")
    where = _run([py, "-c", "import dgxtrain, dgxtrain.conf; print(dgxtrain.__file__); "
                  "print(dgxtrain.conf.__file__)"], cwd=elsewhere, env=env).stdout.split()
    assert all(w.startswith(venv_site) for w in where), where

    _run([py, "-m", "dgxtrain", "experiment=smoke", "logger=none", "hydra.run.dir=run"],
         cwd=elsewhere, env=env)
    s = json.loads((elsewhere / "run" / "summary.json").read_text())
    assert s["steps"] == 20 and s["eval_r2"] is not None

    # A user's data file extends the installed `dataset` group file.
    (elsewhere / "my_conf" / "data" / "mine.yaml").write_text(
        "defaults: [dataset]\nnum_workers: 0\n"
        "train: {_target_: dgxtrain.tasks.examples.digits.Digits, split: train}\n"
        "eval: {_target_: dgxtrain.tasks.examples.digits.Digits, split: eval}\n")
    _run([py, "-m", "dgxtrain", "--config-dir", "my_conf", "data=mine", "model=digits_mlp",
          "loss=cross_entropy", "metrics=[loss,accuracy]", "trainer.max_steps=5",
          "trainer.warmup_steps=1", "trainer.global_batch_size=64", "logger=none",
          "hydra.run.dir=mine"], cwd=elsewhere, env=env)
    s = json.loads((elsewhere / "mine" / "summary.json").read_text())
    assert s["steps"] == 5 and "eval_accuracy" in s
    # The user's file, on top of what `dataset` and its schema give.
    data = yaml.safe_load((elsewhere / "mine" / "config.yaml").read_text())["data"]
    assert data["num_workers"] == 0 and data["start_method"] == "forkserver"
    assert data["train"]["_target_"] == "dgxtrain.tasks.examples.digits.Digits"
