"""lora.py at the model level: the GPT-2 base against transformers; LoRA (Hu et al. 2021) adapters that start at the
base model exactly, train alone, merge, save and load, and move to and from a `peft` LoRA model unchanged; QLoRA's
(Dettmers et al. 2023) NF4 table, its quantization error, packing and double-quantized scales, its training step
and backward; causality and the KV cache through the adapters; and the command line, in-process."""
import dataclasses
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
from torch.utils._python_dispatch import TorchDispatchMode

import lora
from conftest import (needs_gpt2_bpe, check_cached_equals_uncached, check_causal, hf_logits, ids,
                      max_diff, randomize, script_home)
from test_gpt2 import make_hf

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
pytestmark = pytest.mark.usefixtures("one_thread")

TARGETS = ("c_attn", "c_proj", "c_fc")  # add_lora's default: the four linear layers of every block
# adapter numbers per block, in units of r * n_embd: r (in + out) for c_attn (C -> 3C), attn.c_proj (C -> C) and
# mlp.c_proj (4C -> C) (both named c_proj), c_fc (C -> 4C)
PER_BLOCK = {"c_attn": 4, "c_proj": 2 + 5, "c_fc": 5}
# QLoRA's NF4 values as bitsandbytes ships them (functional.py, get_4bit_type("nf4")), index = code
NF4_VALUES = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023,
              1.0]
HALF_MAX_GAP = 0.1519036  # half of the widest gap (between -1 and -0.696): the worst rounding, relative to absmax


def tiny(seed=0, vocab=300, n_layer=2, n_head=4, n_embd=32, block=32):
    """A random lora.GPT in eval mode: weights and biases std 0.2 (greedy decoding wanders), LayerNorms as at init."""
    torch.manual_seed(seed)
    model = randomize(lora.GPT(lora.Config(vocab_size=vocab, block_size=block, n_layer=n_layer, n_head=n_head,
                                           n_embd=n_embd)))
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            m.reset_parameters()
    return model


def tune(model, seed=0, std=0.2):
    """Give every adapter random A and B, as training would (B = 0 would make the adapters invisible)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def logits(model, idx):
    with torch.no_grad():
        return model(idx)[0]


def lora_names(model):
    return {n for n, _ in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random GPT2LMHeadModel (biases and LayerNorms random too, logits of order 1) saved with save_pretrained."""
    d = tmp_path_factory.mktemp("hf")
    make_hf(2, 4, 32, 300, 32, seed=3, scale=4.0).save_pretrained(d)
    return d


def fresh_hf(d):
    """The saved HF model, loaded anew: get_peft_model changes the model it is given in place."""
    return transformers.GPT2LMHeadModel.from_pretrained(d).eval()


# ------------------------------------------------------------------------------------ the base, fresh adapters

def test_base_matches_hf(hf_dir):
    hf = fresh_hf(hf_dir)
    idx = ids(300, 2, 32)
    ref = hf_logits(hf, idx)
    assert ref.abs().max() > 1.0
    assert max_diff(logits(lora.from_pretrained(hf_dir), idx), ref) < 1e-4


@pytest.mark.parametrize("targets", [TARGETS, ("c_attn",)])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fresh_adapters_change_nothing(hf_dir, targets, dropout):
    """B starts at zero: the wrapped model's logits are the base's bit for bit, in eval mode and in train mode
    (adapter dropout, if any, acts on the adapters' input only); A is not zero (it would never train)."""
    model = lora.from_pretrained(hf_dir)
    idx = ids(300, 2, 32)
    base_eval, base_train = logits(model, idx), logits(model.train(), idx)
    lora.add_lora(model, targets=targets, dropout=dropout)
    wrapped = [m for m in model.modules() if isinstance(m, lora.LoRALinear)]
    assert len(wrapped) == 2 * (4 if targets == TARGETS else 1)
    assert all(not m.lora_B.weight.any() and m.lora_A.weight.abs().min() > 0 for m in wrapped)
    assert torch.equal(logits(model.train(), idx), base_train)
    assert torch.equal(logits(model.eval(), idx), base_eval)


def test_lora_linear_is_the_papers_update():
    """h = W0 x + (alpha / r) B dropout(x) A^T ... written out, with the dropout mask replayed from the same seed;
    A (r, in) starts as nn.Linear's Kaiming-uniform, within +-1/sqrt(in), and B (out, r) at zero."""
    torch.manual_seed(0)
    base = nn.Linear(256, 24)
    layer = lora.LoRALinear(base, rank=4, alpha=12, dropout=0.5)
    A, B = layer.lora_A.weight, layer.lora_B.weight
    assert A.shape == (4, 256) and B.shape == (24, 4) and layer.base is base
    assert not B.any() and A.abs().max() <= 256 ** -0.5 and A.abs().max() > 0.95 * 256 ** -0.5
    tune(layer)
    assert B.abs().min() > 0
    x = torch.randn(3, 5, 256)
    with torch.no_grad():
        torch.manual_seed(1)
        y = layer.train()(x)
        torch.manual_seed(1)
        ref = base(x) + F.dropout(x, 0.5, training=True) @ A.t() @ B.t() * 3.0
        assert max_diff(y, ref) < 1e-5
        assert max_diff(layer.eval()(x), base(x) + x @ A.t() @ B.t() * 3.0) < 1e-5


# ------------------------------------------------------------------------------------ what trains

def old_rule(model):
    """The groups configure_optimizer used to infer, frozen parameters included: decay a matrix, Muon a
    decayed matrix but the embeddings and head."""
    tables = {id(model.transformer.wte.weight), id(model.transformer.wpe.weight), id(model.lm_head.weight)}
    return {name: "muon" if p.dim() == 2 and id(p) not in tables else "decay" if p.dim() >= 2 else "no_decay"
            for name, p in model.named_parameters()}


@pytest.mark.parametrize("qlora", [False, True])
def test_optimizer_groups_by_name(hf_dir, qlora):
    """GPT.optimizer_groups (gpt2.py's text) names every parameter of an adapted model, frozen or not, NF4
    base or not, with the old rule's group: the adapters "muon", the frozen biases "no_decay"; after
    from_pretrained (load_state_dict(assign=True)) too."""
    for model in (tiny(), lora.from_pretrained(hf_dir)):
        if qlora:
            lora.quantize_nf4(model)
        lora.add_lora(model)
        groups = model.optimizer_groups()
        assert groups == old_rule(model)
        assert groups["transformer.h.0.attn.c_attn.lora_A.weight"] == "muon"
        assert groups["transformer.h.1.mlp.c_fc.base.bias"] == "no_decay"
        assert {g for name, g in groups.items() if ".lora_" in name} == {"muon"}


@pytest.mark.parametrize("targets", [TARGETS, ("c_attn",), ("c_fc", "c_proj")])
def test_only_adapters_train(targets):
    """After add_lora only lora_A/lora_B require gradients and get them in a backward; their count is r (in + out)
    summed over the wrapped layers."""
    r, n_layer, C = 4, 2, 32
    model = lora.add_lora(tiny(n_layer=n_layer, n_embd=C), rank=r, targets=targets).train()
    names = {n for n, _ in model.named_parameters()}
    adapters = lora_names(model)
    assert len(adapters) == 2 * n_layer * sum(2 if t == "c_proj" else 1 for t in targets)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == adapters
    x = ids(300, 2, 16)
    model(x, ids(300, 2, 16, seed=2))[1].backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == adapters
    assert names - adapters and all(p.grad is None for n, p in model.named_parameters() if n not in adapters)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == n_layer * r * C * sum(PER_BLOCK[t] for t in targets)


def test_gpt2_small_adapter_count():
    """GPT-2 124M at r = 8 on all four linear layers: 1,179,648 adapter numbers, as peft counts (on meta: shapes
    only)."""
    with torch.device("meta"):
        model = lora.add_lora(lora.GPT(lora.Config()))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 1_179_648 == 12 * 8 * 768 * 16


# ------------------------------------------------------------------------------------ merge, save, load

def test_merge_equals_unmerged():
    """merge_lora folds (alpha / r) B A into W0: the same logits, and the model is a plain GPT again (its
    state_dict keys a fresh GPT's, no LoRALinear left, the head still tied)."""
    model = tune(lora.add_lora(tiny(seed=1), rank=4, alpha=12))
    idx = ids(300, 2, 32)
    before = logits(model, idx)
    assert max_diff(before, logits(tiny(seed=1), idx)) > 1e-1  # the adapters matter
    lora.merge_lora(model)
    assert max_diff(logits(model, idx), before) < 1e-4  # logits up to 5: they do 6e-6
    assert not any(isinstance(m, lora.LoRALinear) for m in model.modules())
    assert type(model.transformer.h[0].attn.c_attn) is nn.Linear
    assert list(model.state_dict()) == list(lora.GPT(model.config).state_dict())
    assert model.lm_head.weight is model.transformer.wte.weight


def test_merge_on_an_nf4_base():
    """QLoRA: the NF4 base is dequantized, then merged; the logits are the unmerged model's to rounding, and every
    linear layer is a float nn.Linear again."""
    model = tune(lora.add_lora(lora.quantize_nf4(tiny(seed=2))))
    idx = ids(300, 2, 32)
    before = logits(model, idx)
    lora.merge_lora(model)
    assert max_diff(logits(model, idx), before) < 1e-4  # they do 9e-6
    assert not any(isinstance(m, (lora.LoRALinear, lora.NF4Linear)) for m in model.modules())
    assert list(model.state_dict()) == list(lora.GPT(model.config).state_dict())


def test_adapter_file_round_trip(tmp_path):
    """torch.save(lora_state_dict(m)) holds the adapters alone; load_lora onto the same base, freshly wrapped,
    gives the tuned logits exactly."""
    model = tune(lora.add_lora(tiny(seed=4)), seed=1)
    torch.save(lora.lora_state_dict(model), tmp_path / "adapters.pt")
    saved = torch.load(tmp_path / "adapters.pt", weights_only=True)
    assert set(saved) == lora_names(model) and len(saved) == 2 * 2 * 4
    idx = ids(300, 2, 32)
    other = lora.add_lora(tiny(seed=4))
    assert max_diff(logits(other, idx), logits(model, idx)) > 1e-1
    lora.load_lora(other, saved)
    assert torch.equal(logits(other, idx), logits(model, idx))


KEY = "transformer.h.0.mlp.c_fc.lora_A.weight"


@pytest.mark.parametrize("wrap, change", [
    (dict(targets=("c_attn",)), None),                                       # adapters for layers not wrapped
    (dict(), lambda a: {k: v for k, v in a.items() if k != KEY}),            # one missing
    (dict(), lambda a: {**a, KEY.replace("h.0", "h.2"): a[KEY]}),            # one for a layer the model lacks
    (dict(rank=4), None),                                                    # rank 8 adapters, rank 4 layers
], ids=["targets", "missing", "extra", "rank"])
def test_load_lora_refuses_adapters_that_do_not_fit(wrap, change):
    saved = lora.lora_state_dict(lora.add_lora(tiny(seed=4)))
    with pytest.raises(lora.InputError):
        lora.load_lora(lora.add_lora(tiny(seed=4), **wrap), change(saved) if change else saved)


# ------------------------------------------------------------------------------------ peft

PEFT_CASES = [(TARGETS, 8, 16), (("c_attn",), 4, 12), (("c_fc", "c_proj"), 2, 2)]  # (targets, r, alpha)


def peft_model(peft, hf_dir, targets, r, alpha):
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0,
                             fan_in_fan_out=True)  # GPT-2's Conv1D stores (in, out)
    return peft.get_peft_model(fresh_hf(hf_dir), config).eval()


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers 5 on a name peft still calls
@pytest.mark.parametrize("targets, r, alpha", PEFT_CASES)
def test_adapters_give_pefts_logits(hf_dir, targets, r, alpha):
    """Our adapters, keys prefixed with "base_model.model.", set into a peft LoRA model on the same base: the same
    layers wrapped (peft counts the same trainable numbers) and the same logits."""
    peft = pytest.importorskip("peft")
    ours = tune(lora.add_lora(lora.from_pretrained(hf_dir), r, alpha, targets), std=0.1)
    theirs = peft_model(peft, hf_dir, targets, r, alpha)
    assert theirs.get_nb_trainable_parameters()[0] == sum(p.numel() for p in ours.parameters() if p.requires_grad)
    result = peft.set_peft_model_state_dict(theirs, {"base_model.model." + k: v
                                                     for k, v in lora.lora_state_dict(ours).items()})
    assert not result.unexpected_keys
    idx = ids(300, 2, 32)
    ref = hf_logits(theirs, idx)
    assert max_diff(ref, hf_logits(fresh_hf(hf_dir), idx)) > 1e-1  # the adapters matter
    assert max_diff(logits(ours, idx), ref) < 1e-5


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("targets, r, alpha", PEFT_CASES[:2])
def test_peft_adapter_file_loads(hf_dir, tmp_path, targets, r, alpha):
    """A peft adapter saved with save_pretrained (adapter_model.safetensors), read with lora.read_safetensors and
    its prefix dropped, loads with load_lora and gives peft's logits."""
    peft = pytest.importorskip("peft")
    theirs = peft_model(peft, hf_dir, targets, r, alpha)
    tune(theirs, seed=5, std=0.1)
    theirs.save_pretrained(tmp_path)
    adapters = {k.removeprefix("base_model.model."): v
                for k, v in lora.read_safetensors(tmp_path / "adapter_model.safetensors").items()}
    ours = lora.load_lora(lora.add_lora(lora.from_pretrained(hf_dir), r, alpha, targets), adapters)
    idx = ids(300, 2, 32)
    assert max_diff(logits(ours, idx), hf_logits(theirs, idx)) < 1e-5


# ------------------------------------------------------------------------------------ NF4

def test_nf4_table():
    """bitsandbytes' 16 values exactly; rebuilt from normal quantiles as bitsandbytes does (create_normal_map:
    8 positive and 7 negative quantiles between 0.5 and an offset of 0.9677083, an exact 0, scaled to [-1, 1])."""
    table = lora.NF4
    assert table.dtype == torch.float32 and torch.equal(table, torch.tensor(NF4_VALUES))
    positive = torch.special.ndtri(torch.linspace(0.9677083, 0.5, 9)[:-1].double()).float()
    negative = -torch.special.ndtri(torch.linspace(0.9677083, 0.5, 8)[:-1].double()).float()
    rebuilt = torch.cat([positive, negative, torch.zeros(1)]).sort().values
    assert max_diff(table, rebuilt / rebuilt.max()) < 1e-6
    assert table[7] == 0 and (table < 0).sum() == 7 and (table > 0).sum() == 8
    assert table[0] == -1 and table[-1] == 1 and (table.diff() > 0).all()
    assert (table.diff().max() / 2).item() == pytest.approx(HALF_MAX_GAP, abs=1e-7)


def linear_with(w, bias=False):
    """An nn.Linear holding the weight w (out, in)."""
    linear = nn.Linear(w.shape[1], w.shape[0], bias=bias)
    with torch.no_grad():
        linear.weight.copy_(w)
    return linear


def unpack(layer):
    """The layer's codes, read from its bytes as bitsandbytes stores them: the first of each pair in the high
    nibble."""
    return torch.stack((layer.packed >> 4, layer.packed & 15), dim=-1).flatten().long()


def stored_absmax(layer):
    """The blocks' absmax as the layer keeps it: int8 in groups of 256 (less the mean), one float32 scale each."""
    n_blocks = layer.in_features * layer.out_features // layer.block_size
    return (layer.absmax_q.float() * layer.absmax_scale[:, None]).flatten()[:n_blocks] + layer.offset


def test_nf4_error_on_gaussian_weights():
    """A 512 x 512 N(0, 1) weight: per block of 64, max |w - deq| <= absmax * 0.1519 (half the widest gap) + the
    error of the absmax itself after double quantization; relative RMS about 0.092; deq = code value x stored absmax."""
    torch.manual_seed(0)
    w = torch.randn(512, 512)
    layer = lora.NF4Linear(linear_with(w), 64)
    assert layer.packed.dtype == torch.uint8 and layer.packed.numel() == w.numel() // 2
    assert layer.absmax_q.dtype == torch.int8 and layer.absmax_scale.numel() == 512 * 512 // 64 // 256
    assert not list(layer.parameters())  # codes and scales are buffers: no optimizer sees them
    deq = layer.weight_as(torch.float32)
    absmax = w.view(-1, 64).abs().amax(1)
    stored = stored_absmax(layer)
    assert torch.equal(deq.flatten(), (lora.NF4[unpack(layer)].view(-1, 64) * stored[:, None]).flatten())
    assert max_diff(stored, absmax) < 0.01 * absmax.max()  # int8 over the spread of the absmaxes
    err = (w - deq).view(-1, 64).abs().amax(1)
    bound = absmax * HALF_MAX_GAP + (absmax - stored).abs() + 1e-6
    assert (err <= bound).all(), (err / bound).max()
    assert (err / absmax).max() > 0.14  # the bound is nearly reached: it is the right one
    rel = ((w - deq).norm() / w.norm()).item()
    assert 0.085 < rel < 0.1, rel
    assert (unpack(layer).bincount(minlength=16) > 0).all()


def test_nf4_packing_and_ties():
    """A hand-made weight, absmax 1 in both blocks (so the stored scales are exact): the table's own values come
    back exactly; the bytes are the codes two by two, the first in the high nibble; a value exactly halfway
    between two codes takes the lower one, the next float up the upper one."""
    table = torch.tensor(NF4_VALUES)
    g = torch.Generator().manual_seed(0)
    block0 = torch.cat([torch.randperm(16, generator=g) for _ in range(4)])            # codes, as indices
    mid = (table[1:] + table[:-1]) / 2
    above = torch.nextafter(mid, torch.ones(15))
    values1 = torch.cat([mid, above, torch.tensor([1.0, -1.0, 0.0, 0.3, -0.3]), torch.zeros(64 - 35)])
    w = torch.stack([table[block0], values1])                                          # (2, 64): two blocks
    codes1 = torch.cat([torch.arange(15), torch.arange(1, 16), torch.tensor([15, 0, 7]),
                        (values1[33:35, None] - table).abs().argmin(1), torch.full((64 - 35,), 7)])
    expected = torch.cat([block0, codes1]).to(torch.uint8)
    layer = lora.NF4Linear(linear_with(w))
    assert torch.equal(unpack(layer).to(torch.uint8), expected)
    assert torch.equal(layer.packed.flatten(), expected[0::2] * 16 + expected[1::2])
    deq = layer.weight_as(torch.float32)
    assert torch.equal(deq[0], w[0])  # the table's values are reproduced exactly
    assert torch.equal(deq[1], table[codes1])


def test_nf4_zero_blocks_and_bits():
    """An all-zero block (absmax 0) dequantizes to zeros, no NaN, next to ordinary blocks and in an all-zero weight;
    bits per weight: 4 + 8/64 + 32/(64 x 256), plus the one float32 mean, about 4.127, and that is what the layer's
    state_dict holds."""
    torch.manual_seed(0)
    w = torch.randn(4, 64)
    w[1] = 0
    deq = lora.NF4Linear(linear_with(w)).weight_as(torch.float32)
    assert torch.isfinite(deq).all() and not deq[1].any() and deq[0].any()
    zero = lora.NF4Linear(linear_with(torch.zeros(2, 64), bias=True))
    assert torch.isfinite(zero.weight_as(torch.float32)).all() and not zero.weight_as(torch.float32).any()
    x = torch.randn(3, 64)
    assert torch.equal(zero(x), zero.bias.expand(3, 2))
    layer = lora.NF4Linear(nn.Linear(256, 256, bias=False))
    assert layer.bits_per_weight() == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) + 32 / 256 ** 2, rel=1e-12)
    assert layer.bits_per_weight() == pytest.approx(4.127, abs=1e-3)
    stored_bits = 8 * sum(t.numel() * t.element_size() for t in layer.state_dict().values())
    assert stored_bits == layer.bits_per_weight() * 256 ** 2


def test_nf4_layer_is_the_papers_quantization():
    """NF4Linear holds nf4_quantize's codes (sections 2 and 3 as written: block absmax, nearest NF4 value), and its
    fast dequantization (weight_as: one gather on byte pairs) is nf4_dequantize's, bit for bit, with the
    stored (double-quantized) absmax; with the exact absmax the reference is within the rounding bound."""
    torch.manual_seed(0)
    w = torch.randn(96, 128)
    layer = lora.NF4Linear(linear_with(w))
    codes, absmax = lora.nf4_quantize(w)
    assert codes.shape == (96 * 128 // 64, 64) and torch.equal(unpack(layer), codes.flatten())
    assert torch.equal(layer.absmax(), stored_absmax(layer)) and max_diff(layer.absmax(), absmax) < 0.01 * absmax.max()
    fast = layer.weight_as(torch.float32)
    assert torch.equal(fast, lora.nf4_dequantize(codes, layer.absmax()).view(96, 128))
    ref = lora.nf4_dequantize(codes, absmax).view(96, 128)
    assert ((w - ref).view(-1, 64).abs().amax(1) <= absmax * HALF_MAX_GAP + 1e-6).all()


# ------------------------------------------------------------------------------------ QLoRA training

def test_nf4_backward_is_a_float_linears():
    """NF4Linear's forward and its gradient for x are those of a float linear holding the dequantized weight; the
    dequantized (out, in) weight is not among the tensors autograd keeps for backward (it is made again there)."""
    torch.manual_seed(0)
    layer = lora.NF4Linear(nn.Linear(64, 96))
    ref = layer.dequantized()
    x = torch.randn(3, 5, 64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)
    y2 = ref(x2)
    y2.backward(g)
    assert max_diff(y, y2) < 1e-6 and max_diff(x.grad, x2.grad) < 1e-6
    assert (96, 64) not in saved and (64, 96) not in saved


class Created(TorchDispatchMode):
    """Records the aten ops run under it: ops, the bytes of the new tensors they make (views make none) and the
    dtypes of the index tensors given to index and index_select."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        op = str(func.overloadpacket)
        given = {a.untyped_storage().data_ptr() for a in (*args, *kwargs.values()) if torch.is_tensor(a)}  # out=
        self.ops.append(op)
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if torch.is_tensor(t) and t.untyped_storage().data_ptr() not in given:
                self.bytes += t.numel() * t.element_size()
        if op == "aten.index_select":
            self.index_dtypes.append(args[2].dtype)
        if op == "aten.index":
            self.index_dtypes += [i.dtype for i in args[1] if i is not None]
        return out

    def __enter__(self):
        self.ops, self.bytes, self.index_dtypes = [], 0, []
        return super().__enter__()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nf4_dequantization_is_one_gather_bit_for_bit(dtype):
    """Issue 19: weight_as is code value x stored absmax in float32, rounded to dtype once, bit for bit (the old
    code's arithmetic); NF4Linear's forward and x's gradient are exactly x W^T + b and g W with that W (under
    autocast too). The lookup makes no int64 tensor and no 2-D advanced index (the old code made an int64 copy of
    the codes and indexed the pair table with it), and allocates at most 2 + 4 + 2 bytes per weight (the int32
    index, the looked-up values, the dtype copy) where the old code allocated 12 to 14, the dequantized weight made
    once in forward and once in backward."""
    torch.manual_seed(0)
    layer = lora.NF4Linear(nn.Linear(128, 192))
    ref = (lora.NF4[unpack(layer)].view(-1, 64) * stored_absmax(layer)[:, None]).view(192, 128).to(dtype)
    with Created() as made:
        w = layer.weight_as(dtype)
    assert w.dtype == dtype and torch.equal(w, ref)
    assert "aten.index" not in made.ops and made.index_dtypes == [torch.int32]
    assert made.bytes <= (2 + 4 + 2 * (dtype != torch.float32)) * w.numel() + 8192  # + the scales
    x = torch.randn(3, 5, 128, requires_grad=True)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32), Created() as made:
        y = layer(x)
        g = torch.randn_like(y)
        y.backward(g)
    xc = x.detach().to(dtype)
    assert torch.equal(y, xc @ ref.t() + layer.bias.to(dtype)) and torch.equal(x.grad, (g @ ref).float())
    assert made.index_dtypes == [torch.int32] * 2  # dequantized in forward and again in backward: never kept


def test_qlora_trains_adapters_alone():
    """quantize_nf4 + add_lora on a random tiny GPT: AdamW on the adapters alone, 20 steps on one batch, halves the
    loss; only the adapters get gradients, and the NF4 codes and scales do not move."""
    model = lora.add_lora(lora.quantize_nf4(tiny(vocab=100, n_head=2))).train()
    nf4 = [m for m in model.modules() if isinstance(m, lora.NF4Linear)]
    assert len(nf4) == 8
    frozen = [t.clone() for m in nf4 for t in m.buffers()]
    x = ids(100, 4, 33, seed=0)
    x, y = x[:, :-1], x[:, 1:]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(20):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert {n for n, p in model.named_parameters() if p.grad is not None} == lora_names(model)
    assert all(torch.equal(a, b) for a, b in zip(frozen, (t for m in nf4 for t in m.buffers())))


# ------------------------------------------------------------------------------------ causality, the cache

@pytest.mark.parametrize("qlora", [False, True])
def test_causal_and_cached_generation(qlora):
    model = tiny(seed=5)
    model = tune(lora.add_lora(lora.quantize_nf4(model) if qlora else model, rank=4), std=0.1).eval()
    for t in (1, 20):
        check_causal(model, 300, t)
    check_cached_equals_uncached(model, 300, 8, 30)  # slides past block_size 32


# ------------------------------------------------------------------------------------ command line

TINY = ["--device", "cpu", "--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--block_size", "32",
        "--batch_size", "4", "--eval_iters", "2", "--log_interval", "2", "--max_new_tokens", "8", "--max_iters", "4",
        "--eval_interval", "4"]


@pytest.fixture
def home(tmp_path, monkeypatch, offline):
    """lora.py run in-process from tmp_path, offline, with an empty hub cache (the default base cannot be had)."""
    monkeypatch.setattr(lora, "CACHE_DIR", tmp_path / "cache")
    return script_home(lora, tmp_path, monkeypatch)


def samples(out):
    """[(title, text)] of the samples printed."""
    return re.findall(r"^--- (.+?) ---\n(.*?)\n---$", out, re.M | re.S)


def test_cli_offline_default_base_adapters_and_resume(home, capsys):
    """Offline, the default --init_from gpt2 falls back to a fresh GPT-2 and says so; the adapter line counts
    16 r n_embd numbers; the base model's sample, then the tuned one; ckpt.pt holds the adapters alone (and the
    base's name); --init_from resume --sample_only prints the tuned sample again."""
    needs_gpt2_bpe()  # in raw bytes four steps move the sample too little to tell the two apart
    lora.main([*TINY, "--lr", "0.05", "--warmup_iters", "0"])
    out = capsys.readouterr().out
    assert "offline" in out and "'gpt2' cannot be fetched" in out
    line = next(l for l in out.splitlines() if "LoRA rank 8" in l)
    assert line.startswith("LoRA rank 8, alpha 16") and "c_attn,c_proj,c_fc: 4,096 trainable parameters" in line
    (base_title, base_text), (title, tuned) = samples(out)
    assert "base model" in base_title and title == "sample"
    assert out.index(base_title) < out.index("iter 2 |") < out.index("--- sample ---")
    assert out.rstrip().splitlines()[-1].startswith("done | 4 iters")
    ckpt = torch.load(home / "out" / "lora" / "ckpt.pt", map_location="cpu", weights_only=True)
    assert len(ckpt["model"]) == 8 and all(".lora_A." in k or ".lora_B." in k for k in ckpt["model"])
    assert sum(v.numel() for v in ckpt["model"].values()) == 4096 and ckpt["args"]["base"] == "scratch"
    assert base_text != tuned  # lr 0.05: four steps move the adapters enough to change the sample

    lora.main(["--init_from", "resume", "--sample_only", "--device", "cpu", "--max_new_tokens", "8"])
    out = capsys.readouterr().out
    assert [text for _, text in samples(out)] == [tuned]  # the same base, the saved adapters, the same seed


def test_cli_qlora_and_an_explicit_base_that_cannot_be_fetched(home, capsys):
    """An --init_from typed out is never replaced by a fresh model: one line, exit 2. --qlora prints the NF4 line
    (its bits per weight: more than 4.127 here, a tiny layer's scales fill a part of a group of 256)."""
    with pytest.raises(SystemExit) as e:
        lora.main([*TINY, "--init_from", "nosuchorg/nosuchmodel"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "cannot fetch" in err and len(err.strip().splitlines()) == 1

    lora.main([*TINY, "--qlora"])
    out = capsys.readouterr().out
    assert "QLoRA rank 8" in out and "4,096 trainable parameters" in out
    nf4 = next(l for l in out.splitlines() if l.startswith("nf4:"))
    assert "4 linear layers" in nf4 and "12,288 weights" in nf4
    assert 4.127 < float(re.search(r"at ([\d.]+) bits", nf4).group(1)) < 5
    assert [t for t, _ in samples(out)][-1] == "sample" and "done | 4 iters" in out


def test_cli_targets_that_match_nothing_and_gpt2s_checkpoint(home, capsys):
    """--lora_targets naming no linear layer of the blocks (nothing would train) and a resume from gpt2.py's
    checkpoint (the same Config, no adapters, no base): one line each, exit 2, not a traceback."""
    for targets in ("foo", "c_attn,c_fc,foo"):
        with pytest.raises(SystemExit) as e:
            lora.main([*TINY, "--init_from", "scratch", "--lora_targets", targets])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "names no linear layer" in err and len(err.strip().splitlines()) == 1, err
    ckpt = dict(model={}, optimizer=[], scaler={}, config=dataclasses.asdict(lora.Config(n_layer=1, n_head=2, n_embd=32)),
                args=dict(max_iters=4, init_from="scratch"), iter_num=4, best_val=1.0, evals_since_best=0,
                tokenizer="bytes")
    (home / "out" / "lora").mkdir(parents=True)
    torch.save(ckpt, home / "out" / "lora" / "ckpt.pt")
    with pytest.raises(SystemExit) as e:
        lora.main(["--init_from", "resume", "--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "not a checkpoint of lora.py" in err and len(err.strip().splitlines()) == 1, err
