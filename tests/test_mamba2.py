"""mamba2.py at the model level: HF parity (chunk sizes that do and do not divide T, ngroups 1 and > 1, headdim,
d_state, conv width, biases), greedy generation against transformers', checkpoint formats (sharded, bf16, the hub,
the GPT-NeoX tokenizer.json beside it) and refusals; the SSD (the fast ssd_chunked and the reference ssd_loop against
the recurrence written out in float64, from zeros and from a carried state, their gradients, ssd_quadratic's matrix
form, the segment sums' stability); recurrent decoding against the full forward (in place, no conv1d call), its
constant-size state, causality, training, the optimizer groups by name, save_pretrained into transformers."""
import json
import math

import pytest
import safetensors.torch
import torch
import transformers

import mamba2
from conftest import (check_cached_equals_uncached, check_causal, check_greedy_matches_hf, check_overfits,
                      check_scan_and_loop_match_hf, check_variant_refused, hf_logits, ids, max_diff, randomize,
                      script_home, serve_hub, train_tokenizer)

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
pytestmark = pytest.mark.usefixtures("one_thread")

# name: Mamba2Config arguments on top of BASE (T = 64 in the parity test)
HF_CASES = {
    "base_chunk16": dict(),                                                  # 4 heads x 16, N 8, G 1: Q divides T
    "chunk24_groups2": dict(chunk_size=24, n_groups=2),                      # Q does not divide T; 2 heads a group
    "headdim8_n4_groups4_chunk7": dict(num_heads=8, head_dim=8, state_size=4, n_groups=4, chunk_size=7),
    "n16_conv2_biases_chunk64": dict(state_size=16, conv_kernel=2, use_bias=True, use_conv_bias=False, chunk_size=64),
    "expand3_3layers_odd_vocab": dict(expand=3, num_heads=6, num_hidden_layers=3, vocab_size=1000, chunk_size=10),
}
BASE = dict(vocab_size=320, hidden_size=32, state_size=8, num_hidden_layers=2, num_heads=4, head_dim=16, n_groups=1,
            chunk_size=16, tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None)


def make_hf(seed=0, scale=2.0, **kw):
    """A random Mamba2ForCausalLM in eval mode: weights times `scale` (logits of order 1 to 10), norm gains random
    around 1, and the SSM's own parameters off their init so that a sign or discretisation error shows: A_log of both
    signs (A from -0.2 to -7 per head), D random, Delta's bias for steps of about 0.05 to 3."""
    torch.manual_seed(seed)
    hf = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(**{**BASE, **kw}))
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight") or name.endswith("norm_f.weight"):
                p.copy_(torch.randn_like(p) * 0.1 + 1.0)
            elif name.endswith("A_log"):
                p.copy_(torch.randn_like(p))
            elif name.endswith("dt_bias"):
                p.normal_(-1.0, 1.0)
            elif name.endswith(".D"):
                p.normal_(0.0, 1.0)
            else:
                p.mul_(scale)
    return hf.eval()


def tiny(seed=0, vocab=300, n_layer=2, n_embd=32, d_state=8, headdim=16, **kw):
    """A random mamba2.Mamba2 in eval mode with weights large enough that greedy decoding wanders."""
    torch.manual_seed(seed)
    model = randomize(mamba2.Mamba2(mamba2.Config(vocab_size=vocab, block_size=32, n_layer=n_layer, n_embd=n_embd,
                                                  d_state=d_state, headdim=headdim, **kw)), std=0.3)
    with torch.no_grad():
        for block in model.backbone.layers:
            block.mixer.dt_bias.normal_(-1.0, 1.0)
    return model


# ------------------------------------------------------------------------------------ HF parity

@pytest.mark.parametrize("case", HF_CASES)
def test_logits_match_hf(case, tmp_path):
    """The loaded model gives transformers' logits (its PyTorch path: the chunked scan of Listing 1), with the
    chunked SSD and with the loop over time."""
    hf = make_hf(seed=len(case), **HF_CASES[case])
    hf.save_pretrained(tmp_path)
    model = mamba2.from_pretrained(tmp_path)
    assert not model.training
    cfg, hc = model.config, hf.config
    assert (cfg.n_layer, cfg.n_embd, cfg.d_state, cfg.expand, cfg.headdim, cfg.n_head, cfg.ngroups, cfg.d_conv,
            cfg.chunk_size, cfg.conv_bias, cfg.bias, cfg.vocab_size) == (
        hc.num_hidden_layers, hc.hidden_size, hc.state_size, hc.expand, hc.head_dim, hc.num_heads, hc.n_groups,
        hc.conv_kernel, hc.chunk_size, hc.use_conv_bias, hc.use_bias, hc.vocab_size)
    assert model.lm_head.weight is model.backbone.embeddings.weight
    check_scan_and_loop_match_hf(model, hf, cfg.vocab_size)


@pytest.mark.parametrize("case", ["base_chunk16", "chunk24_groups2"])
def test_greedy_generation_matches_hf(case, tmp_path):
    """HF's generate decodes with its own conv and SSM caches (one-token updates): the same tokens."""
    hf = make_hf(seed=7, **HF_CASES[case])
    hf.save_pretrained(tmp_path)
    check_greedy_matches_hf(mamba2.from_pretrained(tmp_path), hf, 320, 24)


def test_sharded_bf16_and_old_name_checkpoints(tmp_path):
    """Shards, a bf16 file (read into float32 or kept in bf16), the original repos' 'backbone.embedding.weight', and a
    file that stores the tied head as well."""
    hf = make_hf(seed=4)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) >= 3
    idx = ids(320, 2, 40)
    ref = hf_logits(hf, idx)
    with torch.no_grad():
        assert max_diff(mamba2.from_pretrained(tmp_path / "sharded")(idx)[0], ref) < 1e-4

    hf.save_pretrained(tmp_path / "old")
    weights = mamba2.read_safetensors(tmp_path / "old" / "model.safetensors")
    weights = {k.replace("backbone.embeddings.", "backbone.embedding."): v.clone() for k, v in weights.items()}
    weights["lm_head.weight"] = weights["backbone.embedding.weight"].clone()
    safetensors.torch.save_file(weights, str(tmp_path / "old" / "model.safetensors"))
    with torch.no_grad():
        assert max_diff(mamba2.from_pretrained(tmp_path / "old")(idx)[0], ref) < 1e-4

    hf.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    hf = transformers.Mamba2ForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32).eval()
    model = mamba2.from_pretrained(tmp_path / "bf16")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    with torch.no_grad():
        assert max_diff(model(idx)[0], hf_logits(hf, idx)) < 1e-4
        logits16 = mamba2.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)(idx)[0]
    assert logits16.dtype == torch.bfloat16
    assert max_diff(logits16.float(), hf_logits(hf, idx)) < 0.1 * hf_logits(hf, idx).abs().max().item()


@pytest.fixture
def server(http_server, monkeypatch, tmp_path):
    return serve_hub(mamba2, http_server, monkeypatch, tmp_path / "cache")


def test_hub_checkpoint_with_its_neox_tokenizer(server, tmp_path, monkeypatch, capsys):
    """A sharded hub repo (as AntonV/mamba2-130m-hf, a GPT-NeoX-style tokenizer.json beside the weights) loads with
    from_pretrained; --init_from it --sample_only samples through that tokenizer: the prompt's text comes back."""
    hf = make_hf(seed=2, vocab_size=640)
    repo = server.root / "someorg" / "tiny-mamba2" / "resolve" / "main"
    hf.save_pretrained(repo, max_shard_size="20KB")
    train_tokenizer(repo / "tokenizer.json", "gpt2", normalizer="NFC")  # 600 tokens, GPT-NeoX's pre-tokenizer
    model = mamba2.from_pretrained("someorg/tiny-mamba2")
    idx = ids(640, 2, 32)
    with torch.no_grad():
        assert max_diff(model(idx)[0], hf_logits(hf, idx)) < 1e-4
    cached = mamba2.CACHE_DIR / "someorg" / "tiny-mamba2"
    assert len(list(cached.glob("model-*.safetensors"))) >= 3 and (cached / "tokenizer.json").exists()
    script_home(mamba2, tmp_path / "home", monkeypatch)
    capsys.readouterr()
    mamba2.main(["--init_from", "someorg/tiny-mamba2", "--sample_only", "--device", "cpu", "--prompt", "To be or not",
                 "--max_new_tokens", "5", "--temperature", "0"])
    out = capsys.readouterr().out
    assert "tokenizer " + str(cached / "tokenizer.json") in out
    assert "--- sample from someorg/tiny-mamba2 ---\nTo be or not" in out
    with pytest.raises(mamba2.InputError, match="cannot fetch"):
        mamba2.from_pretrained("someorg/nothing-here")


@pytest.mark.parametrize("change", [dict(model_type="mamba"), dict(hidden_act="gelu"), dict(norm_before_gate=True),
                                    dict(num_heads=8), dict(tie_word_embeddings=False),
                                    dict(time_step_limit="none")])
def test_variants_are_refused(tmp_path, change):
    """Refused with one line: another model type, activation, norm order, head count, an untied head (the file has no
    lm_head.weight of its own then), a time_step_limit that is not two numbers."""
    check_variant_refused(mamba2, make_hf(seed=0), tmp_path, change)


def test_bad_weights_are_refused(tmp_path):
    """A tensor missing, of the wrong shape, or unexpected: one InputError line each."""
    make_hf(seed=0).save_pretrained(tmp_path)
    weights = {k: v.clone() for k, v in mamba2.read_safetensors(tmp_path / "model.safetensors").items()}
    a_log = "backbone.layers.1.mixer.A_log"
    cases = [({k: v for k, v in weights.items() if k != "backbone.layers.1.mixer.D"}, "lacks"),
             ({**weights, a_log: weights[a_log][:2].contiguous()}, "shape"),
             ({**weights, "backbone.layers.2.mixer.D": weights["backbone.layers.1.mixer.D"].clone()}, "unexpected")]
    for tensors, message in cases:
        safetensors.torch.save_file(tensors, str(tmp_path / "model.safetensors"))
        with pytest.raises(mamba2.InputError, match=message) as e:
            mamba2.from_pretrained(tmp_path)
        assert "\n" not in str(e.value)


def test_transformers_loads_what_we_save(tmp_path):
    """save_pretrained: Mamba2ForCausalLM reads it with the same logits, and from_pretrained reads it back."""
    model = tiny(seed=3, ngroups=2, chunk_size=16)
    mamba2.save_pretrained(model, tmp_path)
    hf = transformers.Mamba2ForCausalLM.from_pretrained(tmp_path).eval()
    idx = ids(300, 2, 40, seed=1)
    with torch.no_grad():
        ours = model(idx)[0]
        assert max_diff(ours, hf(idx).logits[..., :300]) < 1e-4
        assert max_diff(ours, mamba2.from_pretrained(tmp_path)(idx)[0]) < 1e-6


# ------------------------------------------------------------------------------------- the SSD

def ssd_inputs(T, seed=0, b=2, H=4, P=3, G=2, N=5):
    """ssd's inputs as a Mamba-2 layer makes them: Delta = softplus(.) (about 0.005 to 5), A = -exp(A_log) per head
    from -0.2 to -5, x, B, C of order 1 (B and C per group of H / G heads), D of both signs; and a state h0."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, T, H, P, generator=g)
    dt = torch.nn.functional.softplus(2 * torch.randn(b, T, H, generator=g) - 1)
    A = -torch.exp(torch.randn(H, generator=g))
    B, C = torch.randn(b, T, G, N, generator=g), torch.randn(b, T, G, N, generator=g)
    D = torch.randn(H, generator=g)
    return (x, dt, A, B, C, D), torch.randn(b, H, P, N, generator=g)


def recurrence(x, dt, A, B, C, D, h0=None):
    """Section 7.1's SSM as written, a head at a time, in float64: h_t = exp(Delta_t A) h_{t-1} + Delta_t x_t B_t^T,
    y_t = h_t C_t + D x_t, each head reading its group's B and C. Returns y and the last h."""
    x, dt, A, B, C, D = (t.double() for t in (x, dt, A, B, C, D))
    b, T, H, P = x.shape
    R = H // B.size(2)
    h = torch.zeros(b, H, P, B.size(-1), dtype=torch.float64) if h0 is None else h0.double().clone()
    ys = []
    for t in range(T):
        for i in range(H):
            h[:, i] = torch.exp(dt[:, t, i] * A[i])[:, None, None] * h[:, i] \
                + (dt[:, t, i, None] * x[:, t, i])[:, :, None] * B[:, t, i // R, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", h, C[:, t].repeat_interleave(R, 1)) + D[:, None] * x[:, t])
    return torch.stack(ys, 1), h


@pytest.mark.parametrize("from_h0", [False, True])
@pytest.mark.parametrize("T", [1, 7, 64, 1000])
def test_ssd_equals_the_recurrence(T, from_h0):
    """The reference ssd_loop and the fast ssd_chunked (chunks of 16: T = 7 is one short chunk, 1000 = 62.5 chunks)
    give the float64 recurrence's outputs and last state within 1e-5, from zeros or from a carried state (which then
    matters); from zeros, ssd_quadratic's one masked matrix gives the same y."""
    inputs, h0 = ssd_inputs(T, seed=T)
    h0 = h0 if from_h0 else None
    y_ref, h_ref = recurrence(*inputs, h0=h0)
    assert y_ref.abs().max() > 1.0 and h_ref.abs().max() > 1.0
    start = (lambda: None) if h0 is None else h0.clone
    for name, y, h in [("loop", *mamba2.ssd_loop(*inputs, h0=start())),
                       ("chunked", *mamba2.ssd_chunked(*inputs, 16, h0=start()))]:
        assert y.shape == (2, T, 4, 3) and h.shape == (2, 4, 3, 5) and y.dtype == torch.float32
        assert max_diff(y, y_ref) < 1e-5 and max_diff(h, h_ref) < 1e-5, name
    if from_h0:
        assert max_diff(y[:, 0], mamba2.ssd_chunked(*inputs, 16)[0][:, 0]) > 1e-2
    elif T <= 64:  # T x T matrices
        assert max_diff(mamba2.ssd_quadratic(*inputs), y_ref) < 1e-5


@pytest.mark.parametrize("Q", [1, 5, 64, 300])
def test_chunk_size_changes_nothing(Q):
    """Any chunk size (one step, not a divisor, the whole sequence, longer than it) gives the same y and state."""
    inputs, h0 = ssd_inputs(200, seed=1)
    y_ref, h_ref = mamba2.ssd_loop(*inputs, h0=h0.clone())
    y, h = mamba2.ssd_chunked(*inputs, Q, h0=h0.clone())
    assert max_diff(y, y_ref) < 1e-5 and max_diff(h, h_ref) < 1e-5


def test_ssd_gradients_equal_the_loops():
    """Autograd through ssd_chunked gives ssd_loop's gradients for every input and the initial state."""
    inputs, h0 = ssd_inputs(50, seed=3)
    w = torch.randn(2, 50, 4, 3)
    grads = []
    for ssd in (lambda *a, h0: mamba2.ssd_chunked(*a, 16, h0=h0), mamba2.ssd_loop):
        leaves = [t.clone().requires_grad_() for t in (*inputs, h0)]
        y, h = ssd(*leaves[:6], h0=leaves[6] * 1.0)
        ((y * w).sum() + h.square().sum()).backward()
        grads.append([t.grad for t in leaves])
    for name, a, b in zip(("x", "dt", "A", "B", "C", "D", "h0"), *grads):
        assert max_diff(a, b) < 1e-4 * max(1.0, b.abs().max().item()), name


def test_segsum_is_stable():
    """segsum's S_ij = a_{j+1} + ... + a_i by masked cumulative sums: exact in float32 for a step of -1e-3 after a
    step of -1e4, where the difference of cumulative sums is 2% off (float32 steps by 1e-3 near -1e4); -inf above the
    diagonal, 0 on it; and the chunked SSD stays finite and right where decays underflow (Delta A down to -60)."""
    a = torch.tensor([-1e4, -1e-3, -1e-3, -2.0])
    S = mamba2.segsum(a)
    cs = a.cumsum(0)
    assert S[2, 1].item() == pytest.approx(-1e-3, rel=1e-6)
    assert abs((cs[2] - cs[1]).item() + 1e-3) > 2e-5  # the difference: -0.000977, 2% off
    assert S[3, 0].item() == pytest.approx(-2.002, rel=1e-6)
    assert torch.isinf(S.triu(1)[S.triu(1) != 0]).all() and S.diagonal().eq(0).all()
    assert torch.isneginf(S[0, 1])
    (x, dt, A, B, C, D), h0 = ssd_inputs(500, seed=5)
    dt = dt * 12  # some steps' exp(Delta A) underflow to 0
    y, h = mamba2.ssd_chunked(x, dt, A, B, C, D, 128, h0=h0.clone())
    y_ref, h_ref = recurrence(x, dt, A, B, C, D, h0=h0)
    assert torch.isfinite(y).all() and max_diff(y, y_ref) < 1e-4 * y_ref.abs().max() and max_diff(h, h_ref) < 1e-4


# ------------------------------------------------------------------------------------- recurrent decoding

@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("d_conv", [4, 1])
def test_recurrent_decoding_equals_full_forward(d_conv, parallel):
    """A prompt through the SSD leaves each layer's state; then single tokens and chunks continue from it (the chunked
    SSD from a non-zero state) and give the full forward's logits at every position."""
    model = tiny(seed=3, d_conv=d_conv, ngroups=2, chunk_size=8)
    idx = ids(300, 2, 40, seed=4)
    states = [mamba2.Mamba2State() for _ in model.backbone.layers]
    with torch.no_grad():
        full = model(idx)[0]
        for a, b in [(0, 10), (10, 11), (11, 12), (12, 29), (29, 30), (30, 40)]:
            part = model(idx[:, a:b], states=states, parallel=parallel)[0]
            assert part.shape == (2, b - a, 300)
            assert max_diff(part, full[:, a:b]) < 1e-4, (a, b)


@pytest.mark.parametrize("prompt_len, new_tokens", [(5, 12), (8, 40)])  # the second runs past block_size 32
def test_cached_generation_equals_uncached(prompt_len, new_tokens):
    check_cached_equals_uncached(tiny(seed=1), 300, prompt_len, new_tokens)


def test_state_size_is_constant_and_steps_are_in_place(monkeypatch):
    """300 tokens one by one with block_size 32 (there are no positions), after a prompt of 3 chunks: no conv1d call,
    both state tensors keep their storage and shapes from the 10th token to the 300th, hold state_bytes per sequence
    (their storage too: no view into the prompt's chunk states), and the logits still equal the full forward's."""
    model = tiny(seed=4, n_embd=16, d_state=4, headdim=8, chunk_size=4)
    idx = ids(300, 2, 300, seed=8)
    states = [mamba2.Mamba2State() for _ in model.backbone.layers]
    with torch.no_grad():
        full = model(idx)[0]
        model(idx[:, :10], states=states)
        shapes = [(s.conv.shape, s.ssm.shape) for s in states]
        storage = [(s.conv.data_ptr(), s.ssm.data_ptr()) for s in states]
        assert shapes[0] == ((2, 3, 32 + 2 * 4), (2, 4, 8, 4))  # (B, d_conv - 1, conv_dim), (B, H, P, N)
        monkeypatch.setattr(mamba2.F, "conv1d", None)  # a call would fail
        steps = torch.cat([model(idx[:, t:t + 1], states=states)[0] for t in range(10, 300)], 1)
    assert [(s.conv.shape, s.ssm.shape) for s in states] == shapes
    assert [(s.conv.data_ptr(), s.ssm.data_ptr()) for s in states] == storage
    held = sum(s.conv.untyped_storage().nbytes() + s.ssm.untyped_storage().nbytes() for s in states)  # not views
    assert held == 2 * model.state_bytes(4) == 2 * 2 * (3 * 40 + 32 * 4) * 4  # of the prompt's chunk states
    assert max_diff(steps, full[:, 10:]) < 1e-4


# ------------------------------------------------------------------------------------- causality, training, config

@pytest.mark.parametrize("t", [1, 7, 20, 31])
def test_causality(t):
    check_causal(tiny(seed=5, chunk_size=8), 300, t)


def test_overfit_one_batch():
    torch.manual_seed(0)
    check_overfits(mamba2.Mamba2(mamba2.Config(vocab_size=100, block_size=32, n_layer=2, n_embd=32, d_state=8,
                                               headdim=16, chunk_size=8)), 100)


def test_optimizer_groups_by_name(tmp_path):
    """optimizer_groups names every parameter: in_proj and out_proj "muon", the tied embedding and conv1d's 3-D kernels
    "decay", the biases, norms, A_log, D and dt_bias "no_decay" (the old rank rule's outcome for each), the same for a
    fresh model and one from_pretrained (load_state_dict(assign=True), which drops attributes)."""
    kinds = {"embeddings.weight": "decay", "conv1d.weight": "decay", "in_proj.weight": "muon",
             "out_proj.weight": "muon", "conv1d.bias": "no_decay", "in_proj.bias": "no_decay",
             "out_proj.bias": "no_decay", "dt_bias": "no_decay", "A_log": "no_decay", "D": "no_decay",
             "norm.weight": "no_decay", "norm_f.weight": "no_decay"}
    model = tiny(seed=0, bias=True)
    mamba2.save_pretrained(model, tmp_path)
    for m in (model, mamba2.from_pretrained(tmp_path)):
        params = dict(m.named_parameters())
        groups = m.optimizer_groups()
        assert groups.keys() == params.keys() and "lm_head.weight" not in groups  # tied: one parameter
        for name, group in groups.items():
            leaf = name.split(".")[-1] if name.split(".")[-1] in kinds else ".".join(name.split(".")[-2:])
            assert group == kinds[leaf], name
            old = "no_decay" if params[name].dim() < 2 else "decay" if "embeddings" in name or params[name].dim() > 2 \
                else "muon"
            assert group == old, name
    assert set(groups.values()) == {"muon", "decay", "no_decay"}


def test_config_heads_and_refusals():
    """Heads are d_inner / headdim; a headdim that does not divide d_inner, ngroups that do not divide the heads, and a
    time_step_limit upside down are one line of bad input each."""
    cfg = mamba2.Config(n_embd=48, expand=2, headdim=24, ngroups=2, d_state=16)
    assert (cfg.d_inner, cfg.n_head, cfg.conv_dim) == (96, 4, 96 + 2 * 2 * 16)
    for kw, message in [(dict(headdim=40), "multiple of headdim"), (dict(headdim=24, ngroups=3), "ngroups"),
                        (dict(dt_limit_min=1.0, dt_limit_max=0.5), "dt_limit"), (dict(chunk_size=0), "chunk_size")]:
        with pytest.raises(mamba2.InputError, match=message):
            mamba2.Config(**{**dict(n_embd=48, headdim=24), **kw})
    model = mamba2.Mamba2(mamba2.Config(vocab_size=100, n_layer=2, n_embd=32, d_state=8, headdim=16))
    A = -torch.exp(model.backbone.layers[0].mixer.A_log)
    dt = torch.nn.functional.softplus(model.backbone.layers[0].mixer.dt_bias)
    assert A.shape == (4,) and (-16 <= A).all() and (A <= -1).all()  # mamba_ssm's A_init_range (1, 16)
    assert (dt >= 1e-3 * 0.999).all() and (dt <= 0.1 * 1.001).all()
    assert json.loads(json.dumps(mamba2.Config().dt_limit_max)) == math.inf


def test_n_head_with_a_loaded_model(tmp_path, monkeypatch, offline, capsys):
    """--n_head with --init_from an HF directory: the model's own heads pass, others are one line of bad input (not
    silently ignored)."""
    make_hf(seed=0).save_pretrained(tmp_path / "hf")
    script_home(mamba2, tmp_path / "home", monkeypatch)
    argv = ["--init_from", str(tmp_path / "hf"), "--sample_only", "--device", "cpu", "--max_new_tokens", "2"]
    mamba2.main([*argv, "--n_head", "4"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        mamba2.main([*argv, "--n_head", "2"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--n_head 2 does not match" in err and len(err.strip().splitlines()) == 1, err


def test_residual_in_fp32(tmp_path):
    """residual_in_fp32 (every released config), as mamba.py: with bf16 weights the residual stream, each block's
    output, is float32 (bf16 with residual_in_fp32 false, read from config.json), and the logits are nearer the
    float32 model's; save_pretrained writes the field."""
    hf = make_hf(seed=4, num_hidden_layers=6)
    hf.save_pretrained(tmp_path)
    idx = ids(320, 2, 40)
    with torch.no_grad():
        ref = hf_logits(hf, idx)
    errors = {}
    for fp32 in (True, False):
        config = json.loads((tmp_path / "config.json").read_text())
        (tmp_path / "config.json").write_text(json.dumps({**config, "residual_in_fp32": fp32}))
        model = mamba2.from_pretrained(tmp_path, dtype=torch.bfloat16)
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
    mamba2.save_pretrained(model, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["residual_in_fp32"] is False
