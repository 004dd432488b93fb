"""jamba.py at the model level: HF parity on several layer patterns (attention first, last, none; the MoE in every
layer, every other one, none; GQA, MHA and MQA; Mamba's biases and ranks), greedy generation against the reference's,
the hybrid cache (cached = uncached decoding across the attention/Mamba boundary and past block_size, its bytes
against the formula, the paper's Table 1 figures), Jamba's router weights against the formula written out and
against Mixtral's route, the scan as written against the chunked scan, the optimizer groups by name, the hub
layouts (sharded, one matrix per expert or stacked, a SentencePiece tokenizer.json: token ids), refusals,
causality, training, and the command line's own flags."""
import json
import math
from types import SimpleNamespace

import pytest
import safetensors.torch
import torch
import transformers

import jamba
from conftest import (check_cached_equals_uncached, check_causal, check_greedy_matches_hf, check_overfits,
                      check_variant_refused, hf_logits, ids, max_diff, randomize, scale_up, script_home, serve_hub,
                      train_tokenizer)

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
pytestmark = pytest.mark.usefixtures("one_thread")

# name: JambaConfig arguments on top of BASE (4 layers unless said)
HF_CASES = {
    "attn_first_moe_every_other_gqa": dict(attn_layer_period=2, attn_layer_offset=0),          # A M A M, MoE 1, 3
    "attn_last_moe_every_layer_mha": dict(attn_layer_period=4, attn_layer_offset=3, expert_layer_period=1,
                                          expert_layer_offset=0, num_key_value_heads=4),      # M M M A, MoE all
    "no_attn_short_16x2": dict(num_hidden_layers=3, num_experts=16, expert_layer_offset=0),    # M M M, MoE 0, 2
    "no_moe_mqa_top1": dict(attn_layer_period=3, attn_layer_offset=1, expert_layer_period=8, expert_layer_offset=5,
                            num_key_value_heads=1, num_experts_per_tok=1),                    # M A M M, no MoE
    "biases_rank3_conv2_odd_vocab": dict(mamba_proj_bias=True, mamba_conv_bias=False, mamba_dt_rank=3, mamba_d_conv=2,
                                         mamba_expand=1, vocab_size=1000, num_experts_per_tok=3),
}
BASE = dict(vocab_size=320, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, mamba_d_state=8, attn_layer_period=2,
            attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1, bos_token_id=None, eos_token_id=None,
            pad_token_id=None)


def make_hf(seed=0, scale=3.0, **kw):
    """A random JambaForCausalLM in eval mode: weights scaled up (logits of order 1), RMSNorm gains random (those
    on Delta, B and C too), and the SSM's own parameters moved off their init so that an error shows: A_log =
    log(1..N) + noise, D of both signs, Delta's bias for steps of 0.01 to 1."""
    torch.manual_seed(seed)
    hf = scale_up(transformers.JambaForCausalLM(transformers.JambaConfig(**{**BASE, **kw})), scale)
    with torch.no_grad():
        for layer in hf.model.layers:
            if hasattr(layer, "mamba"):
                m = layer.mamba
                m.A_log.copy_(torch.log(torch.arange(1.0, m.ssm_state_size + 1)) + 0.5 * torch.randn_like(m.A_log))
                m.D.normal_(0.0, 1.0)
                dt = torch.empty_like(m.dt_proj.bias).uniform_(math.log(0.01), 0.0).exp()
                m.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
    return hf


def tiny(seed=0, vocab=300, block=32, n_layer=4, **kw):
    """A random jamba.Jamba in eval mode (M A M A, the MoE in layers 1 and 3) whose greedy decoding wanders."""
    torch.manual_seed(seed)
    cfg = dict(vocab_size=vocab, block_size=block, n_layer=n_layer, n_head=4, n_kv_head=2, n_embd=32,
               intermediate_size=48, n_expert=4, attn_layer_period=2, attn_layer_offset=1, d_state=8)
    return randomize(jamba.Jamba(jamba.Config(**{**cfg, **kw})))


# ------------------------------------------------------------------------------------ HF parity

@pytest.mark.parametrize("case", HF_CASES)
def test_logits_match_hf(case, tmp_path):
    hf = make_hf(seed=len(case), **HF_CASES[case])
    hf.save_pretrained(tmp_path)
    model = jamba.from_pretrained(tmp_path)
    assert not model.training
    cfg, hc = model.config, hf.config
    assert [("A" if b.attends else "M") + ("E" if b.routes else "") for b in model.model.layers] == \
           [("A" if t == "attention" else "M") + ("E" if e > 1 else "") for t, e in zip(hc.layers_block_type,
                                                                                    hc.layers_num_experts)]
    assert (cfg.n_kv_head, cfg.n_expert, cfg.top_k_experts, cfg.dt_rank, cfg.vocab_size) == \
           (hc.num_key_value_heads, hc.num_experts, hc.num_experts_per_tok, hc.mamba_dt_rank, hc.vocab_size)
    idx = ids(cfg.vocab_size, 2, 40)
    with torch.no_grad():
        logits, loss, _ = model(idx)
        stepped = torch.cat([model(idx[:, :1], cache=(c := model.new_cache(40)))[0]]
                            + [model(idx[:, t:t + 1], cache=c, pos=t)[0] for t in range(1, 40)], 1)
    ref = hf_logits(hf, idx)
    assert loss is None and logits.shape == ref.shape
    assert ref.abs().max() > 1.0
    assert max_diff(logits, ref) < 1e-4
    assert max_diff(stepped, ref) < 1e-4  # one token at a time through the hybrid cache: the same logits


@pytest.mark.parametrize("case", ["attn_first_moe_every_other_gqa", "no_moe_mqa_top1"])
def test_greedy_generation_matches_hf(case, tmp_path):
    hf = make_hf(seed=7, scale=6.0, **HF_CASES[case])
    hf.save_pretrained(tmp_path)
    check_greedy_matches_hf(jamba.from_pretrained(tmp_path), hf, 320, 24)


def test_transformers_loads_what_we_write(tmp_path):
    """save_pretrained -> JambaForCausalLM: the same logits; and back into ours (test_export's check, here too)."""
    model = tiny(seed=3, vocab=300, n_layer=3, attn_layer_period=3, attn_layer_offset=2, expert_layer_offset=0)
    jamba.save_pretrained(model, tmp_path)
    names = jamba.read_safetensors(tmp_path / "model.safetensors")
    assert "model.layers.0.feed_forward.experts.3.down_proj.weight" in names and \
           "model.layers.0.feed_forward.router.weight" in names
    hf = transformers.JambaForCausalLM.from_pretrained(tmp_path).eval()
    idx = ids(300, 2, 32, seed=1)
    with torch.no_grad():
        assert max_diff(model(idx)[0], hf(idx).logits) < 1e-4
        assert max_diff(model(idx)[0], jamba.from_pretrained(tmp_path)(idx)[0]) < 1e-6


# ------------------------------------------------------------------------------ the hub's layouts

@pytest.fixture
def server(http_server, monkeypatch, tmp_path):
    return serve_hub(jamba, http_server, monkeypatch, tmp_path / "cache")


SENTENCEPIECE = {"version": "1.0", "added_tokens": [{"id": 0, "content": "<|pad|>", "special": True}],
                 "normalizer": None, "pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581",
                                                       "prepend_scheme": "first", "split": False},
                 "model": {"type": "BPE", "byte_fallback": True, "vocab": {"<|pad|>": 0, "a": 1, "b": 2, "ab": 3},
                           "merges": ["a b"]}}


@pytest.mark.parametrize("repo, shard", [("ai21labs/Jamba-tiny-dev", None), ("ai21labs/AI21-Jamba-Mini-1.5", "100KB")])
def test_from_pretrained_hub(repo, shard, server):
    """The released checkpoints' layout, one file (Jamba-tiny-dev) or shards (Jamba-Mini-1.5): one matrix per expert,
    the router as feed_forward.router, config.json with the old keys they carry, bf16 weights, and a SentencePiece
    tokenizer.json, which tiktoken cannot run: token ids."""
    hf = make_hf(seed=2, **HF_CASES["attn_first_moe_every_other_gqa"]).to(torch.bfloat16)
    files = server.root / repo / "resolve" / "main"
    hf.save_pretrained(files, **({"max_shard_size": shard} if shard else {}))
    config = json.loads((files / "config.json").read_text())
    (files / "config.json").write_text(json.dumps({**config, "use_mamba_kernels": True, "num_logits_to_keep": 1,
                                                   "calc_logits_for_entire_prompt": False, "n_ctx": 262144}))
    (files / "tokenizer.json").write_text(json.dumps(SENTENCEPIECE))
    assert (files / "model.safetensors.index.json").exists() == bool(shard)
    model = jamba.from_pretrained(repo)
    idx = ids(320, 2, 24)
    with torch.no_grad():
        assert max_diff(model(idx)[0], hf_logits(hf.float(), idx)) < 1e-4  # bf16 weights, read as they are
    cached = jamba.CACHE_DIR / repo
    assert jamba.pretrained_tokenizer(cached, sample_only=True) is None
    with pytest.raises(jamba.InputError, match="SentencePiece"):
        jamba.pretrained_tokenizer(cached, sample_only=False)


def test_stacked_experts_load_too(tmp_path):
    """transformers' in-memory layout (experts.gate_up_proj (E, 2 f, d), experts.down_proj) gives the same model."""
    hf = make_hf(seed=4, **HF_CASES["attn_last_moe_every_layer_mha"])
    hf.save_pretrained(tmp_path)
    per_expert = jamba.from_pretrained(tmp_path)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert "model.layers.0.feed_forward.experts.gate_up_proj" in state
    safetensors.torch.save_file(state, str(tmp_path / "model.safetensors"))
    idx = ids(320, 2, 16)
    with torch.no_grad():
        assert max_diff(jamba.from_pretrained(tmp_path)(idx)[0], per_expert(idx)[0]) == 0


@pytest.mark.parametrize("change", [dict(model_type="mamba"), dict(hidden_act="gelu"), dict(head_dim=16)])
def test_variants_are_refused(tmp_path, change):
    check_variant_refused(jamba, make_hf(seed=0), tmp_path, change)


def test_bad_weights_are_refused(tmp_path):
    make_hf(seed=0).save_pretrained(tmp_path)
    weights = {k: v.clone() for k, v in jamba.read_safetensors(tmp_path / "model.safetensors").items()}
    name = "model.layers.1.feed_forward.experts.3.gate_proj.weight"

    def save(tensors):
        safetensors.torch.save_file(tensors, str(tmp_path / "model.safetensors"))

    save({k: v for k, v in weights.items() if k != name})
    with pytest.raises(jamba.InputError, match="lacks"):
        jamba.from_pretrained(tmp_path)
    save({**weights, "model.layers.1.feed_forward.experts.4.gate_proj.weight": weights[name].clone()})
    with pytest.raises(jamba.InputError, match="unexpected"):
        jamba.from_pretrained(tmp_path)
    save({**weights, "model.layers.0.mamba.dt_layernorm.weight": torch.ones(5)})
    with pytest.raises(jamba.InputError, match="shape"):
        jamba.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------- the model's parts

def test_router_weights_are_the_top_k_of_a_softmax_over_all_experts():
    """JambaMoE = sum over the top k experts i of p_i SwiGLU_i(x), p = softmax(x W_g) over all E, not renormalised
    (the reference's JambaTopKRouter), written out here as a loop over tokens and choices."""
    torch.manual_seed(0)
    cfg = jamba.Config(vocab_size=10, n_layer=2, n_head=2, n_kv_head=2, n_embd=32, intermediate_size=48, n_expert=6,
                       top_k_experts=3)
    moe = jamba.JambaMoE(cfg).eval()
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, 0.3)
        x = torch.randn(2, 5, 32)
        y, _ = moe(x)
        p = (x @ moe.gate.weight.t()).softmax(-1)
        want = torch.zeros_like(x)
        for b in range(2):
            for t in range(5):
                w, e = p[b, t].topk(3)
                for wi, ei in zip(w, e):
                    h = torch.nn.functional.silu(moe.w1[ei] @ x[b, t]) * (moe.w3[ei] @ x[b, t])
                    want[b, t] += wi * (moe.w2[ei] @ h)
    assert max_diff(y, want) < 1e-5
    assert (p.topk(3).values.sum(-1) < 0.99).any()  # the weights really are not renormalised


def test_jamba_route_is_mixtrals_choice_without_the_renormalisation():
    """jamba_route chooses Mixtral's experts (SparseMoE.route's) with weights p_i = softmax(logits)_i
    as they are: they sum to less than 1, and renormalised over the k they are Mixtral's."""
    logits = torch.randn(7, 6, generator=torch.Generator().manual_seed(0))
    weight, expert = jamba.jamba_route(logits, 2)
    mixtral_weight, mixtral_expert = jamba.SparseMoE.route(SimpleNamespace(top_k=2), logits)
    assert torch.equal(expert, mixtral_expert)
    assert max_diff(weight, logits.softmax(-1).gather(1, expert)) == 0
    assert (weight.sum(-1) < 1).all()
    assert max_diff(weight / weight.sum(-1, keepdim=True), mixtral_weight) < 1e-6


def test_the_scan_as_written_and_the_chunked_scan_give_the_same_model():
    """JambaMixer's reference (parallel=False: selective_scan's loop over t) and its default (the
    chunked parallel scan): the same logits and the same gradients."""
    model = tiny(seed=4).train()
    idx = ids(300, 2, 40, seed=3)
    outs = []
    for parallel in (False, True):
        model.zero_grad()
        logits, loss, _ = model(idx[:, :-1], idx[:, 1:], parallel=parallel)
        loss.backward()
        outs.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (ref, ref_grads), (fast, fast_grads) = outs
    assert max_diff(fast, ref) < 1e-4
    assert max(max_diff(fast_grads[n], g) for n, g in ref_grads.items()) < 1e-4


def test_optimizer_groups_by_name(tmp_path):
    """Every parameter named: the blocks' 2-D matrices "muon"; A_log (2-D), D, the norms and biases
    "no_decay"; the embedding, the head, the 3-D convolutions and stacked experts "decay". The same
    for a fresh model, one loaded with load_state_dict(assign=True) and one from_pretrained."""
    model = tiny(seed=5, bias=True)
    assigned = tiny(seed=6, bias=True)
    assigned.load_state_dict(model.state_dict(), assign=True)
    jamba.save_pretrained(model, tmp_path)
    for m in (model, assigned, jamba.from_pretrained(tmp_path)):
        groups = m.optimizer_groups()
        params = dict(m.named_parameters())
        assert groups.keys() == params.keys()
        for name, p in params.items():
            if p.dim() < 2 or name.endswith("A_log"):
                assert groups[name] == "no_decay", name
            elif p.dim() == 2 and name.startswith("model.layers."):
                assert groups[name] == "muon", name
            else:
                assert groups[name] == "decay", name
    assert groups["model.layers.0.mamba.A_log"] == "no_decay"
    assert groups["model.layers.1.feed_forward.w1"] == "decay"


@pytest.mark.parametrize("prompt_len, new_tokens", [(1, 20), (12, 30)])
def test_cached_generation_equals_uncached_past_block_size(prompt_len, new_tokens):
    """Attention and Mamba layers alternate (M A M A); block_size 16 is passed: no position, no window, one cache."""
    check_cached_equals_uncached(tiny(seed=5, block=16), 300, prompt_len, new_tokens)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_bytes_equal_the_formula(dtype):
    """The bytes the hybrid cache holds after T tokens, counted tensor by tensor, equal cache_bytes(T): K and V of
    the attention layers grow with T, the Mamba layers' state does not."""
    model = tiny(seed=1, n_layer=6, attn_layer_period=3, attn_layer_offset=1).to(dtype)  # M A M M A M
    for T in (5, 40):
        cache = model.new_cache(T)
        with torch.no_grad():
            model.hidden(ids(300, 1, T), cache)
        held = sum(t.numel() * t.element_size() for c in cache for t in vars(c).values() if torch.is_tensor(t))
        hybrid, full = model.cache_bytes(T, dtype.itemsize)
        assert held == hybrid and full == 6 * 2 * 2 * 8 * T * dtype.itemsize


def test_cache_of_the_released_shape_is_the_papers_table_1():
    """Jamba-v0.1's shape (the defaults) at 256K tokens in 16-bit: about 4 GB, where the same shape all attention
    (Mixtral's: 32 layers of 8 kv heads) needs 32 GB (Table 1: 4GB and 32GB)."""
    with torch.device("meta"):
        model = jamba.Jamba(jamba.Config())
    hybrid, full = model.cache_bytes(256 * 1024, 2)
    assert full == 32 * 2**30 and 4 * 2**30 < hybrid < 4.1 * 2**30


@pytest.mark.parametrize("t", [1, 9])
def test_causality(t):
    check_causal(tiny(seed=2), 300, t)


def test_overfit_one_batch():
    torch.manual_seed(0)
    model = jamba.Jamba(jamba.Config(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_kv_head=1, n_embd=32,
                                     intermediate_size=64, n_expert=4, attn_layer_period=2, attn_layer_offset=1,
                                     d_state=8))
    check_overfits(model, 64, steps=60)
    assert set(model(ids(64, 2, 8), ids(64, 2, 8))[2]) == {"balance", "load"}  # no z-loss unless weighted


def test_config_is_checked():
    for kw, message in [(dict(attn_layer_offset=8), "attn_layer_offset must be in"),
                        (dict(expert_layer_period=0), "expert_layer_period must be positive"),
                        (dict(top_k_experts=17), "top_k_experts must be in"),
                        (dict(router_noise=1.0), "router_noise must be in")]:
        with pytest.raises(jamba.InputError, match=message):
            jamba.Config(**kw)


# ------------------------------------------------------------------------------- the command line

def test_cli_layers_note_cache_lines_and_token_id_samples(tmp_path, monkeypatch, offline, capsys):
    script_home(jamba, tmp_path, monkeypatch)
    make_hf(seed=9, scale=1.0, bos_token_id=1).save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "tokenizer.json").write_text(json.dumps(SENTENCEPIECE))
    jamba.main(["--init_from", str(tmp_path / "ckpt"), "--device", "cpu", "--sample_only", "--max_new_tokens", "5"])
    out = capsys.readouterr().out
    assert "layers MAMA (A attention, M Mamba) | MoE in layers 1, 3: 4 experts, top 2, dropless" in out
    assert "cache at 1K tokens: " in out and "cache at 256K tokens: " in out and "shown as token ids" in out
    hybrid, full = jamba.from_pretrained(tmp_path / "ckpt").cache_bytes(262144)
    assert f"{hybrid:,} bytes" in out and f"{full:,} bytes" in out
    sample = json.loads(out.split("---\n")[1].split("\n---")[0])
    assert sample[0] == 1 and len(sample) == 6  # bos, then 5 ids
    with pytest.raises(SystemExit) as e:
        jamba.main(["--init_from", str(tmp_path / "ckpt"), "--device", "cpu", "--max_iters", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "SentencePiece" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv, message", [(["--attn_layer_offset", "4"], "attn_layer_offset must be in"),
                                           (["--expert_layer_period", "0"], "expert_layer_period must be positive"),
                                           (["--n_expert", "0"], "n_expert must be positive"),
                                           (["--n_kv_head", "3"], "multiple of n_kv_head"),
                                           (["--aux_loss_coef", "-0.1"], "--aux_loss_coef must not be negative")])
def test_bad_jamba_flags(argv, message, tmp_path, monkeypatch, offline, capsys):
    script_home(jamba, tmp_path, monkeypatch)
    with pytest.raises(SystemExit) as e:
        jamba.main(["--device", "cpu", "--max_iters", "1", *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_cli_fine_tunes_a_pretrained_moe_with_the_router_flags(tmp_path, monkeypatch, offline, capsys):
    """The router's settings are run settings, not architecture: typed with --init_from a Hugging Face Jamba they
    are no mismatch with the checkpoint (they were once refused as one) and they are the run's, over config.json's
    router_aux_loss_coef."""
    script_home(jamba, tmp_path, monkeypatch)
    make_hf(seed=2, scale=1.0, vocab_size=640, router_aux_loss_coef=0.005).save_pretrained(tmp_path / "ckpt")
    train_tokenizer(tmp_path / "ckpt" / "tokenizer.json")
    flags = dict(capacity_factor=1.5, aux_loss_coef=0.02, z_loss_coef=0.002, dropout=0.1)
    jamba.main(["--init_from", str(tmp_path / "ckpt"), "--device", "cpu", "--max_iters", "2", "--block_size", "16",
                "--batch_size", "2", "--eval_iters", "1", "--log_interval", "1", "--max_new_tokens", "2",
                *[a for k, v in flags.items() for a in (f"--{k}", str(v))]])
    out = capsys.readouterr().out
    assert "4 experts, top 2, capacity 1.5" in next(l for l in out.splitlines() if l.startswith("jamba |"))
    assert " | dropped " in next(l for l in out.splitlines() if l.startswith("iter 2 |"))
    ckpt = torch.load(tmp_path / "out" / "jamba" / "ckpt.pt", map_location="cpu", weights_only=True)
    assert {k: ckpt["config"][k] for k in flags} == flags and ckpt["iter_num"] == 2


def test_router_jitter_works_in_training_only():
    """router_noise (training only, as mixtral.py's; Jamba's reference has none): the router's input is jittered in
    training (the router statistics move from call to call), never in eval; 0 leaves training deterministic."""
    idx = ids(300, 2, 16, seed=3)
    for noise in (0.5, 0.0):
        model = tiny(seed=4, router_noise=noise)
        with torch.no_grad():
            a, b = model(idx)[0], model(idx)[0]
            assert torch.equal(a, b)  # eval: no noise
            model.train()
            stats = [model(idx, idx)[1] for _ in range(2)]
        assert (stats[0] != stats[1]) == (noise > 0)
