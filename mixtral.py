"""Mixtral in one file: a sparse mixture of experts on Mistral's backbone; the model, its pretrained weights,
data, training, sampling.

Papers: Jiang et al. 2024, "Mixtral of Experts", arXiv 2401.04088, and the model it extends, Jiang et al. 2023,
"Mistral 7B", arXiv 2310.06825: a Llama-style decoder (RMSNorm before each sub-block, rotary positions, grouped-
query attention, SwiGLU, no biases) in which every feed-forward is a sparse mixture of experts (Shazeer et al.
2017, arXiv 1701.06538): a linear router picks the top 2 of 8 SwiGLU experts for each token and mixes their
outputs with a softmax over the chosen two (Mixtral section 2.1). Mistral 7B adds sliding-window attention
(each token sees the last W positions) and a rolling-buffer KV cache of W positions (Mistral section 2);
Mixtral's released config turns the window off, and so does this file by default (--sliding_window W turns it
on). Mistral 7B itself loads too, as n_expert 0: a dense SwiGLU in every layer, no router (v0.1 with its window of
4096, v0.3 without one), and --export writes it back as a Mistral. For training the router: the load-balancing
loss of Switch Transformer (Fedus et al. 2021, arXiv 2101.03961, eq. 4-6), the router z-loss of ST-MoE (Zoph et
al. 2022, arXiv 2202.08906, eq. 5) and multiplicative router jitter (Switch section 2.4), each a flag; and an
optional capacity factor (GShard, Lepikhin et al. 2020, arXiv 2006.16668; Switch section 2.2): each expert takes
at most capacity_factor x its fair share of the tokens of a step, the overflow skips the layer through the
residual, and every shape is static. The router's flags are run settings: they apply to a pretrained model too.

The MoE layer is written twice: SparseMoE.forward_loop is the paper's equation as a loop over the experts (as
Mistral's reference code), and forward computes the same sum in one pass (the tests hold the two equal), with no
loop over tokens and, with a torch that has F.grouped_mm (on CUDA in bf16), no host sync: the (token, expert)
pairs are laid out grouped by expert and each weight matrix of all experts is applied in one grouped matmul
(dropless, exact: Mixtral's own way, used for sampling and parity), or in one batched matmul over fixed-size
expert buffers (capacity mode). Decoding (eval, k N <= n_expert pairs) runs each pair through its chosen expert
alone, the ids read on the host (chosen_experts). What is not here: expert parallelism across GPUs, instruction
tuning. The released checkpoints' SentencePiece-style tokenizer.json runs (hf_tokenizer).

    python mixtral.py                                      # CPU: a tiny model, about three minutes
    python mixtral.py --device cuda                        # one GPU: bf16, torch.compile, 6 layers x 384, 8 experts
    torchrun --standalone --nproc_per_node 8 mixtral.py    # DDP on 8 GPUs
    python mixtral.py --init_from mistralai/Mixtral-8x7B-v0.1 --sample_only   # 93 GB of weights
    python mixtral.py --init_from mistralai/Mistral-7B-v0.1 --sample_only     # dense, 14 GB
    python mixtral.py --init_from resume --sample_only --show_routing --show_top 3   # each token's experts

Offline (no download, no tiktoken files) it says so and carries on: the Python standard library's own source
as the text, raw UTF-8 bytes as the tokens. Every step's randomness (batches, dropout, router jitter) is drawn
from a seed made of (--seed, iteration, rank), so `--init_from resume` continues exactly as an uninterrupted run
would.
"""
import argparse
import functools
import hashlib
import heapq
import inspect
import json
import math
import os
import re
import struct
import sys
import time
import unicodedata
from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, NamedTuple

import numpy as np
import regex
import requests
import tiktoken
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

HERE = Path(__file__).resolve().parent
HF_ENDPOINT = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
CACHE_DIR = Path(os.environ.get("ONEFILE_CACHE", "~/.cache/onefile")).expanduser()
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


class InputError(Exception):
    """Bad input from the user: the command line prints it as one line and exits with status 2."""


# ----------------------------------------------------------------------------------------- config

@dataclass
class Config:
    vocab_size: int = 32000              # vocab_size: real tokens; the embedding is padded to a multiple of 64
    block_size: int = 32768              # max_position_embeddings: the longest context
    n_layer: int = 32                    # num_hidden_layers
    n_head: int = 32                     # num_attention_heads (query heads)
    n_kv_head: int = 8                   # num_key_value_heads: n_head is MHA, 1 is MQA, in between GQA
    n_embd: int = 4096                   # hidden_size
    head_dim: int = 0                    # head_dim (0: n_embd // n_head)
    intermediate_size: int = 0           # intermediate_size: each expert's SwiGLU width (0: 8/3 n_embd rounded up
                                         # to a multiple of 64; Meta's Llama rounds to 256, 11008 for 4096; Mixtral
                                         # 8x22B: 16384 = 8/3 x 6144; Mixtral 8x7B: 14336 = 3.5 x 4096)
    n_expert: int = 8                    # num_local_experts (0: Mistral 7B, one dense SwiGLU per layer, no router)
    top_k_experts: int = 2               # num_experts_per_tok
    sliding_window: int | None = None    # sliding_window: each token attends to the last W positions (None: all)
    norm_eps: float = 1e-5               # rms_norm_eps
    rope_theta: float = 1e6              # rope_theta
    tie_embeddings: bool = False         # tie_word_embeddings
    bos_token_id: int | None = None      # bos_token_id: put before the prompt when sampling (a checkpoint's own)
    # the run's settings, not the model's (RUN_TIME: a fine-tune's flags override a checkpoint's)
    dropout: float = 0.0                 # attention_dropout; also on the residual branches here (Mixtral uses none)
    router_noise: float = 0.0            # router_jitter_noise: router input x U(1 - eps, 1 + eps) in training
    capacity_factor: float = 0.0         # training only (no HF counterpart): 0 is dropless, > 0 caps each expert
    aux_loss_coef: float = 0.01          # training only: the load-balancing loss's weight (Switch's 0.01)
    z_loss_coef: float = 0.001           # training only: the router z-loss's weight (ST-MoE's 0.001)

    def __post_init__(self):
        check_types(self)
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd"):
            if getattr(self, name) <= 0:
                raise InputError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.head_dim and self.n_embd % self.n_head:
            raise InputError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if self.n_head % self.n_kv_head:
            raise InputError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        self.head_dim = self.head_dim or self.n_embd // self.n_head
        if self.head_dim % 2:
            raise InputError(f"head_dim ({self.head_dim}) must be even: rotary turns pairs of dimensions")
        self.intermediate_size = self.intermediate_size or -(-8 * self.n_embd // 3 // 64) * 64
        if self.n_expert < 0:
            raise InputError(f"n_expert must not be negative (0: a dense feed-forward), got {self.n_expert}")
        if self.n_expert and not 1 <= self.top_k_experts <= self.n_expert:
            raise InputError(f"top_k_experts must be in [1, n_expert = {self.n_expert}], got {self.top_k_experts}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise InputError(f"sliding_window must be positive, got {self.sliding_window}")
        if not 0.0 <= self.dropout < 1.0:
            raise InputError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.router_noise < 1.0:
            raise InputError(f"router_noise must be in [0, 1), got {self.router_noise}")
        if min(self.capacity_factor, self.aux_loss_coef, self.z_loss_coef, self.intermediate_size) < 0 or self.rope_theta <= 0:
            raise InputError("capacity_factor, aux_loss_coef, z_loss_coef and intermediate_size must not be negative, "
                             "rope_theta must be positive")

    @property
    def padded_vocab_size(self):  # 50257 -> 50304: matmul shapes that tile well on GPUs (32000 stays)
        return -(-self.vocab_size // 64) * 64


# ------------------------------------------------------------------------------------------ model

class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * g: LayerNorm without the mean and the bias (Zhang and Sennrich
    2019, eq. 4). Computed in float32 whatever the input, as the reference does, then cast back."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        inv_rms = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)  # 1 / RMS(x), eq. 4
        return self.weight * (x32 * inv_rms).type_as(x)


def apply_rotary(x, cos, sin):
    """Rotate x (B, heads, T, head_dim) by its positions' angles; cos and sin are (T, head_dim),
    float32.

    RoFormer (section 3.2) reads a query as d/2 complex numbers q_i = x_{2i} + j x_{2i+1} and
    multiplies each by e^{j m theta_i} at position m, so q_m . k_n depends only on m - n; eq. 34 is
    the same rotation written with cos and sin on adjacent pairs. Meta's released code does exactly
    that. Hugging Face checkpoints pair dimension i with i + d/2 instead ("rotate half"): their
    conversion script permuted the rows of W_q and W_k so that the two layouts give the same
    scores. We use the half layout, so Hugging Face weights load unchanged:
        x_i'       = x_i cos(m theta_i) - x_{i+d/2} sin(m theta_i)
        x_{i+d/2}' = x_{i+d/2} cos(m theta_i) + x_i sin(m theta_i)
    """
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat((-x2, x1), dim=-1) * sin).type_as(x)


class RollingKVCache:
    """The keys and values of one layer, (B, n_kv_head, size, head_dim): only the n_kv_head shared
    heads (GQA).

    Without a sliding window, size is the length of the text and position i lives in slot i. With a
    window of W positions no query looks further back than W - 1 positions, so W slots are enough:
    Mistral's rolling buffer cache (Mistral 7B, section 2, figure 2) keeps position i in slot i mod
    W, over position i - W, which no later query can see. Memory then stays the same however long
    the sample grows."""

    def __init__(self, size):
        self.size, self.k, self.v = size, None, None

    def update(self, k, v, pos):
        """Store k, v (B, n_kv_head, T, hd) of positions pos..pos+T-1; return the keys and values
        the T new queries attend to, and the positions of those keys."""
        B, H, T, D = k.shape
        if self.k is None:
            self.k, self.v = k.new_zeros(B, H, self.size, D), v.new_zeros(B, H, self.size, D)
        if pos + T <= self.size or T == 1:  # write, then read: nothing these queries need is lost
            slots = torch.arange(pos, pos + T, device=k.device) % self.size
            self.k[:, :, slots], self.v[:, :, slots] = k, v
            n, last = min(pos + T, self.size), pos + T - 1
            k_pos = last - (last - torch.arange(n, device=k.device)) % self.size  # slots' positions
            return self.k[:, :, :n], self.v[:, :, :n], k_pos
        if pos == 0:  # a prompt longer than the buffer attends to itself; its last `size` are kept
            slots = torch.arange(T - self.size, T, device=k.device) % self.size
            self.k[:, :, slots], self.v[:, :, slots] = k[:, :, -self.size:], v[:, :, -self.size:]
            return k, v, torch.arange(T, device=k.device)
        raise ValueError(f"{T} tokens at position {pos} overflow a rolling cache of {self.size}: "
                         "feed them one by one")


class Attention(nn.Module):
    """Grouped-query attention, as Llama 2, with Mistral's optional sliding window: query i sees
    keys j with i - W < j <= i. All heads go through one scaled_dot_product_attention call."""

    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.dropout, self.window = cfg.dropout, cfg.sliding_window
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=False)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, cache=None, pos=0):
        B, T, _ = x.shape
        H, H_kv, hd = self.n_head, self.n_kv_head, self.head_dim
        q = self.q_proj(x).view(B, T, H, hd).transpose(1, 2)     # (B, n_head, T, hd)
        k = self.k_proj(x).view(B, T, H_kv, hd).transpose(1, 2)  # (B, n_kv_head, T, hd)
        v = self.v_proj(x).view(B, T, H_kv, hd).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        k_pos = torch.arange(T, device=x.device)  # the keys' positions
        if cache is not None:
            k, v, k_pos = cache.update(k, v, pos)
        plain = pos == 0 and self.window is None    # then SDPA's own causal mask: flash attention
        visible = None
        if not plain:
            q_pos = torch.arange(pos, pos + T, device=x.device)[:, None]
            visible = k_pos <= q_pos                    # (T, keys): causal
            if self.window is not None:
                visible &= k_pos > q_pos - self.window  # and within the window (Mistral, figure 1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible,
                                           is_causal=plain and T > 1, enable_gqa=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.o_proj(y.transpose(1, 2).reshape(B, T, -1)))


class SparseMoE(nn.Module):
    """Mixtral's feed-forward (section 2.1, eq. 1-2): y = sum over the top-k experts i of
    softmax(TopK(x W_g))_i SwiGLU_i(x). Each token pays for k experts; the layer holds n_expert of
    them.

    forward_loop is the layer as the paper writes it, a loop over the experts. forward computes the
    same sum in one pass (`dispatch`, after the model) and returns the router's statistics too
    (`stats`)."""

    def __init__(self, cfg):
        super().__init__()
        E, d, f = cfg.n_expert, cfg.n_embd, cfg.intermediate_size
        self.n_expert, self.top_k = E, cfg.top_k_experts
        self.capacity_factor, self.noise = cfg.capacity_factor, cfg.router_noise
        self.gate = nn.Linear(d, E, bias=False)  # the router W_g (HF Mixtral: gate; Jamba: router)
        # The experts' SwiGLU weights stacked on a leading expert axis (HF Mixtral: experts.N.w1 /
        # w3 / w2; Jamba: experts.N.gate_proj / up_proj / down_proj). --optimizer muon leaves them
        # on AdamW: torch's Muon takes 2-D parameters only, and one parameter per expert would undo
        # the stacking the grouped matmul needs (RESULTS.md, "Muon against AdamW", measures it)
        self.w1 = nn.Parameter(torch.empty(E, f, d))  # gate projection, inside the SiLU
        self.w3 = nn.Parameter(torch.empty(E, f, d))  # up projection
        self.w2 = nn.Parameter(torch.empty(E, d, f))  # down projection
        self.dropout = nn.Dropout(cfg.dropout)
        self.record = None  # a list while --show_routing draws a sample (recording), else None

    def forward_loop(self, x):
        """The layer as the paper writes it (eq. 1), a loop over the experts as in Mistral's
        reference moe.py: x (B, T, d) -> y (B, T, d), y = sum_i G(x)_i E_i(x). The gate G(x)
        (`route`) is zero but for the k experts a token chose, so expert i runs on the tokens that
        chose it alone. Dropless, no router jitter, no statistics: the reference forward is tested
        against."""
        B, T, d = x.shape
        x = x.reshape(-1, d)                                # (N, d): each token is routed alone
        weight, expert = self.route(self.gate(x).float())   # (N, k): the nonzero G(x)_i, and i
        y = torch.zeros_like(x, dtype=weight.dtype)
        for i in range(self.n_expert):
            token, j = torch.where(expert == i)             # the tokens that chose i, as choice j
            h = F.silu(F.linear(x[token], self.w1[i])) * F.linear(x[token], self.w3[i])  # SwiGLU_i
            y[token] += weight[token, j, None] * F.linear(h, self.w2[i])
        return self.dropout(y.to(x.dtype)).view(B, T, d)

    def route(self, logits):
        """(weights, experts), each (N, k), from the router's logits (N, E): the gate's nonzero
        entries, G(x) = softmax(TopK(x W_g)) (eq. 2), the k largest logits and their softmax over
        the k only."""
        top, expert = logits.topk(self.top_k, dim=-1)
        return top.softmax(dim=-1), expert

    def forward(self, x):
        """The same, fast: x (B, T, d) -> (forward_loop's y (B, T, d), this batch's router
        statistics (3 + n_expert,), see `stats`), the experts run by `dispatch`. In training the
        router's input may be jittered and, with a capacity factor, each expert's overflow skips the
        layer."""
        B, T, d = x.shape
        x = x.reshape(-1, d)                                # (N, d): tokens, not sequences
        if self.training and self.noise:                    # multiplicative jitter (Switch 2.4)
            logits = self.gate(x * torch.empty_like(x).uniform_(1 - self.noise, 1 + self.noise))
        else:
            logits = self.gate(x)
        # (N, E); dt: the matmuls' dtype (bf16 under autocast); top-k and softmax in float32
        dt, logits = logits.dtype, logits.float()
        weight, expert = self.route(logits)                 # (N, k): G(x)'s nonzero entries (eq. 2)
        if self.record is not None:                         # --show_routing: these tokens' routes
            self.record.append((expert, weight))
        capacity = self.capacity_factor if self.training else 0.0  # eval and sampling: dropless
        y, count, dropped = dispatch(x, expert, weight, self.w1, self.w3, self.w2, dt, capacity,
                                     decoding=not self.training)
        return self.dropout(y.to(x.dtype)).view(B, T, d), self.stats(logits, count, dropped)

    def stats(self, logits, count, dropped):
        """(balance, z, dropped, load_1..load_E) of this layer for this batch, no host sync.

        balance: E sum_i f_i P_i (Switch eq. 4-6), f_i the fraction of tokens sent to expert i
        (counting all k choices, as Hugging Face does; the f_i sum to k), P_i the mean router
        probability of expert i. It is k when the load is even, up to E when the router has
        collapsed; only P carries a gradient. z: mean of logsumexp(logits)^2 (ST-MoE eq. 5), keeping
        the router's logits small. load: each expert's share of the pairs."""
        N = logits.size(0)
        f = count.float() / N
        balance = self.n_expert * (f * logits.softmax(-1).mean(0)).sum()
        z = logits.logsumexp(-1).pow(2).mean()
        return torch.cat([balance[None], z[None], dropped[None], f / self.top_k])


class FeedForward(nn.Module):
    """SwiGLU (Shazeer 2020, eq. 6 without biases): W_down (SiLU(x W_gate) * (x W_up)). Its width is
    8/3 n_embd rather than 4 n_embd in Llama, which keeps the parameter count of a two-matrix MLP
    (LLaMA paper, section 2.2)."""

    def __init__(self, n_embd, width, dropout=0.0):
        super().__init__()
        self.gate_proj = nn.Linear(n_embd, width, bias=False)
        self.up_proj = nn.Linear(n_embd, width, bias=False)
        self.down_proj = nn.Linear(width, n_embd, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class Block(nn.Module):
    """Pre-normalisation: RMSNorm on the input of each sub-block; attention, then the sparse MoE
    (Mixtral) or, with n_expert 0, one dense SwiGLU (Mistral 7B; HF: mlp.gate_proj / up_proj /
    down_proj)."""

    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        if cfg.n_expert:
            self.block_sparse_moe = SparseMoE(cfg)
        else:
            self.mlp = FeedForward(cfg.n_embd, cfg.intermediate_size, cfg.dropout)

    def forward(self, x, cos, sin, cache=None, pos=0):
        """-> (x, the router's statistics: None for a dense layer)."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, pos)
        if not hasattr(self, "block_sparse_moe"):
            return x + self.mlp(self.post_attention_layernorm(x)), None
        y, stats = self.block_sparse_moe(self.post_attention_layernorm(x))
        return x + y, stats


class Mixtral(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        # Hugging Face's names: model.embed_tokens, model.layers.N, model.norm
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(cfg.padded_vocab_size, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout),
            layers=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
            norm=RMSNorm(cfg.n_embd, cfg.norm_eps),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.padded_vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # Initialisation (the papers give none): normal, std 0.02 (Hugging Face's
        # initializer_range); the projections that write into the residual stream scaled by
        # 1/sqrt(2 n_layer), as GPT-2 does.
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                residual = name.endswith(("o_proj.weight", "w2", "down_proj.weight"))
                std = 0.02 / math.sqrt(2 * cfg.n_layer) if residual else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def num_params(self, non_embedding=True, active=False):
        """Parameters a token computes with: a tied embedding/head counted once, lookups (an untied
        input embedding, a position table) left out by default; active=True counts top_k of the
        experts only."""
        cfg = self.config
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and not cfg.tie_embeddings:
            n -= self.model.embed_tokens.weight.numel()
        if active and cfg.n_expert:
            experts = sum(p.numel() for name, p in self.named_parameters()
                          if name.endswith(("w1", "w2", "w3")))
            n -= experts * (cfg.n_expert - cfg.top_k_experts) // cfg.n_expert
        return n

    def optimizer_groups(self):
        """Each parameter's optimizer group, by name: "muon", the blocks' matrices (attention, the
        router, a dense SwiGLU: Muon's under --optimizer muon, else AdamW's with decay); "decay",
        the embedding, the head and the experts' stacked (E, out, in) w1, w3, w2 (AdamW: torch's
        Muon takes 2-D parameters only); "no_decay", the RMSNorm gains."""
        groups = {}
        for name, _ in self.named_parameters():
            if name.endswith("norm.weight"):
                groups[name] = "no_decay"
            elif name.startswith("model.layers.") and name.endswith(("proj.weight", "gate.weight")):
                groups[name] = "muon"
            else:
                groups[name] = "decay"
        return groups

    def kv_bytes_per_token(self, itemsize=4):
        """Bytes the KV cache holds per token: 2 (K and V) x layers x n_kv_head x head_dim x bytes
        per number."""
        return 2 * self.config.n_layer * self.config.n_kv_head * self.config.head_dim * itemsize

    def hidden(self, idx, cache=None, pos=0):
        """idx (B, T) token ids at positions pos..pos+T-1 -> (final hidden states (B, T, n_embd),
        the routers' statistics (n_layer, 3 + n_expert), see SparseMoE.stats; None for a dense
        Mistral)."""
        cfg = self.config
        B, T = idx.shape
        if pos + T > cfg.block_size and cfg.sliding_window is None:
            raise ValueError(f"positions up to {pos + T} but block_size is {cfg.block_size}")
        d = cfg.head_dim  # theta_i = rope_theta^(-2i/d) (RoFormer section 3.2.2); angles m theta_i
        two_i = torch.arange(0, d, 2, device=idx.device, dtype=torch.float32)
        inv_freq = 1.0 / cfg.rope_theta ** (two_i / d)      # (d/2,)
        m = torch.arange(pos, pos + T, device=idx.device, dtype=torch.float32)
        angles = m[:, None] * inv_freq                      # (T, d/2)
        angles = torch.cat((angles, angles), dim=-1)        # (T, d), the half layout
        cos, sin = angles.cos(), angles.sin()
        x = self.model.drop(self.model.embed_tokens(idx))   # (B, T, n_embd); no position table
        stats = []
        for i, block in enumerate(self.model.layers):
            x, s = block(x, cos, sin, None if cache is None else cache[i], pos)
            stats.append(s)
        return self.model.norm(x), torch.stack(stats) if cfg.n_expert else None

    def forward(self, idx, targets=None, cache=None, pos=0):
        """idx (B, T) token ids at positions pos..pos+T-1 -> (logits (B, T, vocab_size), loss
        or None, aux).

        The loss is the next-token cross-entropy; in training, plus the router's auxiliary losses,
        each layer's own averaged over the layers and weighted: the load-balancing loss (Switch,
        eq. 4) and the z-loss (ST-MoE, eq. 5; Hugging Face's Mixtral has none). Hugging Face's
        load_balancing_loss_func pools f and P over all the layers' tokens before the product
        instead: the same when the layers' loads agree, not in general. aux holds what the training
        log and the load report read off this batch: balance, z_loss, dropped (with a capacity in
        training) and load (n_layer, n_expert), each expert's share of the pairs; {} for a dense
        Mistral."""
        cfg, V, Vp = self.config, self.config.vocab_size, self.config.padded_vocab_size
        pad = None
        if Vp > V:  # the padding rows are no tokens: a bias of -inf gives them probability 0
            pad = torch.zeros(Vp, device=idx.device, dtype=self.lm_head.weight.dtype)
            pad[V:] = float("-inf")
        x, router = self.hidden(idx, cache, pos)
        logits = F.linear(x, self.lm_head.weight, pad)  # (B, T, padded_vocab_size)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
        if router is None:  # Mistral: no router, no auxiliary losses
            return logits[..., :V], loss, {}
        balance, z, dropped = router[:, :3].float().mean(0)  # balance: top_k when the load is even
        aux = dict(balance=balance, z_loss=z, load=router[:, 3:].detach().float())
        if self.training and cfg.capacity_factor:  # the share of pairs over their expert's capacity
            aux["dropped"] = dropped
        if self.training and loss is not None:
            loss = loss + cfg.aux_loss_coef * balance + cfg.z_loss_coef * z
        return logits[..., :V], loss, aux

    def load_report(self, load):
        """Print the expert load `load` (n_layer, n_expert), aux's load summed over an evaluation's
        batches, each layer a row of bars: each expert's share of the routed (token, choice) pairs,
        the even share 1/n_expert drawn half high. Collapse shows as a few full bars. Returns it for
        the metrics."""
        load = (load / load.sum(-1, keepdim=True).clamp_min(1e-9)).tolist()
        E, bars = self.config.n_expert, " ▁▂▃▄▅▆▇█"
        print(f"expert load per layer (even: {100 / E:.1f}% each, drawn ▄; "
              "█ is twice that or more)")
        for i, shares in enumerate(load):
            row = "".join(bars[min(8, round(4 * E * s))] for s in shares)
            low, high = 100 * min(shares), 100 * max(shares)
            print(f"  layer {i:<3d}{row}  min {low:4.1f}%  max {high:4.1f}%")
        return dict(expert_load=load)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, use_cache=True,
                 on_logits=None):
        """Append max_new_tokens sampled tokens to idx (B, T); temperature 0 is greedy. Routing is
        dropless.

        With a sliding window the cache is the rolling buffer of W positions and the text can grow
        without end: each token sees W positions, the model never needs more. Without one, past
        block_size the window of the text slides: the model sees its last block_size tokens from
        position 0 again, the cache no longer holds and each token re-reads the whole window (as
        without a cache).
        """
        window, block = self.config.sliding_window, self.config.block_size
        size = min(idx.size(1) + max_new_tokens, window or block)
        cache, pos = [RollingKVCache(size) for _ in self.model.layers] if use_cache else None, 0
        for _ in range(max_new_tokens):
            if cache is not None and (window is not None or idx.size(1) <= block):
                x, _ = self.hidden(idx[:, pos:], cache, pos)
                pos = idx.size(1)
            else:
                cache = None
                x, _ = self.hidden(idx if window is not None else idx[:, -block:])
            logits = self.lm_head(x[:, -1])[:, :self.config.vocab_size]  # the last position alone
            next_id = sample_next(logits.float(), temperature, top_k, top_p, on_logits)
            idx = torch.cat([idx, next_id], dim=1)
        return idx


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, on_logits=None):
    """logits (B, V) -> next token ids (B, 1); on_logits(logits) is called first (--show_top)."""
    if on_logits is not None:
        on_logits(logits)
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:  # nucleus sampling (Holtzman et al. 2019, 1904.09751)
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        outside = probs.cumsum(dim=-1) - probs >= top_p  # the mass before this token reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(outside, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1)


# -------------------------------------------------------- the same, fast: dispatching the experts
# SparseMoE.forward_loop runs each expert on the tokens a torch.where found for it: E small matmuls
# per weight, and the tokens' count read on the host for every expert. `dispatch` computes the same
# sum with no loop over tokens or experts and, where F.grouped_mm runs, no host sync: each (token,
# choice) pair gets a row in one buffer grouped by expert, each weight of all the experts multiplies
# that buffer in one call, and each pair reads its output row back, scaled by its gate weight.

GROUPED_MM = hasattr(F, "grouped_mm")  # recent torch: one kernel, a matmul per expert's rows
ALIGN = 8  # an expert's group is padded to a multiple of this many rows: 16-byte offsets in bf16


def dispatch(x, expert, weight, w1, w3, w2, dt, capacity_factor=0.0, decoding=False):
    """y_n = sum_j weight[n, j] SwiGLU_e(x_n), e = expert[n, j]: x (N, d), expert and weight
    (N, k), the experts' SwiGLU weights stacked as nn.Linear's, w1 and w3 (E, f, d), w2 (E, d, f);
    dt the dtype the matmuls run in (bf16 under autocast) -> (y (N, d), count (E,) the pairs each
    expert got, dropped: the share of the pairs dropped, a 0-d tensor, 0 but with a capacity).

    Decoding with k N <= E pairs: chosen_experts, the chosen experts alone. With a capacity factor:
    capacity_experts, each expert takes at most capacity_factor x its even share of the pairs, the
    rest are dropped. Else grouped_experts: dropless, every pair computed. The pairs go choice-major
    (every token's first choice, then every second one), so a full expert keeps first choices over
    second ones (GShard)."""
    (N, k), E = expert.shape, w1.size(0)
    e = expert.t().reshape(-1)                          # (k N,) each pair's expert, choice-major
    count = e.new_zeros(E).index_add_(0, e, torch.ones_like(e))  # (E,) pairs per expert, no sync
    dropped = weight.new_zeros(())
    if decoding and k * N <= E:
        return chosen_experts(x, expert, weight, w1, w3, w2), count, dropped
    rank = expert_rank(e, count)                        # (k N,) each pair's place in its queue
    xk = x.repeat(k, 1)                                 # (k N, d) each pair's input, choice-major
    if capacity_factor:
        C = math.ceil(capacity_factor * k * N / E)      # the rows of each expert's buffer
        row, ys = capacity_experts(xk, e, rank, w1, w3, w2, C)
        dropped = 1 - (rank < C).float().mean()
    else:
        row, ys = grouped_experts(xk, e, count, rank, w1, w3, w2, dt)
    y = (ys[row] * weight.t().reshape(-1, 1)).view(k, N, -1).sum(0)  # a dropped pair reads zeros
    return y, count, dropped


def expert_rank(e, count):
    """e (M,): the expert of each (token, choice) pair; count (E,): the pairs of each expert -> (M,)
    each pair's place in its expert's queue, the pairs keeping their order. A stable sort lays the
    pairs out grouped by expert in that order, so a pair's rank is its place in the sorted order
    less the pairs of the experts before its own: O(M) memory where a one-hot and its running sum
    take (M, E) (268 MB per layer at DeepSeek-V3's E = 256, k = 8, 16K tokens)."""
    grouped, order = e.sort(stable=True)                # (M,) the pairs grouped by expert, in order
    start = count.cumsum(0) - count                     # (E,) where each group begins in `order`
    place = torch.arange(e.numel(), device=e.device) - start[grouped]
    return torch.empty_like(e).scatter_(0, order, place)


def grouped_experts(xk, e, count, rank, w1, w3, w2, dt):
    """Dropless: xk (M, d) the pairs' inputs, e and rank (M,) each pair's expert and place in its
    queue, count (E,) the pairs of each expert -> (row (M,) each pair's row in ys, ys the experts'
    outputs). Expert e's group starts where expert e - 1's ends, padded to a multiple of ALIGN rows,
    so the buffer's M + E (ALIGN - 1) rows bound every routing: its shape is static."""
    E, (M, d) = count.numel(), xk.shape
    size = (count + ALIGN - 1) // ALIGN * ALIGN         # (E,) the padded group sizes
    end = size.cumsum(0)                                # (E,) where each group ends
    row = end[e] - size[e] + rank                       # (M,)
    xs = xk.new_zeros(M + E * (ALIGN - 1), d).index_copy(0, row, xk)  # rows between groups: 0
    return row, expert_mlp(xs, w1, w3, w2, end, dt)


def expert_mlp(xs, w1, w3, w2, end, dt):
    """The SwiGLU of each expert over its own rows: xs (M, d) holds expert e's rows at
    end[e-1]..end[e]-1 (rows past end[-1] are padding) -> (M', d), M' >= end[-1]. w1, w3: (E, f, d);
    w2: (E, d, f), as nn.Linear; dt: the dtype the model's matmuls run in (bf16 under autocast).

    One grouped matmul per weight (a batch of E matmuls of different heights, no host sync) where
    the kernel exists: CUDA in bf16, or eager on CPU; elsewhere a loop over the experts, which needs
    the group sizes on the host (one sync per layer)."""
    fits = xs.size(1) % ALIGN == 0 and w1.size(1) % ALIGN == 0  # 16-byte rows in the kernel's loads
    on_cpu = xs.device.type == "cpu" and not torch.compiler.is_compiling()
    if GROUPED_MM and fits and (xs.is_cuda and dt == torch.bfloat16 or on_cpu):
        offs = end.to(torch.int32)
        xs, w1, w3, w2 = xs.to(dt), w1.to(dt), w3.to(dt), w2.to(dt)
        gate = F.grouped_mm(xs, w1.transpose(1, 2), offs=offs)
        h = F.silu(gate) * F.grouped_mm(xs, w3.transpose(1, 2), offs=offs)
        return F.grouped_mm(h, w2.transpose(1, 2), offs=offs)
    sizes = torch.diff(end, prepend=end.new_zeros(1)).tolist()
    groups = xs.split([*sizes, xs.size(0) - sum(sizes)])  # each expert's rows, then the padding
    return torch.cat([F.linear(F.silu(F.linear(x, a)) * F.linear(x, c), b)
                      for x, a, c, b in zip(groups, w1, w3, w2)])


def capacity_experts(xk, e, rank, w1, w3, w2, C):
    """Capacity mode (GShard; Switch section 2.2): each expert's buffer holds C rows, its first C
    pairs. xk (M, d) the pairs' inputs, e and rank (M,) each pair's expert and place in its queue ->
    (row (M,) each pair's row in ys, ys (E C + 1, d)). A pair ranked C or later is dropped: its
    input goes to a spare row no expert reads, and it reads back ys' last row, zeros (the block's
    residual carries its token). Every shape is static: one batched matmul per weight over the
    (E, C, d) buffer."""
    E, d = w1.size(0), xk.size(1)
    row = torch.where(rank < C, e * C + rank, E * C)    # row E C: the spare row
    xs = xk.new_zeros(E * C + 1, d).index_copy(0, row, xk)[:-1].view(E, C, d)
    h = F.silu(xs @ w1.transpose(1, 2)) * (xs @ w3.transpose(1, 2))    # (E, C, f)
    ys = (h @ w2.transpose(1, 2)).reshape(E * C, d)
    return row, torch.cat([ys, xk.new_zeros(1, d)])


def chosen_experts(x, expert, weight, w1, w3, w2):
    """Few tokens (decoding): y_n = sum_j weight[n, j] SwiGLU_expert[n, j](x_n) for x (N, d), expert
    and weight (N, k) -> (N, d); each (token, choice) pair through its own expert's weights, read in
    place, so only the chosen experts do any work (the grouped dispatch pads each group to ALIGN
    rows and visits all E). Reading the chosen experts' ids on the host is a sync: decoding,
    batch 1, can afford it, a training step never takes this path."""
    ys = []
    for xn, wn, chosen in zip(x, weight, expert.tolist()):
        yn = 0
        for j, i in enumerate(chosen):
            h = F.silu(F.linear(xn, w1[i])) * F.linear(xn, w3[i])
            yn = yn + F.linear(h, w2[i]) * wn[j, None]
        ys.append(yn)
    return torch.stack(ys)


# -------------------------------------------------------------- files: checkpoints, token files, downloads

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn}


def read_safetensors(path):
    """{name: tensor} from a .safetensors file: 8-byte little-endian header size, JSON header, raw bytes.

    The tensors are memory-mapped views of the file (copy-on-write): reading a 16 GB file costs no RAM
    until a tensor is copied out of it.
    """
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > os.path.getsize(path) - 8:
            raise ValueError(f"a header of {n:,} bytes in a file of {os.path.getsize(path):,}")
        header = json.loads(f.read(n))
    data = np.memmap(path, dtype=np.uint8, mode="c", offset=8 + n)
    tensors = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        begin, end = t["data_offsets"]
        tensors[name] = torch.from_numpy(data[begin:end]).view(SAFETENSORS_DTYPES[t["dtype"]]).reshape(t["shape"])
    return tensors


def write_safetensors(tensors, path):
    """{name: tensor} as a .safetensors file (read_safetensors' format; the header padded to 8 bytes, as the package
    writes it), written to a temporary name first: a kill never leaves half a file."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        header[name] = dict(dtype={v: k for k, v in SAFETENSORS_DTYPES.items()}[t.dtype], shape=list(t.shape),
                            data_offsets=[offset, offset + size])
        offset += size
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(path.with_suffix(".tmp"), "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for t in tensors.values():
            f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    os.replace(path.with_suffix(".tmp"), path)


def download(url, dest):
    """Fetch url into dest with a progress line. Bytes arrive in dest.part, which a later call resumes
    (HTTP Range), and are renamed to dest only when complete: dest is never half-written."""
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    if os.environ.get("HF_TOKEN") and url.startswith(HF_ENDPOINT + "/"):  # gated repos (meta-llama/*); no one else
        headers["Authorization"] = f"Bearer {os.environ['HF_TOKEN']}"
    with requests.get(url, headers=headers, stream=True, timeout=30) as r:
        if r.status_code != 416:  # 416: nothing left to send, the .part file is already complete
            r.raise_for_status()
            have = have if r.status_code == 206 else 0  # 200: the server ignored the Range, start over
            total, shown = have + int(r.headers.get("content-length", 0)), 0.0
            with open(part, "ab" if have else "wb") as f:
                try:
                    for chunk in r.iter_content(chunk_size=1 << 16):  # a cut connection loses less than a chunk
                        f.write(chunk)
                        have += len(chunk)
                        if time.time() - shown > 0.5 or have == total:
                            shown = time.time()
                            print(f"\r{dest.name}: {have / 1e6:,.1f} / {total / 1e6:,.1f} MB", end="", file=sys.stderr)
                finally:
                    print(file=sys.stderr)  # the progress line ends, also when the transfer breaks
    os.replace(part, dest)
    return dest


def checkpoint_dir(name_or_path, weights=True):
    """A local checkpoint directory for --init_from: the path itself, or a hub repo's config.json, tokenizer.json
    (if it has one) and weights (one file or sharded; weights=False: not yet) downloaded into CACHE_DIR/<repo>."""
    name_or_path = str(name_or_path)
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists() or name_or_path.startswith((".", "/", "~")):
        raise InputError(f"'{name_or_path}' is not a checkpoint directory")
    local = CACHE_DIR / name_or_path

    def get(fname, optional=False):
        try:
            return download(f"{HF_ENDPOINT}/{name_or_path}/resolve/main/{fname}", local / fname)
        except requests.HTTPError as e:
            if optional and e.response is not None and e.response.status_code == 404:
                return None
            raise

    try:
        if not (local / "config.json").exists():  # once: tokenizer.json if there is one (a 404 is asked once)
            get("tokenizer.json", optional=True)
        get("config.json")
        if weights and get("model.safetensors", optional=True) is None:
            index = json.loads(get("model.safetensors.index.json").read_text())
            for shard in sorted(set(index["weight_map"].values())):
                get(shard)
    except (requests.RequestException, ValueError, KeyError) as e:
        raise InputError(f"cannot fetch '{name_or_path}' from {HF_ENDPOINT}: {e}") from None
    return local


class HFConfig(dict):
    """A checkpoint's config.json: a key the model needs and the file lacks is bad input, not a KeyError."""

    def __missing__(self, key):
        raise InputError(f"config.json lacks '{key}'")


def check_types(cfg):
    """Each value of a Config of the type its field declares (a Config checks this first): an int for an int (not a
    bool), any number for a float, true or false for a bool, None only where the field allows it. A config.json value
    of another type ("two", a list) is one line of bad input, as a flag's would be, not a TypeError further on."""
    for f in fields(cfg):
        value, allowed = getattr(cfg, f.name), getattr(f.type, "__args__", (f.type,))  # int | None: (int, NoneType)
        if type(value) not in allowed and not (float in allowed and type(value) is int):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
            raise InputError(f"{f.name} must be {names}, got {json.dumps(value, default=repr)[:80]}")


def read_checkpoint(name_or_path):
    """(directory, config.json, {name: tensor} of all its safetensors files, one or sharded) of a hub id or a
    directory as save_pretrained writes it; a file that cannot be read is one line of bad input."""
    path = checkpoint_dir(name_or_path)
    try:
        hf = HFConfig(json.loads((path / "config.json").read_text()))
        index = path / "model.safetensors.index.json"
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() \
            else ["model.safetensors"]
        tensors = {}
        for fname in files:
            tensors.update(read_safetensors(path / fname))
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, struct.error) as e:
        raise InputError(f"cannot read the checkpoint in {path} ({type(e).__name__}: {e})") from None
    return path, hf, tensors


def load_weights(model, state, path, device, dtype):
    """Put state's tensors into model (built on the meta device) on device, the parameters in dtype, after checking
    that every name and shape fits: a checkpoint that does not is one line of bad input."""
    wanted, params = model.state_dict(), {name for name, _ in model.named_parameters(remove_duplicate=False)}
    for name, t in state.items():
        if name not in wanted:
            raise InputError(f"{path}: unexpected tensor '{name}'")
        if t.dtype == torch.float8_e4m3fn:  # an FP8 release: its weights need their block scales (mla_moe.py's)
            raise InputError(f"{path}: '{name}' is FP8, which {Path(__file__).name} does not dequantize")
        if t.shape != wanted[name].shape or t.is_floating_point() != wanted[name].is_floating_point():
            raise InputError(f"{path}: '{name}' is {str(t.dtype)[6:]} {tuple(t.shape)}, config.json implies "
                             f"{str(wanted[name].dtype)[6:]} {tuple(wanted[name].shape)} (another shape or kind)")
        state[name] = t.to(device=device, dtype=dtype if name in params else wanted[name].dtype,  # buffers keep theirs
                           memory_format=torch.contiguous_format, copy=True)
    missing = sorted(set(wanted) - set(state))
    if missing:
        raise InputError(f"{path}: checkpoint lacks {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    model.load_state_dict(state, assign=True)
    return model


GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def byte_decoder():
    """GPT-2's table from the printable characters that byte-level BPE vocabularies are written in back
    to bytes: printable Latin-1 bytes stand for themselves, the other 68 bytes for chr(256 + n)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(others)}}


class Tokenizer(NamedTuple):
    """What every script passes around as its tokenizer."""
    name: str                     # "gpt2", "bytes", or a tokenizer.json's path
    encode: Callable              # text -> list of token ids
    decode: Callable              # list of token ids -> text
    vocab_size: int               # the ids run from 0 to vocab_size - 1


def hf_tokenizer(path):
    """The Tokenizer of a Hugging Face tokenizer.json holding a BPE: byte-level (GPT-2's, GPT-NeoX's,
    Llama 3's, DeepSeek-V3's) or SentencePiece style with byte fallback (Llama 2's, Mistral's, Mixtral's); None when
    there is no such file or it holds another kind (Unigram, WordPiece, normalizers other than those below); a file
    that is not JSON or lacks a key its kind needs is one line of bad input ("damaged").

    Encoding gives the ids of `tokenizers`' encode(text, add_special_tokens=False), decoding the text of its decode;
    but added tokens are decoded (specials too, unknown ids dropped) and never produced by encoding: their text in
    a prompt comes out as ordinary pieces."""
    try:
        tok = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: tokenizer.json is damaged ({type(e).__name__}: {e})") from None
    try:
        if not isinstance(tok, dict):
            raise TypeError(f"a JSON {type(tok).__name__}, not an object")
        if tok["model"].get("type", "BPE") != "BPE":  # Unigram (T5's), WordPiece (BERT's), ...
            return None
        if not isinstance(tok["model"]["vocab"], dict) or not isinstance(tok["model"]["merges"], list):
            raise TypeError("model.vocab is not an object or model.merges not a list")
        tokenizer = tiktoken_bpe(tok, path) or python_bpe(tok)
    except (KeyError, TypeError, AttributeError, ValueError, IndexError) as e:
        raise InputError(f"{path}: tokenizer.json is damaged ({type(e).__name__}: {e})") from None
    return None if tokenizer is None else Tokenizer(str(path), *tokenizer)


def tiktoken_bpe(tok, path):
    """(encode, decode, vocab) through tiktoken for a byte-level BPE that it runs exactly (GPT-2 style, as GPT-2's and
    GPT-NeoX's: the byte-level step splits; or Llama 3 style: one regex split, then bytes), else None.

    tiktoken merges the adjacent pair whose result has the lowest rank; tokenizer.json lists merges in
    priority order. The two agree when a token's id is its rank and ids grow along the merge list (checked
    here), as for Llama 3, whose tokenizer.json was converted from tiktoken's own file, and byte-level BPEs
    trained with the `tokenizers` package (the tests show it). GPT-NeoX's added tokens for runs of spaces come out
    as smaller pieces."""
    model, pre = tok["model"], tok.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre])
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        pattern = GPT2_SPLIT  # GPT-2 style: the byte-level step splits with GPT-2's regex
    elif kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True) \
            and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert"):
        pattern = steps[0]["pattern"]["Regex"]  # Llama 3 style: a regex split, then bytes to characters
    else:
        return None
    normalizer = tok.get("normalizer")
    if normalizer not in (None, {"type": "NFC"}) or steps[-1].get("add_prefix_space") or model.get("dropout"):
        return None
    to_byte, vocab = byte_decoder(), model["vocab"]
    specials = {t["content"]: t["id"] for t in tok.get("added_tokens", [])}
    ranks = {bytes(to_byte[c] for c in s): i for s, i in vocab.items() if s not in specials}
    last = -1
    for merge in model["merges"]:
        a, b = merge.split(" ") if isinstance(merge, str) else merge
        if vocab[a + b] < last:
            return None  # ranks out of the merges' order: python_bpe runs it
        last = vocab[a + b]
    try:
        enc = tiktoken.Encoding(Path(path).parent.name or "tokenizer", pat_str=pattern, mergeable_ranks=ranks,
                                special_tokens=specials)
    except ValueError:  # a vocabulary tiktoken refuses (a pattern it cannot compile): python_bpe runs it
        return None
    known = set(ranks.values()) | set(specials.values())
    encode = enc.encode_ordinary if normalizer is None else lambda s: enc.encode_ordinary(unicodedata.normalize("NFC", s))
    return encode, lambda ids: enc.decode([i for i in ids if i in known], errors="replace"), enc.n_vocab


def bpe_merges(ids, merges):
    """One word's symbol ids after BPE as `tokenizers` runs it: merge the adjacent pair of lowest rank (leftmost on
    ties) while any pair is in merges {(left, right): (rank, merged id)}. A heap of candidate pairs over a linked
    list of symbols: O(n log n) for n symbols; entries made stale by an earlier merge are skipped when popped."""
    n, ids = len(ids), list(ids)
    prev, nxt = list(range(-1, n - 1)), list(range(1, n + 1))
    heap = [(*merges[p], i) for i, p in enumerate(zip(ids, ids[1:])) if p in merges]
    heapq.heapify(heap)
    while heap:
        rank, new, i = heapq.heappop(heap)
        j = nxt[i]
        if ids[i] < 0 or j >= n or merges.get((ids[i], ids[j]), (0, -1))[1] != new:
            continue  # i was merged away, or its pair changed since this entry was pushed
        ids[i], ids[j], nxt[i] = new, -1, nxt[j]
        if nxt[i] < n:
            prev[nxt[i]] = i
        if prev[i] >= 0 and (ids[prev[i]], new) in merges:
            heapq.heappush(heap, (*merges[ids[prev[i]], new], prev[i]))
        if nxt[i] < n and (new, ids[nxt[i]]) in merges:
            heapq.heappush(heap, (*merges[new, ids[nxt[i]]], i))
    return [t for t in ids if t >= 0]


def hf_steps(spec, key):
    """The steps of a tokenizer.json normalizer, pre_tokenizer or decoder: none, one, or a Sequence's."""
    return [] if not spec else spec[key] if spec["type"] == "Sequence" else [spec]


def isolate(pattern):
    """text -> pieces as a Split step with behavior Isolated: each match a piece, each stretch between two as well."""
    def split(t):
        out, at = [], 0
        for m in pattern.finditer(t):
            out += [t[at:m.start()], m.group()]
            at = m.end()
        return [p for p in out + [t[at:]] if p]
    return split


def metaspace(rep, scheme, split):
    """text -> pieces as SentencePiece writes them (a Metaspace step): spaces become rep, rep is prepended unless
    scheme is "never" or the text starts with it, and with split each piece starts at a rep."""
    def pieces(t):
        t = t.replace(" ", rep)
        t = t if scheme == "never" or t.startswith(rep) else rep + t
        words = t.split(rep)
        return [t] if not split else [w for w in words[:1] if w] + [rep + w for w in words[1:]]
    return pieces


def hf_pre_tokenizer(spec):
    """([text -> pieces], byte-level?) of a pre_tokenizer: none, Metaspace (SentencePiece style), Split steps (regex
    or string, isolated) then ByteLevel without its regex, or ByteLevel alone (GPT-2's regex); None for another."""
    steps = hf_steps(spec, "pretokenizers")
    kinds = [s["type"] for s in steps]
    if kinds == ["Metaspace"]:
        s = steps[0]  # old files say add_prefix_space instead of prepend_scheme
        scheme = s.get("prepend_scheme") or ("always" if s.get("add_prefix_space", True) else "never")
        return [metaspace(s["replacement"], scheme, s.get("split", True))], False
    if not kinds:
        return [], False
    if kinds[-1] != "ByteLevel" or set(kinds[:-1]) != ({"Split"} if kinds[:-1] else set()) \
            or steps[-1].get("add_prefix_space"):
        return None
    splits = [{"pattern": {"Regex": GPT2_SPLIT}, "behavior": "Isolated"}] if steps[-1].get("use_regex", True) else []
    out = []
    for s in steps[:-1] + splits:
        if s["behavior"] != "Isolated" or s.get("invert"):
            return None
        pattern = s["pattern"]
        out.append(isolate(regex.compile(pattern["Regex"] if "Regex" in pattern else regex.escape(pattern["String"]))))
    return out, True


def hf_normalizer(spec):
    """[text -> text] of a normalizer made of Unicode forms (NFC, NFKC, ...), Prepend and Replace of a string (Llama
    2's: Prepend "▁", Replace " " by "▁"); None for another (Lowercase, Strip, a SentencePiece Precompiled map)."""
    out = []
    for s in hf_steps(spec, "normalizers"):
        if s["type"] in ("NFC", "NFD", "NFKC", "NFKD"):
            out.append(lambda t, form=s["type"]: unicodedata.normalize(form, t))
        elif s["type"] == "Prepend":
            out.append(lambda t, p=s["prepend"]: p + t if t else t)  # not to an empty text
        elif s["type"] == "Replace" and "String" in s["pattern"]:
            out.append(lambda t, a=s["pattern"]["String"], b=s["content"]: t.replace(a, b))
        else:
            return None
    return out


def byte_fallback(tokens):
    """The ByteFallback decoder: each run of <0xNN> tokens as the UTF-8 text of its bytes, or one U+FFFD a byte."""
    out, run = [], []
    for t in tokens + [None]:
        byte = int(t[3:5], 16) if t and len(t) == 6 and t[:3] == "<0x" and t[5] == ">" \
            and all(c in "0123456789abcdefABCDEF" for c in t[3:5]) else None
        if byte is not None:
            run.append(byte)
            continue
        if run:
            try:
                out.append(bytes(run).decode())
            except UnicodeDecodeError:
                out += ["\ufffd"] * len(run)
            run = []
        out += [t] if t is not None else []
    return out


def strip(t, c, start, stop):
    """The Strip decoder on one token: up to `start` leading and `stop` trailing c removed."""
    i, j = 0, len(t)
    while i < min(start, len(t)) and t[i] == c:
        i += 1
    while j > i and len(t) - j < stop and t[j - 1] == c:
        j -= 1
    return t[i:j]


def hf_decoder(spec):
    """[tokens -> tokens] of a decoder made of Replace (a string), ByteFallback, Fuse, Strip, Metaspace and ByteLevel
    steps, as `tokenizers` runs them; None for another."""
    out, to_byte = [], byte_decoder()
    for s in hf_steps(spec, "decoders"):
        if s["type"] == "Replace" and "String" in s["pattern"]:
            out.append(lambda ts, a=s["pattern"]["String"], b=s["content"]: [t.replace(a, b) for t in ts])
        elif s["type"] in ("ByteFallback", "Fuse"):
            out.append(byte_fallback if s["type"] == "ByteFallback" else lambda ts: ["".join(ts)])
        elif s["type"] == "Strip":
            out.append(lambda ts, c=s["content"], a=s["start"], b=s["stop"]: [strip(t, c, a, b) for t in ts])
        elif s["type"] == "Metaspace":  # the replacement is a space, but in the first token, where it goes
            first = (s.get("prepend_scheme") or ("always" if s.get("add_prefix_space", True) else "never")) != "never"
            out.append(lambda ts, rep=s["replacement"], first=first: [
                t.replace(rep, "" if i == 0 and first else " ") for i, t in enumerate(ts)])
        elif s["type"] == "ByteLevel":  # characters to bytes (a token outside the table: its UTF-8), then text
            out.append(lambda ts: [b"".join(bytes(to_byte[c] for c in t) if all(c in to_byte for c in t) else t.encode()
                                            for t in ts).decode(errors="replace")])
        else:
            return None
    return out if spec else None


def python_bpe(tok):
    """(encode, decode, vocab) of a BPE tokenizer.json that tiktoken does not run, as `tokenizers` runs it: the
    normalizer, the pre_tokenizer's pieces, each piece's characters as ids (a character outside the vocabulary:
    its bytes' <0xNN> tokens with byte_fallback, else unk_token, runs of it fused with fuse_unk, else nothing), then
    bpe_merges. None for a layout it does not know (see hf_normalizer, hf_pre_tokenizer, hf_decoder).

    Cost: one pass of the normalizer and the split regexes over the text, then BPE once per distinct piece (cached);
    a piece with no pre_tokenizer (Llama 2: the whole text) is first cut where no token of the vocabulary holds the
    two characters on either side, which no merge can join. Measured: 1 MB of text in 0.6 to 1.3 s with vocabularies
    of 800 tokens, 7 s with 32K ones on a busy core, where `tokenizers` took 9 s (README)."""
    model, vocab, merges = tok["model"], tok["model"]["vocab"], {}
    for rank, merge in enumerate(model["merges"]):  # a merge of tokens not in the vocabulary: damaged
        a, b = merge.split(" ") if isinstance(merge, str) else merge
        merges.setdefault((vocab[a], vocab[b]), (rank, vocab[a + b]))
    unk = vocab[model["unk_token"]] if model.get("unk_token") is not None else None
    try:
        normalize, (split, byte_level), decoder = hf_normalizer(tok.get("normalizer")), \
            hf_pre_tokenizer(tok.get("pre_tokenizer")) or (None, None), hf_decoder(tok.get("decoder"))
    except regex.error:  # a split pattern that Python's regex does not read as the Rust one (Oniguruma) does
        return None
    if None in (normalize, split, decoder) or model.get("dropout") or model.get("continuing_subword_prefix") \
            or model.get("end_of_word_suffix"):
        return None
    to_char = {b: c for c, b in byte_decoder().items()}
    pairs = set() if byte_level else {s[i:i + 2] for s in vocab for i in range(len(s) - 1)}
    cache, seen = {}, {}  # the ids of a word (in the vocabulary's characters), of a piece of text

    def char_ids(c):  # a character's ids before any merge
        if c in vocab:
            return [vocab[c]]
        fallback = [vocab.get(f"<0x{b:02X}>") for b in c.encode()] if model.get("byte_fallback") else [None]
        return fallback if None not in fallback else [] if unk is None else [unk]

    def word(w):  # the ids of one piece (or of a stretch of it no merge crosses)
        if w not in cache:
            ids = [i for c in w for i in cache.setdefault(("char", c), char_ids(c))]
            cache[w] = bpe_merges(ids, merges)
        return cache[w]

    def piece(text):
        if text in seen:
            return seen[text]
        p = text
        if byte_level:
            p = "".join(to_char[b] for b in p.encode())
        if model.get("ignore_merges") and p in vocab:
            return [vocab[p]]
        if len(p) < 64 or byte_level:
            ids = word(p)
        else:
            cuts = [0] + [i for i in range(1, len(p)) if p[i - 1:i + 1] not in pairs] + [len(p)]
            ids = [i for a, b in zip(cuts, cuts[1:]) for i in word(p[a:b])]
        if model.get("fuse_unk") and unk is not None:  # a run of unknown characters is one unk_token
            ids = [i for k, i in enumerate(ids) if not (i == unk and k and ids[k - 1] == unk)]
        seen[text] = ids
        return ids

    def encode(text):
        for f in normalize:
            text = f(text)
        pieces = [text] if text else []
        for f in split:
            pieces = [q for p in pieces for q in f(p)]
        return [i for p in pieces for i in piece(p)]

    tokens = {i: s for s, i in vocab.items()} | {t["id"]: t["content"] for t in tok.get("added_tokens", [])}

    def decode(ids):
        ts = [tokens[i] for i in ids if i in tokens]
        for f in decoder:
            ts = f(ts)
        return "".join(ts)
    return encode, decode, max(tokens) + 1


def load_dtype(args, env):
    """The dtype a pretrained model loads in: float32 to train (the run's autocast does the rest); --sample_only keeps
    the checkpoint's own (config.json's torch_dtype or dtype, else its first floating tensor's), on a CPU too, unless
    --dtype names one; a dtype other than the run's becomes the run's, autocast included, so that it samples in it."""
    if not args.sample_only or args.dtype != "auto":
        return env.dtype if args.sample_only else torch.float32
    _, hf, tensors = read_checkpoint(args.init_from)
    name = hf.get("torch_dtype") or hf.get("dtype")
    dtype = getattr(torch, name) if name in ("float32", "bfloat16", "float16") else \
        next((t.dtype for t in tensors.values() if t.is_floating_point()), torch.float32)
    if dtype == torch.bfloat16 and env.device.type == "cuda" and not torch.cuda.is_bf16_supported():
        dtype = torch.float16  # an older GPU: fp16, as --dtype auto trains there
    env.dtype, env.ctx = dtype, torch.autocast(env.device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    return dtype


def weights_size(model):
    """The parameters' bytes and dtypes, for the start-up line: "2.20 GB bf16" (tied weights counted once)."""
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    names = dict(bfloat16="bf16", float16="fp16", float32="fp32")
    dtypes = sorted({names.get(str(p.dtype)[6:], str(p.dtype)[6:]) for p in model.parameters()})
    return (f"{size / 1e9:.2f} GB " if size >= 1e8 else f"{size / 1e6:.2f} MB ") + "+".join(dtypes)


def pretrained_tokenizer(path, sample_only, file="tokenizer.json"):
    """A checkpoint's own tokenizer, from its tokenizer.json (see hf_tokenizer), its decode ending the text at the
    first of config.json's eos_token_id; None (token ids) will do for --sample_only, but not for training on text."""
    tokenizer = hf_tokenizer(path / file)
    if tokenizer is None and not sample_only and not (path / file).is_file():
        raise InputError(f"{path / file}: no such tokenizer.json, so it cannot be trained on text")
    if tokenizer is None and not sample_only:
        raise InputError(f"{path / file} is no tokenizer.json of a kind this file runs (BPE: byte-level, or "
                         "SentencePiece style with byte fallback), so it cannot be trained on text; --sample_only "
                         "shows token ids")
    try:
        eos = json.loads((path / "config.json").read_text()).get("eos_token_id")
    except (OSError, ValueError, AttributeError):  # no config.json, or a damaged one: from_pretrained says so
        eos = None
    eos = {i for i in (eos if isinstance(eos, list) else [eos]) if isinstance(i, int)}  # one id, or several
    if tokenizer is None or not eos:
        return tokenizer
    decode = tokenizer.decode
    return tokenizer._replace(decode=lambda ids: decode(ids[:next((k for k, i in enumerate(ids) if i in eos), len(ids))]))


# Token files as llm.c writes them (and modded-nanogpt's FineWeb shards): a header of 256 int32 (magic, version,
# token count), then the tokens, uint16 where the vocabulary fits (GPT-2's), uint32 where it does not (Llama 3's).
TOKEN_FILES = {np.uint16: (20240520, 1), np.uint32: (20240801, 7)}


def write_tokens(path, ids, vocab_size):
    """ids as a token file at path, written whole or not at all."""
    dtype = np.uint16 if vocab_size <= 1 << 16 else np.uint32
    header = np.array([*TOKEN_FILES[dtype], len(ids)] + [0] * 253, np.int32)
    path.with_suffix(".tmp").write_bytes(header.tobytes() + np.array(ids, dtype).tobytes())
    os.replace(path.with_suffix(".tmp"), path)  # never half a file under the real name


def read_tokens(path):
    """A token file's tokens, memory-mapped, once its header checks out: a damaged file is one line of bad input."""
    header = np.fromfile(path, np.int32, count=256)
    dtype = next((d for d, magic in TOKEN_FILES.items() if len(header) == 256 and tuple(header[:2]) == magic), None)
    if dtype is None or path.stat().st_size != 1024 + int(header[2]) * np.dtype(dtype).itemsize:
        raise InputError(f"{path} is not a whole token file (damaged? delete it, and it is made again)")
    return np.memmap(path, dtype=dtype, mode="r", offset=1024)


# FineWeb as the GPT-2 speedruns publish it (modded-nanogpt): tokenized with GPT-2's BPE, 100M tokens a token file
FINEWEB = {"fineweb10B": "kjj0/fineweb10B-gpt2/resolve/main/fineweb",
           "fineweb-edu10B": "kjj0/finewebedu10B-gpt2/resolve/main/finewebedu"}


def fineweb_files(name, tokenizer, shards):
    """{split: [token files]} of --data fineweb10B or fineweb-edu10B: the validation shard and `shards` training
    shards, downloaded once into data/<name>/ (through $HF_ENDPOINT, with $HF_TOKEN); GPT-2's tokens only."""
    if tokenizer.name != "gpt2":
        raise InputError(f"--data {name} holds GPT-2's tokens, and this model's tokenizer is {tokenizer.name}")
    files = {"val": [f"_val_{0:06d}.bin"], "train": [f"_train_{i:06d}.bin" for i in range(1, shards + 1)]}
    try:
        return {split: [read_tokens(download(f"{HF_ENDPOINT}/datasets/{FINEWEB[name]}{f}",
                                             HERE / "data" / name / f"{FINEWEB[name].rsplit('/', 1)[1]}{f}"))
                        for f in names] for split, names in files.items()}
    except requests.RequestException as e:
        raise InputError(f"cannot fetch --data {name} from {HF_ENDPOINT}: {e}") from None


def save_checkpoint(obj, path):
    """torch.save to a temporary file, fsync, then os.replace: a kill mid-save leaves the old file whole."""
    with open(path.with_suffix(".tmp"), "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path.with_suffix(".tmp"), path)


def load_checkpoint(path):
    """Our checkpoint at path (see the harness's evaluate), checked: a missing, cut or foreign file (another file's
    model) is one line of bad input."""
    if not path.exists():
        raise InputError(f"--init_from resume: no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        keys = {"model", "optimizer", "scaler", "config", "args", "iter_num", "best_val", "evals_since_best", "tokenizer"}
        if not keys <= set(ckpt) or set(ckpt["config"]) != {f.name for f in fields(Config)}:
            raise ValueError(f"not a checkpoint of {Path(__file__).name}")
    except Exception as e:  # a truncated zip, a foreign pickle, a missing key: all mean "not our checkpoint"
        raise InputError(f"--init_from resume: {path} is not a readable checkpoint ({type(e).__name__}: "
                         f"{str(e)[:200]})") from None
    return ckpt


def trained_state(model):
    """What a checkpoint keeps: the trainable parameters, and the buffers of the modules that train (mla_moe.py's
    routing bias); lora.py's frozen base, NF4 codes included, comes back from --init_from."""
    trains = {name for name, m in model.named_modules() if any(p.requires_grad for p in m.parameters(recurse=False))}
    return {k: v.detach() for k, v in model.state_dict(keep_vars=True).items()
            if v.requires_grad or not isinstance(v, nn.Parameter) and k.rpartition(".")[0] in trains}


def load_trained_state(model, state, path):
    """trained_state's tensors back into model; a name or shape it does not have is one line of bad input."""
    try:
        model.load_state_dict({**model.state_dict(), **state})  # the frozen parameters: the model's own
    except RuntimeError as e:  # a name or a shape the model does not have
        raise InputError(f"{path} does not fit the model: {str(e).strip().splitlines()[-1].strip()}") from None


def whole_state(model, optimizers, args):
    """(the trained tensors, the optimizers' state_dicts) for ckpt.pt; --fsdp: gathered whole to rank 0's CPU (a
    collective), parameters numbered as torch's state_dict numbers them: one file for FSDP, DDP, one process."""
    if not args.fsdp:
        return trained_state(model), [optimizer.state_dict() for optimizer in optimizers]
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)  # empty on ranks other than 0
    saved = [get_optimizer_state_dict(model, optimizer, options=options) for optimizer in optimizers]
    return {k: state[k] for k in trained_state(model) if state}, [rekey(s) if s else s for s in saved]


def rekey(saved, keys=None):
    """An optimizer state_dict with its parameters' keys replaced, in order, by keys (default 0, 1, ...)."""
    old = [k for group in saved["param_groups"] for k in group["params"]]
    new = dict(zip(old, range(len(old)) if keys is None else keys, strict=True))
    return dict(state={new[k]: v for k, v in saved["state"].items()},
                param_groups=[dict(group, params=[new[k] for k in group["params"]]) for group in saved["param_groups"]])


def load_optimizer(model, optimizer, saved, args):
    """ckpt.pt's state of one optimizer; under --fsdp every rank reads the whole of it and keeps its own shard."""
    if not args.fsdp:
        return optimizer.load_state_dict(saved)
    names = {id(p): name for name, p in model.named_parameters()}
    saved = rekey(saved, [names[id(p)] for group in optimizer.param_groups for p in group["params"]])
    set_optimizer_state_dict(model, optimizer, saved, options=StateDictOptions(full_state_dict=True))


def config_json_errors(from_pretrained):
    """from_pretrained, with what a config.json value of the wrong type or shape makes fail while the model is built
    from it (a string or null where a number belongs, a list where an object does: TypeError, ValueError,
    AttributeError, KeyError, ArithmeticError) raised as one line of bad input, as a flag of the wrong type is. A
    caller's wrong argument stays the caller's TypeError."""
    @functools.wraps(from_pretrained)  # its name, docstring and signature
    def checked(name_or_path, *args, **kwargs):
        inspect.signature(from_pretrained).bind(name_or_path, *args, **kwargs)
        try:
            return from_pretrained(name_or_path, *args, **kwargs)
        except (TypeError, ValueError, AttributeError, KeyError, ArithmeticError) as e:
            raise InputError(f"{name_or_path}: its config.json does not make a model ({type(e).__name__}: "
                             f"{' '.join(str(e).split())[:200]})") from None
    return checked


@config_json_errors
def from_pretrained(name_or_path, device="cpu", dtype=torch.float32, **run_time):
    """A Mixtral, or a Mistral 7B, from a Hugging Face checkpoint: a hub id ("mistralai/Mixtral-8x7B-v0.1",
    "mistralai/Mistral-7B-v0.1", ...) or a local directory with config.json and model.safetensors (or shards +
    model.safetensors.index.json), in the layout hub checkpoints and `MixtralForCausalLM.save_pretrained` write:
    one w1/w2/w3 per expert (model.layers.L.block_sparse_moe.experts.N.w1.weight), stacked here into one tensor
    per layer; a Mistral ("model_type": "mistral") has one dense SwiGLU, model.layers.L.mlp.gate_proj (n_expert 0).
    Weights are converted to `dtype` on the way in; run_time: Config fields of the run (RUN_TIME: dropout, the
    router's settings), the checkpoint's own architecture aside. Returns the model in eval mode."""
    path, hf, tensors = read_checkpoint(name_or_path)
    if hf.get("model_type") not in ("mixtral", "mistral"):
        raise InputError(f"{path} holds a '{hf.get('model_type')}' model, not Mixtral or Mistral")
    dense = hf["model_type"] == "mistral"
    # transformers 4 writes rope_theta (and rope_scaling); transformers 5 writes both into rope_parameters
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    for key, value, allowed in (("hidden_act", hf.get("hidden_act", "silu"), "silu"), ("rope type", rope_type, "default")):
        if value != allowed:  # a variant this file does not implement must not load as Mixtral
            raise InputError(f"{path}: {key} = {value} is a Mixtral variant this file does not implement")
    cfg = Config(vocab_size=hf["vocab_size"], block_size=hf.get("max_position_embeddings", 32768),
                 n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"],
                 n_kv_head=hf.get("num_key_value_heads") or hf["num_attention_heads"], n_embd=hf["hidden_size"],
                 head_dim=hf.get("head_dim") or 0, intermediate_size=hf["intermediate_size"],
                 n_expert=0 if dense else hf["num_local_experts"],
                 top_k_experts=0 if dense else hf["num_experts_per_tok"],
                 sliding_window=hf.get("sliding_window"), norm_eps=hf.get("rms_norm_eps", 1e-5),
                 rope_theta=rope.get("rope_theta", hf.get("rope_theta", 1e4 if dense else 1e6)),
                 tie_embeddings=hf.get("tie_word_embeddings", False), bos_token_id=hf.get("bos_token_id"),
                 **run_time)
    state, experts = {}, {}
    for name, t in tensors.items():
        if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and cfg.tie_embeddings):
            continue  # old files kept the rotary table (we compute it); a tied head is the embedding
        expert = re.fullmatch(r"(.*\.block_sparse_moe)\.experts\.(\d+)\.(w[123])\.weight", name)
        if expert:  # a matrix per expert in the file, one (n_expert, ...) tensor per layer here
            experts.setdefault(f"{expert[1]}.{expert[3]}", {})[int(expert[2])] = t
            continue
        if name in ("model.embed_tokens.weight", "lm_head.weight"):  # pad the vocabulary rows with zeros
            t = F.pad(t, (0, 0, 0, cfg.padded_vocab_size - t.size(0)))
        state[name] = t
    for name, per_expert in experts.items():
        if max(per_expert) >= cfg.n_expert:
            raise InputError(f"{path}: unexpected tensor for expert {max(per_expert)} of '{name}' ({cfg.n_expert} experts)")
        if len(per_expert) == cfg.n_expert and len({t.shape for t in per_expert.values()}) > 1:
            raise InputError(f"{path}: the experts of '{name}' differ in shape")
        if len(per_expert) == cfg.n_expert:  # an expert missing: load_weights says which layer lacks one
            state[name] = torch.stack([per_expert[i] for i in range(cfg.n_expert)])
    if cfg.tie_embeddings and "model.embed_tokens.weight" in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    with torch.device("meta"):
        model = Mixtral(cfg)  # shapes only: the weights come from the file, no time is spent on a random init
    load_weights(model, state, path, device, dtype)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight  # assign=True replaced both: tie them again
    return model.eval()


def save_pretrained(model, path):
    """model in the Hugging Face Mixtral layout in the directory path, as the hub checkpoints are: one
    block_sparse_moe.experts.N.w1/w2/w3 per expert; a dense model (n_expert 0) as a Mistral. transformers'
    MixtralForCausalLM or MistralForCausalLM (and from_pretrained here) loads it with the same logits."""
    cfg, path = model.config, Path(path)
    path.mkdir(parents=True, exist_ok=True)
    moe = dict(model_type="mixtral", architectures=["MixtralForCausalLM"], num_local_experts=cfg.n_expert,
               num_experts_per_tok=cfg.top_k_experts, router_jitter_noise=cfg.router_noise,
               router_aux_loss_coef=cfg.aux_loss_coef)
    (path / "config.json").write_text(json.dumps(dict(
        **(moe if cfg.n_expert else dict(model_type="mistral", architectures=["MistralForCausalLM"])),
        vocab_size=cfg.vocab_size, max_position_embeddings=cfg.block_size, num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head, hidden_size=cfg.n_embd,
        head_dim=cfg.head_dim, intermediate_size=cfg.intermediate_size, sliding_window=cfg.sliding_window,
        rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=cfg.bos_token_id, hidden_act="silu"), indent=2))
    state = {}
    for k, t in model.state_dict().items():
        if k.endswith(("w1", "w2", "w3")):  # (n_expert, ...) to one matrix per expert
            state.update({f"{k[:-3]}.experts.{i}.{k[-2:]}.weight": w for i, w in enumerate(t)})
        elif not (k == "lm_head.weight" and cfg.tie_embeddings):
            state[k] = t[:cfg.vocab_size] if k in ("model.embed_tokens.weight", "lm_head.weight") else t
    write_safetensors(state, path / "model.safetensors")


# ---------------------------------------------------------------------------------- Mixtral on the command line
# What the shared harness below asks of this model: its presets and flags, how to build it, what a token costs,
# the schedule, the data and what to show at the end.

# Defaults sized so that a bare run takes about three minutes: tiny on a CPU (where the 50K-token output layer
# costs more than the whole model), small on a GPU; both with 8 experts, 2 per token, and GQA with two key/value
# heads. Mixtral trains without dropout; on a 1 MB text a small model overfits without it, hence 0.2 on the GPU.
# On a GPU 400 steps of 8K tokens are 11 epochs of tiny-shakespeare's 304K tokens, with an eval every 1.3 epochs and
# early stopping after 3 evals without a better val loss (--patience), since a small model overfits a 1 MB text
# within a few epochs. The end's sample comes from the best weights.
PRESETS = {
    "cpu": dict(n_layer=4, n_head=4, n_kv_head=2, n_embd=128, block_size=64, batch_size=8, max_iters=200,
                eval_interval=100, eval_iters=10, log_interval=25, lr=3e-3, min_lr=3e-4, warmup_iters=20, dropout=0.0, patience=0),
    "cuda": dict(n_layer=6, n_head=6, n_kv_head=2, n_embd=384, block_size=256, batch_size=32, max_iters=400,
                 eval_interval=50, eval_iters=50, log_interval=25, lr=1e-3, min_lr=1e-4, warmup_iters=40, dropout=0.2,
                 patience=3),
}
RUN_TIME = ("dropout", "router_noise", "capacity_factor", "aux_loss_coef", "z_loss_coef")  # Config fields a run sets


def add_model_flags(p):
    p.add_argument("--n_layer", type=int)
    p.add_argument("--n_head", type=int)
    p.add_argument("--n_kv_head", type=int, help="key/value heads: n_head is MHA, 1 is MQA")
    p.add_argument("--n_embd", type=int)
    p.add_argument("--intermediate_size", type=int, help="each expert's SwiGLU width (default: 8/3 n_embd rounded "
                   "up to a multiple of 64)")
    p.add_argument("--n_expert", type=int, default=8, help="experts per layer (0: Mistral 7B's dense SwiGLU)")
    p.add_argument("--top_k_experts", type=int, default=2, help="experts each token is routed to")
    p.add_argument("--sliding_window", type=int, help="attend to the last W positions only, as Mistral 7B "
                   "(default: off, as Mixtral); sampling then keeps a rolling cache of W positions")
    p.add_argument("--rope_theta", type=float, default=1e6, help="rotary base (Mixtral: 1e6)")
    p.add_argument("--capacity_factor", type=float, default=0.0,
                   help="0: dropless routing; > 0: each expert takes at most this x its even share of a step's "
                        "tokens, the rest skip the layer (static shapes); evaluation and sampling stay dropless")
    p.add_argument("--aux_loss_coef", type=float, default=0.01, help="load-balancing loss weight (Switch: 0.01)")
    p.add_argument("--z_loss_coef", type=float, default=0.001, help="router z-loss weight (ST-MoE: 0.001)")
    p.add_argument("--router_noise", type=float, default=0.0,
                   help="jitter: multiply the router's input by U(1 - eps, 1 + eps) in training (Switch: 0.01)")
    p.add_argument("--show_routing", action="store_true", help="after the sample, the experts each token went to in "
                   "each MoE layer with their weights, and the tokens each expert took")
    p.add_argument("--dropout", type=float, help="on the attention weights and the residual branches")


def build_model(args, given, ckpt, env):
    """(model, tokenizer, note) for --init_from: our checkpoint's model (resume; the harness loads its weights), a
    Hugging Face Mixtral or Mistral with its own tokenizer (SentencePiece style: hf_tokenizer runs it) and
    the run-time flags typed, or a fresh one."""
    run_time = {k: getattr(args, k) for k in RUN_TIME}
    if ckpt is not None:
        model, tokenizer = Mixtral(Config(**{**ckpt["config"], **run_time})), load_tokenizer(ckpt["tokenizer"])
    elif args.init_from != "scratch":  # sampling keeps the checkpoint's dtype (load_dtype), training loads fp32
        tokenizer = pretrained_tokenizer(checkpoint_dir(args.init_from, weights=False), args.sample_only)
        model = from_pretrained(args.init_from, env.device, load_dtype(args, env),
                                **{k: v for k, v in run_time.items() if k in given or k == "dropout"})
    else:
        tokenizer = load_tokenizer(args.tokenizer)
        model = Mixtral(Config(vocab_size=tokenizer.vocab_size, block_size=args.block_size, n_layer=args.n_layer,
                               n_head=args.n_head, n_kv_head=args.n_kv_head, n_embd=args.n_embd,
                               intermediate_size=args.intermediate_size or 0, n_expert=args.n_expert,
                               top_k_experts=args.top_k_experts, sliding_window=args.sliding_window,
                               rope_theta=args.rope_theta, **run_time))
    cfg = model.config
    if args.block_size > cfg.block_size and cfg.sliding_window is None:  # the model's context ends there
        raise InputError(f"--block_size {args.block_size} is longer than the model's context ({cfg.block_size})")
    if not cfg.n_expert:
        return model, tokenizer, " | dense SwiGLU (Mistral 7B)"
    return model, tokenizer, (f" | {model.num_params(active=True) / 1e6:.2f}M active | {cfg.n_expert} experts, top "
                              f"{cfg.top_k_experts}, " + (f"capacity {cfg.capacity_factor:g}" if cfg.capacity_factor
                                                          else "dropless"))


def flops_per_token(model, T):
    """Training FLOPs per token at context T, for MFU: 6 per parameter a token computes with (the top_k of the
    experts), plus attention over at most the sliding window (PaLM, appendix B)."""
    cfg = model.config
    return 6 * model.num_params(active=True) + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * min(T, cfg.sliding_window or T)


def schedule(it, args):  # (learning rate, weight decay) of step it: warmup and cosine, a constant weight decay
    return lr_at(it, args), args.weight_decay


def batches(args, tokenizer, env):  # batch(split) -> (x, y): Mixtral learns from --data's text
    return text_batches(args, tokenizer, env)


def show_sample(model, tokenizer, args, env, title):
    """What a run shows at its end (or with --sample_only): the KV cache a token costs, then a sample (with
    --show_routing, then the experts of each of its tokens)."""
    cfg, itemsize = model.config, (env.dtype if env.dtype != torch.float32 else model.lm_head.weight.dtype).itemsize
    per_token = model.kv_bytes_per_token(itemsize)
    print(f"kv cache: {per_token:,} bytes/token (K and V x {cfg.n_layer} layers x {cfg.n_kv_head} kv heads x "
          f"{cfg.head_dim} x {itemsize} bytes)" + ("" if cfg.sliding_window is None else
          f", a rolling buffer of {cfg.sliding_window} positions: {per_token * cfg.sliding_window:,} bytes "
          "however long the sample"))
    if args.show_routing and not cfg.n_expert:
        print("--show_routing: a dense model (n_expert 0, Mistral 7B) has no router")
    routers = [block.block_sparse_moe for block in model.model.layers] if args.show_routing and cfg.n_expert else []
    with recording(routers) as records:
        ids = sample(model, tokenizer, args, env.ctx, title)
    if routers:  # each of --num_samples makes as many forwards: the first sample's routing goes with its ids
        routes = [token_routes(r[:len(r) // args.num_samples]) for r in records]
        show_routing(ids, tokenizer, range(cfg.n_layer), routes, cfg.n_expert)


# --show_routing: the experts each token went to, recorded while the sample is drawn (no second forward pass)

@contextmanager
def recording(routers):
    """Each router's `record` a list for the time of a sample, each forward appending its routing to it; None again
    after, so that training never records (a None check costs nothing)."""
    for r in routers:
        r.record = []
    try:
        yield [r.record for r in routers]
    finally:
        for r in routers:
            r.record = None


def token_routes(calls):
    """One router's record over a sample of one sequence, a tuple of (N, ...) tensors per forward -> the tuple's rows
    for each token fed in, in order, as lists: all of the first forward's (the prompt), then the last row of each
    later one (the new token; a forward that re-reads a sliding window routes the whole window again)."""
    return [torch.cat([calls[0][j]] + [c[j][-1:] for c in calls[1:]]).tolist() for j in range(len(calls[0]))]


EXPERT_COLORS = (196, 46, 33, 226, 201, 51, 208, 129, 118, 39, 214, 163, 85, 227, 105, 203)  # ANSI 256-color codes


def paint(e, text, color):
    """text in expert e's own color when color is on (the first 16 experts have distinct ones, then a cube walk)."""
    if not color:
        return text
    return f"\x1b[38;5;{EXPERT_COLORS[e] if e < len(EXPERT_COLORS) else 16 + 37 * e % 216}m{text}\x1b[0m"


def show_routing(ids, tokenizer, layers, routes, n_expert, extra=None):
    """After the sample (ids: the sequence generate returned), a row per token fed to the model (all but the last
    sampled one): its text, then per MoE layer L the experts it went to with their gating weights (e:weight); then
    the tokens of each expert per layer, and the tokens each expert took most. routes: per layer, token_routes of
    its router, (experts, weights, ...); extra: a string per token that ends its row. Colors in a terminal only,
    never with NO_COLOR set."""
    color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    n, k = len(routes[0][0]), len(routes[0][0][0])
    tokens = [token_text(tokenizer, i) for i in ids[len(ids) - 1 - n:-1]]
    print(f"--show_routing: each token fed in (the last sampled one never is), then per MoE layer L its {k} experts "
          "as expert:weight")
    for t, token in enumerate(tokens):
        cols = [f"L{i} " + " ".join(paint(e, f"{e}:{format(w, '.2f').lstrip('0')}", color)
                                    for e, w in zip(r[0][t], r[1][t])) for i, r in zip(layers, routes)]
        print(f"  {token:<14} | " + " | ".join(cols) + (f" | {extra[t]}" if extra else ""))
    took = {i: [Counter() for _ in range(n_expert)] for i in layers}
    for i, r in zip(layers, routes):
        for token, chosen in zip(tokens, r[0]):
            for e in chosen:
                took[i][e][token] += 1
    print(f"tokens per expert and layer over these {n} tokens ({k} experts each)\n  layer" +
          "".join(paint(e, f"{f'e{e}':>5}", color) for e in range(n_expert)))
    for i, counts in took.items():
        print(f"  L{i:<4d}" + "".join(f"{sum(counts[e].values()):5d}" for e in range(n_expert)))
    print("the tokens each expert took most (token xcount)")
    for i, counts in took.items():
        for e in filter(lambda e: counts[e], range(n_expert)):
            print(f"  L{i} {paint(e, f'e{e}', color)}: " + ", ".join(f"{token} x{c}"
                                                                   for token, c in counts[e].most_common(4)))


# ------------------------------------------------------------------------------------------- data
# From here on every file holds the same text (tests/test_harness.py): data, training, the command line. It calls the
# model's own PRESETS, add_model_flags, build_model, flops_per_token, schedule, batches, show_sample, save_pretrained.

def load_tokenizer(name=None):
    """The Tokenizer of "gpt2" (tiktoken's), "bytes", a tokenizer.json; None: gpt2, or bytes offline."""
    if name in (None, "gpt2"):
        try:
            enc = tiktoken.get_encoding("gpt2")  # downloads the BPE files once, unless TIKTOKEN_CACHE_DIR has them
            return Tokenizer("gpt2", enc.encode_ordinary, lambda ids: enc.decode(ids, errors="replace"), enc.n_vocab)
        except Exception as e:  # tiktoken raises whatever its download raised
            if name == "gpt2":
                raise InputError(f"the gpt2 tokenizer is needed but its files cannot be had ({type(e).__name__}); "
                                 "set TIKTOKEN_CACHE_DIR to a folder that holds them") from None
            print(f"offline: tiktoken's gpt2 files cannot be had ({type(e).__name__}); using raw UTF-8 bytes as tokens")
    if name in (None, "bytes"):
        return Tokenizer("bytes", lambda s: list(s.encode()), lambda ids: bytes(ids).decode(errors="replace"), 256)
    return pretrained_tokenizer(Path(name).parent, False, Path(name).name)  # --tokenizer's, or a checkpoint's


def read_text(data):
    """(cache name, text) of --data: shakespeare (offline: the Python library's own source) or a UTF-8 text file."""
    path = HERE / "data" / "shakespeare" / "input.txt" if data == "shakespeare" else Path(data)
    try:
        if data == "shakespeare":
            download(SHAKESPEARE_URL, path)
    except requests.RequestException as e:
        print(f"offline: cannot download tiny-shakespeare ({type(e).__name__}); training on Python's own source")
        text = "".join(p.read_text(errors="ignore") for p in sorted(Path(os.__file__).parent.glob("*.py")))
        return "python_stdlib", text[:1_500_000]
    if not path.is_file():
        raise InputError(f"--data '{data}' is a directory; give a UTF-8 text file" if path.is_dir() else
                         f"--data '{data}': no such file, and not a dataset name (shakespeare, {', '.join(FINEWEB)})")
    try:
        text = path.read_bytes().decode()
    except UnicodeError:
        text = "\0"  # not UTF-8: a binary file
    if "\0" in text or not text.strip():
        raise InputError(f"--data '{data}': {path} is " + ("not UTF-8 text (a binary file?)" if text.strip() else "empty"))
    return data if data == "shakespeare" else path.stem, text


def prepare_data(data, tokenizer, shards=1):
    """{split: [token files]} of --data: FineWeb's, or a text tokenized once into data/<name>/{train,val}.bin (90/10)."""
    if data in FINEWEB:
        return fineweb_files(data, tokenizer, shards)
    name, text = read_text(data)
    out, files = HERE / "data" / name, {split: HERE / "data" / name / f"{split}.bin" for split in ("train", "val")}
    meta = dict(text=hashlib.sha1(text.encode()).hexdigest(), tokenizer=tokenizer.name, vocab_size=tokenizer.vocab_size)
    if Path(tokenizer.name).is_file():  # a tokenizer.json: its content, not its name, keys the cache
        meta["tokenizer"] = hashlib.sha1(Path(tokenizer.name).read_bytes()).hexdigest()
    if not all(f.exists() for f in files.values()) or not (out / "meta.json").exists() \
            or (out / "meta.json").read_text() != json.dumps(meta):
        ids = tokenizer.encode(text)
        n = int(0.9 * len(ids))
        out.mkdir(parents=True, exist_ok=True)
        write_tokens(files["train"], ids[:n], tokenizer.vocab_size)
        write_tokens(files["val"], ids[n:], tokenizer.vocab_size)
        (out / "meta.json").write_text(json.dumps(meta))  # written last: the cache is valid once it is there
        print(f"tokenized {name} with {tokenizer.name}: {n:,} train and {len(ids) - n:,} val tokens in {out}")
    return {split: [read_tokens(f)] for split, f in files.items()}


def get_batch(files, batch_size, block_size, device):
    """batch_size random windows of a token file (one of several: drawn by size): x (B, T), y = x shifted by one."""
    ends = np.cumsum([len(f) - block_size for f in files])
    tokens = files[int(np.searchsorted(ends, torch.randint(int(ends[-1]), ()).item() if len(files) > 1 else 0, "right"))]
    start = torch.randint(len(tokens) - block_size, (batch_size,)).numpy()
    xy = torch.from_numpy(tokens[start[:, None] + np.arange(block_size + 1)].astype(np.int64))  # (B, T+1)
    xy = xy.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else xy.to(device)
    return xy[:, :-1], xy[:, 1:]


def text_batches(args, tokenizer, env):
    """batch(split) -> (x, y) from --data, whose files (FineWeb: as many as the run needs) rank 0 makes first."""
    if not env.master:
        dist.barrier()
    files = prepare_data(args.data, tokenizer, args.data_shards or math.ceil(args.max_iters * env.tokens / 1e8))
    if env.master and env.world > 1:
        dist.barrier()
    if min((sizes := {split: sum(map(len, f)) for split, f in files.items()}).values()) <= args.block_size:
        raise InputError(f"--data '{args.data}' is too short for --block_size {args.block_size}: {sizes} tokens")
    return lambda split: get_batch(files[split], args.batch_size, args.block_size, env.device)


# --------------------------------------------------------------------------------------- training

def lr_at(it, args):
    """Linear warmup to --lr, then cosine decay to --min_lr at --lr_decay_iters, flat after."""
    if it < args.warmup_iters:
        return args.lr * (it + 1) / args.warmup_iters
    ratio = min(1.0, (it - args.warmup_iters) / max(1, (args.lr_decay_iters or args.max_iters) - args.warmup_iters))
    return args.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (args.lr - args.min_lr)


def configure_optimizer(model, args, device):
    """AdamW on the groups the model names (`optimizer_groups`: "muon" and "decay" decayed, "no_decay" not), a
    model's `lr_scales` scaling a parameter's rate. --optimizer muon: torch's Muon takes the "muon" matrices (the
    blocks' own, modded-nanogpt's split); Muon's step at AdamW's RMS (arXiv 2502.16982) lets one --lr serve both."""
    kinds, scales, groups = model.optimizer_groups(), getattr(model, "lr_scales", {}), {}
    for name, p in ((name, p) for name, p in model.named_parameters() if p.requires_grad):
        muon = args.optimizer == "muon" and kinds[name] == "muon"
        groups.setdefault((muon, kinds[name] != "no_decay", scales.get(name, 1)), []).append(p)  # (Muon?, decay?, scale)
    groups = {m: [dict(params=ps, decay=d, weight_decay=args.weight_decay * d, lr_scale=s)
                  for (muon, d, s), ps in groups.items() if muon == m] for m in (False, True)}
    return [torch.optim.Muon(g, lr=args.lr, adjust_lr_fn="match_rms_adamw") if muon else torch.optim.AdamW(
        g, lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda") for muon, g in groups.items() if g]


@torch.no_grad()
def estimate_loss(model, batch, args, ctx):
    """({split: mean loss over --eval_iters batches}, the MoE files' expert load over them); seeded: the same batches."""
    model.eval()
    torch.manual_seed(args.seed % 2**63)
    with ctx:  # (loss,) or, in the MoE files, (loss, aux) of each batch
        out = {split: [model(*batch(split))[1:] for _ in range(args.eval_iters)] for split in ("train", "val")}
    model.train()
    load = sum(dict(*aux).get("load", 0) for outs in out.values() for _, *aux in outs)
    return {split: torch.stack([o[0].float() for o in outs]).mean().item() for split, outs in out.items()}, load


def log_metrics(record, env):
    """One line of out_dir/metrics.jsonl, and its numbers to TensorBoard with --tensorboard."""
    with open(env.out_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    for k, v in record.items():
        if env.writer and k != "iter" and isinstance(v, (int, float)):
            env.writer.add_scalar(k, v, record["iter"])
        elif env.writer and v and isinstance(v, list) and isinstance(v[0], list):  # a MoE's load: layers x experts
            env.writer.add_image(k, heatmap(v), record["iter"], dataformats="HW")


def heatmap(table):
    """A table (MoE layers x experts) as a grey uint8 image, 8 x 8 pixels a cell, black at its least, white at its most."""
    t = torch.tensor(table, dtype=torch.float32)
    t = (t - t.min()) / (t.max() - t.min()).clamp_min(1e-12)
    return (255 * t).round().to(torch.uint8).repeat_interleave(8, 0).repeat_interleave(8, 1).numpy()


def open_logs(args, iter_num, env):
    """metrics.jsonl, kept up to iter_num when resuming (a line cut short by a kill dropped), and TensorBoard."""
    env.out_dir.mkdir(parents=True, exist_ok=True)
    path = env.out_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if iter_num > 0 and path.exists() else []
    path.write_text("".join(f"{line}\n" for line in lines if line.endswith("}") and json.loads(line)["iter"] <= iter_num))
    try:
        if args.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            env.writer = SummaryWriter(str(env.out_dir))
    except ImportError:
        print("--tensorboard: the tensorboard package is not installed (pip install tensorboard); skipping it")


def sample(model, tokenizer, args, ctx, title):
    """Print --num_samples samples after --prompt (and the checkpoint's BOS), --show_top's rows; -> the first's ids."""
    torch.manual_seed(args.seed % 2**63)
    bos = [] if model.config.bos_token_id is None else [model.config.bos_token_id]
    idx = torch.tensor([bos + (tokenizer.encode(args.prompt) if tokenizer else []) or [0]], device=model.lm_head.weight.device)
    if tokenizer is None:  # a checkpoint whose tokenizer.json is of a kind hf_tokenizer does not run, or none
        print(f"no tokenizer this file runs for {args.init_from}: no prompt, the samples shown as token ids")
    samples, tops = [], []

    def top(logits):  # --show_top K: of the distribution generate samples from, before top_k/top_p filtering
        tops.append(logits[0].div(args.temperature or 1).softmax(-1).topk(min(args.show_top, logits.size(-1))))
    for _ in range(args.num_samples):  # a checkpoint's tokenizer ends the text at its EOS (pretrained_tokenizer)
        with ctx:
            out = model.eval().generate(idx, args.max_new_tokens, args.temperature, args.top_k or None, args.top_p,
                                        on_logits=top if args.show_top else None)[0].tolist()
        print(f"--- {title} ---\n{tokenizer.decode(out[len(bos):]) if tokenizer else out}\n---" + (
            f"\n--show_top {args.show_top}: each sampled token, then the likeliest next tokens with their "
            f"probabilities, softmax(logits / {args.temperature or 1:g}), before --top_k/--top_p filtering" if tops else ""))
        for t, (p, i) in zip(out[len(out) - len(tops):], tops):
            print(f"  {token_text(tokenizer, t):<14} | top: " + ", ".join(
                f"{token_text(tokenizer, j)} {format(q, '.2f').lstrip('0')}" for q, j in zip(p.tolist(), i.tolist())))
        samples.append(out)
        tops.clear()
    return samples[0]


def token_text(tokenizer, i):
    """One token as text, quoted, newlines and other control characters escaped (its id without a tokenizer)."""
    return repr(tokenizer.decode([i])) if tokenizer else str(i)


def evaluate(model, eval_model, batch, optimizers, scaler, state, tokenizer, args, env):
    """Eval both splits, save ckpt.pt (best.pt when val improved), log; True: stop early. --fsdp: all ranks."""
    (losses, load), it, ckpt_path = estimate_loss(eval_model, batch, args, env.ctx), state["iter_num"], env.out_dir / "ckpt.pt"
    if not all(map(math.isfinite, losses.values())):  # the NaN guard: stop before anything bad is saved
        diverged(f"eval {it} | train {losses['train']} | val {losses['val']}", env)
    improved = losses["val"] < state["best_val"]
    state["evals_since_best"] = 0 if improved else state["evals_since_best"] + 1
    state["best_val"] = min(losses["val"], state["best_val"])
    trained, optimizer_states = whole_state(model, optimizers, args)
    if not env.master:
        return False  # rank 0 decides and broadcasts
    ckpt = dict(state, model=trained, optimizer=optimizer_states, args=vars(args), scaler=scaler.state_dict(),
                config=asdict(model.config), tokenizer=tokenizer.name)
    for path in [ckpt_path] + [env.out_dir / "best.pt"] * improved:  # best.pt: early stopping never loses the best
        save_checkpoint(ckpt, path)
    print(f"eval {it} | train {losses['train']:.4f} | val {losses['val']:.4f} | saved {ckpt_path}"
          + (" (best)" if improved else ""))
    report = model.load_report(load) if torch.is_tensor(load) else {}  # MoE: the experts' share of the tokens
    log_metrics(dict(iter=it, **losses, **report), env)
    if args.patience and state["evals_since_best"] >= args.patience:
        print(f"early stop: no better val loss in {args.patience} evals (best {state['best_val']:.4f}, in best.pt)")
        return True
    return False


def shard(model, env):
    """--fsdp: fully_shard each Block, then the root, over the "dp" ranks (llama2.py's --tp: first `parallelize`)."""
    mesh = init_device_mesh(env.device.type, (env.world // env.tp, env.tp), mesh_dim_names=("dp", "tp"))
    getattr(model, "parallelize", lambda tp_mesh: None)(mesh["tp"])  # llama2.py's --tp
    for module in [m for m in model.modules() if type(m).__name__ == "Block"] + [model]:  # float32: no cast
        fully_shard(module, mesh=mesh["dp"], mp_policy=MixedPrecisionPolicy(env.dtype, reduce_dtype=torch.float32))


def diverged(line, env):
    """The NaN guard: stop (exit 1) before anything bad is saved."""
    print(f"{line}: training diverged; stopping. The last good checkpoint is {env.out_dir}/ckpt.pt", file=sys.stderr)
    sys.exit(1)


def train(model, batch, tokenizer, args, ckpt, env):
    """--max_iters steps of --grad_accum micro-steps, logged, evaluated and saved; (the last iteration, best val)."""
    if args.fsdp:  # before the optimizers: their parameters are the shards
        shard(model, env)
    optimizers = configure_optimizer(model, args, env.device)
    scaler = torch.amp.GradScaler(env.device.type, enabled=env.dtype == torch.float16)
    state = dict(iter_num=0, best_val=float("inf"), evals_since_best=0)
    if ckpt is not None:
        for optimizer, saved in zip(optimizers, ckpt["optimizer"], strict=True):
            load_optimizer(model, optimizer, saved, args)
        scaler.load_state_dict(ckpt["scaler"])
        state = {k: ckpt[k] for k in state}
    blocks = env.compile and getattr(model, "compile_blocks", False)  # deep scans (mamba.py): a Block at a time,
    for block in (m for m in model.modules() if blocks and type(m).__name__ == "Block"):  # one graph for all alike:
        block.compile()  # compiling takes one block's time at any depth (in place: the end's sample forces eager)
    eval_model = train_model = torch.compile(model) if env.compile and not blocks else model  # `model`: plain
    if env.world > 1 and not args.fsdp:  # buffers need no sync (each rank computes them); infini: unused gates
        train_model = DDP(eval_model, broadcast_buffers=False,  # device_ids None: the module's own device
                          find_unused_parameters=getattr(model, "find_unused_parameters", False))
    if env.master:
        open_logs(args, state["iter_num"], env)
    gpu = torch.cuda.get_device_name(env.device) if env.device.type == "cuda" and env.dtype != torch.float32 else ""
    peak = next((f for key, f in (("H100", 989e12), ("H200", 989e12), ("A100", 312e12)) if key in gpu), None)  # MFU
    sums, t_log, iters_logged = {}, time.perf_counter(), state["iter_num"]
    train_model.train()
    while state["iter_num"] < args.max_iters:
        step_load = 0  # the MoE files: the experts' load over the step's micro-batches, for after_step
        lr, weight_decay = schedule(state["iter_num"], args)
        for group in (group for optimizer in optimizers for group in optimizer.param_groups):
            group.update(lr=lr * group["lr_scale"], weight_decay=weight_decay if group["decay"] else 0.0)
        torch.manual_seed(((args.seed * 1_000_003 + state["iter_num"]) * 1_009 + env.rank // env.tp) % 2**63)  # resume
        for micro in range(args.grad_accum):
            x, y = batch("train")
            train_model.require_backward_grad_sync = micro == args.grad_accum - 1  # DDP: all-reduce on the last only
            getattr(model, "set_requires_gradient_sync", lambda sync: None)(micro == args.grad_accum - 1)  # FSDP: ditto
            with env.ctx:
                _, loss, *aux = train_model(x, y)  # the MoE files: (logits, loss, aux), aux the router's terms
            scaler.scale(loss / args.grad_accum).backward()
            aux = dict(*aux)
            step_load = step_load + aux.pop("load", 0)
            for k, v in dict(loss=loss, **aux).items():  # logged: the loss, a MoE's router terms
                sums[k] = sums.get(k, 0.0) + v.detach().float() / args.grad_accum
        for optimizer in optimizers:  # fp16: the gradients unscaled, for the clip
            scaler.unscale_(optimizer)
        getattr(model, "clip_grad_norm", torch.nn.utils.clip_grad_norm_)(model.parameters(), args.grad_clip or math.inf)
        for optimizer in optimizers:
            scaler.step(optimizer)
            optimizer.zero_grad(set_to_none=True)
        scaler.update()
        getattr(model, "after_step", lambda load: None)(step_load)  # mla_moe.py: the routing bias follows the load
        state["iter_num"] = it = state["iter_num"] + 1
        if env.master and (it % args.log_interval == 0 or it == args.max_iters):
            means = {k: v.item() / (it - iters_logged) for k, v in sums.items()}  # the host sync, every log_interval
            dt = (time.perf_counter() - t_log) / (it - iters_logged)
            mfu = flops_per_token(model, args.block_size) * env.tokens / dt / (peak * env.world) if peak else None
            if not math.isfinite(means["loss"]):
                diverged(f"iter {it} | loss {means['loss']}", env)
            print(f"iter {it} | " + " | ".join(f"{k} {v:.4f}" for k, v in means.items()) + f" | lr {lr:.2e} | "
                  f"{dt * 1000:.1f} ms | {env.tokens / dt:,.0f} tok/s" + (f" | mfu {mfu:.1%}" if mfu else ""))
            log_metrics(dict(iter=it, **means, lr=lr, ms=dt * 1000, tok_s=env.tokens / dt, mfu=mfu), env)
            sums, t_log, iters_logged = {}, time.perf_counter(), it
        if it % args.eval_interval == 0 or it == args.max_iters:
            t_eval, stop = time.perf_counter(), torch.zeros((), device=env.device)
            if env.master or args.fsdp:
                stop += evaluate(model, eval_model, batch, optimizers, scaler, state, tokenizer, args, env)
            if env.world > 1:
                dist.broadcast(stop, src=0)
            if stop.item():
                break
            t_log += time.perf_counter() - t_eval  # eval time is not training time
    return state["iter_num"], state["best_val"]


# ------------------------------------------------------------------------------------------- main

def parse_args(argv):
    """(args, the flags typed). Flags left at None take the device's PRESETS, or a resumed run's values."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0] + " (see the module docstring)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="auto: cuda, mps or cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bf16 autocast on CUDA (fp16 + GradScaler without bf16), float32 elsewhere")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, help="torch.compile (default: on CUDA only)")
    p.add_argument("--data", default="shakespeare", help="shakespeare, fineweb10B, fineweb-edu10B or a UTF-8 text file")
    p.add_argument("--data_shards", type=int, help="FineWeb: training shards of 100M tokens (default: as the run needs)")
    p.add_argument("--out_dir", help=f"checkpoints and metrics (default out/{Path(__file__).stem})")
    p.add_argument("--init_from", default="scratch", help="'scratch', 'resume' (out_dir/ckpt.pt), a hub id or HF dir")
    p.add_argument("--tokenizer", metavar="FILE", help="from scratch: a BPE tokenizer.json (bpe.py's) instead of gpt2")
    for n in ("max_iters", "eval_interval", "eval_iters", "log_interval", "batch_size", "block_size", "warmup_iters"):
        p.add_argument(f"--{n}", type=int)
    p.add_argument("--lr_decay_iters", type=int, help="the cosine's end (default: max_iters; resumed: the run's own)")
    p.add_argument("--grad_accum", type=int, default=1, help="micro-steps per optimizer step")
    for name, default in (("lr", None), ("min_lr", None), ("weight_decay", 0.1), ("grad_clip", 1.0)):
        p.add_argument(f"--{name}", type=float, default=default)
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "muon"], help="muon: torch 2.9 or later")
    p.add_argument("--patience", type=int, help="stop after this many evals without a better val loss (0: never)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--tensorboard", action="store_true", help="also log to TensorBoard under out_dir")
    p.add_argument("--prompt", default="\n", help="the start of the sample printed at the end")
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--num_samples", type=int, default=1, help="samples printed one after another")
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top_k", type=int, default=200, help="sample among the k likeliest tokens (0: all)")
    p.add_argument("--top_p", type=float, help="sample among the likeliest tokens up to this probability mass")
    p.add_argument("--show_top", type=int, default=0, metavar="K", help="each sampled token beside the K likeliest")
    p.add_argument("--sample_only", action="store_true", help="load --init_from and sample; no training")
    p.add_argument("--export", metavar="DIR", help="at the end, write the model in the Hugging Face layout there")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: FSDP2, each rank holding 1/world of the state")
    add_model_flags(p)
    for a in filter(lambda a: a.dest in PRESETS["cpu"], p._actions):  # the presets' values in --help
        a.help = f"{a.help or ''} (default {PRESETS['cpu'][a.dest]} on CPU, {PRESETS['cuda'][a.dest]} on CUDA)".strip()
    args = p.parse_args(argv)
    for action in p._actions:  # parse again with no defaults: which flags did the user actually type?
        action.default = argparse.SUPPRESS
    p._defaults.clear()  # set_defaults' too
    return args, set(vars(p.parse_args(argv)))


def check_args(args):
    """Bad flag values, one line each: floats finite and not negative, the run's sizes positive (Config: the model's)."""
    positive = ("max_iters", "eval_interval", "eval_iters", "log_interval", "batch_size", "block_size", "grad_accum",
                "lr_decay_iters", "max_new_tokens", "num_samples")
    for name, value in vars(args).items():
        if name in positive and value is not None and value <= 0:
            raise InputError(f"--{name} must be positive, got {value}")
        counts = name in ("warmup_iters", "patience", "top_k", "seed", "show_top")
        if (type(value) is float or counts) and not 0 <= value < math.inf:
            raise InputError(f"--{name} must " + ("not be negative" if value < 0 else "be finite") + f", got {value}")
    if args.top_p is not None and not 0.0 < args.top_p <= 1.0:
        raise InputError(f"--top_p must be in (0, 1], got {args.top_p}")
    if args.optimizer == "muon" and not hasattr(torch.optim, "Muon"):
        raise InputError(f"--optimizer muon needs torch 2.9 or later (torch.optim.Muon); this is torch {torch.__version__}")
    if args.sample_only and args.init_from == "scratch":
        raise InputError("--sample_only needs --init_from resume, a hub id or an HF directory")
    if args.tokenizer and args.init_from != "scratch":  # a resumed or pretrained model has its own
        raise InputError(f"--tokenizer is for training from scratch, not with --init_from {args.init_from}")


def setup_device(args):
    """The run's device, autocast dtype and context, compile, rank and world size (DDP when torchrun launched us)."""
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    auto = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    name = auto if args.device == "auto" else args.device
    if name != "cpu" and not (torch.cuda.is_available() if name == "cuda" else torch.backends.mps.is_available()):
        raise InputError(f"--device {name}: no {name.upper()} device is available (try --device cpu)")
    device = torch.device(f"cuda:{local_rank}" if name == "cuda" else name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if args.fsdp and "RANK" not in os.environ:
        raise InputError("--fsdp shards the model over processes: launch with torchrun (--nproc_per_node N)")
    if "RANK" in os.environ:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    fits = torch.float32 if name != "cuda" else torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    dtype = dict(float32=torch.float32, bfloat16=torch.bfloat16, float16=torch.float16, auto=fits)[args.dtype]
    return SimpleNamespace(device=device, dtype=dtype, rank=rank, world=int(os.environ.get("WORLD_SIZE", 1)),
                           master=rank == 0, compile=device.type == "cuda" if args.compile is None else args.compile,
                           ctx=torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext(),
                           out_dir=Path(args.out_dir or f"out/{Path(__file__).stem}"), writer=None, t_start=time.time())


def main(argv=None):
    try:
        run(*parse_args(argv))  # argv None: sys.argv
    except (InputError, OSError) as e:  # OSError: a path, a file or a download that cannot be used
        print(f"{Path(__file__).name}: error: {' '.join(str(e).split())}", file=sys.stderr)  # one line, always
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(args, given):
    """Set-up, the model, the data, the loop, and a sample from the best weights: nanoGPT's train.py in steps."""
    env = setup_device(args)
    ckpt = load_checkpoint(env.out_dir / "ckpt.pt") if args.init_from == "resume" else None
    if ckpt is not None:  # flags not typed take the checkpointed run's values, but for where to run and the sample
        for k in set(ckpt["args"]) - given - set("device dtype compile init_from sample_only out_dir tensorboard export "
                                                  "prompt max_new_tokens num_samples temperature top_k top_p show_top "
                                                  "tokenizer fsdp tp".split()):
            setattr(args, k, ckpt["args"][k])
        args.lr_decay_iters = args.lr_decay_iters or ckpt["args"]["max_iters"]  # its schedule's end too
    for k, v in PRESETS["cuda" if env.device.type == "cuda" else "cpu"].items():
        setattr(args, k, v if getattr(args, k) is None else getattr(args, k))
    check_args(args)
    torch.manual_seed(args.seed % 2**63)  # the initial weights; each training step reseeds (see train)
    model, tokenizer, note = build_model(args, given, ckpt, env)
    fixed = asdict(model.config) | ({"optimizer": ckpt["args"]["optimizer"]} if ckpt else {})  # and its optimizer
    for k, v in fixed.items():  # a flag typed now must agree with the model it trains
        if k in given and k != "block_size" and getattr(args, k) != v:
            raise InputError(f"--{k} {getattr(args, k)} does not match the model from --init_from {args.init_from}, "
                             f"which has {k} {v}")
    if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:
        raise InputError(f"the tokenizer has {tokenizer.vocab_size:,} tokens, the model only {model.config.vocab_size:,}")
    if ckpt is not None:
        load_trained_state(model, ckpt["model"], env.out_dir / "ckpt.pt")
    env.tp = getattr(model, "tp", 1)  # tensor-parallel ranks share their batches
    env.tokens = args.batch_size * args.block_size * args.grad_accum * env.world // env.tp  # per optimizer step
    if env.master:
        print(f"{Path(__file__).stem} | {env.device} | {str(env.dtype)[6:]} | compile {'on' if env.compile else 'off'}"
              f" | {model.num_params() / 1e6:.2f}M params | {env.tokens:,} tokens/step | data {args.data} | tokenizer "
              f"{tokenizer.name if tokenizer else 'none (token ids)'} | init {args.init_from} | weights {weights_size(model)}"
              + (f" | {'FSDP' if args.fsdp else 'DDP'} x{env.world // env.tp}" if env.world > 1 else "") + note)
    if env.master and (args.sample_only or ckpt is None and args.init_from != "scratch"):  # before any training
        show_sample(model.to(env.device), tokenizer, args, env, f"sample from {args.init_from}"
                    + ("" if args.sample_only else ", the base model before fine-tuning"))
    if not args.sample_only:
        iter_num, best_val = train(model.to(env.device), batches(args, tokenizer, env), tokenizer, args, ckpt, env)
    if env.master and not args.sample_only:  # the best weights, not the last: past its best val loss a run overfits
        best = env.out_dir / "best.pt"
        if args.fsdp:  # train sharded the model in place: a whole one, built as above, for the sample and --export
            model = build_model(args, given, ckpt, env)[0].to(env.device)
        load_trained_state(model, torch.load(best, map_location=env.device, weights_only=True)["model"], best)
        with torch.compiler.set_stance("force_eager"):  # no compiling for generation's shapes
            show_sample(model, tokenizer, args, env, "sample")
        print(f"done | {iter_num} iters | best val {best_val:.4f} | {time.time() - env.t_start:.0f} s")
    if env.master and args.export:  # for the tools that read Hugging Face checkpoints
        save_pretrained(model, Path(args.export))
    if env.writer:
        env.writer.close()
    if env.world > 1:  # the ranks end together: none leaves while another still uses the process group
        dist.barrier()


if __name__ == "__main__":
    main()
