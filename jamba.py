"""Jamba in one file: the hybrid Transformer-Mamba mixture of experts, its pretrained weights, data, training, sampling.

Paper: Lieber et al. 2024, "Jamba: A Hybrid Transformer-Mamba Language Model", arXiv 2403.19887.
A Jamba is a stack of layers, each a sequence mixer and a feed-forward part in pre-RMSNorm residual blocks
(section 2, Figure 1):

    x = x + Mixer(RMSNorm(x))        Mixer: attention in one layer of every attn_layer_period, Mamba in the others
    x = x + FFN(RMSNorm(x))          FFN: a mixture of experts in one layer of every expert_layer_period, else an MLP

The released model has one attention layer in eight (a:m = 1:7, at offset 4) and 16 experts, top 2, in every
other layer (section 3). The attention is grouped-query with no positional encoding at all: the Mamba layers
carry the order of the tokens (section 6, "Jamba does not require explicit positional information"). The Mamba
layer is Mamba-1 (Gu and Dao 2023, arXiv 2312.00752: mamba.py's Mixer; its selective scan is the same text)
with the RMSNorms Jamba adds on Delta's input, B and C for stability at scale (section 6, "Stabilizing Mamba
at large scale"). The mixture of experts is mixtral.py's (the same dropless dispatch, SwiGLU experts and
load-balancing loss) with Jamba's router weights: the top k of a softmax over all the experts, not
renormalised. Decoding keeps a hybrid cache: keys and values for the attention layers, the convolution's last
inputs and the SSM state for the Mamba layers, whose size does not grow with the text: the paper's point
(Table 1: a 256K-token cache of 4 GB where Mixtral's is 32 GB). The start of every sample prints it.

The model section reads in that order: Jamba's own code first (attention without positions, JambaMixer with
its norms, jamba_route, Block with the layer pattern, the model), then what it borrows under headings that
name the files teaching it: mamba.py's selective scan, then mixtral.py's experts (JambaMoE right after SparseMoE,
then the dispatch). RMSNorm, the KV cache, `attention` and the SwiGLU are llama2.py's, among Jamba's
own code.

What is here: the model; sampling with the hybrid cache; loading `JambaForCausalLM` checkpoints in the Hugging
Face layout (ai21labs/Jamba-tiny-dev, ai21labs/AI21-Jamba-Mini-1.5, Jamba-v0.1, or anything `save_pretrained`
writes; one matrix per expert, as the hub stores them, or stacked; one file or shards) with a safetensors
reader of its own; training on tiny-shakespeare, FineWeb or any text file with AdamW or Muon, warmup + cosine,
gradient accumulation, bf16 autocast, torch.compile and DistributedDataParallel; exact resume from atomic
checkpoints. What is not: the fused CUDA kernels of the Mamba reference (the scan is plain PyTorch, see
mamba.py). A released checkpoint's SentencePiece-style tokenizer.json runs when it has the layout hf_tokenizer
knows (BPE with byte fallback); otherwise it samples as token ids (--sample_only) and is not trained on text.

    python jamba.py                                     # CPU: a tiny model, about three minutes
    python jamba.py --device cuda                       # one GPU: bf16, torch.compile, 8 layers x 384
    torchrun --standalone --nproc_per_node 8 jamba.py   # DDP on 8 GPUs
    python jamba.py --init_from ai21labs/Jamba-tiny-dev --sample_only --temperature 0   # greedy
    python jamba.py --init_from resume --sample_only --show_routing --show_top 3   # each token's experts

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
    vocab_size: int = 65536              # vocab_size: real tokens; the embedding is padded to a multiple of 64
    block_size: int = 262144             # max_position_embeddings: no positions anywhere, so only the training
                                         # context; decoding goes on past it with the same cache
    n_layer: int = 32                    # num_hidden_layers
    n_head: int = 32                     # num_attention_heads (query heads)
    n_kv_head: int = 8                   # num_key_value_heads: n_head is MHA, 1 is MQA, in between GQA
    n_embd: int = 4096                   # hidden_size
    intermediate_size: int = 14336       # intermediate_size: the MLP's and each expert's SwiGLU width (0: 8/3 n_embd
                                         # rounded up to 64)
    n_expert: int = 16                   # num_experts (1: no MoE layer at all, as the reference)
    top_k_experts: int = 2               # num_experts_per_tok
    attn_layer_period: int = 8           # attn_layer_period: layer i attends when i % period == offset, else Mamba
    attn_layer_offset: int = 4           # attn_layer_offset
    expert_layer_period: int = 2         # expert_layer_period: layer i's FFN is the MoE when i % period == offset
    expert_layer_offset: int = 1         # expert_layer_offset
    d_state: int = 16                    # mamba_d_state (Mamba's N)
    d_conv: int = 4                      # mamba_d_conv: width of the causal depthwise convolution
    expand: int = 2                      # mamba_expand: d_inner = expand * n_embd
    dt_rank: int = 0                     # mamba_dt_rank: Delta's low-rank projection (0: "auto", ceil(n_embd / 16))
    conv_bias: bool = True               # mamba_conv_bias
    bias: bool = False                   # mamba_proj_bias: biases in the Mamba layers' in_proj and out_proj
    norm_eps: float = 1e-6               # rms_norm_eps: every RMSNorm, the three inside the Mamba layers too
    tie_embeddings: bool = False         # tie_word_embeddings
    bos_token_id: int | None = None      # bos_token_id: put before the prompt when sampling (a checkpoint's own)
    dt_min: float = 0.001                # initialisation only (mamba.py): Delta log-uniform in [dt_min, dt_max]
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    # the run's settings, not the model's (RUN_TIME: a fine-tune's flags override a checkpoint's)
    dropout: float = 0.0                 # attention_dropout; also on the residual branches here (Jamba uses none)
    router_noise: float = 0.0            # training only (no HF field; Jamba's reference has no jitter): mixtral.py's
                                         # router jitter, router input x U(1 - eps, 1 + eps)
    capacity_factor: float = 0.0         # training only (no HF counterpart): 0 is dropless, > 0 caps each expert
    aux_loss_coef: float = 0.001         # router_aux_loss_coef: the load-balancing loss's weight
    z_loss_coef: float = 0.0             # training only: the router z-loss's weight (Jamba's reference has none)

    def __post_init__(self):
        check_types(self)
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd", "n_expert", "d_state",
                     "d_conv", "expand", "attn_layer_period", "expert_layer_period"):
            if getattr(self, name) <= 0:
                raise InputError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise InputError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if self.n_head % self.n_kv_head:
            raise InputError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        for kind in ("attn", "expert"):
            if not 0 <= getattr(self, f"{kind}_layer_offset") < getattr(self, f"{kind}_layer_period"):
                raise InputError(f"{kind}_layer_offset must be in [0, {kind}_layer_period), got "
                                 f"{getattr(self, f'{kind}_layer_offset')} and {getattr(self, f'{kind}_layer_period')}")
        if not 1 <= self.top_k_experts <= self.n_expert:
            raise InputError(f"top_k_experts must be in [1, n_expert = {self.n_expert}], got {self.top_k_experts}")
        if min(self.dt_rank, self.intermediate_size, self.capacity_factor, self.aux_loss_coef, self.z_loss_coef) < 0:
            raise InputError("dt_rank, intermediate_size, capacity_factor, aux_loss_coef and z_loss_coef must not be "
                             "negative")
        self.dt_rank = self.dt_rank or math.ceil(self.n_embd / 16)
        self.intermediate_size = self.intermediate_size or -(-8 * self.n_embd // 3 // 64) * 64
        if not 0.0 < self.dt_min <= self.dt_max:
            raise InputError(f"need 0 < dt_min <= dt_max, got {self.dt_min} and {self.dt_max}")
        if not 0.0 <= self.dropout < 1.0:
            raise InputError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.router_noise < 1.0:
            raise InputError(f"router_noise must be in [0, 1), got {self.router_noise}")

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    @property
    def d_inner(self):
        return self.expand * self.n_embd

    @property
    def padded_vocab_size(self):  # 50257 -> 50304: matmul shapes that tile well on GPUs (65536 stays)
        return -(-self.vocab_size // 64) * 64

    def is_attention(self, i):  # layer i's mixer: attention or Mamba (the reference's layers_block_type)
        return i % self.attn_layer_period == self.attn_layer_offset

    def is_moe(self, i):  # layer i's feed-forward part: the MoE or the MLP (the reference's layers_num_experts)
        return self.n_expert > 1 and i % self.expert_layer_period == self.expert_layer_offset


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


class KVCache:
    """The keys and values of one layer for the tokens so far: (B, n_kv_head, length, head_dim)
    buffers, filled from position 0 on. Only the n_kv_head key/value heads are stored: with
    grouped-query attention (n_kv_head < n_head) a cache n_head / n_kv_head times smaller than
    multi-head attention's (GPT-2: n_kv_head = n_head)."""

    def __init__(self, length):
        self.length, self.k, self.v = length, None, None

    def update(self, k, v, pos):
        """Write k, v (B, n_kv_head, T, head_dim) at positions pos..pos+T-1; return all so far."""
        if self.k is None:
            B, H, _, D = k.shape
            self.k = k.new_zeros(B, H, self.length, D)
            self.v = v.new_zeros(B, H, self.length, D)
        T = k.size(2)
        self.k[:, :, pos:pos + T], self.v[:, :, pos:pos + T] = k, v
        return self.k[:, :, :pos + T], self.v[:, :, :pos + T]


def attention(q, k, v, pos=0, dropout=0.0):
    """The same, fast: torch's fused scaled_dot_product_attention (flash attention on CUDA),
    which keeps no (T, S) scores for backward. Where k and v have fewer heads than q
    (grouped-query attention, llama2.py), each of theirs serves a consecutive group of q's
    heads (enable_gqa), read in place."""
    T = q.size(-2)
    # From pos 0 the usual causal mask (is_causal); one new token sees the whole cache, no mask;
    # a chunk after a cache needs the mask shifted by pos (is_causal aligns it top-left).
    mask = None
    if pos > 0 and T > 1:
        mask = torch.ones(T, pos + T, dtype=torch.bool, device=q.device).tril(pos)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=pos == 0,
                                          dropout_p=dropout, enable_gqa=k.size(1) != q.size(1))


class Attention(nn.Module):
    """Grouped-query attention (Ainslie et al. 2023) without any positional encoding: no rotary, no
    position table. Jamba's attention layers sit after Mamba layers, whose recurrence already
    tells tokens apart by their place, and the paper found explicit positions add nothing (section
    6, "Jamba does not require explicit positional information"); the cache can then grow past
    block_size with nothing to re-encode. One scaled_dot_product_attention call for all heads."""

    def __init__(self, cfg):
        super().__init__()
        H, K, hd, d = cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.n_embd
        self.n_head, self.n_kv_head, self.head_dim, self.dropout = H, K, hd, cfg.dropout
        self.q_proj = nn.Linear(d, H * hd, bias=False)
        self.k_proj = nn.Linear(d, K * hd, bias=False)
        self.v_proj = nn.Linear(d, K * hd, bias=False)
        self.o_proj = nn.Linear(H * hd, d, bias=False)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, cache=None, pos=0):
        B, T, _ = x.shape
        H, K, hd = self.n_head, self.n_kv_head, self.head_dim
        q = self.q_proj(x).view(B, T, H, hd).transpose(1, 2)  # (B, n_head, T, hd)
        k = self.k_proj(x).view(B, T, K, hd).transpose(1, 2)  # (B, n_kv_head, T, hd)
        v = self.v_proj(x).view(B, T, K, hd).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, pos)
        y = attention(q, k, v, pos, self.dropout if self.training else 0.0)  # (B, H, T, hd)
        return self.resid_dropout(self.o_proj(y.transpose(1, 2).reshape(B, T, -1)))


class JambaMixer(nn.Module):
    """The Mamba layer: mamba.py's Mixer (Mamba's Figure 3, Algorithm 2: in_proj to x and the gate
    z, a causal depthwise conv1d and SiLU, x_proj to (Delta's low-rank input, B, C), dt_proj and
    softplus to Delta, the selective scan, y * SiLU(z), out_proj), with Jamba's three RMSNorms on
    Delta's low-rank input, B and C (section 6: without them large Mamba layers' activations grew
    and the loss spiked). The scan is mamba.py's, below. The Hugging Face names (JambaMambaMixer),
    so checkpoints load as they are."""

    def __init__(self, cfg):
        super().__init__()
        E, N, R = cfg.d_inner, cfg.d_state, cfg.dt_rank
        self.d_state, self.dt_rank = N, R
        self.in_proj = nn.Linear(cfg.n_embd, 2 * E, bias=cfg.bias)
        # depthwise, no padding: the state is the past
        self.conv1d = nn.Conv1d(E, E, cfg.d_conv, groups=E, bias=cfg.conv_bias)
        self.x_proj = nn.Linear(E, R + 2 * N, bias=False)
        self.dt_layernorm = RMSNorm(R, cfg.norm_eps)  # Jamba's addition
        self.b_layernorm = RMSNorm(N, cfg.norm_eps)
        self.c_layernorm = RMSNorm(N, cfg.norm_eps)
        self.dt_proj = nn.Linear(R, E, bias=True)
        # S4D-Real (Mamba, section 3.6): A = -(1, 2, ..., N) in every channel, kept as log(-A) so
        # that A stays < 0; not decayed (optimizer_groups), as the reference: decay would pull every
        # A to -1
        A = torch.arange(1, N + 1, dtype=torch.float32).repeat(E, 1)  # (E, N): -A
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(E))
        self.out_proj = nn.Linear(E, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, u, state=None, parallel=True):
        """u (B, T, n_embd) -> (B, T, n_embd); state (a MambaState) is read and then advanced to the
        last token. parallel: the chunked scan; False: the reference, the loop over t as written."""
        x, z = self.in_proj(u).chunk(2, dim=-1)                  # (B, T, d_inner) each
        step = state is not None and state.conv is not None and u.size(1) == 1  # decoding one token
        x = F.silu(self.conv_step(x, state) if step else self.conv(x, state))
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        # Jamba (section 6): an RMSNorm on each of Delta's low-rank input, B and C
        dt, B, C = self.dt_layernorm(dt), self.b_layernorm(B), self.c_layernorm(C)
        # Delta (B, T, d_inner) > 0, its bias added in float32 as in the reference's kernel
        delta = F.softplus(F.linear(dt, self.dt_proj.weight).float() + self.dt_proj.bias.float())
        A = -torch.exp(self.A_log.float())                         # (d_inner, N), < 0
        how = "step" if step else "scan" if parallel else "loop"
        h0 = None if state is None else state.ssm
        y, h = selective_scan(x, delta, A, B, C, self.D.float(), h0, how)
        if state is not None:
            state.ssm = h
        return self.dropout(self.out_proj(y * F.silu(z)))

    def conv(self, x, state):
        """The causal depthwise convolution over x (B, T, d_inner), after the cached inputs (zeros
        before a text)."""
        k = self.conv1d.kernel_size[0]
        fresh = state is None or state.conv is None
        past = x.new_zeros(x.size(0), k - 1, x.size(2)) if fresh else state.conv
        x = torch.cat([past.to(x.dtype), x], dim=1)                # (B, k - 1 + T, d_inner)
        if state is not None:
            state.conv = x[:, x.size(1) - (k - 1):].clone()  # its own storage: conv_step updates it
        # channels first for conv1d
        x = F.conv1d(x.transpose(1, 2), self.conv1d.weight, self.conv1d.bias, groups=x.size(2))
        return x.transpose(1, 2)

    def conv_step(self, x, state):
        """The convolution at one new token x (B, 1, d_inner): a dot product of the kernel with the
        cached d_conv - 1 inputs and x, no conv1d call; the cache shifts by one in place."""
        window = torch.cat([state.conv, x.to(state.conv.dtype)], 1)  # (B, d_conv, d_inner), by age
        state.conv.copy_(window[:, 1:])
        out = (window * self.conv1d.weight[:, 0].t()).sum(1, keepdim=True)  # (B, 1, d_inner)
        return out if self.conv1d.bias is None else out + self.conv1d.bias


def jamba_route(logits, k):
    """Jamba's router: (weights, experts), each (N, k), from the router's logits x W_g (N, E). The
    weights are the k largest of p = softmax(x W_g) over all E experts, p_i as they are, not
    renormalised: they sum to less than 1 (the reference code, transformers' JambaTopKRouter; the
    paper gives no formula). Mixtral's route (SparseMoE.route, below) chooses the same k experts,
    the softmax keeping the logits' order, but renormalises their weights over the k chosen,
    softmax(TopK(x W_g)), which sum to 1."""
    return logits.softmax(dim=-1).topk(k, dim=-1)  # (N, k) each: probabilities and experts


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
    """One Jamba layer (section 2, Figure 1): x + Mixer(RMSNorm(x)), then x + FFN(RMSNorm(x)), the
    mixer attention or Mamba, the FFN the MoE or a SwiGLU MLP, as the layer pattern puts layer i
    (Config.is_attention, Config.is_moe: in the released model attention in one layer of 8, a:m =
    1:7, and the MoE in every other layer, e = 2; section 3). The Hugging Face names."""

    def __init__(self, cfg, i):
        super().__init__()
        self.attends, self.routes = cfg.is_attention(i), cfg.is_moe(i)  # the layer pattern
        self.input_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        if self.attends:
            self.self_attn = Attention(cfg)
        else:
            self.mamba = JambaMixer(cfg)
        self.pre_ff_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        if self.routes:
            self.feed_forward = JambaMoE(cfg)  # mixtral.py's experts, jamba_route's weights
        else:
            self.feed_forward = FeedForward(cfg.n_embd, cfg.intermediate_size, cfg.dropout)

    def forward(self, x, cache=None, pos=0, parallel=True):
        """x (B, T, n_embd) -> (x, the router's statistics or None); cache: this layer's KVCache or
        MambaState."""
        h = self.input_layernorm(x)
        x = x + (self.self_attn(h, cache, pos) if self.attends else self.mamba(h, cache, parallel))
        h = self.pre_ff_layernorm(x)
        y, stats = self.feed_forward(h) if self.routes else (self.feed_forward(h), None)
        return x + y, stats


class Jamba(nn.Module):
    """The language model (section 2): the token embedding (no positions), n_layer Blocks in the
    layer pattern, a final RMSNorm and the head."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        # the Hugging Face names: model.embed_tokens, model.layers.N, model.final_layernorm
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(cfg.padded_vocab_size, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout),
            layers=nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer)),
            final_layernorm=RMSNorm(cfg.n_embd, cfg.norm_eps),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.padded_vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.moe_layers = [i for i in range(cfg.n_layer) if cfg.is_moe(i)]
        # Initialisation (the paper gives none): matrices normal with std 0.02 (Hugging Face's
        # initializer_range), those that write into the residual stream scaled by 1/sqrt(2 n_layer)
        # as GPT-2 does; the Mamba layers' own as mamba.py (the conv PyTorch's default, A and D as
        # built, Delta's projection for steps in [dt_min, dt_max]).
        own = ("conv1d", "A_log", "dt_proj")
        residual = ("o_proj.weight", "down_proj.weight", "out_proj.weight", "w2")
        for name, p in self.named_parameters():
            if p.dim() >= 2 and not any(s in name for s in own):
                std = 0.02 / math.sqrt(2 * cfg.n_layer) if name.endswith(residual) else 0.02
                nn.init.normal_(p, mean=0.0, std=std)
            elif name.endswith(("in_proj.bias", "out_proj.bias")):
                nn.init.zeros_(p)
        for block in self.model.layers:
            if not block.attends:
                m = block.mamba
                with torch.no_grad():
                    nn.init.uniform_(m.dt_proj.weight, -cfg.dt_rank ** -0.5, cfg.dt_rank ** -0.5)
                    lo, hi = math.log(cfg.dt_min), math.log(cfg.dt_max)
                    dt = torch.exp(torch.rand(cfg.d_inner) * (hi - lo) + lo)  # log-uniform
                    dt = dt.clamp(min=cfg.dt_init_floor)
                    m.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)

    def num_params(self, non_embedding=True, active=False):
        """Parameters a token computes with: a tied embedding/head counted once, lookups (an untied
        input embedding, a position table) left out by default; active=True counts top_k of the
        experts only."""
        cfg = self.config
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and not cfg.tie_embeddings:
            n -= self.model.embed_tokens.weight.numel()
        if active:
            stacked = ("w1", "w2", "w3")
            experts = sum(p.numel() for n, p in self.named_parameters() if n.endswith(stacked))
            n -= experts * (cfg.n_expert - cfg.top_k_experts) // cfg.n_expert
        return n

    def optimizer_groups(self):
        """Each parameter's optimizer group, by name: "muon", the blocks' matrices (attention, the
        Mamba layers' projections, the router, dense SwiGLUs: Muon's under --optimizer muon, else
        AdamW's with decay); "decay", the embedding, the head, the (d_inner, 1, d_conv) convolutions
        and the experts' stacked (E, out, in) weights (AdamW: torch's Muon takes 2-D parameters
        only); "no_decay", the RMSNorm gains, biases, D and A_log (decay would pull every A =
        -exp(A_log) to -1)."""
        groups = {}
        matrices = ("_proj.weight", "gate.weight")  # gate.weight: the router (HF: router.weight)
        for name, _ in self.named_parameters():
            if name.endswith(("norm.weight", "bias", ".D", "A_log")):
                groups[name] = "no_decay"
            elif name.startswith("model.layers.") and name.endswith(matrices):
                groups[name] = "muon"
            else:
                groups[name] = "decay"
        return groups

    def cache_bytes(self, T, itemsize=4):
        """(bytes of this model's decoding cache for one sequence of T tokens, those of an
        all-attention model of the same shape). An attention layer keeps K and V: 2 n_kv_head
        head_dim numbers a token; a Mamba layer keeps the convolution's last d_conv - 1 inputs and
        the SSM state (float32), d_inner x each, at any T (mamba.py)."""
        cfg = self.config
        kv = 2 * cfg.n_kv_head * cfg.head_dim * T * itemsize
        ssm = cfg.d_inner * ((cfg.d_conv - 1) * itemsize + cfg.d_state * 4)
        n_attn = sum(block.attends for block in self.model.layers)
        return n_attn * kv + (cfg.n_layer - n_attn) * ssm, cfg.n_layer * kv

    def new_cache(self, length):
        """The hybrid cache for up to `length` tokens: a KVCache per attention layer, a MambaState
        per Mamba layer."""
        return [KVCache(length) if block.attends else MambaState() for block in self.model.layers]

    def hidden(self, idx, cache=None, pos=0, parallel=True):
        """idx (B, T) token ids at positions pos..pos+T-1, after the pos tokens the cache holds ->
        (final hidden states (B, T, n_embd), the MoE layers' router statistics
        (MoE layers, 3 + n_expert) or None)."""
        x = self.model.drop(self.model.embed_tokens(idx))  # (B, T, n_embd); no positions anywhere
        stats = []
        for i, block in enumerate(self.model.layers):
            x, s = block(x, None if cache is None else cache[i], pos, parallel)
            if s is not None:
                stats.append(s)
        return self.model.final_layernorm(x), torch.stack(stats) if stats else None

    def forward(self, idx, targets=None, cache=None, pos=0, parallel=True):
        """idx (B, T) token ids -> (logits (B, T, vocab_size), loss or None, aux).

        The loss is the next-token cross-entropy; in training, plus the load-balancing loss, each
        MoE layer's own averaged over the layers, weighted by aux_loss_coef (the reference,
        transformers' load_balancing_loss_func, pools f and P over all the layers' tokens before the
        product: the same when the layers' loads agree, not in general), and a z-loss if
        z_loss_coef > 0. aux holds the router's terms for the log, with the expert load of this
        batch (MoE layers, n_expert) for the load report ({} without MoE layers)."""
        cfg, V, Vp = self.config, self.config.vocab_size, self.config.padded_vocab_size
        pad = None
        if Vp > V:  # the padding rows are no tokens: a bias of -inf gives them probability 0
            pad = torch.zeros(Vp, device=idx.device, dtype=self.lm_head.weight.dtype)
            pad[V:] = float("-inf")
        x, router = self.hidden(idx, cache, pos, parallel)
        logits = F.linear(x, self.lm_head.weight, pad)  # (B, T, padded_vocab_size)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
        if router is None:
            return logits[..., :V], loss, {}
        balance, z, dropped = router[:, :3].float().mean(0)  # balance: top_k when the load is even
        aux = dict(balance=balance, load=router[:, 3:].detach().float())
        if cfg.z_loss_coef:
            aux["z_loss"] = z
        # dropped: the share of (token, choice) pairs over their expert's capacity
        if self.training and cfg.capacity_factor:
            aux["dropped"] = dropped
        if self.training and loss is not None:
            loss = loss + cfg.aux_loss_coef * balance + cfg.z_loss_coef * z
        return logits[..., :V], loss, aux

    def load_report(self, load):
        """Print the expert load `load` (MoE layers, n_expert), aux's load summed over an
        evaluation's batches, each MoE layer a row of bars: each expert's share of the routed
        (token, choice) pairs, the even share 1/n_expert drawn half high. Collapse shows as a few
        full bars. Returns it for the metrics."""
        load = (load / load.sum(-1, keepdim=True).clamp_min(1e-9)).tolist()
        E, bars = self.config.n_expert, " ▁▂▃▄▅▆▇█"
        print(f"expert load per MoE layer (even: {100 / E:.1f}% each, drawn ▄; "
              "█ is twice that or more)")
        for i, shares in zip(self.moe_layers, load):
            row = "".join(bars[min(8, round(4 * E * s))] for s in shares)
            low, high = 100 * min(shares), 100 * max(shares)
            print(f"  layer {i:<3d}{row}  min {low:4.1f}%  max {high:4.1f}%")
        return dict(expert_load=load)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, use_cache=True,
                 on_logits=None):
        """Append max_new_tokens sampled tokens to idx (B, T); temperature 0 is greedy. Routing is
        dropless.

        With the hybrid cache the prompt goes through the model once, leaving each attention layer's
        keys and values and each Mamba layer's state; every new token is then one position:
        attention over the cached keys, one recurrent step in the Mamba layers. Nothing depends on a
        position, so there is no window: the text may grow past block_size and the cache holds the
        whole of it. Without the cache every step runs the whole text again (the same tokens,
        quadratic time)."""
        cache, pos = self.new_cache(idx.size(1) + max_new_tokens) if use_cache else None, 0
        for _ in range(max_new_tokens):
            x, _ = self.hidden(idx[:, pos:], cache, pos)
            pos = idx.size(1) if use_cache else 0
            logits = self.lm_head(x[:, -1])[:, :self.config.vocab_size]  # the last position only
            nxt = sample_next(logits.float(), temperature, top_k, top_p, on_logits)  # (B, 1)
            idx = torch.cat([idx, nxt], dim=1)
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


# ----------------------------------------- borrowed: Mamba's selective scan (mamba.py teaches it)
# Jamba's Mamba layers (JambaMixer) run Mamba-1's selective scan: the same text as mamba.py's, read
# there first: the recurrence as a loop over t (the reference), and the chunked parallel scan.

def selective_scan_loop(x, delta, A, B, C, D, h0):
    """The selective SSM as the paper writes it (Algorithm 2, steps 5-6), one step at a time: x and
    delta (B, T, d_inner), A (d_inner, N), B and C (B, T, N), D (d_inner,), the state h0 carried in
    (B, d_inner, N), all float32 -> y (B, T, d_inner) and the last state h (B, d_inner, N).

    Each of the d_inner channels has its own N-dim state. Discretisation (eq. 4): A_bar =
    exp(Delta A), the zero-order hold; B_bar = Delta B, the Euler step the reference code takes in
    place of ZOH's (Delta A)^-1 (exp(Delta A) - I) Delta B (the two agree to first order in Delta A;
    the checkpoints were trained with the Euler one). This is what the fast scan below is tested
    against; autograd keeps every step's state."""
    h, ys = h0, []
    # unbind, not x[:, t]: an index's backward adds a zero tensor of the whole sequence per step
    for x_t, delta_t, B_t, C_t in zip(x.unbind(1), delta.unbind(1), B.unbind(1), C.unbind(1)):
        A_bar = torch.exp(delta_t[..., None] * A)             # (B, d_inner, N)  eq. 4
        B_bar_x = (delta_t * x_t)[..., None] * B_t[:, None]   # (B, d_inner, N)  Delta_t B_t x_t
        h = A_bar * h + B_bar_x                               # eq. 2a
        ys.append((h * C_t[:, None]).sum(-1) + D * x_t)       # eq. 2b, + the skip D x_t
    return torch.stack(ys, 1), h


def parallel_scan(a, b, reverse=False):
    """Every h_t = a_t h_{t-1} + b_t, with h_{-1} = 0, for a and b (B, T, d_inner, N), without a
    loop over t; reverse: every h_t = a_t h_{t+1} + b_t, with h_T = 0 (what backward needs).

    The odd-even recursion (Blelloch 1990, "Prefix sums and their applications", section 1.4): two
    steps at a time, h_{2i+1} = (a_{2i+1} a_{2i}) h_{2i-1} + (a_{2i+1} b_{2i} + b_{2i+1}) is the
    same recurrence on half the length; solve that, then fill in h_{2i} = a_{2i} h_{2i-1} + b_{2i}
    (reverse: the even steps recurse, the odd ones are filled in from h_{2i+2}). Depth 2 log2(T),
    O(T) work. Only products of a's are formed, each a in (0, 1], so nothing can overflow at any
    length (a cumulative-sum-of-logs scan must divide by them and does)."""
    T = a.size(1)
    if T == 1:
        return b
    if T % 2:  # an odd length: one identity step (a = 1, b = 0) at the end, dropped again below
        a, b = F.pad(a, (0, 0, 0, 0, 0, 1), value=1.0), F.pad(b, (0, 0, 0, 0, 0, 1))
    a_even, a_odd = a[:, 0::2], a[:, 1::2]                    # steps 0, 2, ... and 1, 3, ...
    b_even, b_odd = b[:, 0::2], b[:, 1::2]
    h = torch.empty_like(b)
    if not reverse:
        # h_1, h_3, ...: the same recurrence, half as long; h_0 = b_0; h_2i = a_2i h_2i-1 + b_2i
        h[:, 1::2] = parallel_scan(a_odd * a_even, torch.addcmul(b_odd, a_odd, b_even))
        h[:, 0::2] = b_even
        h[:, 2::2].addcmul_(a_even[:, 1:], h[:, 1:-1:2])
    else:
        # h_0, h_2, ...: half as long; then h_T-1 = b_T-1, h_2i+1 = a_2i+1 h_2i+2 + b_2i+1
        h[:, 0::2] = parallel_scan(a_even * a_odd, torch.addcmul(b_even, a_even, b_odd), True)
        h[:, 1::2] = b_odd
        h[:, 1:-2:2].addcmul_(a_odd[:, :-1], h[:, 2::2])
    return h[:, :T]


def chunk_len(h):
    """Steps per chunk of ChunkedScan for states like h (B, d_inner, N): a chunk's states of about
    2 MB on a CPU, so that they stay in its caches; 256 MB on a GPU (few chunks: fewer, bigger
    kernels, and a short graph for torch.compile, which unrolls the loop over chunks)."""
    return max(16, (2**19 if h.device.type == "cpu" else 2**26) // h.numel())


def chunk_states(x, delta, A, B, h0):
    """The states h_t (B, L, d_inner, N) of one chunk of L steps from the state h0 carried in, and
    A_bar_t."""
    dA = torch.exp(delta[..., None] * A)                     # (B, L, d_inner, N): A_bar, in (0, 1]
    dBx = (delta * x)[..., None] * B[:, :, None, :]          # (B, L, d_inner, N): B_bar x
    dBx[:, 0] += dA[:, 0] * h0                               # h_0 = A_bar_0 h0 + B_bar_0 x_0
    return parallel_scan(dA, dBx), dA


class ChunkedScan(torch.autograd.Function):
    """y_t = C_t h_t for h_t = A_bar_t h_{t-1} + B_bar_t x_t, a chunk of the sequence at a time
    (section 3.3's two ideas without the kernel): only a chunk's states ever exist, each reduced to
    y inside its chunk, and backward recomputes them from the state saved at the chunk's start
    instead of keeping them. Backward is the same recurrence run backward in time: with G_t =
    dL/dh_t = C_t dy_t + K_{t+1}, the gradient that reaches h_{t-1} through step t is K_t = A_bar_t
    G_t = A_bar_t (K_{t+1} + C_t dy_t)."""

    @staticmethod
    def forward(ctx, x, delta, A, B, C, h0):
        """x, delta (B, T, d_inner), A (d_inner, N), B, C (B, T, N), h0 (B, d_inner, N), float32 ->
        y (without D x), h_{T-1}."""
        L = chunk_len(h0)
        y, h, starts = torch.empty_like(x), h0, []
        for t in range(0, x.size(1), L):
            starts.append(h)
            hs, _ = chunk_states(x[:, t:t + L], delta[:, t:t + L], A, B[:, t:t + L], h)
            y[:, t:t + L] = torch.einsum("blen,bln->ble", hs, C[:, t:t + L])
            h = hs[:, -1]
        ctx.L = L
        # (B, T / L, d_inner, N): the chunks' first states
        ctx.save_for_backward(x, delta, A, B, C, torch.stack(starts, 1))
        return y, h

    @staticmethod
    def backward(ctx, gy, gh):
        x, delta, A, B, C, starts = ctx.saved_tensors
        L, gA = ctx.L, torch.zeros_like(A)
        gx, gdelta, gB, gC = (torch.empty_like(t) for t in (x, delta, B, C))
        K = gh  # K_T: the gradient from after the chunk (at the end, from the last state)
        for i in reversed(range(starts.size(1))):
            c, h0 = slice(i * L, (i + 1) * L), starts[:, i]
            h, dA = chunk_states(x[:, c], delta[:, c], A, B[:, c], h0)
            G = gy[:, c, :, None] * C[:, c, None, :]         # C_t dy_t ...
            G[:, -1] += K
            K = parallel_scan(dA, dA * G, reverse=True)      # (B, L, d_inner, N)
            G[:, :-1] += K[:, 1:]                            # ... + K_{t+1}: G_t
            K[:, 1:] *= h[:, :-1]                            # K_t h_{t-1}: Delta_t A's gradient
            K, s = K[:, 0].clone(), K                        # K_0: h0's gradient (chunk before)
            s[:, 0] *= h0                                    # K_0 h_{-1}, h_{-1} = h0: Delta_0 A's
            GB = torch.einsum("blen,bln->ble", G, B[:, c])   # dL/d(Delta_t x_t)
            gdelta[:, c] = torch.einsum("blen,en->ble", s, A) + x[:, c] * GB
            gA += torch.einsum("blen,ble->en", s, delta[:, c])
            gx[:, c] = delta[:, c] * GB
            gB[:, c] = torch.einsum("blen,ble->bln", G, delta[:, c] * x[:, c])
            gC[:, c] = torch.einsum("ble,blen->bln", gy[:, c], h)
        return gx, gdelta, gA, gB, gC, K


def selective_scan(x, delta, A, B, C, D, h0=None, how="scan"):
    """The selective SSM (Algorithm 2, steps 5-6) on x, delta (B, T, d_inner), A (d_inner, N), B and
    C (B, T, N), D (d_inner,), from the state h0 (B, d_inner, N) (None: zeros). Returns y (B, T,
    d_inner) and the last state; in float32 whatever the autocast dtype, y then cast back to x's
    dtype.

    how: "scan", ChunkedScan (training and prompts: memory of order T d_inner, not T d_inner N);
    "step", one token (T = 1) from a cached state, which it advances in place (decoding); "loop",
    selective_scan_loop, the recurrence as written, which the other two are tested against."""
    dtype = x.dtype
    x, delta, B, C = x.float(), delta.float(), B.float(), C.float()
    h0 = x.new_zeros(x.size(0), x.size(2), A.size(1)) if h0 is None else h0
    if how == "loop":
        y, h = selective_scan_loop(x, delta, A, B, C, D, h0)
        return y.to(dtype), h
    if how == "step":  # h <- A_bar h + B_bar x: delta.mT (B, d_inner, 1), B (B, 1, N)
        h = h0.mul_(torch.exp(delta.mT * A)).addcmul_((delta * x).mT, B)
        y = torch.bmm(C, h.mT)                                # (B, 1, d_inner)
    else:
        y, h = ChunkedScan.apply(x, delta, A, B, C, h0)
    return torch.addcmul(y, D, x).to(dtype), h                # + D x, the skip connection


class MambaState:
    """One layer's inference cache, the same size at any context length: the last d_conv - 1 inputs
    of the convolution (B, d_conv - 1, d_inner) and the SSM state h (B, d_inner, N)."""

    def __init__(self):
        self.conv, self.ssm = None, None


# ------------------------------------------ borrowed: Mixtral's experts (mixtral.py teaches them)
# Jamba's MoE layers are Mixtral's sparse mixture of experts, the same text as mixtral.py's (the
# dispatch without a loop over tokens, the router's statistics); JambaMoE routes with jamba_route.

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


class JambaMoE(SparseMoE):
    """Jamba's mixture of experts: SparseMoE above (dispatch, SwiGLU experts, router statistics)
    with jamba_route's weights, the top k of the softmax over all E, not renormalised. W_g is the
    Hugging Face router.weight."""

    def route(self, logits):
        return jamba_route(logits, self.top_k)


# The same, fast: dispatching the experts (mixtral.py explains it).

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
    """A Jamba from a Hugging Face checkpoint: a hub id ("ai21labs/Jamba-tiny-dev", "ai21labs/AI21-Jamba-Mini-1.5",
    ...) or a local directory with config.json and model.safetensors (or shards + model.safetensors.index.json),
    in the layout the hub checkpoints and `JambaForCausalLM.save_pretrained` write: one gate/up/down_proj per expert
    (model.layers.L.feed_forward.experts.N.gate_proj.weight), stacked here into one tensor per layer; the stacked
    layout of transformers' own modules (experts.gate_up_proj, experts.down_proj) loads too. Weights are converted
    to `dtype` on the way in; run_time: Config fields of the run (RUN_TIME: dropout, the router's settings), over
    the checkpoint's. Returns the model in eval mode."""
    path, hf, tensors = read_checkpoint(name_or_path)
    if hf.get("model_type") != "jamba":
        raise InputError(f"{path} holds a '{hf.get('model_type')}' model, not Jamba")
    n_embd, n_head = hf["hidden_size"], hf["num_attention_heads"]
    for key, value, allowed in (("hidden_act", hf.get("hidden_act", "silu"), "silu"),
                                ("head_dim", hf.get("head_dim", n_embd // n_head), n_embd // n_head)):
        if value != allowed:  # a variant this file does not implement must not load as Jamba
            raise InputError(f"{path}: {key} = {value} is a Jamba variant this file does not implement")
    rank = hf.get("mamba_dt_rank", "auto")
    cfg = Config(vocab_size=hf["vocab_size"], block_size=hf.get("max_position_embeddings", 262144),
                 n_layer=hf["num_hidden_layers"], n_head=n_head, n_kv_head=hf.get("num_key_value_heads") or n_head,
                 n_embd=n_embd, intermediate_size=hf["intermediate_size"], n_expert=hf.get("num_experts", 16),
                 top_k_experts=min(hf.get("num_experts_per_tok", 2), hf.get("num_experts", 16)),  # 1 expert: no MoE
                 attn_layer_period=hf.get("attn_layer_period", 8),
                 attn_layer_offset=hf.get("attn_layer_offset", 4), expert_layer_period=hf.get("expert_layer_period", 2),
                 expert_layer_offset=hf.get("expert_layer_offset", 1), d_state=hf.get("mamba_d_state", 16),
                 d_conv=hf.get("mamba_d_conv", 4), expand=hf.get("mamba_expand", 2),
                 dt_rank=0 if rank == "auto" else rank, conv_bias=hf.get("mamba_conv_bias", True),
                 bias=hf.get("mamba_proj_bias", False), norm_eps=hf.get("rms_norm_eps", 1e-6),
                 tie_embeddings=hf.get("tie_word_embeddings", False), bos_token_id=hf.get("bos_token_id"),
                 **{"aux_loss_coef": hf.get("router_aux_loss_coef", 0.001), **run_time})
    state, experts = {}, {}
    for name, t in tensors.items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue  # a tied head is the embedding
        name = name.replace(".feed_forward.router.", ".feed_forward.gate.")  # the router W_g
        expert = re.fullmatch(r"(.*\.feed_forward)\.experts\.(\d+)\.(gate|up|down)_proj\.weight", name)
        stacked = re.fullmatch(r"(.*\.feed_forward)\.experts\.(gate_up|down)_proj", name)
        if expert:  # a matrix per expert in the file, one (n_expert, ...) tensor per layer here
            w = dict(gate="w1", up="w3", down="w2")[expert[3]]
            experts.setdefault(f"{expert[1]}.{w}", {})[int(expert[2])] = t
        elif stacked and stacked[2] == "gate_up":  # transformers' (E, 2 f, d): gate rows, then up rows
            state[f"{stacked[1]}.w1"], state[f"{stacked[1]}.w3"] = t.chunk(2, dim=1)
        elif stacked:
            state[f"{stacked[1]}.w2"] = t
        elif name in ("model.embed_tokens.weight", "lm_head.weight"):  # pad the vocabulary rows with zeros
            state[name] = F.pad(t, (0, 0, 0, cfg.padded_vocab_size - t.size(0)))
        else:
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
        model = Jamba(cfg)  # shapes only: the weights come from the file, no time is spent on a random init
    load_weights(model, state, path, device, dtype)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight  # assign=True replaced both: tie them again
    return model.eval()


def save_pretrained(model, path):
    """model in the Hugging Face Jamba layout in the directory path, as the hub checkpoints and transformers'
    save_pretrained write it: one feed_forward.experts.N.gate/up/down_proj per expert, feed_forward.router, so that
    transformers' JambaForCausalLM (and from_pretrained here) loads it with the same logits."""
    cfg, path = model.config, Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(dict(
        model_type="jamba", architectures=["JambaForCausalLM"], vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.block_size, num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_kv_head, hidden_size=cfg.n_embd, intermediate_size=cfg.intermediate_size,
        num_experts=cfg.n_expert, num_experts_per_tok=cfg.top_k_experts, attn_layer_period=cfg.attn_layer_period,
        attn_layer_offset=cfg.attn_layer_offset, expert_layer_period=cfg.expert_layer_period,
        expert_layer_offset=cfg.expert_layer_offset, mamba_d_state=cfg.d_state, mamba_d_conv=cfg.d_conv,
        mamba_expand=cfg.expand, mamba_dt_rank=cfg.dt_rank, mamba_conv_bias=cfg.conv_bias,
        mamba_proj_bias=cfg.bias, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=cfg.bos_token_id, hidden_act="silu", router_aux_loss_coef=cfg.aux_loss_coef), indent=2))
    state = {}
    for k, t in model.state_dict().items():
        if k.endswith(("w1", "w2", "w3")):  # (n_expert, ...) to one matrix per expert
            proj = dict(w1="gate_proj", w3="up_proj", w2="down_proj")[k[-2:]]
            state.update({f"{k[:-3]}.experts.{i}.{proj}.weight": w for i, w in enumerate(t)})
        elif not (k == "lm_head.weight" and cfg.tie_embeddings):
            k, t = k.replace(".feed_forward.gate.", ".feed_forward.router."), t
            state[k] = t[:cfg.vocab_size] if k in ("model.embed_tokens.weight", "lm_head.weight") else t
    write_safetensors(state, path / "model.safetensors")


# ----------------------------------------------------------------------------------- Jamba on the command line
# What the shared harness below asks of this model: its presets and flags, how to build it, what a token costs,
# the schedule, the data and what to show at the end.

# Defaults sized so that a bare run takes about three minutes: tiny on a CPU (where the 50K-token output layer
# costs more than the whole model), small on a GPU. On the CPU four layers with one attention layer (at 2) and
# the MoE in every other layer (1 and 3); on the GPU eight layers in the paper's ratio, one attention layer in
# eight at offset 4 (section 3), the MoE in every other layer; both 16 experts, top 2, as Jamba, and GQA with two
# key/value heads. On a GPU 400 steps of 8K tokens are 11 epochs of tiny-shakespeare, with an eval every 1.3
# epochs and early stopping after 3 evals without a better val loss (--patience), as the other files. The end's
# sample comes from the best weights.
PRESETS = {
    "cpu": dict(n_layer=4, n_head=4, n_kv_head=2, n_embd=128, attn_layer_period=4, attn_layer_offset=2,
                block_size=64, batch_size=8, max_iters=200, eval_interval=100, eval_iters=10, log_interval=25,
                lr=3e-3, min_lr=3e-4, warmup_iters=20, dropout=0.0, patience=0),
    "cuda": dict(n_layer=8, n_head=6, n_kv_head=2, n_embd=384, attn_layer_period=8, attn_layer_offset=4,
                 block_size=256, batch_size=32, max_iters=400, eval_interval=50, eval_iters=50, log_interval=25,
                 lr=1e-3, min_lr=1e-4, warmup_iters=40, dropout=0.2, patience=3),
}
RUN_TIME = ("dropout", "router_noise", "capacity_factor", "aux_loss_coef", "z_loss_coef")  # Config fields a run sets


def add_model_flags(p):
    p.add_argument("--n_layer", type=int)
    p.add_argument("--n_head", type=int, help="query heads of the attention layers")
    p.add_argument("--n_kv_head", type=int, help="key/value heads: n_head is MHA, 1 is MQA")
    p.add_argument("--n_embd", type=int)
    p.add_argument("--attn_layer_period", type=int, help="one attention layer in every this many (Jamba: 8)")
    p.add_argument("--attn_layer_offset", type=int, help="the attention layer's place in its period (Jamba: 4)")
    p.add_argument("--expert_layer_period", type=int, default=2, help="one MoE layer in every this many")
    p.add_argument("--expert_layer_offset", type=int, default=1, help="the MoE layer's place in its period")
    p.add_argument("--intermediate_size", type=int, help="the MLP's and each expert's SwiGLU width (default: 8/3 "
                   "n_embd rounded up to a multiple of 64)")
    p.add_argument("--n_expert", type=int, default=16, help="experts per MoE layer (1: no MoE)")
    p.add_argument("--top_k_experts", type=int, default=2, help="experts each token is routed to")
    p.add_argument("--d_state", type=int, default=16, help="N: the SSM state per channel of the Mamba layers")
    p.add_argument("--expand", type=int, default=2, help="d_inner = expand x n_embd")
    p.add_argument("--d_conv", type=int, default=4, help="width of the Mamba layers' causal depthwise convolution")
    p.add_argument("--dt_rank", type=int, default=0, help="rank of Delta's projection (0: ceil(n_embd / 16))")
    p.add_argument("--capacity_factor", type=float, default=0.0,
                   help="0: dropless routing; > 0: each expert takes at most this x its even share of a step's "
                        "tokens, the rest skip the layer (static shapes); evaluation and sampling stay dropless")
    p.add_argument("--aux_loss_coef", type=float, default=0.001, help="load-balancing loss weight (Jamba: 0.001)")
    p.add_argument("--z_loss_coef", type=float, default=0.0, help="router z-loss weight (Jamba: none)")
    p.add_argument("--router_noise", type=float, default=0.0,
                   help="jitter: multiply the router's input by U(1 - eps, 1 + eps) in training (Jamba: none)")
    p.add_argument("--show_routing", action="store_true", help="after the sample, the experts each token went to in "
                   "each MoE layer with their weights, and the tokens each expert took")
    p.add_argument("--dropout", type=float, help="on the attention weights and the residual branches")


def build_model(args, given, ckpt, env):
    """(model, tokenizer, note) for --init_from: our checkpoint's model (resume; the harness loads its weights), a
    Hugging Face Jamba (token ids if its tokenizer.json is none hf_tokenizer runs) with the run-time flags
    typed, or a fresh one."""
    run_time = {k: getattr(args, k) for k in RUN_TIME}
    if ckpt is not None:
        model, tokenizer = Jamba(Config(**{**ckpt["config"], **run_time})), load_tokenizer(ckpt["tokenizer"])
    elif args.init_from != "scratch":  # sampling keeps the checkpoint's dtype (load_dtype), training loads fp32
        tokenizer = pretrained_tokenizer(checkpoint_dir(args.init_from, weights=False), args.sample_only)
        model = from_pretrained(args.init_from, env.device, load_dtype(args, env),
                                **{k: v for k, v in run_time.items() if k in given or k == "dropout"})
    else:
        tokenizer = load_tokenizer(args.tokenizer)
        model = Jamba(Config(vocab_size=tokenizer.vocab_size, block_size=args.block_size, n_layer=args.n_layer,
                             n_head=args.n_head, n_kv_head=args.n_kv_head, n_embd=args.n_embd,
                             intermediate_size=args.intermediate_size or 0, n_expert=args.n_expert,
                             top_k_experts=args.top_k_experts, attn_layer_period=args.attn_layer_period,
                             attn_layer_offset=args.attn_layer_offset, expert_layer_period=args.expert_layer_period,
                             expert_layer_offset=args.expert_layer_offset, d_state=args.d_state, expand=args.expand,
                             d_conv=args.d_conv, dt_rank=args.dt_rank, bos_token_id=None, **run_time))
    cfg = model.config
    layers = "".join("A" if cfg.is_attention(i) else "M" for i in range(cfg.n_layer))
    moe = ", ".join(map(str, model.moe_layers)) or "none"
    model.compile_blocks = True  # torch.compile a Block at a time: the scan unrolls into a long graph per layer
    return model, tokenizer, (f" | {model.num_params(active=True) / 1e6:.2f}M active | layers {layers} (A attention, "
                              f"M Mamba) | MoE in layers {moe}: {cfg.n_expert} experts, top {cfg.top_k_experts}, "
                              + (f"capacity {cfg.capacity_factor:g}" if cfg.capacity_factor else "dropless"))


def flops_per_token(model, T):
    """Training FLOPs per token at context T, for MFU: 6 per parameter a token computes with (the top_k of the
    experts), plus the attention layers' scores over T keys (PaLM, appendix B). The scan's elementwise work is left
    out, as mamba.py does: MFU counts the matmuls."""
    cfg = model.config
    n_attn = sum(cfg.is_attention(i) for i in range(cfg.n_layer))
    return 6 * model.num_params(active=True) + 12 * n_attn * cfg.n_head * cfg.head_dim * T


def schedule(it, args):  # (learning rate, weight decay) of step it: warmup and cosine, a constant weight decay
    return lr_at(it, args), args.weight_decay


def batches(args, tokenizer, env):  # batch(split) -> (x, y): Jamba learns from --data's text
    return text_batches(args, tokenizer, env)


def show_sample(model, tokenizer, args, env, title):
    """What a run shows at its end (or with --sample_only): the hybrid cache a sequence costs at 1K and 256K tokens
    next to an all-attention model of the same shape (the paper's Table 1), then a sample (with --show_routing, then
    the experts of each of its tokens in the MoE layers)."""
    cfg, itemsize = model.config, (env.dtype if env.dtype != torch.float32 else model.lm_head.weight.dtype).itemsize
    n_attn = sum(cfg.is_attention(i) for i in range(cfg.n_layer))
    for T in (1024, 262144):
        hybrid, full = model.cache_bytes(T, itemsize)
        print(f"cache at {T // 1024}K tokens: {hybrid:,} bytes ({n_attn} attention layers' K and V + {cfg.n_layer - n_attn} "
              f"Mamba states), all-attention of the same shape {full:,} bytes: {full / hybrid:.1f}x more")
    routers = [model.model.layers[i].feed_forward for i in model.moe_layers] if args.show_routing else []
    with recording(routers) as records:
        ids = sample(model, tokenizer, args, env.ctx, title)
    if routers:
        routes = [token_routes(r[:len(r) // args.num_samples]) for r in records]  # the first sample's: with its ids
        show_routing(ids, tokenizer, model.moe_layers, routes, cfg.n_expert)


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
