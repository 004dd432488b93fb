"""Mamba in one file: the selective state-space model, its pretrained weights, data, training, sampling.

Paper: Gu and Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces", arXiv 2312.00752.
A Mamba language model is a stack of residual blocks x + Mixer(RMSNorm(x)) with no attention and no positions
(section 3.4). Each mixer (the "Mamba block" of Figure 3) widens the stream to d_inner = expand x n_embd, runs
a short causal depthwise convolution, then a state-space model whose step size Delta and matrices B, C are
computed from the input at every position (section 3.2, Algorithm 2: the "selection"), gates the result
with SiLU(z) and projects back. Per channel the SSM carries an N-dimensional state h (N = d_state):

    h_t = exp(Delta_t A) h_{t-1} + Delta_t B_t x_t        y_t = C_t . h_t + D x_t        (eq. 2a, 2b and 4)

Because Delta, B and C depend on x, the model cannot be run as a convolution as S4 is; the paper computes the
recurrence with a hardware-aware scan (section 3.3). This file computes it three ways, in one function,
`selective_scan`: the recurrence as written (a loop over time, the reference the tests check against); a
parallel scan for training, in pure PyTorch, 2 log2(T) whole-tensor steps and stable at any length; and
one step at a time from a cached state for decoding, so each new token costs the same at any context length.

What is here: the model; sampling from the recurrent state; loading `MambaForCausalLM` checkpoints in the
Hugging Face layout (state-spaces/mamba-130m-hf ... mamba-2.8b-hf, or anything `save_pretrained` writes),
with a safetensors reader of its own and the checkpoint's tokenizer when tiktoken can read it (the
GPT-NeoX byte-level BPE those checkpoints use); training on tiny-shakespeare (or any text file) with AdamW,
warmup + cosine, gradient accumulation, bf16 autocast, torch.compile and DistributedDataParallel; exact resume
from atomic checkpoints. What is not: the fused CUDA kernels of the reference (the scan here is plain
PyTorch: its states live in GPU memory, (B, T, d_inner, N) floats per layer, where the kernel keeps them in
SRAM), Mamba-2's SSD, and the original repos' pytorch_model.bin layout (the -hf repos are the same weights).

    python mamba.py                                     # CPU: a tiny model, about three minutes
    python mamba.py --device cuda                       # one GPU: bf16, torch.compile, 12 layers x 384
    torchrun --standalone --nproc_per_node 8 mamba.py   # DDP on 8 GPUs
    python mamba.py --init_from state-spaces/mamba-130m-hf --sample_only --prompt "The meaning of life is"

Offline (no download, no tiktoken files) it says so and carries on: the Python standard library's own source
as the text, raw UTF-8 bytes as the tokens. Every step's randomness (batches, dropout) is drawn from a seed
made of (--seed, iteration, rank), so `--init_from resume` continues exactly as an uninterrupted run would.
"""
import argparse
import json
import math
import os
import shutil
import struct
import sys
import time
import unicodedata
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
    vocab_size: int = 50280              # vocab_size: real tokens; the embedding is padded to a multiple of 64
    block_size: int = 2048               # the training context: Mamba has no positions and no longest context
    n_layer: int = 24                    # num_hidden_layers (Mamba-130M: 24 x 768)
    n_embd: int = 768                    # hidden_size (the paper's D)
    d_state: int = 16                    # state_size (the paper's N)
    expand: int = 2                      # expand (the paper's E): d_inner = expand * n_embd
    d_conv: int = 4                      # conv_kernel: width of the causal depthwise convolution
    dt_rank: int = 0                     # time_step_rank: width of Delta's low-rank projection (0: ceil(n_embd / 16))
    conv_bias: bool = True               # use_conv_bias
    bias: bool = False                   # use_bias: biases in in_proj and out_proj
    norm_eps: float = 1e-5               # layer_norm_epsilon
    dt_min: float = 0.001                # time_step_min: Delta is initialised log-uniform in [dt_min, dt_max]
    dt_max: float = 0.1                  # time_step_max
    dt_init_floor: float = 1e-4          # time_step_floor
    dropout: float = 0.0                 # on the embedding and the residual branches (the paper uses none)

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_embd", "d_state", "expand", "d_conv"):
            if getattr(self, name) <= 0:
                raise InputError(f"{name} must be positive, got {getattr(self, name)}")
        if self.dt_rank < 0:
            raise InputError(f"dt_rank must not be negative, got {self.dt_rank}")
        self.dt_rank = self.dt_rank or math.ceil(self.n_embd / 16)
        if not 0.0 < self.dt_min <= self.dt_max:
            raise InputError(f"need 0 < dt_min <= dt_max, got {self.dt_min} and {self.dt_max}")
        if not 0.0 <= self.dropout < 1.0:
            raise InputError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def d_inner(self):
        return self.expand * self.n_embd

    @property
    def padded_vocab_size(self):  # 50257 -> 50304, 50280 -> 50304: matmul shapes that tile well on GPUs
        return -(-self.vocab_size // 64) * 64


# ------------------------------------------------------------------------------------------ model

class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * g (Zhang and Sennrich 2019, arXiv 1910.07467, eq. 4), in float32 whatever the
    input, then cast back, as the reference does."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)


def parallel_scan(a, b):
    """Every h_t = a_t h_{t-1} + b_t, with h_{-1} = 0, for a and b (B, T, d_inner, N), without a loop over t.

    The odd-even recursion (Blelloch 1990, "Prefix sums and their applications", section 1.4): two steps at a time,
    h_{2i+1} = (a_{2i+1} a_{2i}) h_{2i-1} + (a_{2i+1} b_{2i} + b_{2i+1}) is the same recurrence on half the length;
    solve that, then fill in h_{2i} = a_{2i} h_{2i-1} + b_{2i}. Depth 2 log2(T), O(T) work. Only products of a's
    are formed, each a in (0, 1], so nothing can overflow at any length (a cumulative-sum-of-logs scan must divide
    by them and does)."""
    T = a.size(1)
    if T == 1:
        return b
    if T % 2:  # an odd length: one identity step (a = 1, b = 0) at the end, dropped again below
        a, b = F.pad(a, (0, 0, 0, 0, 0, 1), value=1.0), F.pad(b, (0, 0, 0, 0, 0, 1))
    a_even, a_odd = a.unflatten(1, (-1, 2)).unbind(2)  # (B, T/2, d_inner, N) each: steps 0, 2, ... and 1, 3, ...
    b_even, b_odd = b.unflatten(1, (-1, 2)).unbind(2)
    h_odd = parallel_scan(a_odd * a_even, a_odd * b_even + b_odd)                # h_1, h_3, ...
    h_even = a_even * F.pad(h_odd, (0, 0, 0, 0, 1, -1)) + b_even                 # h_0 = b_0, h_2, ...: h_odd shifted
    return torch.stack([h_even, h_odd], 2).flatten(1, 2)[:, :T]


def selective_scan(x, delta, A, B, C, D, h0=None, parallel=True):
    """The selective SSM (Algorithm 2, steps 5-6) on x, delta (B, T, d_inner), A (d_inner, N), B and C (B, T, N),
    D (d_inner,), from the state h0 (B, d_inner, N) (None: zeros). Returns y (B, T, d_inner) and the last state.

    Discretisation (eq. 4): A_bar = exp(Delta A), the zero-order hold; B_bar x = Delta B x, the Euler step the
    reference code takes in place of ZOH's (Delta A)^-1 (exp(Delta A) - I) Delta B (the two agree to first order
    in Delta A, and the checkpoints were trained with the Euler one). Then h_t = A_bar_t h_{t-1} + B_bar_t x_t and y_t = C_t h_t + D x_t (eq. 2a, 2b), solved
    by parallel_scan, or by the loop over t as written (parallel=False: the reference the tests compare with). A
    decoding step is this with T = 1 from the cached state. All in float32, whatever the autocast dtype."""
    dtype = x.dtype
    x, delta, B, C = x.float(), delta.float(), B.float(), C.float()
    dA = torch.exp(delta[..., None] * A)                     # (B, T, d_inner, N): A_bar, each entry in (0, 1]
    dBx = (delta * x)[..., None] * B[:, :, None, :]          # (B, T, d_inner, N): B_bar x
    if parallel:
        if h0 is not None:  # the state carried in enters the first step: h_0 = A_bar_0 h0 + B_bar_0 x_0
            dBx = torch.cat([dA[:, :1] * h0[:, None] + dBx[:, :1], dBx[:, 1:]], 1)
        h = parallel_scan(dA, dBx)
    else:
        hs, h_t = [], dBx.new_zeros(dBx[:, 0].shape) if h0 is None else h0
        for dA_t, dBx_t in zip(dA.unbind(1), dBx.unbind(1)):  # unbind, not dA[:, t]: indexing would make backward
            h_t = dA_t * h_t + dBx_t                           # add a whole (B, T, d_inner, N) zero tensor per step
            hs.append(h_t)
        h = torch.stack(hs, 1)                               # (B, T, d_inner, N)
    y = (h * C[:, :, None, :]).sum(-1) + D * x             # C_t h_t, for every channel
    return y.to(dtype), h[:, -1]


class MambaState:
    """One layer's inference cache, the same size at any context length: the last d_conv - 1 inputs of the
    convolution (B, d_inner, d_conv - 1) and the SSM state h (B, d_inner, N)."""

    def __init__(self):
        self.conv, self.ssm = None, None


class Mixer(nn.Module):
    """The Mamba block of Figure 3 (Algorithm 2): in_proj to x and the gate z; x through a causal depthwise conv1d
    and SiLU; x_proj to (Delta's low-rank input, B, C); dt_proj and softplus to Delta (section 3.2: the bias of
    dt_proj is the Parameter in tau_Delta(Parameter + s_Delta(x)), tau_Delta = softplus); the selective scan; y * SiLU(z);
    out_proj back to n_embd. The Hugging Face names (MambaMixer), so checkpoints load as they are."""

    def __init__(self, cfg):
        super().__init__()
        E, N, R = cfg.d_inner, cfg.d_state, cfg.dt_rank
        self.d_state, self.dt_rank = N, R
        self.in_proj = nn.Linear(cfg.n_embd, 2 * E, bias=cfg.bias)
        self.conv1d = nn.Conv1d(E, E, cfg.d_conv, groups=E, bias=cfg.conv_bias)  # no padding: the state is the past
        self.x_proj = nn.Linear(E, R + 2 * N, bias=False)
        self.dt_proj = nn.Linear(R, E, bias=True)
        # S4D-Real (section 3.6): A = -(1, 2, ..., N) in every channel, kept as log(-A) so that A stays negative
        self.A_log = nn.Parameter(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(E, 1))  # (E, N)
        self.D = nn.Parameter(torch.ones(E))
        self.out_proj = nn.Linear(E, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, u, state=None, parallel=True):
        """u (B, T, n_embd) -> (B, T, n_embd); state (a MambaState) is read and then advanced to the last token."""
        Bsz, T, _ = u.shape
        x, z = self.in_proj(u).chunk(2, dim=-1)                  # (B, T, d_inner) each
        x = x.transpose(1, 2)                                      # (B, d_inner, T): channels first for conv1d
        k = self.conv1d.kernel_size[0]
        past = state.conv if state is not None and state.conv is not None else x.new_zeros(Bsz, x.size(1), k - 1)
        x = torch.cat([past.to(x.dtype), x], dim=-1)               # (B, d_inner, k - 1 + T): zeros before a text
        if state is not None:
            state.conv = x[:, :, x.size(-1) - (k - 1):]
        x = F.silu(F.conv1d(x, self.conv1d.weight, self.conv1d.bias, groups=x.size(1))).transpose(1, 2)
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.softplus(self.dt_proj(dt))                       # (B, T, d_inner), > 0
        A = -torch.exp(self.A_log.float())                         # (d_inner, N), < 0
        y, h = selective_scan(x, delta, A, B, C, self.D.float(), None if state is None else state.ssm, parallel)
        if state is not None:
            state.ssm = h
        return self.dropout(self.out_proj(y * F.silu(z)))


class Block(nn.Module):
    """A residual block: x + Mixer(RMSNorm(x)) (section 3.4: the Mamba block stands in for both of a
    Transformer's sub-blocks, with a norm and a residual connection)."""

    def __init__(self, cfg):
        super().__init__()
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mixer = Mixer(cfg)

    def forward(self, x, state=None, parallel=True):
        return x + self.mixer(self.norm(x), state, parallel)


class Mamba(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.backbone = nn.ModuleDict(dict(  # the Hugging Face names: backbone.embeddings, backbone.layers.N, norm_f
            embeddings=nn.Embedding(cfg.padded_vocab_size, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout),
            layers=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
            norm_f=RMSNorm(cfg.n_embd, cfg.norm_eps),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.padded_vocab_size, bias=False)
        self.lm_head.weight = self.backbone.embeddings.weight  # tied, as in every released Mamba
        self.grad_checkpoint = False  # training: keep only each block's input, recompute the rest in backward
        # Initialisation as the reference (mamba_ssm): the embedding normal with std 0.02; the linear and conv
        # layers PyTorch's default (Kaiming-uniform) with zero biases; out_proj then scaled by 1/sqrt(n_layer),
        # GPT-2's rule for the weights that write into the residual stream; A_log and D as built above.
        nn.init.normal_(self.backbone.embeddings.weight, std=0.02)
        for block in self.backbone.layers:
            m = block.mixer
            for lin in (m.in_proj, m.out_proj):
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
            with torch.no_grad():
                m.out_proj.weight /= math.sqrt(cfg.n_layer)
                # Delta = softplus(dt_proj(.)) starts near dt ~ log-uniform in [dt_min, dt_max] per channel
                # (section 3.6 and the reference code): the bias is softplus^-1(dt) = dt + log(1 - exp(-dt)), the weights uniform in
                # +-dt_rank^-0.5 so that the input moves Delta around that centre.
                nn.init.uniform_(m.dt_proj.weight, -cfg.dt_rank ** -0.5, cfg.dt_rank ** -0.5)
                dt = torch.exp(torch.rand(cfg.d_inner) * (math.log(cfg.dt_max) - math.log(cfg.dt_min))
                               + math.log(cfg.dt_min)).clamp(min=cfg.dt_init_floor)
                m.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def num_params(self, non_embedding=True):
        """Parameters, the tied embedding/head counted once (it is the output layer, so it always counts)."""
        return sum(p.numel() for p in self.parameters())

    def state_bytes(self, itemsize=4):
        """Bytes of the inference cache for one sequence, whatever its length: per layer the convolution's last
        d_conv - 1 inputs (itemsize bytes each) and the SSM state (float32), d_inner x each."""
        cfg = self.config
        return cfg.n_layer * cfg.d_inner * ((cfg.d_conv - 1) * itemsize + cfg.d_state * 4)

    def hidden(self, idx, states=None, parallel=True):
        """idx (B, T) token ids, following the tokens that `states` (one MambaState per layer) have seen, if given ->
        final hidden states (B, T, n_embd)."""
        x = self.backbone.drop(self.backbone.embeddings(idx))    # (B, T, n_embd); no position embedding
        for i, block in enumerate(self.backbone.layers):
            if self.grad_checkpoint and self.training and states is None:
                # activation checkpointing: the scan's (B, T, d_inner, N) states of one block at a time, not all
                x = torch.utils.checkpoint.checkpoint(block, x, None, parallel, use_reentrant=False)
            else:
                x = block(x, None if states is None else states[i], parallel)
        return self.backbone.norm_f(x)

    def forward(self, idx, targets=None, states=None, parallel=True):
        """idx (B, T) token ids -> logits (B, T, vocab_size), loss or None. states: continue from a cache."""
        V, Vp = self.config.vocab_size, self.config.padded_vocab_size
        pad = None
        if Vp > V:  # the padding rows are no tokens: a bias of -inf gives them probability exactly 0
            pad = torch.zeros(Vp, device=idx.device, dtype=self.lm_head.weight.dtype)
            pad[V:] = float("-inf")
        logits = F.linear(self.hidden(idx, states, parallel), self.lm_head.weight, pad)  # (B, T, padded_vocab_size)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
        return logits[..., :V], loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, use_cache=True):
        """Append max_new_tokens sampled tokens to idx (B, T); temperature 0 is greedy.

        With the cache the prompt goes through the parallel scan once, leaving each layer's state; every new token
        is then one recurrent step (Algorithm 2 with T = 1), the same time and memory at any context length. There
        is no block_size window: the model has no positions, and the state carries the whole text. Without the
        cache every step runs the whole text again (same tokens, quadratic time)."""
        states = [MambaState() for _ in self.backbone.layers] if use_cache else None
        new = idx
        for _ in range(max_new_tokens):
            x = self.hidden(new if use_cache else idx, states)
            logits = self.lm_head(x[:, -1])[:, :self.config.vocab_size]  # only the last position is sampled
            new = sample_next(logits.float(), temperature, top_k, top_p)
            idx = torch.cat([idx, new], dim=1)
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
    """A Mamba from a Hugging Face checkpoint: a hub id ("state-spaces/mamba-130m-hf" ... "mamba-2.8b-hf") or a
    local directory with config.json and model.safetensors (or shards + model.safetensors.index.json), as
    `MambaForCausalLM.save_pretrained` writes it. Weights are converted to `dtype` on the way in. Returns the
    model in eval mode."""
    path = checkpoint_dir(name_or_path)
    try:
        hf = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read {path / 'config.json'}: {e}") from None
    if hf.get("model_type") != "mamba":
        raise InputError(f"{path} holds a '{hf.get('model_type')}' model, not Mamba")
    for key, allowed in dict(hidden_act="silu", tie_word_embeddings=True).items():
        if hf.get(key, allowed) != allowed:  # a variant this file does not implement must not load as Mamba
            raise InputError(f"{path}: {key} = {hf[key]} is a Mamba variant this file does not implement")
    n_embd = hf["hidden_size"]
    expand = hf.get("expand", 2)
    if hf.get("intermediate_size", expand * n_embd) != expand * n_embd:
        raise InputError(f"{path}: intermediate_size {hf['intermediate_size']} is not expand x hidden_size")
    rank = hf.get("time_step_rank", "auto")
    cfg = Config(vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], n_embd=n_embd,
                 d_state=hf.get("state_size", 16), expand=expand, d_conv=hf.get("conv_kernel", 4),
                 dt_rank=0 if rank == "auto" else rank, conv_bias=hf.get("use_conv_bias", True),
                 bias=hf.get("use_bias", False), norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                 dt_min=hf.get("time_step_min", 0.001), dt_max=hf.get("time_step_max", 0.1),
                 dt_init_floor=hf.get("time_step_floor", 1e-4), dropout=dropout)
    # bos_token_id is not used: GPT-NeoX's tokenizer, which the released Mambas use, puts nothing before a text

    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    with torch.device("meta"):
        model = Mamba(cfg)  # shapes only: the weights come from the file, no time is spent on a random init
    wanted = model.state_dict()
    state = {}
    for fname in files:
        try:
            tensors = read_safetensors(path / fname)
        except (OSError, ValueError, KeyError) as e:
            raise InputError(f"cannot read {path / fname}: {e}") from None
        for name, t in tensors.items():
            if name == "lm_head.weight":
                continue  # tied: the head is the embedding
            name = name.replace("backbone.embedding.", "backbone.embeddings.")  # the original repos' name
            if name not in wanted:
                raise InputError(f"{path / fname}: unexpected tensor '{name}'")
            if name == "backbone.embeddings.weight":  # pad the vocabulary rows with zeros (they are masked anyway)
                t = F.pad(t, (0, 0, 0, cfg.padded_vocab_size - t.size(0)))
            if t.shape != wanted[name].shape:
                raise InputError(f"{path / fname}: '{name}' has shape {tuple(t.shape)}, config.json implies "
                                 f"{tuple(wanted[name].shape)}")
            state[name] = t.to(device=device, dtype=dtype, memory_format=torch.contiguous_format, copy=True)
    state["lm_head.weight"] = state.get("backbone.embeddings.weight")
    missing = [k for k in wanted if state.get(k) is None]
    if missing:
        raise InputError(f"{path}: checkpoint lacks {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    model.load_state_dict(state, assign=True)
    model.lm_head.weight = model.backbone.embeddings.weight  # assign=True replaced both: tie them again
    return model.eval()


GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def byte_decoder():
    """GPT-2's table from the printable characters that byte-level BPE vocabularies are written in back
    to bytes: printable Latin-1 bytes stand for themselves, the other 68 bytes for chr(256 + n)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(others)}}


def hf_tokenizer(path):
    """tiktoken Encoding for a Hugging Face tokenizer.json holding a byte-level BPE (GPT-2 style, as GPT-NeoX's,
    which the Mamba checkpoints use, or Llama 3 style), or None when the file is something tiktoken cannot run
    (SentencePiece, or a normalizer other than NFC, which is applied here before encoding).

    tiktoken merges the adjacent pair whose result has the lowest rank; tokenizer.json lists merges in
    priority order. The two agree when a token's id is its rank and ids grow along the merge list (checked
    here), as for byte-level BPEs trained with the `tokenizers` package (the tests show it). Added tokens are
    decoded but never produced by encoding: GPT-NeoX's tokens for runs of spaces come out as smaller pieces."""
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
        normalizer = tok.get("normalizer")
        if model.get("type") != "BPE" or normalizer not in (None, {"type": "NFC"}) or steps[-1].get("add_prefix_space"):
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
    encode = enc.encode_ordinary if normalizer is None else lambda s: enc.encode_ordinary(unicodedata.normalize("NFC", s))
    return (str(path), encode, lambda ids: enc.decode([i for i in ids if i in known], errors="replace"),
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
    """uint16 holds GPT-2's and GPT-NeoX's ids; a vocabulary past 65536 needs uint32."""
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
    """AdamW; weight decay on the matrices (linear and conv weights, the embedding), none on biases, norms, D and
    A_log (as the reference: decay would pull A = -exp(A_log) towards -1 in every channel)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if p.dim() >= 2 and not n.endswith("A_log")]
    groups = [{"params": decay, "weight_decay": args.weight_decay},
              {"params": [p for n, p in named if p.dim() < 2 or n.endswith("A_log")], "weight_decay": 0.0}]
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
# costs more than the whole model), small on a GPU. A Mamba block has about 6 n_embd^2 parameters, half a
# Transformer block's, so Mamba stacks twice the layers for a size (Mamba-130M: 24 x 768, GPT-2 124M: 12 x 768).
# On the GPU the scan's float32 states, (batch, T, d_inner, d_state) per layer, set the batch size. Tiny
# Shakespeare is 300K tokens: on an H100 this model's val loss was lowest after 200 steps (5 epochs) and rose
# from 300 on, hence 400 steps.
PRESETS = {
    "cpu": dict(n_layer=4, n_embd=128, d_state=16, block_size=64, batch_size=8, max_iters=200, eval_interval=100,
                eval_iters=10, log_interval=25, lr=3e-3, min_lr=3e-4, warmup_iters=20, dropout=0.0),
    "cuda": dict(n_layer=12, n_embd=384, d_state=16, block_size=256, batch_size=32, max_iters=400, eval_interval=100,
                 eval_iters=50, log_interval=50, lr=1e-3, min_lr=1e-4, warmup_iters=50, dropout=0.2),
}
MODEL_FLAGS = ("n_layer", "n_embd", "d_state", "expand", "d_conv", "dt_rank")  # fixed by a checkpoint
RUN_FLAGS = ("device", "dtype", "compile", "init_from", "sample_only", "out_dir", "tensorboard",
             "prompt", "max_new_tokens", "temperature", "top_k", "top_p")  # never taken from a checkpoint


def parse_args(argv):
    p = argparse.ArgumentParser(description="Train Mamba or sample from it (see the module docstring).")
    cpu, gpu = PRESETS["cpu"], PRESETS["cuda"]

    def preset(name):
        return f"default {cpu[name]} on CPU, {gpu[name]} on CUDA"

    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="auto: cuda, else mps, else cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bf16 autocast on CUDA (fp16 + GradScaler without bf16), float32 elsewhere")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on for CUDA, off elsewhere)")
    p.add_argument("--data", default="shakespeare", help="'shakespeare' or a path to a UTF-8 text file")
    p.add_argument("--out_dir", default=None, help="checkpoints and metrics (default out/mamba)")
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
    p.add_argument("--n_head", type=int, help="refused: Mamba has no attention heads (the other scripts' flag; "
                                              "the mixer's sizes are --d_state, --expand, --d_conv, --dt_rank)")
    p.add_argument("--n_embd", type=int, help=preset("n_embd"))
    p.add_argument("--d_state", type=int, help=preset("d_state") + " (N: the SSM state per channel)")
    p.add_argument("--expand", type=int, default=2, help="d_inner = expand x n_embd (default 2)")
    p.add_argument("--d_conv", type=int, default=4, help="width of the causal depthwise convolution (default 4)")
    p.add_argument("--dt_rank", type=int, default=0, help="rank of Delta's projection (default 0: ceil(n_embd / 16))")
    p.add_argument("--dropout", type=float, help=preset("dropout"))
    p.add_argument("--grad_checkpoint", action="store_true",
                   help="recompute each block's activations in backward (the scan's states take the most memory)")
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
    if args.n_head is not None:
        raise InputError("--n_head: Mamba has no attention heads; its mixer's sizes are --d_state, --expand, "
                         "--d_conv and --dt_rank")
    positive = ("max_iters", "eval_interval", "eval_iters", "log_interval", "batch_size", "block_size", "grad_accum",
                "lr_decay_iters", "max_new_tokens")
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
        print(f"mamba.py: error: {' '.join(str(e).split())}", file=sys.stderr)  # one line, whatever the message
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(args, given):
    device, dtype, use_compile, rank, world = setup_device(args)
    master = rank == 0
    out_dir = Path(args.out_dir or "out/mamba")
    ckpt_path = out_dir / "ckpt.pt"

    torch.manual_seed(args.seed)  # the initial weights; each training step reseeds (see step_seed)

    # --- where the weights come from: a checkpoint of ours, a pretrained Mamba, or a fresh init
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
        model = Mamba(cfg)
        model.load_state_dict(ckpt["model"])
    elif args.init_from != "scratch":  # sampling keeps the weights in the run's dtype (bf16 on CUDA), training in fp32
        path = checkpoint_dir(args.init_from)
        model = from_pretrained(path, device, dtype if args.sample_only else torch.float32, args.dropout).train()
        cfg = model.config
        tokenizer = hf_tokenizer(path / "tokenizer.json")  # None: no tokenizer tiktoken can run
        if tokenizer is None and not args.sample_only:
            raise InputError(f"{path} has no tokenizer.json that tiktoken can read, so it cannot be trained on "
                             "text; --sample_only shows token ids")
        if tokenizer is not None and tokenizer[3] > cfg.vocab_size:
            raise InputError(f"{path}: the tokenizer has {tokenizer[3]:,} tokens, the model only {cfg.vocab_size:,}")
    else:
        tokenizer = load_tokenizer()
        cfg = Config(vocab_size=tokenizer[3], block_size=args.block_size, n_layer=args.n_layer, n_embd=args.n_embd,
                     d_state=args.d_state, expand=args.expand, d_conv=args.d_conv, dt_rank=args.dt_rank,
                     dropout=args.dropout)
        model = Mamba(cfg)
    for k in MODEL_FLAGS:
        if k in given and getattr(args, k) != getattr(cfg, k):
            raise InputError(f"--{k} {getattr(args, k)} does not match the model from --init_from "
                             f"{args.init_from}, which has {k} {getattr(cfg, k)}")
    model.to(device)
    model.grad_checkpoint = args.grad_checkpoint
    ctx = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    tokens_per_step = args.batch_size * args.block_size * args.grad_accum * world
    if master:
        print(f"mamba | {device} | {str(dtype).removeprefix('torch.')} | compile {'on' if use_compile else 'off'} | "
              f"{model.num_params() / 1e6:.2f}M params | d_inner {cfg.d_inner}, d_state {cfg.d_state} | "
              f"{tokens_per_step:,} tokens/step | "
              f"data {args.data} | tokenizer {tokenizer[0] if tokenizer else 'none (token ids)'} | "
              f"init {args.init_from}" + (f" | DDP x{world}" if world > 1 else ""))

    def sample(title):
        torch.manual_seed(args.seed)
        if tokenizer is None:
            print(f"no tokenizer tiktoken can read in {args.init_from}: the prompt is not used, the sample starts "
                  f"from token 0 and is shown as token ids")
            prompt = [0]
        else:
            prompt = tokenizer[1](args.prompt) or [0]  # any length: no positions, no window
        itemsize = (dtype if dtype != torch.float32 else model.lm_head.weight.dtype).itemsize
        print(f"recurrent state: {model.state_bytes(itemsize):,} bytes per sequence at any length ({cfg.n_layer} "
              f"layers x {cfg.d_inner} channels x ({cfg.d_conv - 1} conv inputs x {itemsize} bytes + "
              f"{cfg.d_state} SSM states x 4 bytes))")
        model.eval()
        with ctx:
            out = model.generate(torch.tensor([prompt], device=device), args.max_new_tokens, args.temperature,
                                 args.top_k or None, args.top_p)
        text = str(out[0].tolist()) if tokenizer is None else tokenizer[2](out[0].tolist())
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
    # 6 per parameter per token (PaLM, app. B); the scan's elementwise work, about 9 d_inner d_state per layer
    # and token forward, is left out as attention's would be: MFU counts the matmuls.
    flops_per_token = 6 * model.num_params()
    loss_sum, loss_count = torch.zeros((), device=device), 0
    t_log, iters_logged, t_start = time.perf_counter(), iter_num, time.time()
    train_model.train()
    while iter_num < args.max_iters:
        lr = lr_at(iter_num, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
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
