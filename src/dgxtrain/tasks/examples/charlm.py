"""Byte-level language modelling on the installed Python's standard library source.

The corpus is the top-level *.py files of sysconfig.get_paths()["stdlib"], read as bytes
(vocabulary 256) and concatenated in sorted file-name order. The last eval_fraction of
those bytes is held out for eval; the rest is train. Different Python builds have
different corpora: corpus_sha256 in describe() says which one a run saw.
"""

from __future__ import annotations

import hashlib
import logging
import math
import sysconfig
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from dgxtrain.tasks.losses import logits

log = logging.getLogger(__name__)
SPLITS = ("train", "eval")
PROMPT = b"def "


class StdlibText(Dataset):
    """Non-overlapping windows of one split: item i is (x, y), int64 [seq_len] each, with
    y the byte after each byte of x (shift_targets=False: y is x, for a model that shifts
    its labels itself, as Hugging Face's causal LMs do). Eval keeps at most
    max_eval_sequences windows, evenly spread over its bytes."""

    def __init__(self, split: str = "train", seq_len: int = 128,
                 eval_fraction: float = 0.05, max_eval_sequences: int = 256,
                 shift_targets: bool = True):
        if split not in SPLITS:
            raise ValueError(f"StdlibText split must be one of {SPLITS}, got {split!r}")
        if not 0.0 < eval_fraction < 1.0:
            raise ValueError(
                f"StdlibText eval_fraction must be in (0, 1), got {eval_fraction}")
        files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
        digest = hashlib.sha256()
        texts = []
        for path in files:
            text = path.read_bytes()
            # The name and length go in ahead of each file's bytes, so moving bytes from
            # one file to the next, or renaming a file, changes the hash.
            digest.update(f"{path.name}\0{len(text)}\0".encode())
            digest.update(text)
            texts.append(text)
        corpus = torch.frombuffer(bytearray(b"".join(texts)), dtype=torch.uint8)
        num_train = len(corpus) - round(eval_fraction * len(corpus))
        train = corpus[:num_train]
        counts = torch.bincount(train.long(), minlength=256).double()
        p = counts[counts > 0] / counts.sum()
        self.unigram_bits = -(p * p.log2()).sum().item()
        self.corpus_info = {"corpus_files": len(files), "corpus_bytes": len(corpus),
                            "corpus_sha256": digest.hexdigest()}
        # clone(): keep only the split's bytes, not a view onto the whole corpus, so a
        # pickled copy sent to a loader worker stays small.
        self.data = (train if split == "train" else corpus[num_train:]).clone()
        self.split, self.seq_len, self.shift_targets = split, seq_len, shift_targets
        num_windows = (len(self.data) - 1) // seq_len
        if split == "eval" and num_windows > max_eval_sequences:
            self.windows = torch.arange(max_eval_sequences) * num_windows // max_eval_sequences
        else:
            self.windows = torch.arange(num_windows)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = int(self.windows[index]) * self.seq_len
        chunk = self.data[start:start + self.seq_len + 1].long()
        return chunk[:-1], chunk[1:] if self.shift_targets else chunk[:-1]

    def describe(self) -> dict[str, float | int | str]:
        """Which corpus this is, and the bits/char of a model that ignores context."""
        return {**self.corpus_info, "unigram_bits_per_char": self.unigram_bits}

    @torch.no_grad()
    def summarize(self, model: nn.Module) -> dict[str, float | str]:
        """The unigram baseline and ~200 bytes the model writes after PROMPT."""
        device = next(model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(0)
        tokens = torch.tensor(list(PROMPT), dtype=torch.long, device=device)
        for _ in range(200):
            last = logits(model(tokens[-self.seq_len:][None]))[0, -1].float()
            probs = F.softmax(last / 0.8, dim=-1)
            tokens = torch.cat([tokens, torch.multinomial(probs, 1, generator=generator)])
        text = bytes(tokens.tolist()).decode("utf-8", errors="replace")
        log.info("sample: %r", text)
        return {"unigram_bits_per_char": self.unigram_bits, "sample": text}


class CharTransformer(nn.Module):
    """A small GPT: token and learned position embeddings, num_layers pre-LayerNorm blocks
    of causal self-attention and a 4x GELU MLP, a final LayerNorm and a linear head.
    Returns logits [B, T, vocab_size] for T <= seq_len. No dropout."""

    def __init__(self, vocab_size: int = 256, seq_len: int = 128, d_model: int = 128,
                 num_layers: int = 2, num_heads: int = 4):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(seq_len, d_model)
        self.blocks = nn.Sequential(*(Block(d_model, num_heads) for _ in range(num_layers)))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)
        # nanoGPT's init: small normal weights, and the projections back into the residual
        # stream scaled down with depth so its variance does not grow layer by layer.
        for name, param in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(param)
            elif param.dim() == 2:
                std = 0.02 / math.sqrt(2 * num_layers) if name.endswith("out.weight") else 0.02
                nn.init.normal_(param, std=std)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.size(1), device=tokens.device)
        return self.head(self.norm(self.blocks(self.tok(tokens) + self.pos(positions))))


class Block(nn.Module):
    """x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, d_model: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.attn_out = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU())
        self.mlp_out = nn.Linear(4 * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.num_heads, d // self.num_heads).transpose(1, 2)
                   for z in self.qkv(self.ln1(x)).split(d, dim=-1))
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_out(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp_out(self.mlp(self.ln2(x)))


class SequenceCrossEntropy(nn.CrossEntropyLoss):
    """CrossEntropyLoss over every position: logits [B, T, V] and targets [B, T] are
    flattened to [B*T, V] and [B*T]; reduction and ignore_index act as in the parent."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return super().forward(input.reshape(-1, input.size(-1)), target.reshape(-1))
