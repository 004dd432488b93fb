"""BitNet b1.58 (and the original 1-bit BitNet) in one file: ternary-weight transformers, trained with
full-precision master weights, then packed four weights to a byte and run from the packed form.

Papers: Ma et al. 2024, "The Era of 1-bit LLMs: All Large Language Models are in 1.58 Bits", arXiv 2402.17764
(BitNet b1.58: every weight of every linear layer in {-1, 0, +1}, activations in 8 bits), with the authors'
"Training Tips, Code and FAQ" note; Wang et al. 2023, "BitNet: Scaling 1-bit Transformers for Large Language
Models", arXiv 2310.11453 (weights in {-1, +1}: `--weight_bits 1`); and Ma et al. 2025, "BitNet b1.58 2B4T
Technical Report", arXiv 2504.12285, whose released model fixes the block used here: a Llama block (RMSNorm,
rotary, grouped-query attention, no biases) with squared-ReLU in a gated feed-forward and a sub-norm (an
RMSNorm) before the attention output projection and before the feed-forward down projection.

What is here: BitLinear, the layer that replaces nn.Linear inside the blocks: absmean ternary (or sign
binary) weights with one scale per matrix, absmax 8-bit activations with one scale per token, a
straight-through estimator for both, so the full-precision master weights train; the embedding, the norms and
the output head stay in full precision, as in the papers. Packing: four 2-bit weights per byte in the layout of
the released microsoft/bitnet-b1.58-2B-4T checkpoint, the model run from that form with the same logits as the
training-time quantized forward, and its size printed next to fp16. Loading both Hugging Face BitNet layouts:
master weights quantized online (microsoft/bitnet-b1.58-2B-4T-bf16, or what `BitNetForCausalLM.save_pretrained`
writes with quantization_config {"linear_class": "autobitlinear", "quantization_mode": "online"}) and packed
weights (microsoft/bitnet-b1.58-2B-4T: "bitlinear", "offline"). Training on tiny-shakespeare (or any text file)
with AdamW, bf16 autocast, torch.compile and DistributedDataParallel; exact resume from atomic checkpoints.

The training recipe, where it differs from llama2.py (the FAQ note and the 2B4T report, section 3): a higher
learning rate than a full-precision model takes (a code only changes when its master weight crosses a rounding
boundary, so small steps do little), and with `--two_stage` their two-stage schedule: warmup and cosine decay for
the first half, then at the midpoint the learning rate is cut in half and decays again by cosine to --min_lr, and
weight decay is switched off (the report's "cooldown"); without it, warmup and one cosine, as the other files. The
CPU preset takes twice llama2.py's rate (6e-3: val 5.79 after its 200 steps, 5.86 at 3e-3). The CUDA preset keeps
llama2.py's 1e-3: there 500 steps are 27 passes over tiny-shakespeare, and higher rates lower the training loss
faster but overfit sooner (val after 500 steps on an H100: 4.66 at 1e-3, 4.78 at 2e-3, 4.89 at 3e-3, 5.03 at
6e-3); the higher rate is for the data-rich regime the papers train in. The quantizers' scales are recomputed at
every step, from the current master weights and activations.

What is not here: kernels that compute with 2-bit weights and int8 activations (bitnet.cpp, the authors'
GPU kernels): the matmul here is a float matmul on integer-valued tensors, exact (the codes are small integers,
exact in bf16 too) but no faster than a float model; the original BitNet's own activation scheme (the 1-bit
variant here uses b1.58's per-token 8-bit absmax activations and RMSNorm sub-norms) and its group quantization
for model parallelism; rope scalings; the chat template of the released model.

    python bitnet.py                                     # CPU: a tiny model, about three minutes
    python bitnet.py --device cuda                       # one GPU: bf16, torch.compile, 6 layers x 384
    python bitnet.py --weight_bits 1 --two_stage         # the original binary BitNet, the two-stage schedule
    torchrun --standalone --nproc_per_node 8 bitnet.py   # DDP on 8 GPUs
    python bitnet.py --init_from microsoft/bitnet-b1.58-2B-4T --sample_only --prompt "The capital of France is"

Offline (no download, no tiktoken files) it says so and carries on: the Python standard library's own source as
the text, raw UTF-8 bytes as the tokens. Every step's randomness (batches, dropout) is drawn from a seed made of
(--seed, iteration, rank), so `--init_from resume` continues exactly as an uninterrupted run would.
"""
import argparse
import json
import math
import os
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


class InputError(Exception):
    """Bad input from the user: the command line prints it as one line and exits with status 2."""


# ----------------------------------------------------------------------------------------- config

@dataclass
class Config:
    vocab_size: int = 128256             # vocab_size: real tokens; the embedding is padded to a multiple of 64
    block_size: int = 4096               # max_position_embeddings: the longest context
    n_layer: int = 30                    # num_hidden_layers
    n_head: int = 20                     # num_attention_heads (query heads)
    n_kv_head: int = 5                   # num_key_value_heads: n_head is MHA, 1 is MQA, in between GQA
    n_embd: int = 2560                   # hidden_size
    head_dim: int = 0                    # head_dim (0: n_embd // n_head)
    intermediate_size: int = 0           # intermediate_size: feed-forward width (0: 8/3 n_embd rounded up to 64)
    norm_eps: float = 1e-5               # rms_norm_eps
    rope_theta: float = 500000.0         # rope_theta
    tie_embeddings: bool = False         # tie_word_embeddings
    bos_token_id: int | None = None      # bos_token_id: put before the prompt when sampling
    weight_bits: float = 1.58            # 1.58: ternary weights (b1.58); 1: binary weights (BitNet 2023). No HF field
    dropout: float = 0.0                 # attention_dropout; also on the residual branches here (BitNet uses none)

    def __post_init__(self):
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
        if self.weight_bits not in (1, 1.58):
            raise InputError(f"weight_bits must be 1.58 (ternary) or 1 (binary), got {self.weight_bits}")
        if not 0.0 <= self.dropout < 1.0:
            raise InputError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def padded_vocab_size(self):  # 50257 -> 50304: matmul shapes that tile well on GPUs (128256 stays)
        return -(-self.vocab_size // 64) * 64


# ----------------------------------------------------------------------------------- quantization

def ste(x, q):
    """q in the forward pass, the identity's gradient in the backward: the straight-through estimator
    (Bengio et al. 2013, arXiv 1308.3432), which BitNet uses for both weights and activations (2310.11453
    section 2.3). The bracket is exactly 0, so the forward sees the codes q bit for bit."""
    return q.detach() + (x - x.detach())


def quantize_activations(x):
    """Absmax quantization to 8 bits, one scale per token (b1.58 section 2; BitNet eq. 4 with gamma = max|x|
    taken per token, as the released models do). x (..., d) -> (codes, s_x): integer codes in [-128, 127],
    held in a float tensor so that an ordinary matmul consumes them, and s_x = 127 / max|x| (..., 1), so
    x ~ codes / s_x. Computed in float32 whatever the input. The codes carry the straight-through gradient,
    the scale none."""
    x = x.float()
    s = (127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)).detach()
    z = x * s
    return ste(z, z.round().clamp(-128, 127)), s


def quantize_weights(w, bits):
    """One matrix -> (codes, s_w) with w ~ codes / s_w, one scale for the whole matrix.

    1.58 bits, absmean (b1.58 eqs. 1-3): gamma = mean|W|, codes = RoundClip(W / gamma, -1, 1) in {-1, 0, +1}.
    1 bit (BitNet eqs. 1-3): codes = Sign(W - alpha) in {-1, +1} with alpha = mean(W) (Sign sends 0 to -1), and
    the output is rescaled by beta = mean|W|, which is gamma again. So s_w = 1 / mean|W| in both."""
    w = w.float()
    s = (1.0 / w.abs().mean().clamp(min=1e-5)).detach()
    z = w * s
    return ste(z, torch.where(w > w.mean(), 1.0, -1.0) if bits == 1 else z.round().clamp(-1, 1)), s


def bit_matmul(x, codes, s_w):
    """y = x W^T for a quantized W: the matmul of 8-bit activation codes and weight codes, rescaled by both
    scales (BitNet section 2.1's dequantization, y = W~ x~ * beta gamma / Q_b; here beta = 1 / s_w and
    gamma / Q_b = 1 / s_x). Integers up to 127 and up to
    127 * in_features in the sums are exact in float32 (and the codes exact in bf16), so the training forward
    and the packed forward give the same numbers."""
    x_q, s_x = quantize_activations(x)
    return (F.linear(x_q, codes) / (s_x * s_w)).type_as(x)


class BitLinear(nn.Linear):
    """nn.Linear with a full-precision master weight that the forward pass only ever sees quantized. No bias
    (BitNet has none). Weight decay and AdamW act on the master weight; the gradient reaches it through the
    straight-through estimator."""

    def __init__(self, in_features, out_features, bits=1.58):
        super().__init__(in_features, out_features, bias=False)
        self.bits = bits

    def forward(self, x):
        return bit_matmul(x, *quantize_weights(self.weight, self.bits))


def pack_ternary(codes):
    """Weight codes (out, in) in {-1, 0, +1} -> uint8 (ceil(out / 4), in): the 2-bit layout of the released
    checkpoint and of transformers' BitLinear. code + 1 takes 2 bits, and byte [r, j] holds rows r, r + R,
    r + 2R, r + 3R of column j in bits 0-1, 2-3, 4-5, 6-7 (R = out / 4, rows padded to a multiple of 4)."""
    out, R = codes.size(0), -(-codes.size(0) // 4)
    u = F.pad((codes + 1).to(torch.uint8), (0, 0, 0, 4 * R - out)).view(4, R, -1)  # (4, R, in), values 0..2
    return u[0] | u[1] << 2 | u[2] << 4 | u[3] << 6


def unpack_ternary(packed, rows):
    """The inverse of pack_ternary: uint8 (R, in) -> float codes (rows, in) in {-1, 0, +1}."""
    u = torch.stack([packed >> shift & 3 for shift in (0, 2, 4, 6)])  # (4, R, in)
    return u.flatten(0, 1)[:rows].float() - 1


class PackedBitLinear(nn.Module):
    """A BitLinear for inference: the codes four to a byte (`weight`, uint8) and the scale s_w
    (`weight_scale`), the names and meaning of the released checkpoint. Each call unpacks the codes and
    computes exactly what BitLinear computed from the master weight: no master weight is kept."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(-(-out_features // 4), in_features, dtype=torch.uint8))
        self.register_buffer("weight_scale", torch.ones(1))

    def forward(self, x):
        return bit_matmul(x, unpack_ternary(self.weight, self.out_features), self.weight_scale)


@torch.no_grad()
def pack(model):
    """Replace every BitLinear of the model by a PackedBitLinear, in place, and return the model. The master
    weights are gone afterwards: the model samples, it does not train. Works on the meta device too (shapes)."""
    for name, m in list(model.named_modules()):
        if isinstance(m, BitLinear):
            codes, s_w = quantize_weights(m.weight, m.bits)
            packed = PackedBitLinear(m.in_features, m.out_features).to(m.weight.device)
            packed.weight, packed.weight_scale = pack_ternary(codes), s_w.reshape(1)
            model.set_submodule(name, packed)
    return model


def packed_size(model):
    """(bytes of the block linears packed, the same in fp16, bytes of everything else in fp16): the embedding,
    the head and the norms stay in full precision in both forms."""
    linears = [m for m in model.modules() if isinstance(m, (BitLinear, PackedBitLinear))]
    packed = sum(-(-m.out_features // 4) * m.in_features + 4 for m in linears)  # + a float32 scale each
    fp16 = sum(2 * m.out_features * m.in_features for m in linears)
    in_linears = {id(m.weight) for m in linears}
    others = {id(p): p for p in model.parameters() if id(p) not in in_linears}  # a tied head counted once
    return packed, fp16, sum(2 * p.numel() for p in others.values())


# ------------------------------------------------------------------------------------------ model

class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * g: LayerNorm without the mean and the bias (Zhang and Sennrich 2019, eq. 4).
    Computed in float32 whatever the input, as the reference does, then cast back."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)


def apply_rotary(x, cos, sin):
    """Rotate x (B, heads, T, head_dim) by its positions' angles (RoFormer, Su et al. 2021, arXiv 2104.09864,
    eq. 34); cos and sin are (T, head_dim), float32. Dimension i is paired with i + d/2 ("rotate half", the
    Hugging Face layout, so their weights load unchanged):
        x_i' = x_i cos(m theta_i) - x_{i+d/2} sin(m theta_i),   x_{i+d/2}' = x_{i+d/2} cos(m theta_i) + x_i sin(m theta_i)
    """
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat((-x2, x1), dim=-1) * sin).type_as(x)


class KVCache:
    """The keys and values of one layer for the tokens so far: (B, n_kv_head, length, head_dim) buffers, filled
    from position 0 on. Only the n_kv_head shared heads are stored."""

    def __init__(self, length):
        self.length, self.k, self.v = length, None, None

    def update(self, k, v, pos):
        """Write k, v (B, n_kv_head, T, head_dim) at positions pos..pos+T-1; return all keys and values so far."""
        if self.k is None:
            B, H, _, D = k.shape
            self.k, self.v = k.new_zeros(B, H, self.length, D), v.new_zeros(B, H, self.length, D)
        T = k.size(2)
        self.k[:, :, pos:pos + T], self.v[:, :, pos:pos + T] = k, v
        return self.k[:, :, :pos + T], self.v[:, :, :pos + T]


class Attention(nn.Module):
    """Grouped-query attention with BitLinear projections, and an RMSNorm (attn_sub_norm) on the heads'
    output before o_proj: the sub-norm the 2B4T report keeps from BitNet's SubLN, so that o_proj's 8-bit
    absmax quantization sees activations of a steady scale."""

    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim, self.dropout = cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.dropout
        bits = cfg.weight_bits
        self.q_proj = BitLinear(cfg.n_embd, cfg.n_head * cfg.head_dim, bits)
        self.k_proj = BitLinear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bits)
        self.v_proj = BitLinear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bits)
        self.attn_sub_norm = RMSNorm(cfg.n_head * cfg.head_dim, cfg.norm_eps)
        self.o_proj = BitLinear(cfg.n_head * cfg.head_dim, cfg.n_embd, bits)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, cache=None, pos=0):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)     # (B, n_head, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, n_kv_head, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, pos)
        # Query i sits at position pos + i and sees keys 0..pos + i: the causal mask from pos 0, no mask for one
        # new token, and for a chunk after a cache the mask shifted by pos (SDPA's is_causal aligns it top-left).
        mask = None if pos == 0 or T == 1 else torch.ones(T, pos + T, dtype=torch.bool, device=x.device).tril(pos)
        # softmax(q k^T / sqrt(head_dim)) v; enable_gqa: kv head h // (n_head / n_kv_head) serves query head h
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=pos == 0,
                                           dropout_p=self.dropout if self.training else 0.0, enable_gqa=True)
        return self.resid_dropout(self.o_proj(self.attn_sub_norm(y.transpose(1, 2).reshape(B, T, -1))))


class FeedForward(nn.Module):
    """down(sub_norm(ReLU(x W_gate)^2 * (x W_up))): the gated feed-forward of the 2B4T report (section 2), squared
    ReLU (So et al. 2021, Primer, arXiv 2109.08668) in place of SiLU, with an RMSNorm (ffn_sub_norm) before the
    down projection, as before o_proj."""

    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = BitLinear(cfg.n_embd, cfg.intermediate_size, cfg.weight_bits)
        self.up_proj = BitLinear(cfg.n_embd, cfg.intermediate_size, cfg.weight_bits)
        self.ffn_sub_norm = RMSNorm(cfg.intermediate_size, cfg.norm_eps)
        self.down_proj = BitLinear(cfg.intermediate_size, cfg.n_embd, cfg.weight_bits)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.down_proj(self.ffn_sub_norm(F.relu(self.gate_proj(x)).square() * self.up_proj(x))))


class Block(nn.Module):
    """Pre-normalisation, as Llama: RMSNorm on the input of each sub-block (and the sub-norms inside them)."""

    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = FeedForward(cfg)

    def forward(self, x, cos, sin, cache=None, pos=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class BitNet(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.model = nn.ModuleDict(dict(  # the Hugging Face names: model.embed_tokens, model.layers.N, model.norm
            embed_tokens=nn.Embedding(cfg.padded_vocab_size, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout),
            layers=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
            norm=RMSNorm(cfg.n_embd, cfg.norm_eps),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.padded_vocab_size, bias=False)  # full precision (b1.58 section 2)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # Initialisation: the papers give none. Normal with std 0.02 (Hugging Face's initializer_range), the two
        # projections that write into the residual stream scaled by 1/sqrt(2 n_layer), as GPT-2 does.
        for name, p in self.named_parameters():
            if p.dim() == 2:
                residual = name.endswith(("o_proj.weight", "down_proj.weight"))
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer) if residual else 0.02)

    def num_params(self, non_embedding=True):
        """Weights, packed ones counted one per weight, a tied embedding/head counted once; an untied input
        embedding (a lookup, no FLOPs) left out by default."""
        n = sum(p.numel() for p in self.parameters())
        n += sum(m.in_features * m.out_features for m in self.modules() if isinstance(m, PackedBitLinear))
        return n - self.model.embed_tokens.weight.numel() if non_embedding and not self.config.tie_embeddings else n

    def hidden(self, idx, cache=None, pos=0):
        """idx (B, T) token ids at positions pos..pos+T-1 -> final hidden states (B, T, n_embd)."""
        B, T = idx.shape
        if pos + T > self.config.block_size:
            raise ValueError(f"positions up to {pos + T} but block_size is {self.config.block_size}")
        d = self.config.head_dim
        inv_freq = 1.0 / self.config.rope_theta ** (torch.arange(0, d, 2, device=idx.device, dtype=torch.float32) / d)
        angles = torch.arange(pos, pos + T, device=idx.device, dtype=torch.float32)[:, None] * inv_freq  # (T, hd/2)
        angles = torch.cat((angles, angles), dim=-1)                        # (T, hd), the half layout
        cos, sin = angles.cos(), angles.sin()
        x = self.model.drop(self.model.embed_tokens(idx))                   # (B, T, n_embd); no position table
        for i, block in enumerate(self.model.layers):
            x = block(x, cos, sin, None if cache is None else cache[i], pos)
        return self.model.norm(x)

    def forward(self, idx, targets=None, cache=None, pos=0):
        """idx (B, T) token ids at positions pos..pos+T-1 -> logits (B, T, vocab_size), loss or None."""
        V, Vp = self.config.vocab_size, self.config.padded_vocab_size
        pad = None
        if Vp > V:  # the padding rows are no tokens: a bias of -inf gives them probability exactly 0
            pad = torch.zeros(Vp, device=idx.device, dtype=self.lm_head.weight.dtype)
            pad[V:] = float("-inf")
        logits = F.linear(self.hidden(idx, cache, pos), self.lm_head.weight, pad)  # (B, T, padded_vocab_size)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
        return logits[..., :V], loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, use_cache=True):
        """Append max_new_tokens sampled tokens to idx (B, T); temperature 0 is greedy. Runs as the model is:
        from the master weights, or from the packed codes after pack(model), with the same logits.

        With the cache each new token costs one position. Once the text is longer than block_size the window
        slides: the model sees the last block_size tokens from position 0 again, the cache no longer holds,
        and each token re-reads the whole window (as without a cache, and giving the same tokens).
        """
        length = min(idx.size(1) + max_new_tokens, self.config.block_size)
        cache, pos = [KVCache(length) for _ in self.model.layers] if use_cache else None, 0
        for _ in range(max_new_tokens):
            if cache is not None and idx.size(1) <= self.config.block_size:
                x = self.hidden(idx[:, pos:], cache, pos)
                pos = idx.size(1)
            else:
                cache = None
                x = self.hidden(idx[:, -self.config.block_size:])
            logits = self.lm_head(x[:, -1])[:, :self.config.vocab_size]  # only the last position is sampled
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
    if os.environ.get("HF_TOKEN"):  # gated or private repos need a token
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


def checkpoint_dir(name_or_path):
    """A local checkpoint directory for --init_from: the path itself, or a hub repo's config.json, weights
    (one file or sharded) and tokenizer.json downloaded into CACHE_DIR/<repo>."""
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
        if get("model.safetensors", optional=True) is None:
            index = json.loads(get("model.safetensors.index.json").read_text())
            for shard in sorted(set(index["weight_map"].values())):
                get(shard)
        get("tokenizer.json", optional=True)
    except requests.RequestException as e:
        raise InputError(f"cannot fetch '{name_or_path}' from {HF_ENDPOINT}: {e}") from None
    return local


def from_pretrained(name_or_path, device="cpu", dtype=torch.float32, dropout=0.0):
    """A BitNet b1.58 from a Hugging Face checkpoint, a hub id or a local directory with config.json and
    model.safetensors (or shards + model.safetensors.index.json), in either of the layouts transformers reads:

    - master weights, quantized at every forward: quantization_config {"quant_method": "bitnet",
      "linear_class": "autobitlinear", "quantization_mode": "online"} (microsoft/bitnet-b1.58-2B-4T-bf16).
      The model can train. Weights are converted to `dtype` (a bf16 checkpoint loads into float32 and back).
    - packed: "linear_class": "bitlinear", "quantization_mode": "offline" (microsoft/bitnet-b1.58-2B-4T): each
      block linear a uint8 `weight` of (out / 4, in), four codes per byte, and its `weight_scale` s_w. The
      model comes back packed (see pack): it samples, it cannot train.
    Returns the model in eval mode."""
    path = checkpoint_dir(name_or_path)
    try:
        hf = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read {path / 'config.json'}: {e}") from None
    if hf.get("model_type") != "bitnet":
        raise InputError(f"{path} holds a '{hf.get('model_type')}' model, not BitNet")
    for key, allowed in dict(hidden_act="relu2", attention_bias=False).items():
        if hf.get(key, allowed) != allowed:  # a variant this file does not implement must not load as BitNet
            raise InputError(f"{path}: {key} = {hf[key]} is a BitNet variant this file does not implement")
    # transformers 4 writes rope_theta and rope_scaling; transformers 5 writes both into rope_parameters
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise InputError(f"{path}: rope scaling {rope} is not implemented here")
    quant = hf.get("quantization_config") or {}
    layout = (quant.get("linear_class", "bitlinear"), quant.get("quantization_mode", "offline"))
    if quant.get("quant_method") != "bitnet":  # transformers would run the linears unquantized
        raise InputError(f"{path}: config.json has no BitNet quantization_config, so transformers runs it as a "
                         "full-precision model, which this file does not")
    if layout not in (("autobitlinear", "online"), ("bitlinear", "offline")) or quant.get("use_rms_norm") \
            or set(quant.get("modules_to_not_convert") or ["lm_head"]) != {"lm_head"}:
        raise InputError(f"{path}: quantization_config {quant} is not a layout this file reads (master weights: "
                         "autobitlinear online; packed: bitlinear offline; every block linear quantized)")
    cfg = Config(vocab_size=hf["vocab_size"], block_size=hf.get("max_position_embeddings", 2048),
                 n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"],
                 n_kv_head=hf.get("num_key_value_heads") or hf["num_attention_heads"], n_embd=hf["hidden_size"],
                 head_dim=hf.get("head_dim") or 0, intermediate_size=hf["intermediate_size"],
                 norm_eps=hf.get("rms_norm_eps", 1e-5), rope_theta=rope.get("rope_theta", hf.get("rope_theta", 500000.0)),
                 tie_embeddings=hf.get("tie_word_embeddings", False), bos_token_id=hf.get("bos_token_id"),
                 dropout=dropout)

    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    with torch.device("meta"):
        model = BitNet(cfg)  # shapes only: the weights come from the file, no time is spent on a random init
        if layout[1] == "offline":
            pack(model)
    wanted = model.state_dict()
    state = {}
    for fname in files:
        try:
            tensors = read_safetensors(path / fname)
        except (OSError, ValueError, KeyError) as e:
            raise InputError(f"cannot read {path / fname}: {e}") from None
        for name, t in tensors.items():
            if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and cfg.tie_embeddings):
                continue  # old files kept the rotary table (we compute it); a tied head is the embedding
            if name not in wanted:
                raise InputError(f"{path / fname}: unexpected tensor '{name}'")
            if name in ("model.embed_tokens.weight", "lm_head.weight"):  # pad the vocabulary rows with zeros
                t = F.pad(t, (0, 0, 0, cfg.padded_vocab_size - t.size(0)))
            if name.endswith("weight_scale") and t.numel() == 1:
                t = t.reshape(1)
            if t.shape != wanted[name].shape or (wanted[name].dtype == torch.uint8) != (t.dtype == torch.uint8):
                raise InputError(f"{path / fname}: '{name}' is {str(t.dtype).removeprefix('torch.')} "
                                 f"{tuple(t.shape)}, config.json implies "
                                 f"{str(wanted[name].dtype).removeprefix('torch.')} {tuple(wanted[name].shape)}")
            # packed codes stay uint8 and their scales float32; the rest takes `dtype`
            keep = t.dtype == torch.uint8 or name.endswith("weight_scale")
            state[name] = t.to(device=device, dtype=wanted[name].dtype if keep else dtype,
                               memory_format=torch.contiguous_format, copy=True)
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state.get("model.embed_tokens.weight")
    missing = [k for k in wanted if state.get(k) is None]
    if missing:
        raise InputError(f"{path}: checkpoint lacks {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    model.load_state_dict(state, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight  # assign=True replaced both: tie them again
    return model.eval()


GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def byte_decoder():
    """GPT-2's table from the printable characters that byte-level BPE vocabularies are written in back
    to bytes: printable Latin-1 bytes stand for themselves, the other 68 bytes for chr(256 + n)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(others)}}


def hf_tokenizer(path):
    """tiktoken Encoding for a Hugging Face tokenizer.json holding a byte-level BPE (Llama 3, GPT-2 style),
    or None when the file is something tiktoken cannot run (SentencePiece, as Llama 2's, or a normalizer).

    tiktoken merges the adjacent pair whose result has the lowest rank; tokenizer.json lists merges in
    priority order. The two agree when a token's id is its rank and ids grow along the merge list (checked
    here): so for Llama 3, whose tokenizer.json was converted from tiktoken's own file, and, as the tests
    show, for byte-level BPEs trained with the `tokenizers` package."""
    try:
        tok = json.loads(Path(path).read_text())
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
        if model.get("type") != "BPE" or tok.get("normalizer") or steps[-1].get("add_prefix_space"):
            return None
        to_byte, vocab = byte_decoder(), model["vocab"]
        specials = {t["content"]: t["id"] for t in tok.get("added_tokens", [])}
        ranks = {bytes(to_byte[c] for c in s): i for s, i in vocab.items() if s not in specials}
        last = -1
        for merge in model["merges"]:
            a, b = merge.split(" ") if isinstance(merge, str) else merge
            if vocab[a + b] < last:
                return None
            last = vocab[a + b]
        enc = tiktoken.Encoding(Path(path).parent.name or "tokenizer", pat_str=pattern, mergeable_ranks=ranks,
                                special_tokens=specials)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    known = set(ranks.values()) | set(specials.values())
    return (str(path), enc.encode_ordinary, lambda ids: enc.decode([i for i in ids if i in known], errors="replace"),
            enc.n_vocab)


# ------------------------------------------------------------------------------------------- data

def get_tokenizer(name):
    """(name, encode, decode, vocab_size) for "gpt2" (tiktoken's BPE), "bytes" (raw UTF-8, 256 ids), or the
    path of a checkpoint's tokenizer.json (see hf_tokenizer)."""
    if name == "gpt2":
        enc = tiktoken.get_encoding("gpt2")  # downloads the BPE files once, unless TIKTOKEN_CACHE_DIR has them
        return "gpt2", enc.encode_ordinary, lambda ids: enc.decode(ids, errors="replace"), enc.n_vocab
    if name == "bytes":
        return "bytes", lambda s: list(s.encode("utf-8")), lambda ids: bytes(ids).decode("utf-8", errors="replace"), 256
    tokenizer = hf_tokenizer(name)
    if tokenizer is None:
        raise InputError(f"the tokenizer {name} cannot be read (is the file still there?)")
    return tokenizer


def load_tokenizer(required=None):
    """GPT-2's BPE when its files can be had, else bytes; `required` names one that must be used."""
    if required not in (None, "gpt2"):
        return get_tokenizer(required)
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


def token_dtype(vocab_size):
    """uint16 holds GPT-2's and Llama 2's ids; Llama 3's 128K vocabulary needs uint32."""
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def prepare_data(data, tokenizer):
    """Tokenize --data once into data/<name>/{train,val}.bin (90/10 split, uint16 or uint32 as token_dtype says)
    + meta.json; return the dir.

    meta.json names the source and the tokenizer: a cache made another way is rebuilt, never misread."""
    name, text, fingerprint = read_text(data)
    out = HERE / "data" / name
    meta_path = out / "meta.json"
    meta = dict(fingerprint, tokenizer=tokenizer[0], vocab_size=tokenizer[3])
    if meta_path.exists() and {k: v for k, v in json.loads(meta_path.read_text()).items() if k in meta} == meta:
        return out
    ids = np.array(tokenizer[1](text), dtype=token_dtype(tokenizer[3]))
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


def get_batch(data_dir, split, batch_size, block_size, device, dtype=np.uint16):
    """batch_size random windows of the split: x (B, T) and y (B, T), y being x shifted by one token."""
    data = np.memmap(data_dir / f"{split}.bin", dtype=dtype, mode="r")
    start = torch.randint(len(data) - block_size, (batch_size,)).numpy()
    xy = torch.from_numpy(data[start[:, None] + np.arange(block_size + 1)].astype(np.int64))  # (B, T+1)
    x, y = xy[:, :-1], xy[:, 1:]
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


# --------------------------------------------------------------------------------------- training

def stage_two_from(args):
    """--two_stage: the iteration where the second stage (the 2B4T report's "cooldown") begins, half-way
    through the decay; None without --two_stage."""
    return max(args.warmup_iters, (args.lr_decay_iters or args.max_iters) // 2) if args.two_stage else None


def lr_at(it, args):
    """Linear warmup to --lr, then cosine decay to --min_lr at --lr_decay_iters, flat after. With --two_stage,
    the same curve up to the midpoint, where the rate drops to half of its value there and decays from it by a
    second cosine to --min_lr."""
    if it < args.warmup_iters:
        return args.lr * (it + 1) / args.warmup_iters
    decay_iters = args.lr_decay_iters or args.max_iters
    if it >= decay_iters:
        return args.min_lr

    def cosine(it, start, peak):  # peak at `start`, min_lr at decay_iters
        ratio = (it - start) / max(1, decay_iters - start)
        return args.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (peak - args.min_lr)

    mid = stage_two_from(args)
    if mid is None or it < mid:
        return cosine(it, args.warmup_iters, args.lr)
    return cosine(it, mid, 0.5 * cosine(mid, args.warmup_iters, args.lr))


def weight_decay_at(it, args):
    """--weight_decay, and 0 in the second stage of --two_stage (the 2B4T report, section 3)."""
    mid = stage_two_from(args)
    return 0.0 if mid is not None and it >= mid else args.weight_decay


def configure_optimizer(model, args, device):
    """AdamW; weight decay on the matrices (the master weights, embeddings), none on the norms. The first group
    is the decayed one (weight_decay_at sets its rate at each step)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda")


@torch.no_grad()
def estimate_loss(model, data_dir, args, device, ctx, dtype):
    """Mean loss over --eval_iters batches per split; the same batches at every eval (seeded by --seed)."""
    model.eval()
    torch.manual_seed(args.seed)
    out = {}
    for split in ("train", "val"):
        losses = torch.zeros(args.eval_iters)
        for k in range(args.eval_iters):
            x, y = get_batch(data_dir, split, args.batch_size, args.block_size, device, dtype)
            with ctx:
                losses[k] = model(x, y)[1].float()
        out[split] = losses.mean().item()
    model.train()
    return out


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
# costs more than the whole model), small on a GPU; the shapes are llama2.py's, the CPU learning rate higher (the
# docstring says why the CUDA one is not). BitNet trains without dropout; on a 1 MB text a small model overfits
# without it, hence 0.2 on the GPU.
PRESETS = {
    "cpu": dict(n_layer=4, n_head=4, n_kv_head=2, n_embd=128, block_size=64, batch_size=8, max_iters=200,
                eval_interval=100, eval_iters=10, log_interval=25, lr=6e-3, min_lr=6e-4, warmup_iters=20, dropout=0.0),
    "cuda": dict(n_layer=6, n_head=6, n_kv_head=2, n_embd=384, block_size=256, batch_size=64, max_iters=500,
                 eval_interval=100, eval_iters=50, log_interval=50, lr=1e-3, min_lr=1e-4, warmup_iters=50, dropout=0.2),
}
MODEL_FLAGS = ("n_layer", "n_head", "n_kv_head", "n_embd", "intermediate_size", "rope_theta",
               "tie_embeddings", "weight_bits")  # fixed by a checkpoint
RUN_FLAGS = ("device", "dtype", "compile", "init_from", "sample_only", "out_dir", "tensorboard",
             "prompt", "max_new_tokens", "temperature", "top_k", "top_p")  # never taken from a checkpoint


def parse_args(argv):
    p = argparse.ArgumentParser(description="Train BitNet or sample from it (see the module docstring).")
    cpu, gpu = PRESETS["cpu"], PRESETS["cuda"]

    def preset(name):
        return f"default {cpu[name]} on CPU, {gpu[name]} on CUDA"

    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="auto: cuda, else mps, else cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bf16 autocast on CUDA (fp16 + GradScaler without bf16), float32 elsewhere")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on for CUDA, off elsewhere)")
    p.add_argument("--data", default="shakespeare", help="'shakespeare' or a path to a UTF-8 text file")
    p.add_argument("--out_dir", default=None, help="checkpoints and metrics (default out/bitnet)")
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
    p.add_argument("--n_kv_head", type=int, help=preset("n_kv_head") + " (key/value heads: n_head is MHA, 1 is MQA)")
    p.add_argument("--n_embd", type=int, help=preset("n_embd"))
    p.add_argument("--intermediate_size", type=int, help="feed-forward width (default: 8/3 n_embd, rounded up to 64)")
    p.add_argument("--rope_theta", type=float, help="rotary base (default 500000, as the released model)")
    p.add_argument("--tie_embeddings", action=argparse.BooleanOptionalAction, default=None,
                   help="share the embedding with the output head (default: untied)")
    p.add_argument("--weight_bits", type=float, choices=[1.58, 1.0],
                   help="1.58: ternary weights, BitNet b1.58 (default); 1: binary weights, the original BitNet")
    p.add_argument("--two_stage", action=argparse.BooleanOptionalAction, default=None,
                   help="the b1.58 two-stage schedule: at mid-decay the learning rate halves and weight decay stops")
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
                "lr_decay_iters", "max_new_tokens", "intermediate_size", "rope_theta")
    for name in positive:
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise InputError(f"--{name} must be positive, got {getattr(args, name)}")
    for name in ("lr", "min_lr", "warmup_iters", "weight_decay", "grad_clip", "patience", "temperature", "top_k"):
        if getattr(args, name) < 0:
            raise InputError(f"--{name} must not be negative, got {getattr(args, name)}")
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
        print(f"bitnet.py: error: {' '.join(str(e).split())}", file=sys.stderr)  # one line, whatever the message
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(args, given):
    device, dtype, use_compile, rank, world = setup_device(args)
    master = rank == 0
    out_dir = Path(args.out_dir or "out/bitnet")
    ckpt_path = out_dir / "ckpt.pt"

    torch.manual_seed(args.seed)  # the initial weights; each training step reseeds (see step_seed)

    # --- where the weights come from: a checkpoint of ours, a pretrained BitNet, or a fresh init
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
        model = BitNet(cfg)
        model.load_state_dict(ckpt["model"])
    elif args.init_from != "scratch":  # sampling keeps the weights in the run's dtype (bf16 on CUDA), training in fp32
        path = checkpoint_dir(args.init_from)
        model = from_pretrained(path, device, dtype if args.sample_only else torch.float32, args.dropout).train()
        cfg = model.config
        if not args.sample_only and not any(isinstance(m, BitLinear) for m in model.modules()):
            raise InputError(f"{args.init_from} holds packed weights (bitlinear, offline): there are no master "
                             "weights to train; use --sample_only, or a master-weight checkpoint (the -bf16 one)")
        tokenizer = hf_tokenizer(path / "tokenizer.json")  # None: no tokenizer tiktoken can run
        if tokenizer is None and not args.sample_only:
            raise InputError(f"{path} has no tokenizer.json that tiktoken can read, so it cannot be trained on "
                             "text; --sample_only shows token ids")
        if tokenizer is not None and tokenizer[3] > cfg.vocab_size:
            raise InputError(f"{path}: the tokenizer has {tokenizer[3]:,} tokens, the model only {cfg.vocab_size:,}")
    else:
        tokenizer = load_tokenizer()
        cfg = Config(vocab_size=tokenizer[3], block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head,
                     n_kv_head=args.n_kv_head, n_embd=args.n_embd, intermediate_size=args.intermediate_size or 0,
                     rope_theta=args.rope_theta or 500000.0, tie_embeddings=bool(args.tie_embeddings),
                     weight_bits=args.weight_bits or 1.58, dropout=args.dropout)
        model = BitNet(cfg)
    for k in MODEL_FLAGS:
        if k in given and getattr(args, k) != getattr(cfg, k):
            raise InputError(f"--{k} {getattr(args, k)} does not match the model from --init_from "
                             f"{args.init_from}, which has {k} {getattr(cfg, k)}")
    if args.block_size > cfg.block_size:
        raise InputError(f"--block_size {args.block_size} is longer than the model's context ({cfg.block_size})")
    model.to(device)
    ctx = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    tokens_per_step = args.batch_size * args.block_size * args.grad_accum * world
    if master:
        print(f"bitnet | {device} | {str(dtype).removeprefix('torch.')} | compile {'on' if use_compile else 'off'} | "
              f"{model.num_params() / 1e6:.2f}M params, {cfg.weight_bits:g}-bit weights | "
              f"{tokens_per_step:,} tokens/step | "
              f"data {args.data} | tokenizer {tokenizer[0] if tokenizer else 'none (token ids)'} | "
              f"init {args.init_from}" + (f" | DDP x{world}" if world > 1 else ""))

    def sample(title):
        torch.manual_seed(args.seed)
        bos = [] if cfg.bos_token_id is None else [cfg.bos_token_id]
        if tokenizer is None:
            print(f"no tokenizer tiktoken can read in {args.init_from}: the prompt is not used, the sample starts "
                  f"from token {bos or [0]} and is shown as token ids")
            prompt = bos or [0]
        else:
            prompt = bos + tokenizer[1](args.prompt) or [0]  # a prompt longer than block_size: generate slides
        pack(model)  # sample from the packed form (the checkpoint keeps the master weights)
        linears, linears_fp16, others_fp16 = packed_size(model)
        print(f"packed: block linears {linears / 1e6:,.3f} MB at 2 bits per weight vs {linears_fp16 / 1e6:,.3f} MB "
              f"in fp16 ({linears_fp16 / linears:.1f}x smaller); whole model {(linears + others_fp16) / 1e6:,.3f} MB "
              f"vs {(linears_fp16 + others_fp16) / 1e6:,.3f} MB (embeddings, head and norms in fp16 in both)")
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
    tokens = token_dtype(meta["vocab_size"])  # the .bin files' integer type
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
    attn_width = cfg.n_head * cfg.head_dim
    flops_per_token = 6 * model.num_params() + 12 * cfg.n_layer * attn_width * args.block_size  # PaLM, app. B
    loss_sum, loss_count = torch.zeros((), device=device), 0
    t_log, iters_logged, t_start = time.perf_counter(), iter_num, time.time()
    train_model.train()
    while iter_num < args.max_iters:
        lr = lr_at(iter_num, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.param_groups[0]["weight_decay"] = weight_decay_at(iter_num, args)
        torch.manual_seed(step_seed(args.seed, iter_num, rank))
        for micro in range(args.grad_accum):
            x, y = get_batch(data_dir, "train", args.batch_size, args.block_size, device, tokens)
            if world > 1:  # all-reduce the gradients only on the last micro-step
                train_model.require_backward_grad_sync = micro == args.grad_accum - 1
            with ctx:
                _, loss = train_model(x, y)
            scaler.scale(loss / args.grad_accum).backward()
            loss_sum += loss.detach()
            loss_count += 1
        if args.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        iter_num += 1

        if master and (iter_num % args.log_interval == 0 or iter_num == args.max_iters):
            train_loss = (loss_sum / loss_count).item()  # the one host sync, every log_interval steps
            dt = (time.perf_counter() - t_log) / (iter_num - iters_logged)
            tok_s = tokens_per_step / dt
            mfu = flops_per_token * tok_s / (peak * world) if peak else None
            if not math.isfinite(train_loss):
                diverged(f"iter {iter_num} | loss {train_loss}")
            print(f"iter {iter_num} | loss {train_loss:.4f} | lr {lr:.2e} | {dt * 1000:.1f} ms | {tok_s:,.0f} tok/s"
                  + (f" | mfu {100 * mfu:.1f}%" if mfu else ""))
            log(dict(iter=iter_num, loss=train_loss, lr=lr, ms=dt * 1000, tok_s=tok_s, mfu=mfu))
            loss_sum, loss_count, t_log, iters_logged = torch.zeros((), device=device), 0, time.perf_counter(), iter_num

        if iter_num % args.eval_interval == 0 or iter_num == args.max_iters:
            t_eval, stop = time.perf_counter(), torch.zeros((), device=device)
            if master:
                losses = estimate_loss(eval_model, data_dir, args, device, ctx, tokens)
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
                log(dict(iter=iter_num, train=losses["train"], val=losses["val"]))
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
