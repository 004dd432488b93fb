"""Infini-attention in one file: a Llama-style decoder whose attention runs segment by segment, with a compressive
memory carried from segment to segment, so the state it keeps is the same size at any length of context.

Paper: Munkhdalai, Faruqui and Gopal 2024, "Leave No Context Behind: Efficient Infinite Context Transformers with
Infini-attention", arXiv 2404.07143, section 2. Inside a segment of --segment_len tokens: causal dot-product
attention with rotary positions (RoFormer, arXiv 2104.09864). Across segments: per layer and per key/value head a
memory M (d_key x d_value) and a normaliser z (d_key), written with each finished segment's keys and values and
read by the next segments' queries, as linear attention (Katharopoulos et al. 2020, arXiv 2006.16236) with
sigma = ELU + 1: retrieval A_mem = sigma(Q) M / (sigma(Q) z) (eq. 3), then the update, either linear
M += sigma(K)^T V (eq. 4) or delta M += sigma(K)^T (V - sigma(K) M / (sigma(K) z)) (eq. 5, Schlag et al. 2021),
and z += sum_t sigma(K_t). A learned gate per head mixes the two: A = sigmoid(beta) A_mem + (1 - sigmoid(beta)) A_dot
(eq. 6). The rest is Llama's (llama2.py): RMSNorm, SwiGLU, grouped-query attention, no biases.

Choices the paper leaves open, made here and said once: memory keys and queries carry no position (the rotary
angles are applied only to the local attention's copies); a segment reads the memory as it was when the segment
began (retrieval before update); an empty memory (the first segment) is read as nothing at all, so there the
output is the local attention alone, exactly (no 0/0, no gate), which makes a converted Llama give the base
model's logits on any text no longer than one segment; rotary positions restart at 0 in every segment (scores
inside a segment depend only on distances, so this changes nothing there, and no position ever exceeds
--segment_len, however long the context); with grouped-query attention the memory is per key/value head, read by
the query heads of its group. Training runs over --block_size = segments x segment_len tokens with gradients
through the memory (back-propagation through all segments of the sequence). The gates' parameters take no weight
decay and their own learning rate (--gate_lr): public attempts to reproduce the paper found that at the model's
rate the gates hardly move.

What is here: the model; `generate` with a state per layer of one segment's keys and values plus the memory, the
same bytes at 1K and at 100K tokens of context; `from_pretrained` turning a Hugging Face Llama checkpoint into an
Infini-attention model (the paper's continual pre-training setting); training on tiny-shakespeare (or any text
file) and on a synthetic passkey-retrieval task (`--task passkey`, with accuracy by context length, with the
memory and with it gated off); bf16 autocast, torch.compile, DistributedDataParallel, exact resume. What is not:
the paper's 1M-token passkey and 500K-token book-summary experiments (its models are 1B and 8B, trained on far more
text), and fused kernels (the memory is plain matmuls).

    python infini_attention.py                                     # CPU: a tiny model, about three minutes
    python infini_attention.py --device cuda                       # one GPU: bf16, torch.compile
    python infini_attention.py --task passkey --device cuda        # passkey retrieval, accuracy by length
    torchrun --standalone --nproc_per_node 8 infini_attention.py   # DDP on 8 GPUs
    HF_TOKEN=... python infini_attention.py --init_from meta-llama/Llama-3.2-1B --segment_len 512 --block_size 2048

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
    vocab_size: int = 32000              # vocab_size: real tokens; the embedding is padded to a multiple of 64
    segment_len: int = 2048              # N: the local attention's span (no HF field; the paper's N = 2048)
    n_layer: int = 32                    # num_hidden_layers
    n_head: int = 32                     # num_attention_heads (query heads)
    n_kv_head: int = 32                  # num_key_value_heads: one memory per key/value head
    n_embd: int = 4096                   # hidden_size
    head_dim: int = 0                    # head_dim (0: n_embd // n_head)
    intermediate_size: int = 0           # intermediate_size: SwiGLU width (0: 8/3 n_embd rounded up to 64)
    norm_eps: float = 1e-5               # rms_norm_eps
    rope_theta: float = 10000.0          # rope_theta
    rope_scaling: dict | None = None     # rope_scaling / rope_parameters: {"rope_type": "llama3" or "linear", ...}
    tie_embeddings: bool = False         # tie_word_embeddings
    bos_token_id: int | None = None      # bos_token_id: put before the prompt when sampling
    memory_update: str = "delta"         # "linear" (eq. 4) or "delta" (eq. 5)
    gate_init: float = 0.0               # beta at init: sigmoid(0) = 0.5 mixes memory and local attention evenly
    dropout: float = 0.0                 # attention_dropout; also on the residual branches here (Llama uses none)

    def __post_init__(self):
        for name in ("vocab_size", "segment_len", "n_layer", "n_head", "n_kv_head", "n_embd"):
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
        if self.memory_update not in ("linear", "delta"):
            raise InputError(f"memory_update must be 'linear' or 'delta', got '{self.memory_update}'")
        if not 0.0 <= self.dropout < 1.0:
            raise InputError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.rope_scaling and self.rope_scaling.get("rope_type") not in ("llama3", "linear"):
            raise InputError(f"rope scaling '{self.rope_scaling.get('rope_type')}' is not implemented here "
                             "(this file has llama3 and linear)")

    @property
    def padded_vocab_size(self):  # 50257 -> 50304: matmul shapes that tile well on GPUs (32000, 128256 stay)
        return -(-self.vocab_size // 64) * 64


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


def rope_frequencies(cfg, device=None):
    """theta_i = rope_theta^(-2i/d), i = 0..d/2-1 (RoFormer section 3.2.2), rescaled as a converted Llama 3.1
    checkpoint asks: "llama3" (wavelengths longer than original_max_position_embeddings / low_freq_factor
    stretched by `factor`, shorter than original / high_freq_factor kept, smooth between) or "linear" (all / factor).
    """
    d = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d)  # (d/2,)
    s = cfg.rope_scaling
    if s and s["rope_type"] == "linear":
        return inv_freq / s["factor"]
    if s and s["rope_type"] == "llama3":
        old_len, factor = s["original_max_position_embeddings"], s["factor"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
        mixed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > old_len / s["low_freq_factor"], inv_freq / factor,
                               torch.where(wavelen < old_len / s["high_freq_factor"], inv_freq, mixed))
    return inv_freq


def apply_rotary(x, cos, sin):
    """Rotate x (B, heads, T, head_dim) by its positions' angles; cos and sin are (T, head_dim), float32. Dimension
    i is paired with i + d/2 ("rotate half", the Hugging Face layout, so their weights load unchanged):
        x_i' = x_i cos(m theta_i) - x_{i+d/2} sin(m theta_i),   x_{i+d/2}' = x_{i+d/2} cos(m theta_i) + x_i sin(m theta_i)
    """
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat((-x2, x1), dim=-1) * sin).type_as(x)


def elu1(x):
    """sigma(x) = ELU(x) + 1 > 0, the feature map of the memory's linear attention (section 2.1.2), in float32."""
    return F.elu(x.float()) + 1


class MemoryState:
    """What one layer carries from call to call: the compressive memory M (B, n_kv_head, d, d) and z
    (B, n_kv_head, d), float32, None while empty; and the keys and values of the current, unfinished segment,
    (B, n_kv_head, filled, d), without rotary (added at each use). Its size is bounded by one segment."""

    def __init__(self):
        self.M = self.z = self.k = self.v = None
        self.filled = 0  # tokens of the current segment seen so far, < segment_len

    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in (self.M, self.z, self.k, self.v) if t is not None)


def retrieve(s, M, z):
    """A_mem = sigma(q) M / (sigma(q) z) (eq. 3) for features s = sigma(q) (B, H_kv, n, d), each row read by its own
    key/value head's memory. The denominator is a sum of positive terms once the memory holds a segment; the clamp
    only guards the exact zeros of an empty row."""
    with torch.autocast(s.device.type, enabled=False):  # the memory is read and written in float32
        return (s @ M) / (s @ z.unsqueeze(-1)).clamp(min=1e-6)


class Attention(nn.Module):
    """Infini-attention (Figure 1, section 2.1): local causal attention inside the segment, the memory's retrieval,
    a gated sum, then o_proj. Projections named as Hugging Face's Llama, so its weights load unchanged."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.n_head, self.n_kv_head, self.head_dim, self.dropout = cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.dropout
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=False)
        self.gate = nn.Parameter(torch.full((cfg.n_head,), cfg.gate_init))  # beta, one per query head (eq. 6)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, state):
        """x (B, T, C) continuing `state` (updated in place); T any length: cut at the segment boundaries."""
        outs, t = [], 0
        while t < x.size(1):  # a loop over segments (a few), not over tokens
            n = min(x.size(1) - t, self.cfg.segment_len - state.filled)
            outs.append(self.segment(x[:, t:t + n], cos, sin, state))
            t += n
        return self.resid_dropout(self.o_proj(torch.cat(outs, dim=1)))

    def segment(self, x, cos, sin, state):
        """x (B, T, C): the next T tokens of the current segment (filled + T <= segment_len) -> (B, T, n_head * d)."""
        B, T, _ = x.shape
        H, Hkv, d, p = self.n_head, self.n_kv_head, self.head_dim, state.filled
        q = self.q_proj(x).view(B, T, H, d).transpose(1, 2)                   # (B, H, T, d), no position yet
        k = self.k_proj(x).view(B, T, Hkv, d).transpose(1, 2)                 # (B, Hkv, T, d)
        v = self.v_proj(x).view(B, T, Hkv, d).transpose(1, 2)
        if p:
            k, v = torch.cat((state.k, k), dim=2), torch.cat((state.v, v), dim=2)  # the segment so far
        # local attention (eq. 2): rotary at positions p..p+T-1 of this segment, causal, keys 0..p+T-1
        mask = None if p == 0 or T == 1 else torch.ones(T, p + T, dtype=torch.bool, device=x.device).tril(p)
        a_dot = F.scaled_dot_product_attention(apply_rotary(q, cos[p:p + T], sin[p:p + T]),
                                               apply_rotary(k, cos[:p + T], sin[:p + T]), v, attn_mask=mask,
                                               is_causal=p == 0, dropout_p=self.dropout if self.training else 0.0,
                                               enable_gqa=True)                # (B, H, T, d)
        if state.M is not None:  # retrieval from the memory of the segments before (none: local attention alone)
            a_mem = retrieve(elu1(q.reshape(B, Hkv, H // Hkv * T, d)), state.M, state.z)  # kv head's query group
            g = torch.sigmoid(self.gate.float()).view(1, H, 1, 1)
            a_dot = (g * a_mem.reshape(B, H, T, d) + (1 - g) * a_dot.float()).type_as(a_dot)  # eq. 6
        state.k, state.v, state.filled = k, v, p + T
        if state.filled == self.cfg.segment_len:  # the segment is complete: write it into the memory
            self.update(state)
        return a_dot.transpose(1, 2).reshape(B, T, H * d)

    def update(self, state):
        """Write the finished segment's keys and values into M and z (eqs. 4-5); start an empty segment."""
        sk, v = elu1(state.k), state.v.float()                                 # (B, Hkv, N, d)
        if state.M is not None and self.cfg.memory_update == "delta":  # write only what the memory does not
            v = v - retrieve(sk, state.M, state.z)                              # already return for these keys
        with torch.autocast(v.device.type, enabled=False):
            write = sk.transpose(-1, -2) @ v                                   # (B, Hkv, d, d)
        # the memory before the first segment is M = 0, z = 0: the first write is the memory
        state.M = write if state.M is None else state.M + write
        state.z = sk.sum(dim=2) if state.z is None else state.z + sk.sum(dim=2)  # (B, Hkv, d)
        state.k = state.v = None
        state.filled = 0


class FeedForward(nn.Module):
    """SwiGLU (Shazeer 2020, eq. 6 without biases): W_down (SiLU(x W_gate) * (x W_up)), as Llama."""

    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.n_embd, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class Block(nn.Module):
    """Pre-normalisation, as Llama: RMSNorm on the input of each sub-block."""

    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = FeedForward(cfg)

    def forward(self, x, cos, sin, state):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, state)
        return x + self.mlp(self.post_attention_layernorm(x))


class InfiniTransformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.model = nn.ModuleDict(dict(  # the Hugging Face Llama names: model.embed_tokens, model.layers.N, model.norm
            embed_tokens=nn.Embedding(cfg.padded_vocab_size, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout),
            layers=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
            norm=RMSNorm(cfg.n_embd, cfg.norm_eps),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.padded_vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # Initialisation as llama2.py: normal, std 0.02, the residual projections scaled by 1/sqrt(2 n_layer)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                residual = name.endswith(("o_proj.weight", "down_proj.weight"))
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer) if residual else 0.02)

    def num_params(self, non_embedding=True):
        """Parameters, a tied embedding/head counted once; an untied input embedding (a lookup, no FLOPs)
        left out by default."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.model.embed_tokens.weight.numel() if non_embedding and not self.config.tie_embeddings else n

    def new_state(self):
        """An empty state per layer, for a fresh sequence."""
        return [MemoryState() for _ in self.model.layers]

    def hidden(self, idx, state=None):
        """idx (B, T) token ids continuing `state` (a fresh sequence if None) -> final hidden states (B, T, n_embd)."""
        state = self.new_state() if state is None else state
        angles = torch.arange(self.config.segment_len, device=idx.device, dtype=torch.float32)[:, None] \
            * rope_frequencies(self.config, idx.device)                        # (N, d/2): positions in a segment
        angles = torch.cat((angles, angles), dim=-1)                           # (N, d), the half layout
        cos, sin = angles.cos(), angles.sin()
        x = self.model.drop(self.model.embed_tokens(idx))                      # (B, T, n_embd)
        for block, layer_state in zip(self.model.layers, state):
            x = block(x, cos, sin, layer_state)
        return self.model.norm(x)

    def forward(self, idx, targets=None, state=None):
        """idx (B, T) -> logits (B, T, vocab_size), loss or None. T is any length: the sequence is processed
        segment by segment, continuing `state` when given (it is updated in place)."""
        V, Vp = self.config.vocab_size, self.config.padded_vocab_size
        pad = None
        if Vp > V:  # the padding rows are no tokens: a bias of -inf gives them probability exactly 0
            pad = torch.zeros(Vp, device=idx.device, dtype=self.lm_head.weight.dtype)
            pad[V:] = float("-inf")
        logits = F.linear(self.hidden(idx, state), self.lm_head.weight, pad)  # (B, T, padded_vocab_size)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
        return logits[..., :V], loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, use_cache=True):
        """Append max_new_tokens sampled tokens to idx (B, T); temperature 0 is greedy.

        With the state (use_cache) each new token costs one position: the prompt is read once, then each token
        attends to its segment so far and reads the memory. Without it each token re-reads the whole text from an
        empty state, giving the same tokens. Either way the context has no length limit.
        """
        state = self.new_state() if use_cache else None
        for i in range(max_new_tokens):
            x = self.hidden(idx[:, -1:], state) if use_cache and i else self.hidden(idx, state)
            logits = self.lm_head(x[:, -1])[:, :self.config.vocab_size]  # only the last position is sampled
            idx = torch.cat([idx, sample_next(logits.float(), temperature, top_k, top_p)], dim=1)
        return idx

    def state_bytes(self, state):
        return sum(s.nbytes() for s in state)


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
    if os.environ.get("HF_TOKEN"):  # gated repos (meta-llama/*) need a token that accepted the licence
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


def from_pretrained(name_or_path, device="cpu", dtype=torch.float32, dropout=0.0, segment_len=None,
                    memory_update="delta", gate_init=0.0):
    """An Infini-attention model from a Hugging Face Llama checkpoint (the paper's continual pre-training setting,
    section 4.2): a hub id ("meta-llama/Llama-3.2-1B", "TinyLlama/TinyLlama-1.1B-Chat-v1.0", ...) or a local
    directory with config.json and model.safetensors (or shards + model.safetensors.index.json). The Llama's
    weights are taken as they are; the gates, which it lacks, start at gate_init; segment_len (default: the
    checkpoint's max_position_embeddings) must not exceed the positions the model was trained on. On a text no
    longer than one segment the memory is empty and the result is the Llama's logits. Weights are converted to
    `dtype` on the way in. Returns the model in eval mode."""
    path = checkpoint_dir(name_or_path)
    try:
        hf = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read {path / 'config.json'}: {e}") from None
    if hf.get("model_type") != "llama":
        raise InputError(f"{path} holds a '{hf.get('model_type')}' model, not Llama")
    for key, allowed in dict(hidden_act="silu", attention_bias=False, mlp_bias=False).items():
        if hf.get(key, allowed) != allowed:  # a variant this file does not implement must not load as Llama
            raise InputError(f"{path}: {key} = {hf[key]} is a Llama variant this file does not implement")
    # transformers 4 writes rope_theta and rope_scaling; transformers 5 writes both into rope_parameters
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    max_positions = hf.get("max_position_embeddings", 2048)
    if segment_len is not None and segment_len > max_positions:
        raise InputError(f"--segment_len {segment_len} is longer than the {max_positions} positions {path} was "
                         "trained on")
    cfg = Config(vocab_size=hf["vocab_size"], segment_len=segment_len or max_positions,
                 n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"],
                 n_kv_head=hf.get("num_key_value_heads") or hf["num_attention_heads"], n_embd=hf["hidden_size"],
                 head_dim=hf.get("head_dim") or 0, intermediate_size=hf["intermediate_size"],
                 norm_eps=hf.get("rms_norm_eps", 1e-6),
                 rope_theta=rope.pop("rope_theta", hf.get("rope_theta", 10000.0)),
                 rope_scaling=None if rope_type == "default" else dict(rope, rope_type=rope_type),
                 tie_embeddings=hf.get("tie_word_embeddings", False), bos_token_id=hf.get("bos_token_id"),
                 memory_update=memory_update, gate_init=gate_init, dropout=dropout)

    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    with torch.device("meta"):
        model = InfiniTransformer(cfg)  # shapes only: the weights come from the file, no time is spent on a random init
    wanted, state = model.state_dict(), {}
    for name in wanted:
        if name.endswith("self_attn.gate"):  # new in Infini-attention: not in the checkpoint
            state[name] = torch.full(wanted[name].shape, gate_init, device=device, dtype=dtype)
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
            if t.shape != wanted[name].shape:
                raise InputError(f"{path / fname}: '{name}' has shape {tuple(t.shape)}, config.json implies "
                                 f"{tuple(wanted[name].shape)}")
            state[name] = t.to(device=device, dtype=dtype, memory_format=torch.contiguous_format, copy=True)
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


PASSKEY_EXAMPLES = 100  # per context length, in the accuracy table
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def passkey_batch(encode, batch_size, length, device):
    """(x, y, answer), for passkey retrieval (Mohtashami and Jaggi 2023, arXiv 2305.16300; the paper's section
    4.1): filler sentences, at a random depth "The pass key is K. Remember it. K is the pass key.", then "What is
    the pass key? The pass key is" and the key K, a random 5-digit number. x and y (B, length) are the sequence
    and the next tokens, trained on as language modelling (the second K of the needle teaches copying within a
    segment; the answer needs the memory once the needle is segments away); answer (B, length) is y with -1
    everywhere but the key's tokens, for the accuracy. Drawn with torch's global generator (seeded per step)."""
    filler, question = encode(PASSKEY_FILLER), encode("What is the pass key? The pass key is")
    xs, answers = [], []
    for key in torch.randint(10000, 100000, (batch_size,)).tolist():  # a loop over examples, in data preparation
        needle, answer = encode(f"The pass key is {key}. Remember it. {key} is the pass key. "), encode(f" {key}")
        room = length + 1 - len(needle) - len(question) - len(answer)  # filler tokens around the needle
        if room < 0:
            raise InputError(f"--block_size {length} is too short for a passkey example ({length + 1 - room} tokens)")
        depth = int(torch.randint(0, room + 1, ()).item())
        pad = (filler * (room // len(filler) + 1))[:room]
        seq = torch.tensor(pad[:depth] + needle + pad[depth:] + question + answer)
        xs.append(seq)
        answers.append(torch.cat((torch.full((length - len(answer),), -1), seq[-len(answer):])))
    xy = torch.stack(xs).to(device)
    return xy[:, :-1], xy[:, 1:], torch.stack(answers).to(device)


@torch.no_grad()
def passkey_accuracy(model, encode, lengths, n, device, ctx, memory=True):
    """{length: fraction of n passkey examples whose key tokens are all the model's greedy choices}; memory=False
    sets every gate to -inf for the measurement (sigmoid 0: local attention alone), then restores them."""
    gates = [block.self_attn.gate for block in model.model.layers]
    saved = [g.clone() for g in gates]
    if not memory:
        for g in gates:
            g.fill_(float("-inf"))
    model.eval()
    out = {}
    for length in lengths:
        torch.manual_seed(length)  # the same examples for every model and setting
        x, _, y = passkey_batch(encode, n, length, device)
        k = int((y >= 0).sum(dim=1).max())  # the key's tokens are the last ones: logits for those positions only
        y = y[:, -k:]
        with ctx:
            logits = model.lm_head(model.hidden(x)[:, -k:])[..., :model.config.vocab_size]
        out[length] = ((logits.argmax(-1) == y) | (y < 0)).all(dim=1).float().mean().item()
    for g, s in zip(gates, saved):
        g.copy_(s)
    return out


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
    """AdamW; weight decay on the matrices (linear weights, embeddings), none on the norms; the gates without weight
    decay and at --gate_lr, on the same schedule (the group's lr_scale)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    gates = [p for n, p in named if n.endswith("self_attn.gate")]
    rest = [p for n, p in named if not n.endswith("self_attn.gate")]
    groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": args.weight_decay, "lr_scale": 1.0},
              {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0, "lr_scale": 1.0},
              {"params": gates, "weight_decay": 0.0, "lr_scale": args.gate_lr / args.lr if args.lr else 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda")


@torch.no_grad()
def estimate_loss(model, batch, args, ctx):
    """Mean loss over --eval_iters batches per split, batch(split) -> (x, y); the same batches at every eval
    (seeded by --seed)."""
    model.eval()
    torch.manual_seed(args.seed)
    out = {}
    for split in ("train", "val"):
        losses = torch.zeros(args.eval_iters)
        for k in range(args.eval_iters):
            x, y = batch(split)
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
# costs more than the whole model), small on a GPU; llama2.py's shapes and tokens per step, in sequences of four
# segments. On a 1 MB text a small model overfits: dropout 0.2 and 500 steps on the GPU.
PRESETS = {
    "cpu": dict(n_layer=4, n_head=4, n_kv_head=2, n_embd=128, segment_len=32, block_size=128, batch_size=4,
                max_iters=200, eval_interval=100, eval_iters=10, log_interval=25, lr=3e-3, min_lr=3e-4, gate_lr=3e-2,
                warmup_iters=20, dropout=0.0),
    "cuda": dict(n_layer=6, n_head=6, n_kv_head=2, n_embd=384, segment_len=256, block_size=1024, batch_size=16,
                 max_iters=500, eval_interval=100, eval_iters=50, log_interval=50, lr=1e-3, min_lr=1e-4, gate_lr=1e-2,
                 warmup_iters=50, dropout=0.2),
}
MODEL_FLAGS = ("n_layer", "n_head", "n_kv_head", "n_embd", "intermediate_size", "rope_theta",
               "tie_embeddings", "segment_len", "memory_update")  # fixed by a checkpoint
RUN_FLAGS = ("device", "dtype", "compile", "init_from", "sample_only", "out_dir", "tensorboard",
             "prompt", "max_new_tokens", "temperature", "top_k", "top_p")  # never taken from a checkpoint


def parse_args(argv):
    p = argparse.ArgumentParser(description="Train an Infini-attention model or sample from it (see the module docstring).")
    cpu, gpu = PRESETS["cpu"], PRESETS["cuda"]

    def preset(name):
        return f"default {cpu[name]} on CPU, {gpu[name]} on CUDA"

    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="auto: cuda, else mps, else cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bf16 autocast on CUDA (fp16 + GradScaler without bf16), float32 elsewhere")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on for CUDA, off elsewhere)")
    p.add_argument("--data", default="shakespeare", help="'shakespeare' or a path to a UTF-8 text file")
    p.add_argument("--task", default="text", choices=["text", "passkey"],
                   help="text: language modelling on --data; passkey: synthetic passkey retrieval")
    p.add_argument("--out_dir", default=None, help="checkpoints and metrics (default out/infini_attention)")
    p.add_argument("--init_from", default="scratch", help="'scratch', 'resume' (out_dir/ckpt.pt), or a hub id / HF directory")
    p.add_argument("--max_iters", type=int, help=preset("max_iters"))
    p.add_argument("--eval_interval", type=int, help=preset("eval_interval"))
    p.add_argument("--eval_iters", type=int, help=preset("eval_iters") + " (batches per split at each eval)")
    p.add_argument("--log_interval", type=int, help=preset("log_interval"))
    p.add_argument("--batch_size", type=int, help=preset("batch_size") + " (per process, per micro-step)")
    p.add_argument("--block_size", type=int, help=preset("block_size") + " (training length: segments x segment_len)")
    p.add_argument("--segment_len", type=int, help=preset("segment_len") + " (N: the local attention's span; "
                   "--init_from a Llama: its max_position_embeddings)")
    p.add_argument("--memory_update", choices=["linear", "delta"], help="the memory's update rule (default delta)")
    p.add_argument("--grad_accum", type=int, default=1, help="micro-steps per optimizer step")
    p.add_argument("--lr", type=float, help=preset("lr"))
    p.add_argument("--min_lr", type=float, help=preset("min_lr"))
    p.add_argument("--gate_lr", type=float, help=preset("gate_lr") + " (the memory gates' own learning rate)")
    p.add_argument("--warmup_iters", type=int, help=preset("warmup_iters"))
    p.add_argument("--lr_decay_iters", type=int, help="end of the cosine decay (default: max_iters)")
    p.add_argument("--weight_decay", type=float, default=0.1)
    p.add_argument("--grad_clip", type=float, default=1.0, help="clip the global gradient norm (0: off)")
    p.add_argument("--n_layer", type=int, help=preset("n_layer"))
    p.add_argument("--n_head", type=int, help=preset("n_head"))
    p.add_argument("--n_kv_head", type=int, help=preset("n_kv_head") + " (key/value heads: n_head is MHA, 1 is MQA)")
    p.add_argument("--n_embd", type=int, help=preset("n_embd"))
    p.add_argument("--intermediate_size", type=int, help="SwiGLU width (default: 8/3 n_embd, rounded up to 64)")
    p.add_argument("--rope_theta", type=float, help="rotary base (default 10000)")
    p.add_argument("--tie_embeddings", action=argparse.BooleanOptionalAction, default=None,
                   help="share the embedding with the output head (default: untied)")
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
                "lr_decay_iters", "max_new_tokens", "intermediate_size", "rope_theta", "segment_len")
    for name in positive:
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise InputError(f"--{name} must be positive, got {getattr(args, name)}")
    for name in ("lr", "min_lr", "gate_lr", "warmup_iters", "weight_decay", "grad_clip", "patience", "temperature", "top_k"):
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
        print(f"infini_attention.py: error: {' '.join(str(e).split())}", file=sys.stderr)  # one line, whatever the message
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(args, given):
    device, dtype, use_compile, rank, world = setup_device(args)
    master = rank == 0
    out_dir = Path(args.out_dir or "out/infini_attention")
    ckpt_path = out_dir / "ckpt.pt"

    torch.manual_seed(args.seed)  # the initial weights; each training step reseeds (see step_seed)

    # --- where the weights come from: a checkpoint of ours, a pretrained Llama, or a fresh init
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
        model = InfiniTransformer(cfg)
        model.load_state_dict(ckpt["model"])
    elif args.init_from != "scratch":  # sampling keeps the weights in the run's dtype (bf16 on CUDA), training in fp32
        path = checkpoint_dir(args.init_from)
        model = from_pretrained(path, device, dtype if args.sample_only else torch.float32, args.dropout,
                                args.segment_len if "segment_len" in given else None,
                                args.memory_update or "delta").train()
        cfg = model.config
        tokenizer = hf_tokenizer(path / "tokenizer.json")  # None: no tokenizer tiktoken can run (Llama 2's)
        if tokenizer is None and not args.sample_only:
            raise InputError(f"{path} has no tokenizer.json that tiktoken can read (Llama 2 and TinyLlama use "
                             "SentencePiece), so it cannot be trained on text; --sample_only shows token ids")
        if tokenizer is not None and tokenizer[3] > cfg.vocab_size:
            raise InputError(f"{path}: the tokenizer has {tokenizer[3]:,} tokens, the model only {cfg.vocab_size:,}")
    else:
        tokenizer = load_tokenizer()
        cfg = Config(vocab_size=tokenizer[3], segment_len=args.segment_len, n_layer=args.n_layer, n_head=args.n_head,
                     n_kv_head=args.n_kv_head, n_embd=args.n_embd, intermediate_size=args.intermediate_size or 0,
                     rope_theta=args.rope_theta or 10000.0, tie_embeddings=bool(args.tie_embeddings),
                     memory_update=args.memory_update or "delta", dropout=args.dropout)
        model = InfiniTransformer(cfg)
    for k in MODEL_FLAGS:
        if k in given and getattr(args, k) != getattr(cfg, k):
            raise InputError(f"--{k} {getattr(args, k)} does not match the model from --init_from "
                             f"{args.init_from}, which has {k} {getattr(cfg, k)}")
    args.segment_len, args.memory_update = cfg.segment_len, cfg.memory_update  # a checkpoint's, when it has them
    model.to(device)
    ctx = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    tokens_per_step = args.batch_size * args.block_size * args.grad_accum * world
    if master:
        print(f"infini_attention | {device} | {str(dtype).removeprefix('torch.')} | "
              f"compile {'on' if use_compile else 'off'} | {model.num_params() / 1e6:.2f}M params | "
              f"{tokens_per_step:,} tokens/step | segments of {cfg.segment_len}, {cfg.memory_update} memory | "
              f"task {args.task} | "
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
            prompt = bos + tokenizer[1](args.prompt) or [0]
        model.eval()
        with ctx:
            out = model.generate(torch.tensor([prompt], device=device), args.max_new_tokens, args.temperature,
                                 args.top_k or None, args.top_p)
        itemsize = (dtype if dtype != torch.float32 else model.lm_head.weight.dtype).itemsize
        d, kv = cfg.head_dim, cfg.n_kv_head
        memory = cfg.n_layer * kv * (d * d + d) * 4                 # M and z, float32
        kv_per_token = 2 * cfg.n_layer * kv * d * itemsize          # K and V of one token, all layers
        print(f"state: at most {(memory + (cfg.segment_len - 1) * kv_per_token) / 1e6:,.2f} MB at any context "
              f"length ({memory / 1e6:,.2f} MB of memory + keys and values of up to {cfg.segment_len - 1} tokens); "
              f"full attention's KV cache would take {1024 * kv_per_token / 1e6:,.2f} MB at 1K tokens and "
              f"{102400 * kv_per_token / 1e6:,.1f} MB at 100K")
        text = str(out[0].tolist()) if tokenizer is None else tokenizer[2](out[0, len(bos):].tolist())
        print(f"--- {title} ---\n{text}\n---")

    def passkey_table():
        lengths = [n * cfg.segment_len for n in (1, 2, 4, 8, 16)]
        rows = {memory: passkey_accuracy(model, tokenizer[1], lengths, PASSKEY_EXAMPLES, device, ctx, memory)
                for memory in (True, False)}
        print(f"passkey accuracy ({PASSKEY_EXAMPLES} examples per length, segments of {cfg.segment_len}):")
        print("  segments       " + "".join(f"{n // cfg.segment_len:>8}" for n in lengths))
        for memory, row in rows.items():
            print(f"  {'memory' if memory else 'gated off':<15}" + "".join(f"{100 * a:7.0f}%" for a in row.values()))

    if args.task == "passkey":  # before any training: the table's shortest context is one segment
        if tokenizer is None:
            raise InputError(f"--task passkey needs a tokenizer, and {args.init_from} has none tiktoken can read")
        try:
            passkey_batch(tokenizer[1], 1, cfg.segment_len, "cpu")
        except InputError:
            raise InputError(f"--task passkey: one segment (--segment_len {cfg.segment_len}) is too short for a "
                             f"passkey example with the {tokenizer[0]} tokenizer") from None

    if args.sample_only:
        if args.init_from == "scratch":
            raise InputError("--sample_only needs --init_from resume, a hub id or an HF directory")
        if master and args.task == "passkey":
            passkey_table()
        elif master:
            sample(f"sample from {args.init_from}")
        return

    # --- data: passkey examples drawn afresh at every step, or text (rank 0 downloads and tokenizes; the others
    # wait, then read the cache)
    if args.task == "passkey":
        def batch(split):
            return passkey_batch(tokenizer[1], args.batch_size, args.block_size, device)[:2]
        batch("train")  # a block_size too short for an example fails here, before any training
    else:
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

        def batch(split):
            return get_batch(data_dir, split, args.batch_size, args.block_size, device, tokens)

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
        # with one segment per sequence the memory is never read and the gates get no gradient: tell DDP
        train_model = DDP(eval_model, device_ids=[device.index] if device.type == "cuda" else None,
                          find_unused_parameters=args.block_size <= cfg.segment_len)

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
            group["lr"] = lr * group["lr_scale"]
        torch.manual_seed(step_seed(args.seed, iter_num, rank))
        for micro in range(args.grad_accum):
            x, y = batch("train")
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
                losses = estimate_loss(eval_model, batch, args, ctx)
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
        if args.task == "passkey":
            passkey_table()
        else:
            sample("sample")
        print(f"done | {iter_num} iters | best val {best_val:.4f} | {time.time() - t_start:.0f} s")
    if writer is not None:
        writer.close()


if __name__ == "__main__":
    main()
