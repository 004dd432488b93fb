"""bitnet.py at the model level: HF parity with transformers' BitNetForCausalLM in both of its layouts (master weights
quantized online; packed 2-bit codes) over MHA, GQA, MQA, tied embeddings, rope theta, head count and a padded
vocabulary, and its greedy generation; the packing byte for byte against transformers' own packer; the quantizers
(ternary and binary weight codes, 8-bit per-token activation codes) and the straight-through estimator's gradients
against hand-written ones and transformers'; packed = unpacked bit for bit, and the packed sizes; the KV cache and
causality, packed and not; training of both variants; the two-stage schedule; the refusals; and the command line
with a pretrained checkpoint (the common command-line tests are in test_scripts.py).

transformers' BitNet layers are decorated with @torch.compile, which on a CPU compiles for tens of seconds at the
first call: this module runs them eagerly (dynamo disabled while it runs), the same arithmetic. transformers cannot
build a head_dim apart from hidden_size / heads (its attn_sub_norm has hidden_size entries), so that case is not
compared."""
import copy
import json
import math
import re
import shutil
import sys
from types import SimpleNamespace

import pytest
import safetensors.torch
import torch
import torch._dynamo
import transformers
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.integrations.bitnet import AutoBitLinear, WeightQuant, pack_weights, unpack_weights

import bitnet
from conftest import (ROOT, check_cached_equals_uncached, check_causal, check_greedy_matches_hf, ids, max_diff,
                      randomize, scale_up, script_home, train_tokenizer)

sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_bitnet  # noqa: E402  (the quantizers before issue 30)

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
pytestmark = pytest.mark.usefixtures("one_thread", "eager_transformers")

ONLINE = dict(quant_method="bitnet", linear_class="autobitlinear", quantization_mode="online")    # master weights
OFFLINE = dict(quant_method="bitnet", linear_class="bitlinear", quantization_mode="offline")      # packed codes
# name: BitNetConfig arguments on top of BASE
HF_CASES = {
    "gqa": dict(),
    "mha": dict(num_key_value_heads=4),
    "mqa": dict(num_key_value_heads=1),
    "tied": dict(tie_word_embeddings=True),
    "theta10k_eps1e-6": dict(rope_theta=10000.0, rms_norm_eps=1e-6),
    "heads8": dict(num_attention_heads=8, num_key_value_heads=2),   # head_dim 8
    "odd_vocab": dict(vocab_size=1000),                             # vocab padded to 1024
}
BASE = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, bos_token_id=None, eos_token_id=None, pad_token_id=None)
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


@pytest.fixture(scope="module")
def eager_transformers():
    """Dynamo off for this module, restored afterwards; yields the count of frames compiled so far, which a test
    can check did not grow (transformers really ran eagerly)."""
    disabled = torch._dynamo.config.disable
    torch._dynamo.config.disable = True
    yield counters["frames"]["total"]
    torch._dynamo.config.disable = disabled


def make_hf(seed=0, scale=10.0, **kw):
    """A random full-precision BitNetForCausalLM (no quantization_config yet) in eval mode, weights scaled up so that
    the logits are of order 1 or more, every norm gain (sub-norms too) random around 1."""
    torch.manual_seed(seed)
    return scale_up(transformers.BitNetForCausalLM(transformers.BitNetConfig(**{**BASE, **kw})), scale)


def set_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **changes}))


def ternary(w):
    """The absmean codes and scale, written out as transformers' WeightQuant computes them."""
    s = 1.0 / w.float().abs().mean().clamp(min=1e-5)
    return (w.float() * s).round().clamp(-1, 1), s


def save_online(hf, path):
    """hf's master weights as save_pretrained writes them, with the online quantization_config."""
    hf.save_pretrained(path)
    set_config(path, quantization_config=ONLINE)
    return path


def save_packed(hf, path):
    """hf's weights in the layout of microsoft/bitnet-b1.58-2B-4T: each block linear's codes packed by transformers'
    pack_weights (uint8, out / 4 rows) and its weight_scale s_w = 1 / mean|W|; the rest as saved."""
    hf.save_pretrained(path)
    packed = {}
    for name, w in safetensors.torch.load_file(str(path / "model.safetensors")).items():
        if name.endswith("_proj.weight"):
            codes, s = ternary(w)
            packed[name], packed[name.replace(".weight", ".weight_scale")] = pack_weights(codes), s.reshape(1)
        else:
            packed[name] = w
    safetensors.torch.save_file(packed, str(path / "model.safetensors"))
    set_config(path, quantization_config=OFFLINE)
    return path


def load_hf(path):
    return transformers.BitNetForCausalLM.from_pretrained(path).eval()


def logits_of(model, idx):
    with torch.no_grad():
        out = model(idx)
    return out.logits if hasattr(out, "logits") else out[0]


def assert_matches_up_to_code_flips(logits, ref, tol=1e-4):
    """logits equal to ref within tol, but for 8-bit activation codes that round the other way. Two computations of
    the same model that differ in float32 rounding (ours (codes_x W_codes) / (s_x s_w) against transformers' online
    (codes_x / s_x)(W_codes / s_w); attention over 10 keys or over 32) can put a value within ~1e-6 of a rounding
    boundary (x * 127 / max|x| = k + 1/2) on either side. Such a flip moves one code by one step (1/127 of that
    token's largest activation), and that token's logits, and through its key and value the later ones, by about 1%
    of their size: over 40 seeds at 2 x 48 tokens, a flip showed in about one run in four, on under half of the
    positions, by under 1.3% of max|ref|. transformers' own packed model differs from its online one by exactly as
    much, and ours equals the packed one bit for bit (test_logits_match_hf_packed). A real difference (a wrong
    rotary, norm, scale, mask or head mapping) moves every position by as much as the logits themselves."""
    assert logits.shape == ref.shape
    assert ref.abs().max() > 1.0  # a meaningful comparison: logits of order 1
    per_position = (logits - ref).abs().amax(dim=-1)
    assert (per_position < tol).float().mean() >= 0.5, per_position
    assert per_position.max() < 0.03 * ref.abs().max()


def tiny(seed=0, bits=1.58, block=32, **kw):
    """A random bitnet.BitNet (vocabulary 300, 2 layers of 64) in eval mode with weights large enough that greedy
    decoding wanders."""
    torch.manual_seed(seed)
    cfg = bitnet.Config(vocab_size=300, block_size=block, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, weight_bits=bits,
                        **kw)
    return randomize(bitnet.BitNet(cfg), std=0.2)


def block_linears(model):
    return {name: m for name, m in model.named_modules() if name.endswith(LINEARS)}


# ------------------------------------------------------------------------------------ HF parity

@pytest.mark.parametrize("case", HF_CASES)
def test_logits_match_hf_online(case, tmp_path, eager_transformers):
    """Master weights (autobitlinear, online): every linear gives transformers' AutoBitLinear's output on the same
    input, and the whole model its logits."""
    hf = make_hf(seed=len(case), **HF_CASES[case])
    ref = load_hf(save_online(hf, tmp_path))
    model = bitnet.from_pretrained(tmp_path)
    assert not model.training
    cfg, hc = model.config, ref.config
    assert (cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.n_embd, cfg.head_dim, cfg.vocab_size, cfg.norm_eps,
            cfg.rope_theta) == (hc.num_hidden_layers, hc.num_attention_heads, hc.num_key_value_heads, hc.hidden_size,
                                hc.hidden_size // hc.num_attention_heads, hc.vocab_size, hc.rms_norm_eps,
                                hc.rope_parameters["rope_theta"])
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == (case == "tied")
    assert type(ref.lm_head) is torch.nn.Linear and type(model.lm_head) is torch.nn.Linear
    ours, theirs = block_linears(model), block_linears(ref)
    assert ours.keys() == theirs.keys() and len(ours) == 7 * hc.num_hidden_layers
    for name, m in ours.items():
        h = theirs[name]
        assert type(h) is AutoBitLinear and h.online_quant  # transformers really quantizes online
        assert type(m) is bitnet.BitLinear and m.bits == 1.58 and m.weight.requires_grad
        assert m.weight.dtype == torch.float32 and torch.equal(m.weight, h.weight)  # the master weights, as stored
        x = torch.randn(2, 5, m.in_features, generator=torch.Generator().manual_seed(len(name))) * 3
        with torch.no_grad():
            y, y_ref = m(x), h(x)
        assert max_diff(y, y_ref) < 1e-5 * y_ref.abs().max()
    idx = ids(cfg.vocab_size, 2, 48)
    assert_matches_up_to_code_flips(logits_of(model, idx), logits_of(ref, idx))
    assert counters["frames"]["total"] == eager_transformers  # nothing was compiled: transformers ran eagerly


@pytest.mark.parametrize("case", HF_CASES)
def test_logits_match_hf_packed(case, tmp_path):
    """Packed codes (bitlinear, offline), written by transformers' pack_weights: ours loads them packed and gives
    transformers' logits (the same float operations: no code can round differently), and the logits of the same
    master weights loaded online (pack(model) of them leaves the same bytes)."""
    hf = make_hf(seed=len(case), **HF_CASES[case])
    ref = load_hf(save_packed(hf, tmp_path / "packed"))
    model = bitnet.from_pretrained(tmp_path / "packed")
    stored = safetensors.torch.load_file(str(tmp_path / "packed" / "model.safetensors"))
    ours, theirs = block_linears(model), block_linears(ref)
    assert ours.keys() == theirs.keys() and not any(isinstance(m, bitnet.BitLinear) for m in model.modules())
    for name, m in ours.items():
        assert type(theirs[name]) is transformers.integrations.bitnet.BitLinear
        assert type(m) is bitnet.PackedBitLinear and m.weight.dtype == torch.uint8
        assert torch.equal(m.weight, stored[f"{name}.weight"])
        assert torch.equal(m.weight_scale, stored[f"{name}.weight_scale"])
    idx = ids(model.config.vocab_size, 2, 48)
    logits, ref_logits = logits_of(model, idx), logits_of(ref, idx)
    assert ref_logits.abs().max() > 1.0 and max_diff(logits, ref_logits) < 1e-5

    online = bitnet.from_pretrained(save_online(hf, tmp_path / "online"))
    assert torch.equal(logits_of(online, idx), logits)
    repacked = block_linears(bitnet.pack(online))
    for name, m in ours.items():
        assert torch.equal(repacked[name].weight, m.weight) and torch.equal(repacked[name].weight_scale, m.weight_scale)


@pytest.mark.parametrize("layout", ["online", "packed"])
def test_greedy_generation_matches_hf(layout, tmp_path):
    """transformers' generate (its own cache) and ours, with the cache and without: the same tokens."""
    save = save_online if layout == "online" else save_packed
    path = save(make_hf(seed=7, scale=20.0, num_key_value_heads=1), tmp_path)
    check_greedy_matches_hf(bitnet.from_pretrained(path), load_hf(path), 320, 16)


# ------------------------------------------------------------------------------------ packing

@pytest.mark.parametrize("out_features", [1, 2, 3, 5, 7, 10, 13, 64])
def test_pack_ternary_is_transformers_layout(out_features):
    """pack_ternary writes the bytes transformers' pack_weights writes (which pads the rows to a multiple of 4 as
    ours does, though its BitLinear only loads multiples of 4), and unpack_ternary inverts it; for multiples of 4
    transformers' unpack_weights reads ours back."""
    codes = torch.randint(-1, 2, (out_features, 24), generator=torch.Generator().manual_seed(out_features)).float()
    packed = bitnet.pack_ternary(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (-(-out_features // 4), 24)
    assert torch.equal(packed, pack_weights(codes.clone()))  # pack_weights adds 1 to its argument in place
    assert torch.equal(bitnet.unpack_ternary(packed, out_features), codes)
    if out_features % 4 == 0:
        assert torch.equal(unpack_weights(packed, torch.float32), codes)


@pytest.mark.parametrize("bits", [1.58, 1])
def test_pack_writes_transformers_bytes(bits):
    """pack(model): each block linear's bytes are pack_weights of the codes that quantize_weights gives its master
    weight (an out_features of 10 among them), its weight_scale that s_w; the model keeps no master weight."""
    model = tiny(seed=2, bits=bits, intermediate_size=10)
    before = {name: bitnet.quantize_weights(m.weight, bits) for name, m in block_linears(model).items()}
    packed = bitnet.pack(copy.deepcopy(model))
    for name, m in block_linears(packed).items():
        codes, s = before[name]
        assert type(m) is bitnet.PackedBitLinear
        assert torch.equal(m.weight, pack_weights(codes.detach().clone())) and torch.equal(m.weight_scale, s.reshape(1))
    assert block_linears(packed)["model.layers.0.mlp.up_proj"].weight.shape == (3, 64)
    left = [name for name, _ in packed.model.layers.named_parameters()]
    assert len(left) == 8 and all(name.endswith("norm.weight") for name in left)  # 4 norms a layer, nothing else


@pytest.mark.parametrize("bits", [1.58, 1])
def test_packed_equals_unpacked(bits):
    """The packed model's logits are the unpacked model's bit for bit, and so are its greedy tokens."""
    model = tiny(seed=3, bits=bits)
    packed = bitnet.pack(copy.deepcopy(model))
    idx = ids(300, 2, 32, seed=3)
    logits = logits_of(model, idx)
    assert torch.equal(logits_of(packed, idx), logits) and logits.abs().max() > 1.0
    prompt = idx[:, :6]
    assert torch.equal(packed.generate(prompt, 12, temperature=0.0), model.generate(prompt, 12, temperature=0.0))
    assert packed.num_params() == model.num_params()


def test_packed_size():
    """packed_size by hand: per layer q 64x64, k and v 32x64, o 64x64, gate and up 96x64, down 64x96; packed
    ceil(out / 4) * in bytes + a 4-byte scale each, fp16 2 bytes a weight; the rest (embedding and head padded to
    320 rows, norms) in fp16, a tied head once. At least 7x smaller than fp16, the target, and the bytes the
    packed buffers really hold; the same on the meta device (no weights)."""
    per_layer = [(64, 64), (32, 64), (32, 64), (64, 64), (96, 64), (96, 64), (64, 96)]  # (out, in)
    linears = 2 * sum(-(-o // 4) * i + 4 for o, i in per_layer)
    fp16 = 2 * sum(2 * o * i for o, i in per_layer)
    norms = 2 * (64 + 64 + 64 + 96) + 64
    assert (linears, fp16) == (15416, 122880)
    model = tiny(intermediate_size=96)
    assert bitnet.packed_size(model) == (linears, fp16, 2 * (2 * 320 * 64 + norms))
    assert fp16 / linears >= 7
    packed = bitnet.pack(model)
    assert bitnet.packed_size(packed) == (linears, fp16, 2 * (2 * 320 * 64 + norms))
    assert sum(m.weight.nbytes + m.weight_scale.nbytes for m in block_linears(packed).values()) == linears
    with torch.device("meta"):
        tied = bitnet.pack(bitnet.BitNet(bitnet.Config(vocab_size=300, block_size=32, n_layer=2, n_head=4, n_kv_head=2,
                                                       n_embd=64, intermediate_size=96, tie_embeddings=True)))
    assert bitnet.packed_size(tied) == (linears, fp16, 2 * (320 * 64 + norms))


# ------------------------------------------------------------------------------------ quantizers

def test_ternary_weight_codes():
    """b1.58: codes in {-1, 0, +1} (all three used), one scale s_w = 1 / mean|W| for the matrix, codes / s_w the
    weight transformers' WeightQuant uses: three values in all."""
    w = torch.randn(48, 40, generator=torch.Generator().manual_seed(0)) * 0.02 + 0.003
    codes, s = bitnet.quantize_weights(w, 1.58)
    assert set(codes.unique().tolist()) == {-1.0, 0.0, 1.0} and s.shape == ()
    assert s.item() == pytest.approx(1.0 / w.abs().mean().item(), rel=1e-6)
    assert torch.equal(codes, ternary(w)[0])
    effective = codes / s
    assert torch.equal(effective, WeightQuant.apply(w))
    assert effective.unique().tolist() == pytest.approx([-1.0 / s.item(), 0.0, 1.0 / s.item()], rel=1e-6)
    assert torch.equal(bitnet.quantize_weights(w * 8, 1.58)[0], codes)  # absmean: the codes ignore the scale


def test_binary_weight_codes():
    """1 bit: codes in {-1, +1} (both used, no 0), Sign(W - mean(W)) with Sign(0) = -1: a weight above the mean is
    +1, below it -1, whatever its sign; adding a constant to W moves the mean with it, the codes stay."""
    w = torch.randn(48, 40, generator=torch.Generator().manual_seed(1)) * 0.02 + 0.01  # mean well off 0
    codes, s = bitnet.quantize_weights(w, 1)
    assert set(codes.unique().tolist()) == {-1.0, 1.0} and s.shape == ()
    assert s.item() == pytest.approx(1.0 / w.abs().mean().item(), rel=1e-6)
    assert torch.equal(codes, torch.where(w > w.mean(), 1.0, -1.0))
    assert ((codes == -1) & (w > 0)).any()  # the threshold is the mean, not 0
    assert torch.equal(bitnet.quantize_weights(w - 0.05, 1)[0], codes)
    w2 = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])  # mean 0: the weights equal to it go to -1
    assert bitnet.quantize_weights(w2, 1)[0].tolist() == [[-1.0, 1.0], [-1.0, -1.0]]


def test_activation_codes():
    """8-bit absmax per token: integer codes in [-128, 127], one scale per token (..., 1), each token's largest
    |x| at +-127, codes / s_x within half a step of x; an all-zero token gives zeros, not NaN."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, 40, generator=g) * torch.logspace(-3, 3, 5).view(1, 5, 1)  # tokens of very different size
    x[1, 2] = 0.0
    codes, s = bitnet.quantize_activations(x)
    assert codes.shape == x.shape and s.shape == (3, 5, 1) and codes.dtype == s.dtype == torch.float32
    assert torch.equal(codes, codes.round()) and codes.min() >= -128 and codes.max() <= 127
    assert torch.isfinite(codes).all() and torch.isfinite(s).all() and not codes[1, 2].any()
    at_max = x.abs().argmax(dim=-1, keepdim=True)
    nonzero = torch.ones(3, 5, dtype=torch.bool)
    nonzero[1, 2] = False
    assert (codes.gather(-1, at_max).squeeze(-1).abs()[nonzero] == 127).all()
    assert torch.allclose(s.squeeze(-1)[nonzero], 127 / x.abs().amax(-1)[nonzero])
    assert ((codes / s - x).abs() <= 0.5 / s + 1e-6 * x.abs()).all()


def test_straight_through_gradients():
    """The forward sees only codes, the backward the identity through both quantizers (rounding and clamping):
    for y = BitLinear(x) and L = sum(y * g), dL/dW = g^T (codes_x / s_x) and dL/dx = g (codes_W / s_w), nonzero
    for the weights beyond 1.5 mean|W| that the ternary clamp cuts too; the same gradients as transformers'
    AutoBitLinear (online), which does as the authors' code does."""
    torch.manual_seed(4)
    layer = bitnet.BitLinear(40, 24)
    x = torch.randn(2, 7, 40, requires_grad=True)
    g = torch.randn(2, 7, 24)
    (layer(x) * g).sum().backward()
    x_codes, s_x = bitnet.quantize_activations(x.detach())
    w_codes, s_w = bitnet.quantize_weights(layer.weight.detach(), 1.58)
    x_deq, w_deq = x_codes / s_x, w_codes / s_w
    assert torch.allclose(layer(x), torch.einsum("bti,oi->bto", x_deq, w_deq), atol=1e-5)  # the forward
    grad_w, grad_x = torch.einsum("bto,bti->oi", g, x_deq), g @ w_deq
    assert torch.isfinite(layer.weight.grad).all() and torch.allclose(layer.weight.grad, grad_w, atol=1e-5)
    assert torch.allclose(x.grad, grad_x, atol=1e-5)
    clamped = (layer.weight * s_w).abs() > 1.5
    assert clamped.sum() > 50 and (layer.weight.grad[clamped] != 0).all()

    ref = AutoBitLinear(40, 24, bias=False, online_quant=True)
    with torch.no_grad():
        ref.weight.copy_(layer.weight)
    x_ref = x.detach().clone().requires_grad_()
    (ref(x_ref) * g).sum().backward()
    assert torch.allclose(layer.weight.grad, ref.weight.grad, atol=1e-5)
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-5)


class AtenOps(TorchDispatchMode):
    """The names of the aten operators run while active (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def function_quantizers(monkeypatch):
    """bitnet's quantizers replaced by the ones before issue 30 (benchmarks/bench_bitnet.py keeps them for its
    before/after timing): the same codes and scales, through one autograd Function, STE."""
    monkeypatch.setattr(bitnet, "quantize_activations", bench_bitnet.old_quantize_activations)
    monkeypatch.setattr(bitnet, "quantize_weights", bench_bitnet.old_quantize_weights)


@pytest.mark.parametrize("bits", [1.58, 1])
def test_straight_through_estimator_is_the_function_it_replaced(bits):
    """x + (q - x).detach(), as the b1.58 note writes it, gives the custom autograd.Function's numbers bit for bit:
    a train step's loss and every gradient (weights offset from 0, so that the binary codes' threshold, the mean,
    lies away from 0), and max|x| is taken as abs().amax() (linalg.vector_norm(x, inf) is slower on a CPU)."""
    model = tiny(seed=6, bits=bits).train()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    idx = ids(300, 2, 24, seed=6)

    def step():
        model.zero_grad(set_to_none=True)
        loss = model(idx[:, :-1], idx[:, 1:])[1]
        loss.backward()
        return loss, [p.grad.clone() for p in model.parameters()]

    loss, grads = step()
    with pytest.MonkeyPatch.context() as m:
        function_quantizers(m)
        ref_loss, ref_grads = step()
    assert loss.item() == ref_loss.item() and all(torch.equal(a, b) for a, b in zip(grads, ref_grads))
    layer = bitnet.BitLinear(40, 24, bits)
    x = torch.randn(2, 7, 40, requires_grad=True)
    with AtenOps() as seen:
        layer(x).sum().backward()
    assert "amax" in seen.ops and "linalg_vector_norm" not in seen.ops


@pytest.mark.parametrize("bits", [1.58, 1])
def test_straight_through_forward_is_the_codes_exactly(bits):
    """z + (q - z) in float32 is q itself, not q within a rounding: weights far beyond the clamp, weights between 0
    and a mean well off 0 (where the binary codes' sign differs from the weight's), tiny and huge tokens; and the
    gradient is the identity's times the scale: d(sum(codes * g))/dw = g * s_w, d(sum(codes * g))/dx = g * s_x."""
    g = torch.Generator().manual_seed(7)
    typical = torch.randn(64, 48, generator=g) * 0.02 + 0.01
    wide = torch.randn(64, 48, generator=g) * torch.logspace(-4, 2, 48)  # columns of very different size
    for w in (typical.requires_grad_(), wide.requires_grad_()):
        codes, s_w = bitnet.quantize_weights(w, bits)
        expected = torch.where(w > w.mean(), 1.0, -1.0) if bits == 1 else (w * s_w).round().clamp(-1, 1)
        assert torch.equal(codes, expected.detach())
        upstream = torch.randn(64, 48, generator=g)
        (codes * upstream).sum().backward()
        assert torch.equal(w.grad, upstream * s_w)
    assert ((typical > 0) & (typical < typical.mean())).sum() > 100  # the binary codes' -1 for positive weights
    assert ((wide * bitnet.quantize_weights(wide, 1.58)[1]).abs() > 4).sum() > 100  # clamped far from +-1
    x = (torch.randn(3, 5, 40, generator=g) * torch.logspace(-8, 8, 5).view(1, 5, 1)).requires_grad_()
    x_codes, s_x = bitnet.quantize_activations(x)
    assert torch.equal(x_codes, (x * s_x).round().clamp(-128, 127).detach())
    upstream = torch.randn(3, 5, 40, generator=g)
    (x_codes * upstream).sum().backward()
    assert torch.equal(x.grad, upstream * s_x)


def test_packed_codes_are_unpacked_once():
    """A PackedBitLinear holds its codes as int8 (out, in), unpacked from its bytes when they are packed or loaded
    (load_state_dict refreshes them), not at every call, and not saved: the state keeps the 2-bit bytes, a quarter
    of the codes' size."""
    model = tiny(seed=8, intermediate_size=96)
    packed = bitnet.pack(copy.deepcopy(model))
    for m in block_linears(packed).values():
        assert m.codes.dtype == torch.int8 and m.codes.shape == (m.out_features, m.in_features)
        assert torch.equal(m.codes, bitnet.unpack_ternary(m.weight, m.out_features))
        assert m.codes.nbytes == 4 * m.weight.nbytes
    assert not any(k.endswith("codes") for k in packed.state_dict())
    idx = ids(300, 2, 16, seed=8)
    expected = logits_of(packed, idx)
    other = bitnet.pack(tiny(seed=9, intermediate_size=96))
    packed.load_state_dict(other.state_dict())
    for m, o in zip(block_linears(packed).values(), block_linears(other).values()):
        assert torch.equal(m.codes, o.codes)
    packed.load_state_dict(bitnet.pack(copy.deepcopy(model)).state_dict())

    def no_unpacking(*args):
        raise AssertionError("unpacked at a call")
    with pytest.MonkeyPatch.context() as m:
        m.setattr(bitnet, "unpack_ternary", no_unpacking)
        assert torch.equal(logits_of(packed, idx), expected)


@pytest.mark.parametrize("shape", [(1, 64, 96), (5, 33, 7), (2, 9, 4096, 24), (3, 131072, 4)])  # (tokens..., in, out)
def test_int_matmul_is_exact(shape):
    """int_matmul (torch._int_mm on a CPU) gives F.linear's float32 numbers bit for bit, at any shape: one token,
    odd sizes, leading batch dimensions, and sums as large as 127 * in_features with in_features up to 131072, float32's
    last exact integers (the extreme codes +-127 and +-1 in every place where the random ones are not)."""
    *lead, n_in, n_out = shape
    g = torch.Generator().manual_seed(n_in)
    x_q = torch.randint(-128, 128, (*lead, n_in), generator=g).float()
    codes = torch.randint(-1, 2, (n_out, n_in), generator=g, dtype=torch.int8)
    x_q[..., 0, :] = 127.0
    codes[0] = 1
    calls = []
    with pytest.MonkeyPatch.context() as m:
        m.setattr(torch, "_int_mm", lambda a, b: calls.append(a.shape) or torch.ops.aten._int_mm(a, b))
        y = bitnet.int_matmul(x_q, codes)
    assert calls and y.dtype == torch.float32 and y.shape == (*lead, n_out)
    assert torch.equal(y, torch.nn.functional.linear(x_q, codes.float()))
    assert y[..., 0, 0].eq(127 * n_in).all()


# ------------------------------------------------------------------------------------- cache, causality

@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("prompt_len, new_tokens", [(5, 8), (6, 16)])  # the second slides past block_size 16
def test_cached_generation_equals_uncached(packed, prompt_len, new_tokens):
    model = tiny(seed=1, block=16)
    check_cached_equals_uncached(bitnet.pack(model) if packed else model, 300, prompt_len, new_tokens)


@pytest.mark.parametrize("packed", [False, True])
def test_cached_forward_matches_full_forward(packed):
    """Chunks and single tokens after the cache (a chunk's causal mask shifted by its position) give the logits of
    one forward over the whole text."""
    model = tiny(seed=3)
    model = bitnet.pack(model) if packed else model
    idx = ids(300, 2, 32, seed=4)
    cache = [bitnet.KVCache(32) for _ in model.model.layers]
    with torch.no_grad():
        parts = [model(idx[:, a:b], cache=cache, pos=a)[0] for a, b in [(0, 10), (10, 11), (11, 12), (12, 17),
                                                                        (17, 18), (18, 32)]]
        with pytest.raises(ValueError):
            model(idx[:, :1], cache=cache, pos=32)  # past block_size
    assert_matches_up_to_code_flips(torch.cat(parts, dim=1), logits_of(model, idx))


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("t", [1, 13, 31])
def test_causality(packed, t):
    model = tiny(seed=5)
    check_causal(bitnet.pack(model) if packed else model, 300, t)


# ------------------------------------------------------------------------------------- training

@pytest.mark.parametrize("bits", [1.58, 1])
def test_overfit_one_batch(bits):
    """AdamW on one batch of random tokens: from chance, ln(vocab), below a tenth of it in 30 steps, at the high
    learning rate BitNet wants (check_overfits' 3e-3 takes about 100 steps). Weight codes change on the way; the
    packed trained model gives the trained model's loss."""
    torch.manual_seed(0)
    model = bitnet.BitNet(bitnet.Config(vocab_size=100, block_size=32, n_layer=1, n_head=4, n_kv_head=2, n_embd=64,
                                        weight_bits=bits))
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not model.lm_head]
    assert len(linears) == 7 and all(type(m) is bitnet.BitLinear and m.bits == bits for m in linears)
    codes_before = bitnet.quantize_weights(model.model.layers[0].mlp.up_proj.weight, bits)[0]
    x = ids(100, 4, 17, seed=0)
    x, y = x[:, :-1], x[:, 1:]
    opt = torch.optim.AdamW(model.train().parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert abs(losses[0] - math.log(100)) < 0.1
    assert losses[-1] < 0.1 * losses[0]
    codes_after = bitnet.quantize_weights(model.model.layers[0].mlp.up_proj.weight, bits)[0]
    assert (codes_after != codes_before).float().mean() > 0.01
    model.eval()
    with torch.no_grad():
        assert model(x, y)[1].item() == bitnet.pack(copy.deepcopy(model))(x, y)[1].item()


def test_config_and_padded_vocabulary():
    """Defaults and refusals; the vocabulary padded to a multiple of 64, the padding rows getting no probability and
    no gradient."""
    assert bitnet.Config(n_embd=384, n_head=6, n_kv_head=2).intermediate_size == 1024
    for bad in (dict(weight_bits=2), dict(weight_bits=1.5), dict(n_head=4, n_kv_head=3), dict(dropout=1.0)):
        with pytest.raises(bitnet.InputError):
            bitnet.Config(**{**dict(n_embd=64, n_head=4, n_kv_head=4), **bad})
    torch.manual_seed(0)
    model = bitnet.BitNet(bitnet.Config(vocab_size=1000, block_size=16, n_layer=1, n_head=4, n_kv_head=4, n_embd=64))
    assert model.model.embed_tokens.weight.shape == model.lm_head.weight.shape == (1024, 64)
    logits, loss = model(ids(1000, 2, 16), ids(1000, 2, 16, seed=2))
    assert logits.shape == (2, 16, 1000) and loss.item() == pytest.approx(math.log(1000), abs=0.1)
    loss.backward()
    assert not model.lm_head.weight.grad[1000:].any() and model.lm_head.weight.grad[:1000].abs().sum() > 0


def groups_of(model):
    """name -> "muon", "decay" or "no_decay" as configure_optimizer (--optimizer muon) files each parameter."""
    names = {id(p): name for name, p in model.named_parameters()}
    args = SimpleNamespace(optimizer="muon", lr=1e-3, weight_decay=0.1)
    out = {}
    for opt in bitnet.configure_optimizer(model, args, torch.device("cpu")):
        for group in opt.param_groups:
            kind = "muon" if isinstance(opt, torch.optim.Muon) else "decay" if group["decay"] else "no_decay"
            out.update({names[id(p)]: kind for p in group["params"]})
    return out


@pytest.mark.parametrize("tied", [False, True])
def test_optimizer_groups(tied, tmp_path):
    """optimizer_groups names every parameter's group by its name: the block linears' master weights "muon", the
    embedding and the head (one parameter when tied) "decay", the norms' gains "no_decay"; the groups
    configure_optimizer gives with --optimizer muon. The same after load_state_dict(assign=True) into a model built
    on the meta device, and after from_pretrained in both layouts (the packed model has no linear parameters)."""
    model = tiny(tie_embeddings=tied)
    groups = model.optimizer_groups()
    assert list(groups) == [name for name, _ in model.named_parameters()]
    for name, kind in groups.items():
        linear = name.endswith("_proj.weight") and name.startswith("model.layers.")
        assert kind == ("muon" if linear else "no_decay" if name.endswith("norm.weight") else "decay"), name
    counts = {kind: list(groups.values()).count(kind) for kind in ("muon", "decay", "no_decay")}
    assert counts == {"muon": 14, "decay": 1 if tied else 2, "no_decay": 9}
    assert groups_of(model) == groups
    with torch.device("meta"):
        empty = bitnet.BitNet(model.config)
    empty.load_state_dict(model.state_dict(), assign=True)
    if tied:  # assign=True puts a parameter in each place, untying them; "decay" both
        assert empty.optimizer_groups() == {**groups, "lm_head.weight": "decay"}
        empty.lm_head.weight = empty.model.embed_tokens.weight  # tied again, as from_pretrained does
    assert empty.optimizer_groups() == groups and groups_of(empty) == groups
    hf = make_hf(seed=2, tie_word_embeddings=tied)
    online = bitnet.from_pretrained(save_online(hf, tmp_path / "online"))
    assert online.optimizer_groups() == groups and groups_of(online) == groups
    packed = bitnet.from_pretrained(save_packed(hf, tmp_path / "packed"))
    expected = {name: kind for name, kind in groups.items() if kind != "muon"}
    assert packed.optimizer_groups() == expected and groups_of(packed) == expected


def schedule_args(**kw):
    return SimpleNamespace(**{**dict(lr=1e-3, min_lr=1e-4, warmup_iters=10, lr_decay_iters=None, max_iters=100,
                                     weight_decay=0.1, two_stage=True), **kw})


@pytest.mark.parametrize("lr_decay_iters, mid", [(None, 50), (80, 40), (12, 10)])  # the midpoint never in warmup
def test_two_stage_schedule(lr_decay_iters, mid):
    """The one-stage curve up to the midpoint; there half of it; then a second cosine, monotone, to min_lr at the
    end of the decay. Weight decay a cosine from its peak (0.1) at step 0 down to 0 at the midpoint (2B4T, section
    3), 0 from it; constant without --two_stage."""
    two, one = schedule_args(lr_decay_iters=lr_decay_iters), schedule_args(lr_decay_iters=lr_decay_iters, two_stage=False)
    end = lr_decay_iters or 100
    assert bitnet.stage_two_from(two) == mid and bitnet.stage_two_from(one) is None
    for it in range(mid):
        assert bitnet.schedule(it, two)[0] == bitnet.schedule(it, one)[0]
        assert bitnet.schedule(it, two)[1] == pytest.approx(0.05 * (1 + math.cos(math.pi * it / mid)), rel=1e-12)
    decay = [bitnet.schedule(it, two)[1] for it in range(mid + 1)]
    assert decay[0] == 0.1 and all(a > b for a, b in zip(decay, decay[1:])) and decay[-1] == 0.0
    assert bitnet.schedule(mid, two)[0] == pytest.approx(0.5 * bitnet.schedule(mid, one)[0], rel=1e-12)
    second = [bitnet.schedule(it, two)[0] for it in range(mid, end + 1)]
    assert all(a > b for a, b in zip(second, second[1:])) and second[-1] == 1e-4
    assert bitnet.schedule(end + 5, two)[0] == 1e-4 and second[-2] > 1e-4
    if end - mid >= 2 and (end - mid) % 2 == 0:  # the second cosine's midpoint: half-way from its peak to min_lr
        assert second[(end - mid) // 2] == pytest.approx((second[0] + 1e-4) / 2, rel=1e-9)
    assert all(bitnet.schedule(it, two)[1] == 0.0 for it in range(mid, end + 10))
    assert all(bitnet.schedule(it, one)[1] == 0.1 for it in range(0, end + 10))


# ------------------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("change, match", [
    (dict(), "no BitNet quantization_config"),
    (dict(quantization_config=dict(ONLINE, quantization_mode="offline")), "not a layout this file reads"),
    (dict(quantization_config=dict(ONLINE, use_rms_norm=True)), "not a layout this file reads"),
    (dict(quantization_config=dict(ONLINE, modules_to_not_convert=["lm_head", "model.layers.0.mlp.up_proj"])),
     "not a layout this file reads"),
    (dict(quantization_config=ONLINE, hidden_act="silu"), "hidden_act"),
    (dict(quantization_config=ONLINE, attention_bias=True), "attention_bias"),
    (dict(quantization_config=ONLINE, rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=500000.0)),
     "rope scaling"),
    (dict(quantization_config=ONLINE, model_type="llama"), "not BitNet"),
])
def test_variants_are_refused(tmp_path, change, match):
    """Each with an InputError naming the cause (the command line prints it as one line); the online config alone
    loads."""
    hf = make_hf(seed=0, num_hidden_layers=1)
    bitnet.from_pretrained(save_online(hf, tmp_path))
    hf.save_pretrained(tmp_path)
    set_config(tmp_path, **change)
    with pytest.raises(bitnet.InputError, match=match):
        bitnet.from_pretrained(tmp_path)


def rewrite_weights(path, change):
    """Apply change to the {name: tensor} of path's model.safetensors."""
    weights = safetensors.torch.load_file(str(path / "model.safetensors"))
    safetensors.torch.save_file(change(weights), str(path / "model.safetensors"))


def test_layout_and_weights_disagree(tmp_path):
    """Refused, naming the tensor, its dtype and shape and what config.json implies: packed codes stored as floats
    (the packed shape), master weights stored as uint8 (their own shape), master weights under the packed config,
    packed codes under the online one."""
    hf = make_hf(seed=0, num_hidden_layers=1)
    name = "model.layers.0.mlp.up_proj.weight"  # 96 x 64, packed 24 x 64
    for path, dtype, implied, shape in ((save_packed(hf, tmp_path / "a"), torch.float32, "uint8", (24, 64)),
                                        (save_online(hf, tmp_path / "b"), torch.uint8, "float32", (96, 64))):
        rewrite_weights(path, lambda weights: {**weights, name: weights[name].to(dtype)})
        message = f"'{name}' is {str(dtype).removeprefix('torch.')} {shape}, config.json implies {implied} {shape}"
        with pytest.raises(bitnet.InputError, match=re.escape(message)):
            bitnet.from_pretrained(path)
    set_config(save_online(hf, tmp_path / "c"), quantization_config=OFFLINE)
    with pytest.raises(bitnet.InputError, match=r"'model.layers.0.\w+.\w+_proj.weight' is float32 .*implies uint8"):
        bitnet.from_pretrained(tmp_path / "c")
    set_config(save_packed(hf, tmp_path / "d"), quantization_config=ONLINE)
    with pytest.raises(bitnet.InputError, match="unexpected tensor .*weight_scale"):
        bitnet.from_pretrained(tmp_path / "d")


# ------------------------------------------------------------------------------------- command line

@pytest.fixture
def checkpoints(tmp_path, monkeypatch, offline):
    """The same model packed and as master weights, each with a tokenizer.json of 600 tokens; the script's data/
    and out/ under tmp_path."""
    script_home(bitnet, tmp_path, monkeypatch)
    hf = make_hf(seed=9, vocab_size=600, bos_token_id=0)
    packed, online = save_packed(hf, tmp_path / "packed"), save_online(hf, tmp_path / "online")
    train_tokenizer(packed / "tokenizer.json")
    shutil.copy(packed / "tokenizer.json", online)
    return packed, online


def test_cli_packed_checkpoint(checkpoints, capsys):
    """Packed weights sample (the "packed:" line giving packed_size's numbers), in the same tokens as the master
    weights do; training them is refused with one line; without a tokenizer the sample is token ids."""
    packed, online = checkpoints
    sample = ["--device", "cpu", "--sample_only", "--prompt", "ROMEO:", "--max_new_tokens", "6", "--temperature", "0"]
    linears, fp16, _ = bitnet.packed_size(bitnet.from_pretrained(packed))
    texts = []
    for path in (packed, online):
        bitnet.main(["--init_from", str(path), *sample])
        out = capsys.readouterr().out
        texts.append(out.split(f"--- sample from {path} ---\n")[1].split("\n---")[0])
        assert f"tokenizer {path / 'tokenizer.json'}" in out.splitlines()[0]
        assert f"packed: block linears {linears / 1e6:,.3f} MB at 2 bits per weight vs {fp16 / 1e6:,.3f} MB" in out
    assert texts[0] == texts[1] and texts[0].startswith("ROMEO:") and len(texts[0]) > len("ROMEO:")
    assert "<|begin_of_text|>" not in texts[0]

    with pytest.raises(SystemExit) as e:
        bitnet.main(["--init_from", str(packed), "--device", "cpu", "--max_iters", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "packed weights" in err and "no master weights" in err

    (packed / "tokenizer.json").unlink()
    bitnet.main(["--init_from", str(packed), "--device", "cpu", "--sample_only", "--max_new_tokens", "5"])
    out = capsys.readouterr().out
    assert "shown as token ids" in out and "tokenizer none (token ids)" in out.splitlines()[0]
    tokens = json.loads(out.split("---\n")[1].split("\n---")[0])
    assert tokens[0] == 0 and len(tokens) == 6  # bos, then 5 ids


def test_one_bit_export_is_refused_at_the_start(tmp_path, monkeypatch, offline, capsys):
    """--weight_bits 1 --export DIR: transformers' BitNet has no 1-bit layout; refused before any training."""
    script_home(bitnet, tmp_path, monkeypatch)
    with pytest.raises(SystemExit) as e:
        bitnet.main(["--device", "cpu", "--n_layer", "1", "--n_head", "2", "--n_kv_head", "2", "--n_embd", "32",
                     "--block_size", "16", "--max_iters", "2", "--weight_bits", "1", "--export", str(tmp_path / "x")])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and "1-bit model has no layout" in err and "iter" not in out and "---" not in out
