"""Mamba-2 in one file: structured state space duality (SSD), its pretrained weights, data, training, sampling.

Paper: Dao and Gu 2024, "Transformers are SSMs: Generalized Models and Efficient Algorithms Through Structured State
Space Duality", arXiv 2405.21060. Mamba-2 keeps Mamba's selective recurrence h_t = A_t h_{t-1} + B_t x_t,
y_t = C_t h_t (eq. 1), but restricts A_t to a scalar times the identity, one per head. The whole sequence map is
then y = M x with M_ji = C_j . B_i exp(a_{i+1} + ... + a_j) for i <= j (section 3: a semiseparable matrix): masked,
decay-weighted attention without a softmax (section 5, "SSD"). The chunked algorithm (section 6, Listing 1) cuts the
sequence into chunks of Q steps; inside a chunk it computes that attention-like product (the diagonal blocks), and
between chunks it passes only a (P x N) state per head (the off-diagonal blocks, low rank): matrix multiplications
everywhere, which GPUs run on their tensor cores from plain PyTorch, at O(T Q) cost instead of O(T^2).

The Mamba-2 block (section 7.1, Figure 6): one input projection gives z, x, B, C and Delta together; a causal
depthwise convolution runs over x, B and C; x is split into heads of P = headdim channels and B, C into ngroups
groups of N = d_state that the heads share (as grouped-query attention shares keys, section 7.2's "multi-value"
pattern); A (a scalar per head, kept as A_log), Delta's bias and D are per head; the output y * SiLU(z) goes
through a group-wise RMSNorm (the extra normalization of section 7.1) before the output projection. Blocks
are x + Mixer(RMSNorm(x)), the embedding and the head are tied.

The model section opens with the SSM as the paper writes it: `ssd_step`, one step of the recurrence, and `ssd_loop`,
the loop over time, which is the reference the tests check against and what decoding runs from a cached state (one
step a token, the same time and memory at any context length); `ssd_quadratic` writes the same map as one masked
matrix. `ssd_chunked`, after the model ("the same, fast"), is the chunked algorithm that training and prompts run
(Listing 1, with the stable segment sums of `segsum`), tested equal to the loop in outputs, states and gradients.

What is here: the model; sampling from the recurrent state; loading `Mamba2ForCausalLM` checkpoints in the Hugging
Face layout (the converted hub checkpoints, such as AntonV/mamba2-130m-hf, or anything `save_pretrained` writes,
sharded or not), with the GPT-NeoX tokenizer.json those checkpoints carry; training on tiny-shakespeare, FineWeb or
any text file with AdamW or Muon, warmup + cosine, bf16 autocast, torch.compile and DistributedDataParallel; exact
resume. What is not: the fused Triton kernels of the reference (here every chunk's (Q x Q) decay and score matrices
go through GPU memory), the original repos' pytorch_model.bin layout, variable-length packing, the d_mlp part of
some in_proj layouts, and an untied head.

    python mamba2.py                                     # CPU: a tiny model, a few minutes
    python mamba2.py --device cuda                       # one GPU: bf16, torch.compile, 12 layers x 384
    python mamba2.py --headdim 32 --ngroups 2 --d_state 64 --chunk_size 128   # the SSD sizes
    torchrun --standalone --nproc_per_node 8 mamba2.py   # DDP on 8 GPUs
    python mamba2.py --init_from AntonV/mamba2-130m-hf --sample_only --prompt "The meaning of life is"

Offline (no download, no tiktoken files) it says so and carries on: the Python standard library's own source
as the text, raw UTF-8 bytes as the tokens. Every step's randomness (batches, dropout) is drawn from a seed
made of (--seed, iteration, rank), so `--init_from resume` continues exactly as an uninterrupted run would.
"""
import argparse
import functools
import hashlib
import heapq
import inspect
import json
import math
import os
import struct
import sys
import time
import unicodedata
from contextlib import nullcontext
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
    vocab_size: int = 50288              # vocab_size: real tokens; the embedding is padded to a multiple of 64
    block_size: int = 2048               # the training context: Mamba-2 has no positions and no longest context
    n_layer: int = 24                    # num_hidden_layers (Mamba-2 130M: 24 x 768)
    n_embd: int = 768                    # hidden_size
    d_state: int = 128                   # state_size: N, the state per channel (Mamba-2 uses 64 to 256, Mamba 16)
    expand: int = 2                      # expand: d_inner = expand * n_embd
    headdim: int = 64                    # head_dim: P, channels per head; the heads (num_heads) are d_inner / P
    ngroups: int = 1                     # n_groups: B and C come in this many groups, each shared by its heads
    d_conv: int = 4                      # conv_kernel: width of the causal depthwise convolution over x, B and C
    chunk_size: int = 256                # chunk_size: Q, the steps per chunk of the SSD algorithm (any T works)
    conv_bias: bool = True               # use_conv_bias
    bias: bool = False                   # use_bias: biases in in_proj and out_proj
    norm_eps: float = 1e-5               # layer_norm_epsilon (the blocks' RMSNorms and the gated one)
    dt_min: float = 0.001                # time_step_min: Delta's bias is initialised for dt log-uniform in
    dt_max: float = 0.1                  # time_step_max:   [dt_min, dt_max]
    dt_init_floor: float = 1e-4          # time_step_floor
    dt_limit_min: float = 0.0            # time_step_limit: Delta is clamped to [dt_limit_min, dt_limit_max]
    dt_limit_max: float = math.inf
    dropout: float = 0.0                 # on the embedding and the residual branches (the paper uses none)
    residual_in_fp32: bool = True        # residual_in_fp32: the residual stream kept in float32 (every released config)
    bos_token_id: int | None = None      # none: GPT-NeoX's tokenizer, which the released models use, puts nothing
                                         # before a text

    def __post_init__(self):
        check_types(self)
        for name in ("vocab_size", "block_size", "n_layer", "n_embd", "d_state", "expand", "headdim", "ngroups",
                     "d_conv", "chunk_size"):
            if getattr(self, name) <= 0:
                raise InputError(f"{name} must be positive, got {getattr(self, name)}")
        if self.d_inner % self.headdim:
            raise InputError(f"expand x n_embd = {self.d_inner} must be a multiple of headdim {self.headdim}")
        if self.n_head % self.ngroups:
            raise InputError(f"the {self.n_head} heads (d_inner / headdim) must be a multiple of ngroups "
                             f"{self.ngroups}")
        if not 0.0 < self.dt_min <= self.dt_max:
            raise InputError(f"need 0 < dt_min <= dt_max, got {self.dt_min} and {self.dt_max}")
        if not 0.0 <= self.dt_limit_min <= self.dt_limit_max:
            raise InputError(f"need 0 <= dt_limit_min <= dt_limit_max, got {self.dt_limit_min} and {self.dt_limit_max}")
        if not 0.0 <= self.dropout < 1.0:
            raise InputError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def d_inner(self):
        return self.expand * self.n_embd

    @property
    def n_head(self):  # the SSD heads (num_heads): H = d_inner / P
        return self.d_inner // self.headdim

    @property
    def conv_dim(self):  # the convolution's channels: x, B and C
        return self.d_inner + 2 * self.ngroups * self.d_state

    @property
    def padded_vocab_size(self):  # 50257 -> 50304, 50288 -> 50304: matmul shapes that tile well on GPUs
        return -(-self.vocab_size // 64) * 64


# ------------------------------------------------------------------------------------------ model

# The paper first, in its plainest form. The SSM of a Mamba-2 layer: x (b, T, H, P), heads of P
# channels; Delta (b, T, H) > 0; A (H,) < 0, a scalar per head; B and C (b, T, G, N), G groups each
# read by its H / G heads; D (H,). Eq. 1's selective SSM with A_t a scalar times the identity (the
# SSD's structure, section 5), discretised as the reference does (A_bar = exp(Delta A), B_bar x =
# Delta B x), per head, with a state h of P x N:
#     h_t = a_t h_{t-1} + Delta_t x_t B_t^T,   y_t = h_t C_t + D x_t,   a_t = exp(Delta_t A)
# Two ways here: the recurrence, a loop over t (ssd_loop: the reference, and decoding's step), and
# the whole map as one masked matrix (ssd_quadratic: the attention side of the duality). Training
# runs the same map chunked (ssd_chunked, "the same, fast", after the model).

def ssd_step(h, x, dt, A, B, C, D):
    """One step of the recurrence: h (b, H, P, N), x (b, H, P), dt (b, H), A and D (H,), and B, C
    (b, H, N), one per head -> y (b, H, P), the next h (b, H, P, N)."""
    a = torch.exp(dt * A)[..., None, None]                      # (b, H, 1, 1): a_t = exp(Delta_t A)
    h = a * h + (dt[..., None] * x)[..., None] * B[:, :, None]  # a_t h_{t-1} + Delta_t x_t B_t^T
    y = (h @ C[..., None])[..., 0] + D[:, None] * x             # y_t = h_t C_t + D x_t
    return y, h


def ssd_loop(x, dt, A, B, C, D, h0=None):
    """The reference: the recurrence as written, a loop over t, from the state h0 (b, H, P, N)
    (None: zeros). It decodes (T = 1 from the cache) and is what ssd_chunked is tested against.
    Returns y (b, T, H, P) in x's dtype and the last state (float32)."""
    (b, T, H, P), N = x.shape, B.size(-1)
    R = H // B.size(2)                                          # heads per group
    B, C = B.float().repeat_interleave(R, 2), C.float().repeat_interleave(R, 2)  # (b, T, H, N)
    h = x.new_zeros(b, H, P, N, dtype=torch.float32) if h0 is None else h0
    ys = []
    # unbind, not x[:, t]: an index's backward adds a zero tensor of the whole sequence per step
    steps = zip(x.float().unbind(1), dt.float().unbind(1), B.unbind(1), C.unbind(1))
    for x_t, dt_t, B_t, C_t in steps:
        y, h = ssd_step(h, x_t, dt_t, A, B_t, C_t, D)
        ys.append(y)
    return torch.stack(ys, 1).to(x.dtype), h


def segsum(a):
    """a (..., L) -> S (..., L, L) with S_ij = a_{j+1} + ... + a_i for j <= i (0 on the diagonal)
    and -inf above it, so that exp(S) is the decay from step j to step i, and 0 where j is in i's
    future: the 1-semiseparable mask L of section 3 (Listing 1's segsum). The stable form: a
    cumulative sum of a masked copy, never cumsum_i - cumsum_j, whose float32 rounding grows with
    the cumulative sum (a decay of 1e-3 after a sum of -1e4 is lost)."""
    L = a.size(-1)
    strict = torch.ones(L, L, dtype=torch.bool, device=a.device).tril(-1)  # j < i
    s = a[..., None].expand(*a.shape, L).masked_fill(~strict, 0.0).cumsum(-2)  # row i: a_i, summed
    return s.masked_fill(~torch.ones(L, L, dtype=torch.bool, device=a.device).tril(), -math.inf)


def ssd_quadratic(x, dt, A, B, C, D):
    """ssd_loop's y from a zero state as one matrix (sections 3 and 5, the duality):
    y = M (Delta x) + D x with M_ts = C_t . B_s exp(a_{s+1} + ... + a_t) for s <= t, 0 above:
    masked, decay-weighted attention without a softmax, at O(T^2) cost. ssd_chunked computes the
    same product inside each chunk."""
    R = x.size(2) // B.size(2)
    B, C = B.float().repeat_interleave(R, 2), C.float().repeat_interleave(R, 2)  # (b, T, H, N)
    L = torch.exp(segsum((dt.float() * A).transpose(1, 2)))  # (b, H, T, T): L_ts
    M = L * torch.einsum("bthn,bshn->bhts", C, B)              # (b, H, T, T)
    y = torch.einsum("bhts,bshp->bthp", M, dt.float()[..., None] * x.float())
    return (y + D[:, None] * x.float()).to(x.dtype)


class GatedRMSNorm(nn.Module):
    """RMSNorm(y * SiLU(z)) * g over groups of d_inner / ngroups channels, each normalised alone
    (section 7.1: the norm added before the output projection, for stability; the group size makes
    it the same with tensor parallelism over groups). In float32 whatever the input, as the
    reference."""

    def __init__(self, dim, group_size, eps):
        super().__init__()
        self.eps, self.group_size = eps, group_size
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y, z):
        g = (y.float() * F.silu(z.float())).unflatten(-1, (-1, self.group_size))  # (..., G, E / G)
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * g.flatten(-2).to(y.dtype)


class Mamba2State:
    """One layer's inference cache, the same size at any context length: the last d_conv - 1 inputs
    of the convolution (B, d_conv - 1, conv_dim) and the SSM state h (B, H, P, N)."""

    def __init__(self):
        self.conv, self.ssm = None, None


class Mamba2Mixer(nn.Module):
    """The Mamba-2 block of Figure 6 (section 7): in_proj to (z, x B C, Delta), x B C through the
    causal depthwise conv1d and SiLU, Delta = softplus(. + dt_bias) clamped to time_step_limit, the
    SSD, the gated RMSNorm of y * SiLU(z), out_proj back to n_embd. The Hugging Face names
    (Mamba2Mixer), so checkpoints load as they are."""

    def __init__(self, cfg):
        super().__init__()
        E, N, G, H = cfg.d_inner, cfg.d_state, cfg.ngroups, cfg.n_head
        self.d_inner, self.d_state, self.ngroups, self.n_head = E, N, G, H
        self.headdim = cfg.headdim
        self.chunk_size, self.dt_limit = cfg.chunk_size, (cfg.dt_limit_min, cfg.dt_limit_max)
        # one projection gives z, x, B, C and Delta
        self.in_proj = nn.Linear(cfg.n_embd, 2 * E + 2 * G * N + H, bias=cfg.bias)
        self.conv1d = nn.Conv1d(cfg.conv_dim, cfg.conv_dim, cfg.d_conv, groups=cfg.conv_dim,
                                bias=cfg.conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(H))  # Delta's bias, per head
        self.A_log = nn.Parameter(torch.empty(H))  # A = -exp(A_log) < 0, a scalar per head
        self.D = nn.Parameter(torch.ones(H))
        self.norm = GatedRMSNorm(E, E // G, cfg.norm_eps)
        self.out_proj = nn.Linear(E, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, u, state=None, parallel=True):
        """u (B, T, n_embd) -> (B, T, n_embd); state (a Mamba2State) is read, then advanced to the
        last token. parallel: the chunked SSD (training, prompts), else the loop; one token from a
        cache is a loop step."""
        E, GN = self.d_inner, self.ngroups * self.d_state
        z, xBC, dt = self.in_proj(u).split([E, self.conv1d.in_channels, self.n_head], dim=-1)
        step = state is not None and state.conv is not None and u.size(1) == 1  # decoding one token
        xBC = F.silu(self.conv(xBC, state))
        x, B, C = xBC.split([E, GN, GN], dim=-1)
        x = x.unflatten(-1, (self.n_head, self.headdim))          # (B, T, H, P)
        B, C = (t.unflatten(-1, (self.ngroups, self.d_state)) for t in (B, C))  # (B, T, G, N)
        dt = F.softplus(dt.float() + self.dt_bias.float()).clamp(*self.dt_limit)  # (B, T, H)
        A = -torch.exp(self.A_log.float())                       # (H,)
        h0 = None if state is None else state.ssm
        if parallel and not step:
            y, h = ssd_chunked(x, dt, A, B, C, self.D.float(), self.chunk_size, h0)
        else:
            y, h = ssd_loop(x, dt, A, B, C, self.D.float(), h0)
        if step:
            state.ssm.copy_(h)  # decoding keeps one buffer
        elif state is not None:
            state.ssm = h
        return self.dropout(self.out_proj(self.norm(y.flatten(-2), z)))

    def conv(self, x, state):
        """The causal depthwise convolution over x (B, T, conv_dim), after the cached d_conv - 1
        inputs (zeros before a text): out_t = sum_j w_j x_{t+j} over the window of d_conv inputs,
        one multiply-add per tap on shifted views. No conv1d call: PyTorch's depthwise conv1d is the
        slower of the two on CPUs, and a decoding step is then the same code at T = 1. The cache is
        updated in place once it exists: decoding keeps one buffer."""
        k = self.conv1d.kernel_size[0]
        cached = state is not None and state.conv is not None
        past = state.conv if cached else x.new_zeros(x.size(0), k - 1, x.size(2))
        x = torch.cat([past.to(x.dtype), x], dim=1)              # (B, k - 1 + T, conv_dim)
        if cached:
            state.conv.copy_(x[:, x.size(1) - (k - 1):])
        elif state is not None:
            state.conv = x[:, x.size(1) - (k - 1):].clone()
        w, T = self.conv1d.weight[:, 0], x.size(1) - (k - 1)     # w (conv_dim, k), oldest tap first
        out = x[:, :T] * w[:, 0]
        for j in range(1, k):  # the d_conv taps (4), not the tokens
            out = torch.addcmul(out, x[:, j:j + T], w[:, j])
        return out if self.conv1d.bias is None else out + self.conv1d.bias


class Block(nn.Module):
    """A residual block: x + Mamba2Mixer(RMSNorm(x)) (section 7.1: the Mamba-2 block stands alone,
    as Mamba's does). residual_in_fp32: the sum, the residual stream, is float32 whatever the
    weights' dtype (bf16 weights: the norm reads it cast to bf16), as the reference."""

    def __init__(self, cfg):
        super().__init__()
        self.residual_in_fp32 = cfg.residual_in_fp32
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mixer = Mamba2Mixer(cfg)

    def forward(self, x, state=None, parallel=True):
        h = self.mixer(self.norm(x.to(self.norm.weight.dtype)), state, parallel)
        return (x.float() if self.residual_in_fp32 else x) + h


class Mamba2(nn.Module):
    """The language model: the embedding, n_layer Blocks, a final RMSNorm and the head, tied to the
    embedding."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.backbone = nn.ModuleDict(dict(  # the Hugging Face names
            embeddings=nn.Embedding(cfg.padded_vocab_size, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout),
            layers=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
            norm_f=RMSNorm(cfg.n_embd, cfg.norm_eps),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.padded_vocab_size, bias=False)
        self.lm_head.weight = self.backbone.embeddings.weight  # tied, as in every released Mamba-2
        self.grad_checkpoint = False  # keep only each block's input, recompute the rest in backward
        # Initialisation as the reference (mamba_ssm's Mamba2 and MambaLMHeadModel): the embedding
        # normal with std 0.02; the linear and conv layers PyTorch's default (Kaiming-uniform) with
        # zero biases, out_proj then scaled by 1/sqrt(n_layer) (GPT-2's rule for what writes into
        # the residual stream); A uniform in [1, 16] per head; Delta's bias softplus^-1(dt) for dt
        # log-uniform in [dt_min, dt_max]; D = 1.
        nn.init.normal_(self.backbone.embeddings.weight, std=0.02)
        for block in self.backbone.layers:
            m = block.mixer
            for lin in (m.in_proj, m.out_proj):
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
            with torch.no_grad():
                m.out_proj.weight /= math.sqrt(cfg.n_layer)
                m.A_log.copy_(torch.log(torch.empty(cfg.n_head).uniform_(1.0, 16.0)))
                log_dt = torch.rand(cfg.n_head) * (math.log(cfg.dt_max) - math.log(cfg.dt_min))
                dt = torch.exp(log_dt + math.log(cfg.dt_min)).clamp(min=cfg.dt_init_floor)
                m.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def optimizer_groups(self):
        """Each parameter's optimizer group, by name (--optimizer muon: Muon takes "muon"; AdamW the
        rest): the mixers' in_proj and out_proj matrices "muon"; the embedding (the tied head) and
        the convolution's (conv_dim, 1, d_conv) kernels "decay"; the biases, the norms' gains and
        the SSM's own per-head A_log, D and dt_bias "no_decay"."""
        kinds = {"in_proj.weight": "muon", "out_proj.weight": "muon", "conv1d.weight": "decay",
                 "embeddings.weight": "decay", "lm_head.weight": "decay"}  # the head, once untied
        return {name: kinds.get(".".join(name.split(".")[-2:]), "no_decay")
                for name, _ in self.named_parameters()}

    def num_params(self, non_embedding=True):
        """Parameters a token computes with: a tied embedding/head counted once (Mamba-2's embedding
        is tied: it always counts)."""
        return sum(p.numel() for p in self.parameters())

    def state_bytes(self, itemsize=4):
        """Bytes of the inference cache for one sequence, whatever its length: per layer the
        convolution's last d_conv - 1 inputs of x, B and C (itemsize bytes each) and the SSM state H
        x P x N = d_inner x N (float32)."""
        cfg = self.config
        per_layer = (cfg.d_conv - 1) * cfg.conv_dim * itemsize + cfg.d_inner * cfg.d_state * 4
        return cfg.n_layer * per_layer

    def hidden(self, idx, states=None, parallel=True):
        """idx (B, T) token ids, following the tokens that `states` (one Mamba2State per layer) have
        seen, if given -> final hidden states (B, T, n_embd)."""
        x = self.backbone.drop(self.backbone.embeddings(idx))  # (B, T, n_embd); no positions
        for i, block in enumerate(self.backbone.layers):
            if self.grad_checkpoint and self.training and states is None:
                # activation checkpointing: keep each block's input, recompute its activations in
                # backward
                x = torch.utils.checkpoint.checkpoint(block, x, None, parallel, use_reentrant=False)
            else:
                x = block(x, None if states is None else states[i], parallel)
        return self.backbone.norm_f(x.to(self.backbone.norm_f.weight.dtype))

    def forward(self, idx, targets=None, states=None, parallel=True):
        """idx (B, T) token ids -> logits (B, T, vocab_size), loss or None. states: continue from a
        cache."""
        V, Vp = self.config.vocab_size, self.config.padded_vocab_size
        pad = None
        if Vp > V:  # the padding rows are no tokens: a bias of -inf gives them probability 0
            pad = torch.zeros(Vp, device=idx.device, dtype=self.lm_head.weight.dtype)
            pad[V:] = float("-inf")
        x = self.hidden(idx, states, parallel)
        logits = F.linear(x, self.lm_head.weight, pad)          # (B, T, padded_vocab_size)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
        return logits[..., :V], loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, use_cache=True,
                 on_logits=None):
        """Append max_new_tokens sampled tokens to idx (B, T); temperature 0 is greedy.

        With the cache the prompt goes through the chunked SSD once, leaving each layer's state;
        every new token is then one recurrent step, the same time and memory at any context length.
        There is no block_size window: the model has no positions, and the state carries the whole
        text. Without the cache every step runs the whole text again (same tokens, quadratic
        time)."""
        states = [Mamba2State() for _ in self.backbone.layers] if use_cache else None
        new = idx
        for _ in range(max_new_tokens):
            x = self.hidden(new if use_cache else idx, states)
            logits = self.lm_head(x[:, -1])[:, :self.config.vocab_size]  # the last position's
            new = sample_next(logits.float(), temperature, top_k, top_p, on_logits)
            idx = torch.cat([idx, new], dim=1)
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


# ------------------------------------------- the same, fast: the chunked SSD (section 6, Listing 1)

def ssd_chunked(x, dt, A, B, C, D, chunk_size, h0=None):
    """ssd_loop's map (the same arguments, the same y and last state) by the chunked algorithm of
    section 6 (Listing 1), for training and prompts. It cuts the T steps into chunks of Q =
    chunk_size (the last one padded with steps of a = 0 and Delta x = 0, which leave the state as it
    is); inside a chunk, the same masked matrix as ssd_quadratic (the diagonal blocks); between
    chunks, only the (P x N) state per head (the off-diagonal blocks, low rank). Matrix products
    everywhere, at O(T Q) cost. In float32, but for the chunks' matrix products, which autocast may
    run in bf16."""
    dtype, (b, T, H, P), (G, N) = x.dtype, x.shape, B.shape[2:]
    R, Q = H // G, min(chunk_size, T)                            # heads per group, steps per chunk
    x, dt, B, C = x.float(), dt.float(), B.float(), C.float()
    h0 = x.new_zeros(b, H, P, N) if h0 is None else h0
    pad = -T % Q
    c = (T + pad) // Q                                           # chunks
    xd = (x * dt[..., None]).view(b, T, G, R, P)                 # Delta x, the heads grouped
    a = (dt * A).view(b, T, G, R)                                # the per-step log decays Delta A
    xd, a, Bc, Cc = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)).unflatten(1, (c, Q))
                     for t in (xd, a, B, C))                     # (b, c, Q, ...)
    a = a.permute(0, 3, 4, 1, 2)                                 # (b, G, R, c, Q)
    L = torch.exp(segsum(a))                                     # (b, G, R, c, Q, Q): decay s -> l
    # 1. the diagonal blocks, inside each chunk: y_l = sum_{s <= l} (C_l . B_s) exp(a_{s+1} + ... +
    # a_l) Delta_s x_s, ssd_quadratic's masked attention; C . B once per group of heads
    CB = torch.einsum("bclgn,bcsgn->bgcls", Cc, Bc)              # (b, G, c, Q, Q)
    y = torch.einsum("bgrcls,bcsgrp->bclgrp", L * CB[:, :, None], xd)
    # 2. each chunk's state at its end from its own inputs: sum_s exp(a_{s+1} + ... + a_{Q-1})
    # Delta_s x_s B_s^T, the decays being L's last row (the off-diagonal blocks' right factors)
    to_end = L[..., -1, :].permute(0, 3, 4, 1, 2)[..., None]     # (b, c, Q, G, R, 1)
    states = torch.einsum("bcsgn,bcsgrp->bcgrpn", Bc, xd * to_end)
    # 3. the recurrence across chunks: the state entering each chunk, from h0 and the chunks before
    # it, each decayed by the chunk sums in between (segsum again, over the c + 1 chunk totals): a
    # (c+1) x (c+1) product, in float32
    with torch.autocast(xd.device.type, enabled=False):
        decay = torch.exp(segsum(F.pad(a.sum(-1), (1, 0))))    # (b, G, R, c + 1, c + 1)
        states = torch.cat([h0.reshape(b, 1, G, R, P, N), states.float()], 1)  # (b, c + 1, ...)
        states = torch.einsum("bgrzc,bcgrpn->bzgrpn", decay, states)
    # 4. the state entering a chunk to its outputs: y_l += exp(a_0 + ... + a_l) C_l . h (the left
    # factors), the decay exp(a_1 + ... + a_l) being L's first column (no cumsum of its own:
    # Inductor's split scan fails on it, CUDA)
    into = (L[..., 0] * torch.exp(a[..., :1])).permute(0, 3, 4, 1, 2)  # (b, c, Q, G, R)
    y = y + torch.einsum("bclgn,bcgrpn->bclgrp", Cc, states[:, :-1]) * into[..., None]
    y = y.flatten(1, 2)[:, :T].reshape(b, T, H, P)
    # the last state in its own storage, not a view keeping every chunk's state alive in decoding
    return (y + D[:, None] * x).to(dtype), states[:, -1].flatten(1, 2).clone()  # + D x: the skip


# ------------------------------------------------------- borrowed: RMSNorm (llama2.py teaches it)

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
def from_pretrained(name_or_path, device="cpu", dtype=torch.float32, dropout=0.0):
    """A Mamba-2 from a Hugging Face checkpoint: a hub id (the converted ones, "AntonV/mamba2-130m-hf" ... "-2.7b-hf")
    or a local directory with config.json and model.safetensors (or shards + model.safetensors.index.json), as
    `Mamba2ForCausalLM.save_pretrained` writes it. Weights are converted to `dtype` on the way in. Returns the model
    in eval mode. A key config.json leaves out takes Mamba2Config's default."""
    path, hf, tensors = read_checkpoint(name_or_path)
    if hf.get("model_type") != "mamba2":
        raise InputError(f"{path} holds a '{hf.get('model_type')}' model, not Mamba-2")
    for key, allowed in dict(hidden_act="silu", rms_norm=True, norm_before_gate=False).items():
        if hf.get(key, allowed) != allowed:  # a variant this file does not implement must not load as Mamba-2
            raise InputError(f"{path}: {key} = {hf[key]} is a Mamba-2 variant this file does not implement")
    n_embd, expand, headdim = hf["hidden_size"], hf.get("expand", 2), hf.get("head_dim", 64)
    if hf["num_heads"] * headdim != expand * n_embd:
        raise InputError(f"{path}: num_heads {hf['num_heads']} x head_dim {headdim} is not expand x hidden_size")
    head, embedding = tensors.pop("lm_head.weight", None), tensors.get("backbone.embeddings.weight")
    tied = head is not None and embedding is not None and torch.equal(head, embedding)
    if not hf.get("tie_word_embeddings", False) and not tied:
        raise InputError(f"{path}: tie_word_embeddings = False with a head of its own: an untied Mamba-2, which this "
                         "file does not implement")
    try:  # [0.0, Infinity]; transformers 5 writes the infinity as {"__float__": "Infinity"}
        limit = [float(v["__float__"] if isinstance(v, dict) else v)
                 for v in hf.get("time_step_limit", (0.0, math.inf))]
    except (TypeError, KeyError, ValueError):
        raise InputError(f"{path}: time_step_limit {hf['time_step_limit']} is not two numbers") from None
    cfg = Config(vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], n_embd=n_embd,
                 d_state=hf.get("state_size", 128), expand=expand, headdim=headdim, ngroups=hf.get("n_groups", 8),
                 d_conv=hf.get("conv_kernel", 4), chunk_size=hf.get("chunk_size", 256),
                 conv_bias=hf.get("use_conv_bias", True), bias=hf.get("use_bias", False),
                 norm_eps=hf.get("layer_norm_epsilon", 1e-5), dt_min=hf.get("time_step_min", 0.001),
                 dt_max=hf.get("time_step_max", 0.1), dt_init_floor=hf.get("time_step_floor", 1e-4),
                 dt_limit_min=limit[0], dt_limit_max=limit[1], dropout=dropout,
                 residual_in_fp32=hf.get("residual_in_fp32", True))
    state = {}
    for name, t in tensors.items():
        name = name.replace("backbone.embedding.", "backbone.embeddings.")  # the original repos' name
        if name == "backbone.embeddings.weight":  # pad the vocabulary rows with zeros (they are masked anyway)
            state["lm_head.weight"] = t = F.pad(t, (0, 0, 0, cfg.padded_vocab_size - t.size(0)))
        state[name] = t
    with torch.device("meta"):
        model = Mamba2(cfg)  # shapes only: the weights come from the file, no time is spent on a random init
    load_weights(model, state, path, device, dtype)
    model.lm_head.weight = model.backbone.embeddings.weight  # assign=True replaced both: tie them again
    return model.eval()


def save_pretrained(model, path):
    """model in the Hugging Face Mamba-2 layout in the directory path (config.json and model.safetensors), so that
    transformers' Mamba2ForCausalLM (and from_pretrained here) loads it with the same logits."""
    cfg, path = model.config, Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(dict(
        model_type="mamba2", architectures=["Mamba2ForCausalLM"], vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd,
        num_hidden_layers=cfg.n_layer, state_size=cfg.d_state, expand=cfg.expand, num_heads=cfg.n_head,
        head_dim=cfg.headdim, n_groups=cfg.ngroups, conv_kernel=cfg.d_conv, chunk_size=cfg.chunk_size,
        use_conv_bias=cfg.conv_bias, use_bias=cfg.bias, layer_norm_epsilon=cfg.norm_eps, time_step_min=cfg.dt_min,
        time_step_max=cfg.dt_max, time_step_floor=cfg.dt_init_floor, time_step_limit=[cfg.dt_limit_min,
        cfg.dt_limit_max], hidden_act="silu", residual_in_fp32=cfg.residual_in_fp32, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=None, pad_token_id=None), indent=2))
    state = {k: t[:cfg.vocab_size] if k == "backbone.embeddings.weight" else t
             for k, t in model.state_dict().items() if k != "lm_head.weight"}  # tied to the embedding
    write_safetensors(state, path / "model.safetensors")


# --------------------------------------------------------------------------------- Mamba-2 on the command line
# What the shared harness below asks of this model: its presets and flags, how to build it, what a token costs,
# the schedule, the data and what to show at the end.

# Defaults sized as mamba.py's, so that a bare run takes a few minutes: tiny on a CPU (where the 50K-token output
# layer costs more than the whole model), small on a GPU, both with Mamba-2's larger states (d_state 32 on a CPU, 64
# on a GPU, where Mamba uses 16: the SSD's matrix products make N cheap) and heads of 32 or 64 channels.
PRESETS = {
    "cpu": dict(n_layer=4, n_embd=128, d_state=32, headdim=32, block_size=64, batch_size=8, max_iters=200,
                eval_interval=100, eval_iters=10, log_interval=25, lr=3e-3, min_lr=3e-4, warmup_iters=20, dropout=0.0,
                patience=0),
    "cuda": dict(n_layer=12, n_embd=384, d_state=64, headdim=64, block_size=256, batch_size=32, max_iters=400,
                 eval_interval=50, eval_iters=50, log_interval=25, lr=1e-3, min_lr=1e-4, warmup_iters=40, dropout=0.2,
                 patience=3),
}


def add_model_flags(p):
    p.add_argument("--n_layer", type=int)
    p.add_argument("--n_head", type=int, help="SSD heads: headdim = expand x n_embd / n_head (instead of --headdim)")
    p.add_argument("--n_embd", type=int)
    p.add_argument("--d_state", type=int, help="N: the SSM state per channel")
    p.add_argument("--headdim", type=int, help="P: channels per SSD head")
    p.add_argument("--ngroups", type=int, default=1, help="groups of B and C, each shared by n_head / ngroups heads")
    p.add_argument("--expand", type=int, default=2, help="d_inner = expand x n_embd")
    p.add_argument("--d_conv", type=int, default=4, help="width of the causal depthwise convolution")
    p.add_argument("--chunk_size", type=int, default=256, help="Q: steps per chunk of the SSD algorithm")
    p.add_argument("--dropout", type=float, help="on the embedding and the residual branches")
    p.add_argument("--grad_checkpoint", action="store_true",
                   help="recompute each block's activations in backward: less memory, one more forward")


def build_model(args, given, ckpt, env):
    """(model, tokenizer, note) for --init_from: our checkpoint's model (resume; the harness loads its weights), a
    Hugging Face Mamba-2 with its own tokenizer, or a fresh one of the flags' size (--n_head sets --headdim; with a
    loaded model it must be the model's own)."""
    if args.n_head is not None and ckpt is None and args.init_from == "scratch":
        d_inner = args.expand * args.n_embd
        if args.n_head <= 0:
            raise InputError(f"n_head must be positive, got {args.n_head}")
        if d_inner % args.n_head:
            raise InputError(f"expand x n_embd = {d_inner} must be a multiple of n_head {args.n_head} (the SSD heads)")
        if "headdim" in given and args.headdim * args.n_head != d_inner:
            raise InputError(f"--n_head {args.n_head} and --headdim {args.headdim}: n_head x headdim must be {d_inner}")
        args.headdim = d_inner // args.n_head
    if ckpt is not None:
        model, tokenizer = Mamba2(Config(**{**ckpt["config"], "dropout": args.dropout})), load_tokenizer(ckpt["tokenizer"])
    elif args.init_from != "scratch":  # sampling keeps the checkpoint's dtype (load_dtype), training loads fp32
        tokenizer = pretrained_tokenizer(checkpoint_dir(args.init_from, weights=False), args.sample_only)
        model = from_pretrained(args.init_from, env.device, load_dtype(args, env), args.dropout)
    else:
        tokenizer = load_tokenizer(args.tokenizer)
        model = Mamba2(Config(vocab_size=tokenizer.vocab_size, block_size=args.block_size, n_layer=args.n_layer,
                              n_embd=args.n_embd, d_state=args.d_state, expand=args.expand, headdim=args.headdim,
                              ngroups=args.ngroups, d_conv=args.d_conv, chunk_size=args.chunk_size,
                              dropout=args.dropout))
    model.grad_checkpoint = args.grad_checkpoint
    cfg = model.config
    if args.n_head is not None and args.n_head != cfg.n_head:  # n_head is no Config field: the harness cannot see it
        raise InputError(f"--n_head {args.n_head} does not match the model from --init_from {args.init_from}, which has "
                         f"n_head {cfg.n_head}")
    return model, tokenizer, (f" | d_inner {cfg.d_inner}, {cfg.n_head} heads x {cfg.headdim}, d_state {cfg.d_state}, "
                              f"ngroups {cfg.ngroups}, chunk {cfg.chunk_size}")


def flops_per_token(model, T):
    """Training FLOPs per token, for MFU: 6 per parameter (PaLM, appendix B), plus the SSD's own matrix products, 6 per
    multiply-add (forward and backward) of each layer's Q (G N + d_inner) (C B^T and its product with Delta x inside
    a chunk of Q = min(chunk_size, T) steps) and 2 d_inner N (the chunk states, and the states to the outputs)."""
    cfg = model.config
    Q = min(cfg.chunk_size, T)
    ssd_macs = Q * (cfg.ngroups * cfg.d_state + cfg.d_inner) + 2 * cfg.d_inner * cfg.d_state
    return 6 * model.num_params() + 6 * cfg.n_layer * ssd_macs


def schedule(it, args):  # (learning rate, weight decay) of step it: warmup and cosine, a constant weight decay
    return lr_at(it, args), args.weight_decay


def batches(args, tokenizer, env):  # batch(split) -> (x, y): Mamba-2 learns from --data's text
    return text_batches(args, tokenizer, env)


def show_sample(model, tokenizer, args, env, title):
    """What a run shows at its end (or with --sample_only): the recurrent state a sequence costs, then a sample."""
    cfg, itemsize = model.config, (env.dtype if env.dtype != torch.float32 else model.lm_head.weight.dtype).itemsize
    print(f"recurrent state: {model.state_bytes(itemsize):,} bytes per sequence at any length ({cfg.n_layer} layers x "
          f"({cfg.d_conv - 1} conv inputs x {cfg.conv_dim} channels x {itemsize} bytes + {cfg.n_head} heads x "
          f"{cfg.headdim} x {cfg.d_state} SSM states x 4 bytes))")
    sample(model, tokenizer, args, env.ctx, title)


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
