"""LoRA and QLoRA in one file: fine-tuning a pretrained GPT-2 through low-rank adapters, on a 4-bit base or not.

Papers: Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv 2106.09685; Dettmers et al.
2023, "QLoRA: Efficient Finetuning of Quantized LLMs", arXiv 2305.14314. The model is GPT-2 (Radford et al. 2019),
the same code as gpt2.py, carried here so that this file stands alone.

LoRA (section 4.1): a pretrained weight W0 stays frozen and each adapted layer learns a low-rank update,
h = W0 x + (alpha / r) B A x, with A (r x in) random and B (out x r) zero at the start, so fine-tuning begins at
the pretrained model exactly and trains r (in + out) numbers per layer instead of in x out. `add_lora` wraps the
chosen linear layers in place (all four per block by default), `merge_lora` folds B A back into W0 for inference,
`lora_state_dict` is the adapters alone: a run saves only those, a fraction of a percent of the model.
QLoRA (section 3): the frozen base is stored as 4-bit NormalFloat codes (16 levels at the quantiles of a normal
distribution, one absmax scale per block of 64 weights), the scales themselves quantized to 8 bits in blocks of
256 ("double quantization"), about 4.13 bits per weight; the forward pass dequantizes each weight on the fly, and
only the adapters, kept in 16/32 bits, are trained. Paged optimizers (the paper's third idea) are not here.

What is here: GPT-2 and its Hugging Face checkpoints; LoRA and QLoRA as above, with adapters in peft's names so
that they move to and from a `peft` LoRA model unchanged; fine-tuning on tiny-shakespeare (or any text file) with
AdamW, warmup + cosine, gradient accumulation, bf16 autocast, torch.compile and DistributedDataParallel; exact
resume from atomic checkpoints that hold the adapters and the optimizer, not the base; a sample from the base model
and one from the fine-tuned model with the same seed and prompt, so the effect shows.

    python lora.py                                       # GPT-2 124M + rank-8 adapters on tiny-shakespeare
    python lora.py --qlora                               # the same on an NF4 base
    python lora.py --device cuda --init_from gpt2-medium --lora_rank 16
    torchrun --standalone --nproc_per_node 8 lora.py     # DDP on 8 GPUs
    python lora.py --init_from resume --sample_only      # the base plus the saved adapters

Offline (no download, no tiktoken files) it says so and carries on: a freshly initialised GPT-2 as the base when
the default gpt2 cannot be fetched, the Python standard library's own source as the text, raw UTF-8 bytes as the
tokens. Every step's randomness is drawn from a seed made of (--seed, iteration, rank), so `--init_from resume`
continues exactly as an uninterrupted run would.
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
    vocab_size: int = 50257           # vocab_size: real tokens; the embedding is padded to a multiple of 64
    block_size: int = 1024            # n_positions: longest context, the size of the position table
    n_layer: int = 12                 # n_layer
    n_head: int = 12                  # n_head
    n_embd: int = 768                 # n_embd
    dropout: float = 0.0              # resid_pdrop = embd_pdrop = attn_pdrop
    layer_norm_epsilon: float = 1e-5  # layer_norm_epsilon

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                raise InputError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise InputError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise InputError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def padded_vocab_size(self):  # 50257 -> 50304: matmul shapes that tile well on GPUs
        return -(-self.vocab_size // 64) * 64


# ------------------------------------------------------------------------------------------ model

class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.block_size, self.dropout = cfg.n_head, cfg.block_size, cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)  # q, k, v of all heads in one matmul
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, cache=None, pos=0):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)  # (B, nh, T, hd)
        if cache is not None:  # [] at first, then the [k, v] buffers (B, nh, block_size, hd) of the tokens so far
            if not cache:
                cache += [k.new_zeros(B, self.n_head, self.block_size, C // self.n_head) for _ in range(2)]
            cache[0][:, :, pos:pos + T], cache[1][:, :, pos:pos + T] = k, v
            k, v = cache[0][:, :, :pos + T], cache[1][:, :, :pos + T]
        # Query i sits at position pos + i and sees keys 0..pos + i. From pos 0 that is the usual causal mask; one
        # new token sees the whole cache, no mask; a chunk after a cache needs the mask shifted by pos (SDPA's
        # is_causal would align it top-left, which is wrong there).
        mask = None if pos == 0 or T == 1 else torch.ones(T, pos + T, dtype=torch.bool, device=x.device).tril(pos)
        # softmax(q k^T / sqrt(head_dim)) v, per head (Vaswani et al. 2017, eq. 1); flash attention on CUDA
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=pos == 0,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, C)  # heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LN residual block: GPT-2 moved LayerNorm to the input of each sub-block (paper section 2.3)."""

    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg)

    def forward(self, x, cache=None, pos=0):
        x = x + self.attn(self.ln_1(x), cache, pos)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.padded_vocab_size, cfg.n_embd),
            wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
            ln_f=nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon),  # the final LayerNorm GPT-2 added
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.padded_vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # one matrix reads tokens in and writes them out
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # "scale the weights of residual layers by 1/sqrt(N)", section 2.3
            if name.endswith("c_proj.weight"):   # N = 2 n_layer residual additions
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding=True):
        """Parameters, the tied wte/lm_head matrix counted once; the position table left out by default."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def hidden(self, idx, cache=None, pos=0):
        """idx (B, T) token ids at positions pos..pos+T-1 -> final hidden states (B, T, C)."""
        B, T = idx.shape
        if pos + T > self.config.block_size:
            raise ValueError(f"positions up to {pos + T} but block_size is {self.config.block_size}")
        positions = torch.arange(pos, pos + T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            x = block(x, None if cache is None else cache[i], pos)
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None, cache=None, pos=0):
        """idx (B, T) token ids at positions pos..pos+T-1 -> logits (B, T, vocab_size), loss or None."""
        V = self.config.vocab_size
        pad = torch.zeros(self.config.padded_vocab_size, device=idx.device, dtype=self.lm_head.weight.dtype)
        pad[V:] = float("-inf")  # the padding rows are no tokens: a bias of -inf gives them probability exactly 0
        logits = F.linear(self.hidden(idx, cache, pos), self.lm_head.weight, pad)  # (B, T, padded_vocab_size)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
        return logits[..., :V], loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, use_cache=True):
        """Append max_new_tokens sampled tokens to idx (B, T); temperature 0 is greedy.

        With the cache each new token costs one position. Once the text is longer than block_size the
        window slides: the model sees the last block_size tokens, and since positions are learned and
        absolute, every kept token moves to a new position, so the cache no longer holds; from then on
        each token re-reads the whole window (as without a cache, and giving the same tokens).
        """
        cache, pos = [[] for _ in self.transformer.h] if use_cache else None, 0
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


# ------------------------------------------------------------------------------------- LoRA and QLoRA

class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update (LoRA, Hu et al. 2021, section 4.1, eq. 3):
    h = W0 x + (alpha / r) B A x. A (r, in) starts Kaiming-uniform, B (out, r) at zero, so training starts from
    the base model's function exactly; dropout, if any, acts on the input of A only. The names are peft's
    (lora_A.weight, lora_B.weight), so adapters move between the two unchanged."""

    def __init__(self, base, rank, alpha, dropout=0.0):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        self.lora_A = nn.Linear(base.in_features, rank, bias=False)  # nn.Linear's init: kaiming_uniform_(a=sqrt(5))
        self.lora_B = nn.Linear(rank, base.out_features, bias=False)
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scale


def swap_layers(model, swap):
    """Replace, in place, each layer for which swap(name, layer) returns a module (None: keep it); returns model."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            new = swap(name, child)
            if new is not None:
                setattr(module, name, new)
    return model


def add_lora(model, rank=8, alpha=16, targets=("c_attn", "c_proj", "c_fc"), dropout=0.0):
    """Wrap every linear layer named in targets (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj by default) in a
    LoRALinear, in place, and freeze everything else: afterwards only the adapters require gradients."""
    for p in model.parameters():
        p.requires_grad_(False)
    return swap_layers(model, lambda name, layer: LoRALinear(layer, rank, alpha, dropout)
                       if name in targets and isinstance(layer, (nn.Linear, NF4Linear)) else None)


def merge_lora(model):
    """Fold each adapter into its base weight, W0 + (alpha / r) B A (section 4.1: no extra latency at inference),
    and put the plain linear layer back. An NF4 base is dequantized first (merged weights are no NF4 codes)."""
    def merged(name, layer):
        if not isinstance(layer, LoRALinear):
            return None
        base = layer.base.dequantized() if isinstance(layer.base, NF4Linear) else layer.base
        with torch.no_grad():
            base.weight += (layer.lora_B.weight @ layer.lora_A.weight).to(base.weight.dtype) * layer.scale
        return base
    return swap_layers(model, merged)


def lora_state_dict(model):
    """The adapters alone: {"transformer.h.0.attn.c_attn.lora_A.weight": ..., ...} (peft's keys without its
    "base_model.model." prefix)."""
    return {k: v for k, v in model.state_dict().items() if ".lora_A." in k or ".lora_B." in k}


def load_lora(model, adapters):
    """Copy adapters (as lora_state_dict returns them) into a model that add_lora has wrapped the same way."""
    wanted = lora_state_dict(model)
    if set(adapters) != set(wanted):
        extra, missing = sorted(set(adapters) - set(wanted)), sorted(set(wanted) - set(adapters))
        raise InputError(f"the adapters do not fit this model: {len(extra)} unexpected ({extra[:2]}), "
                         f"{len(missing)} missing ({missing[:2]})")
    for k, v in adapters.items():
        if v.shape != wanted[k].shape:
            raise InputError(f"the adapters do not fit this model: '{k}' has shape {tuple(v.shape)}, the model "
                             f"{tuple(wanted[k].shape)} (another --lora_rank?)")
    model.load_state_dict(adapters, strict=False)
    return model


# The 16 values of 4-bit NormalFloat (QLoRA, Dettmers et al. 2023, section 3): quantiles of N(0, 1), 8 for the
# positive half and 7 for the negative one plus an exact 0, scaled to [-1, 1]; the values bitsandbytes ships.
NF4 = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                    0.7229568362236023, 1.0])


class NF4Matmul(torch.autograd.Function):
    """x W^T with W dequantized now and again in backward: the full-precision W is never kept for backward (as
    bitsandbytes' MatMul4Bit). W is frozen, so only x gets a gradient."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return x @ layer.weight_as(x.dtype).t()

    @staticmethod
    def backward(ctx, grad):
        return grad @ ctx.layer.weight_as(grad.dtype), None


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored as 4-bit NormalFloat codes (QLoRA, section 3): the flattened
    weight in blocks of block_size (64), each divided by its absmax and rounded to the nearest NF4 value (a value
    halfway between two goes to the lower one, as bitsandbytes), two codes per byte, the first in the high nibble.
    Double quantization: the per-block absmax scales, less their mean, are themselves stored as int8 in blocks of
    256 with one float32 scale each, so the scales cost 8/64 + 32/(64 * 256) bits per weight instead of 32/64
    (bitsandbytes uses its 8-bit dynamic map there, the paper FP8; a linear int8 map is used here). The forward
    pass dequantizes in the compute dtype: bf16 under CUDA autocast, float32 on a CPU."""

    def __init__(self, linear, block_size=64, scale_block=256):
        super().__init__()
        w = linear.weight.detach().float().flatten()
        if w.numel() % (2 * block_size):
            raise InputError(f"NF4: a weight of {w.numel()} numbers is not a whole number of blocks of {block_size}")
        self.in_features, self.out_features, self.block_size = linear.in_features, linear.out_features, block_size
        blocks = w.view(-1, block_size)
        absmax = blocks.abs().amax(dim=1)                                             # (n_blocks,)
        scaled = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]  # in [-1, 1]; zero blocks stay 0
        codes = torch.bucketize(scaled, (NF4[1:] + NF4[:-1]) / 2).to(torch.uint8).flatten()  # nearest NF4 value
        self.register_buffer("packed", codes[0::2] << 4 | codes[1::2])               # (numel / 2,) uint8
        # the values of the two codes in each of the 256 possible bytes: one lookup dequantizes a byte
        self.register_buffer("pairs", torch.stack((NF4.repeat_interleave(16), NF4.repeat(16)), -1), persistent=False)
        self.register_buffer("offset", absmax.mean())
        a = F.pad(absmax - self.offset, (0, -absmax.numel() % scale_block)).view(-1, scale_block)
        self.register_buffer("absmax_scale", a.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127)
        self.register_buffer("absmax_q", torch.round(a / self.absmax_scale[:, None]).to(torch.int8))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def weight_as(self, dtype):
        """The dequantized weight (out, in) in dtype."""
        n_blocks = self.in_features * self.out_features // self.block_size
        absmax = (self.absmax_q.float() * self.absmax_scale[:, None]).flatten()[:n_blocks] + self.offset
        w = self.pairs[self.packed.long()].view(n_blocks, self.block_size) * absmax[:, None]
        return w.view(self.out_features, self.in_features).to(dtype)

    def dequantized(self):
        """A plain nn.Linear holding the dequantized weight (float32)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=self.packed.device)
        with torch.no_grad():
            linear.weight.copy_(self.weight_as(torch.float32))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def bits_per_weight(self):
        return 8 * (self.packed.numel() + self.absmax_q.numel() + 4 * self.absmax_scale.numel() + 4) \
            / (self.in_features * self.out_features)

    def forward(self, x):
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        y = NF4Matmul.apply(x, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)


def quantize_nf4(model, block_size=64, targets=("c_attn", "c_proj", "c_fc")):
    """Replace the named linear layers' weights by NF4Linear, in place (the embedding and head stay as they are);
    returns the model."""
    return swap_layers(model, lambda name, layer: NF4Linear(layer, block_size)
                       if name in targets and isinstance(layer, nn.Linear) else None)


# -------------------------------------------------------------------------- pretrained checkpoints

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path):
    """{name: tensor} from a .safetensors file: 8-byte little-endian header size, JSON header, raw bytes.

    The tensors are memory-mapped views of the file (copy-on-write): reading a 6 GB file costs no RAM
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
    if os.environ.get("HF_TOKEN"):
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


def fetch_hub_files(repo):
    """Download config.json and the safetensors weights (one file or sharded) of a hub repo; return its dir."""
    local = CACHE_DIR / repo

    def get(fname):
        return download(f"{HF_ENDPOINT}/{repo}/resolve/main/{fname}", local / fname)

    try:
        get("config.json")
        try:
            get("model.safetensors")
        except requests.HTTPError as e:
            if e.response is None or e.response.status_code != 404:
                raise
            index = json.loads(get("model.safetensors.index.json").read_text())
            for shard in sorted(set(index["weight_map"].values())):
                get(shard)
    except requests.RequestException as e:
        raise InputError(f"cannot fetch '{repo}' from {HF_ENDPOINT}: {e}") from None
    return local


def from_pretrained(name_or_path, device="cpu", dtype=torch.float32, dropout=0.0):
    """A GPT from a Hugging Face GPT-2 checkpoint: a hub id ("gpt2", "gpt2-medium", "gpt2-large",
    "gpt2-xl", ...) or a local directory with config.json and model.safetensors (or shards + index).
    Returns the model in eval mode; dropout applies once it is put in train mode."""
    name_or_path = str(name_or_path)
    path = Path(name_or_path)
    if not path.is_dir():
        if path.exists() or name_or_path.startswith((".", "/", "~")):
            raise InputError(f"'{name_or_path}' is not a checkpoint directory")
        path = fetch_hub_files(name_or_path)
    try:
        hf = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read {path / 'config.json'}: {e}") from None
    if hf.get("model_type", "gpt2") != "gpt2":
        raise InputError(f"{path} holds a '{hf.get('model_type')}' model, not GPT-2")
    gpt2_choices = dict(activation_function=("gelu_new", "gelu_pytorch_tanh"), n_inner=(None, 4 * hf["n_embd"]),
                        scale_attn_weights=(True,), scale_attn_by_inverse_layer_idx=(False,), tie_word_embeddings=(True,))
    for key, allowed in gpt2_choices.items():  # a variant this file does not implement must not load as GPT-2
        if hf.get(key, allowed[0]) not in allowed:
            raise InputError(f"{path}: {key} = {hf[key]} is a GPT-2 variant this file does not implement")
    cfg = Config(vocab_size=hf["vocab_size"], block_size=hf["n_positions"], n_layer=hf["n_layer"],
                 n_head=hf["n_head"], n_embd=hf["n_embd"], dropout=dropout,
                 layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5))

    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    with torch.device("meta"):
        model = GPT(cfg)  # shapes only: the weights come from the file, no time is spent on a random init
    wanted = model.state_dict()
    state = {}
    for fname in files:
        try:
            tensors = read_safetensors(path / fname)
        except (OSError, ValueError, KeyError) as e:
            raise InputError(f"cannot read {path / fname}: {e}") from None
        for name, t in tensors.items():
            name = name if name.startswith(("transformer.", "lm_head.")) else "transformer." + name  # hub files lack the prefix
            if name.endswith((".attn.bias", ".attn.masked_bias")) or name == "lm_head.weight":
                continue  # old causal-mask buffers; the head is tied to wte
            if name not in wanted:
                raise InputError(f"{path / fname}: unexpected tensor '{name}'")
            if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
                t = t.t()  # HF's Conv1D stores (in, out); nn.Linear wants (out, in)
            if name == "transformer.wte.weight":  # pad the vocabulary rows with zeros (they are masked anyway)
                t = F.pad(t, (0, 0, 0, cfg.padded_vocab_size - t.size(0)))
            state[name] = t.to(device=device, dtype=dtype, memory_format=torch.contiguous_format, copy=True)
    state["lm_head.weight"] = state.get("transformer.wte.weight")
    missing = [k for k in wanted if state.get(k) is None]
    if missing:
        raise InputError(f"{path}: checkpoint lacks {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    model.load_state_dict(state, assign=True)
    model.lm_head.weight = model.transformer.wte.weight  # assign=True replaced both: tie them again
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
    """Mean loss over --eval_iters batches per split; the same batches at every eval (seeded by --seed)."""
    model.eval()
    torch.manual_seed(args.seed)
    out = {}
    for split in ("train", "val"):
        losses = torch.zeros(args.eval_iters)
        for k in range(args.eval_iters):
            x, y = get_batch(data_dir, split, args.batch_size, args.block_size, device)
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
        for key in ("model", "base", "optimizer", "scaler", "config", "args", "iter_num", "best_val",
                    "evals_since_best", "tokenizer"):
            ckpt[key]
    except Exception as e:  # a truncated zip, a foreign pickle, a missing key: all mean "not our checkpoint"
        why = (str(e).strip().splitlines() or [""])[0][:120]
        raise InputError(f"--init_from resume: {path} is not a readable checkpoint ({type(e).__name__}: {why})") from None
    return ckpt


def step_seed(seed, iter_num, rank):
    """Each step's batches and dropout come from this seed: a resumed run repeats them exactly."""
    return (seed * 1_000_003 + iter_num) * 1_009 + rank


# ------------------------------------------------------------------------------------------- main

# Defaults: the base is GPT-2 124M from the hub (12 x 768, whatever the flags below say); the sizes here are those of
# the fresh GPT-2 that stands in offline. Adapters starting at B = 0 take a higher learning rate than full
# fine-tuning would; 1e-3 here. Tiny Shakespeare is 300K tokens: a few hundred steps are plenty.
PRESETS = {
    "cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=8, max_iters=200, eval_interval=100,
                eval_iters=10, log_interval=25, lr=1e-3, min_lr=1e-4, warmup_iters=20, dropout=0.0),
    "cuda": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=32, max_iters=500, eval_interval=100,
                 eval_iters=50, log_interval=50, lr=1e-3, min_lr=1e-4, warmup_iters=50, dropout=0.0),
}
MODEL_FLAGS = ("n_layer", "n_head", "n_embd")     # fixed by a checkpoint
RUN_FLAGS = ("device", "dtype", "compile", "init_from", "sample_only", "out_dir", "tensorboard",
             "prompt", "max_new_tokens", "temperature", "top_k", "top_p")  # never taken from a checkpoint


def parse_args(argv):
    p = argparse.ArgumentParser(description="Fine-tune GPT-2 with LoRA or QLoRA, or sample from it (see the module docstring).")
    cpu, gpu = PRESETS["cpu"], PRESETS["cuda"]

    def preset(name):
        return f"default {cpu[name]} on CPU, {gpu[name]} on CUDA"

    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="auto: cuda, else mps, else cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bf16 autocast on CUDA (fp16 + GradScaler without bf16), float32 elsewhere")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on for CUDA, off elsewhere)")
    p.add_argument("--data", default="shakespeare", help="'shakespeare' or a path to a UTF-8 text file")
    p.add_argument("--out_dir", default=None, help="checkpoints and metrics (default out/lora)")
    p.add_argument("--init_from", default="gpt2", help="the base: a hub id / HF directory (default gpt2; offline, a fresh "
                   "GPT-2), 'scratch' (a fresh GPT-2), or 'resume' (out_dir/ckpt.pt: its base and adapters)")
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
    p.add_argument("--weight_decay", type=float, default=0.0, help="on the adapters (default 0: decay pulls B A, and "
                   "so the model, back towards the base)")
    p.add_argument("--grad_clip", type=float, default=1.0, help="clip the global gradient norm (0: off)")
    p.add_argument("--n_layer", type=int, help=preset("n_layer"))
    p.add_argument("--n_head", type=int, help=preset("n_head"))
    p.add_argument("--n_embd", type=int, help=preset("n_embd"))
    p.add_argument("--dropout", type=float, help=preset("dropout") + " (in the base model)")
    p.add_argument("--lora_rank", type=int, default=8, help="r, the adapters' rank (default 8)")
    p.add_argument("--lora_alpha", type=float, default=16.0, help="alpha: the update is scaled by alpha / r (default 16)")
    p.add_argument("--lora_dropout", type=float, default=0.0, help="dropout on the adapters' input (default 0)")
    p.add_argument("--lora_targets", default="c_attn,c_proj,c_fc", help="the linear layers to adapt, by name "
                   "(default c_attn,c_proj,c_fc: every linear layer in the blocks)")
    p.add_argument("--qlora", action="store_true", help="QLoRA: the base's adapted layers stored in 4-bit NormalFloat")
    p.add_argument("--nf4_block", type=int, default=64, help="--qlora: weights per absmax block (default 64)")
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
                "lr_decay_iters", "max_new_tokens", "lora_rank", "lora_alpha", "nf4_block")
    for name in positive:
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise InputError(f"--{name} must be positive, got {getattr(args, name)}")
    for name in ("lr", "min_lr", "warmup_iters", "weight_decay", "grad_clip", "patience", "temperature", "top_k"):
        if getattr(args, name) < 0:
            raise InputError(f"--{name} must not be negative, got {getattr(args, name)}")
    if args.top_p is not None and not 0.0 < args.top_p <= 1.0:
        raise InputError(f"--top_p must be in (0, 1], got {args.top_p}")
    if not 0.0 <= args.lora_dropout < 1.0:
        raise InputError(f"--lora_dropout must be in [0, 1), got {args.lora_dropout}")
    if not [t for t in args.lora_targets.split(",") if t]:
        raise InputError("--lora_targets names no layer")


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
        print(f"lora.py: error: {' '.join(str(e).split())}", file=sys.stderr)  # one line, whatever the message
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(args, given):
    device, dtype, use_compile, rank, world = setup_device(args)
    master = rank == 0
    out_dir = Path(args.out_dir or "out/lora")
    ckpt_path = out_dir / "ckpt.pt"

    torch.manual_seed(args.seed)  # the initial weights; each training step reseeds (see step_seed)

    # --- the base: a pretrained GPT-2 (offline, by default, a freshly initialised one), then NF4, then adapters
    ckpt = load_checkpoint(ckpt_path) if args.init_from == "resume" else None
    if ckpt is not None:  # flags not typed now take the values the checkpointed run had
        for k, v in ckpt["args"].items():
            if k not in given and k not in RUN_FLAGS:
                setattr(args, k, v)
    for k, v in PRESETS["cuda" if device.type == "cuda" else "cpu"].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    check_args(args)
    targets = tuple(t for t in args.lora_targets.split(",") if t)
    base = ckpt["base"] if ckpt is not None else args.init_from
    model, init = None, args.init_from
    if base != "scratch":
        try:
            model = from_pretrained(base, dropout=args.dropout).train()
            tokenizer = load_tokenizer(required="gpt2")
        except InputError as e:
            if ckpt is not None or "init_from" in given or "cannot fetch" not in str(e):
                raise
            if args.sample_only:
                raise InputError(f"--sample_only needs weights, and the default base '{base}' cannot be fetched") from None
            init = f"a fresh GPT-2 (offline: the base '{base}' cannot be fetched)"
            base = "scratch"
    if model is None:  # seeded above: a resumed run rebuilds the same base weights
        tokenizer = load_tokenizer(required=ckpt["tokenizer"] if ckpt is not None else None)
        model = GPT(Config(**{**ckpt["config"], "dropout": args.dropout}) if ckpt is not None else
                    Config(vocab_size=tokenizer[3], block_size=args.block_size, n_layer=args.n_layer,
                           n_head=args.n_head, n_embd=args.n_embd, dropout=args.dropout))
    cfg = model.config
    for k in MODEL_FLAGS:
        if k in given and getattr(args, k) != getattr(cfg, k):
            raise InputError(f"--{k} {getattr(args, k)} does not match the model from --init_from "
                             f"{args.init_from}, which has {k} {getattr(cfg, k)}")
    if args.block_size > cfg.block_size:
        raise InputError(f"--block_size {args.block_size} is longer than the model's context ({cfg.block_size})")
    n_params, full_bytes = (sum(f(p) for p in model.parameters()) for f in (torch.numel, lambda p: p.numel() * p.element_size()))
    matmul_params = model.num_params()  # counted before NF4 turns the adapted weights into buffers
    if args.qlora:
        quantize_nf4(model, args.nf4_block, targets)
    add_lora(model, args.lora_rank, args.lora_alpha, targets, args.lora_dropout)
    if ckpt is not None:
        load_lora(model, ckpt["model"])
    model.to(device)
    ctx = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    tokens_per_step = args.batch_size * args.block_size * args.grad_accum * world
    adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if master:
        print(f"lora | {device} | {str(dtype).removeprefix('torch.')} | compile {'on' if use_compile else 'off'} | "
              f"{n_params / 1e6:.2f}M params | {tokens_per_step:,} tokens/step | data {args.data} | "
              f"tokenizer {tokenizer[0]} | init {init}" + (f" | DDP x{world}" if world > 1 else ""))
        print(f"{'QLoRA' if args.qlora else 'LoRA'} rank {args.lora_rank}, alpha {args.lora_alpha} on "
              f"{','.join(targets)}: {adapters:,} trainable parameters ({100 * adapters / n_params:.2f}%), "
              f"{4 * adapters:,} bytes of adapters in float32 against {full_bytes:,} for the whole model")
        if args.qlora:
            nf4 = [m for m in model.modules() if isinstance(m, NF4Linear)]
            n = sum(m.in_features * m.out_features for m in nf4)
            bits = sum(m.bits_per_weight() * m.in_features * m.out_features for m in nf4) / n
            print(f"nf4: {len(nf4)} linear layers, {n:,} weights at {bits:.3f} bits each (block {args.nf4_block}, "
                  f"scales double-quantized), {n * bits / 8:,.0f} bytes against {4 * n:,} in float32")

    def sample(title):
        torch.manual_seed(args.seed)
        idx = torch.tensor([tokenizer[1](args.prompt) or [0]], device=device)  # a long prompt: generate slides
        model.eval()
        with ctx:
            out = model.generate(idx, args.max_new_tokens, args.temperature, args.top_k or None, args.top_p)
        print(f"--- {title} ---\n{tokenizer[2](out[0].tolist())}\n---")
        model.train()

    if args.sample_only:
        if base == "scratch" and ckpt is None:
            raise InputError("--sample_only needs --init_from resume, a hub id or an HF directory")
        if master:
            sample(f"sample from {args.init_from}")
        return
    if master and ckpt is None:  # fresh adapters (B = 0): this is the base model, with the seed and prompt of the end
        sample("sample from the base model, before fine-tuning")

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
    # PaLM (app. B) counts 6 N per token for training: 2 N forward, 4 N backward. With the base frozen the backward
    # still carries gradients through every weight to the activations (2 N) but computes no weight gradients
    # (the adapters' are negligible), so 4 N here; attention's term is unchanged.
    flops_per_token = 4 * matmul_params + 12 * cfg.n_layer * cfg.n_embd * args.block_size
    loss_sum, loss_count = torch.zeros((), device=device), 0
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
                losses = estimate_loss(eval_model, data_dir, args, device, ctx)
                if not all(map(math.isfinite, losses.values())):
                    diverged(f"eval {iter_num} | train {losses['train']} | val {losses['val']}")
                improved = losses["val"] < best_val
                best_val, evals_since_best = (losses["val"], 0) if improved else (best_val, evals_since_best + 1)
                save_checkpoint(dict(model=lora_state_dict(model), base=base, optimizer=optimizer.state_dict(),
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
        sample("sample")  # the fine-tuned model, the same seed and prompt as the base model's above
        print(f"done | {iter_num} iters | best val {best_val:.4f} | {time.time() - t_start:.0f} s")
    if writer is not None:
        writer.close()


if __name__ == "__main__":
    main()
