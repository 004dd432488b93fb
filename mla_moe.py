"""DeepSeek's multi-head latent attention and DeepSeekMoE in one file: the model, its pretrained
weights, data, training, sampling.

Papers: DeepSeek-V2 (DeepSeek-AI 2024, arXiv 2405.04434): multi-head latent attention (MLA, section
2.1), in which keys and values come from one low-rank latent per token, rotary positions ride on
separate decoupled dimensions, and inference caches only the latent and one shared rotary key per
token, attending in the absorbed form; DeepSeekMoE (Dai et al. 2024, arXiv 2401.06066): fine-grained
routed experts plus shared experts every token uses; DeepSeek-V3 (DeepSeek-AI 2024, arXiv
2412.19437): sigmoid affinities, group-limited top-k routing, auxiliary-loss-free balancing (a
per-expert bias that only chooses experts, moved after each step against the observed load) and a
small sequence-wise balance loss (`--scoring softmax` gives V2's gate instead: softmax affinities,
groups ranked by their best expert, weights not renormalised); YaRN rope scaling (Peng et al. 2023,
arXiv 2309.00071) as DeepSeek's config.json gives it. "MLA" here is DeepSeek's attention, not the
Perceiver-style latent attention some tutorials call by that name.

The model section writes each paper's computation as the paper does, then the same fast: MLA.forward
is V2's eq. 37-47 over per-head keys and values, MLA.absorbed the same attention taken against the
cached latents (decoding); DeepSeekMoE.forward_loop is V3's eq. 12, a loop over the experts, and
DeepSeekMoE.forward the same sum with the routed experts dispatched as in mixtral.py (no loop over
tokens, one grouped matmul per weight, no host sync), the tests holding each pair equal.
What is not here: multi-token prediction (V3's MTP layers are skipped on load), FP8 training and FP8
matmuls (FP8 weights are dequantized at load), expert parallelism, device-limited routing across
GPUs. DeepSeek-V3's tokenizer.json (byte-level BPE behind several Splits) runs, so its checkpoints
sample as text.

Checkpoints from_pretrained reads (config.json's model_type): "deepseek_v3", DeepSeek-V3 and R1, in
bf16 or as released in FP8 (float8_e4m3fn weights, a float32 weight_scale_inv per 128 x 128 block,
quantization_config "fp8"; dequantized into the run's dtype, so the logits are those of the
dequantized weights); "deepseek_v2", DeepSeek-V2, V2.5 and V2-Lite (softmax gate, topk_method
"greedy" or "group_limited_greedy", Lite without a query latent); "kimi_k2", Kimi K2's name for V3's
architecture (transformers' Kimi-K2.5 config maps it to deepseek_v3). Moonlight-16B-A3B declares
DeepseekV3ForCausalLM: it loads if its model_type is deepseek_v3 (not checked here). Tested on tiny
checkpoints written by transformers (and FP8 ones quantized by the tests), no released file.

    python mla_moe.py                                      # CPU: a tiny model, a few minutes
    python mla_moe.py --device cuda                        # one GPU: bf16, torch.compile
    torchrun --standalone --nproc_per_node 8 mla_moe.py    # DDP on 8 GPUs
    python mla_moe.py --init_from some/deepseek-v3-style-checkpoint --sample_only
    python mla_moe.py --init_from resume --sample_only --show_routing --show_top 3   # the experts

Offline (no download, no tiktoken files) it says so and carries on: the Python standard library's
own source as the text, raw UTF-8 bytes as the tokens. Every step's randomness is drawn from
(--seed, iteration, rank), so `--init_from resume` continues exactly as an uninterrupted run would
(the routing bias is in the checkpoint).
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
    vocab_size: int = 129280             # vocab_size (DeepSeek-V3's); the embedding is padded to a multiple of 64
    block_size: int = 163840             # max_position_embeddings
    n_layer: int = 61                    # num_hidden_layers
    n_head: int = 128                    # num_attention_heads
    n_embd: int = 7168                   # hidden_size
    intermediate_size: int = 18432       # intermediate_size: the dense layers' SwiGLU width
    moe_intermediate_size: int = 2048    # moe_intermediate_size: each routed (and shared) expert's width
    n_expert: int = 256                  # n_routed_experts: the routed experts
    n_shared_experts: int = 1            # n_shared_experts
    top_k_experts: int = 8               # num_experts_per_tok
    n_group: int = 8                     # n_group: experts fall into this many groups
    topk_group: int = 4                  # topk_group: a token's experts come from this many groups
    routed_scaling_factor: float = 2.5   # routed_scaling_factor
    norm_topk_prob: bool = True          # norm_topk_prob: gating weights normalised over the chosen k
    scoring: str = "sigmoid"             # scoring_func: "sigmoid" (V3) or "softmax" (V2)
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
    bos_token_id: int | None = None      # bos_token_id: put before the prompt when sampling (a checkpoint's own)
    # the run's settings, not the model's (RUN_TIME: a fine-tune's flags override a checkpoint's)
    dropout: float = 0.0                 # attention_dropout; also on the residual branches here (DeepSeek uses none)
    seq_aux_loss_coef: float = 0.0001    # training only: alpha, the sequence-wise balance loss's weight (V3 eq. 17)
    bias_update_speed: float = 0.01      # training only: gamma, the routing bias's step (V3 2.1.2; 0: no bias updates)

    def __post_init__(self):
        check_types(self)
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "n_expert", "kv_lora_rank",
                     "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_group", "topk_group"):
            if getattr(self, name) <= 0:
                raise InputError(f"{name} must be positive, got {getattr(self, name)}")
        if self.qk_rope_head_dim % 2:
            raise InputError(f"qk_rope_head_dim ({self.qk_rope_head_dim}) must be even: rotary turns pairs")
        if not 1 <= self.top_k_experts <= self.n_expert:
            raise InputError(f"top_k_experts must be in [1, n_expert], got {self.top_k_experts}")
        if self.n_expert % self.n_group or not 1 <= self.topk_group <= self.n_group:
            raise InputError(f"n_group ({self.n_group}) must divide n_expert ({self.n_expert}) and "
                             f"topk_group ({self.topk_group}) be in [1, n_group]")
        if self.top_k_experts > self.topk_group * self.n_expert // self.n_group:
            raise InputError("top_k_experts exceeds the experts of topk_group groups")
        sizes = ("intermediate_size", "moe_intermediate_size", "n_shared_experts", "first_k_dense_replace", "q_lora_rank")
        if min(getattr(self, name) for name in sizes) < 0 or self.rope_theta <= 0:
            raise InputError(f"{', '.join(sizes)} must not be negative nor rope_theta be 0 or less")
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
# DeepSeek-V2's attention (MLA) and DeepSeekMoE with V3's gate as the papers write them, the block,
# the model. After it, "the same, fast": the routed experts dispatched in one pass by mixtral.py's
# dispatch; then RMSNorm, RoPE and SwiGLU, borrowed from llama2.py.

def yarn_rope_frequencies(cfg, device=None):
    """(theta_i for the qk_rope_head_dim rotary dimensions, the factor on cos and sin). Plain:
    theta_i = rope_theta^(-2i/d). YaRN (Peng et al. 2023, arXiv 2309.00071, section 3,
    "NTK-by-parts" interpolation, as Hugging Face computes it): frequencies that turn more than
    beta_fast times over the original context are kept, those turning fewer than beta_slow times are
    divided by `factor`, a linear ramp in between."""
    d = cfg.qk_rope_head_dim
    i = torch.arange(d // 2, device=device, dtype=torch.float32)  # the pair index
    inv_freq = 1.0 / cfg.rope_theta ** (2 * i / d)
    s = cfg.rope_scaling
    if not s:
        return inv_freq, 1.0
    factor, old_len = s["factor"], s["original_max_position_embeddings"]

    def dim_of(rotations):  # the pair index whose frequency turns `rotations` times in old_len
        return d * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(cfg.rope_theta))

    low = max(math.floor(dim_of(s.get("beta_fast") or 32)), 0)
    high = min(math.ceil(dim_of(s.get("beta_slow") or 1)), d - 1)
    ramp = ((i - low) / max(high - low, 1e-3)).clamp(0, 1)
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    if s.get("attention_factor"):  # the factor on cos and sin: 1 for DeepSeek-V3's own config
        return inv_freq, s["attention_factor"]
    if s.get("mscale") and s.get("mscale_all_dim"):
        return inv_freq, yarn_mscale(factor, s["mscale"]) / yarn_mscale(factor, s["mscale_all_dim"])
    return inv_freq, yarn_mscale(factor)


def yarn_mscale(factor, mscale=1.0):
    """YaRN's attention temperature, sqrt(1/t) = 0.1 ln(s) + 1 for a context extended s times (YaRN
    section 3), with DeepSeek's config multiplying the 0.1 by mscale."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


class MLA(nn.Module):
    """Multi-head latent attention (DeepSeek-V2, arXiv 2405.04434, section 2.1; appendix C writes it
    whole as eq. 37-47, the numbers cited here).

    Keys and values come from one low-rank latent per token, c_KV = W_DKV h (eq. 41), expanded per
    head by W_UK and W_UV (eq. 42, 45; one matrix here, kv_b_proj); queries from their own latent
    c_Q = W_DQ h (eq. 37-38; q_lora_rank 0: straight from h, as V2-Lite). Positions ride on extra
    dimensions (decoupled RoPE, eq. 39, 43): d_R per query head and one rotary key k_R shared by all
    heads. `forward` is these equations as written, attention over per-head keys [k_C; k_R] and
    values v_C (eq. 44, 46). With a cache it calls `absorbed`, the same attention taken against the
    latents (section 2.1.2), so that the cache never holds a per-head key or value."""

    def __init__(self, cfg):
        super().__init__()
        H, dn, dr, dv = cfg.n_head, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        r = cfg.kv_lora_rank
        self.n_head, self.dn, self.dr, self.dv, self.r = H, dn, dr, dv, r
        self.interleave = cfg.rope_interleave
        if cfg.q_lora_rank:
            self.q_a_proj = nn.Linear(cfg.n_embd, cfg.q_lora_rank, bias=False)     # W_DQ
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, 1e-6)  # as HF: not rms_norm_eps
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * (dn + dr), bias=False)  # W_UQ; W_QR
        else:
            self.q_proj = nn.Linear(cfg.n_embd, H * (dn + dr), bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.n_embd, r + dr, bias=False)        # W_DKV; W_KR
        self.kv_a_layernorm = RMSNorm(r, 1e-6)
        self.kv_b_proj = nn.Linear(r, H * (dn + dv), bias=False)                   # W_UK; W_UV
        self.o_proj = nn.Linear(H * dv, cfg.n_embd, bias=False)                    # W_O
        # eq. 46's 1/sqrt(d_h + d_R); an extended context (YaRN) scales q and k each by
        # yarn_mscale = sqrt(1/t), so the scores by its square, on every dimension as DeepSeek does
        yarn = cfg.rope_scaling or {}
        mscale = yarn_mscale(yarn.get("factor", 1.0), yarn.get("mscale_all_dim") or 0)
        self.scale = (dn + dr) ** -0.5 * mscale ** 2
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, cache=None, pos=0):
        """h (B, T, n_embd) at positions pos..pos+T-1 -> u (B, T, n_embd); cos, sin: (T, d_R)."""
        B, T, _ = x.shape
        H, dn, dr, dv, r = self.n_head, self.dn, self.dr, self.dv, self.r
        if hasattr(self, "q_a_proj"):
            c_q = self.q_a_layernorm(self.q_a_proj(x))  # eq. 37: c_Q = W_DQ h (normalised)
            q = self.q_b_proj(c_q)                      # eq. 38-39: W_UQ c_Q; W_QR c_Q
        else:
            q = self.q_proj(x)
        q = q.view(B, T, H, dn + dr).transpose(1, 2)
        q_c, q_r = q.split([dn, dr], dim=-1)                  # (B, H, T, d_h), (B, H, T, d_R)
        c_kv, k_r = self.kv_a_proj_with_mqa(x).split([r, dr], dim=-1)  # eq. 41, 43: W_DKV h; W_KR h
        c_kv = self.kv_a_layernorm(c_kv)                      # (B, T, r), normalised as released
        q_r, k_r = self.rope(q_r, cos, sin), self.rope(k_r, cos, sin)  # eq. 39, 43: RoPE(.)
        if cache is not None:
            return self.absorbed(q_c, q_r, c_kv, k_r, cache, pos)
        kv = self.kv_b_proj(c_kv).view(B, T, H, dn + dv).transpose(1, 2)
        k_c, v_c = kv.split([dn, dv], dim=-1)                 # eq. 42, 45: W_UK c_KV; W_UV c_KV
        q = torch.cat((q_c, q_r), dim=-1)                     # eq. 40: q_i = [q_C,i; q_R,i]
        k = torch.cat((k_c, k_r[:, None].expand(B, H, T, dr)), dim=-1)  # eq. 44: [k_C,i; k_R]
        p = self.dropout if self.training else 0.0
        o = F.scaled_dot_product_attention(q, k, v_c, is_causal=T > 1, scale=self.scale,
                                           dropout_p=p)       # eq. 46: softmax(q k / sqrt(.)) v_C
        return self.resid_dropout(self.o_proj(o.transpose(1, 2).reshape(B, T, H * dv)))  # eq. 47

    def rope(self, x, cos, sin):
        """RoPE on the decoupled dimensions x (..., T, d_R). DeepSeek rotates adjacent pairs
        (RoFormer eq. 34), apply_rotary pairs i with i + d/2: the evens, then the odds, turn the one
        layout into the other, with the same q . k."""
        if self.interleave:
            x = torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)
        return apply_rotary(x, cos, sin)

    def absorbed(self, q_c, q_r, c_kv, k_r, cache, pos):
        """The attention of `forward` with a cache, the same output (the tests hold them equal):
        W_UK absorbed into the query, q_C . k_C = (W_UK^T q_C) . c_KV, and W_UV into the output, o =
        W_UV sum_j p_j c_KV,j (section 2.1.2), so scores and outputs are taken against the cached
        latents: the cache holds c_KV and k_R per token (LatentCache), no per-head key or value."""
        B, H, T, dn = q_c.shape
        # the latent in the matmuls' dtype (RMSNorm's float32 weight makes it float32 in autocast)
        c_kv, k_r = cache.update(c_kv.to(k_r.dtype), k_r, pos)         # (B, L, r), (B, L, d_R)
        w = self.kv_b_proj.weight.view(H, dn + self.dv, self.r)         # W_UK; W_UV, per head
        q_lat = torch.einsum("bhtd,hdr->bhtr", q_c, w[:, :dn])          # W_UK^T q_C: (B, H, T, r)
        scores = q_lat @ c_kv[:, None].transpose(-2, -1) + q_r @ k_r[:, None].transpose(-2, -1)
        scores = scores * self.scale                                    # (B, H, T, L)
        if T > 1:  # query i at position pos + i sees keys 0..pos + i
            mask = torch.ones(T, pos + T, dtype=torch.bool, device=q_c.device).tril(pos)
            scores = scores.masked_fill(~mask, float("-inf"))
        o_lat = scores.float().softmax(dim=-1).type_as(scores) @ c_kv[:, None]  # (B, H, T, r)
        o = torch.einsum("bhtr,hvr->bhtv", o_lat, w[:, dn:])            # times W_UV: (B, H, T, d_v)
        return self.resid_dropout(self.o_proj(o.transpose(1, 2).reshape(B, T, H * self.dv)))


class LatentCache:
    """MLA's inference cache for one layer: per token only the compressed latent c_kv (kv_lora_rank
    numbers) and the shared rotary key k_rope (qk_rope_head_dim numbers), not n_head keys and values
    (DeepSeek-V2 section 2.1.2-2.1.3)."""

    def __init__(self, length):
        self.length, self.c_kv, self.k_rope = length, None, None

    def update(self, c_kv, k_rope, pos):
        """Write c_kv (B, T, r) and k_rope (B, T, dr) at positions pos..pos+T-1; return all so far.
        """
        B, T, _ = c_kv.shape
        if self.c_kv is None:
            self.c_kv = c_kv.new_zeros(B, self.length, c_kv.size(-1))
            self.k_rope = k_rope.new_zeros(B, self.length, k_rope.size(-1))
        self.c_kv[:, pos:pos + T], self.k_rope[:, pos:pos + T] = c_kv, k_rope
        return self.c_kv[:, :pos + T], self.k_rope[:, :pos + T]


class Gate(nn.Module):
    """DeepSeek-V3's router (arXiv 2412.19437, section 2.1.2, eq. 15-16, and its auxiliary-loss-free
    balancing).

    Affinities s_i = sigmoid(u . e_i); a per-expert bias b_i, used only to choose: the top-k of s_i
    + b_i, within the topk_group groups of experts whose two best s_i + b_i sum highest (V3's
    node-limited routing, the groups standing for nodes, scored as the released V3 code does);
    gating weights from s_i alone, normalised over the chosen k (norm_topk_prob) and times
    routed_scaling_factor. b_i is no parameter: after every step it moves by bias_update_speed
    against each expert's load (DeepSeek.after_step).

    scoring="softmax" is DeepSeek-V2's gate (arXiv 2405.04434, section 2.2.1, eq. 20-23): s_i =
    softmax_i(u . e_i), groups (devices) ranked by their best expert alone (section 2.2.2's
    device-limited routing, topk_method "group_limited_greedy"; "greedy" is one group); g_i = s_i of
    the chosen k times routed_scaling_factor (a V2 checkpoint's norm_topk_prob is false). The bias
    b_i stays as V3 has it (0 unless moved; a V2 file has none)."""

    def __init__(self, cfg):
        super().__init__()
        self.top_k, self.n_group, self.topk_group = cfg.top_k_experts, cfg.n_group, cfg.topk_group
        self.scoring, self.norm = cfg.scoring, cfg.norm_topk_prob
        self.scale = cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_expert, cfg.n_embd))  # the centroids e_i
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_expert))  # b_i
        self.record = None  # a list only while --show_routing draws a sample (recording)

    def forward(self, x):
        """x (N, d) -> (weights (N, k), experts (N, k), affinities (N, E)), float32: the logits too,
        autocast off (V3's gate computes in float32; autocast would run the matmul in bf16)."""
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())
        s = logits.sigmoid() if self.scoring == "sigmoid" else logits.softmax(dim=-1)  # (N, E)
        choice = s + self.e_score_correction_bias
        N, E = choice.shape
        groups = choice.view(N, self.n_group, E // self.n_group)
        per_group = min(2 if self.scoring == "sigmoid" else 1, E // self.n_group)  # V3: best two
        best = groups.topk(per_group, dim=-1).values.sum(-1).topk(self.topk_group, dim=-1).indices
        keep = torch.zeros(N, self.n_group, dtype=torch.bool, device=x.device)
        keep = keep.scatter_(1, best, True)
        outside = ~keep[:, :, None].expand_as(groups).reshape(N, E)
        choice = choice.masked_fill(outside, float("-inf"))
        expert = choice.topk(self.top_k, dim=-1).indices                          # (N, k)
        weight = s.gather(1, expert)
        if self.norm:
            weight = weight / (weight.sum(dim=-1, keepdim=True) + 1e-20)
        if self.record is not None:  # --show_routing: these tokens' routing, the groups it chose
            self.record.append((expert, weight * self.scale, best))
        return weight * self.scale, expert, s


class DeepSeekMoE(nn.Module):
    """DeepSeekMoE (Dai et al. 2024, arXiv 2401.06066, eq. 9-11; as DeepSeek-V3 writes it, eq. 12):
    many fine-grained routed experts, k of them per token, and n_shared_experts every token goes
    through,
        h' = u + sum_i FFN^(s)_i(u) + sum_i g_i FFN^(r)_i(u)
    (the block adds u). `forward_loop` is that sum, one routed expert at a time; `forward` is the
    same, fast (mixtral.py's dispatch, after the model)."""

    def __init__(self, cfg):
        super().__init__()
        E, d, f = cfg.n_expert, cfg.n_embd, cfg.moe_intermediate_size
        self.n_expert, self.top_k = E, cfg.top_k_experts
        self.gate = Gate(cfg)
        # The routed experts' SwiGLU weights stacked on an expert axis (HF: mlp.experts.N.gate_proj,
        # up_proj, down_proj); on AdamW under --optimizer muon, as in mixtral.py: torch's Muon takes
        # 2-D parameters only
        self.gate_proj = nn.Parameter(torch.empty(E, f, d))
        self.up_proj = nn.Parameter(torch.empty(E, f, d))
        self.down_proj = nn.Parameter(torch.empty(E, d, f))
        self.shared_experts = None
        if cfg.n_shared_experts:
            self.shared_experts = FeedForward(d, f * cfg.n_shared_experts)

    def forward_loop(self, x):
        """x (B, T, d) -> (h' - u (B, T, d), router statistics, see stats): V3 eq. 12 as written,
        each routed expert over the tokens that chose it, as DeepSeek-V3's inference code does."""
        B, T, d = x.shape
        u = x.reshape(-1, d)                                # (N, d)
        g, expert, s = self.gate(u)                         # g_i and i (N, k), s_i (N, E)
        y = u.new_zeros(u.shape, dtype=torch.float32)
        for i in range(self.n_expert):
            t, j = torch.where(expert == i)                 # the tokens that chose i, as their j-th
            h = F.silu(F.linear(u[t], self.gate_proj[i])) * F.linear(u[t], self.up_proj[i])
            y = y.index_add(0, t, F.linear(h, self.down_proj[i]) * g[t, j, None])  # g_i FFN_i(u)
        count = expert.flatten().bincount(minlength=self.n_expert)  # (E,) pairs per expert
        return self.add_shared(x, y, s, count, expert)

    def forward(self, x):
        """forward_loop's output and statistics (the tests hold them equal, gradients too), the
        routed experts dispatched in one pass."""
        B, T, d = x.shape
        u = x.reshape(-1, d)
        g, expert, s = self.gate(u)
        autocast = torch.is_autocast_enabled(x.device.type)  # the matmuls run in bf16 under it
        dt = torch.get_autocast_dtype(x.device.type) if autocast else self.gate_proj.dtype
        w = self.gate_proj, self.up_proj, self.down_proj
        y, count, _ = dispatch(u, expert, g, *w, dt, decoding=not self.training)  # no capacity
        return self.add_shared(x, y, s, count, expert)

    def add_shared(self, x, y, s, count, expert):
        """The routed experts' sum y (N, d) plus the shared experts' sum_i FFN^(s)_i(x), and the
        router statistics of the affinities s (N, E), the pairs per expert count (E,), the experts
        (N, k)."""
        B, T, d = x.shape
        y = y.to(x.dtype).view(B, T, d)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y, self.stats(s.view(B, T, -1), count, expert.view(B, T, self.top_k))

    def stats(self, s, count, expert):
        """(seq_balance, load_1..load_E): the sequence-wise balance loss of V3 (eq. 17-20), sum_i
        f_i P_i averaged over the sequences, f_i = E / (k T) x the tokens of the sequence routed to
        i, P_i the mean of the normalised affinities s_i / sum_j s_j; and each expert's share of the
        pairs."""
        B, T, E = s.shape
        k = self.top_k
        f = s.new_zeros(B, E).scatter_add_(1, expert.view(B, -1), s.new_ones(B, T * k))
        f = f * E / (k * T)
        P = (s / s.sum(-1, keepdim=True)).mean(1)                                 # (B, E)
        return torch.cat([(f * P).sum(-1).mean()[None], count.float() / count.sum()])


class Block(nn.Module):
    """Pre-normalisation; MLA, then a dense SwiGLU for the first first_k_dense_replace layers,
    DeepSeekMoE after."""

    def __init__(self, cfg, layer):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.self_attn = MLA(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.moe = layer >= cfg.first_k_dense_replace
        self.mlp = DeepSeekMoE(cfg) if self.moe else FeedForward(cfg.n_embd, cfg.intermediate_size)
        self.resid_dropout = nn.Dropout(cfg.dropout)  # on the feed-forward's output, as mixtral.py

    def forward(self, x, cos, sin, cache=None, pos=0):
        """-> (x, router statistics of this block, or None for a dense one)"""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, pos)
        if not self.moe:
            return x + self.resid_dropout(self.mlp(self.post_attention_layernorm(x))), None
        y, stats = self.mlp(self.post_attention_layernorm(x))
        return x + self.resid_dropout(y), stats


class DeepSeek(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        # the Hugging Face names: model.embed_tokens, model.layers.N, model.norm
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(cfg.padded_vocab_size, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout),
            layers=nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer)),
            norm=RMSNorm(cfg.n_embd, cfg.norm_eps),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.padded_vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.grad_checkpoint = False  # training: keep each block's input, recompute in backward
        # Initialisation (the papers give none): normal, std 0.02 (Hugging Face's
        # initializer_range); the projections that write into the residual stream scaled by
        # 1/sqrt(2 n_layer), as GPT-2 does.
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                residual = name.endswith(("o_proj.weight", "down_proj.weight", "down_proj"))
                std = 0.02 / math.sqrt(2 * cfg.n_layer) if residual else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def moe_layers(self):
        return [b.mlp for b in self.model.layers if b.moe]

    def num_params(self, non_embedding=True, active=False):
        """Parameters a token computes with: a tied embedding/head counted once, lookups (an untied
        input embedding, a position table) left out by default; active=True counts top_k of the
        routed experts only."""
        cfg = self.config
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and not cfg.tie_embeddings:
            n -= self.model.embed_tokens.weight.numel()
        if active:
            routed = sum(m.gate_proj.numel() + m.up_proj.numel() + m.down_proj.numel()
                         for m in self.moe_layers())
            n -= routed * (cfg.n_expert - cfg.top_k_experts) // cfg.n_expert
        return n

    def optimizer_groups(self):
        """Each parameter's optimizer group, by name: "muon", the blocks' matrices (MLA's
        projections, the gate's centroids, the dense and shared SwiGLUs: Muon's under --optimizer
        muon, else AdamW's with decay); "decay", the embedding, the head and the routed experts'
        stacked (E, out, in) weights (AdamW: torch's Muon takes 2-D parameters only); "no_decay",
        the RMSNorm gains."""
        matrices = ("_proj.weight", "_mqa.weight", "gate.weight")
        groups = {}
        for name, _ in self.named_parameters():
            if name.endswith("norm.weight"):
                groups[name] = "no_decay"
            elif name.startswith("model.layers.") and name.endswith(matrices):
                groups[name] = "muon"
            else:
                groups[name] = "decay"
        return groups

    def kv_bytes_per_token(self, itemsize=4):
        """Bytes the latent cache holds per token: (kv_lora_rank + qk_rope_head_dim) x layers x
        bytes per number; and what MHA with the same heads would hold, n_head x (query/key and value
        head dims) x layers x bytes."""
        c = self.config
        latent = (c.kv_lora_rank + c.qk_rope_head_dim) * c.n_layer * itemsize
        head = c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim
        mha = c.n_head * head * c.n_layer * itemsize
        return latent, mha

    def hidden(self, idx, cache=None, pos=0):
        """idx (B, T) token ids at positions pos..pos+T-1 -> (final hidden states (B, T, n_embd),
        the MoE layers' router statistics (MoE layers, 1 + n_expert), see DeepSeekMoE.stats)."""
        B, T = idx.shape
        if pos + T > self.config.block_size:
            raise ValueError(f"positions up to {pos + T} but block_size is "
                             f"{self.config.block_size}")
        inv_freq, attention_factor = yarn_rope_frequencies(self.config, idx.device)
        positions = torch.arange(pos, pos + T, device=idx.device, dtype=torch.float32)
        angles = positions[:, None] * inv_freq
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos() * attention_factor, angles.sin() * attention_factor
        x = self.model.drop(self.model.embed_tokens(idx))
        stats = []
        for i, block in enumerate(self.model.layers):
            if self.grad_checkpoint and self.training:  # dropout is replayed identically
                x, s = torch.utils.checkpoint.checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x, s = block(x, cos, sin, None if cache is None else cache[i], pos)
            if s is not None:
                stats.append(s)
        if not stats:
            return self.model.norm(x), x.new_zeros(0, 1 + self.config.n_expert)
        return self.model.norm(x), torch.stack(stats)

    def forward(self, idx, targets=None, cache=None, pos=0):
        """idx (B, T) -> (logits (B, T, vocab_size), loss or None, aux): the next-token
        cross-entropy, and in training the sequence-wise balance loss times seq_aux_loss_coef (V3
        eq. 17-20). aux holds the balance apart for the log, and the batch's expert load (MoE
        layers, n_expert): summed over a step's micro-batches for after_step, over an evaluation for
        load_report."""
        V, Vp = self.config.vocab_size, self.config.padded_vocab_size
        pad = None
        if Vp > V:  # the padding rows are no tokens: a bias of -inf gives them probability 0
            pad = torch.zeros(Vp, device=idx.device, dtype=self.lm_head.weight.dtype)
            pad[V:] = float("-inf")
        x, router = self.hidden(idx, cache, pos)
        logits = F.linear(x, self.lm_head.weight, pad)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
        if len(router):
            balance = router[:, 0].float().mean()  # 1 when the load is even
        else:
            balance = logits.new_zeros((), dtype=torch.float32)
        if self.training and loss is not None:
            loss = loss + self.config.seq_aux_loss_coef * balance
        return logits[..., :V], loss, dict(balance=balance, load=router[:, 1:].detach().float())

    def load_report(self, load):
        """Print the expert load `load` (MoE layers, n_expert), aux's load summed over an
        evaluation's batches, each MoE layer (by its index) a row of bars: each expert's share of
        the routed (token, choice) pairs, the even share 1/n_expert drawn half high (collapse shows
        as a few full bars), and the range of its routing bias b_i, which drifts to push the load
        even. Returns both for the metrics."""
        load = (load / load.sum(-1, keepdim=True).clamp_min(1e-9)).tolist()
        bias = [m.gate.e_score_correction_bias.tolist() for m in self.moe_layers()]
        E, bars = self.config.n_expert, " ▁▂▃▄▅▆▇█"
        print(f"expert load per layer (even: {100 / E:.1f}% each, drawn ▄; █ is twice that "
              "or more)")
        layers = range(self.config.first_k_dense_replace, self.config.n_layer)
        for i, shares, b in zip(layers, load, bias):
            row = "".join(bars[min(8, round(4 * E * s))] for s in shares)
            print(f"  layer {i:<3d}{row}  min {100 * min(shares):4.1f}%  "
                  f"max {100 * max(shares):4.1f}%  bias {min(b):+.3f}..{max(b):+.3f}")
        return dict(expert_load=load, bias=bias)

    def after_step(self, load):
        """After each optimizer step: the routing bias follows the step's load (MoE layers,
        n_expert), aux's load summed over the step's micro-batches (and here over the ranks)."""
        if self.config.bias_update_speed and len(load):
            if dist.is_initialized():
                dist.all_reduce(load)
            self.update_bias(load, self.config.bias_update_speed)

    @torch.no_grad()
    def update_bias(self, load, speed):
        """Auxiliary-loss-free balancing (V3 section 2.1.2): after a step, b_i -= speed for the
        experts above the mean load, += speed for those below. load: (MoE layers, E), each expert's
        share of the pairs summed over the step's micro-batches (and ranks): only its sign against
        the mean counts."""
        for moe, c in zip(self.moe_layers(), load):
            moe.gate.e_score_correction_bias += speed * torch.sign(c.mean() - c)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, use_cache=True,
                 on_logits=None):
        """Append max_new_tokens sampled tokens to idx (B, T); temperature 0 is greedy. With the
        cache, attention is absorbed and each layer keeps c_kv and k_rope only; past block_size the
        window slides and the cache is dropped (each token then re-reads the window, as without a
        cache)."""
        block = self.config.block_size
        length = min(idx.size(1) + max_new_tokens, block)
        cache = [LatentCache(length) for _ in self.model.layers] if use_cache else None
        pos = 0
        for _ in range(max_new_tokens):
            if cache is not None and idx.size(1) <= block:
                x, _ = self.hidden(idx[:, pos:], cache, pos)
                pos = idx.size(1)
            else:
                cache = None
                x, _ = self.hidden(idx[:, -block:])
            logits = self.lm_head(x[:, -1])[:, :self.config.vocab_size]
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


# ------------------------------------------ the same, fast: dispatch (mixtral.py teaches it)
# DeepSeekMoE.forward gives forward_loop's sum (the tests hold them equal, gradients too) without a
# loop over the experts: mixtral.py's dispatch, the same text (its capacity mode unused here).

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


# --------------------------------------- borrowed: RMSNorm, RoPE, SwiGLU (llama2.py teaches them)

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
    """A DeepSeek-V2 or V3-style model from a Hugging Face checkpoint: a hub id or a local directory with config.json
    and model.safetensors (or shards + model.safetensors.index.json), in the layout `DeepseekV3ForCausalLM.
    save_pretrained` (or V2's) writes (one gate_proj/up_proj/down_proj per routed expert, stacked here per layer).
    model_type "deepseek_v2" (V2, V2.5, V2-Lite): the softmax gate, topk_method "greedy" (one group) or
    "group_limited_greedy", no routing bias. FP8 weights (V3 and R1 as released, quantization_config "fp8") are
    dequantized into dtype (dequantize_fp8). Multi-token-prediction layers (num_nextn_predict_layers, stored after the
    last layer) are skipped."""
    path, hf, tensors = read_checkpoint(name_or_path)
    gates = {"deepseek_v2": ("softmax", ("greedy", "group_limited_greedy")), "deepseek_v3": ("sigmoid", ("noaux_tc",)),
             "kimi_k2": ("sigmoid", ("noaux_tc",))}  # kimi_k2: DeepSeek-V3's architecture under Moonshot's name
    if hf.get("model_type") not in gates:
        raise InputError(f"{path} holds a '{hf.get('model_type')}' model, not DeepSeek-V2 or V3")
    v2, (scoring, topk_methods) = hf["model_type"] == "deepseek_v2", gates[hf["model_type"]]
    topk_method = hf.get("topk_method", topk_methods[0])
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    if hf.get("hidden_act", "silu") != "silu" or hf.get("attention_bias") or hf.get("mlp_bias") \
            or topk_method not in topk_methods or hf.get("scoring_func", scoring) != scoring:
        raise InputError(f"{path}: a DeepSeek variant this file does not implement")
    if v2 and hf.get("norm_topk_prob"):  # DeepSeek's V2 code then drops routed_scaling_factor, transformers' ignores it
        raise InputError(f"{path}: DeepSeek-V2 with norm_topk_prob true: its two reference implementations disagree")
    group = topk_method != "greedy"  # greedy: the top-k of all experts, as one group
    cfg = Config(vocab_size=hf["vocab_size"], block_size=hf.get("max_position_embeddings", 4096),
                 n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"], n_embd=hf["hidden_size"],
                 intermediate_size=hf["intermediate_size"], moe_intermediate_size=hf["moe_intermediate_size"],
                 n_expert=hf["n_routed_experts"], n_shared_experts=hf.get("n_shared_experts") or 0,
                 top_k_experts=hf["num_experts_per_tok"], n_group=hf.get("n_group") or 1 if group else 1,
                 topk_group=hf.get("topk_group") or 1 if group else 1, scoring=scoring,
                 routed_scaling_factor=hf.get("routed_scaling_factor", 1.0),
                 norm_topk_prob=hf.get("norm_topk_prob", not v2),
                 first_k_dense_replace=hf.get("first_k_dense_replace", 0),
                 q_lora_rank=hf.get("q_lora_rank") or 0, kv_lora_rank=hf["kv_lora_rank"],
                 qk_nope_head_dim=hf["qk_nope_head_dim"], qk_rope_head_dim=hf["qk_rope_head_dim"],
                 v_head_dim=hf["v_head_dim"], rope_theta=theta,
                 rope_scaling=None if rope_type == "default" else dict(rope, rope_type=rope_type),
                 rope_interleave=v2 or hf.get("rope_interleave", True), norm_eps=hf.get("rms_norm_eps", 1e-6),
                 tie_embeddings=hf.get("tie_word_embeddings", False), bos_token_id=hf.get("bos_token_id"),
                 **run_time)  # RUN_TIME's Config fields of the run: dropout, the router's settings
    quant = hf.get("quantization_config") or {}
    if quant and quant.get("quant_method") != "fp8":
        raise InputError(f"{path}: quantization '{quant.get('quant_method')}' is not implemented here (fp8 is)")
    state, experts = {}, {}
    for name, t in tensors.items():
        layer = re.match(r"model\.layers\.(\d+)\.", name)
        if (layer and int(layer[1]) >= cfg.n_layer) or name.endswith("rotary_emb.inv_freq") \
                or (name == "lm_head.weight" and cfg.tie_embeddings) or ("shared_experts" in name and not t.numel()):
            continue  # multi-token prediction layers; a rotary table; a tied head; an empty shared expert
        if name.endswith(".weight_scale_inv") and tensors.get(name[:-10], t).dtype == torch.float8_e4m3fn:
            continue  # an FP8 weight's block scales, used with it below
        if t.dtype == torch.float8_e4m3fn:
            t = dequantize_fp8(t, tensors.get(name + "_scale_inv"), quant.get("weight_block_size") or (128, 128),
                               f"{path}: '{name}'").to(dtype)
        expert = re.fullmatch(r"(.*\.mlp)\.experts\.(\d+)\.(\w+_proj)\.weight", name)
        if expert:  # a matrix per routed expert in the file, one (n_expert, ...) tensor per layer here
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
    if v2:  # V2 routes without a bias: b_i = 0
        state = {**{f"model.layers.{i}.mlp.gate.e_score_correction_bias": torch.zeros(cfg.n_expert)
                    for i in range(cfg.first_k_dense_replace, cfg.n_layer)}, **state}
    with torch.device("meta"):
        model = DeepSeek(cfg)  # shapes only: the weights come from the file, no time is spent on a random init
    load_weights(model, state, path, device, dtype)  # the routing bias, a buffer, stays float32
    if cfg.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight  # assign=True replaced both: tie them again
    return model.eval()


def dequantize_fp8(w, scale_inv, block, what):
    """W = W_fp8 x s per block of an FP8 weight (DeepSeek-V3's release, V3 section 3.3.2's fine-grained quantization):
    float8_e4m3fn numbers and one float32 weight_scale_inv per 128 x 128 block, the last blocks of a row or column
    partial -> float32. A weight without its scales (or with scales of another grid) is bad input."""
    if w.dim() != 2 or not (isinstance(block, list | tuple) and len(block) == 2
                            and all(isinstance(b, int) and b > 0 for b in block)):
        raise InputError(f"{what}: an FP8 tensor of shape {tuple(w.shape)} in blocks of {block} is no layout read here")
    bo, bi = block
    grid = (-(-w.size(0) // bo), -(-w.size(1) // bi))
    if scale_inv is None or tuple(scale_inv.shape) != grid:
        raise InputError(f"{what} is FP8 without a weight_scale_inv of {grid[0]} x {grid[1]} blocks")
    return w.float() * scale_inv.float().repeat_interleave(bo, 0).repeat_interleave(bi, 1)[:w.size(0), :w.size(1)]


def save_pretrained(model, path):
    """model in the Hugging Face DeepSeek-V3 layout in the directory path, as DeepseekV3ForCausalLM.save_pretrained
    writes it (one gate_proj/up_proj/down_proj per routed expert), so that transformers (and from_pretrained here)
    loads it with the same logits; a --scoring softmax model in DeepSeek-V2's, whose gate has no routing bias, no
    renormalisation and interleaved rotary pairs: a softmax model with any of these is refused."""
    cfg, path = model.config, Path(path)
    v2 = cfg.scoring == "softmax"
    if v2 and (cfg.norm_topk_prob or not cfg.rope_interleave
               or any(m.gate.e_score_correction_bias.any() for m in model.moe_layers())):
        raise InputError("--export: transformers' DeepSeek-V2 gate has no routing bias (train with --bias_update_speed "
                         "0), no norm_topk_prob and interleaved rotary pairs; this softmax model has no layout there")
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(dict(
        model_type="deepseek_v2" if v2 else "deepseek_v3", vocab_size=cfg.vocab_size,
        architectures=["DeepseekV2ForCausalLM" if v2 else "DeepseekV3ForCausalLM"],
        max_position_embeddings=cfg.block_size, num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_head, hidden_size=cfg.n_embd, intermediate_size=cfg.intermediate_size,
        moe_intermediate_size=cfg.moe_intermediate_size, n_routed_experts=cfg.n_expert,
        n_shared_experts=cfg.n_shared_experts, num_experts_per_tok=cfg.top_k_experts, n_group=cfg.n_group,
        topk_group=cfg.topk_group, routed_scaling_factor=cfg.routed_scaling_factor, norm_topk_prob=cfg.norm_topk_prob,
        first_k_dense_replace=cfg.first_k_dense_replace, q_lora_rank=cfg.q_lora_rank or None,
        kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim,
        v_head_dim=cfg.v_head_dim, rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling,
        rope_interleave=cfg.rope_interleave, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=cfg.bos_token_id, hidden_act="silu",
        topk_method="noaux_tc" if not v2 else "greedy" if cfg.n_group == 1 else "group_limited_greedy"), indent=2))
    state = {}
    for k, t in model.state_dict().items():
        if v2 and k.endswith("e_score_correction_bias"):
            continue
        if k.endswith(("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")):  # (n_expert, ...) to a matrix per expert
            state.update({f"{k.rsplit('.', 1)[0]}.experts.{i}.{k.rsplit('.', 1)[1]}.weight": w for i, w in enumerate(t)})
        elif not (k == "lm_head.weight" and cfg.tie_embeddings):
            state[k] = t[:cfg.vocab_size] if k in ("model.embed_tokens.weight", "lm_head.weight") else t
    write_safetensors(state, path / "model.safetensors")


# --------------------------------------------------------------------------------- DeepSeek on the command line
# What the shared harness below asks of this model: its presets and flags, how to build it, what a token costs,
# the schedule, the data and what to show at the end.

# Defaults sized so that a bare run takes about three minutes: tiny on a CPU (where the 50K-token output layer
# costs more than the whole model), small on a GPU; both with 16 fine-grained routed experts in 4 groups, 4 per
# token from 2 groups, one shared expert, a dense first layer, and a latent of a quarter of the width.
# DeepSeek trains without dropout; on a 1 MB text a small model overfits without it, hence 0.2 on the GPU.
# On a GPU 400 steps of 8K tokens are 11 epochs of tiny-shakespeare's 304K tokens, with an eval every 1.3 epochs and
# early stopping after 3 evals without a better val loss (--patience), since a small model overfits a 1 MB text
# within a few epochs. The end's sample comes from the best weights.
PRESETS = {
    "cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=8, max_iters=200,
                eval_interval=100, eval_iters=10, log_interval=25, lr=3e-3, min_lr=3e-4, warmup_iters=20, dropout=0.0, patience=0),
    "cuda": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=32, max_iters=400,
                 eval_interval=50, eval_iters=50, log_interval=25, lr=1e-3, min_lr=1e-4, warmup_iters=40, dropout=0.2,
                 patience=3),
}
RUN_TIME = ("dropout", "seq_aux_loss_coef", "bias_update_speed")  # the Config fields a run sets


def add_model_flags(p):
    p.add_argument("--n_layer", type=int)
    p.add_argument("--n_head", type=int)
    p.add_argument("--n_embd", type=int)
    p.add_argument("--n_expert", type=int, default=16, help="routed experts per MoE layer")
    p.add_argument("--n_shared_experts", type=int, default=1, help="experts every token goes through")
    p.add_argument("--top_k_experts", type=int, default=4, help="routed experts per token")
    p.add_argument("--n_group", type=int, default=4, help="groups of routed experts")
    p.add_argument("--topk_group", type=int, default=2, help="groups a token's experts may come from")
    p.add_argument("--first_k_dense_replace", type=int,
                   help="leading layers with a dense feed-forward (default 1; 0 for a one-layer model)")
    p.add_argument("--q_lora_rank", type=int, default=0, help="query latent size (0: queries straight from x)")
    p.add_argument("--kv_lora_rank", type=int, help="key/value latent size (default n_embd / 4)")
    p.add_argument("--scoring", default="sigmoid", choices=["sigmoid", "softmax"],
                   help="V3's sigmoid gate, or V2's softmax gate (groups ranked by their best expert, no renormalising)")
    p.add_argument("--bias_update_speed", type=float, default=0.01,
                   help="auxiliary-loss-free balancing: each step, the routing bias of an overloaded expert goes down by "
                        "this, an underloaded one's up (V3: 0.001 over its long run; 0: off)")
    p.add_argument("--seq_aux_loss_coef", type=float, default=0.0001, help="sequence-wise balance loss weight (V3: 0.0001)")
    p.add_argument("--grad_checkpoint", action="store_true", help="recompute each block's activations in backward")
    p.add_argument("--show_routing", action="store_true", help="after the sample, the experts each token went to in "
                   "each MoE layer with their weights, and the tokens each expert took")
    p.add_argument("--dropout", type=float, help="on the attention weights and the residual branches")


def build_model(args, given, ckpt, env):
    """(model, tokenizer, note) for --init_from: our checkpoint's model (resume; the harness loads its weights), a
    Hugging Face DeepSeek-V3 (token ids if its tokenizer.json is none hf_tokenizer runs), or a fresh one: per head
    hd nope, hd / 2 rotary and hd value dimensions, hd = n_embd / n_head (V3's 128 / 64 / 128)."""
    run_time = {k: getattr(args, k) for k in RUN_TIME}
    if ckpt is not None:
        model, tokenizer = DeepSeek(Config(**{**ckpt["config"], **run_time})), load_tokenizer(ckpt["tokenizer"])
    elif args.init_from != "scratch":  # sampling keeps the checkpoint's dtype (load_dtype), training loads fp32
        tokenizer = pretrained_tokenizer(checkpoint_dir(args.init_from, weights=False), args.sample_only)
        model = from_pretrained(args.init_from, env.device, load_dtype(args, env),
                                **{k: v for k, v in run_time.items() if k in given or k == "dropout"})
    else:
        if args.n_embd % args.n_head or args.n_embd // args.n_head % 4:
            raise InputError(f"n_embd ({args.n_embd}) must be a multiple of n_head ({args.n_head}), in heads of a "
                             "multiple of 4 (the rotary part is half a head)")
        tokenizer, hd, dense = load_tokenizer(args.tokenizer), args.n_embd // args.n_head, -(-8 * args.n_embd // 3 // 64) * 64
        model = DeepSeek(Config(
            vocab_size=tokenizer.vocab_size, block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head,
            n_embd=args.n_embd, intermediate_size=dense, moe_intermediate_size=max(dense // 4, 8), n_expert=args.n_expert,
            n_shared_experts=args.n_shared_experts, top_k_experts=args.top_k_experts, n_group=args.n_group,
            topk_group=args.topk_group, first_k_dense_replace=min(1, args.n_layer - 1) if args.first_k_dense_replace
            is None else args.first_k_dense_replace, q_lora_rank=args.q_lora_rank,
            kv_lora_rank=args.kv_lora_rank or max(args.n_embd // 4, 1), qk_nope_head_dim=hd, qk_rope_head_dim=hd // 2,
            v_head_dim=hd, routed_scaling_factor=1.0, norm_topk_prob=args.scoring == "sigmoid", scoring=args.scoring,
            **run_time))
    cfg, model.grad_checkpoint = model.config, args.grad_checkpoint
    if args.block_size > cfg.block_size:  # the model's context ends there
        raise InputError(f"--block_size {args.block_size} is longer than the model's context ({cfg.block_size})")
    return model, tokenizer, (f" | {model.num_params(active=True) / 1e6:.2f}M active | {cfg.n_expert} routed experts, "
                              f"top {cfg.top_k_experts}, {cfg.n_shared_experts} shared")


def flops_per_token(model, T):
    """Training FLOPs per token at context T, for MFU: 6 per parameter a token computes with (top_k of the routed
    experts), plus attention with MLA's query/key and value dimensions (PaLM, appendix B)."""
    cfg = model.config
    qk, v = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    return 6 * model.num_params(active=True) + 6 * cfg.n_layer * cfg.n_head * (qk + v) * T


def schedule(it, args):  # (learning rate, weight decay) of step it: warmup and cosine, a constant weight decay
    return lr_at(it, args), args.weight_decay


def batches(args, tokenizer, env):  # batch(split) -> (x, y): DeepSeek learns from --data's text
    return text_batches(args, tokenizer, env)


def show_sample(model, tokenizer, args, env, title):
    """What a run shows at its end (or with --sample_only): the latent cache a token costs, then a sample (with
    --show_routing, then the experts of each of its tokens: the routed ones, their groups)."""
    cfg, itemsize = model.config, (env.dtype if env.dtype != torch.float32 else model.lm_head.weight.dtype).itemsize
    latent, mha = model.kv_bytes_per_token(itemsize)
    print(f"latent cache: {latent:,} bytes/token ((kv_lora_rank {cfg.kv_lora_rank} + rotary key "
          f"{cfg.qk_rope_head_dim}) x {cfg.n_layer} layers x {itemsize} bytes); MHA with the same "
          f"{cfg.n_head} heads would cache {mha:,}")
    routers = [moe.gate for moe in model.moe_layers()] if args.show_routing else []
    with recording(routers) as records:
        ids = sample(model, tokenizer, args, env.ctx, title)
    if routers:
        layers = range(cfg.first_k_dense_replace, cfg.n_layer)
        routes = [token_routes(r[:len(r) // args.num_samples]) for r in records]  # the first sample's: with its ids
        print(f"shared experts: {cfg.n_shared_experts} per MoE layer, always on: every token goes through them "
              f"besides the {cfg.top_k_experts} routed experts below ({cfg.scoring} gate, {cfg.n_group} groups)")
        groups = group_column(layers, routes) if cfg.n_group > 1 else None
        show_routing(ids, tokenizer, layers, routes, cfg.n_expert, groups)


def group_column(layers, routes):
    """--show_routing's last column in a grouped gate (V3's node-limited routing, V2's device-limited one): per MoE
    layer the topk_group groups of experts each token's experts were chosen from."""
    return ["groups " + " ".join(f"L{i} " + ",".join(map(str, sorted(r[2][t]))) for i, r in zip(layers, routes))
            for t in range(len(routes[0][2]))]


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
