"""transformer_xl.py: no maintained reference implementation exists (transformers dropped TransfoXL), so the paper's
equations are written out here, naively, and the model is held to them: the relative shift against explicit indexing,
the attention scores against the four terms for every (i, j), the file's reference (segment_loop: the recurrence one
segment at a time) against the segments written out term by term, then the fast path (hidden: the segments side by
side) against the reference (logits, loss, memory, gradients), no gradient into the memory, decoding against the full
forward; then causality, overfitting, the optimizer groups, the saved layout and bad input. The command line, the harness and the common functions are tested in test_scripts.py / test_common.py."""
import math

import pytest
import torch
import torch.nn.functional as F

import transformer_xl as tx
from conftest import check_cached_equals_uncached, check_causal, check_overfits, ids, max_diff

pytestmark = pytest.mark.usefixtures("one_thread")
V = 300


def tiny(seed=0, std=0.1, segment_len=4, mem_len=6, **kw):
    """A random TransformerXL in eval mode, every weight but the norms' of std `std`, u and v and the biases too (so
    that the four terms all count); untied, so that greedy decoding wanders."""
    torch.manual_seed(seed)
    cfg = dict(vocab_size=V, segment_len=segment_len, mem_len=mem_len, n_layer=2, n_head=4, n_embd=32,
               tie_embeddings=False)
    model = tx.TransformerXL(tx.Config(**{**cfg, **kw}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, std)
            else:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
    return model.eval()


# ------------------------------------------------------------------------------ the paper's equations, naively

def R(distance, d):
    """R_k (section 3.3; Vaswani et al.'s sinusoid): [sin(k / 10000^(2i/d)), cos(k / 10000^(2i/d))], i < d/2."""
    i = torch.arange(d // 2, dtype=torch.float64)
    angle = distance / 10000 ** (2 * i / d)
    return torch.cat((angle.sin(), angle.cos()))


def four_terms(att, E_i, E_j, distance):
    """A^rel_{i,j} (section 3.3), term by term, for one query's and one key's hidden states (B, d): (B, H) each."""
    H, hd = att.n_head, att.head_dim
    W_q = att.q_net.weight.view(H, hd, -1)
    W_kE = att.kv_net.weight[:H * hd].view(H, hd, -1)
    W_kR = att.r_net.weight.view(H, hd, -1)
    q = torch.einsum("hkd,bd->bhk", W_q, E_i)           # W_q E_{x_i}
    k_E = torch.einsum("hkd,bd->bhk", W_kE, E_j)        # W_{k,E} E_{x_j}
    k_R = torch.einsum("hkd,d->hk", W_kR, R(distance, E_i.size(-1)).to(E_i.dtype))  # W_{k,R} R_{i-j}
    a = (q * k_E).sum(-1)
    b = (q * k_R).sum(-1)
    c = (att.u * k_E).sum(-1)
    d = (att.v * k_R).sum(-1)
    return a, b, c, d


def naive_attention(att, h, mem):
    """Relative attention of a segment h (B, L, d) over [mem; h], mem (B, P, d): query i (at position P+i of the
    concatenation) sees keys j <= P+i, at distance P+i-j; every score from four_terms, one (i, j) at a time."""
    B, L, d = h.shape
    H, hd, P = att.n_head, att.head_dim, mem.size(1)
    cat = torch.cat((mem, h), dim=1)
    W_v = att.kv_net.weight[H * hd:].view(H, hd, d)
    out = h.new_zeros(B, L, H, hd)
    for i in range(L):
        scores = torch.stack([sum(four_terms(att, h[:, i], cat[:, j], P + i - j)) for j in range(P + i + 1)], -1)
        p = (scores / math.sqrt(hd)).softmax(-1)                                      # (B, H, P+i+1)
        values = torch.einsum("hkd,bjd->bhjk", W_v, cat[:, :P + i + 1])               # (B, H, P+i+1, hd)
        out[:, i] = (p[..., None] * values).sum(2)
    return att.o_net(out.reshape(B, L, H * hd))


def naive_segment(model, idx, mems, mem_len):
    """One segment idx (B, L) after the memory mems (per layer (B, P, d), or None), the blocks written out with
    naive_attention: (final hidden states, the next memory: the last mem_len inputs of each layer)."""
    x = model.embed(idx) * model.config.n_embd ** 0.5
    new = []
    for n, block in enumerate(model.layers):
        mem = mems[n] if mems is not None else x[:, :0]
        new.append(torch.cat((mem, x), dim=1)[:, -mem_len:] if mem_len else x[:, :0])
        if model.config.pre_lnorm:
            x = x + naive_attention(block.attn, block.attn_norm(x), block.attn_norm(mem))
            x = x + block.ff(block.ff_norm(x))
        else:
            x = block.attn_norm(x + naive_attention(block.attn, x, mem))
            x = block.ff_norm(x + block.ff(x))
    return x, new


def test_rel_shift_is_explicit_indexing():
    """rel_shift moves (query i, distance column c) to (query i, key j) with c = j + L-1-i, for every key query i may
    see (j <= M+i): the released code's pad-reshape-drop trick against explicit indexing."""
    L, M = 5, 7
    x = torch.randn(2, 3, L, M + L)
    out = tx.rel_shift(x)
    expected = torch.full_like(x, float("nan"))
    for i in range(L):
        for j in range(M + i + 1):
            expected[..., i, j] = x[..., i, j + L - 1 - i]
    seen = ~expected.isnan()
    assert seen.sum() == 2 * 3 * sum(M + i + 1 for i in range(L))
    assert torch.equal(out[seen], expected[seen])
    assert not torch.equal(out, x)  # a real shift: the identity would fail above, but say it


def test_sinusoid_is_R():
    d = 32
    table = tx.sinusoid(torch.arange(9, -1, -1), d)
    for k in range(10):
        assert max_diff(table[9 - k], R(k, d)) < 1e-5


@pytest.mark.parametrize("P", [6, 3])
def test_scores_are_the_four_terms(P):
    """Attention.scores, for two segments side by side after a memory of P positions (of M = 6 slots), equals
    (a) + (b) + (c) + (d) of section 3.3 computed for every (i, j) a query may see; u, v and all four terms matter."""
    model = tiny(seed=1)
    att, L, M = model.layers[0].attn, 4, 6
    g = torch.Generator().manual_seed(0)
    h, mem = torch.randn(2, 2 * L, 32, generator=g), torch.randn(2, M, 32, generator=g)
    mem[:, :M - P] = 0.0  # slots before the given memory, as hidden() fills them (masked)
    q, k, _ = att.heads(h, torch.cat((mem, h[:, :L]), dim=1), L)  # the memory of segment 0, then of segment 1
    with torch.no_grad():
        scores = att.scores(q, k, tx.sinusoid(torch.arange(M + L - 1, -1, -1), 32))  # (B, S, H, L, M+L)
        full = torch.cat((mem, h), dim=1)
        checked, sizes = 0, torch.zeros(4)
        for s in range(2):
            for i in range(L):
                for j in range(max(0, M - P - s * L), M + i + 1):  # keys that exist and query i may see
                    terms = four_terms(att, h[:, s * L + i], full[:, s * L + j], M + i - j)
                    assert max_diff(scores[:, s, :, i, j], sum(terms) / math.sqrt(8)) < 1e-5, (s, i, j)
                    sizes += torch.stack([t.abs().mean() for t in terms])
                    checked += 1
    assert checked == sum(len(range(max(0, M - P - s * L), M + i + 1)) for s in range(2) for i in range(L))
    assert (sizes / checked > 0.05).all(), sizes / checked  # each term is a real part of the score


def naive_logits(model, idx, mems, mem_len, L=4):
    """The segments of idx one at a time through naive_segment, the memory carried: (logits, memory)."""
    out = []
    for t in range(0, idx.size(1), L):
        x, mems = naive_segment(model, idx[:, t:t + L], mems, mem_len)
        out.append(x)
    return F.linear(torch.cat(out, 1), model.lm_head.weight[:V]), mems


@pytest.mark.parametrize("pre_lnorm", [False, True])
def test_segment_loop_is_the_recurrence_written_out(pre_lnorm):
    """segment_loop, the file's reference, on three segments (no memory given), after a memory of 5
    positions (fewer than M) and with a longer memory than training's (M = 10) equals the equations
    written out here term by term (naive_segment), logits and memory; the memory is used."""
    model = tiny(seed=2, pre_lnorm=pre_lnorm)
    M = 6
    idx = ids(V, 2, 3 * 4 + 2, seed=3)  # the last segment shorter
    with torch.no_grad():
        logits, _, mems = tx.segment_loop(model, idx)
        ref, naive_mems = naive_logits(model, idx, None, M)
        assert max_diff(logits, ref) < 1e-4
        assert all(max_diff(a, b) < 1e-4 for a, b in zip(mems, naive_mems)) and mems[0].shape == (2, M, 32)
        assert max_diff(logits[:, 4:], tx.segment_loop(model, idx, mem_len=0)[0][:, 4:]) > 1e-2
        for mem_len, start in ((M, 5), (10, 9)):
            _, _, mems = tx.segment_loop(model, idx[:, :start], mem_len=mem_len)
            logits = tx.segment_loop(model, idx[:, start:], mems=mems, mem_len=mem_len)[0]
            ref = naive_logits(model, idx[:, start:], [m.clone() for m in mems], mem_len)[0]
            assert max_diff(logits, ref) < 1e-4, mem_len


CASES = {  # name: (model options, the call's options, the memory before idx: (positions, mem_len))
    "pre-norm": (dict(), dict(), None),
    "post-norm": (dict(pre_lnorm=False), dict(), None),
    "no memory": (dict(mem_len=0), dict(), None),
    "after 5 positions": (dict(), dict(), (5, 6)),
    "after 9, memory 10": (dict(), dict(mem_len=10), (9, 10)),
    "segments of 3": (dict(), dict(segment_len=3, mem_len=5), None),
}


@pytest.mark.parametrize("case", CASES)
def test_hidden_equals_segment_loop(case):
    """The fast path (forward, hidden: all segments side by side) against the reference (segment_loop:
    one segment at a time): the same logits, loss and memory, to 1e-5."""
    model_kw, kw, before = CASES[case]
    model = tiny(seed=20, **model_kw)
    idx, targets = ids(V, 2, 19, seed=21), ids(V, 2, 19, seed=22)
    targets[0, 3] = -1  # an ignored target
    mems = None
    with torch.no_grad():
        if before:
            mems = model.hidden(ids(V, 2, before[0], seed=23), mem_len=before[1])[1]
        logits, loss = model(idx, targets, mems=mems, **kw)
        h, fast_mems = model.hidden(idx, mems, **kw)
        ref_logits, ref_loss, ref_mems = tx.segment_loop(model, idx, targets, mems, **kw)
    diffs = [max_diff(logits, ref_logits), (loss - ref_loss).abs().item()]
    diffs += [max_diff(a, b) for a, b in zip(fast_mems, ref_mems) if a.numel()]  # mem_len 0: empty
    print(f"{case}: max abs difference {max(diffs):.2e} (logits {diffs[0]:.2e}, loss {diffs[1]:.2e})")
    assert [m.shape for m in fast_mems] == [m.shape for m in ref_mems]
    assert max(diffs) < 1e-5


def test_sliding_equals_segment_loop_of_one_token():
    """hidden's sliding mask (decoding's prefill, segments of 4) gives what the reference gives with
    segments of one token: each position sees the M positions before it and itself."""
    model = tiny(seed=24)
    idx, M = ids(V, 2, 23, seed=25), 9
    with torch.no_grad():
        h, mems = model.hidden(idx, None, 4, M, sliding=True)
        logits, _, ref_mems = tx.segment_loop(model, idx, segment_len=1, mem_len=M)
    assert max_diff(F.linear(h, model.lm_head.weight[:V]), logits) < 1e-5
    assert all(max_diff(a, b) < 1e-5 for a, b in zip(mems, ref_mems))


@pytest.mark.parametrize("pre_lnorm, mem_len", [(True, 6), (False, 6), (True, 0)])
def test_gradients_equal_the_recurrence_with_stopped_memory(pre_lnorm, mem_len):
    """SG(h_{tau-1}) (section 3.2): the gradient of every parameter from a window of three segments
    run side by side (forward) equals that of segment_loop (one segment at a time) and that of the
    recurrence written out here (naive_segment, each segment's memory detached before the next), each
    layer's memory normed inside the layer (pre-norm: the norm learns from the memory positions too,
    as the released code's layer_norm(cat(mems, w))); to 1e-6 relative, float64. The memory handed on
    is detached."""
    model = tiny(seed=4, pre_lnorm=pre_lnorm, mem_len=mem_len).double().train()
    L, T = 4, 12
    idx, targets = ids(V, 2, T, seed=5), ids(V, 2, T, seed=6)

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}
    fast = grads(model(idx, targets)[1])
    ref = grads(tx.segment_loop(model, idx, targets)[1])
    total, mems = 0.0, None
    for t in range(0, T, L):  # the recurrence: one segment, then its detached memory handed on
        x, mems = naive_segment(model, idx[:, t:t + L], mems, mem_len)
        mems = [m.detach() for m in mems]
        logits = model.lm_head(x)[..., :V]
        total = total + F.cross_entropy(logits.flatten(0, 1), targets[:, t:t + L].flatten(), reduction="sum")
    naive = grads(total / targets.numel())
    worst = 0.0
    for name, g in naive.items():
        assert g.abs().max() > 0 or name == "lm_head.weight", name  # every parameter learns
        scale = g.abs().max().item() or 1.0
        worst = max(worst, max_diff(fast[name], g) / scale, max_diff(ref[name], g) / scale)
    print(f"max relative gradient difference: {worst:.2e}")
    assert worst < 1e-6
    if mem_len:
        assert not any(m.requires_grad for m in model.hidden(idx)[1])
        assert not any(m.requires_grad for m in tx.segment_loop(model, idx)[2])


def test_decoding_equals_the_full_forward():
    """Decoding: each new token a segment of one, its memory the cache; the logits of every step equal those of the
    whole text run at once (its one-token segments side by side), and the cache stays mem_len positions long."""
    model = tiny(seed=6)
    idx = ids(V, 2, 20, seed=7)
    M = 7
    with torch.no_grad():
        full = model.lm_head(model.hidden(idx, None, 1, M)[0])
        x, mems = model.hidden(idx[:, :5], None, 1, M)
        steps = [model.lm_head(x)]
        for t in range(5, 20):
            x, mems = model.hidden(idx[:, t:t + 1], mems, 1, M)
            steps.append(model.lm_head(x))
            assert all(m.shape == (2, min(t + 1, M), 32) for m in mems)
    assert max_diff(torch.cat(steps, 1), full) < 1e-4


def test_cached_generation_equals_uncached():
    check_cached_equals_uncached(tiny(seed=8), V, prompt_len=5, new_tokens=24)


def test_causal():
    check_causal(tiny(seed=9), V, t=13, T=32)


def test_overfits_one_batch():
    torch.manual_seed(0)
    model = tx.TransformerXL(tx.Config(vocab_size=V, segment_len=8, mem_len=8, n_layer=2, n_head=4, n_embd=32))
    check_overfits(model, V)


def test_training_learns_to_read_the_memory():
    """The default model (pre-norm), trained at the presets' learning rate on windows of three copies of a random
    segment, predicts a segment from its memory: well below chance with the memory, no better than chance without
    it. (Post-norm, --no-pre_lnorm, is still at 1.8 after these steps: it learns more slowly at this learning rate.)"""
    torch.manual_seed(0)
    L, vocab = 8, 32
    model = tx.TransformerXL(tx.Config(vocab_size=vocab, segment_len=L, mem_len=L, n_layer=2, n_head=2, n_embd=32))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        x = torch.randint(vocab, (16, L)).repeat(1, 3)  # [a; a; a]: segments 2 and 3 are copies of the one before
        loss = model(x[:, :-1], x[:, 1:])[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x = torch.randint(vocab, (64, L)).repeat(1, 2)
    with torch.no_grad():  # the second segment's predictions, each token's copy being in the memory only
        _, mems = model.hidden(x[:, :L])
        with_memory = model(x[:, L:-1], x[:, L + 1:], mems=mems)[1]
        without = model(x[:, L:-1], x[:, L + 1:], mem_len=0)[1]
    assert with_memory < 1.0 < math.log(vocab) - 0.5 < without, (with_memory.item(), without.item())


def test_stream_loss_carries_the_memory_across_windows():
    """stream_loss reads the text as parallel streams with the memory carried from window to window: windows of one
    segment give the loss of windows of four (the recurrence is the same); no memory gives another loss."""
    model = tiny(seed=10, std=0.05)
    tokens = ids(V, 1, 400, seed=11)[0].numpy()
    ctx = torch.autocast("cpu", enabled=False)
    a, b = (tx.stream_loss(model, tokens, 3, window, 6, ctx) for window in (4, 16))
    assert a == pytest.approx(b, abs=1e-5)
    assert abs(tx.stream_loss(model, tokens, 3, 16, 0, ctx) - a) > 1e-3


def test_save_pretrained_round_trip(tmp_path):
    """save_pretrained writes config.json and model.safetensors; from_pretrained reads them back to the same logits,
    tied or not; another model_type is refused."""
    for tie in (False, True):
        model = tiny(seed=12, tie_embeddings=tie, pre_lnorm=tie)
        tx.save_pretrained(model, tmp_path / str(tie))
        back = tx.from_pretrained(tmp_path / str(tie))
        assert not back.training and back.config == model.config
        assert (back.lm_head.weight is back.embed.weight) == tie
        idx = ids(V, 2, 17, seed=13)
        with torch.no_grad():
            assert max_diff(model(idx)[0], back(idx)[0]) == 0.0
    config = (tmp_path / "False" / "config.json")
    config.write_text(config.read_text().replace('"transformer_xl"', '"llama"'))
    with pytest.raises(tx.InputError, match="not this file's Transformer-XL"):
        tx.from_pretrained(tmp_path / "False")


@pytest.mark.parametrize("bad, message", [
    (dict(segment_len=0), "segment_len must be positive"),
    (dict(mem_len=-1), "must not be negative"),
    (dict(n_embd=30, n_head=4), "multiple of n_head"),
    (dict(dropout=1.0), "dropout must be in"),
])
def test_bad_config(bad, message):
    with pytest.raises(tx.InputError, match=message):
        tx.Config(**{**dict(n_embd=32, n_head=4), **bad})


def expected_groups(model):
    """The groups as the old rule gave them (decay: >= 2-D; Muon: 2-D but the tables), u and v out."""
    tables = ("embed.weight", "lm_head.weight")
    groups = {}
    for name, p in model.named_parameters():
        if name.endswith((".u", ".v")) or p.dim() < 2:
            groups[name] = "no_decay"
        else:
            groups[name] = "decay" if name in tables else "muon"
    return groups


def test_optimizer_groups_by_name(tmp_path):
    """optimizer_groups names every parameter's group: the blocks' matrices "muon", the embedding and
    an untied head "decay", biases, norms and u, v (2-D, but the global biases of terms (c) and (d))
    "no_decay"; the same in a fresh model, one from from_pretrained and one after
    load_state_dict(assign=True), which puts in new Parameters (no attribute survives)."""
    for tie in (False, True):
        model = tiny(seed=14, tie_embeddings=tie)
        tx.save_pretrained(model, tmp_path / str(tie))
        assigned = tiny(seed=15, tie_embeddings=tie)
        assigned.load_state_dict(model.state_dict(), assign=True)
        for m in (model, tx.from_pretrained(tmp_path / str(tie)), assigned):
            groups = m.optimizer_groups()
            assert groups == expected_groups(m)
            assert groups["layers.1.attn.u"] == groups["layers.0.attn.v"] == "no_decay"
            assert groups["layers.0.attn.r_net.weight"] == "muon"
            assert groups["embed.weight"] == "decay"
            assert groups.get("lm_head.weight", "decay") == "decay"  # tied: named once, as embed
        if tie:
            assert "lm_head.weight" not in model.optimizer_groups()  # tied: named once, as embed


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_u_and_v_are_not_decayed(tmp_path, optimizer):
    """configure_optimizer follows optimizer_groups: u and v on AdamW without weight decay (the
    released code: Adam, no decay), in a fresh model and in one from_pretrained loaded."""
    import inspect
    from types import SimpleNamespace
    if "optimizer_groups" not in inspect.getsource(tx.configure_optimizer):
        pytest.skip("configure_optimizer does not read optimizer_groups yet (the harness's change)")
    args = SimpleNamespace(optimizer=optimizer, weight_decay=0.1, lr=1e-3)
    tx.save_pretrained(tiny(seed=14), tmp_path)
    for model in (tiny(seed=14), tx.from_pretrained(tmp_path)):
        biases = {id(p) for block in model.layers for p in (block.attn.u, block.attn.v)}
        seen = 0
        for opt in tx.configure_optimizer(model, args, torch.device("cpu")):
            for group in opt.param_groups:
                for p in group["params"]:
                    if id(p) in biases:
                        assert isinstance(opt, torch.optim.AdamW) and group["weight_decay"] == 0
                        seen += 1
        assert seen == 4


def test_odd_width_and_the_last_dropout():
    """n_embd 129 over 3 heads: R keeps 129 columns (the sinusoid's first 129) and the model runs; the final hidden
    states go through dropout in training, as the released code's last self.drop (zeros where there were none)."""
    model = tx.TransformerXL(tx.Config(vocab_size=V, segment_len=4, mem_len=4, n_layer=1, n_head=3, n_embd=129))
    assert tx.sinusoid(torch.arange(5), 129).shape == (5, 129)
    assert model.generate(ids(V, 1, 6), 3, temperature=0.0).shape == (1, 9)
    model = tiny(seed=15, dropout=0.5).train()
    h = model.hidden(ids(V, 2, 16))[0]
    assert 0.3 < (h == 0).float().mean() < 0.7


def test_prefill_in_segments_equals_one_token_segments(monkeypatch):
    """generate feeds the prompt as segments of segment_len with the sliding mask: the hidden states and memory of
    one-token segments (what decoding is), the same greedy tokens as without the cache, and keys of at most
    ceil(T / L) (M + L) positions per layer rather than T (M + 1)."""
    model = tiny(seed=16, segment_len=4, mem_len=6)
    idx, M = ids(V, 2, 30, seed=17), 9  # generate's memory: mem_len + segment_len - 1
    with torch.no_grad():
        h1, m1 = model.hidden(idx, None, 1, M)
        h4, m4 = model.hidden(idx, None, 4, M, sliding=True)
    assert max_diff(h1, h4) < 1e-5 and all(max_diff(a, b) < 1e-5 for a, b in zip(m1, m4))
    keys, heads = [], tx.Attention.heads

    def spy(self, h, past, L):
        q, k, v = heads(self, h, past, L)
        keys.append(k.size(1) * k.size(3))  # segments x keys per segment
        return q, k, v
    monkeypatch.setattr(tx.Attention, "heads", spy)
    cached = model.generate(idx, 5, temperature=0.0)
    assert keys[0] <= math.ceil(30 / 4) * (M + 4) < 30 * (M + 1), keys[0]
    monkeypatch.undo()
    assert torch.equal(cached, model.generate(idx, 5, temperature=0.0, use_cache=False))
