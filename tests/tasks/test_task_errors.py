"""Bad input to your own task is one line naming the setting and the fix, raised at start
(before a process group or any GPU work), or, for a loader worker that dies, as the run's
data error (exit 4)."""

from __future__ import annotations

import os
import signal
import threading

import pytest
import torch
from torch.utils.data import Dataset, get_worker_info

from dgxtrain.errors import ConfigError
from dgxtrain.loop.train import train
from tests.conftest import compose_cfg, run_cli

DIGITS = ["device=cpu", "experiment=digits", "trainer.max_steps=3", "logger=none"]
HERE = __name__


class Triples(Dataset):
    def __init__(self, **digits_keys: object):  # the digits node's split, augment
        pass

    def __len__(self) -> int:
        return 512

    def __getitem__(self, i: int):
        return torch.zeros(64), torch.tensor(0), torch.tensor(1)


class Ragged(Triples):
    """Sequences of their own length, unpadded."""

    def __getitem__(self, i: int):
        return torch.zeros(1 + i % 3), torch.tensor(0)


class Empty(Triples):
    def __len__(self) -> int:
        return 0


class Unpicklable(Dataset):
    """Holds a lock, as a dataset with an open connection would."""

    def __init__(self, **digits_keys: object):
        self.lock = threading.Lock()

    def __len__(self) -> int:
        return 512

    def __getitem__(self, i: int):
        return torch.zeros(64), torch.tensor(i % 10)


class DiesInWorker(Unpicklable):
    """A worker killed as the kernel's OOM killer would kill it."""

    def __init__(self, **digits_keys: object):
        pass

    def __getitem__(self, i: int):
        if get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().__getitem__(i)


class Column(torch.nn.Module):
    """A regressor that returns [n, 1] for targets [n]."""

    def __init__(self, in_dim: int):
        super().__init__()
        self.linear = torch.nn.Linear(in_dim, 1)

    def forward(self, x):
        return self.linear(x)


class Scores(Column):
    """A dict without logits."""

    def forward(self, x):
        return {"scores": self.linear(x)}


class Pair(Column):
    """(logits, None): a tuple, whose element 0 the loss gets."""

    def forward(self, x):
        return self.linear(x), None


class IgnoresLabels(Column):
    """Takes labels, and still returns only its logits."""

    def forward(self, x, labels=None):
        return self.linear(x)


class FloatLabels(Triples):
    def __getitem__(self, i: int):
        return torch.zeros(64), torch.tensor(float(i % 10))


class Int32Labels(Triples):
    def __getitem__(self, i: int):
        return torch.zeros(64), torch.tensor(i % 10, dtype=torch.int32)


def _error(tmp_path, overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as e:
        train(compose_cfg(overrides), tmp_path)
    line = str(e.value)
    assert "\n" not in line and "; fix: " in line
    return line


def test_an_item_that_is_not_a_pair(tmp_path):
    line = _error(tmp_path, DIGITS + [f"data.train={{_target_:{HERE}.Triples}}"])
    assert line.startswith(f"data.train={HERE}.Triples: item 0 is a 3-tuple, not an (input, "
                           "target) pair")


def test_an_input_the_model_cannot_take(tmp_path):
    line = _error(tmp_path, DIGITS + ["model.in_dim=32"])
    assert line.startswith("model._target_=dgxtrain.tasks.examples.digits.DigitsMLP: cannot "
                           "take the data's input [8, 64] float32 (RuntimeError: mat1")


def test_an_output_that_does_not_fit_the_loss(tmp_path):
    line = _error(tmp_path, DIGITS + ["loss=mse"])
    assert line.startswith("loss._target_=torch.nn.MSELoss: cannot take the model's output "
                           "[8, 10] float32 and the target [8] int64")
    # The silent case: [n, 1] against [n] would broadcast to [n, n] in MSELoss.
    line = _error(tmp_path / "column", ["device=cpu", "model=linear", f"model._target_={HERE}"
                                        ".Column", "logger=none"])
    assert "output [8, 1] float32 and the target [8] float32 differ in shape" in line


def test_outputs_with_no_logits_or_no_loss(tmp_path):
    mine = ["model=linear", "model.in_dim=64"]
    line = _error(tmp_path, DIGITS + mine + [f"model._target_={HERE}.Scores"])
    assert line.startswith(f"model._target_={HERE}.Scores: returned {{scores: [8, 1] float32}}, "
                           "with no logits tensor in it; fix: return a tensor, a tuple")
    # A tuple whose logits do not fit the loss: perhaps the model computes its own.
    line = _error(tmp_path, ["device=cpu", "model=linear", f"model._target_={HERE}.Pair",
                             "logger=none"])
    assert "output [8, 1] float32 and the target [8] float32 differ in shape" in line
    assert line.endswith("if the model computes its own loss, use loss=model")
    line = _error(tmp_path, DIGITS + ["loss=model"])
    assert line.startswith("loss.target_arg=labels: is not an argument of "
                           "dgxtrain.tasks.examples.digits.DigitsMLP's forward() (TypeError:")
    assert line.endswith("fix: set loss.target_arg to the name its forward() gives the target "
                         "(e.g. targets)")
    line = _error(tmp_path, DIGITS + mine + [f"model._target_={HERE}.IgnoresLabels",
                                             "loss=model"])
    assert line.startswith("loss=model: the model's output [8, 1] float32 holds no scalar loss "
                           "(.loss, ['loss'] or element 1); fix: return the loss from forward() "
                           "when it is given labels=")
    line = _error(tmp_path, DIGITS + ["loss=model", "loss.target_arg='two words'"])
    assert line.startswith("loss.target_arg=two words: is not an argument name; fix:")


@pytest.mark.parametrize("labels, dtype", [("FloatLabels", "float32"),
                                           ("Int32Labels", "int32")])
def test_class_targets_of_another_dtype(tmp_path, labels, dtype):
    line = _error(tmp_path, DIGITS + [f"data.train={{_target_:{HERE}.{labels}}}"])
    assert line.startswith(f"loss._target_=torch.nn.CrossEntropyLoss: takes class indices as "
                           f"the target, and the target is {dtype} (the model's output [8, 10] "
                           f"float32 and the target [8] {dtype}); fix: return the target as an "
                           "int64 tensor (torch.long) from the dataset's __getitem__")


def test_a_data_file_without_the_loader_settings_or_without_eval(tmp_path):
    conf = tmp_path / "conf" / "data"
    conf.mkdir(parents=True)
    digits = "{_target_: dgxtrain.tasks.examples.digits.Digits, split: %s}"
    (conf / "bare.yaml").write_text(f"train: {digits % 'train'}\neval: {digits % 'eval'}\n")
    (conf / "no_eval.yaml").write_text(f"defaults: [dataset]\ntrain: {digits % 'train'}\n")
    mine = DIGITS + [f"hydra.searchpath=[file://{tmp_path / 'conf'}]"]
    line = _error(tmp_path / "a", mine + ["data=bare"])
    assert line.startswith("data=<your data file>: names data.train but has none of the loader "
                           "settings (data.num_workers, ...); fix: put `defaults: [dataset]`")
    line = _error(tmp_path / "b", mine + ["data=no_eval"])
    assert line.startswith("data.eval=None: is not set: a run evaluates on held-out samples; "
                           "fix: add eval: {_target_: <your Dataset>, ...}")


def test_a_train_set_smaller_than_one_global_batch(tmp_path):
    line = _error(tmp_path, DIGITS + ["trainer.global_batch_size=2048"])
    assert line.startswith("trainer.global_batch_size=2048: is more than the 1438 training "
                           "samples; fix: lower it to at most 1438")


def test_items_that_do_not_stack_into_a_batch(tmp_path):
    line = _error(tmp_path, DIGITS + [f"data.train={{_target_:{HERE}.Ragged}}"])
    assert line.startswith(f"data.train={HERE}.Ragged: its items differ in shape (([1] float32"
                           ", [] int64), ([2] float32, [] int64)")


def test_an_empty_eval_set(tmp_path):
    line = _error(tmp_path, DIGITS + [f"data.eval={{_target_:{HERE}.Empty}}"])
    assert line.startswith(f"data.eval={HERE}.Empty: has no samples")


def test_a_dataset_that_cannot_be_pickled_for_workers(tmp_path):
    over = DIGITS + [f"data.train={{_target_:{HERE}.Unpicklable}}", "data.num_workers=2"]
    line = _error(tmp_path, over)
    assert line.startswith(f"data.train={HERE}.Unpicklable: cannot be pickled for the loader "
                           "workers (TypeError: cannot pickle '_thread.lock' object)")
    assert "data.num_workers=0" in line
    train(compose_cfg(over + ["data.num_workers=0"]), tmp_path / "no_workers")  # and then runs


def test_a_metric_that_does_not_fit(tmp_path):
    line = _error(tmp_path, DIGITS + ["metrics=[loss,r2]"])
    assert line.startswith("metrics=R2: cannot take the model's output [8, 10] float32")
    assert _error(tmp_path, DIGITS + ["metrics=[acc]"]).startswith("metrics=acc: unknown metric")


@pytest.mark.multiprocess
def test_a_loader_worker_that_dies_is_a_data_error(tmp_path):
    p = run_cli(tmp_path, ["experiment=digits", f"data.train={{_target_:{HERE}.DiesInWorker}}",
                           "logger=none", "data.num_workers=2"], timeout=120)
    assert p.returncode == 4, p.stderr[-2000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("dgxtrain: data error:")]
    assert len(lines) == 1, p.stderr[-2000:]
    assert lines[0].startswith("dgxtrain: data error: data.num_workers=2: a loader worker died "
                               "(DataLoader worker (pid")
    assert "fix: " in lines[0]
