"""Transformer-XL in one file: the model, data, training with a memory across segments, sampling with the memory.

Paper: Dai, Yang, Yang, Carbonell, Le and Salakhutdinov 2019, "Transformer-XL: Attentive Language Models Beyond a
Fixed-Length Context", arXiv 1901.02860. The first language model to carry hidden states across segments: each layer
attends over the hidden states the layer below computed for the previous --mem_len positions (kept, with no gradient
through them: section 3.2) plus the current segment, so that the context grows with depth and segments. Absolute
positions would clash across segments, hence the relative positional encoding (section 3.3): a sinusoid R_{i-j} of
the distance and two learned global biases u and v, the score being four terms (content-content, content-position,
a global content bias and a global position bias), computed for all (query, distance) pairs at once and moved to
(query, key) by the "relative shift".

What is here: the model, pre-norm as the released code's --pre_lnorm (kimiyoung/transformer-xl, pytorch/
mem_transformer.py; --no-pre_lnorm gives its default post-norm, which at our short schedules collapses to one hidden
state for every position and never learns past the unigram loss; see Block); u and v per layer, as the release's
untie_r option makes them and its released wt103 model has them (without untie_r, the PyTorch code's default, one u
and one v are shared by all layers); the recurrence as written, one segment after the other (segment_loop, the
reference), and the same for all the segments of a window at once (TransformerXL.hidden, the default, tested equal);
training on windows of --block_size tokens whose segments carry the memory from one to the next, the memory
restarting at every window (nothing is carried from one training step to the next: see TransformerXL); evaluation
over the validation text as parallel streams whose memory is carried from window to window, at memory lengths longer
than training's (printed at the end of a run); sampling with the memory as the cache; save_pretrained /
from_pretrained in this file's own layout (config.json and model.safetensors); training on tiny-shakespeare, FineWeb
or any text file with AdamW or Muon, warmup + cosine, gradient accumulation, bf16 autocast, torch.compile and
DistributedDataParallel; exact resume from atomic checkpoints. What is not: the adaptive input and softmax (Baevski
and Auli 2018; a plain softmax over GPT-2's BPE here, as in the other files), the released transfo-xl-wt103 weights
(a pickle, a 267K-word vocabulary and an adaptive softmax: out of scope, and transformers no longer maintains its
TransfoXL), the same_length and clamp_len options of the released code.

    python transformer_xl.py                                     # CPU: a tiny model, about three minutes
    python transformer_xl.py --device cuda                       # one GPU: bf16, torch.compile, 6 layers x 384
    torchrun --standalone --nproc_per_node 8 transformer_xl.py   # DDP on 8 GPUs
    python transformer_xl.py --mem_len 64 --block_size 256      # a longer memory, windows of 8 segments of 32

Offline (no download, no tiktoken files) it says so and carries on: the Python standard library's own source as the
text, raw UTF-8 bytes as the tokens. Every step's randomness (batches, dropout) is drawn from a seed made of (--seed,
iteration, rank), so `--init_from resume` continues exactly as an uninterrupted run would.
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
    vocab_size: int = 50257          # real tokens; the embedding is padded to a multiple of 64
    segment_len: int = 128           # L, the released code's tgt_len: tokens per segment
    mem_len: int = 128               # M: hidden states kept per layer from the segments before (training's)
    n_layer: int = 16
    n_head: int = 10
    n_embd: int = 410                # d_model
    head_dim: int = 0                # d_head (0: n_embd // n_head)
    d_inner: int = 0                 # the feed-forward's width (0: 4 n_embd)
    norm_eps: float = 1e-5           # the LayerNorms' epsilon
    pre_lnorm: bool = True           # True: x + f(LayerNorm(x)), the released --pre_lnorm; False: post-norm
    tie_embeddings: bool = True      # the output head is the embedding, as the released code's tie_weight
    dropout: float = 0.0             # on the embedding, R, the attention weights, the residual branches, the output
    bos_token_id: int | None = None  # put before the prompt when sampling

    def __post_init__(self):
        check_types(self)
        for name in ("vocab_size", "segment_len", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                raise InputError(f"{name} must be positive, got {getattr(self, name)}")
        if self.mem_len < 0 or self.head_dim < 0 or self.d_inner < 0:
            raise InputError(f"mem_len, head_dim and d_inner must not be negative, got {self.mem_len}, "
                             f"{self.head_dim} and {self.d_inner}")
        if not self.head_dim and self.n_embd % self.n_head:
            raise InputError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        self.head_dim = self.head_dim or self.n_embd // self.n_head
        self.d_inner = self.d_inner or 4 * self.n_embd
        if not 0.0 <= self.dropout < 1.0:
            raise InputError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def padded_vocab_size(self):  # 50257 -> 50304: matmul shapes that tile well on GPUs
        return -(-self.vocab_size // 64) * 64


# ------------------------------------------------------------------------------------------ model
# The paper first: segment_loop is the recurrence of section 3.2 as written, one segment after the
# other, and relative_attention the attention of section 3.3 for one segment. Then the same, fast:
# TransformerXL.hidden runs all the segments of a window at once, each layer once, with the relative
# shift of appendix B (tests/test_transformer_xl.py holds the two equal).

def sinusoid(distances, dim, dtype=torch.float32):
    """R (section 3.3): the sinusoid of Vaswani et al. 2017 at each distance, (K,) -> (K, dim),
    sines then cosines as the released code lays them out (no learned parameters: R generalises to
    distances longer than training's); an odd dim keeps the first dim columns. Computed in
    float32, or float64 for a float64 model, then cast to dtype."""
    work = torch.promote_types(dtype, torch.float32)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, dim, 2, device=distances.device, dtype=work) / dim)
    angles = distances.to(work)[:, None] * inv_freq  # (K, ceil(dim/2))
    return torch.cat((angles.sin(), angles.cos()), dim=-1)[:, :dim].to(dtype)


def segment_loop(model, idx, targets=None, mems=None, segment_len=None, mem_len=None):
    """The recurrence of section 3.2, one segment tau+1 at a time; at each layer n:
        h~^{n-1}_{tau+1} = [SG(m^{n-1}_tau) o h^{n-1}_{tau+1}]   memory (no gradient), then segment
        h^n_{tau+1} = the layer on h^{n-1}_{tau+1}, its attention over h~ (relative_attention)
        m^{n-1}_{tau+1} = the last M positions of h~^{n-1}_{tau+1}   the next segment's memory
    idx (B, T), targets (B, T) or None, mems None or one (B, P, d) per layer (the layer's inputs at
    the P positions before idx) -> (logits (B, T, vocab_size), loss or None, the memory after idx).
    The reference of TransformerXL.forward and hidden, whose numbers it gives with a loop."""
    cfg = model.config
    L = segment_len or cfg.segment_len
    M = cfg.mem_len if mem_len is None else mem_len
    B, T = idx.shape
    dtype = model.embed.weight.dtype
    if mems is None:
        mems = [model.embed.weight.new_zeros(B, 0, cfg.n_embd)] * cfg.n_layer  # m_0: nothing before
    mems = [m[:, m.size(1) - min(M, m.size(1)):].to(dtype).detach() for m in mems]  # SG(m)
    out = []
    for t in range(0, T, L):  # segment tau+1
        h = model.drop(model.embed(idx[:, t:t + L]) * cfg.n_embd ** 0.5)  # h^0, scaled as released
        P, Lt = mems[0].size(1), h.size(1)  # memory positions, this segment's (the last: shorter)
        R = model.drop(sinusoid(torch.arange(P + Lt, device=idx.device), cfg.n_embd, h.dtype))
        new_mems = []
        for block, m in zip(model.layers, mems):
            h_tilde = torch.cat((m, h), dim=1)                         # [SG(m^{n-1}_tau) o h^{n-1}]
            new_mems.append(h_tilde[:, P + Lt - min(M, P + Lt):].detach())  # m^{n-1}_{tau+1}
            if cfg.pre_lnorm:  # x + f(LayerNorm(x)), the memory normed by the same LayerNorm
                h = h + relative_attention(block.attn, block.attn_norm(h), block.attn_norm(m), R)
                h = h + block.ff(block.ff_norm(h))
            else:  # the paper's o^n = LayerNorm(Linear(a^n) + h^{n-1}), then the same round the FF
                h = block.attn_norm(h + relative_attention(block.attn, h, m, R))
                h = block.ff_norm(h + block.ff(h))
        mems = new_mems
        out.append(h)
    h = model.drop(torch.cat(out, dim=1))  # the released code's last dropout
    logits = F.linear(h, model.lm_head.weight[:cfg.vocab_size])  # the real tokens' rows
    loss = None
    if targets is not None:
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
    return logits, loss, mems


def relative_attention(attn, h, m, R):
    """The attention of section 3.3 for one segment h (B, L, d) over h~ = [m; h], m (B, P, d) its
    memory, with attn's weights (W_{k,E} and W_v are kv_net's two halves):
        q = h W_q,   k = h~ W_{k,E},   v = h~ W_v,   r_k = W_{k,R} R_k   (R[k]: distance k's R)
        A_{i,j} = q_i.k_j (a) + q_i.r_{i-j} (b) + u.k_j (c) + v.r_{i-j} (d)
                = (q_i + u).k_j + (q_i + v).r_{i-j}
        a_i = sum over j <= P+i of softmax_j(A_{i,j} / sqrt(d_head)) v_j,   out = W_o a
    Query i is position P+i of h~, so key j lies i-j = P+i-j back; each r_{i-j} is looked up (no
    shift). The reference of Attention.forward."""
    B, L, _ = h.shape
    P, H, hd = m.size(1), attn.n_head, attn.head_dim
    h_tilde = torch.cat((m, h), dim=1)                                            # (B, P+L, d)
    q = attn.q_net(h).view(B, L, H, hd).transpose(1, 2)                           # (B, H, L, hd)
    k, v = attn.kv_net(h_tilde).view(B, P + L, 2, H, hd).permute(2, 0, 3, 1, 4)   # (B, H, P+L, hd)
    r = attn.r_net(R).view(P + L, H, hd)                                          # r_k
    distance = P + torch.arange(L, device=h.device)[:, None] - torch.arange(P + L, device=h.device)
    r_ij = r[distance.clamp(min=0)]                                     # (L, P+L, H, hd): r_{i-j}
    A = (q + attn.u[:, None]) @ k.transpose(-1, -2)                                # (a) + (c)
    A = A + torch.einsum("bhid,ijhd->bhij", q + attn.v[:, None], r_ij)             # (b) + (d)
    A = (A * hd ** -0.5).masked_fill(distance < 0, float("-inf"))  # causal: no key ahead of i
    a = A.softmax(dim=-1, dtype=torch.promote_types(q.dtype, torch.float32)).type_as(q)
    a = F.dropout(a, attn.dropout, attn.training)
    y = (a @ v).transpose(1, 2).reshape(B, L, H * hd)                # (B, H, L, hd) -> (B, L, H hd)
    return attn.resid_dropout(attn.o_net(y))


# ------------------------------------------------------------------------ the same, fast

def rel_shift(x):
    """(..., L, K) scores in the (query, distance) layout -> the (query, key) layout, K = M + L.

    Column c of row i holds the score of distance K-1-c (R runs from the longest distance down to
    0). Key j of query i is M + i - j away, so the score that belongs at (i, j) sits at column
    j + L-1-i: row i must move left by L-1-i, each row one less than the row above it. The released
    code's trick does that without indexing: a zero column put in front makes rows K+1 long; the
    same numbers read as rows K long (the .view) start one place later each row, i.e. row i of that
    reading starts at old row i-1, position K+1 - i..; dropping the first row and reading the rest
    as (L, K) again leaves out[i, j] = x[i, j + L-1-i] for every j <= M + i (the keys query i may
    see). The entries above that diagonal are left-overs of other rows (or the zeros): the causal
    mask removes them."""
    *lead, L, K = x.shape
    x = F.pad(x, (1, 0)).view(*lead, K + 1, L)  # a zero column in front, read as K+1 rows of L
    return x[..., 1:, :].reshape(*lead, L, K)   # drop the first row, read back as (L, K)


class Attention(nn.Module):
    """Relative multi-head attention over [SG(memory); segment]: relative_attention for all the
    segments of a window side by side (section 3.3's A^rel_{i,j} and appendix B's efficient
    computation):
        A_{i,j} = q_i.k_{E,j} (a) + q_i.W_{k,R} R_{i-j} (b) + u.k_{E,j} (c) + v.W_{k,R} R_{i-j} (d)
    with q_i = W_q E_i and k_{E,j} = W_{k,E} E_j, i.e. (a) + (c) = (q_i + u).k_j and
    (b) + (d) = (q_i + v).r_{i-j}, the latter for all (query, distance) pairs then moved to
    (query, key) by rel_shift. Segment s's keys are its memory (the detached hidden states of the M
    positions before it, see Block) and its own L positions."""

    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.head_dim, self.dropout = cfg.n_head, cfg.head_dim, cfg.dropout
        inner = cfg.n_head * cfg.head_dim
        self.q_net = nn.Linear(cfg.n_embd, inner, bias=False)       # W_q
        self.kv_net = nn.Linear(cfg.n_embd, 2 * inner, bias=False)  # W_{k,E} and W_v
        self.r_net = nn.Linear(cfg.n_embd, inner, bias=False)       # W_{k,R}: the distances' keys
        self.o_net = nn.Linear(inner, cfg.n_embd, bias=False)
        self.u = nn.Parameter(torch.zeros(cfg.n_head, cfg.head_dim))  # global content bias, (c)
        self.v = nn.Parameter(torch.zeros(cfg.n_head, cfg.head_dim))  # global position bias, (d)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def heads(self, h, past, L):
        """q (B, S, H, L, hd), keys and values (B, S, H, M+L, hd) of h (B, S*L, d) and past
        (B, M + (S-1)L, d), the M memory positions before h and h's own but its last segment, as the
        layer sees them (normed if pre-norm) after the stop-gradient: segment s's keys are positions
        sL..sL+M-1 of past (its memory, whose keys and values W_{k,E} and W_v still learn from) and
        its own L positions."""
        B, T, _ = h.shape
        S, H, hd = T // L, self.n_head, self.head_dim
        M = max(0, past.size(1) - (T - L))  # past empty: M = 0
        q = self.q_net(h).view(B, S, L, H, hd).transpose(2, 3)
        kv = self.kv_net(h).view(B, S, L, 2 * H * hd)                # each segment's own positions
        if M:
            s, m = torch.arange(S, device=h.device), torch.arange(M, device=h.device)
            before = s[:, None] * L + m  # (S, M): segment s's memory, positions sL..sL+M-1
            kv = torch.cat((self.kv_net(past)[:, before], kv), dim=2)  # (B, S, M+L, 2 H hd)
        k, v = kv.view(B, S, M + L, 2, H, hd).permute(3, 0, 1, 4, 2, 5)  # each (B, S, H, M+L, hd)
        return q, k, v

    def scores(self, q, k, R):
        """A^rel (B, S, H, L, M+L), scaled by 1/sqrt(hd), unmasked: (a) + (c) by the keys, (b) + (d)
        by the distances R (M+L, d), longest first, moved to the keys by rel_shift."""
        r = self.r_net(R).view(-1, self.n_head, self.head_dim).transpose(0, 1)  # (H, M+L, hd)
        ac = (q + self.u[:, None]) @ k.transpose(-1, -2)              # (a) + (c): (B, S, H, L, M+L)
        bd = rel_shift((q + self.v[:, None]) @ r.transpose(-1, -2))   # (b) + (d), now (query, key)
        return (ac + bd) * self.head_dim ** -0.5

    def forward(self, h, past, R, mask):
        """h (B, S*L, d) the segments, past (B, M + (S-1)L, d) the positions before each segment
        (see heads), R (M+L, d), mask (S, L, M+L) True where a query sees a key -> (B, S*L, d)."""
        B, T, _ = h.shape
        q, k, v = self.heads(h, past, mask.size(1))
        att = self.scores(q, k, R).masked_fill(~mask[:, None], float("-inf"))
        att = att.softmax(dim=-1, dtype=torch.promote_types(q.dtype, torch.float32)).type_as(q)
        att = F.dropout(att, self.dropout, self.training)
        y = (att @ v).transpose(2, 3).reshape(B, T, -1)  # (B, S, H, L, hd) -> (B, S*L, H hd)
        return self.resid_dropout(self.o_net(y))


class PositionwiseFF(nn.Module):
    """The feed-forward of the released code: ReLU between two biased linear maps."""

    def __init__(self, n_embd, width, dropout=0.0):
        super().__init__()
        self.fc1 = nn.Linear(n_embd, width)
        self.fc2 = nn.Linear(width, n_embd)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.fc2(self.dropout(F.relu(self.fc1(x)))))


class Block(nn.Module):
    """pre_lnorm: x = x + f(LayerNorm(x)), the memory normed by the same LayerNorm before its keys
    are made, and no final norm, as the released code's --pre_lnorm. Else post-norm,
    x = LayerNorm(x + f(x)), its default (Vaswani et al.'s order), which needs the paper's long, low
    learning-rate schedule: at this file's presets the feed-forwards learn a large constant output,
    the norms then map every position to nearly one vector, and attention has nothing to tell
    apart (benchmarks/RESULTS.md, "Pre-norm by default").

    The stop-gradient SG(h_{tau-1}) of section 3.2 is on the layer's input h, as the released code
    keeps it (its mems): the memory is [mem; x] before each segment, detached, and only then normed
    (pre-norm), so that the norm's weight and bias learn from the memory positions too, as the
    released code's layer_norm(cat(mems, w))."""

    def __init__(self, cfg):
        super().__init__()
        self.pre_lnorm = cfg.pre_lnorm
        self.attn_norm = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ff_norm = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.ff = PositionwiseFF(cfg.n_embd, cfg.d_inner, cfg.dropout)

    def forward(self, x, mem, R, mask):
        before = x.size(1) - mask.size(1) if mem.size(1) else 0  # all segments but the last: memory
        past = torch.cat((mem, x[:, :before]), dim=1).detach()    # SG(h): the input, before norms
        if self.pre_lnorm:
            x = x + self.attn(self.attn_norm(x), self.attn_norm(past), R, mask)
            return x + self.ff(self.ff_norm(x))
        x = self.attn_norm(x + self.attn(x, past, R, mask))
        return self.ff_norm(x + self.ff(x))


class TransformerXL(nn.Module):
    """The Transformer-XL language model: embedding, n_layer Blocks with the memory, the head.

    forward(idx) runs idx (B, T) as segments of segment_len, each seeing the mem_len positions
    before it at every layer, its first segment with no memory unless mems are given. Training
    (the shared loop's model(x, y)) therefore restarts the memory at every window of --block_size
    tokens: a window's segments carry it from one to the next, but nothing is carried from step to
    step, so that batches stay independent (resume, DDP, torch.compile see no state). Evaluation
    over a whole text carries it along (stream_loss), as does decoding (generate)."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.padded_vocab_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.padded_vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        # Initialisation: normal, std 0.02, for the matrices and u, v (the released code's
        # init_std), the projections that write into the residual stream scaled by
        # 1/sqrt(2 n_layer) as GPT-2 does; biases 0, norms 1.
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                residual = name.endswith(("o_net.weight", "fc2.weight"))
                std = 0.02 / math.sqrt(2 * cfg.n_layer) if residual else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def optimizer_groups(self):
        """Each parameter's optimizer group, by name (--optimizer muon: Muon takes "muon"; AdamW the
        rest): "muon" the blocks' matrices (W_q, W_{k,E} and W_v, W_{k,R}, W_o, the feed-forward's);
        "decay" the embedding and an untied head; "no_decay" the biases, the LayerNorms and u, v,
        the global biases of terms (c) and (d) (2-D, but biases: the released code gives them no
        decay either)."""
        matrices = ("q_net", "kv_net", "r_net", "o_net", "fc1", "fc2")
        groups = {}
        for name, _ in self.named_parameters():
            module, kind = name.split(".")[-2:]
            if name in ("embed.weight", "lm_head.weight"):
                groups[name] = "decay"
            elif module in matrices and kind == "weight":
                groups[name] = "muon"
            else:
                groups[name] = "no_decay"
        return groups

    def num_params(self, non_embedding=True):
        """Parameters a token computes with: a tied embedding/head counted once, an untied input
        embedding left out by default."""
        n = sum(p.numel() for p in self.parameters())
        untied_input = non_embedding and not self.config.tie_embeddings
        return n - self.embed.weight.numel() if untied_input else n

    def memory_bytes_per_token(self, itemsize=4):
        """Bytes the memory holds per position: one hidden state per layer (keys and values are made
        from it)."""
        return self.config.n_layer * self.config.n_embd * itemsize

    def hidden(self, idx, mems=None, segment_len=None, mem_len=None, sliding=False):
        """idx (B, T), mems (None, or one (B, P, d) per layer: the hidden states entering that layer
        at the P positions before idx) -> (final hidden states (B, T, d), the memory for what
        follows: the last mem_len positions of [mems; this input] per layer, detached).

        segment_loop, fast: idx is cut into segments of segment_len (the last one may be shorter),
        each seeing the mem_len hidden states before it at every layer (section 3.2). Segment s's
        memory at layer n is the input of layer n at the positions before it, which earlier segments
        computed; so all segments of idx run side by side, each layer once, without a Python loop
        over segments: segment s's keys are gathered from the layer's input (Attention.heads), a
        mask (S, L, M+L) keeps them causal and hides the memory slots before the given memory. The
        memory is not differentiated through, as SG(h_{tau-1}) says.
        sliding: each position sees the mem_len positions before it and itself, no more (the keys of
        a query late in its segment are cut to mem_len + 1): what segments of one token give, at a
        segment's cost (decoding's prefill). The final hidden states go through dropout, as the
        released code's last self.drop."""
        cfg = self.config
        L = segment_len or cfg.segment_len
        M = cfg.mem_len if mem_len is None else mem_len
        B, T = idx.shape
        P = 0 if mems is None or M == 0 else min(mems[0].size(1), M)  # memory positions given
        S = -(-T // L)
        x = self.drop(self.embed(F.pad(idx, (0, S * L - T))) * cfg.n_embd ** 0.5)  # (B, S*L, d)
        R = self.drop(sinusoid(torch.arange(M + L - 1, -1, -1, device=idx.device), cfg.n_embd,
                               x.dtype))
        i, j = torch.arange(L, device=idx.device)[:, None], torch.arange(M + L, device=idx.device)
        s = torch.arange(S, device=idx.device)[:, None, None]
        mask = (j <= M + i) & (j >= M - P - s * L)  # (S, L, M+L): causal, no key before the memory
        mask = mask & (j >= i) if sliding else mask   # no key further than M back
        new_mems = []
        for n, block in enumerate(self.layers):
            mem = x.new_zeros(B, M - P, cfg.n_embd)  # positions that do not exist (masked), then
            mem = torch.cat((mem, mems[n][:, -P:].to(x.dtype)), dim=1) if P else mem  # the memory
            kept = torch.cat((mem[:, M - P:], x[:, :T]), dim=1)[:, max(0, P + T - M):]
            new_mems.append(kept.detach())
            x = block(x, mem, R, mask)
        return self.drop(x[:, :T]), new_mems

    def forward(self, idx, targets=None, mems=None, segment_len=None, mem_len=None):
        """idx (B, T) token ids -> logits (B, T, vocab_size), loss or None. Without mems the first
        segment starts with an empty memory; the later ones see those before them (a training
        window of several segments). segment_loop gives the same with a loop over segments."""
        V, Vp = self.config.vocab_size, self.config.padded_vocab_size
        pad = None
        if Vp > V:  # the padding rows are no tokens: a bias of -inf gives them probability 0
            pad = torch.zeros(Vp, device=idx.device, dtype=self.lm_head.weight.dtype)
            pad[V:] = float("-inf")
        logits = F.linear(self.hidden(idx, mems, segment_len, mem_len)[0], self.lm_head.weight, pad)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
        return logits[..., :V], loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, use_cache=True,
                 mem_len=None, on_logits=None):
        """Append max_new_tokens sampled tokens to idx (B, T); temperature 0 is greedy.

        Decoding is the recurrence with segments of one token: each token's context at every layer
        is the memory, the hidden states of the mem_len positions before it (default
        mem_len + segment_len - 1 of the config: as many keys as training's last query saw). With
        the cache the memory is kept and each token costs mem_len keys, however long the text; the
        prompt is fed as segments of segment_len with the sliding mask (the same hidden states, each
        segment's keys its memory and itself). Without the cache the whole text is run again (all
        its one-token segments side by side), giving the same tokens."""
        cfg = self.config
        M = cfg.mem_len + cfg.segment_len - 1 if mem_len is None else mem_len
        mems, fed = None, 0
        for _ in range(max_new_tokens):
            if use_cache:
                L = min(cfg.segment_len, idx.size(1) - fed)
                x, mems = self.hidden(idx[:, fed:], mems, L, M, True)
                fed = idx.size(1)
            else:
                x = self.hidden(idx, None, 1, M)[0]
            logits = self.lm_head(x[:, -1])[:, :cfg.vocab_size]  # only the last position is sampled
            nxt = sample_next(logits.float(), temperature, top_k, top_p, on_logits)  # (B, 1)
            idx = torch.cat([idx, nxt], dim=1)
        return idx


@torch.no_grad()
def stream_loss(model, tokens, batch_size, window, mem_len, ctx):
    """Mean next-token loss over tokens (1-D) read as batch_size parallel streams (the released
    code's ordered iterator), window tokens at a time, the memory carried from window to window:
    every segment sees mem_len positions before it, however far back they lie (the paper's
    evaluation, section 3.2 and table 6)."""
    n = (len(tokens) - 1) // batch_size
    xy = torch.as_tensor(np.asarray(tokens[:n * batch_size + 1], dtype=np.int64))
    device = next(model.parameters()).device
    x, y = xy[:-1].view(batch_size, n).to(device), xy[1:].view(batch_size, n).to(device)
    mems, total = None, 0.0
    model.eval()
    for t in range(0, n, window):  # the recurrence across windows (hidden: segments side by side)
        with ctx:
            h, mems = model.hidden(x[:, t:t + window], mems, mem_len=mem_len)
            logits = model.lm_head(h)[..., :model.config.vocab_size].float()
        loss = F.cross_entropy(logits.flatten(0, 1), y[:, t:t + window].flatten(), reduction="sum")
        total += loss.item()
    return total / (n * batch_size)


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
    """A Transformer-XL from a directory (or hub id) in the layout save_pretrained below writes: config.json
    (model_type "transformer_xl") and model.safetensors (or shards + model.safetensors.index.json). No maintained
    Hugging Face layout exists any more (transformers dropped TransfoXL), and the released transfo-xl-wt103 weights
    (a pickle, a 267K-word vocabulary, an adaptive softmax) are out of scope. Weights are converted to `dtype` on the
    way in. Returns the model in eval mode."""
    path, hf, tensors = read_checkpoint(name_or_path)
    if hf.get("model_type") != "transformer_xl":
        raise InputError(f"{path} holds a '{hf.get('model_type')}' model, not this file's Transformer-XL layout")
    cfg = Config(vocab_size=hf["vocab_size"], segment_len=hf["tgt_len"], mem_len=hf["mem_len"],
                 n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["d_model"], head_dim=hf["d_head"],
                 d_inner=hf["d_inner"], norm_eps=hf.get("layer_norm_epsilon", 1e-5), pre_lnorm=hf["pre_lnorm"],
                 tie_embeddings=hf.get("tie_word_embeddings", True), dropout=dropout,
                 bos_token_id=hf.get("bos_token_id"))
    state = {}
    for name, t in tensors.items():
        if name in ("embed.weight", "lm_head.weight"):  # pad the vocabulary rows with zeros
            t = F.pad(t, (0, 0, 0, cfg.padded_vocab_size - t.size(0)))
        state[name] = t
    if cfg.tie_embeddings and "embed.weight" in state:
        state["lm_head.weight"] = state["embed.weight"]
    with torch.device("meta"):
        model = TransformerXL(cfg)  # shapes only: the weights come from the file, no time is spent on a random init
    load_weights(model, state, path, device, dtype)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight  # assign=True replaced both: tie them again
    return model.eval()


def save_pretrained(model, path):
    """model in the directory path: config.json (the released code's names for the sizes: d_model, d_head, d_inner,
    tgt_len, mem_len, pre_lnorm) and model.safetensors in this file's parameter names, as from_pretrained reads it."""
    cfg, path = model.config, Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(dict(
        model_type="transformer_xl", vocab_size=cfg.vocab_size, tgt_len=cfg.segment_len, mem_len=cfg.mem_len,
        n_layer=cfg.n_layer, n_head=cfg.n_head, d_model=cfg.n_embd, d_head=cfg.head_dim, d_inner=cfg.d_inner,
        layer_norm_epsilon=cfg.norm_eps, pre_lnorm=cfg.pre_lnorm, tie_word_embeddings=cfg.tie_embeddings,
        untie_r=True, bos_token_id=cfg.bos_token_id), indent=2))
    state = {k: t[:cfg.vocab_size] if k in ("embed.weight", "lm_head.weight") else t
             for k, t in model.state_dict().items() if not (k == "lm_head.weight" and cfg.tie_embeddings)}
    write_safetensors(state, path / "model.safetensors")


# --------------------------------------------------------------------------- Transformer-XL on the command line
# What the shared harness below asks of this model: its presets and flags, how to build it, what a token costs,
# the schedule, the data and what to show at the end.
#
# The memory across segments and the shared training loop: the loop calls model(x, y) on batches and keeps nothing
# between steps. A training window of --block_size tokens is cut into segments of --segment_len, and each segment
# sees the detached memory of the --mem_len positions before it, as the paper's recurrence (TransformerXL.hidden runs
# them side by side, tested equal to segment_loop, which feeds them one by one). The memory restarts at each window rather than being
# carried from step to step: a step's batch is independent of the last one, so a resumed run is the same run, DDP
# ranks and torch.compile see no state, and only the first segment of each window starts without memory. Evaluation
# with the memory carried along the whole text (stream_loss) is printed at the end, at memory lengths up to 4 x
# training's: the paper's point, a context longer at evaluation than in training.

# Sized as llama2.py's presets, the same tokens per step and model width: on the CPU windows of 4 segments of 32
# (llama2.py: blocks of 64, twice as many of them); on a GPU 4 segments of 128.
PRESETS = {
    "cpu": dict(n_layer=4, n_head=4, n_embd=128, segment_len=32, mem_len=32, block_size=128, batch_size=4,
                max_iters=200, eval_interval=100, eval_iters=10, log_interval=25, lr=3e-3, min_lr=3e-4, warmup_iters=20,
                dropout=0.0, patience=0),
    "cuda": dict(n_layer=6, n_head=6, n_embd=384, segment_len=128, mem_len=128, block_size=512, batch_size=16,
                 max_iters=400, eval_interval=50, eval_iters=50, log_interval=25, lr=1e-3, min_lr=1e-4, warmup_iters=40,
                 dropout=0.2, patience=3),
}
EVAL_MEMORIES = (0, 1, 2, 4)  # the end's table: memory lengths at evaluation, in training segments


def add_model_flags(p):
    p.add_argument("--segment_len", type=int, help="L: tokens per segment; a --block_size window is cut into segments")
    p.add_argument("--mem_len", type=int, help="M: positions of memory per layer while training (0: none)")
    p.add_argument("--n_layer", type=int)
    p.add_argument("--n_head", type=int)
    p.add_argument("--n_embd", type=int)
    p.add_argument("--d_inner", type=int, help="the feed-forward's width (default 4 n_embd)")
    p.add_argument("--pre_lnorm", action=argparse.BooleanOptionalAction,
                   help="LayerNorm before each sub-block (default; --no-pre_lnorm: after, the released default)")
    p.add_argument("--tie_embeddings", action=argparse.BooleanOptionalAction,
                   help="share the embedding with the output head (default: tied, as the released code)")
    p.add_argument("--dropout", type=float, help="on the embedding, R, the attention weights and the residual branches")


def build_model(args, given, ckpt, env):
    """(model, tokenizer, note) for --init_from: our checkpoint's model (resume; the harness loads its weights), a
    directory save_pretrained wrote, or a fresh one of the flags' size."""
    if ckpt is not None:
        cfg = {**ckpt["config"], "dropout": args.dropout}
        model, tokenizer = TransformerXL(Config(**cfg)), load_tokenizer(ckpt["tokenizer"])
    elif args.init_from != "scratch":  # sampling keeps the checkpoint's dtype (load_dtype), training loads fp32
        tokenizer = pretrained_tokenizer(checkpoint_dir(args.init_from, weights=False), args.sample_only)
        model = from_pretrained(args.init_from, env.device, load_dtype(args, env), args.dropout)
    else:
        tokenizer = load_tokenizer(args.tokenizer)
        model = TransformerXL(Config(vocab_size=tokenizer.vocab_size, segment_len=args.segment_len, mem_len=args.mem_len,
                                     n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                                     d_inner=args.d_inner or 0, pre_lnorm=args.pre_lnorm is not False,
                                     tie_embeddings=args.tie_embeddings is not False, dropout=args.dropout))
    cfg = model.config
    return model, tokenizer, (f" | segments of {cfg.segment_len}, memory {cfg.mem_len}, "
                              f"{'pre' if cfg.pre_lnorm else 'post'}-norm")


def flops_per_token(model, T):
    """Training FLOPs per token, for MFU: 6 per parameter, plus attention (PaLM, appendix B) over the mem_len + L keys
    a query may see, with three score-sized products (the keys', the distances', the values'), not two."""
    cfg = model.config
    return 6 * model.num_params() + 18 * cfg.n_layer * cfg.n_head * cfg.head_dim * (cfg.mem_len + min(T, cfg.segment_len))


def schedule(it, args):  # (learning rate, weight decay) of step it: warmup and cosine, a constant weight decay
    return lr_at(it, args), args.weight_decay


def batches(args, tokenizer, env):  # batch(split) -> (x, y): windows of --block_size tokens of --data's text
    return text_batches(args, tokenizer, env)


def show_sample(model, tokenizer, args, env, title):
    """What a run shows at its end (or with --sample_only): the validation loss with the memory carried along the text
    at several memory lengths (after training), the memory a token costs, then a sample."""
    cfg, itemsize = model.config, (env.dtype if env.dtype != torch.float32 else model.lm_head.weight.dtype).itemsize
    if not args.sample_only:
        val = prepare_data(args.data, tokenizer)["val"][0][:args.eval_iters * args.batch_size * args.block_size]  # an eval's
        lens = [k * cfg.segment_len for k in EVAL_MEMORIES]
        losses = [stream_loss(model, val, min(args.batch_size, len(val) // 2), args.block_size, M, env.ctx) for M in lens]
        print(f"val loss, memory carried along the first {len(val):,} val tokens (segments of {cfg.segment_len}, "
              f"trained with memory {cfg.mem_len}): " + " | ".join(f"mem {M} {v:.4f}" for M, v in zip(lens, losses)))
    M = cfg.mem_len + cfg.segment_len - 1
    print(f"memory: {model.memory_bytes_per_token(itemsize):,} bytes/position ({cfg.n_layer} layers x {cfg.n_embd} x "
          f"{itemsize} bytes), {M * model.memory_bytes_per_token(itemsize):,} bytes per sequence for the {M} positions "
          "a sampled token sees, at any length of text")
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
