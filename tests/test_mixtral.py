"""mixtral.py at the model level: HF parity (expert counts, top-k, GQA, sliding window), checkpoint formats, the
sparse MoE's dispatch against a plain per-expert loop, capacity mode, the router's auxiliary losses, the rolling-
buffer KV cache, causality, training; and the command line (the common command-line tests are in test_scripts.py)."""
import json
import math

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
import transformers
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

import mixtral
from conftest import (check_cached_equals_uncached, check_causal, check_greedy_matches_hf,
                      check_overfits, check_variant_refused, hf_logits, ids, max_diff, randomize, scale_up,
                      script_home, serve_hub, train_tokenizer)

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
pytestmark = pytest.mark.usefixtures("one_thread")

# name: MixtralConfig arguments on top of BASE
HF_CASES = {
    "8x2_gqa": dict(num_local_experts=8, num_experts_per_tok=2, num_key_value_heads=2),
    "4x1_mha": dict(num_local_experts=4, num_experts_per_tok=1, num_key_value_heads=4),
    "4x4_mqa": dict(num_local_experts=4, num_experts_per_tok=4, num_key_value_heads=1),  # every expert, every token
    "6x3_window": dict(num_local_experts=6, num_experts_per_tok=3, num_key_value_heads=2, sliding_window=7),
    "window_1": dict(num_local_experts=4, num_experts_per_tok=2, num_key_value_heads=2, sliding_window=1),
    "head_dim_apart": dict(num_local_experts=4, num_experts_per_tok=2, num_key_value_heads=2, head_dim=24),
    "odd_vocab": dict(num_local_experts=4, num_experts_per_tok=2, num_key_value_heads=2, vocab_size=1000),
}
BASE = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, sliding_window=None, bos_token_id=None, eos_token_id=None, pad_token_id=None)


def make_hf(seed=0, scale=3.0, **kw):
    """A random MixtralForCausalLM in eval mode: weights scaled up (logits of order 1), RMSNorm gains random too."""
    torch.manual_seed(seed)
    return scale_up(transformers.MixtralForCausalLM(transformers.MixtralConfig(**{**BASE, **kw})), scale)


def tiny(seed=0, vocab=300, block=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, n_expert=4, **kw):
    """A random mixtral.Mixtral in eval mode with weights large enough that greedy decoding wanders."""
    torch.manual_seed(seed)
    return randomize(mixtral.Mixtral(mixtral.Config(vocab_size=vocab, block_size=block, n_layer=n_layer, n_head=n_head,
                                                    n_kv_head=n_kv_head, n_embd=n_embd, intermediate_size=96,
                                                    n_expert=n_expert, **kw)))


# ------------------------------------------------------------------------------------ HF parity

@pytest.mark.parametrize("case", HF_CASES)
def test_logits_match_hf(case, tmp_path):
    hf = make_hf(seed=len(case), **HF_CASES[case])
    hf.save_pretrained(tmp_path)
    assert "model.layers.1.block_sparse_moe.experts.0.w2.weight" in mixtral.read_safetensors(tmp_path / "model.safetensors")
    model = mixtral.from_pretrained(tmp_path)
    assert not model.training
    cfg, hc = model.config, hf.config
    assert (cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.n_embd, cfg.n_expert, cfg.top_k_experts, cfg.sliding_window,
            cfg.vocab_size, cfg.block_size) == \
           (hc.num_hidden_layers, hc.num_attention_heads, hc.num_key_value_heads, hc.hidden_size, hc.num_local_experts,
            hc.num_experts_per_tok, hc.sliding_window, hc.vocab_size, hc.max_position_embeddings)
    moe = model.model.layers[1].block_sparse_moe
    assert moe.w2.shape == (cfg.n_expert, cfg.n_embd, cfg.intermediate_size)
    idx = ids(cfg.vocab_size, 2, 48)  # longer than the windows: the band mask matters
    with torch.no_grad():
        logits, loss, _ = model(idx)
    ref = hf_logits(hf, idx)
    assert loss is None and logits.shape == ref.shape
    assert ref.abs().max() > 1.0
    assert max_diff(logits, ref) < 1e-4


def test_sharded_and_bf16_checkpoints(tmp_path):
    hf = make_hf(seed=4, **HF_CASES["8x2_gqa"])
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="150KB")
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) >= 3
    idx = ids(320, 2, 40)
    with torch.no_grad():
        assert max_diff(mixtral.from_pretrained(tmp_path / "sharded")(idx)[0], hf_logits(hf, idx)) < 1e-4
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    hf = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32).eval()
    model = mixtral.from_pretrained(tmp_path / "bf16")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    with torch.no_grad():
        assert max_diff(model(idx)[0], hf_logits(hf, idx)) < 1e-4
    model16 = mixtral.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    stored = mixtral.read_safetensors(tmp_path / "bf16" / "model.safetensors")
    assert torch.equal(model16.model.layers[0].block_sparse_moe.w3[5], stored["model.layers.0.block_sparse_moe.experts.5.w3.weight"])


@pytest.mark.parametrize("case", ["8x2_gqa", "6x3_window"])
def test_greedy_generation_matches_hf(case, tmp_path):
    """With a window of 7 and 40 tokens the rolling buffer wraps several times."""
    hf = make_hf(seed=7, scale=6.0, **HF_CASES[case])
    hf.save_pretrained(tmp_path)
    check_greedy_matches_hf(mixtral.from_pretrained(tmp_path), hf, 320, 32)


# ----------------------------------------------------------------------- Mistral 7B: n_expert 0, a dense SwiGLU

MISTRAL = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, sliding_window=8, rope_theta=1e4,
               bos_token_id=None, eos_token_id=None, pad_token_id=None)


def make_mistral(seed=0, scale=3.0, **kw):
    """A random MistralForCausalLM in eval mode (window 8 unless kw says otherwise), logits of order 1."""
    torch.manual_seed(seed)
    return scale_up(transformers.MistralForCausalLM(transformers.MistralConfig(**{**MISTRAL, **kw})), scale)


@pytest.mark.parametrize("window", [8, None])  # Mistral 7B v0.1 has a window (of 4096), v0.3 none
def test_mistral_logits_match_hf(window, tmp_path):
    hf = make_mistral(seed=3, sliding_window=window)
    hf.save_pretrained(tmp_path)
    model = mixtral.from_pretrained(tmp_path)
    cfg, block = model.config, model.model.layers[1]
    assert (cfg.n_expert, cfg.sliding_window, cfg.rope_theta) == (0, window, 1e4)
    assert block.mlp.down_proj.weight.shape == (64, 96) and not hasattr(block, "block_sparse_moe")
    assert model.num_params(active=True) == model.num_params()
    idx = ids(320, 2, 40)  # longer than the window
    with torch.no_grad():
        logits, loss, _ = model(idx)
    ref = hf_logits(hf, idx)
    assert loss is None and ref.abs().max() > 1.0
    assert max_diff(logits, ref) < 1e-4
    model.train()
    _, loss, aux = model(idx, idx)  # training: the loss alone, no router terms
    assert torch.isfinite(loss) and aux == {}


def test_mistral_greedy_generation_matches_hf(tmp_path):
    """A window of 8 and 32 new tokens: the rolling buffer wraps; cached and uncached both equal HF's tokens."""
    hf = make_mistral(seed=7, scale=6.0)
    hf.save_pretrained(tmp_path)
    check_greedy_matches_hf(mixtral.from_pretrained(tmp_path), hf, 320, 32)


def test_cli_mistral_exports_as_mistral(tmp_path, monkeypatch, offline, capsys):
    """--init_from a Mistral, --export: a Mistral again (no MoE keys), which transformers loads with the same logits."""
    script_home(mixtral, tmp_path, monkeypatch)
    hf = make_mistral(seed=5)
    hf.save_pretrained(tmp_path / "ckpt")
    mixtral.main(["--init_from", str(tmp_path / "ckpt"), "--device", "cpu", "--sample_only", "--max_new_tokens", "3",
                  "--export", str(tmp_path / "export")])
    assert "dense SwiGLU (Mistral 7B)" in capsys.readouterr().out
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["model_type"] == "mistral" and config["sliding_window"] == 8 and "num_local_experts" not in config
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32).eval()
    assert type(back).__name__ == "MistralForCausalLM"
    idx = ids(320, 2, 24)
    assert max_diff(hf_logits(back, idx), hf_logits(hf, idx)) < 1e-4


# ------------------------------------------------------------------------------ from_pretrained refusals

@pytest.mark.parametrize("change", [dict(model_type="mistral"), dict(hidden_act="gelu"),
                                    dict(rope_parameters=dict(rope_type="yarn", factor=4.0, rope_theta=1e6))])
def test_variants_are_refused(tmp_path, change):
    check_variant_refused(mixtral, make_hf(seed=0, **HF_CASES["4x1_mha"]), tmp_path, change)


def test_bad_weights_are_refused(tmp_path):
    make_hf(seed=0, **HF_CASES["4x1_mha"]).save_pretrained(tmp_path)
    weights = mixtral.read_safetensors(tmp_path / "model.safetensors")
    weights = {k: v.clone() for k, v in weights.items()}

    def save(tensors):
        safetensors.torch.save_file(tensors, str(tmp_path / "model.safetensors"))

    name = "model.layers.1.block_sparse_moe.experts.3.w1.weight"
    save({k: v for k, v in weights.items() if k != name})  # one expert's matrix missing
    with pytest.raises(mixtral.InputError, match="lacks"):
        mixtral.from_pretrained(tmp_path)
    save({**weights, name: weights[name][:, :32].contiguous()})
    with pytest.raises(mixtral.InputError, match="shape"):
        mixtral.from_pretrained(tmp_path)
    save({**weights, "model.layers.1.block_sparse_moe.experts.4.w1.weight": weights[name].clone()})  # a fifth of 4
    with pytest.raises(mixtral.InputError, match="unexpected"):
        mixtral.from_pretrained(tmp_path)


@pytest.fixture
def server(http_server, monkeypatch, tmp_path):
    return serve_hub(mixtral, http_server, monkeypatch, tmp_path / "cache")


def test_from_pretrained_hub_sharded(server):
    hf = make_hf(seed=2, **HF_CASES["8x2_gqa"])
    repo = server.root / "someorg" / "tiny-mixtral" / "resolve" / "main"
    hf.save_pretrained(repo, max_shard_size="150KB")
    cached = mixtral.CACHE_DIR / "someorg" / "tiny-mixtral"
    with pytest.raises(SystemExit):  # training is refused (no tokenizer) before any weights are fetched
        mixtral.main(["--init_from", "someorg/tiny-mixtral", "--device", "cpu"])
    assert [p.name for p in cached.iterdir()] == ["config.json"]
    model = mixtral.from_pretrained("someorg/tiny-mixtral")
    idx = ids(320, 2, 32)
    with torch.no_grad():
        assert max_diff(model(idx)[0], hf_logits(hf, idx)) < 1e-4
    assert len(list(cached.glob("model-*.safetensors"))) >= 3 and not list(cached.glob("*.part"))
    with pytest.raises(mixtral.InputError, match="cannot fetch"):
        mixtral.from_pretrained("someorg/nothing-here")


# ------------------------------------------------------------------------------------- the sparse MoE

def moe_layer(seed=0, n_embd=32, n_expert=4, top_k=2, **kw):
    torch.manual_seed(seed)
    cfg = mixtral.Config(vocab_size=10, n_layer=1, n_head=2, n_kv_head=2, n_embd=n_embd, intermediate_size=48,
                         n_expert=n_expert, top_k_experts=top_k, **kw)
    moe = mixtral.SparseMoE(cfg)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, 0.3)
    return moe.eval()


def loop_reference(moe, x, keep=None):
    """The sparse MoE written plainly: for each token, its top-k experts one by one (eq. 1-2). keep(token, choice)
    says whether a pair is computed (capacity mode drops some)."""
    B, T, d = x.shape
    x = x.reshape(-1, d)
    out = torch.zeros_like(x)
    logits = x @ moe.gate.weight.t()
    for n in range(x.size(0)):
        top, experts = logits[n].topk(moe.top_k)
        weights = torch.softmax(top, dim=0)
        for c, (e, w) in enumerate(zip(experts.tolist(), weights)):
            if keep is None or keep(n, c):
                h = F.silu(moe.w1[e] @ x[n]) * (moe.w3[e] @ x[n])
                out[n] += w * (moe.w2[e] @ h)
    return out.view(B, T, d)


@pytest.mark.parametrize("grouped", [True, False])  # one grouped matmul per weight, or expert_mlp's own loop
@pytest.mark.parametrize("n_expert, top_k", [(4, 2), (8, 2), (5, 1), (3, 3)])
def test_dropless_dispatch_equals_a_per_expert_loop(n_expert, top_k, grouped, monkeypatch):
    """Outputs and gradients (of x and of every weight) equal the loop's."""
    monkeypatch.setattr(mixtral, "GROUPED_MM", grouped and mixtral.GROUPED_MM)
    moe = moe_layer(n_expert=n_expert, top_k=top_k)
    x = torch.randn(3, 11, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
    y, stats = moe(x)
    ref = loop_reference(moe, x)
    assert y.shape == x.shape and max_diff(y, ref) < 1e-5 and ref.abs().max() > 0.5
    load = stats[3:]
    assert stats[2] == 0 and load.sum().item() == pytest.approx(1.0) and (load > 0).sum() > 1
    grad = torch.randn_like(y)
    ours = torch.autograd.grad(y, [x, *moe.parameters()], grad)
    theirs = torch.autograd.grad(ref, [x, *moe.parameters()], grad)
    for a, b in zip(ours, theirs):
        assert max_diff(a, b) < 1e-4


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("n_expert, top_k, N", [(4, 2, 33), (8, 2, 24), (5, 1, 17), (3, 3, 9), (8, 2, 1), (4, 4, 1)])
def test_forward_equals_the_papers_loop(n_expert, top_k, N, train):
    """SparseMoE.forward (the dispatch: grouped, or each token's chosen experts when decoding k N <= E pairs in
    eval) equals SparseMoE.forward_loop, the paper's loop over the experts: outputs and the gradients of x and of
    every weight, in train and eval mode, dropless, float32."""
    moe = moe_layer(n_expert=n_expert, top_k=top_k).train(train)
    x = torch.randn(1, N, 32, generator=torch.Generator().manual_seed(N), requires_grad=True)
    grad = torch.randn(1, N, 32, generator=torch.Generator().manual_seed(N + 1))
    y, _ = moe(x)
    ref = moe.forward_loop(x)
    assert ref.abs().max() > 0.5 and max_diff(y, ref) < 1e-6 * ref.abs().max()  # float32 rounding, relative
    for a, b in zip(*(torch.autograd.grad(out, [x, *moe.parameters()], grad) for out in (y, ref))):
        assert max_diff(a, b) < 1e-5 * max(1.0, b.abs().max().item())


def test_model_with_the_loop_equals_the_model():
    """A whole model whose MoE layers run forward_loop gives the logits and gradients of the fast forward."""
    model = tiny(n_expert=4, top_k_experts=2).train()
    x = ids(300, 2, 20)
    loss_fast = model(x, x)[1]
    fast = torch.autograd.grad(loss_fast, list(model.parameters()))
    for block in model.model.layers:
        moe = block.block_sparse_moe
        moe.forward = lambda h, moe=moe: (moe.forward_loop(h), router_stats(moe, h))
    loss_loop = model(x, x)[1]
    loop = torch.autograd.grad(loss_loop, list(model.parameters()))
    assert abs(loss_fast.item() - loss_loop.item()) < 1e-5
    for a, b in zip(fast, loop):
        assert max_diff(a, b) < 1e-5 * max(1.0, b.abs().max().item())


def router_stats(moe, h):
    """The router statistics of h as SparseMoE.forward computes them (for the loop, which has none)."""
    logits = moe.gate(h.reshape(-1, h.size(-1))).float()
    expert = moe.route(logits)[1].flatten()
    count = torch.bincount(expert, minlength=moe.n_expert)
    return moe.stats(logits, count, logits.new_zeros(()))


def one_hot_rank(e, count):
    """The rank as mixtral.py computed it before expert_rank: a one-hot (k N, E) and its running sum."""
    onehot = F.one_hot(e, count.numel())
    return (onehot.cumsum(0) * onehot).sum(-1) - 1


@pytest.mark.parametrize("N, E, k", [(1, 8, 2), (7, 4, 4), (300, 8, 2), (512, 256, 8)])
def test_expert_rank_equals_the_one_hot_running_sum(N, E, k):
    """Each pair's place in its expert's queue, choice-major: the stable sort's rank is the one-hot's running sum."""
    expert = torch.rand(N, E, generator=torch.Generator().manual_seed(N)).topk(k, dim=-1).indices
    e = expert.t().reshape(-1)
    count = torch.bincount(e, minlength=E)
    assert torch.equal(mixtral.expert_rank(e, count), one_hot_rank(e, count))


@pytest.mark.parametrize("capacity", [0.0, 0.5])
def test_dispatch_equals_the_one_hot_dispatch_exactly(capacity, monkeypatch):
    """Training (dropless, and capacity mode dropping pairs): outputs, statistics and gradients are bit for bit
    those of the one-hot ranking."""
    moe = moe_layer(n_expert=8, top_k=2, capacity_factor=capacity).train()
    x = torch.randn(2, 24, 32, generator=torch.Generator().manual_seed(7), requires_grad=True)
    grad = torch.randn(2, 24, 32, generator=torch.Generator().manual_seed(8))
    runs = []
    for rank in (mixtral.expert_rank, one_hot_rank):
        monkeypatch.setattr(mixtral, "expert_rank", rank)
        y, stats = moe(x)
        runs.append([y, stats, *torch.autograd.grad(y, [x, *moe.parameters()], grad)])
    assert capacity == 0 or runs[0][1][2] > 0  # capacity 0.5 drops some pairs
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("N, n_expert, top_k", [(1, 8, 2), (2, 4, 2), (1, 4, 4)])
def test_decoding_computes_only_the_chosen_experts(N, n_expert, top_k, monkeypatch):
    """k N <= E pairs in eval mode: no grouped dispatch (expert_mlp is never called), and the matmul FLOPs are the
    router's and the chosen experts' SwiGLUs exactly; outputs, statistics and gradients as the grouped path's."""
    moe = moe_layer(n_expert=n_expert, top_k=top_k)
    x = torch.randn(1, N, 32, generator=torch.Generator().manual_seed(9), requires_grad=True)
    grouped = moe.train()(x)  # train mode, no noise, dropless: the grouped dispatch over the same pairs
    ref = loop_reference(moe, x)
    monkeypatch.setattr(mixtral, "expert_mlp", None)  # calling it fails
    with FlopCounterMode(display=False) as flops:
        y, stats = moe.eval()(x)
    f = moe.w1.size(1)
    assert flops.get_total_flops() == 2 * N * 32 * n_expert + N * top_k * 3 * 2 * 32 * f
    assert max_diff(y, grouped[0]) < 1e-5 and max_diff(y, ref) < 1e-5 and ref.abs().max() > 0.5
    assert torch.allclose(stats, grouped[1])
    for a, b in zip(*(torch.autograd.grad(out, [x, *moe.parameters()], torch.ones_like(out)) for out in (y, ref))):
        assert max_diff(a, b) < 1e-4


def test_capacity_mode_equals_dropless_when_nothing_overflows():
    moe = moe_layer(n_expert=4, top_k=2, capacity_factor=2.0)  # capacity 2 x 2 N / 4 = N: no expert can overflow
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        dropless, s_eval = moe(x)  # eval mode routes dropless, whatever the capacity factor
        capped, s_train = moe.train()(x)
    assert s_train[2] == 0 and max_diff(capped, dropless) < 1e-5
    assert torch.equal(s_eval[3:], s_train[3:])


def test_capacity_mode_drops_the_overflow_with_first_choices_first():
    """With capacity C = ceil(0.5 x k N / E), each expert takes its first C pairs in choice-major order (every
    token's first choice before any second choice); the other pairs are not computed, and a token whose pairs
    were all dropped leaves the layer as 0 (the block's residual carries it)."""
    moe = moe_layer(n_expert=4, top_k=2, capacity_factor=0.5).train()
    x = torch.randn(1, 40, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y, stats = moe(x)
        experts = (x[0] @ moe.gate.weight.t()).topk(2).indices  # (N, k)
    C = math.ceil(0.5 * 2 * 40 / 4)
    taken, kept = {}, set()
    for c in range(2):
        for n in range(40):
            e = experts[n, c].item()
            if taken.get(e, 0) < C:
                taken[e] = taken.get(e, 0) + 1
                kept.add((n, c))
    assert 0 < len(kept) < 80 and stats[2].item() == pytest.approx(1 - len(kept) / 80)
    with torch.no_grad():
        assert max_diff(y, loop_reference(moe, x, keep=lambda n, c: (n, c) in kept)) < 1e-5
    lost = [n for n in range(40) if (n, 0) not in kept and (n, 1) not in kept]
    assert lost and y[0, lost].abs().max() == 0


def test_router_losses_equal_their_formulas():
    """balance = E sum_i f_i P_i (Switch eq. 4-6; f_i counting all k choices, as HF), z = mean logsumexp^2
    (ST-MoE eq. 5), checked by hand on a routing fixed by the router weights, and against transformers'
    load_balancing_loss_func for one layer (with several it pools the layers before the product; we average
    the per-layer losses, as Switch applies its loss per layer)."""
    moe = moe_layer(n_expert=4, top_k=2)
    x = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        _, stats = moe(x)
        logits = x.reshape(-1, 32) @ moe.gate.weight.t()
    probs = logits.softmax(-1)
    chosen = logits.topk(2).indices
    f = [sum(int(e in chosen[n]) for n in range(12)) / 12 for e in range(4)]
    P = [probs[:, e].mean().item() for e in range(4)]
    assert stats[0].item() == pytest.approx(4 * sum(fi * Pi for fi, Pi in zip(f, P)), abs=1e-6)
    assert stats[0].item() == pytest.approx(load_balancing_loss_func((logits,), 4, 2).item(), abs=1e-6)
    assert stats[1].item() == pytest.approx((logits.logsumexp(-1) ** 2).mean().item(), rel=1e-6)
    assert stats[3:].tolist() == pytest.approx([fi / 2 for fi in f])

    # a uniform router (P_i = 1/E) gives k, however the pairs fall: E sum_i f_i / E = sum_i f_i = k
    moe.gate.weight.data.zero_()
    with torch.no_grad():
        assert moe(x)[1][0].item() == pytest.approx(2.0)


def test_balance_loss_evens_a_collapsed_router():
    """Gradient steps on the balance loss alone take a router that sends nearly everything to expert 0 to an
    even load: P carries the gradient, and the top-k follows P."""
    moe = moe_layer(n_expert=4, top_k=1)
    x = torch.randn(256, 32, generator=torch.Generator().manual_seed(5)) + 0.5  # tokens share a direction
    with torch.no_grad():
        moe.gate.weight.mul_(0.1)
        moe.gate.weight[0] = 0.2  # expert 0 reads that direction: it scores highest for almost every token
    opt = torch.optim.SGD([moe.gate.weight], lr=0.1)
    loads = []
    for _ in range(60):
        _, stats = moe(x[None])
        loads.append(stats[3:].max().item())
        opt.zero_grad()
        stats[0].backward()
        opt.step()
    assert loads[0] > 0.9 and loads[-1] < 0.35  # even: 0.25 each


def test_router_jitter_only_in_training():
    moe = moe_layer(n_expert=4, top_k=2, router_noise=0.5)
    x = torch.randn(1, 64, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        a, b = moe(x), moe(x)
        assert torch.equal(a[0], b[0])  # eval: no noise
        moe.train()
        c, d = moe(x), moe(x)
    assert not torch.equal(c[1], d[1])  # the router's logits moved: z differs
    assert c[1][1] != a[1][1]


# ------------------------------------------------------------------------------------- KV cache, sliding window

@pytest.mark.parametrize("window, prompt_len, new_tokens", [(None, 5, 12), (None, 8, 40), (5, 3, 40), (5, 12, 30),
                                                            (1, 4, 10)])
def test_cached_generation_equals_uncached(window, prompt_len, new_tokens):
    """Without a window the second case slides past block_size 32; with one the text runs past block_size
    while the rolling buffer keeps `window` positions (a prompt of 12 > 5 fills it at once)."""
    check_cached_equals_uncached(tiny(seed=1, sliding_window=window), 300, prompt_len, new_tokens)


@pytest.mark.parametrize("size", [6, 10, 64])  # the window's own size (generate's), a bigger rolling one, all
def test_rolling_cache_matches_full_forward_and_stays_flat(size):
    model = tiny(seed=3, block=64, sliding_window=6)
    idx = ids(300, 2, 64, seed=4)
    cache = [mixtral.RollingKVCache(size) for _ in model.model.layers]
    with torch.no_grad():
        full = model(idx)[0]
        part = model(idx[:, :20], cache=cache, pos=0)[0]  # a prompt longer than the window
        assert max_diff(part, full[:, :20]) < 1e-5
        for t in range(20, 64):
            step = model(idx[:, t:t + 1], cache=cache, pos=t)[0]
            assert max_diff(step[:, 0], full[:, t]) < 1e-4, t  # keys in another order: rounding
            assert cache[0].k.shape == (2, 2, size, 16)  # `size` positions, however far the text has gone
        if size < 64:
            with pytest.raises(ValueError, match="one by one"):
                model(idx[:, :3], cache=cache, pos=64)
    no_window = [mixtral.RollingKVCache(64) for _ in model.model.layers]
    with torch.no_grad():  # without a window: chunks at pos > 0 work as in llama2.py
        tiny(seed=3, block=64)(idx[:, :10], cache=no_window, pos=0)
        assert tiny(seed=3, block=64)(idx[:, 10:14], cache=no_window, pos=10)[0].shape == (2, 4, 300)


@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("t", [1, 7, 20, 31])
def test_causality(t, window):
    check_causal(tiny(seed=5, sliding_window=window), 300, t)


def test_window_limits_what_one_layer_sees():
    """One layer with a window of 4: the logits at position 20 depend on tokens 17..20 only."""
    model = tiny(seed=6, n_layer=1, sliding_window=4)
    idx = ids(300, 1, 32, seed=7)
    changed = idx.clone()
    changed[0, :17] = (idx[0, :17] + 1) % 300
    with torch.no_grad():
        a, b = model(idx)[0], model(changed)[0]
    assert max_diff(a[0, 20:], b[0, 20:]) == 0 and max_diff(a[0, 16], b[0, 16]) > 1e-2


def test_overfit_one_batch():
    torch.manual_seed(0)
    model = mixtral.Mixtral(mixtral.Config(vocab_size=100, block_size=32, n_layer=2, n_head=4, n_kv_head=2,
                                           n_embd=32, n_expert=4))
    check_overfits(model, 100)


def test_config_params_and_init():
    cfg = mixtral.Config(vocab_size=50257, n_embd=384, n_head=6, n_kv_head=2, intermediate_size=0)
    assert (cfg.padded_vocab_size, cfg.head_dim, cfg.intermediate_size) == (50304, 64, 1024)
    for bad in (dict(top_k_experts=9), dict(top_k_experts=0), dict(n_expert=-1), dict(sliding_window=0),
                dict(capacity_factor=-1.0), dict(router_noise=1.0), dict(n_head=32, n_kv_head=3)):
        with pytest.raises(mixtral.InputError):
            mixtral.Config(**bad)
    model = tiny(n_layer=2, n_embd=64, n_expert=4, top_k_experts=1)
    experts = 2 * 3 * 4 * 64 * 96  # layers x (w1, w2, w3) x experts x d x f
    assert model.num_params() - model.num_params(active=True) == experts * 3 // 4
    assert model.num_params(non_embedding=False) - model.num_params() == 320 * 64  # the padded input embedding
    torch.manual_seed(0)
    fresh = mixtral.Mixtral(mixtral.Config(vocab_size=100, n_layer=8, n_head=4, n_kv_head=2, n_embd=64, n_expert=4))
    moe = fresh.model.layers[0].block_sparse_moe
    assert moe.w1.std().item() == pytest.approx(0.02, rel=0.05)
    assert moe.w2.std().item() == pytest.approx(0.02 / 4, rel=0.05)  # residual projections: 0.02 / sqrt(2 x 8)
    torch.manual_seed(0)
    dense = mixtral.Mixtral(mixtral.Config(vocab_size=100, n_layer=8, n_head=4, n_kv_head=2, n_embd=64, n_expert=0))
    assert dense.model.layers[0].mlp.down_proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)  # Mistral


def expected_groups(model):
    """The groups by the rule the harness used before optimizer_groups: decay = 2-D or more; muon = decayed, 2-D,
    not an embedding, not the head."""
    tables = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)} | {id(model.lm_head.weight)}
    return {n: "no_decay" if p.dim() < 2 else "muon" if p.dim() == 2 and id(p) not in tables else "decay"
            for n, p in model.named_parameters()}


@pytest.mark.parametrize("n_expert, tie", [(4, False), (0, False), (4, True)])
def test_optimizer_groups_by_name(n_expert, tie, tmp_path):
    """Every parameter named once: attention, router and a dense SwiGLU on Muon; the embedding, the head and the
    stacked (E, out, in) experts decayed on AdamW; the RMSNorm gains undecayed. The same after
    load_state_dict(assign=True) (new Parameters) and after save_pretrained -> from_pretrained."""
    model = tiny(n_expert=n_expert, tie_embeddings=tie)
    groups = model.optimizer_groups()
    assert groups == expected_groups(model)
    assert groups["model.layers.0.self_attn.q_proj.weight"] == "muon"
    assert groups["model.layers.1.post_attention_layernorm.weight"] == "no_decay"
    assert groups["model.embed_tokens.weight"] == "decay" and ("lm_head.weight" in groups) != tie
    if n_expert:
        assert groups["model.layers.0.block_sparse_moe.gate.weight"] == "muon"
        assert groups["model.layers.0.block_sparse_moe.w2"] == "decay"
    else:
        assert groups["model.layers.0.mlp.down_proj.weight"] == "muon"
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    after = model.optimizer_groups()  # (assign=True unties a tied head: then lm_head.weight is a name, "decay")
    assert {n: after[n] for n in groups} == groups and after == expected_groups(model)
    if not tie:  # (the Hugging Face layout of a tied model is tested in test_export.py)
        mixtral.save_pretrained(model, tmp_path)
        assert mixtral.from_pretrained(tmp_path).optimizer_groups() == groups


# ------------------------------------------------------------------------------------- command line

def test_cli_moe_flags_logs_and_histogram(tmp_path, monkeypatch, offline, capsys):
    """The MoE flags reach the model and its checkpoint; the loss line shows the router terms apart, capacity
    mode its dropped fraction; each eval prints the load histogram; a resume that contradicts them is refused."""
    script_home(mixtral, tmp_path, monkeypatch)
    mixtral.main(["--device", "cpu", "--n_layer", "2", "--n_head", "2", "--n_kv_head", "1", "--n_embd", "32",
                  "--n_expert", "4", "--top_k_experts", "1", "--sliding_window", "8", "--capacity_factor", "1.0",
                  "--router_noise", "0.1", "--block_size", "16", "--batch_size", "2", "--max_iters", "2",
                  "--eval_interval", "2", "--eval_iters", "1", "--log_interval", "1", "--max_new_tokens", "24"])
    out = capsys.readouterr().out
    assert "4 experts, top 1, capacity 1" in next(l for l in out.splitlines() if l.startswith("mixtral |"))
    line = next(l for l in out.splitlines() if l.startswith("iter 2 |"))
    assert " | balance " in line and " | z_loss " in line and " | dropped " in line
    hist = out.split("expert load per layer")[1].splitlines()
    assert hist[1].startswith("  layer 0") and hist[2].startswith("  layer 1") and "max" in hist[2]
    assert "a rolling buffer of 8 positions: 2,048 bytes however long" in out  # 2 x 2 layers x 16 x 4 bytes x 8
    ckpt = torch.load(tmp_path / "out" / "mixtral" / "ckpt.pt", map_location="cpu", weights_only=True)
    assert {k: ckpt["config"][k] for k in ("n_expert", "top_k_experts", "sliding_window", "capacity_factor")} == \
           dict(n_expert=4, top_k_experts=1, sliding_window=8, capacity_factor=1.0)
    assert ckpt["model"]["model.layers.1.block_sparse_moe.w1"].shape == (4, 128, 32)
    records = [json.loads(l) for l in (tmp_path / "out" / "mixtral" / "metrics.jsonl").read_text().splitlines()]
    assert all(k in records[0] for k in ("balance", "z_loss", "dropped"))
    assert len(records[-1]["expert_load"]) == 2 and sum(records[-1]["expert_load"][0]) == pytest.approx(1.0)
    for flag in (["--n_expert", "8"], ["--top_k_experts", "2"], ["--sliding_window", "16"]):
        with pytest.raises(SystemExit) as e:
            mixtral.main(["--init_from", "resume", *flag])
        assert e.value.code == 2 and "does not match" in capsys.readouterr().err
    mixtral.main(["--init_from", "resume", "--max_iters", "3", "--capacity_factor", "0"])  # a run flag: may change
    out = capsys.readouterr().out
    assert "dropless" in next(l for l in out.splitlines() if l.startswith("mixtral |")) and "done | 3 iters" in out


def test_cli_pretrained_samples_token_ids(tmp_path, monkeypatch, offline, capsys):
    script_home(mixtral, tmp_path, monkeypatch)
    make_hf(seed=9, scale=1.0, bos_token_id=1, **HF_CASES["6x3_window"]).save_pretrained(tmp_path / "ckpt")
    mixtral.main(["--init_from", str(tmp_path / "ckpt"), "--device", "cpu", "--sample_only", "--max_new_tokens", "5"])
    out = capsys.readouterr().out
    assert "shown as token ids" in out and "rolling buffer of 7 positions" in out
    sample = json.loads(out.split("---\n")[1].split("\n---")[0])
    assert sample[0] == 1 and len(sample) == 6  # bos, then 5 ids
    with pytest.raises(SystemExit) as e:
        mixtral.main(["--init_from", str(tmp_path / "ckpt"), "--device", "cpu", "--max_iters", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "no such tokenizer.json" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv, message", [(["--top_k_experts", "9"], "top_k_experts must be in"),
                                           (["--n_expert", "-1"], "n_expert must not be negative"),
                                           (["--sliding_window", "0"], "sliding_window must be positive"),
                                           (["--capacity_factor", "-1"], "--capacity_factor must not be negative"),
                                           (["--aux_loss_coef", "-0.1"], "--aux_loss_coef must not be negative"),
                                           (["--router_noise", "1.5"], "router_noise must be in")])
def test_bad_moe_flags(argv, message, tmp_path, monkeypatch, offline, capsys):
    script_home(mixtral, tmp_path, monkeypatch)
    with pytest.raises(SystemExit) as e:
        mixtral.main(["--device", "cpu", "--max_iters", "1", *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_cli_fine_tunes_a_pretrained_moe_with_the_router_flags(tmp_path, monkeypatch, offline, capsys):
    """The router's settings are run settings, not architecture: typed with --init_from a Hugging Face Mixtral
    they are no mismatch with the checkpoint (they were once refused as one) and they are the run's."""
    script_home(mixtral, tmp_path, monkeypatch)
    make_hf(seed=2, scale=1.0, **{**HF_CASES["4x1_mha"], "vocab_size": 640}).save_pretrained(tmp_path / "ckpt")
    train_tokenizer(tmp_path / "ckpt" / "tokenizer.json")
    flags = dict(router_noise=0.05, capacity_factor=1.5, aux_loss_coef=0.02, z_loss_coef=0.002, dropout=0.1)
    mixtral.main(["--init_from", str(tmp_path / "ckpt"), "--device", "cpu", "--max_iters", "2", "--block_size", "16",
                  "--batch_size", "2", "--eval_iters", "1", "--log_interval", "1", "--max_new_tokens", "2",
                  *[a for k, v in flags.items() for a in (f"--{k}", str(v))]])
    out = capsys.readouterr().out
    assert "4 experts, top 1, capacity 1.5" in next(l for l in out.splitlines() if l.startswith("mixtral |"))
    assert " | dropped " in next(l for l in out.splitlines() if l.startswith("iter 2 |"))
    ckpt = torch.load(tmp_path / "out" / "mixtral" / "ckpt.pt", map_location="cpu", weights_only=True)
    assert {k: ckpt["config"][k] for k in flags} == flags and ckpt["iter_num"] == 2
