"""Models as they are published, plugged in through `--config-dir` with no wrapper.

`GPT` is written the way karpathy/nanoGPT's model.py is: `GPT(GPTConfig(...))`, tied
embeddings, and `forward(idx, targets=None) -> (logits, loss)`, whose inference branch
returns the last position's logits only (so `forward(x)[0]` is no training output). The
Hugging Face model is transformers' own GPT2LMHeadModel, built from its config object.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.size()
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
                   for z in self.c_attn(x).split(self.n_embd, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training
                                           else 0.0, is_causal=True)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c)))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        t = idx.size(1)
        assert t <= self.config.block_size, f"sequence of {t} > block_size"
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1),
                                   ignore_index=-1)
        else:  # inference: the last position only
            logits = self.lm_head(x[:, [-1], :])
            loss = None
        return logits, loss


SMALL = {"n_layer": 2, "n_head": 4, "n_embd": 128}
# A user's config files, as they would write them: a model file with nested `_target_`s,
# and an experiment of stdlib bytes with the model's own loss.
CONFIGS = {
    "model/nanogpt.yaml": f"""_target_: tests.published_models.GPT
config:
  _target_: tests.published_models.GPTConfig
  block_size: 64
  vocab_size: 256
  n_layer: {SMALL['n_layer']}
  n_head: {SMALL['n_head']}
  n_embd: {SMALL['n_embd']}
  dropout: 0.0
""",
    "experiment/nanogpt.yaml": """# @package _global_
defaults:
  - override /data: stdlib_text
  - override /model: nanogpt
  - override /loss: model
loss: {target_arg: targets}
metrics: [loss, bits_per_token, accuracy]
""",
    "model/hf_gpt2.yaml": f"""_target_: transformers.GPT2LMHeadModel
config:
  _target_: transformers.GPT2Config
  vocab_size: 256
  n_positions: 64
  n_layer: {SMALL['n_layer']}
  n_head: {SMALL['n_head']}
  n_embd: {SMALL['n_embd']}
  resid_pdrop: 0.0
  embd_pdrop: 0.0
  attn_pdrop: 0.0
  bos_token_id: 0
  eos_token_id: 0
  use_cache: false
""",
    # Hugging Face causal LMs shift their labels themselves: the targets are the inputs.
    "experiment/hf_gpt2.yaml": """# @package _global_
defaults:
  - override /data: stdlib_text
  - override /model: hf_gpt2
  - override /loss: model
data:
  train: {shift_targets: false}
  eval: {shift_targets: false}
metrics: [loss, bits_per_token]
""",
}
# The same short run for both: long enough to learn well below the unigram entropy.
TRAIN = ["optim.lr=3e-3", "optim.weight_decay=0.01", "trainer.global_batch_size=64",
         "trainer.warmup_steps=20", "trainer.log_every=5", "data.num_workers=0",
         "data.eval.max_eval_sequences=128"]


def write_config_dir(root: Path) -> Path:
    for name, text in CONFIGS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root
