"""Models as people publish them, with no wrapper: outputs that are tuples, dicts or a
Hugging Face ModelOutput give their logits to any loss and metric, and `loss=model` trains
on the loss the model computes itself. The published forms (tests/published_models.py: a
nanoGPT-style GPT and transformers' GPT2LMHeadModel) come in through --config-dir only."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers.modeling_outputs import CausalLMOutput

from dgxtrain.loop.train import train
from dgxtrain.tasks.losses import ModelLoss, logits
from tests.conftest import compose_cfg, read_metrics, run_ok
from tests.published_models import TRAIN, write_config_dir

HERE = __name__
DIGITS = ["device=cpu", "experiment=digits", "trainer.max_steps=20", "logger=none",
          "data.num_workers=0", "trainer.log_every=5", "trainer.warmup_steps=5"]


def test_the_logits_of_each_output_form():
    t = torch.randn(2, 3)
    assert logits(t) is t
    assert logits((t, torch.tensor(1.0))) is t and logits([t]) is t
    assert logits({"loss": torch.tensor(1.0), "logits": t}) is t
    out = CausalLMOutput(loss=torch.tensor(1.0), logits=t)  # an OrderedDict with attributes
    assert logits(out) is t
    assert logits({"scores": t}) is None and logits(()) is None and logits("text") is None


def test_the_loss_a_model_returns():
    t, loss = torch.randn(2, 3), torch.tensor(0.5)
    pick = ModelLoss()
    assert pick((t, loss), t) is loss and pick([t, loss], t) is loss
    assert ModelLoss(index=0)((loss, t), t) is loss
    assert pick(CausalLMOutput(loss=loss, logits=t), t) is loss
    assert pick(OrderedDict(logits=t, loss=loss), t) is loss
    assert pick(loss, t) is loss  # a scalar output is the loss itself
    assert pick(t, t) is None and pick((t,), t) is None and pick((t, None), t) is None


class OwnLoss(torch.nn.Module):
    """A classifier in the published style: (logits, loss), the loss only given labels."""

    def __init__(self, in_dim: int, hidden_dim: int, num_layers: int, num_classes: int):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(in_dim, hidden_dim), torch.nn.GELU(),
                                       torch.nn.Linear(hidden_dim, num_classes))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None):
        out = self.net(x)
        return out, None if labels is None else F.cross_entropy(out, labels)


def test_a_model_s_own_loss_trains_as_the_trainer_s_loss_on_its_logits(tmp_path):
    # The same model twice: its own cross-entropy (loss=model), and the trainer's on the
    # tuple's element 0. Same data, same init: the same run up to rounding.
    model = [f"model._target_={HERE}.OwnLoss"]
    own = train(compose_cfg(DIGITS + model + ["loss=model", "metrics=[loss,accuracy]"]),
                tmp_path / "own")
    theirs = train(compose_cfg(DIGITS + model + ["metrics=[loss,accuracy]"]),
                   tmp_path / "theirs")
    la, lb = ({m["step"]: m["train/loss"] for m in read_metrics(tmp_path / d)
               if "train/loss" in m} for d in ("own", "theirs"))
    assert list(la) == list(lb) == [5, 10, 15, 20]
    assert all(abs(la[s] - lb[s]) <= 1e-5 * lb[s] for s in lb), (la, lb)
    assert lb[20] < 0.5 * lb[5]
    for k in ("eval_loss", "eval_accuracy"):
        assert own[k] == pytest.approx(theirs[k], rel=1e-5)
    assert own["eval_accuracy"] > 0.8  # the metric got the logits, not the tuple


@pytest.fixture(scope="module")
def conf(tmp_path_factory) -> Path:
    return write_config_dir(tmp_path_factory.mktemp("published_conf"))


def _losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["train/loss"] for m in read_metrics(run_dir) if "train/loss" in m}


@pytest.mark.multiprocess
@pytest.mark.parametrize("model", ["nanogpt", "hf_gpt2"])
def test_a_published_lm_trains_on_two_ranks_with_its_own_loss(model, conf, tmp_path):
    two = tmp_path / "two"
    s = run_ok(two, [f"experiment={model}", *TRAIN, "trainer.max_steps=120"], nproc=2,
               config_dir=conf)
    derived = json.loads((two / "derived.json").read_text())
    assert s["world_size"] == 2 and derived["parameters"] > 100_000
    unigram = s["unigram_bits_per_char"]
    assert 3.5 < unigram < 6.0
    assert s["eval_bits_per_token"] < unigram - 1.0, (s["eval_bits_per_token"], unigram)
    if model == "nanogpt":  # shifted targets: accuracy of the next byte, from the logits
        assert s["eval_accuracy"] > 0.3, s["eval_accuracy"]
    assert s["sample"].startswith("def ")
    # One process over the same first steps (both in warm-up, so the same LRs): the same
    # losses up to the rounding of another reduction order.
    one = tmp_path / "one"
    train(compose_cfg([f"experiment={model}", *TRAIN, "trainer.max_steps=10", "device=cpu",
                       "logger=none", f"hydra.searchpath=[file://{conf}]"]), one)
    la, lb = _losses(one), _losses(two)
    assert list(la) == [5, 10]
    assert all(abs(la[s] - lb[s]) <= 1e-5 * lb[s] for s in la), (la, lb)
