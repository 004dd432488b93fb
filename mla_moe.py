"""DeepSeek's multi-head latent attention and DeepSeekMoE in one file: the model, its pretrained weights, data,
training, sampling.

Papers: DeepSeek-V2 (DeepSeek-AI 2024, arXiv 2405.04434): multi-head latent attention (MLA, section 2.1), in which
keys and values come from one low-rank latent per token, rotary positions ride on separate decoupled dimensions,
and inference caches only the latent and one shared rotary key per token, attending in the absorbed form;
DeepSeekMoE (Dai et al. 2024, arXiv 2401.06066): fine-grained routed experts plus shared experts every token
uses; DeepSeek-V3 (DeepSeek-AI 2024, arXiv 2412.19437): sigmoid affinities, group-limited top-k routing,
auxiliary-loss-free balancing (a per-expert bias that only chooses experts, moved after each step against the
observed load) and a small sequence-wise balance loss; YaRN rope scaling (Peng et al. 2023, arXiv 2309.00071) as
DeepSeek's config.json gives it. "MLA" here is DeepSeek's attention, not the Perceiver-style latent attention
some tutorials call by that name.

Routed experts are dispatched as in mixtral.py: no loop over tokens, one grouped matmul per weight, no host sync.
What is not here: multi-token prediction (V3's MTP layers are skipped on load), FP8 training, expert parallelism,
the DeepSeek tokenizer (pretrained checkpoints sample as token ids), device-limited routing across GPUs.

    python mla_moe.py                                      # CPU: a tiny model, a few minutes
    python mla_moe.py --device cuda                        # one GPU: bf16, torch.compile
    torchrun --standalone --nproc_per_node 8 mla_moe.py    # DDP on 8 GPUs
    python mla_moe.py --init_from some/deepseek-v3-style-checkpoint --sample_only

Offline (no download, no tiktoken files) it says so and carries on: the Python standard library's own source as
the text, raw UTF-8 bytes as the tokens. Every step's randomness is drawn from (--seed, iteration, rank), so
`--init_from resume` continues exactly as an uninterrupted run would (the routing bias is in the checkpoint).
"""
import argparse
import json
import math
import os
import re
import shutil
import struct
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import requests
import tiktoken
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

HERE = Path(__file__).resolve().parent
HF_ENDPOINT = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
CACHE_DIR = Path(os.environ.get("ONEFILE_CACHE", "~/.cache/onefile")).expanduser()
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
GROUPED_MM = hasattr(F, "grouped_mm")  # recent torch: one kernel for a matmul per expert over jagged groups
ALIGN = 8  # rows of an expert's group are padded to a multiple of this: grouped GEMMs want 16-byte offsets in bf16


class InputError(Exception):
    """Bad input from the user: the command line prints it as one line and exits with status 2."""


# ----------------------------------------------------------------------------------------- config

@dataclass
class Config:
    vocab_size: int = 129280             # vocab_size (DeepSeek-V3's); the embedding is padded to a multiple of 64
    block_size: int = 163840             # max_position_embeddings
    n_layer: int = 61                    # num_hidden_layers
    n_head: int = 128                    # num_attention_heads
    n_embd: int = 7168                   # hidden_size
    intermediate_size: int = 18432       # intermediate_size: the dense layers' SwiGLU width
    moe_intermediate_size: int = 2048    # moe_intermediate_size: each routed (and shared) expert's width
    n_routed_experts: int = 256          # n_routed_experts
    n_shared_experts: int = 1            # n_shared_experts
    top_k_experts: int = 8               # num_experts_per_tok
    n_group: int = 8                     # n_group: experts fall into this many groups
    topk_group: int = 4                  # topk_group: a token's experts come from this many groups
    routed_scaling_factor: float = 2.5   # routed_scaling_factor
    norm_topk_prob: bool = True          # norm_topk_prob: gating weights normalised over the chosen k
    scoring: str = "sigmoid"             # "sigmoid" (V3) or "softmax" (V2)
    first_k_dense_replace: int = 3       # first_k_dense_replace: dense feed-forward in the first layers
    q_lora_rank: int = 1536              # q_lora_rank (0: queries straight from x, as V2-Lite)
    kv_lora_rank: int = 512              # kv_lora_rank: the latent c_kv's size
    qk_nope_head_dim: int = 128          # qk_nope_head_dim
    qk_rope_head_dim: int = 64           # qk_rope_head_dim: the decoupled rotary part
    v_head_dim: int = 128                # v_head_dim
    rope_theta: float = 10000.0          # rope_theta
    rope_scaling: dict | None = None     # rope_parameters / rope_scaling: {"rope_type": "yarn", "factor": ..., ...}
    rope_interleave: bool = True         # rope_interleave: rotary pairs adjacent dimensions
    norm_eps: float = 1e-6               # rms_norm_eps
    tie_embeddings: bool = False         # tie_word_embeddings
    bos_token_id: int | None = 0         # bos_token_id
    dropout: float = 0.0

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "n_routed_experts", "kv_lora_rank",
                     "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_group", "topk_group"):
            if getattr(self, name) <= 0:
                raise InputError(f"{name} must be positive, got {getattr(self, name)}")
        if self.qk_rope_head_dim % 2:
            raise InputError(f"qk_rope_head_dim ({self.qk_rope_head_dim}) must be even: rotary turns pairs")
        if not 1 <= self.top_k_experts <= self.n_routed_experts:
            raise InputError(f"top_k_experts must be in [1, n_routed_experts], got {self.top_k_experts}")
        if self.n_routed_experts % self.n_group or not 1 <= self.topk_group <= self.n_group:
            raise InputError(f"n_group ({self.n_group}) must divide n_routed_experts ({self.n_routed_experts}) and "
                             f"topk_group ({self.topk_group}) be in [1, n_group]")
        if self.top_k_experts > self.topk_group * self.n_routed_experts // self.n_group:
            raise InputError("top_k_experts exceeds the experts of topk_group groups")
        if self.scoring not in ("sigmoid", "softmax"):
            raise InputError(f"scoring must be sigmoid or softmax, got {self.scoring}")
        if not 0.0 <= self.dropout < 1.0:
            raise InputError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.rope_scaling and self.rope_scaling.get("rope_type") != "yarn":
            raise InputError(f"rope scaling '{self.rope_scaling.get('rope_type')}' is not implemented here (yarn is)")

    @property
    def padded_vocab_size(self):
        return -(-self.vocab_size // 64) * 64


# ------------------------------------------------------------------------------------------ model

class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * g (Zhang and Sennrich 2019, arXiv 1910.07467, eq. 4), in float32, cast back."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)


def rope_frequencies(cfg, device=None):
    """(theta_i for the qk_rope_head_dim rotary dimensions, the factor on cos and sin). Plain: theta_i =
    rope_theta^(-2i/d). YaRN (Peng et al. 2023, arXiv 2309.00071, section 3, "NTK-by-parts" interpolation, as
    Hugging Face computes it): frequencies that turn more than beta_fast times over the original context are
    kept, those turning fewer than beta_slow times are divided by `factor`, a linear ramp in between."""
    d = cfg.qk_rope_head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d)
    s = cfg.rope_scaling
    if not s:
        return inv_freq, 1.0
    factor, old_len = s["factor"], s["original_max_position_embeddings"]

    def dim_of(rotations):  # the dimension index i whose frequency turns `rotations` times over old_len positions
        return d * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(cfg.rope_theta))

    low, high = math.floor(dim_of(s.get("beta_fast") or 32)), math.ceil(dim_of(s.get("beta_slow") or 1))
    low, high = max(low, 0), min(high, d - 1)
    ramp = ((torch.arange(d // 2, device=device, dtype=torch.float32) - low) / max(high - low, 1e-3)).clamp(0, 1)
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    if s.get("attention_factor"):                     # the factor on cos and sin: 1 for DeepSeek-V3's own config
        return inv_freq, s["attention_factor"]
    if s.get("mscale") and s.get("mscale_all_dim"):
        return inv_freq, yarn_mscale(factor, s["mscale"]) / yarn_mscale(factor, s["mscale_all_dim"])
    return inv_freq, yarn_mscale(factor)


def yarn_mscale(factor, mscale=1.0):
    """YaRN's attention temperature, sqrt(1/t) = 0.1 ln(s) + 1 for a context extended s times (YaRN section 3),
    with DeepSeek's config multiplying the 0.1 by mscale."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def apply_rotary(x, cos, sin, interleave):
    """Rotate x (..., T, d) by its positions' angles; cos and sin (T, d). DeepSeek's checkpoints pair adjacent
    dimensions (x_0, x_1), (x_2, x_3), ... (interleave, as RoFormer eq. 34); they are regrouped as evens then
    odds, the rotate-half layout, for queries and keys alike, which leaves every q . k unchanged."""
    if interleave:
        x = torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat((-x2, x1), dim=-1) * sin).type_as(x)


class LatentCache:
    """MLA's inference cache for one layer: per token only the compressed latent c_kv (kv_lora_rank numbers) and
    the shared rotary key k_rope (qk_rope_head_dim numbers), not n_head keys and values (DeepSeek-V2 section
    2.1.2-2.1.3)."""

    def __init__(self, length):
        self.length, self.c_kv, self.k_rope = length, None, None

    def update(self, c_kv, k_rope, pos):
        """Write c_kv (B, T, r) and k_rope (B, T, dr) at positions pos..pos+T-1; return everything so far."""
        B, T, _ = c_kv.shape
        if self.c_kv is None:
            self.c_kv = c_kv.new_zeros(B, self.length, c_kv.size(-1))
            self.k_rope = k_rope.new_zeros(B, self.length, k_rope.size(-1))
        self.c_kv[:, pos:pos + T], self.k_rope[:, pos:pos + T] = c_kv, k_rope
        return self.c_kv[:, :pos + T], self.k_rope[:, :pos + T]


class MLA(nn.Module):
    """Multi-head latent attention (DeepSeek-V2, arXiv 2405.04434, section 2.1, eq. 9-19).

    Keys and values come from one low-rank latent per token, c_kv = RMSNorm(W_DKV x) (eq. 9), expanded per head
    by W_UK and W_UV (eq. 10-11, one matrix kv_b_proj here); queries optionally from their own latent (eq. 12-13,
    q_lora_rank). Rotary positions ride on extra dimensions (decoupled RoPE, eq. 14-16): qk_rope_head_dim per
    query head, and one key of that size shared by all heads. Training uses the expanded form; with a cache the
    absorbed form (W_UK folded into the query, W_UV into the output, section 2.1.2) attends to the latents
    directly, so the cache never holds per-head keys and values."""

    def __init__(self, cfg):
        super().__init__()
        H, dn, dr, dv, r = cfg.n_head, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        self.n_head, self.dn, self.dr, self.dv, self.r, self.interleave = H, dn, dr, dv, r, cfg.rope_interleave
        if cfg.q_lora_rank:
            self.q_a_proj = nn.Linear(cfg.n_embd, cfg.q_lora_rank, bias=False)       # W_DQ
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * (dn + dr), bias=False)  # W_UQ and W_QR
        else:
            self.q_proj = nn.Linear(cfg.n_embd, H * (dn + dr), bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.n_embd, r + dr, bias=False)       # W_DKV and W_KR
        self.kv_a_layernorm = RMSNorm(r)
        self.kv_b_proj = nn.Linear(r, H * (dn + dv), bias=False)                   # W_UK and W_UV
        self.o_proj = nn.Linear(H * dv, cfg.n_embd, bias=False)
        self.scale = (dn + dr) ** -0.5 * yarn_mscale((cfg.rope_scaling or {}).get("factor", 1.0),
                                                     (cfg.rope_scaling or {}).get("mscale_all_dim") or 0) ** 2
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, cache=None, pos=0):
        B, T, _ = x.shape
        H, dn, dr, dv, r = self.n_head, self.dn, self.dr, self.dv, self.r
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if hasattr(self, "q_a_proj") else self.q_proj(x)
        q_nope, q_rope = q.view(B, T, H, dn + dr).transpose(1, 2).split([dn, dr], dim=-1)   # (B, H, T, dn / dr)
        c_kv, k_rope = self.kv_a_proj_with_mqa(x).split([r, dr], dim=-1)                   # (B, T, r), (B, T, dr)
        c_kv = self.kv_a_layernorm(c_kv)
        q_rope = apply_rotary(q_rope, cos, sin, self.interleave)
        k_rope = apply_rotary(k_rope, cos, sin, self.interleave)
        if cache is None:  # expanded: per-head keys and values from the latent, one SDPA call
            k_nope, v = self.kv_b_proj(c_kv).view(B, T, H, dn + dv).transpose(1, 2).split([dn, dv], dim=-1)
            q = torch.cat((q_nope, q_rope), dim=-1)                                       # (B, H, T, dn + dr)
            k = torch.cat((k_nope, k_rope[:, None].expand(B, H, T, dr)), dim=-1)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, scale=self.scale,
                                               dropout_p=self.dropout if self.training else 0.0)
        else:  # absorbed: scores and outputs in the latent space, the cache holds c_kv and k_rope only
            # the latent in the matmuls' dtype (RMSNorm's float32 weight would make it float32 under autocast)
            c_kv, k_rope = cache.update(c_kv.to(k_rope.dtype), k_rope, pos)              # (B, L, r), (B, L, dr)
            w = self.kv_b_proj.weight.view(H, dn + dv, r)
            q_lat = torch.einsum("bhtd,hdr->bhtr", q_nope, w[:, :dn])                     # q_nope W_UK: (B, H, T, r)
            scores = (q_lat @ c_kv[:, None].transpose(-2, -1) + q_rope @ k_rope[:, None].transpose(-2, -1)) * self.scale
            if T > 1:  # query i at position pos + i sees keys 0..pos + i
                mask = torch.ones(T, pos + T, dtype=torch.bool, device=x.device).tril(pos)
                scores = scores.masked_fill(~mask, float("-inf"))
            o_lat = scores.float().softmax(dim=-1).type_as(scores) @ c_kv[:, None]         # (B, H, T, r)
            y = torch.einsum("bhtr,hvr->bhtv", o_lat, w[:, dn:])                           # times W_UV: (B, H, T, dv)
        return self.resid_dropout(self.o_proj(y.transpose(1, 2).reshape(B, T, H * dv)))


class MLP(nn.Module):
    """SwiGLU (Shazeer 2020, arXiv 2002.05202): the dense layers' feed-forward, and the shared experts'."""

    def __init__(self, n_embd, width):
        super().__init__()
        self.gate_proj = nn.Linear(n_embd, width, bias=False)
        self.up_proj = nn.Linear(n_embd, width, bias=False)
        self.down_proj = nn.Linear(width, n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def expert_mlp(xs, w1, w3, w2, end, dt):
    """The SwiGLU of each expert over its own rows: xs (M, d) holds expert e's rows at end[e-1]..end[e]-1
    (rows past end[-1] are padding) -> (M', d), M' >= end[-1]. w1, w3: (E, f, d); w2: (E, d, f), as nn.Linear;
    dt: the dtype the model's matmuls run in (bf16 under autocast). One grouped matmul per weight where the
    kernel exists (CUDA in bf16, or eager on CPU); elsewhere a loop over the experts (one host sync)."""
    fits = xs.size(1) % ALIGN == 0 and w1.size(1) % ALIGN == 0  # 16-byte rows in the kernel's memory loads
    if GROUPED_MM and fits and (xs.is_cuda and dt == torch.bfloat16 or xs.device.type == "cpu"
                                and not torch.compiler.is_compiling()):
        offs = end.to(torch.int32)
        xs, w1, w3, w2 = xs.to(dt), w1.to(dt), w3.to(dt), w2.to(dt)
        h = F.silu(F.grouped_mm(xs, w1.transpose(1, 2), offs=offs)) * F.grouped_mm(xs, w3.transpose(1, 2), offs=offs)
        return F.grouped_mm(h, w2.transpose(1, 2), offs=offs)
    sizes = torch.diff(end, prepend=end.new_zeros(1)).tolist()
    return torch.cat([F.linear(F.silu(F.linear(x, a)) * F.linear(x, c), b)
                      for x, a, c, b in zip(xs.split([*sizes, xs.size(0) - sum(sizes)]), w1, w3, w2)])


class Gate(nn.Module):
    """DeepSeek-V3's router (arXiv 2412.19437, section 2.1.2, eq. 15-16 and 2.1.2's auxiliary-loss-free balancing).

    Affinities s_i = sigmoid(u . e_i) (V2: softmax); a per-expert bias b_i, used only to choose: the top-k of
    s_i + b_i, within the topk_group groups of experts whose two best s_i + b_i sum highest (V2's device-limited
    and V3's node-limited routing, the groups standing for devices or nodes, scored as the released V3 code
    does); gating weights from s_i alone, normalised over the chosen k
    (V3) and times routed_scaling_factor. b_i is no parameter: the training loop moves it by bias_update_speed
    against each expert's load after every step."""

    def __init__(self, cfg):
        super().__init__()
        self.top_k, self.n_group, self.topk_group = cfg.top_k_experts, cfg.n_group, cfg.topk_group
        self.scoring, self.norm, self.scale = cfg.scoring, cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.n_embd))           # the centroids e_i
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts))  # b_i

    def forward(self, x):
        """x (N, d) -> (weights (N, k), experts (N, k), affinities (N, E)), float32."""
        logits = F.linear(x.float(), self.weight.float())
        s = logits.sigmoid() if self.scoring == "sigmoid" else logits.softmax(dim=-1)        # (N, E)
        choice = s + self.e_score_correction_bias
        N, E = choice.shape
        groups = choice.view(N, self.n_group, E // self.n_group)
        best = groups.topk(min(2, E // self.n_group), dim=-1).values.sum(-1).topk(self.topk_group, dim=-1).indices
        keep = torch.zeros(N, self.n_group, dtype=torch.bool, device=x.device).scatter_(1, best, True)
        choice = choice.masked_fill(~keep[:, :, None].expand_as(groups).reshape(N, E), float("-inf"))
        expert = choice.topk(self.top_k, dim=-1).indices                                     # (N, k)
        weight = s.gather(1, expert)
        if self.norm:
            weight = weight / (weight.sum(dim=-1, keepdim=True) + 1e-20)
        return weight * self.scale, expert, s


class DeepSeekMoE(nn.Module):
    """DeepSeekMoE (Dai et al. 2024, arXiv 2401.06066, eq. 9-11): many fine-grained routed experts, k of them per
    token, plus n_shared_experts that every token goes through; h = x + shared(x) + sum_i g_i expert_i(x) (the
    block adds x). The routed experts are dispatched as in mixtral.py: each (token, choice) pair gets a row in a
    buffer grouped by expert, one grouped matmul per weight, no loop over tokens, no host sync."""

    def __init__(self, cfg):
        super().__init__()
        E, d, f = cfg.n_routed_experts, cfg.n_embd, cfg.moe_intermediate_size
        self.n_expert, self.top_k = E, cfg.top_k_experts
        self.gate = Gate(cfg)
        # the routed experts' SwiGLU weights stacked on an expert axis (HF: mlp.experts.N.gate_proj / up_proj / down_proj)
        self.gate_proj = nn.Parameter(torch.empty(E, f, d))
        self.up_proj = nn.Parameter(torch.empty(E, f, d))
        self.down_proj = nn.Parameter(torch.empty(E, d, f))
        self.shared_experts = MLP(d, f * cfg.n_shared_experts) if cfg.n_shared_experts else None

    def forward(self, x):
        B, T, d = x.shape
        xf = x.reshape(-1, d)
        N, E, k = xf.size(0), self.n_expert, self.top_k
        weight, expert, s = self.gate(xf)
        autocast = torch.is_autocast_enabled(x.device.type)  # the experts' matmul dtype: bf16 under autocast
        dt = torch.get_autocast_dtype(x.device.type) if autocast else self.gate_proj.dtype
        e = expert.t().reshape(-1)                          # (k N,) the expert of each (token, choice) pair
        onehot = F.one_hot(e, E)                            # (k N, E)
        count = onehot.sum(0)                               # (E,) pairs per expert
        rank = (onehot.cumsum(0) * onehot).sum(-1) - 1      # (k N,) the pair's place in its expert's group
        size = (count + ALIGN - 1) // ALIGN * ALIGN
        end = size.cumsum(0)
        row = end[e] - size[e] + rank
        xs = xf.new_zeros(k * N + E * (ALIGN - 1), d).index_copy(0, row, xf.repeat(k, 1))
        ys = expert_mlp(xs, self.gate_proj, self.up_proj, self.down_proj, end, dt)
        y = (ys[row] * weight.t().reshape(-1, 1)).view(k, N, d).sum(0).to(x.dtype).view(B, T, d)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y, self.stats(s.view(B, T, E), count, expert.view(B, T, k))

    def stats(self, s, count, expert):
        """(seq_balance, load_1..load_E): the sequence-wise balance loss of V3 (eq. 17-20), sum_i f_i P_i averaged
        over the sequences, f_i = E / (k T) x the tokens of the sequence routed to i, P_i the mean of the
        normalised affinities s_i / sum_j s_j; and each expert's share of the (token, choice) pairs."""
        B, T, E = s.shape
        f = F.one_hot(expert, E).sum((1, 2)).float() * E / (self.top_k * T)                 # (B, E)
        P = (s / s.sum(-1, keepdim=True)).mean(1)                                            # (B, E)
        return torch.cat([(f * P).sum(-1).mean()[None], count.float() / count.sum()])


class Block(nn.Module):
    """Pre-normalisation; MLA, then a dense SwiGLU for the first first_k_dense_replace layers, DeepSeekMoE after."""

    def __init__(self, cfg, layer):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.self_attn = MLA(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.moe = layer >= cfg.first_k_dense_replace
        self.mlp = DeepSeekMoE(cfg) if self.moe else MLP(cfg.n_embd, cfg.intermediate_size)

    def forward(self, x, cos, sin, cache=None, pos=0):
        """-> (x, router statistics of this block, or None for a dense one)"""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, pos)
        if not self.moe:
            return x + self.mlp(self.post_attention_layernorm(x)), None
        y, stats = self.mlp(self.post_attention_layernorm(x))
        return x + y, stats


class DeepSeek(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.model = nn.ModuleDict(dict(  # the Hugging Face names: model.embed_tokens, model.layers.N, model.norm
            embed_tokens=nn.Embedding(cfg.padded_vocab_size, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout),
            layers=nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer)),
            norm=RMSNorm(cfg.n_embd, cfg.norm_eps),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.padded_vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.router_stats = None  # (MoE layers, 1 + n_routed_experts) from the last forward: see DeepSeekMoE.stats
        self.grad_checkpoint = False  # training: keep only each block's input, recompute the rest in backward
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                residual = name.endswith(("o_proj.weight", "down_proj.weight", "down_proj"))
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer) if residual else 0.02)

    def moe_layers(self):
        return [b.mlp for b in self.model.layers if b.moe]

    def num_params(self, non_embedding=True, active=False):
        """Parameters (an untied input embedding left out by default); active=True counts top_k of the routed
        experts: what one token computes with."""
        cfg = self.config
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and not cfg.tie_embeddings:
            n -= self.model.embed_tokens.weight.numel()
        if active:
            routed = sum(m.gate_proj.numel() + m.up_proj.numel() + m.down_proj.numel() for m in self.moe_layers())
            n -= routed * (cfg.n_routed_experts - cfg.top_k_experts) // cfg.n_routed_experts
        return n

    def cache_numbers_per_token(self):
        """Numbers the latent cache holds per token: (kv_lora_rank + qk_rope_head_dim) x layers; and what MHA with
        the same heads would hold, 2 x n_head x head dims x layers."""
        c = self.config
        return (c.kv_lora_rank + c.qk_rope_head_dim) * c.n_layer, \
            c.n_head * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim) * c.n_layer

    def hidden(self, idx, cache=None, pos=0):
        """idx (B, T) token ids at positions pos..pos+T-1 -> final hidden states (B, T, n_embd); sets router_stats."""
        B, T = idx.shape
        if pos + T > self.config.block_size:
            raise ValueError(f"positions up to {pos + T} but block_size is {self.config.block_size}")
        inv_freq, attention_factor = rope_frequencies(self.config, idx.device)
        angles = torch.arange(pos, pos + T, device=idx.device, dtype=torch.float32)[:, None] * inv_freq
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos() * attention_factor, angles.sin() * attention_factor
        x = self.model.drop(self.model.embed_tokens(idx))
        stats = []
        for i, block in enumerate(self.model.layers):
            if self.grad_checkpoint and self.training:  # activation checkpointing (dropout replayed identically)
                x, s = torch.utils.checkpoint.checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x, s = block(x, cos, sin, None if cache is None else cache[i], pos)
            if s is not None:
                stats.append(s)
        self.router_stats = torch.stack(stats) if stats else x.new_zeros(0, 1 + self.config.n_routed_experts)
        return self.model.norm(x)

    def forward(self, idx, targets=None, cache=None, pos=0):
        """idx (B, T) -> logits (B, T, vocab_size), loss (next-token cross-entropy) or None; the router's
        statistics of the same forward are in self.router_stats."""
        V, Vp = self.config.vocab_size, self.config.padded_vocab_size
        pad = None
        if Vp > V:  # the padding rows are no tokens: a bias of -inf gives them probability exactly 0
            pad = torch.zeros(Vp, device=idx.device, dtype=self.lm_head.weight.dtype)
            pad[V:] = float("-inf")
        logits = F.linear(self.hidden(idx, cache, pos), self.lm_head.weight, pad)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
        return logits[..., :V], loss

    @torch.no_grad()
    def update_bias(self, counts, speed):
        """Auxiliary-loss-free balancing (V3 section 2.1.2): after a step, b_i -= speed for the experts above the
        mean load, += speed for those below. counts: (MoE layers, E) pairs routed in the step."""
        for moe, c in zip(self.moe_layers(), counts):
            moe.gate.e_score_correction_bias += speed * torch.sign(c.mean() - c)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, use_cache=True):
        """Append max_new_tokens sampled tokens to idx (B, T); temperature 0 is greedy. With the cache, attention
        is absorbed and each layer keeps c_kv and k_rope only; past block_size the window slides and the cache is
        dropped (each token then re-reads the window, as without a cache)."""
        block = self.config.block_size
        cache, pos = [LatentCache(min(idx.size(1) + max_new_tokens, block)) for _ in self.model.layers] \
            if use_cache else None, 0
        for _ in range(max_new_tokens):
            if cache is not None and idx.size(1) <= block:
                x = self.hidden(idx[:, pos:], cache, pos)
                pos = idx.size(1)
            else:
                cache = None
                x = self.hidden(idx[:, -block:])
            logits = self.lm_head(x[:, -1])[:, :self.config.vocab_size]
            idx = torch.cat([idx, sample_next(logits.float(), temperature, top_k, top_p)], dim=1)
        return idx


def sample_next(logits, temperature=1.0, top_k=None, top_p=None):
    """logits (B, V) -> next token ids (B, 1)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:  # nucleus sampling (Holtzman et al. 2019, arXiv 1904.09751)
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        outside = probs.cumsum(dim=-1) - probs >= top_p  # the mass before this token already reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(outside, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1)


# -------------------------------------------------------------------------- pretrained checkpoints

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path):
    """{name: tensor} from a .safetensors file: 8-byte little-endian header size, JSON header, raw bytes.

    The tensors are memory-mapped views of the file (copy-on-write): reading a 16 GB file costs no RAM
    until a tensor is copied out of it.
    """
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    data = np.memmap(path, dtype=np.uint8, mode="c", offset=8 + n)
    tensors = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        begin, end = t["data_offsets"]
        tensors[name] = torch.from_numpy(data[begin:end]).view(SAFETENSORS_DTYPES[t["dtype"]]).reshape(t["shape"])
    return tensors


def download(url, dest):
    """Fetch url into dest with a progress line. Bytes arrive in dest.part, which a later call resumes
    (HTTP Range), and are renamed to dest only when complete: dest is never half-written."""
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    if os.environ.get("HF_TOKEN"):  # gated repos need a token that accepted the licence
        headers["Authorization"] = f"Bearer {os.environ['HF_TOKEN']}"
    with requests.get(url, headers=headers, stream=True, timeout=30) as r:
        if r.status_code != 416:  # 416: nothing left to send, the .part file is already complete
            r.raise_for_status()
            have = have if r.status_code == 206 else 0  # 200: the server ignored the Range, start over
            total, shown = have + int(r.headers.get("content-length", 0)), 0.0
            with open(part, "ab" if have else "wb") as f:
                for chunk in r.iter_content(chunk_size=1 << 20):
                    f.write(chunk)
                    have += len(chunk)
                    if time.time() - shown > 0.5 or have == total:
                        shown = time.time()
                        print(f"\r{dest.name}: {have / 1e6:,.1f} / {total / 1e6:,.1f} MB", end="", file=sys.stderr)
            print(file=sys.stderr)
    os.replace(part, dest)
    return dest


def checkpoint_dir(name_or_path, weights=True):
    """A local checkpoint directory for --init_from: the path itself, or a hub repo's config.json and weights
    (one file or sharded; weights=False: config.json only) downloaded into CACHE_DIR/<repo>."""
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
        get("config.json")
        if weights and get("model.safetensors", optional=True) is None:
            index = json.loads(get("model.safetensors.index.json").read_text())
            for shard in sorted(set(index["weight_map"].values())):
                get(shard)
    except requests.RequestException as e:
        raise InputError(f"cannot fetch '{name_or_path}' from {HF_ENDPOINT}: {e}") from None
    return local



def from_pretrained(name_or_path, device="cpu", dtype=torch.float32, dropout=0.0):
    """A DeepSeek-V3-style model from a Hugging Face checkpoint: a hub id or a local directory with config.json
    and model.safetensors (or shards + model.safetensors.index.json), in the layout `DeepseekV3ForCausalLM.
    save_pretrained` writes (one gate_proj/up_proj/down_proj per routed expert, stacked here per layer).
    Multi-token-prediction layers (num_nextn_predict_layers, stored after the last layer) are skipped."""
    path = checkpoint_dir(name_or_path)
    try:
        hf = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read {path / 'config.json'}: {e}") from None
    if hf.get("model_type") != "deepseek_v3":
        raise InputError(f"{path} holds a '{hf.get('model_type')}' model, not DeepSeek-V3")
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    if hf.get("hidden_act", "silu") != "silu" or hf.get("attention_bias") or hf.get("topk_method", "noaux_tc") != "noaux_tc":
        raise InputError(f"{path}: a DeepSeek variant this file does not implement")
    cfg = Config(vocab_size=hf["vocab_size"], block_size=hf.get("max_position_embeddings", 4096),
                 n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"], n_embd=hf["hidden_size"],
                 intermediate_size=hf["intermediate_size"], moe_intermediate_size=hf["moe_intermediate_size"],
                 n_routed_experts=hf["n_routed_experts"], n_shared_experts=hf.get("n_shared_experts") or 0,
                 top_k_experts=hf["num_experts_per_tok"], n_group=hf.get("n_group") or 1,
                 topk_group=hf.get("topk_group") or 1, routed_scaling_factor=hf.get("routed_scaling_factor", 1.0),
                 norm_topk_prob=hf.get("norm_topk_prob", True), first_k_dense_replace=hf.get("first_k_dense_replace", 0),
                 q_lora_rank=hf.get("q_lora_rank") or 0, kv_lora_rank=hf["kv_lora_rank"],
                 qk_nope_head_dim=hf["qk_nope_head_dim"], qk_rope_head_dim=hf["qk_rope_head_dim"],
                 v_head_dim=hf["v_head_dim"], rope_theta=theta,
                 rope_scaling=None if rope_type == "default" else dict(rope, rope_type=rope_type),
                 rope_interleave=hf.get("rope_interleave", True), norm_eps=hf.get("rms_norm_eps", 1e-6),
                 tie_embeddings=hf.get("tie_word_embeddings", False), bos_token_id=hf.get("bos_token_id"),
                 dropout=dropout)

    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    with torch.device("meta"):
        model = DeepSeek(cfg)
    wanted = {**model.state_dict()}
    state, experts = {}, {name: [None] * cfg.n_routed_experts for name in wanted if name.endswith("_proj")
                           and ".mlp." in name and wanted[name].dim() == 3}
    for fname in files:
        try:
            tensors = read_safetensors(path / fname)
        except (OSError, ValueError, KeyError) as e:
            raise InputError(f"cannot read {path / fname}: {e}") from None
        for name, t in tensors.items():
            layer = re.match(r"model\.layers\.(\d+)\.", name)
            if (layer and int(layer[1]) >= cfg.n_layer) or name.endswith("rotary_emb.inv_freq") \
                    or (name == "lm_head.weight" and cfg.tie_embeddings) or ("shared_experts" in name and not t.numel()):
                continue  # multi-token prediction layers; a rotary table; a tied head; an empty shared expert
            expert = re.fullmatch(r"(.*\.mlp)\.experts\.(\d+)\.(\w+_proj)\.weight", name)
            target = f"{expert[1]}.{expert[3]}" if expert else name
            if target not in wanted or (expert and int(expert[2]) >= cfg.n_routed_experts):
                raise InputError(f"{path / fname}: unexpected tensor '{name}'")
            if name in ("model.embed_tokens.weight", "lm_head.weight"):
                t = F.pad(t, (0, 0, 0, cfg.padded_vocab_size - t.size(0)))
            shape = wanted[target].shape[1:] if expert else wanted[target].shape
            if t.shape != shape:
                raise InputError(f"{path / fname}: '{name}' has shape {tuple(t.shape)}, config.json implies {tuple(shape)}")
            keep = torch.float32 if name.endswith("e_score_correction_bias") else dtype  # the bias stays float32
            t = t.to(device=device, dtype=keep, memory_format=torch.contiguous_format, copy=True)
            if expert:
                experts[target][int(expert[2])] = t
            else:
                state[name] = t
    for name, per_expert in experts.items():
        if all(t is not None for t in per_expert):
            state[name] = torch.stack(per_expert)
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state.get("model.embed_tokens.weight")
    missing = [k for k in wanted if state.get(k) is None]
    if missing:
        raise InputError(f"{path}: checkpoint lacks {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    model.load_state_dict(state, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


# ------------------------------------------------------------------------------------------- data

def get_tokenizer(name):
    """(name, encode, decode, vocab_size) for "gpt2" (tiktoken's BPE) or "bytes" (raw UTF-8, 256 ids)."""
    if name == "gpt2":
        enc = tiktoken.get_encoding("gpt2")  # downloads the BPE files once, unless TIKTOKEN_CACHE_DIR has them
        return "gpt2", enc.encode_ordinary, lambda ids: enc.decode(ids, errors="replace"), enc.n_vocab
    return "bytes", lambda s: list(s.encode("utf-8")), lambda ids: bytes(ids).decode("utf-8", errors="replace"), 256


def load_tokenizer(required=None):
    """GPT-2's BPE when its files can be had, else bytes; `required` names one that must be used."""
    if required == "bytes":
        return get_tokenizer("bytes")
    try:
        return get_tokenizer("gpt2")
    except Exception as e:  # tiktoken raises whatever its download raised
        if required == "gpt2":
            raise InputError(f"the gpt2 tokenizer is needed but its files cannot be had ({type(e).__name__}); "
                             "set TIKTOKEN_CACHE_DIR to a folder that holds them") from None
        print(f"offline: tiktoken's gpt2 files cannot be had ({type(e).__name__}); using raw UTF-8 bytes as tokens")
        return get_tokenizer("bytes")


def stdlib_text(max_chars=1_500_000):
    """The offline corpus every machine has: the Python standard library's own source."""
    parts, n = [], 0
    for p in sorted(Path(os.__file__).parent.glob("*.py")):
        parts.append(p.read_text(encoding="utf-8", errors="ignore"))
        n += len(parts[-1])
        if n > max_chars:
            break
    return "".join(parts)


def read_text(data):
    """(cache name, text, fingerprint) for --data: 'shakespeare' or a path to a UTF-8 text file."""
    if data == "shakespeare":
        name, path = "shakespeare", HERE / "data" / "shakespeare" / "input.txt"
        if not path.exists():
            try:
                r = requests.get(SHAKESPEARE_URL, timeout=10)
                r.raise_for_status()
                path.parent.mkdir(parents=True, exist_ok=True)
                path.with_suffix(".tmp").write_bytes(r.content)
                os.replace(path.with_suffix(".tmp"), path)
            except requests.RequestException as e:
                print(f"offline: cannot download tiny-shakespeare ({type(e).__name__}); "
                      "training on the Python standard library's source instead")
                text = stdlib_text()
                return "python_stdlib", text, {"source": "python stdlib", "chars": len(text)}
    else:
        name, path = Path(data).stem, Path(data)
        if not path.exists():
            raise InputError(f"--data '{data}': no such file, and not a dataset name (known: shakespeare)")
        if path.is_dir():
            raise InputError(f"--data '{data}' is a directory; give a UTF-8 text file")
    raw = path.read_bytes()
    if not raw.strip():
        raise InputError(f"--data '{data}': {path} is empty")
    try:
        if b"\0" in raw:
            raise UnicodeError("NUL bytes")
        text = raw.decode("utf-8")
    except UnicodeError:
        raise InputError(f"--data '{data}': {path} is not UTF-8 text (a binary file?)") from None
    st = path.stat()
    return name, text, {"source": str(path.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def prepare_data(data, tokenizer):
    """Tokenize --data once into data/<name>/{train,val}.bin (uint16, 90/10 split) + meta.json; return the dir.

    meta.json names the source and the tokenizer: a cache made another way is rebuilt, never misread."""
    name, text, fingerprint = read_text(data)
    out = HERE / "data" / name
    meta_path = out / "meta.json"
    meta = dict(fingerprint, tokenizer=tokenizer[0], vocab_size=tokenizer[3])
    if meta_path.exists() and {k: v for k, v in json.loads(meta_path.read_text()).items() if k in meta} == meta:
        return out
    ids = np.array(tokenizer[1](text), dtype=np.uint16)
    n = int(0.9 * len(ids))
    out.mkdir(parents=True, exist_ok=True)
    for split, arr in (("train", ids[:n]), ("val", ids[n:])):
        arr.tofile(out / f"{split}.bin.tmp")
        os.replace(out / f"{split}.bin.tmp", out / f"{split}.bin")
    meta.update(train_tokens=n, val_tokens=len(ids) - n)
    (out / "meta.json.tmp").write_text(json.dumps(meta, indent=1))
    os.replace(out / "meta.json.tmp", meta_path)  # written last: a cache is valid only once its meta is there
    print(f"tokenized {name} with {tokenizer[0]}: {n:,} train and {len(ids) - n:,} val tokens in {out}")
    return out


def get_batch(data_dir, split, batch_size, block_size, device):
    """batch_size random windows of the split: x (B, T) and y (B, T), y being x shifted by one token."""
    data = np.memmap(data_dir / f"{split}.bin", dtype=np.uint16, mode="r")
    start = torch.randint(len(data) - block_size, (batch_size,)).numpy()
    xy = torch.from_numpy(data[start[:, None] + np.arange(block_size + 1)].astype(np.int64))  # (B, T+1)
    x, y = xy[:, :-1], xy[:, 1:]
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


# --------------------------------------------------------------------------------------- training

def lr_at(it, args):
    """Linear warmup to --lr, then cosine decay to --min_lr at --lr_decay_iters, flat after."""
    if it < args.warmup_iters:
        return args.lr * (it + 1) / args.warmup_iters
    decay_iters = args.lr_decay_iters or args.max_iters
    if it >= decay_iters:
        return args.min_lr
    ratio = (it - args.warmup_iters) / max(1, decay_iters - args.warmup_iters)
    return args.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (args.lr - args.min_lr)


def configure_optimizer(model, args, device):
    """AdamW; weight decay on the matrices (linear weights, embeddings), none on biases and LayerNorms."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda")


@torch.no_grad()
def estimate_loss(model, data_dir, args, device, ctx):
    """Mean loss over --eval_iters batches per split (the same batches at every eval, seeded by --seed), and
    the expert load of each layer on the val batches, (n_layer, n_expert)."""
    model.eval()
    torch.manual_seed(args.seed)
    out = {}
    for split in ("train", "val"):
        losses, load = torch.zeros(args.eval_iters), 0
        for k in range(args.eval_iters):
            x, y = get_batch(data_dir, split, args.batch_size, args.block_size, device)
            with ctx:
                losses[k] = model(x, y)[1].float()
            load = load + model.router_stats[:, 1:].float().cpu() / args.eval_iters
        out[split] = losses.mean().item()
    model.train()
    return out, load


def load_histogram(load, bias):
    """The expert load (MoE layers, n_expert) as text, a row of bars per layer: each expert's share of the routed
    (token, choice) pairs, the even share 1/n_expert drawn half high (collapse shows as a few full bars); and the
    range of the routing bias b_i, which drifts to push the load even."""
    n_expert = load.size(1)
    bars = " ▁▂▃▄▅▆▇█"
    lines = [f"expert load per layer (even: {100 / n_expert:.1f}% each, drawn ▄; █ is twice that or more)"]
    for i, shares in enumerate(load.tolist()):
        row = "".join(bars[min(8, round(4 * n_expert * s))] for s in shares)
        lines.append(f"  moe {i:<3d}{row}  min {100 * min(shares):4.1f}%  max {100 * max(shares):4.1f}%  "
                     f"bias {bias[i].min():+.3f}..{bias[i].max():+.3f}")
    return "\n".join(lines)


def peak_flops(device, dtype):
    """Dense bf16/fp16 tensor-core peak of the GPU, for MFU; None where unknown (and on CPU)."""
    if device.type != "cuda" or dtype == torch.float32:
        return None
    name = torch.cuda.get_device_name(device)
    return next((f for key, f in (("H100", 989e12), ("H200", 989e12), ("A100", 312e12)) if key in name), None)


def save_checkpoint(obj, path):
    """torch.save to a temporary file, fsync, then os.replace: a kill mid-save leaves the old file whole."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path):
    if not path.exists():
        raise InputError(f"--init_from resume: no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("model", "optimizer", "scaler", "config", "args", "iter_num", "best_val", "evals_since_best",
                    "tokenizer"):
            ckpt[key]
    except Exception as e:  # a truncated zip, a foreign pickle, a missing key: all mean "not our checkpoint"
        why = (str(e).strip().splitlines() or [""])[0][:120]
        raise InputError(f"--init_from resume: {path} is not a readable checkpoint ({type(e).__name__}: {why})") from None
    return ckpt


def step_seed(seed, iter_num, rank):
    """Each step's batches and dropout come from this seed: a resumed run repeats them exactly."""
    return (seed * 1_000_003 + iter_num) * 1_009 + rank


# ------------------------------------------------------------------------------------------- main

# Defaults sized so that a bare run takes about three minutes: tiny on a CPU (where the 50K-token output layer
# costs more than the whole model), small on a GPU; both with 16 fine-grained routed experts in 4 groups, 4 per
# token from 2 groups, one shared expert, a dense first layer, and a latent of a quarter of the width
# heads. DeepSeek trains without dropout; on a 1 MB text a small model overfits without it, hence 0.2 on the GPU.
PRESETS = {
    "cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=8, max_iters=200,
                eval_interval=100, eval_iters=10, log_interval=25, lr=3e-3, min_lr=3e-4, warmup_iters=20, dropout=0.0),
    "cuda": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64, max_iters=2000,
                 eval_interval=250, eval_iters=50, log_interval=50, lr=1e-3, min_lr=1e-4, warmup_iters=100, dropout=0.2),
}
MODEL_FLAGS = ("n_layer", "n_head", "n_embd", "n_routed_experts", "n_shared_experts", "top_k_experts", "n_group",
               "topk_group", "first_k_dense_replace", "q_lora_rank", "kv_lora_rank", "scoring")  # fixed by a checkpoint
RUN_FLAGS = ("device", "dtype", "compile", "init_from", "sample_only", "out_dir", "tensorboard",
             "prompt", "max_new_tokens", "temperature", "top_k", "top_p")  # never taken from a checkpoint


def parse_args(argv):
    p = argparse.ArgumentParser(description="Train a DeepSeek-V3-style model or sample from it (see the docstring).")
    cpu, gpu = PRESETS["cpu"], PRESETS["cuda"]

    def preset(name):
        return f"default {cpu[name]} on CPU, {gpu[name]} on CUDA"

    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="auto: cuda, else mps, else cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bf16 autocast on CUDA (fp16 + GradScaler without bf16), float32 elsewhere")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on for CUDA, off elsewhere)")
    p.add_argument("--data", default="shakespeare", help="'shakespeare' or a path to a UTF-8 text file")
    p.add_argument("--out_dir", default=None, help="checkpoints and metrics (default out/mla_moe)")
    p.add_argument("--init_from", default="scratch", help="'scratch', 'resume' (out_dir/ckpt.pt), or a hub id / HF directory")
    p.add_argument("--max_iters", type=int, help=preset("max_iters"))
    p.add_argument("--eval_interval", type=int, help=preset("eval_interval"))
    p.add_argument("--eval_iters", type=int, help=preset("eval_iters") + " (batches per split at each eval)")
    p.add_argument("--log_interval", type=int, help=preset("log_interval"))
    p.add_argument("--batch_size", type=int, help=preset("batch_size") + " (per process, per micro-step)")
    p.add_argument("--block_size", type=int, help=preset("block_size") + " (context length in training)")
    p.add_argument("--grad_accum", type=int, default=1, help="micro-steps per optimizer step")
    p.add_argument("--lr", type=float, help=preset("lr"))
    p.add_argument("--min_lr", type=float, help=preset("min_lr"))
    p.add_argument("--warmup_iters", type=int, help=preset("warmup_iters"))
    p.add_argument("--lr_decay_iters", type=int, help="end of the cosine decay (default: max_iters)")
    p.add_argument("--weight_decay", type=float, default=0.1)
    p.add_argument("--grad_clip", type=float, default=1.0, help="clip the global gradient norm (0: off)")
    p.add_argument("--n_layer", type=int, help=preset("n_layer"))
    p.add_argument("--n_head", type=int, help=preset("n_head"))
    p.add_argument("--n_embd", type=int, help=preset("n_embd"))
    p.add_argument("--n_routed_experts", type=int, default=16, help="routed experts per MoE layer")
    p.add_argument("--n_shared_experts", type=int, default=1, help="experts every token goes through")
    p.add_argument("--top_k_experts", type=int, default=4, help="routed experts per token")
    p.add_argument("--n_group", type=int, default=4, help="groups of routed experts")
    p.add_argument("--topk_group", type=int, default=2, help="groups a token's experts may come from")
    p.add_argument("--first_k_dense_replace", type=int,
                   help="leading layers with a dense feed-forward (default 1; 0 for a one-layer model)")
    p.add_argument("--q_lora_rank", type=int, default=0, help="query latent size (0: queries straight from x)")
    p.add_argument("--kv_lora_rank", type=int, help="key/value latent size (default n_embd / 4)")
    p.add_argument("--scoring", default="sigmoid", choices=["sigmoid", "softmax"], help="V3's sigmoid or V2's softmax gate")
    p.add_argument("--bias_update_speed", type=float, default=0.01,
                   help="auxiliary-loss-free balancing: each step, the routing bias of an overloaded expert goes down by "
                        "this, an underloaded one's up (V3: 0.001 over its long run; 0: off)")
    p.add_argument("--grad_checkpoint", action="store_true", help="recompute each block's activations in backward")
    p.add_argument("--seq_aux_loss_coef", type=float, default=0.0001, help="sequence-wise balance loss weight (V3: 0.0001)")
    p.add_argument("--dropout", type=float, help=preset("dropout"))
    p.add_argument("--patience", type=int, default=0, help="stop after this many evals without a better val loss (0: off)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--tensorboard", action="store_true", help="also log to TensorBoard under out_dir")
    p.add_argument("--prompt", default="\n", help="start of the sample printed at the end")
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top_k", type=int, default=200, help="sample among the k likeliest tokens (0: all)")
    p.add_argument("--top_p", type=float, default=None, help="nucleus sampling: the likeliest tokens up to this mass")
    p.add_argument("--sample_only", action="store_true", help="load --init_from and sample; no training")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    for action in p._actions:  # parse again with no defaults: which flags did the user actually type?
        action.default = argparse.SUPPRESS
    return args, set(vars(p.parse_args(argv)))


def check_args(args):
    positive = ("max_iters", "eval_interval", "eval_iters", "log_interval", "batch_size", "block_size", "grad_accum",
                "lr_decay_iters", "max_new_tokens", "kv_lora_rank")
    for name in positive:
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise InputError(f"--{name} must be positive, got {getattr(args, name)}")
    for name in ("lr", "min_lr", "warmup_iters", "weight_decay", "grad_clip", "patience", "temperature", "top_k",
                 "q_lora_rank", "bias_update_speed", "seq_aux_loss_coef"):
        if getattr(args, name) < 0:
            raise InputError(f"--{name} must not be negative, got {getattr(args, name)}")
    if args.first_k_dense_replace is not None and args.first_k_dense_replace < 0:
        raise InputError(f"--first_k_dense_replace must not be negative, got {args.first_k_dense_replace}")
    if args.top_p is not None and not 0.0 < args.top_p <= 1.0:
        raise InputError(f"--top_p must be in (0, 1], got {args.top_p}")


def setup_device(args):
    """(device, autocast dtype, use compile, rank, world size), starting DDP when torchrun launched us."""
    ddp = "RANK" in os.environ
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")) if ddp else (0, 0, 1)
    name = args.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available (try --device cpu)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise InputError("--device mps: MPS is not available (try --device cpu)")
    device = torch.device(f"cuda:{local_rank}" if name == "cuda" else name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if ddp:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(args.dtype)
    if dtype is None:  # auto
        dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if device.type == "cuda" \
            else torch.float32
    use_compile = device.type == "cuda" if args.compile is None else args.compile
    return device, dtype, use_compile, rank, world


def main(argv=None):
    args, given = parse_args(argv)
    try:
        run(args, given)
    except InputError as e:
        print(f"mla_moe.py: error: {' '.join(str(e).split())}", file=sys.stderr)  # one line, whatever the message
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(args, given):
    device, dtype, use_compile, rank, world = setup_device(args)
    master = rank == 0
    out_dir = Path(args.out_dir or "out/mla_moe")
    ckpt_path = out_dir / "ckpt.pt"

    torch.manual_seed(args.seed)  # the initial weights; each training step reseeds (see step_seed)

    # --- where the weights come from: a checkpoint of ours, a pretrained DeepSeek, or a fresh init
    ckpt = load_checkpoint(ckpt_path) if args.init_from == "resume" else None
    if ckpt is not None:  # flags not typed now take the values the checkpointed run had
        for k, v in ckpt["args"].items():
            if k not in given and k not in RUN_FLAGS:
                setattr(args, k, v)
    for k, v in PRESETS["cuda" if device.type == "cuda" else "cpu"].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    check_args(args)

    if ckpt is not None:
        cfg = Config(**{**ckpt["config"], "dropout": args.dropout})
        tokenizer = load_tokenizer(required=ckpt["tokenizer"])
        model = DeepSeek(cfg)
        model.load_state_dict(ckpt["model"])
    elif args.init_from != "scratch":  # sampling keeps the weights in the run's dtype (bf16 on CUDA)
        path = checkpoint_dir(args.init_from, weights=args.sample_only)  # no weights fetched only to be refused
        if not args.sample_only:
            raise InputError("this file has no reader for the DeepSeek checkpoints' tokenizer, so they cannot be "
                             "trained on text here; --sample_only shows token ids")
        model, tokenizer = from_pretrained(path, device, dtype), None
        cfg = model.config
    else:
        tokenizer = load_tokenizer()
        if args.n_embd % args.n_head or args.n_embd // args.n_head % 4:
            raise InputError(f"n_embd ({args.n_embd}) must be a multiple of n_head ({args.n_head}), in heads of a "
                             "multiple of 4 (the rotary part is half a head)")
        hd = args.n_embd // args.n_head  # per head: hd nope, hd / 2 rotary, hd value dimensions (V3's 128 / 64 / 128)
        dense = -(-8 * args.n_embd // 3 // 64) * 64
        cfg = Config(vocab_size=tokenizer[3], block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head,
                     n_embd=args.n_embd, intermediate_size=dense, moe_intermediate_size=max(dense // 4, 8),
                     n_routed_experts=args.n_routed_experts, n_shared_experts=args.n_shared_experts,
                     top_k_experts=args.top_k_experts, n_group=args.n_group, topk_group=args.topk_group,
                     first_k_dense_replace=min(1, args.n_layer - 1) if args.first_k_dense_replace is None
                     else args.first_k_dense_replace, q_lora_rank=args.q_lora_rank,
                     kv_lora_rank=args.kv_lora_rank or max(args.n_embd // 4, 1), qk_nope_head_dim=hd,
                     qk_rope_head_dim=hd // 2, v_head_dim=hd, routed_scaling_factor=1.0, scoring=args.scoring,
                     dropout=args.dropout)
        model = DeepSeek(cfg)
    for k in MODEL_FLAGS:
        if k in given and getattr(args, k) != getattr(cfg, k):
            raise InputError(f"--{k} {getattr(args, k)} does not match the model from --init_from "
                             f"{args.init_from}, which has {k} {getattr(cfg, k)}")
    if args.block_size > cfg.block_size:
        raise InputError(f"--block_size {args.block_size} is longer than the model's context ({cfg.block_size})")
    model.to(device)
    model.grad_checkpoint = args.grad_checkpoint
    ctx = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    tokens_per_step = args.batch_size * args.block_size * args.grad_accum * world
    if master:
        print(f"mla_moe | {device} | {str(dtype).removeprefix('torch.')} | compile {'on' if use_compile else 'off'} | "
              f"{model.num_params() / 1e6:.2f}M params ({model.num_params(active=True) / 1e6:.2f}M active) | "
              f"{cfg.n_routed_experts} routed experts, top {cfg.top_k_experts}, {cfg.n_shared_experts} shared"
              f" | {tokens_per_step:,} tokens/step | "
              f"data {args.data} | tokenizer {tokenizer[0] if tokenizer else 'none (token ids)'} | "
              f"init {args.init_from}" + (f" | DDP x{world}" if world > 1 else ""))

    def sample(title):
        torch.manual_seed(args.seed)
        bos = [] if cfg.bos_token_id is None else [cfg.bos_token_id]
        if tokenizer is None:
            print(f"no tokenizer for {args.init_from} here: the prompt is not used, the sample starts "
                  f"from token {bos or [0]} and is shown as token ids")
            prompt = bos or [0]
        else:
            prompt = bos + tokenizer[1](args.prompt) or [0]  # a prompt longer than block_size: generate slides
        itemsize = (dtype if dtype != torch.float32 else model.lm_head.weight.dtype).itemsize
        latent, mha = model.cache_numbers_per_token()
        print(f"latent cache: {latent * itemsize:,} bytes/token ((kv_lora_rank {cfg.kv_lora_rank} + rotary key "
              f"{cfg.qk_rope_head_dim}) x {cfg.n_layer} layers x {itemsize} bytes); MHA with the same "
              f"{cfg.n_head} heads would cache {mha * itemsize:,}")
        model.eval()
        with ctx:
            out = model.generate(torch.tensor([prompt], device=device), args.max_new_tokens, args.temperature,
                                 args.top_k or None, args.top_p)
        text = str(out[0].tolist()) if tokenizer is None else tokenizer[2](out[0, len(bos):].tolist())
        print(f"--- {title} ---\n{text}\n---")

    if args.sample_only:
        if args.init_from == "scratch":
            raise InputError("--sample_only needs --init_from resume, a hub id or an HF directory")
        if master:
            sample(f"sample from {args.init_from}")
        return

    # --- data (rank 0 downloads and tokenizes; the others wait, then read the cache)
    if master:
        data_dir = prepare_data(args.data, tokenizer)
    if world > 1:
        dist.barrier()
    if not master:
        data_dir = prepare_data(args.data, tokenizer)
    meta = json.loads((data_dir / "meta.json").read_text())
    if min(meta["train_tokens"], meta["val_tokens"]) <= args.block_size:
        raise InputError(f"--data '{args.data}' is too short for --block_size {args.block_size}: "
                         f"{meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens "
                         "(each split needs more than block_size)")

    # --- optimizer, and the run's state when resuming
    optimizer = configure_optimizer(model, args, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    iter_num, best_val, evals_since_best = 0, float("inf"), 0
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        iter_num, best_val, evals_since_best = ckpt["iter_num"], ckpt["best_val"], ckpt["evals_since_best"]
        ckpt = None  # free it
    eval_model = train_model = torch.compile(model) if use_compile else model  # `model` stays the plain module
    if world > 1:
        train_model = DDP(eval_model, device_ids=[device.index] if device.type == "cuda" else None)

    # --- logs: stdout, out_dir/metrics.jsonl, optionally TensorBoard
    writer = None
    if master:
        out_dir.mkdir(parents=True, exist_ok=True)
        metrics_path = out_dir / "metrics.jsonl"
        kept = []
        if iter_num > 0 and metrics_path.exists():  # resuming: keep the history up to the checkpoint
            kept = [l for l in metrics_path.read_text().splitlines() if json.loads(l)["iter"] <= iter_num]
        metrics_path.write_text("".join(l + "\n" for l in kept))
        if args.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                writer = SummaryWriter(str(out_dir))
            except ImportError:
                print("--tensorboard: the tensorboard package is not installed (pip install tensorboard); skipping it")

    def log(record):
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if writer is not None:
            for k, v in record.items():
                if k != "iter" and v is not None:
                    writer.add_scalar(k, v, record["iter"])

    def diverged(line):  # the NaN guard: stop before anything bad is saved
        print(f"{line}: training diverged; stopping. The last good checkpoint (if any) is {ckpt_path}", file=sys.stderr)
        sys.exit(1)

    peak = peak_flops(device, dtype)
    # MFU counts what a token computes: the active parameters (top_k of the routed experts), PaLM's formula (app. B)
    qk, v = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    flops_per_token = 6 * model.num_params(active=True) + 6 * cfg.n_layer * cfg.n_head * (qk + v) * args.block_size
    n_moe = len(model.moe_layers())
    loss_sum, balance_sum, loss_count = torch.zeros((), device=device), torch.zeros((), device=device), 0
    counts = torch.zeros(n_moe, cfg.n_routed_experts, device=device)  # pairs routed to each expert this step
    t_log, iters_logged, t_start = time.perf_counter(), iter_num, time.time()
    train_model.train()
    while iter_num < args.max_iters:
        lr = lr_at(iter_num, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        torch.manual_seed(step_seed(args.seed, iter_num, rank))
        for micro in range(args.grad_accum):
            x, y = get_batch(data_dir, "train", args.batch_size, args.block_size, device)
            if world > 1:  # all-reduce the gradients only on the last micro-step
                train_model.require_backward_grad_sync = micro == args.grad_accum - 1
            with ctx:
                _, loss = train_model(x, y)
                balance = model.router_stats[:, 0].float().mean() if n_moe else loss.new_zeros(())  # V3's eq. 17
                total = loss + args.seq_aux_loss_coef * balance
            scaler.scale(total / args.grad_accum).backward()
            loss_sum += loss.detach()
            balance_sum += balance.detach()
            counts += model.router_stats[:, 1:].detach().float()
            loss_count += 1
        if args.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if args.bias_update_speed and n_moe:  # auxiliary-loss-free balancing, from the load of the whole step
            if world > 1:
                dist.all_reduce(counts)
            model.update_bias(counts, args.bias_update_speed)
        counts.zero_()
        iter_num += 1

        if master and (iter_num % args.log_interval == 0 or iter_num == args.max_iters):
            train_loss = (loss_sum / loss_count).item()  # the host syncs, every log_interval steps
            balance = (balance_sum / loss_count).item()
            dt = (time.perf_counter() - t_log) / (iter_num - iters_logged)
            tok_s = tokens_per_step / dt
            mfu = flops_per_token * tok_s / (peak * world) if peak else None
            if not math.isfinite(train_loss):
                diverged(f"iter {iter_num} | loss {train_loss}")
            # the cross-entropy, then the sequence-wise balance loss before its coefficient (1 when even)
            print(f"iter {iter_num} | loss {train_loss:.4f} | balance {balance:.3f} | lr {lr:.2e} | "
                  f"{dt * 1000:.1f} ms | {tok_s:,.0f} tok/s" + (f" | mfu {100 * mfu:.1f}%" if mfu else ""))
            log(dict(iter=iter_num, loss=train_loss, balance=balance, lr=lr, ms=dt * 1000, tok_s=tok_s, mfu=mfu))
            loss_sum, balance_sum, loss_count = torch.zeros((), device=device), torch.zeros((), device=device), 0
            t_log, iters_logged = time.perf_counter(), iter_num

        if iter_num % args.eval_interval == 0 or iter_num == args.max_iters:
            t_eval, stop = time.perf_counter(), torch.zeros((), device=device)
            if master:
                losses, load = estimate_loss(eval_model, data_dir, args, device, ctx)
                if not all(map(math.isfinite, losses.values())):
                    diverged(f"eval {iter_num} | train {losses['train']} | val {losses['val']}")
                improved = losses["val"] < best_val
                best_val, evals_since_best = (losses["val"], 0) if improved else (best_val, evals_since_best + 1)
                save_checkpoint(dict(model=model.state_dict(), optimizer=optimizer.state_dict(),
                                     scaler=scaler.state_dict(), config=asdict(cfg), args=vars(args),
                                     iter_num=iter_num, best_val=best_val, evals_since_best=evals_since_best,
                                     tokenizer=tokenizer[0]), ckpt_path)
                if improved:  # best.pt: a second name for the same file, so early stopping never loses the best
                    best_tmp = out_dir / "best.pt.tmp"
                    best_tmp.unlink(missing_ok=True)
                    try:
                        os.link(ckpt_path, best_tmp)
                    except OSError:
                        shutil.copyfile(ckpt_path, best_tmp)
                    os.replace(best_tmp, out_dir / "best.pt")
                print(f"eval {iter_num} | train {losses['train']:.4f} | val {losses['val']:.4f} | saved {ckpt_path}"
                      + (" (best)" if improved else ""))
                bias = torch.stack([m.gate.e_score_correction_bias.cpu() for m in model.moe_layers()]) if n_moe \
                    else torch.zeros(0, cfg.n_routed_experts)
                print(load_histogram(load, bias))
                log(dict(iter=iter_num, train=losses["train"], val=losses["val"], expert_load=load.tolist(),
                         bias=bias.tolist()))
                if args.patience and evals_since_best >= args.patience:
                    print(f"early stop: no better val loss in {args.patience} evals (best {best_val:.4f}, in best.pt)")
                    stop += 1
            if world > 1:
                dist.broadcast(stop, src=0)
            if stop.item():
                break
            t_log += time.perf_counter() - t_eval  # eval time is not training time

    if master:
        sample("sample")
        print(f"done | {iter_num} iters | best val {best_val:.4f} | {time.time() - t_start:.0f} s")
    if writer is not None:
        writer.close()


if __name__ == "__main__":
    main()
