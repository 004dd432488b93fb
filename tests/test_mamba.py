"""mamba.py at the model level: HF parity (state size, expansion, Delta's rank, conv width, biases), checkpoint
formats, the selective scan (the chunked scan and the file's loop, selective_scan_loop, against the recurrence
written out in float64, at lengths up to 4096 with strong and weak decay; the chunked scan's outputs and gradients,
its own backward, against autograd through selective_scan_loop; the decoding step against the loop; and that no
whole (B, T, d_inner, N) tensor is kept), recurrent decoding against the full forward (in place, no conv1d call),
its constant-size state, Delta's bias in float32 under autocast,
the paper's initialisation, the optimizer's groups, activation checkpointing, causality, training, and the GPT-NeoX
style tokenizer.json. torch.compile is not tested here: inductor's first compile of a one-layer model takes about
20 s on this CPU with its cache warm, 100 s cold."""
import json
import math
import unicodedata
from types import SimpleNamespace

import pytest
import safetensors.torch
import tokenizers
import torch
import torch.nn.functional as F
import transformers

import mamba
from conftest import (CORPUS, check_cached_equals_uncached, check_causal, check_greedy_matches_hf, check_overfits,
                      check_scan_and_loop_match_hf, check_variant_refused, hf_logits, ids, max_diff, randomize,
                      scale_up, serve_hub, train_tokenizer)

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
pytestmark = pytest.mark.usefixtures("one_thread")

# name: MambaConfig arguments on top of BASE
HF_CASES = {
    "base": dict(),                                                           # N 8, E 2, conv 4, rank ceil(32/16)
    "n4_expand1_conv1": dict(state_size=4, expand=1, conv_kernel=1),          # a pointwise "convolution"
    "conv2_biases_rank3": dict(conv_kernel=2, use_bias=True, use_conv_bias=False, time_step_rank=3),
    "rank1_conv3_3layers": dict(time_step_rank=1, conv_kernel=3, num_hidden_layers=3),
    "n16_expand3_odd_vocab": dict(state_size=16, expand=3, vocab_size=1000),  # vocab padded to 1024
}
BASE = dict(vocab_size=320, hidden_size=32, state_size=8, num_hidden_layers=2, bos_token_id=None, eos_token_id=None,
            pad_token_id=None)


def make_hf(seed=0, scale=1.0, **kw):
    """A random MambaForCausalLM in eval mode, norm gains random around 1 (scale_up; norm_f too), and the SSM's own
    parameters moved off their init, so that a sign or discretisation error shows: A_log = log(1..N) + noise (A
    differs per channel), D random of both signs, Delta's bias for steps of 0.01 to 1 (exp(Delta A) from ~1 to ~0)."""
    torch.manual_seed(seed)
    hf = scale_up(transformers.MambaForCausalLM(transformers.MambaConfig(**{**BASE, **kw})), scale)
    with torch.no_grad():
        hf.backbone.norm_f.weight.normal_(1.0, 0.1)
        for layer in hf.backbone.layers:
            m = layer.mixer
            m.A_log.copy_(torch.log(torch.arange(1.0, m.ssm_state_size + 1)) + 0.5 * torch.randn_like(m.A_log))
            m.D.normal_(0.0, 1.0)
            dt = torch.empty_like(m.dt_proj.bias).uniform_(math.log(0.01), 0.0).exp()
            m.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
    return hf


def tiny(seed=0, vocab=300, block=32, n_layer=2, n_embd=32, d_state=8, **kw):
    """A random mamba.Mamba in eval mode with weights large enough that greedy decoding wanders (with std 0.2 it
    settles on one token); A_log, D and Delta's bias are drawn too, A = -exp(A_log) stays negative."""
    torch.manual_seed(seed)
    return randomize(mamba.Mamba(mamba.Config(vocab_size=vocab, block_size=block, n_layer=n_layer, n_embd=n_embd,
                                              d_state=d_state, **kw)), std=0.3)


# ------------------------------------------------------------------------------------ HF parity

@pytest.mark.parametrize("case", HF_CASES)
def test_logits_match_hf(case, tmp_path):
    """The loaded model gives transformers' logits (its pure-PyTorch path: the recurrence as a loop), with the
    parallel scan and with the sequential one."""
    hf = make_hf(seed=len(case), **HF_CASES[case])
    hf.save_pretrained(tmp_path)
    model = mamba.from_pretrained(tmp_path)
    assert not model.training
    cfg, hc = model.config, hf.config
    assert (cfg.n_layer, cfg.n_embd, cfg.d_state, cfg.expand, cfg.d_conv, cfg.dt_rank, cfg.conv_bias, cfg.bias,
            cfg.vocab_size) == (hc.num_hidden_layers, hc.hidden_size, hc.state_size, hc.expand, hc.conv_kernel,
                                hc.time_step_rank, hc.use_conv_bias, hc.use_bias, hc.vocab_size)
    assert model.lm_head.weight is model.backbone.embeddings.weight
    assert model.backbone.embeddings.weight.shape == (cfg.padded_vocab_size, cfg.n_embd)
    check_scan_and_loop_match_hf(model, hf, cfg.vocab_size)


@pytest.mark.parametrize("case", ["base", "conv2_biases_rank3"])
def test_greedy_generation_matches_hf(case, tmp_path):
    """HF's generate decodes with its own conv and SSM caches (one-token updates): the same tokens."""
    hf = make_hf(seed=7, scale=2.0, **HF_CASES[case])
    hf.save_pretrained(tmp_path)
    check_greedy_matches_hf(mamba.from_pretrained(tmp_path), hf, 320, 24)


def test_sharded_bf16_and_old_name_checkpoints(tmp_path):
    """Shards, a bf16 file (read into float32 or kept in bf16) and the original repos' 'backbone.embedding.weight'."""
    hf = make_hf(seed=4)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) >= 3
    idx = ids(320, 2, 40)
    ref = hf_logits(hf, idx)
    with torch.no_grad():
        assert max_diff(mamba.from_pretrained(tmp_path / "sharded")(idx)[0], ref) < 1e-4

    hf.save_pretrained(tmp_path / "old")
    weights = mamba.read_safetensors(tmp_path / "old" / "model.safetensors")
    weights = {k.replace("backbone.embeddings.", "backbone.embedding."): v.clone() for k, v in weights.items()}
    assert "backbone.embedding.weight" in weights
    safetensors.torch.save_file(weights, str(tmp_path / "old" / "model.safetensors"))
    with torch.no_grad():
        assert max_diff(mamba.from_pretrained(tmp_path / "old")(idx)[0], ref) < 1e-4

    hf.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    hf = transformers.MambaForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32).eval()
    stored = mamba.read_safetensors(tmp_path / "bf16" / "model.safetensors")
    assert stored["backbone.layers.0.mixer.A_log"].dtype == torch.bfloat16
    model = mamba.from_pretrained(tmp_path / "bf16")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    with torch.no_grad():
        assert max_diff(model(idx)[0], hf_logits(hf, idx)) < 1e-4
    model16 = mamba.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    assert torch.equal(model16.backbone.layers[1].mixer.x_proj.weight, stored["backbone.layers.1.mixer.x_proj.weight"])
    with torch.no_grad():
        logits16 = model16(idx)[0]
    assert logits16.dtype == torch.bfloat16
    assert max_diff(logits16.float(), hf_logits(hf, idx)) < 0.1 * hf_logits(hf, idx).abs().max().item()


@pytest.fixture
def server(http_server, monkeypatch, tmp_path):
    return serve_hub(mamba, http_server, monkeypatch, tmp_path / "cache")


def test_from_pretrained_hub_sharded(server):
    hf = make_hf(seed=2)
    repo = server.root / "someorg" / "tiny-mamba" / "resolve" / "main"
    hf.save_pretrained(repo, max_shard_size="20KB")
    model = mamba.from_pretrained("someorg/tiny-mamba")
    idx = ids(320, 2, 32)
    with torch.no_grad():
        assert max_diff(model(idx)[0], hf_logits(hf, idx)) < 1e-4
    cached = mamba.CACHE_DIR / "someorg" / "tiny-mamba"
    assert len(list(cached.glob("model-*.safetensors"))) >= 3 and not list(cached.glob("*.part"))
    with pytest.raises(mamba.InputError, match="cannot fetch"):
        mamba.from_pretrained("someorg/nothing-here")


# ------------------------------------------------------------------------------ from_pretrained refusals

@pytest.mark.parametrize("change", [dict(model_type="falcon_mamba"), dict(model_type="mamba2"),
                                    dict(tie_word_embeddings=False), dict(hidden_act="gelu"),
                                    dict(intermediate_size=100)])
def test_variants_are_refused(tmp_path, change):
    """Refused with one line that names what differs."""
    check_variant_refused(mamba, make_hf(seed=0), tmp_path, change)
    with pytest.raises(mamba.InputError) as e:  # the config.json check_variant_refused left
        mamba.from_pretrained(tmp_path)
    assert "\n" not in str(e.value) and str(next(iter(change.values()))) in str(e.value)


def test_bad_weights_are_refused(tmp_path):
    """A tensor missing, of the wrong shape, unexpected, or no weights at all: one InputError line each."""
    make_hf(seed=0).save_pretrained(tmp_path)
    weights = {k: v.clone() for k, v in mamba.read_safetensors(tmp_path / "model.safetensors").items()}
    a_log = "backbone.layers.1.mixer.A_log"
    cases = [({k: v for k, v in weights.items() if k != "backbone.layers.1.mixer.D"}, "lacks"),
             ({**weights, a_log: weights[a_log][:, :4].contiguous()}, "shape"),
             ({**weights, "backbone.layers.2.mixer.D": weights["backbone.layers.1.mixer.D"].clone()}, "unexpected"),
             (None, "cannot read")]
    for tensors, message in cases:
        if tensors is None:
            (tmp_path / "model.safetensors").unlink()
        else:
            safetensors.torch.save_file(tensors, str(tmp_path / "model.safetensors"))
        with pytest.raises(mamba.InputError, match=message) as e:
            mamba.from_pretrained(tmp_path)
        assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------- the selective scan

def scan_inputs(T, seed=0, Bsz=2, E=6, N=4):
    """selective_scan's inputs as a Mamba layer makes them: Delta = softplus(.) (from about 0.005 to 5), A = -exp(A_log)
    with A_log = log(1..N) + noise, B and C and x of order 1, D of both signs; and a state h0 to start from."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(Bsz, T, E, generator=g)
    delta = F.softplus(2 * torch.randn(Bsz, T, E, generator=g) - 1)
    A = -torch.exp(torch.log(torch.arange(1.0, N + 1)) + 0.3 * torch.randn(E, N, generator=g))
    B, C = torch.randn(Bsz, T, N, generator=g), torch.randn(Bsz, T, N, generator=g)
    D = torch.randn(E, generator=g)
    return (x, delta, A, B, C, D), torch.randn(Bsz, E, N, generator=g)


def recurrence(x, delta, A, B, C, D, h0=None):
    """eq. 2a, 2b and 4 as written, one step at a time in float64: h_t = exp(Delta_t A) h_{t-1} + Delta_t B_t x_t,
    y_t = C_t . h_t + D x_t. Returns y and the last h."""
    x, delta, A, B, C, D = (t.double() for t in (x, delta, A, B, C, D))
    h = torch.zeros(x.size(0), *A.shape, dtype=torch.float64) if h0 is None else h0.double()
    ys = []
    for t in range(x.size(1)):
        h = torch.exp(delta[:, t, :, None] * A) * h + (delta[:, t] * x[:, t])[..., None] * B[:, t, None, :]
        ys.append((h * C[:, t, None, :]).sum(-1) + D * x[:, t])
    return torch.stack(ys, 1), h


def rel_diff(a, b):
    return max_diff(a, b) / b.abs().max().item()


@pytest.mark.parametrize("from_h0", [False, True])
@pytest.mark.parametrize("T", [1, 7, 64, 1000])
def test_scan_equals_the_recurrence(T, from_h0):
    """The parallel scan and the sequential loop give the float64 recurrence's outputs and last state, from zeros
    or from a carried state (which then matters), to 1e-6 of the largest value (float32 rounds by 6e-8 a step;
    they do 1.5e-7), and each other's to 1e-5."""
    inputs, h0 = scan_inputs(T, seed=T)
    h0 = h0 if from_h0 else None
    y_ref, h_ref = recurrence(*inputs, h0=h0)
    seq = mamba.selective_scan(*inputs, h0=h0, how="loop")
    par = mamba.selective_scan(*inputs, h0=h0, how="scan")
    assert par[0].shape == (2, T, 6) and par[1].shape == (2, 6, 4) and par[0].dtype == torch.float32
    assert y_ref.abs().max() > 1.0 and h_ref.abs().max() > 1.0
    for y, h in (seq, par):
        assert rel_diff(y, y_ref) < 1e-6 and rel_diff(h, h_ref) < 1e-6
    assert max_diff(par[0], seq[0]) < 1e-5 and max_diff(par[1], seq[1]) < 1e-5
    if from_h0:
        assert max_diff(par[0][:, 0], mamba.selective_scan(*inputs, how="scan")[0][:, 0]) > 1e-2


def test_scan_is_stable_at_4096_steps():
    """float32, 4096 steps. Half the channels decay hard (Delta |A| from 1 to 50 per step: exp(Delta A) down to
    2e-22, products of them underflow to 0, where a cumulative sum of logs would divide by them), half hardly at
    all (Delta ~ 1e-3: the state remembers ~1000 steps). All finite, and in each half the SSM's part of y (C_t h_t)
    and the last state within 1e-4 of the float64 recurrence's, relative to their largest value: each step rounds
    by float32's 6e-8 and an error lives as long as the state remembers, about 1/(Delta |A|) <= 2000 steps, so at
    worst ~2000 x 6e-8 ~ 1e-4 (the roundings are of random sign: they do 1.5e-6)."""
    (x, _, _, B, C, D), _ = scan_inputs(4096, seed=1, Bsz=1, E=8, N=10)
    A = -torch.arange(1.0, 11).expand(8, 10)
    g = torch.Generator().manual_seed(2)
    delta = torch.cat([torch.empty(1, 4096, 4).uniform_(1.0, 5.0, generator=g),
                       torch.empty(1, 4096, 4).uniform_(5e-4, 2e-3, generator=g)], -1)
    inputs = (x, delta, A, B, C, D)
    y_ref, h_ref = recurrence(*inputs)
    for how in ("scan", "loop"):
        y, h = mamba.selective_scan(*inputs, how=how)
        assert torch.isfinite(y).all() and torch.isfinite(h).all()
        assert rel_diff(y, y_ref) < 1e-6
        for half in (slice(0, 4), slice(4, 8)):  # the weak half's C h is 500 times smaller than the strong half's
            assert rel_diff((y - D * x)[..., half], (y_ref - D * x)[..., half]) < 1e-4
            assert rel_diff(h[:, half], h_ref[:, half]) < 1e-4


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("T", [2, 3, 4095])
def test_parallel_scan_alone_equals_a_float64_loop(T, reverse):
    """h_t = a_t h_{t-1} + b_t (reverse: h_t = a_t h_{t+1} + b_t) for a in (0, 1] (some exactly 1, some ~0) and any b,
    including odd lengths at several levels of the recursion (4095 = 2^12 - 1)."""
    g = torch.Generator().manual_seed(T)
    a = torch.exp(-torch.empty(2, T, 3, 4).uniform_(0.0, 3.0, generator=g) ** 3)  # exp(-27) to 1
    a[:, ::5, 0] = 1.0
    b = torch.randn(2, T, 3, 4, generator=g)
    h, hs = torch.zeros(2, 3, 4, dtype=torch.float64), []
    for t in reversed(range(T)) if reverse else range(T):
        h = a[:, t].double() * h + b[:, t].double()
        hs.append(h)
    ref = torch.stack(hs[::-1] if reverse else hs, 1)
    out = mamba.parallel_scan(a, b, reverse=reverse)
    assert out.shape == b.shape and torch.isfinite(out).all()
    assert rel_diff(out, ref) < 1e-5


@pytest.mark.parametrize("T, L", [(40, 16), (23, 5), (7, 16), (64, 1)])
def test_chunked_scan_equals_the_loop_with_gradients(T, L, monkeypatch):
    """The fast path against the reference in float64: ChunkedScan (chunks of L steps, its hand-written
    backward recomputing each chunk from its first state, the last chunk short when L does not divide T)
    against selective_scan_loop and autograd through it, y, the last state and the gradient of every
    input, from gradients of both y and the last state."""
    monkeypatch.setattr(mamba, "chunk_len", lambda h: L)
    (x, delta, A, B, C, _), h0 = scan_inputs(T, seed=T)
    inputs = [t.double().requires_grad_() for t in (x, delta, A, B, C, h0)]
    g = torch.Generator().manual_seed(1)
    wy, wh = torch.randn(2, T, 6, generator=g, dtype=torch.float64), torch.randn(2, 6, 4, generator=g, dtype=torch.float64)
    no_skip = torch.zeros(6, dtype=torch.float64)  # ChunkedScan leaves D x to selective_scan

    def loop(x, delta, A, B, C, h0):
        return mamba.selective_scan_loop(x, delta, A, B, C, no_skip, h0)

    outs, grads = [], []
    for f in (mamba.ChunkedScan.apply, loop):
        y, h = f(*inputs)
        outs.append((y, h))
        grads.append(torch.autograd.grad((y * wy).sum() + (h * wh).sum(), inputs))
    (y_chunked, h_chunked), (y_loop, h_loop) = outs
    assert max_diff(y_loop, y_chunked) < 1e-12 and max_diff(h_loop, h_chunked) < 1e-12
    for name, a, b in zip(["x", "delta", "A", "B", "C", "h0"], *grads):
        assert a.shape == b.shape and rel_diff(a, b) < 1e-10, name


@pytest.mark.parametrize("T", [1, 100])
def test_selective_scan_equals_the_loop_in_float32_with_gradients(T):
    """What the model calls by default, selective_scan(how="scan"), against how="loop" (selective_scan_loop)
    in float32 from a carried state: y and the last state, and the gradients of all seven inputs, D and h0
    included, to 1e-5 of the largest value."""
    inputs, h0 = scan_inputs(T, seed=3)
    results = []
    for how in ("scan", "loop"):
        leaves = [t.clone().requires_grad_() for t in (*inputs, h0)]
        y, h = mamba.selective_scan(*leaves[:6], h0=leaves[6].clone(), how=how)
        g = torch.Generator().manual_seed(2)
        ((y * torch.randn(y.shape, generator=g)).sum() + (h * torch.randn(h.shape, generator=g)).sum()).backward()
        results.append([y, h] + [t.grad for t in leaves])
    for name, a, b in zip(["y", "h", "x", "delta", "A", "B", "C", "D", "h0"], *results):
        assert a.shape == b.shape and rel_diff(a, b) < 1e-5, name


def test_step_equals_the_loop():
    """how="step", one token at a time from a cached state that it advances in place, gives the loop's y at every
    step and its last state."""
    (x, delta, A, B, C, D), h0 = scan_inputs(20, seed=5)
    y_loop, h_loop = mamba.selective_scan(x, delta, A, B, C, D, h0=h0, how="loop")
    h = h0.clone()
    ys = [mamba.selective_scan(*(t[:, i:i + 1] for t in (x, delta)), A, B[:, i:i + 1], C[:, i:i + 1], D, h0=h,
                               how="step")[0] for i in range(20)]
    assert max_diff(torch.cat(ys, 1), y_loop) < 1e-5 and max_diff(h, h_loop) < 1e-5


def test_chunked_scan_keeps_no_whole_state_tensor(monkeypatch):
    """What backward keeps of the chunked scan: the inputs and the first state of each of its T / L chunks, nothing
    of the size of the whole sequence's states (B, T, d_inner, N), which the loop keeps step by step."""
    monkeypatch.setattr(mamba, "chunk_len", lambda h: 16)
    inputs, _ = scan_inputs(256, Bsz=1)
    inputs = [t.requires_grad_() for t in inputs]
    saved = {}
    for how in ("scan", "loop"):
        saved[how] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved[how].append(t.numel()) or t, lambda t: t):
            mamba.selective_scan(*inputs, how=how)[0].sum().backward()
    whole = 256 * 6 * 4
    assert max(saved["scan"]) == 256 * 6 and whole // 16 in saved["scan"]  # x (T, d_inner) the largest; the starts
    assert saved["loop"].count(6 * 4) >= 256 and max(saved["loop"]) < whole  # every step's (d_inner, N) state


# ------------------------------------------------------------------------------------- recurrent decoding

@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("d_conv", [4, 2, 1])
def test_recurrent_decoding_equals_full_forward(d_conv, parallel):
    """A prompt through the scan leaves each layer's state; then single tokens and chunks continue from it and give
    the full forward's logits at every position."""
    model = tiny(seed=3, d_conv=d_conv)
    idx = ids(300, 2, 40, seed=4)
    states = [mamba.MambaState() for _ in model.backbone.layers]
    with torch.no_grad():
        full = model(idx)[0]
        for a, b in [(0, 10), (10, 11), (11, 12), (12, 17), (17, 18), (18, 40)]:
            part = model(idx[:, a:b], states=states, parallel=parallel)[0]
            assert part.shape == (2, b - a, 300)
            assert max_diff(part, full[:, a:b]) < 1e-4, (a, b)  # logits up to 8: they do 7e-6


@pytest.mark.parametrize("prompt_len, new_tokens", [(5, 12), (8, 40)])  # the second runs past block_size 32
def test_cached_generation_equals_uncached(prompt_len, new_tokens):
    check_cached_equals_uncached(tiny(seed=1), 300, prompt_len, new_tokens)


def test_state_size_is_constant_far_past_block_size():
    """300 tokens one by one with block_size 16 (there are no positions): the state tensors keep their shapes from
    the 10th token to the 300th, take state_bytes per sequence, and the logits still equal the full forward's."""
    model = tiny(seed=4, block=16, n_embd=16, d_state=4)
    idx = ids(300, 2, 300, seed=8)
    states = [mamba.MambaState() for _ in model.backbone.layers]
    with torch.no_grad():
        full = model(idx)[0]
        model(idx[:, :10], states=states)
        shapes = [(s.conv.shape, s.ssm.shape) for s in states]
        assert shapes[0] == ((2, 3, 32), (2, 32, 4))  # (B, d_conv - 1, d_inner), (B, d_inner, N)
        for t in range(10, 300):
            step = model(idx[:, t:t + 1], states=states)[0]
    assert [(s.conv.shape, s.ssm.shape) for s in states] == shapes
    assert sum(s.conv.nbytes + s.ssm.nbytes for s in states) == 2 * model.state_bytes(4) == 2 * 2 * 32 * (3 + 4) * 4
    assert max_diff(step[:, 0], full[:, -1]) < 1e-4


def test_decoding_steps_in_place_without_conv1d(monkeypatch):
    """After the prompt each token is a dot product with the cached inputs and one update of h: no conv1d call, both
    states advanced in place (the same storage from the first token to the last), the full forward's logits."""
    model = tiny(seed=4)
    idx = ids(300, 2, 30, seed=8)
    states = [mamba.MambaState() for _ in model.backbone.layers]
    with torch.no_grad():
        full = model(idx)[0]
        model(idx[:, :10], states=states)
        storage = [(s.conv.data_ptr(), s.ssm.data_ptr()) for s in states]
        monkeypatch.setattr(mamba.F, "conv1d", None)  # a call would fail
        steps = torch.cat([model(idx[:, t:t + 1], states=states)[0] for t in range(10, 30)], 1)
    assert [(s.conv.data_ptr(), s.ssm.data_ptr()) for s in states] == storage
    assert max_diff(steps, full[:, 10:]) < 1e-4


def test_delta_bias_is_added_in_float32_under_autocast(monkeypatch):
    """Under bf16 autocast Delta keeps dt_proj's bias in float32, as the reference's kernel does: with the weights at
    0, Delta = softplus(bias) to float32 precision at dt from 1e-3 to 2e-3 (a bias near -6.9, where bf16's step is
    0.03 and Delta would be off by up to 2%)."""
    model = tiny(seed=0)
    mixer = model.backbone.layers[0].mixer
    dt = torch.linspace(1e-3, 2e-3, mixer.dt_proj.bias.numel())
    with torch.no_grad():
        mixer.dt_proj.weight.zero_()
        mixer.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
    seen, scan = [], mamba.selective_scan
    monkeypatch.setattr(mamba, "selective_scan", lambda x, delta, *a: seen.append(delta) or scan(x, delta, *a))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids(300, 1, 8))
    assert seen[0].dtype == torch.float32 and ((seen[0] - dt) / dt).abs().max() < 1e-4


# ------------------------------------------------------------------------------------- causality, training

@pytest.mark.parametrize("t", [1, 7, 20, 31])
def test_causality(t):
    check_causal(tiny(seed=5), 300, t)


def test_overfit_one_batch():
    torch.manual_seed(0)
    check_overfits(mamba.Mamba(mamba.Config(vocab_size=100, block_size=32, n_layer=2, n_embd=32, d_state=8)), 100)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_grad_checkpoint_gives_the_same_loss_and_gradients(dropout):
    """With grad_checkpoint each block runs twice (the forward, and again in backward) and the loss and every
    gradient are those of the plain run; dropout draws the same masks when replayed."""
    torch.manual_seed(0)
    model = mamba.Mamba(mamba.Config(vocab_size=100, n_layer=3, n_embd=32, d_state=8, dropout=dropout)).train()
    x, y = ids(100, 2, 24), ids(100, 2, 24, seed=3)
    calls = []
    model.backbone.layers[1].mixer.register_forward_pre_hook(lambda *_: calls.append(1))
    results = []
    for checkpoint in (False, True):
        model.grad_checkpoint = checkpoint
        model.zero_grad()
        calls.clear()
        torch.manual_seed(1)
        _, loss = model(x, y)
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
        assert len(calls) == (2 if checkpoint else 1)
    (loss0, grads0), (loss1, grads1) = results
    assert abs(loss0 - loss1) < 1e-6
    for a, b in zip(grads0, grads1):
        assert max_diff(a, b) < 1e-6


# ------------------------------------------------------------------------------------- config, init, optimizer

def test_config_and_params():
    cfg = mamba.Config()
    assert (cfg.padded_vocab_size, cfg.dt_rank, cfg.d_inner) == (50304, 48, 1536)  # Mamba-130M's
    assert mamba.Config(n_embd=40).dt_rank == 3 and mamba.Config(n_embd=40, dt_rank=7).dt_rank == 7
    for bad in (dict(d_state=0), dict(expand=0), dict(d_conv=0), dict(dt_rank=-1), dict(dt_min=0.2),
                dict(dt_min=0.0), dict(dropout=1.0)):
        with pytest.raises(mamba.InputError):
            mamba.Config(**bad)
    model = mamba.Mamba(mamba.Config(vocab_size=100, n_layer=2, n_embd=16, d_state=4, d_conv=3, dt_rank=2, bias=True))
    n, E, N, R, k = 16, 32, 4, 2, 3
    per_layer = n + (n * 2 * E + 2 * E) + (E * k + E) + E * (R + 2 * N) + (R * E + E) + E * N + E + (E * n + n)
    assert model.num_params() == 2 * per_layer + 128 * n + n  # the tied embedding/head counted once


def test_initialisation_follows_the_reference():
    """S4D-Real A = -(1..N) in every channel, D = 1; Delta at init log-uniform in [dt_min, dt_max] (floored), with
    dt_proj's weights uniform in +-dt_rank^-0.5; in_proj PyTorch's default and out_proj that over sqrt(n_layer)."""
    torch.manual_seed(0)
    n_layer, n, N = 4, 64, 16
    cfg = mamba.Config(vocab_size=1000, n_layer=n_layer, n_embd=n, d_state=N, dt_min=1e-3, dt_max=0.1)
    model = mamba.Mamba(cfg)
    assert model.lm_head.weight is model.backbone.embeddings.weight
    assert model.backbone.embeddings.weight.std().item() == pytest.approx(0.02, rel=0.05)
    deltas = []
    for block in model.backbone.layers:
        m = block.mixer
        assert torch.equal(m.A_log, torch.log(torch.arange(1.0, N + 1)).expand(cfg.d_inner, N))
        assert torch.equal(m.D, torch.ones(cfg.d_inner))
        bound = cfg.dt_rank ** -0.5
        assert m.dt_proj.weight.abs().max() <= bound and m.dt_proj.weight.abs().max() > 0.95 * bound
        deltas.append(F.softplus(m.dt_proj.bias))
        kaiming = cfg.d_inner ** -0.5  # PyTorch's Linear: uniform in +-1/sqrt(fan_in)
        assert m.out_proj.weight.abs().max() <= kaiming / math.sqrt(n_layer) + 1e-7
        assert m.out_proj.weight.abs().max() > 0.95 * kaiming / math.sqrt(n_layer)
        assert m.in_proj.weight.abs().max() > 0.95 * n ** -0.5
    delta = torch.cat(deltas).log()  # 512 channels, log-uniform: spread evenly over [log dt_min, log dt_max]
    assert delta.min() >= math.log(1e-3) - 1e-5 and delta.max() <= math.log(0.1) + 1e-5
    assert delta.min() < math.log(1.2e-3) and delta.max() > math.log(0.08)
    assert delta.mean().item() == pytest.approx(math.log(1e-2), abs=0.3)
    floored = mamba.Mamba(mamba.Config(vocab_size=100, n_layer=1, n_embd=64, dt_min=1e-5, dt_init_floor=1e-3))
    delta = F.softplus(floored.backbone.layers[0].mixer.dt_proj.bias)
    assert delta.min() > 1e-3 * (1 - 1e-4) and (delta < 1.001e-3).sum() > 20  # half of 128 below the floor


def test_optimizer_groups_by_name_survive_loading(tmp_path):
    """Mamba.optimizer_groups names every parameter's group: the mixers' four projections "muon", the tied
    embedding and the conv kernels "decay", A_log, D, biases and norm gains "no_decay"; by name, so a model loaded
    with load_state_dict(assign=True), which makes new Parameters, keeps them (an attribute on the old A_log did not).
    """
    def expected(n_layer):
        mixer = {"in_proj.weight": "muon", "x_proj.weight": "muon", "dt_proj.weight": "muon", "out_proj.weight": "muon",
                 "conv1d.weight": "decay", "A_log": "no_decay", "D": "no_decay", "in_proj.bias": "no_decay",
                 "conv1d.bias": "no_decay", "dt_proj.bias": "no_decay", "out_proj.bias": "no_decay"}
        groups = {f"backbone.layers.{i}.mixer.{k}": v for i in range(n_layer) for k, v in mixer.items()}
        groups.update({f"backbone.layers.{i}.norm.weight": "no_decay" for i in range(n_layer)})
        return {"backbone.embeddings.weight": "decay", "backbone.norm_f.weight": "no_decay", **groups}

    fresh = mamba.Mamba(mamba.Config(vocab_size=320, n_layer=2, n_embd=32, d_state=8, bias=True))
    assert fresh.optimizer_groups() == expected(2)
    make_hf(seed=0, use_bias=True).save_pretrained(tmp_path)
    assert mamba.from_pretrained(tmp_path).optimizer_groups() == expected(2)
    loaded = mamba.Mamba(mamba.Config(vocab_size=320, n_layer=2, n_embd=32, d_state=8, bias=True))
    loaded.load_state_dict(fresh.state_dict(), assign=True)
    loaded.lm_head.weight = loaded.backbone.embeddings.weight  # assign=True unties them: tie again
    assert loaded.optimizer_groups() == expected(2)


def test_configure_optimizer_groups():
    """Weight decay on the matrices only: not on A_log (it would pull every A towards -1), D, biases or norms. A step
    with zero gradients leaves those exactly where they were and shrinks the others."""
    torch.manual_seed(0)
    model = mamba.Mamba(mamba.Config(vocab_size=100, n_layer=2, n_embd=16, d_state=4, bias=True))
    [opt] = mamba.configure_optimizer(model, SimpleNamespace(weight_decay=0.1, lr=0.1, optimizer="adamw"),
                                      torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = ({names[id(p)] for p in g["params"]} for g in opt.param_groups)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    mixer = ["in_proj.weight", "conv1d.weight", "x_proj.weight", "dt_proj.weight", "out_proj.weight"]
    assert decay == {"backbone.embeddings.weight"} | {f"backbone.layers.{i}.mixer.{m}" for i in (0, 1) for m in mixer}
    assert no_decay == set(names.values()) - decay
    assert {"backbone.layers.1.mixer.A_log", "backbone.layers.1.mixer.D", "backbone.layers.1.mixer.dt_proj.bias",
            "backbone.layers.1.mixer.conv1d.bias", "backbone.layers.1.mixer.in_proj.bias",
            "backbone.layers.1.norm.weight", "backbone.norm_f.weight"} <= no_decay
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n] * (1 - 0.1 * 0.1)) if n in decay else torch.equal(p, before[n]), n


# ------------------------------------------------------------------------------------- tokenizer

@pytest.fixture(scope="module")
def neox_tokenizer(tmp_path_factory):
    """tokenizer.json as the Mamba checkpoints' (GPT-NeoX's): NFC, then byte-level BPE splitting with GPT-2's
    regex; trained once on tiny-shakespeare with the `tokenizers` package."""
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    train_tokenizer(path, "gpt2", normalizer="NFC")
    tok = json.loads(path.read_text())
    assert tok["normalizer"] == {"type": "NFC"} and tok["pre_tokenizer"]["type"] == "ByteLevel"
    assert tok["pre_tokenizer"]["use_regex"] and not tok["pre_tokenizer"]["add_prefix_space"]
    return tok


def with_normalizer(tok, normalizer, path):
    path.write_text(json.dumps({**tok, "normalizer": normalizer}))
    return path


@pytest.mark.parametrize("normalizer", [{"type": "NFC"}, None])
def test_tokenizer_json_matches_tokenizers(neox_tokenizer, normalizer, tmp_path):
    """Decomposed accents (NFD) get the ids of the composed text with NFC, their own without, as `tokenizers` gives."""
    path = with_normalizer(neox_tokenizer, normalizer, tmp_path / "tokenizer.json")
    ref = tokenizers.Tokenizer.from_file(str(path))
    name, encode, decode, n_vocab = mamba.hf_tokenizer(path)
    assert name == str(path) and n_vocab == ref.get_vocab_size() == 600
    accents = "naïve café résumé Ångström ünïcödé"
    assert unicodedata.normalize("NFD", accents) != accents
    tail = "\n" + unicodedata.normalize("NFD", accents) + " 12345 — 🙂\r\n\tdon't  WE'LL"
    text = CORPUS[-20_000:] + tail
    ours = encode(text)
    assert ours == ref.encode(text).ids and len(ours) < 0.6 * len(text.encode())
    nfc = unicodedata.normalize("NFC", text)
    assert (encode(nfc) == ours) == (normalizer is not None)
    assert decode(ours) == (nfc if normalizer else text)
    assert decode([0] + ours[:5] + [10**6]) == "<|begin_of_text|>" + decode(ours[:5])  # specials kept, unknown dropped


@pytest.mark.parametrize("normalizer", [{"type": "Lowercase"}, {"type": "Strip", "strip_left": True, "strip_right": True},
                                        {"type": "Sequence", "normalizers": [{"type": "NFC"}, {"type": "Lowercase"}]}])
def test_other_normalizers_give_none(neox_tokenizer, normalizer, tmp_path):
    assert mamba.hf_tokenizer(with_normalizer(neox_tokenizer, normalizer, tmp_path / "tokenizer.json")) is None


def test_residual_in_fp32(tmp_path):
    """residual_in_fp32 (every released config): with bf16 weights the residual stream, each block's output, is
    float32 (bf16 with residual_in_fp32 false, read from config.json), and the logits are nearer the float32
    model's; save_pretrained writes the field."""
    hf = make_hf(seed=4, num_hidden_layers=6)
    hf.save_pretrained(tmp_path)
    idx = ids(320, 2, 40)
    with torch.no_grad():
        ref = hf_logits(hf, idx)
    errors = {}
    for fp32 in (True, False):
        config = json.loads((tmp_path / "config.json").read_text())
        (tmp_path / "config.json").write_text(json.dumps({**config, "residual_in_fp32": fp32}))
        model = mamba.from_pretrained(tmp_path, dtype=torch.bfloat16)
        assert model.config.residual_in_fp32 == fp32
        dtypes = []
        for block in model.backbone.layers:
            block.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
        with torch.no_grad():
            logits = model(idx)[0]
        assert logits.dtype == torch.bfloat16
        assert set(dtypes) == {torch.float32 if fp32 else torch.bfloat16}
        errors[fp32] = max_diff(logits.float(), ref)
    assert errors[True] < errors[False], errors
    mamba.save_pretrained(model, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["residual_in_fp32"] is False
