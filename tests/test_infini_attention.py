"""infini_attention.py at the model level: a converted Llama gives transformers' logits on one segment (GQA, MHA,
MQA, tied, rope theta, llama3 scaling) and, with the gates shut, on every segment alone; one attention layer against
the paper's equations written out here (eqs. 2-6, both update rules, GQA, a partial last segment, fed whole and in
chunks); the segment-wise forward against token-by-token decoding and cached against uncached generation; decoding
into one buffer per segment; forward (all segments at once) against the file's Attention.segment_loop (logits,
loss, gradients, the memory after); a state that does not grow with the context; 64 segments without NaN; causality across
segments; gradients through the memory; the optimizer's groups, by name; the passkey data and metric; and the command
line in-process (the common command-line tests, end to end, resume, DDP and bad inputs, are in test_scripts.py)."""
import copy
import json
import math
import re
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers

import infini_attention as ia
from conftest import (needs_gpt2_bpe, check_cached_equals_uncached, check_causal, check_overfits, hf_logits, ids,
                      max_diff, randomize, scale_up, script_home, train_tokenizer)

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
pytestmark = pytest.mark.usefixtures("one_thread")

LLAMA3_SCALING = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=16)
# name: LlamaConfig arguments on top of BASE
HF_CASES = {
    "gqa": dict(num_key_value_heads=2),
    "mha": dict(num_key_value_heads=4),
    "tied": dict(num_key_value_heads=2, tie_word_embeddings=True),
    "mqa_theta500k": dict(num_key_value_heads=1, rope_theta=500000.0),
    "llama3_scaling": dict(num_key_value_heads=2, rope_theta=500000.0, rope_scaling=LLAMA3_SCALING),
}
BASE = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, bos_token_id=None, eos_token_id=None, pad_token_id=None)
SEG = 16  # segment_len of the converted models


def make_hf(seed=0, scale=3.0, **kw):
    """A random LlamaForCausalLM in eval mode: weights scaled up (logits of order 1), RMSNorm gains random too."""
    torch.manual_seed(seed)
    return scale_up(transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**BASE, **kw})), scale)


def set_gates(model, value=None, seed=0):
    """Every gate beta to `value`, or (None) to random values of both signs, so that sigmoid(beta) is far from 0.5
    and differs per head."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.model.layers:
            gate = block.self_attn.gate
            new = torch.full_like(gate, value) if value is not None else torch.randn(gate.shape, generator=g) * 1.5
            gate.copy_(new)
    return model


def tiny(seed=0, vocab=300, segment_len=8, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, std=0.2, **kw):
    """A random InfiniTransformer in eval mode, weights of std `std` (greedy decoding wanders), gates random."""
    torch.manual_seed(seed)
    model = ia.InfiniTransformer(ia.Config(vocab_size=vocab, segment_len=segment_len, n_layer=n_layer, n_head=n_head,
                                           n_kv_head=n_kv_head, n_embd=n_embd, **kw))
    return set_gates(randomize(model, std=std), seed=seed)


# ------------------------------------------------------------------------------------ HF parity

@pytest.mark.parametrize("case", HF_CASES)
def test_one_segment_matches_hf(case, tmp_path):
    """On a text no longer than one segment the memory is empty: the Llama's logits (the issue's bar is 1e-3; in
    practice they agree to float32 rounding). On a longer text the first segment is still the Llama's and the later
    ones are not (memory and segment-local attention); with every gate shut (beta = -inf) each segment gives the
    Llama's logits on that segment alone: rotary restarts at 0, no key crosses a segment boundary."""
    hf = make_hf(seed=len(case), **HF_CASES[case])
    hf.save_pretrained(tmp_path)
    model = ia.from_pretrained(tmp_path, segment_len=SEG)
    assert not model.training
    cfg, hc = model.config, hf.config
    assert (cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.n_embd, cfg.vocab_size, cfg.segment_len) == \
           (hc.num_hidden_layers, hc.num_attention_heads, hc.num_key_value_heads, hc.hidden_size, hc.vocab_size, SEG)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == (case == "tied")
    for block in model.model.layers:
        assert torch.equal(block.self_attn.gate, torch.zeros(cfg.n_head))  # gate_init 0: sigmoid 0.5
    idx = ids(cfg.vocab_size, 2, 3 * SEG, seed=len(case))
    ref = hf_logits(hf, idx)
    assert ref.abs().max() > 1.0
    with torch.no_grad():
        for T in (SEG, SEG - 5, 1):  # exactly one segment, and fewer tokens
            logits, loss = model(idx[:, :T])[:2]
            assert loss is None and logits.shape == (2, T, cfg.vocab_size)
            assert max_diff(logits, hf_logits(hf, idx[:, :T])) < 1e-4, T
        logits = model(idx)[0]  # three segments
        assert max_diff(logits[:, :SEG], ref[:, :SEG]) < 1e-4
        assert max_diff(logits[:, SEG:], ref[:, SEG:]) > 1e-2
        set_gates(model, float("-inf"))
        logits = model(idx)[0]
        for s in range(3):
            part = slice(s * SEG, (s + 1) * SEG)
            assert max_diff(logits[:, part], hf_logits(hf, idx[:, part])) < 1e-4, s
        assert max_diff(logits[:, SEG:], ref[:, SEG:]) > 1e-2  # not full attention either


def test_from_pretrained_segment_len_gates_and_update_rule(tmp_path):
    make_hf(seed=1, **HF_CASES["gqa"]).save_pretrained(tmp_path)
    model = ia.from_pretrained(tmp_path)
    assert model.config.segment_len == BASE["max_position_embeddings"] and model.config.memory_update == "delta"
    model = ia.from_pretrained(tmp_path, segment_len=8, memory_update="linear", gate_init=-1.5)
    assert model.config.segment_len == 8 and model.config.memory_update == "linear"
    assert all(torch.equal(b.self_attn.gate, torch.full((4,), -1.5)) for b in model.model.layers)
    with pytest.raises(ia.InputError, match="longer than the 64 positions"):
        ia.from_pretrained(tmp_path, segment_len=65)
    config = json.loads((tmp_path / "config.json").read_text())  # a saved gate_init: 0.0 given still overrides it
    (tmp_path / "config.json").write_text(json.dumps({**config, "gate_init": 0.7}))
    assert ia.from_pretrained(tmp_path).config.gate_init == 0.7
    model = ia.from_pretrained(tmp_path, gate_init=0.0)
    assert model.config.gate_init == 0.0 and all(not b.self_attn.gate.any() for b in model.model.layers)
    for bad in (dict(segment_len=0), dict(memory_update="bogus")):
        with pytest.raises(ia.InputError):
            ia.Config(**{**dict(n_embd=32, n_head=4, n_kv_head=2), **bad})


def test_rotary_tables_are_as_long_as_the_positions_used(tmp_path, monkeypatch):
    """A Llama 3.x read whole has segments of 131072 positions: each call builds cos and sin for the positions of a
    segment it uses, not for the whole segment (which took 107 ms a token at that length)."""
    make_hf(seed=2, max_position_embeddings=131072, **HF_CASES["gqa"]).save_pretrained(tmp_path)
    lengths, forward = [], ia.Attention.forward

    def spy(self, x, cos, sin, state):
        lengths.append((len(cos), len(sin)))
        return forward(self, x, cos, sin, state)

    monkeypatch.setattr(ia.Attention, "forward", spy)
    ia.from_pretrained(tmp_path).generate(ids(320, 1, 10), 3, temperature=0.0)
    assert lengths == [(n, n) for n in (10, 11, 12) for layer in range(2)]  # the prompt, then one position a token
    lengths.clear()
    ia.from_pretrained(tmp_path, segment_len=8).generate(ids(320, 1, 12), 2, temperature=0.0)
    assert lengths == [(n, n) for n in (8, 5) for layer in range(2)]  # a segment and 4 positions, then the 5th


# ------------------------------------------------------------------------- the paper's equations

def rotate(x, inv_freq):
    """RoFormer on x (n, d) at positions 0..n-1, dimension i paired with i + d/2 (the Hugging Face layout)."""
    h = x.size(-1) // 2
    angle = torch.arange(x.size(0), dtype=torch.float32)[:, None] * inv_freq  # (n, d/2)
    c, s = angle.cos(), angle.sin()
    x1, x2 = x[:, :h], x[:, h:]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def sigma(x):
    return F.elu(x) + 1


@torch.no_grad()
def paper_attention(attn, x, rule):
    """Infini-attention as section 2.1 writes it, one segment, one batch row and one head at a time: returns the
    layer's output (after o_proj) and the final memory M (B, Hkv, d, d) and z (B, Hkv, d)."""
    cfg = attn.cfg
    B, T, _ = x.shape
    H, Hkv, d, N = cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.segment_len
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    Q = (x @ attn.q_proj.weight.T).view(B, T, H, d)
    K = (x @ attn.k_proj.weight.T).view(B, T, Hkv, d)
    V = (x @ attn.v_proj.weight.T).view(B, T, Hkv, d)
    beta = torch.sigmoid(attn.gate)
    M, z = torch.zeros(B, Hkv, d, d), torch.zeros(B, Hkv, d)
    empty = True
    A = torch.zeros(B, T, H, d)
    for s in range(0, T, N):  # the segments; the last may be partial
        n = min(N, T - s)
        for b in range(B):
            for h in range(H):
                j = h // (H // Hkv)  # the key/value head of query head h
                q, k, v = Q[b, s:s + n, h], K[b, s:s + n, j], V[b, s:s + n, j]  # (n, d)
                scores = rotate(q, inv_freq) @ rotate(k, inv_freq).T / math.sqrt(d)
                scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
                a_dot = scores.softmax(dim=-1) @ v  # eq. 2, causal inside the segment
                if empty:
                    A[b, s:s + n, h] = a_dot
                else:
                    a_mem = (sigma(q) @ M[b, j]) / (sigma(q) @ z[b, j])[:, None]  # eq. 3, no rotary
                    A[b, s:s + n, h] = beta[h] * a_mem + (1 - beta[h]) * a_dot  # eq. 6
        if n == N:  # a finished segment is written into the memory
            for b in range(B):
                for j in range(Hkv):
                    sk, v = sigma(K[b, s:s + N, j]), V[b, s:s + N, j]
                    if rule == "delta" and not empty:
                        v = v - (sk @ M[b, j]) / (sk @ z[b, j])[:, None]  # eq. 5
                    M[b, j] = M[b, j] + sk.T @ v  # eq. 4 (linear) or 5 (delta)
                    z[b, j] = z[b, j] + sk.sum(dim=0)
            empty = False
    return A.reshape(B, T, H * d) @ attn.o_proj.weight.T, M, z


def cos_sin(cfg):
    angles = torch.arange(cfg.segment_len, dtype=torch.float32)[:, None] * ia.rope_frequencies(cfg)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


@pytest.mark.parametrize("rule", ["linear", "delta"])
def test_attention_equals_the_paper_equations(rule):
    """One Attention layer over four segments of 5 and a partial one of 3 (GQA, 4 query heads on 2 key/value
    heads, random gates), fed whole and in chunks that cross the boundaries, through forward and through
    segment_loop: the output and the memory equal the loops above. And the test can tell: the other rule, or the gates shut, give other outputs."""
    cfg = ia.Config(vocab_size=64, segment_len=5, n_layer=1, n_head=4, n_kv_head=2, n_embd=32, memory_update=rule)
    torch.manual_seed(0)
    attn = ia.Attention(cfg).eval()
    with torch.no_grad():
        for p in (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, attn.o_proj.weight):
            p.normal_(0.0, 0.3)
        attn.gate.copy_(torch.tensor([-2.0, 1.5, 0.5, 3.0]))
    x = torch.randn(2, 23, 32, generator=torch.Generator().manual_seed(1))
    cos, sin = cos_sin(cfg)
    ref, M, z = paper_attention(attn, x, rule)
    assert ref.abs().max() > 0.5
    with torch.no_grad():
        state = ia.MemoryState()
        whole = attn(x, cos, sin, state)
        assert max_diff(whole, ref) < 1e-5
        assert state.M.shape == (2, 2, 8, 8) and state.z.shape == (2, 2, 8) and state.filled == 3
        assert max_diff(state.M, M) < 1e-5 * M.abs().max() and max_diff(state.z, z) < 1e-5 * z.abs().max()
        for sizes in ([23], [1, 3, 2, 7, 1, 9]):  # the file's own loop over segments, whole and in chunks
            state, outs, t = ia.MemoryState(), [], 0
            for n in sizes:
                outs.append(attn.segment_loop(x[:, t:t + n], cos, sin, state))
                t += n
            assert max_diff(torch.cat(outs, dim=1), ref) < 1e-5 and state.filled == 3, sizes
            assert max_diff(state.M, M) < 1e-5 * M.abs().max() and max_diff(state.z, z) < 1e-5 * z.abs().max()
        state, outs, t = ia.MemoryState(), [], 0
        for n in (1, 3, 2, 7, 1, 9):  # 1, 4, 6, 13, 14, 23: boundaries at 5, 10, 15, 20 fall inside chunks
            outs.append(attn(x[:, t:t + n], cos, sin, state))
            t += n
            if t >= 20:
                assert max_diff(state.M, M) < 1e-5 * M.abs().max()
        assert max_diff(torch.cat(outs, dim=1), ref) < 1e-5
        # the checks above can fail: the memory and the rule matter here
        other = paper_attention(attn, x, "delta" if rule == "linear" else "linear")
        assert max_diff(other[0][:, 10:], ref[:, 10:]) > 1e-3 and max_diff(other[1], M) > 1e-3
        attn.gate.fill_(float("-inf"))
        shut = attn(x, cos, sin, ia.MemoryState())
        assert max_diff(shut[:, :5], ref[:, :5]) < 1e-5 and max_diff(shut[:, 5:], ref[:, 5:]) > 1e-2


def test_retrieve_reads_each_kv_head_with_its_query_group():
    """retrieve is eq. 3 per key/value head (given the features sigma(q)), with the empty rows' 0/0 read as 0."""
    g = torch.Generator().manual_seed(0)
    q, M = torch.randn(1, 2, 3, 4, generator=g), torch.randn(1, 2, 4, 5, generator=g)
    z = torch.rand(1, 2, 4, generator=g)
    out = ia.retrieve(ia.elu1(q), M, z)
    for j in range(2):
        assert torch.allclose(out[0, j], sigma(q[0, j]) @ M[0, j] / (sigma(q[0, j]) @ z[0, j])[:, None], atol=1e-6)
    empty = ia.retrieve(ia.elu1(q), torch.zeros_like(M), torch.zeros_like(z))
    assert torch.equal(empty, torch.zeros(1, 2, 3, 5))


# ------------------------------------------------------------------------------- decoding and state

@pytest.mark.parametrize("rule", ["linear", "delta"])
def test_forward_equals_token_by_token_and_chunks(rule):
    """Five segments and a half, in one call, one token at a time and in irregular chunks with a persistent state:
    the same logits, and the same memory at the end."""
    model = tiny(seed=1, memory_update=rule)
    idx = ids(300, 2, 5 * 8 + 4, seed=3)
    with torch.no_grad():
        full_state = model.new_state()
        full = model(idx, state=full_state)[0]
        for sizes in ([1] * 44, [3, 5, 1, 9, 8, 2, 15, 1]):
            state, outs, t = model.new_state(), [], 0
            for n in sizes:
                outs.append(model(idx[:, t:t + n], state=state)[0])
                t += n
            assert t == 44
            assert max_diff(torch.cat(outs, dim=1), full) < 1e-5, sizes
            for a, b in zip(state, full_state):
                assert a.filled == b.filled == 4 and max_diff(a.M, b.M) < 1e-5 * b.M.abs().max()
                assert torch.allclose(a.k, b.k, atol=1e-5) and a.k.shape == (2, 2, 4, 8)
        assert max_diff(model(idx[:, :8])[0], full[:, :8]) < 1e-6  # a fresh call starts from an empty state


def test_decoding_writes_into_one_buffer_per_segment():
    """Token by token (no grad, as generate) each token's key and value go into the state's buffer, whose storage
    stays put from the segment's first token to its last unfinished one (the code before issue 19 copied the
    segment so far with torch.cat at every token); it is let go when the segment is written into the memory. The
    logits equal those of one forward over the whole text."""
    model = tiny(seed=12, segment_len=8)
    idx = ids(300, 2, 21, seed=13)
    with torch.no_grad():
        full = model(idx)[0]
        state, outs, storage = model.new_state(), [], {}
        for t in range(21):
            outs.append(model(idx[:, t:t + 1], state=state)[0])
            for i, s in enumerate(state):
                assert s.filled == (t + 1) % 8
                if s.filled == 0:
                    assert s.k is None and s.v is None
                    continue
                assert s.k.shape == (2, 2, s.filled, 8)
                ptr = (s.k.untyped_storage().data_ptr(), s.v.untyped_storage().data_ptr())
                assert storage.setdefault((i, t // 8), ptr) == ptr, (i, t)  # the segment's first token's storage
    assert len(storage) == 2 * 3  # two layers, three segments begun
    assert max_diff(torch.cat(outs, dim=1), full) < 1e-5


@pytest.mark.parametrize("rule", ["linear", "delta"])
def test_cached_generation_equals_uncached(rule):
    """Greedy (and seeded sampled) tokens with the state equal those of re-reading the whole text each time:
    5 + 30 tokens cross four segment boundaries."""
    check_cached_equals_uncached(tiny(seed=2, memory_update=rule, std=0.3), 300, 5, 30)


def test_state_does_not_grow_with_the_context():
    """After 1, 10 and 40 segments the state is the memory alone (M and z, float32, per layer and key/value head):
    the same bytes; in between it holds at most segment_len - 1 tokens' keys and values more."""
    model = tiny(seed=3, segment_len=4, n_kv_head=2)
    B, L, Hkv, d, N = 3, 2, 2, 8, 4
    memory = L * B * Hkv * (d * d + d) * 4
    bound = memory + L * 2 * B * Hkv * (N - 1) * d * 4
    idx = ids(300, B, 40 * N, seed=4)
    state, t, at_boundary = model.new_state(), 0, {}
    with torch.no_grad():
        for n in [1, 3] + [3] * 52:  # 160 tokens, in chunks that cross the boundaries
            model(idx[:, t:t + n], state=state)
            t += n
            nbytes = model.state_bytes(state)
            assert nbytes <= bound and all(s.filled == t % N for s in state)
            if t % N == 0:
                at_boundary[t // N] = nbytes
                for s in state:
                    assert s.k is None and s.v is None
                    assert s.M.shape == (B, Hkv, d, d) and s.z.shape == (B, Hkv, d) and s.M.dtype == torch.float32
            else:
                assert all(s.k.shape == s.v.shape == (B, Hkv, t % N, d) for s in state)
    assert t == 160 and at_boundary[1] == at_boundary[10] == at_boundary[40] == memory


@pytest.mark.parametrize("rule", ["linear", "delta"])
def test_64_segments_stay_finite(rule):
    """64 segments of 4 with large weights, forward and backward: finite logits, loss and gradients; z grows with
    every segment and retrieval from the 64-segment memory stays finite."""
    model = tiny(seed=4, segment_len=4, memory_update=rule, std=0.5).train()
    idx = ids(300, 2, 257, seed=5)
    state = model.new_state()
    logits, loss = model(idx[:, :-1], idx[:, 1:], state=state)[:2]
    loss.backward()
    assert torch.isfinite(logits).all() and torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert all(b.self_attn.gate.grad.abs().min() > 0 for b in model.model.layers)
    with torch.no_grad():
        one = model.new_state()
        model(idx[:, :4], state=one)
        for s64, s1 in zip(state, one):
            assert (s64.z > 10 * s1.z).all()
            q = torch.randn(2, 2, 5, 8) * 10
            assert torch.isfinite(ia.retrieve(ia.elu1(q), s64.M, s64.z)).all()


@pytest.mark.parametrize("t", [1, 7, 8, 9, 17, 31])
def test_causality(t):
    """Segments of 8: changes at t inside, at and just after a boundary change nothing before t."""
    check_causal(tiny(seed=5, segment_len=8), 300, t)


# ------------------------------------------------------------------- the same, fast: against segment_loop

def looped(model):
    """model with every attention layer running Attention.segment_loop, the paper's loop over segments, in place
    of forward (the weights are the model's own)."""
    for block in model.model.layers:
        block.self_attn.forward = block.self_attn.segment_loop
    return model


@pytest.mark.parametrize("rule,experts", [("linear", 0), ("delta", 0), ("delta", 4)])
def test_forward_equals_segment_loop(rule, experts):
    """forward (every segment at once: one local attention call, the memory as a cumulative sum, the delta rule's
    recurrence over d x d matrices only) gives segment_loop's logits, loss, gradients and memory after, on the same
    weights, in train mode: T a multiple of segment_len (4 segments), not one (3 and 5/8), shorter than one, and a
    state continued in chunks with autograd on (a chunk inside the unfinished segment twice, one that finishes it
    and goes on); with Mixtral's experts too (the loss adds the router's terms)."""
    moe = dict(n_expert=experts, intermediate_size=48) if experts else {}
    fast = tiny(seed=10, memory_update=rule, **moe).train()
    loop = looped(copy.deepcopy(fast))
    idx = ids(300, 2, 42, seed=11)
    for sizes in ([32], [29], [5], [13, 1, 1, 26]):
        T = sum(sizes)
        runs = []
        for model in (fast, loop):
            model.zero_grad(set_to_none=True)
            state, outs, losses, t = model.new_state(), [], [], 0
            for n in sizes:
                logits, loss = model(idx[:, t:t + n], idx[:, t + 1:t + n + 1], state=state)[:2]
                outs.append(logits)
                losses.append(loss * n / T)
                t += n
            loss = sum(losses)
            loss.backward()
            runs.append((torch.cat(outs, dim=1).detach(), loss.item(), state,
                         {name: p.grad for name, p in model.named_parameters()}))
        (logits, loss, state, grads), (ref, ref_loss, ref_state, ref_grads) = runs
        assert max_diff(logits, ref) < 1e-5 and abs(loss - ref_loss) < 1e-5, sizes
        for ours, theirs in zip(state, ref_state):
            assert ours.filled == theirs.filled == T % 8
            if T >= 8:
                assert max_diff(ours.M, theirs.M) < 1e-5 * theirs.M.abs().max()
                assert max_diff(ours.z, theirs.z) < 1e-5 * theirs.z.abs().max()
            else:
                assert ours.M is None and theirs.M is None
            if T % 8:
                assert max_diff(ours.k, theirs.k) < 1e-5 and max_diff(ours.v, theirs.v) < 1e-5
        for name, g in ref_grads.items():
            if g is None:  # the gates of a text of one segment: the memory is never read
                assert T <= 8 and grads[name] is None, name
                continue
            assert max_diff(grads[name], g) < 1e-5 * max(1.0, g.abs().max().item()), (sizes, name)
        if T > 8:
            assert max(ref_grads[f"model.layers.{i}.self_attn.gate"].abs().max() for i in (0, 1)) > 1e-4


# ----------------------------------------------------------------------------------------- training

def test_overfit_one_batch():
    torch.manual_seed(0)
    model = ia.InfiniTransformer(ia.Config(vocab_size=100, segment_len=8, n_layer=2, n_head=4, n_kv_head=2, n_embd=32))
    check_overfits(model, 100, steps=60)  # 32 tokens: four segments; at 60 steps the loss is ~0.06 of its start


def test_gradients_flow_through_the_memory():
    """The second segment's outputs depend on the first segment's tokens only through the memory: a nonzero
    gradient with the gates open, exactly zero with them shut; the third segment's tokens get none (causality); and
    a one-segment sequence gives the gates no gradient (the memory is still empty)."""
    model = tiny(seed=6, segment_len=8).train()
    idx = ids(300, 2, 24, seed=7)

    def embedding_grad(model):
        seen = []
        hook = model.model.drop.register_forward_hook(lambda m, i, out: seen.append(out) or out.retain_grad())
        model.zero_grad(set_to_none=True)
        logits = model(idx)[0]
        logits[:, 8:16].square().sum().backward()  # the second segment's outputs
        hook.remove()
        return seen[0].grad

    grad = embedding_grad(model)
    assert grad[:, :8].abs().amax(dim=-1).min() > 1e-6  # every token of segment 1 reaches segment 2
    assert not grad[:, 16:].any()
    assert all(b.self_attn.gate.grad.abs().min() > 0 for b in model.model.layers)
    set_gates(model, float("-inf"))
    grad = embedding_grad(model)
    assert not grad[:, :8].any() and grad[:, 8:16].abs().sum() > 0
    model.zero_grad(set_to_none=True)
    model(idx[:, :8], idx[:, 1:9])[1].backward()
    assert all(b.self_attn.gate.grad is None for b in model.model.layers)


def test_configure_optimizer_groups():
    """Matrices decay; norms do not; the gates neither, in their own group at gate_lr (lr_scale = gate_lr / lr). A
    step with zero gradients leaves norms and gates where they were and shrinks the matrices."""
    model = tiny(seed=8, tie_embeddings=True)
    args = SimpleNamespace(weight_decay=0.1, lr=1e-3, gate_lr=3e-2, optimizer="adamw")
    model.lr_scales = {f"model.layers.{i}.self_attn.gate": args.gate_lr / args.lr for i in (0, 1)}  # as build_model
    [opt] = ia.configure_optimizer(model, args, torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [{names[id(p)] for p in g["params"]} for g in opt.param_groups]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0, 0.0]
    assert [g["lr_scale"] for g in opt.param_groups] == [1.0, 1.0, pytest.approx(30.0)]
    assert groups[2] == {f"model.layers.{i}.self_attn.gate" for i in (0, 1)}
    assert groups[1] == {n for n in names.values() if n.endswith("norm.weight")}
    assert groups[0] == {n for n in names.values() if n.endswith("proj.weight")} | {"model.embed_tokens.weight"}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    for g in opt.param_groups:  # as the training loop sets them
        g["lr"] = 0.5 * g["lr_scale"]
    opt.step()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n] * (1 - 0.5 * 0.1)) if n in groups[0] else torch.equal(p, before[n]), n
    # one step with a gradient on the gates alone: Adam moves each by lr * lr_scale = gate_lr
    [opt] = ia.configure_optimizer(model, args, torch.device("cpu"))
    for g in opt.param_groups:
        g["lr"] = args.lr * g["lr_scale"]
    gate = model.model.layers[0].self_attn.gate
    start = gate.detach().clone()
    model.zero_grad(set_to_none=True)
    gate.grad = torch.ones_like(gate)
    opt.step()
    assert torch.allclose(start - gate.detach(), torch.full_like(start, 3e-2), rtol=1e-3)


def expected_groups(model):
    """The groups by the parameters' roles: norms and gates undecayed, the blocks' matrices (attention, SwiGLU, the
    routers) Muon's, the embedding, the head and the stacked experts AdamW's with decay."""
    out = {}
    for name, p in model.named_parameters():
        if name.endswith(("layernorm.weight", "model.norm.weight", "self_attn.gate")):
            out[name] = "no_decay"
        elif p.dim() == 2 and name.startswith("model.layers."):
            out[name] = "muon"
        else:
            out[name] = "decay"
    return out


def test_optimizer_groups_by_name(tmp_path):
    """optimizer_groups names every parameter: a fresh dense model (tied and untied) and one with experts, a
    converted Llama, and models whose tensors came in with load_state_dict(assign=True) (no attribute survives it)
    get the expected groups; the gates are never decayed."""
    models = [tiny(seed=8), tiny(seed=8, tie_embeddings=True), tiny(seed=8, n_expert=4, intermediate_size=48)]
    make_hf(seed=1, **HF_CASES["gqa"]).save_pretrained(tmp_path)
    models.append(ia.from_pretrained(tmp_path, segment_len=8))
    for model in list(models):
        fresh = ia.InfiniTransformer(model.config)
        fresh.load_state_dict(model.state_dict(), assign=True)
        models.append(fresh)
    for model in models:
        groups = model.optimizer_groups()
        assert groups == expected_groups(model)
        assert groups.keys() == dict(model.named_parameters()).keys()
        for i in range(model.config.n_layer):
            assert groups[f"model.layers.{i}.self_attn.gate"] == "no_decay"
            assert groups[f"model.layers.{i}.self_attn.q_proj.weight"] == "muon"
        assert groups["model.embed_tokens.weight"] == "decay"
    assert models[2].optimizer_groups()["model.layers.0.block_sparse_moe.w1"] == "decay"
    assert models[2].optimizer_groups()["model.layers.0.block_sparse_moe.gate.weight"] == "muon"


# ------------------------------------------------------------------------------------------ passkey

@pytest.fixture(scope="module", params=["gpt2", "bytes"])
def tokenizer(request):
    if request.param == "gpt2":
        needs_gpt2_bpe()
    return ia.load_tokenizer(request.param)


NEEDLE = re.compile(r"The pass key is (\d{5})\. Remember it\. \1 is the pass key\. ")


def test_passkey_batch(tokenizer):
    """Shapes, the shift by one, the answer mask (exactly the key's tokens, at the end), the needle at its depth
    inside the filler, different examples for different seeds, and a length too short refused."""
    _, encode, decode, _ = tokenizer
    torch.manual_seed(0)
    x, y, answer = ia.passkey_batch(encode, 8, 160, torch.device("cpu"))
    assert x.shape == y.shape == answer.shape == (8, 160) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    filler = encode(ia.PASSKEY_FILLER)
    depths, keys = set(), set()
    for row_x, row_y, row_a in zip(x.tolist(), y.tolist(), answer.tolist()):
        text = decode(row_x + row_y[-1:])
        (key,) = NEEDLE.findall(text)
        keys.add(key)
        assert text.endswith(f"What is the pass key? The pass key is {key}")
        key_tokens = encode(f" {key}")
        n = len(key_tokens)
        assert row_a[-n:] == key_tokens == row_y[-n:] and set(row_a[:-n]) == {-1}
        needle = encode(f"The pass key is {key}. Remember it. {key} is the pass key. ")
        depth = next(i for i in range(len(row_x)) if row_x[i:i + len(needle)] == needle)
        depths.add(depth)
        room = 161 - len(needle) - len(encode("What is the pass key? The pass key is")) - n  # filler tokens
        pad = (filler * 40)[:room]  # the filler, cut by the needle at `depth`
        assert row_x[:depth] == pad[:depth] and row_x[depth + len(needle):room + len(needle)] == pad[depth:]
    assert len(keys) == 8 and len(depths) >= 6 and max(depths) - min(depths) > room // 3
    torch.manual_seed(1)
    other = ia.passkey_batch(encode, 8, 160, torch.device("cpu"))[0]
    assert not torch.equal(other, x)
    with pytest.raises(ia.InputError, match="too short"):
        ia.passkey_batch(encode, 1, 20, torch.device("cpu"))


def stub_model(encode, n, lengths, vocab, wrong):
    """Something passkey_accuracy can measure: its logits are one-hot on the true next tokens of the examples
    passkey_accuracy draws, except key token `wrong[i]` of example i, and every position that is not a key token
    (ignored by the metric). It records the gates it saw."""
    truth = {}
    for length in lengths:
        torch.manual_seed(length)
        x, y, answer = ia.passkey_batch(encode, n, length, torch.device("cpu"))
        pred = torch.where(answer >= 0, y, (y + 1) % vocab)
        for i, k in wrong.items():
            key_positions = (answer[i] >= 0).nonzero().flatten()
            pred[i, key_positions[k]] = (pred[i, key_positions[k]] + 1) % vocab
        truth[length] = (x, pred)
    gate = nn.Parameter(torch.tensor([0.3, -0.7]))
    seen = []

    def hidden(x, state):  # (the predicted ids, no router); lm_head turns them into one-hot logits (B, T, vocab)
        seen.append(gate.detach().clone())
        state.append(x)  # the segments so far: the examples are fed a segment at a time
        ref, pred = truth.get(sum(s.size(1) for s in state), (None, None))
        if ref is None or not torch.equal(torch.cat(state, 1), ref):  # not yet a whole example: nothing right
            return torch.zeros_like(x), None
        return pred[:, -x.size(1):], None

    layer = SimpleNamespace(self_attn=SimpleNamespace(gate=gate))
    model = SimpleNamespace(config=SimpleNamespace(vocab_size=vocab, segment_len=64), model=SimpleNamespace(layers=[layer]),
                            hidden=hidden, new_state=list, lm_head=lambda h: F.one_hot(h, vocab).float(),
                            eval=lambda: None)
    return model, gate, seen


def test_passkey_accuracy_counts_an_example_iff_all_its_key_tokens_are_right(tokenizer):
    _, encode, _, vocab = tokenizer
    lengths, n = [128, 192], 10
    wrong = {0: 0, 3: -1, 7: 0}  # the first key token of example 0 and 7, the last of example 3
    model, gate, seen = stub_model(encode, n, lengths, vocab, wrong)
    assert ia.passkey_accuracy(model, encode, lengths, n, "cpu", torch.autocast("cpu", enabled=False)) == \
           {128: pytest.approx(0.7), 192: pytest.approx(0.7)}
    assert all(torch.equal(g, torch.tensor([0.3, -0.7])) for g in seen)
    model, gate, seen = stub_model(encode, n, lengths, vocab, {})
    out = ia.passkey_accuracy(model, encode, lengths, n, "cpu", torch.autocast("cpu", enabled=False), memory=False)
    assert out == {128: 1.0, 192: 1.0}
    assert len(seen) == 5 and all(torch.isinf(g).all() and (g < 0).all() for g in seen)  # gates shut while measuring
    assert torch.equal(gate, torch.tensor([0.3, -0.7]))  # and restored


def test_passkey_accuracy_restores_a_models_gates():
    encode = ia.load_tokenizer("bytes")[1]
    model = tiny(seed=9, vocab=256, segment_len=64)
    gates = [b.self_attn.gate.detach().clone() for b in model.model.layers]
    for memory in (False, True):
        out = ia.passkey_accuracy(model, encode, [128], 3, torch.device("cpu"), nullcontext(), memory=memory)
        assert list(out) == [128] and 0.0 <= out[128] <= 1.0
        assert all(torch.equal(b.self_attn.gate, g) for b, g in zip(model.model.layers, gates))


# ------------------------------------------------------------------------------------- command line

TINY = ["--device", "cpu", "--n_layer", "1", "--n_head", "2", "--n_kv_head", "1", "--n_embd", "32", "--batch_size", "2",
        "--eval_iters", "1", "--log_interval", "1"]


def test_cli_passkey_table(tmp_path, monkeypatch, offline, capsys):
    """--task passkey trains, then prints accuracy at 1, 2, 4, 8 and 16 segments with the memory and gated off;
    the checkpoint's optimizer ran the gates at --gate_lr."""
    needs_gpt2_bpe()  # a passkey example in bytes is longer than the segment here
    script_home(ia, tmp_path, monkeypatch)
    monkeypatch.setattr(ia, "PASSKEY_EXAMPLES", 4)
    ia.main(["--task", "passkey", *TINY, "--segment_len", "32", "--block_size", "64", "--max_iters", "2",
             "--eval_interval", "2", "--lr", "1e-3", "--min_lr", "1e-3", "--gate_lr", "2e-2", "--warmup_iters", "0"])
    out = capsys.readouterr().out
    assert "segments of 32, delta memory | task passkey" in next(l for l in out.splitlines() if l.startswith("infini_attention |"))
    assert "passkey accuracy (4 examples per length, segments of 32):" in out
    assert re.search(r"^  segments +1 +2 +4 +8 +16$", out, re.M)
    for row in ("memory", "gated off"):
        assert re.search(rf"^  {row} +(\d+% +){{4}}\d+%$", out, re.M), row
    assert "done | 2 iters" in out
    ckpt = torch.load(tmp_path / "out" / "infini_attention" / "ckpt.pt", map_location="cpu", weights_only=True)
    matrices, norms, gates = ckpt["optimizer"][0]["param_groups"]
    assert gates["lr"] == pytest.approx(2e-2) and matrices["lr"] == pytest.approx(1e-3) and gates["weight_decay"] == 0
    assert ckpt["config"]["segment_len"] == 32


def test_cli_samples_from_a_pretrained_llama(tmp_path, monkeypatch, offline, capsys):
    script_home(ia, tmp_path, monkeypatch)
    ckpt = tmp_path / "tiny-llama"
    make_hf(seed=9, scale=1.0, num_key_value_heads=2).save_pretrained(ckpt)
    ia.main(["--init_from", str(ckpt), "--device", "cpu", "--sample_only", "--segment_len", "8",
             "--memory_update", "linear", "--max_new_tokens", "20", "--temperature", "0"])
    out = capsys.readouterr().out
    assert "segments of 8, linear memory" in next(l for l in out.splitlines() if l.startswith("infini_attention |")) and "shown as token ids" in out
    assert "state: at most" in out
    sample = out.split(f"--- sample from {ckpt} ---\n")[1].split("\n---")[0]
    tokens = [int(t) for t in sample.strip("[]").split(",")]
    assert tokens[0] == 0 and len(tokens) == 21 and all(0 <= t < 320 for t in tokens)
    with pytest.raises(SystemExit) as e:
        ia.main(["--init_from", str(ckpt), "--device", "cpu", "--sample_only", "--segment_len", "65"])
    assert e.value.code == 2 and "longer than the 64 positions" in capsys.readouterr().err


def test_cli_a_long_context_llama_takes_the_presets_segments(tmp_path, monkeypatch, offline, capsys):
    """A Llama 3.x says max_position_embeddings 131072: as one segment the memory would never be written nor read, and
    the gates would get no gradient. Without --segment_len the run takes the preset's (32 on a CPU); a checkpoint of
    this file keeps its own; from_pretrained alone keeps the Llama's one segment (the Llama's logits)."""
    script_home(ia, tmp_path, monkeypatch)
    ckpt = tmp_path / "long-llama"
    make_hf(seed=9, scale=1.0, num_key_value_heads=2, max_position_embeddings=131072).save_pretrained(ckpt)
    ia.main(["--init_from", str(ckpt), "--device", "cpu", "--sample_only", "--max_new_tokens", "4"])
    assert "segments of 32, delta memory" in next(l for l in capsys.readouterr().out.splitlines()
                                                  if l.startswith("infini_attention |"))
    assert ia.from_pretrained(ckpt).config.segment_len == 131072
    assert ia.from_pretrained(ckpt, llama_segment_len=24).config.segment_len == 24
    ia.save_pretrained(ia.from_pretrained(ckpt, segment_len=8), tmp_path / "ours")
    ia.main(["--init_from", str(tmp_path / "ours"), "--device", "cpu", "--sample_only", "--max_new_tokens", "4"])
    assert "segments of 8, delta memory" in capsys.readouterr().out


def test_cli_passkey_refuses_a_segment_too_short_before_training(tmp_path, monkeypatch, offline, capsys):
    """The accuracy table starts at one segment: a segment that cannot hold an example is refused up front, not
    after the training it would have wasted."""
    script_home(ia, tmp_path, monkeypatch)
    with pytest.raises(SystemExit) as e:
        ia.main(["--task", "passkey", "--device", "cpu", "--segment_len", "16", "--block_size", "64",
                 "--max_iters", "1", "--n_layer", "1", "--n_head", "2", "--n_kv_head", "1", "--n_embd", "32",
                 "--out_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "--segment_len 16" in err and "too short" in err
    assert not (tmp_path / "out" / "ckpt.pt").exists()


def test_cli_passkey_table_without_a_tokenizer_is_refused(tmp_path, monkeypatch, offline, capsys):
    script_home(ia, tmp_path, monkeypatch)
    ckpt = tmp_path / "tiny-llama"
    make_hf(seed=9, scale=1.0, num_key_value_heads=2).save_pretrained(ckpt)
    with pytest.raises(SystemExit) as e:
        ia.main(["--init_from", str(ckpt), "--device", "cpu", "--sample_only", "--task", "passkey",
                 "--segment_len", "32"])
    assert e.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.parametrize("flags, message", [
    (["--segment_len", "0"], "infini_attention.py: error: --segment_len must be positive, got 0"),
    (["--segment_len", "-4"], "infini_attention.py: error: --segment_len must be positive, got -4"),
    (["--n_head", "2", "--n_kv_head", "3"],
     "infini_attention.py: error: n_head (2) must be a multiple of n_kv_head (3)"),
    (["--memory_update", "bogus"], "argument --memory_update: invalid choice: 'bogus'"),  # argparse's own exit 2
])
def test_cli_refuses_bad_flags(flags, message, tmp_path, monkeypatch, offline, capsys):
    script_home(ia, tmp_path, monkeypatch)
    with pytest.raises(SystemExit) as e:
        ia.main(["--device", "cpu", "--max_iters", "1", *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err
    if "invalid choice" not in message:
        assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------ on a mixture of experts (Mixtral)

MIXTRAL = dict(BASE, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, sliding_window=None)


def make_mixtral(seed=0, scale=3.0, **kw):
    """A random MixtralForCausalLM in eval mode, weights scaled up as make_hf's."""
    torch.manual_seed(seed)
    return scale_up(transformers.MixtralForCausalLM(transformers.MixtralConfig(**{**MIXTRAL, **kw})), scale)


def test_a_converted_mixtral_matches_hf_on_one_segment(tmp_path):
    """A Mixtral turned Infini: mixtral.py's sparse MoE in place of SwiGLU, the gates at 0. On one segment, and with
    the gates shut on each segment alone, MixtralForCausalLM's logits. save_pretrained writes Mixtral's layout:
    transformers loads it with the same one-segment logits, from_pretrained here loads it whole, gates and all."""
    hf = make_mixtral(seed=3)
    hf.save_pretrained(tmp_path / "hf")
    model = ia.from_pretrained(tmp_path / "hf", segment_len=SEG)
    cfg = model.config
    assert (cfg.n_expert, cfg.top_k_experts, cfg.rope_theta, cfg.segment_len) == (4, 2, 1e6, SEG)  # Mixtral's rope_theta
    assert model.model.layers[1].block_sparse_moe.w2.shape == (4, 64, 96)
    assert all(torch.equal(b.self_attn.gate, torch.zeros(4)) for b in model.model.layers)
    idx = ids(320, 2, 3 * SEG, seed=3)
    with torch.no_grad():
        for T in (SEG, 5):
            ref = hf_logits(hf, idx[:, :T])
            assert ref.abs().max() > 1.0 and max_diff(model(idx[:, :T])[0], ref) < 1e-4, T
        assert max_diff(model(idx)[0][:, SEG:], hf_logits(hf, idx)[:, SEG:]) > 1e-2  # the memory is read
        set_gates(model, float("-inf"))
        logits = model(idx)[0]
        for s in range(3):
            part = slice(s * SEG, (s + 1) * SEG)
            assert max_diff(logits[:, part], hf_logits(hf, idx[:, part])) < 1e-4, s
        set_gates(model, seed=4)
        ia.save_pretrained(model, tmp_path / "ours")
        back = ia.from_pretrained(tmp_path / "ours")
        assert back.config == model.config and max_diff(back(idx)[0], model(idx)[0]) == 0
        again = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "ours")
        assert max_diff(hf_logits(again, idx[:, :SEG]), model(idx[:, :SEG])[0]) < 1e-4


def test_a_mixtrals_sliding_window_bounds_the_segment(tmp_path):
    """A segment is the whole of the local attention: it may not be longer than the window, which then never cuts
    inside it (the logits are the windowed Mixtral's on one segment). Router settings need a router."""
    hf = make_mixtral(seed=5, sliding_window=12)
    hf.save_pretrained(tmp_path / "mixtral")
    model = ia.from_pretrained(tmp_path / "mixtral")
    assert model.config.segment_len == 12
    idx = ids(320, 2, 12, seed=5)
    with torch.no_grad():
        assert max_diff(model(idx)[0], hf_logits(hf, idx)) < 1e-4
    with pytest.raises(ia.InputError, match="sliding window"):
        ia.from_pretrained(tmp_path / "mixtral", segment_len=13)
    assert ia.from_pretrained(tmp_path / "mixtral", capacity_factor=1.5).config.capacity_factor == 1.5
    make_hf(seed=1, **HF_CASES["gqa"]).save_pretrained(tmp_path / "llama")
    with pytest.raises(ia.InputError, match="router settings"):
        ia.from_pretrained(tmp_path / "llama", capacity_factor=1.5)


def test_experts_over_segments_train_the_gates_and_the_router():
    """A fresh model with experts over three segments: the loss is the cross-entropy plus the router's weighted
    terms, the gates and the routers get gradients; in eval mode the expert load adds up, one row per layer."""
    torch.manual_seed(0)
    model = ia.InfiniTransformer(ia.Config(vocab_size=100, segment_len=8, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                                           intermediate_size=64, n_expert=4, top_k_experts=2, aux_loss_coef=0.1))
    idx = ids(100, 2, 24, seed=2)
    logits, loss, s = model.train()(idx, idx)
    assert loss.item() == pytest.approx((F.cross_entropy(logits.flatten(0, 1), idx.flatten()) + 0.1 * s["balance"]
                                         + 0.001 * s["z_loss"]).item(), rel=1e-5)
    loss.backward()
    for block in model.model.layers:
        assert block.self_attn.gate.grad.abs().min() > 0
        assert block.block_sparse_moe.gate.weight.grad.abs().sum() > 0
    with torch.no_grad():
        load = sum(model.eval()(idx)[2]["load"] for _ in range(2))  # as estimate_loss sums an evaluation's
    load = torch.tensor(model.load_report(load)["expert_load"])
    assert load.shape == (2, 4) and torch.allclose(load.sum(-1), torch.ones(2))
    assert model.num_params(active=True) < model.num_params()


def test_cli_fine_tunes_a_mixtral_with_router_flags(tmp_path, monkeypatch, offline, capsys):
    """--init_from a Mixtral trains with the router's flags typed (capacity, jitter, loss weights): they reach the
    model (the checkpoint's config), the log has the router's terms and the dropped share, each eval the expert
    load. A fresh model takes experts from --n_expert; router flags on a model without experts are refused."""
    script_home(ia, tmp_path, monkeypatch)
    ckpt = tmp_path / "tiny-mixtral"
    make_mixtral(seed=9, scale=1.0).save_pretrained(ckpt)
    train_tokenizer(ckpt / "tokenizer.json", vocab_size=300)
    ia.main(["--init_from", str(ckpt), "--device", "cpu", "--segment_len", "8", "--block_size", "24",
             "--batch_size", "2", "--max_iters", "2", "--eval_interval", "2", "--eval_iters", "1", "--log_interval", "1",
             "--router_noise", "0.01", "--capacity_factor", "1.25", "--aux_loss_coef", "0.02", "--max_new_tokens", "4"])
    out = capsys.readouterr().out
    assert "4 experts, top 2, capacity 1.25" in next(l for l in out.splitlines() if l.startswith("infini_attention |"))
    assert "expert load per layer" in out and "done | 2 iters" in out
    metrics = [json.loads(l) for l in (tmp_path / "out" / "infini_attention" / "metrics.jsonl").read_text().splitlines()]
    assert any({"balance", "z_loss", "dropped"} <= set(m) for m in metrics) and any("expert_load" in m for m in metrics)
    cfg = torch.load(tmp_path / "out" / "infini_attention" / "ckpt.pt", map_location="cpu", weights_only=True)["config"]
    assert (cfg["n_expert"], cfg["router_noise"], cfg["capacity_factor"], cfg["aux_loss_coef"]) == (4, 0.01, 1.25, 0.02)
    ia.main([*TINY, "--n_expert", "4", "--top_k_experts", "1", "--segment_len", "8", "--block_size", "16",
             "--max_iters", "1", "--eval_interval", "1", "--max_new_tokens", "2", "--out_dir", str(tmp_path / "fresh")])
    assert "4 experts, top 1, dropless" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        ia.main([*TINY, "--capacity_factor", "1.0", "--max_iters", "1", "--out_dir", str(tmp_path / "dense")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "--capacity_factor" in err
