"""mla_moe.py at the model level: HF parity (q_lora or not, groups, a correction bias, YaRN, rotary layouts),
the absorbed attention and its latent cache, the V3 gate and its bias update, the sequence-wise balance loss,
causality, training; and the command line (the common command-line tests are in test_scripts.py)."""
import json

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
import transformers
from torch.utils.flop_counter import FlopCounterMode

import mla_moe
from conftest import (check_cached_equals_uncached, check_causal, check_greedy_matches_hf,
                      check_overfits, check_variant_refused, hf_logits, ids, max_diff, randomize, scale_up,
                      script_home, train_tokenizer)

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
pytestmark = pytest.mark.usefixtures("one_thread")

YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=32, beta_fast=32,
            beta_slow=1, mscale=1.0, mscale_all_dim=1.0)
# name: DeepseekV3Config arguments on top of BASE
HF_CASES = {
    "q_lora_2_groups": dict(),
    "no_q_lora": dict(q_lora_rank=None),
    "4_groups_top3": dict(n_group=4, topk_group=2, num_experts_per_tok=3),
    "one_group_no_shared": dict(n_group=1, topk_group=1, n_shared_experts=0, norm_topk_prob=False),
    "rotate_half": dict(rope_interleave=False),
    "yarn": dict(max_position_embeddings=128, rope_parameters=YARN),  # 48 positions, past the original 32
    "odd_vocab": dict(vocab_size=1000, first_k_dense_replace=0),
}
BASE = dict(vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
            n_group=2, topk_group=1, first_k_dense_replace=1, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8,
            qk_rope_head_dim=4, v_head_dim=8, max_position_embeddings=64, bos_token_id=None, eos_token_id=None,
            pad_token_id=None)


def make_hf(seed=0, scale=3.0, **kw):
    """A random DeepseekV3ForCausalLM in eval mode, logits of order 1, with a random routing bias (which chooses
    experts but does not weigh them: a test that it is used the V3 way)."""
    torch.manual_seed(seed)
    hf = scale_up(transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**{**BASE, **kw})), scale)
    with torch.no_grad():
        for name, b in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn_like(b) * 0.1)
    return hf


def tiny(seed=0, vocab=300, block=32, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=vocab, block_size=block, n_layer=3, n_head=4, n_embd=64, intermediate_size=96,
               moe_intermediate_size=32, n_expert=8, n_shared_experts=1, top_k_experts=2, n_group=2,
               topk_group=1, first_k_dense_replace=1, q_lora_rank=0, kv_lora_rank=16, qk_nope_head_dim=16,
               qk_rope_head_dim=8, v_head_dim=16)
    return randomize(mla_moe.DeepSeek(mla_moe.Config(**{**cfg, **kw})))


# ------------------------------------------------------------------------------------ HF parity

@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # HF's empty shared expert (n_shared_experts 0)
@pytest.mark.parametrize("case", HF_CASES)
def test_logits_match_hf(case, tmp_path):
    hf = make_hf(seed=len(case), **HF_CASES[case])
    hf.save_pretrained(tmp_path)
    model = mla_moe.from_pretrained(tmp_path)
    cfg, hc = model.config, hf.config
    assert (cfg.n_layer, cfg.n_expert, cfg.top_k_experts, cfg.n_group, cfg.kv_lora_rank, cfg.q_lora_rank) == \
           (hc.num_hidden_layers, hc.n_routed_experts, hc.num_experts_per_tok, hc.n_group, hc.kv_lora_rank,
            hc.q_lora_rank or 0)
    bias = model.moe_layers()[0].gate.e_score_correction_bias
    assert bias.abs().max() > 0.01 and bias.dtype == torch.float32
    idx = ids(cfg.vocab_size, 2, 48)
    with torch.no_grad():
        logits, loss, _ = model(idx)
    ref = hf_logits(hf, idx)
    assert loss is None and ref.abs().max() > 1.0
    assert max_diff(logits, ref) < 1e-4


def test_yarn_changes_the_model():
    """The YaRN case above is not passing by accident: its frequencies and softmax scale differ from plain rope."""
    plain = mla_moe.Config(qk_rope_head_dim=64)
    yarn = mla_moe.Config(qk_rope_head_dim=64, rope_scaling=dict(YARN, original_max_position_embeddings=4096,
                                                                 factor=40.0))
    (f0, a0), (f1, a1) = mla_moe.yarn_rope_frequencies(plain), mla_moe.yarn_rope_frequencies(yarn)
    assert torch.equal(f0[:4], f1[:4]) and torch.allclose(f1[-4:], f0[-4:] / 40)  # high kept, low divided
    assert a0 == a1 == 1.0  # mscale = mscale_all_dim: cos and sin unscaled, as DeepSeek-V3's config
    assert mla_moe.yarn_mscale(40.0, 1.0) == pytest.approx(0.1 * torch.log(torch.tensor(40.0)).item() + 1)


def test_sharded_checkpoint_and_mtp_layers_skipped(tmp_path):
    hf = make_hf(seed=4)
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert len(list(tmp_path.glob("model-*.safetensors"))) >= 3
    # a multi-token-prediction layer after the last one, as DeepSeek-V3's checkpoints store it: skipped
    safetensors.torch.save_file({"model.layers.3.eh_proj.weight": torch.zeros(64, 128)}, str(tmp_path / "mtp.safetensors"))
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.3.eh_proj.weight"] = "mtp.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    idx = ids(320, 2, 40)
    with torch.no_grad():
        assert max_diff(mla_moe.from_pretrained(tmp_path)(idx)[0], hf_logits(hf, idx)) < 1e-4


@pytest.mark.parametrize("case", ["q_lora_2_groups", "yarn"])
def test_greedy_generation_matches_hf(case, tmp_path):
    hf = make_hf(seed=7, scale=6.0, **HF_CASES[case])
    hf.save_pretrained(tmp_path)
    check_greedy_matches_hf(mla_moe.from_pretrained(tmp_path), hf, 320, 24)


@pytest.mark.parametrize("change", [dict(model_type="deepseek_v2", topk_method="noaux_tc"), dict(hidden_act="gelu"),
                                    dict(rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=1e4)),
                                    dict(scoring_func="softmax"), dict(quantization_config=dict(quant_method="gptq"))])
def test_variants_are_refused(tmp_path, change):
    check_variant_refused(mla_moe, make_hf(seed=0), tmp_path, change)


# ------------------------------------------------------------------------------------ DeepSeek-V2 and FP8 V3

V2_CASES = {  # DeepseekV2Config arguments on top of BASE
    "v2": dict(topk_method="group_limited_greedy", n_group=4, topk_group=2, num_experts_per_tok=3,
               routed_scaling_factor=2.0, max_position_embeddings=128,  # YaRN as V2's config.json, 48 positions past 32
               rope_parameters=dict(YARN, mscale=0.707, mscale_all_dim=0.707)),
    "v2_lite": dict(q_lora_rank=None, topk_method="greedy", n_group=2, topk_group=1, routed_scaling_factor=1.5),
}


def make_hf_v2(case, seed=0, scale=3.0):
    torch.manual_seed(seed)
    hf = transformers.DeepseekV2ForCausalLM(transformers.DeepseekV2Config(**{**BASE, **V2_CASES[case]}))
    return scale_up(hf, scale)


@pytest.mark.parametrize("case", V2_CASES)
def test_deepseek_v2_matches_hf(case, tmp_path):
    """V2 and V2.5 (a query latent, groups ranked by their best expert) and V2-Lite (no query latent, greedy: the
    top-k of all experts, whatever n_group says): softmax gates, routed_scaling_factor, no renormalisation, no bias."""
    hf = make_hf_v2(case, seed=11)
    hf.save_pretrained(tmp_path)
    model = mla_moe.from_pretrained(tmp_path)
    cfg = model.config
    assert cfg.scoring == "softmax" and not cfg.norm_topk_prob and cfg.q_lora_rank == (24 if case == "v2" else 0)
    idx = ids(cfg.vocab_size, 2, 48)
    with torch.no_grad():
        logits = model(idx)[0]
    ref = hf_logits(hf, idx)
    assert ref.abs().max() > 1.0 and max_diff(logits, ref) < 1e-4
    hf = make_hf_v2(case, seed=12, scale=6.0)
    hf.save_pretrained(tmp_path / "greedy")
    check_greedy_matches_hf(mla_moe.from_pretrained(tmp_path / "greedy"), hf, 320, 24)


def test_v2_export_loads_in_transformers(tmp_path):
    """A --scoring softmax model without a routing bias is written as DeepSeek-V2 (group_limited_greedy) and read
    back by transformers with the same logits; with a moved bias it is refused."""
    model = tiny(seed=2, scoring="softmax", norm_topk_prob=False, n_group=4, topk_group=2, routed_scaling_factor=2.0)
    mla_moe.save_pretrained(model, tmp_path)
    hf = transformers.DeepseekV2ForCausalLM.from_pretrained(tmp_path).eval()
    assert hf.config.topk_method == "group_limited_greedy"
    idx = ids(300, 2, 32)
    with torch.no_grad():
        assert max_diff(model(idx)[0], hf(idx).logits) < 1e-4
    model.moe_layers()[0].gate.e_score_correction_bias[0] = 0.01
    with pytest.raises(mla_moe.InputError, match="--export"):
        mla_moe.save_pretrained(model, tmp_path / "biased")


def quantize_fp8(w, b=128):
    """(float8_e4m3fn weight, float32 scales (ceil(out/b), ceil(in/b)), the weight they stand for) of a 2-D w, each
    b x b block scaled to FP8's largest number, 448, as DeepSeek-V3's release; the last blocks partial."""
    O, I = w.shape
    blocks = F.pad(w, (0, -I % b, 0, -O % b)).view(-(-O // b), b, -(-I // b), b)
    s = blocks.abs().amax(dim=(1, 3)) / 448.0
    q = (blocks / s[:, None, :, None]).reshape(blocks.size(0) * b, -1)[:O, :I].to(torch.float8_e4m3fn).contiguous()
    deq = F.pad(q.float(), (0, -I % b, 0, -O % b)).view_as(blocks) * s[:, None, :, None]
    return q, s, deq.reshape(blocks.size(0) * b, -1)[:O, :I].contiguous()


def write_fp8_v3(tmp_path):
    """A tiny DeepSeek-V3 in the FP8 release layout (tmp_path / "fp8": the projections in float8_e4m3fn with their
    weight_scale_inv, embeddings, norms and gates in float32) and the same model dequantized (tmp_path / "ref");
    hidden_size 160: blocks of 128 x 32, 32 x 128, partial ones."""
    hf = make_hf(seed=13, hidden_size=160)
    hf.save_pretrained(tmp_path / "ref")
    tensors = safetensors.torch.load_file(str(tmp_path / "ref" / "model.safetensors"))
    fp8, n = dict(tensors), 0
    for name, w in tensors.items():
        if name.endswith("proj.weight") or name.endswith("proj_with_mqa.weight"):
            fp8[name], fp8[name + "_scale_inv"], tensors[name] = quantize_fp8(w)
            n += 1
    assert n == 3 * 5 + 3 + 2 * (8 * 3 + 3)  # attention in 3 layers, a dense MLP, 2 MoE layers of 8 + 1 experts
    (tmp_path / "fp8").mkdir()
    safetensors.torch.save_file(tensors, str(tmp_path / "ref" / "model.safetensors"), metadata={"format": "pt"})
    safetensors.torch.save_file(fp8, str(tmp_path / "fp8" / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((tmp_path / "ref" / "config.json").read_text())
    config["quantization_config"] = dict(quant_method="fp8", fmt="e4m3", activation_scheme="dynamic",
                                         weight_block_size=[128, 128])
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(config))
    return hf, fp8


def test_fp8_checkpoint_is_dequantized_at_load(tmp_path):
    """The FP8 release layout of V3 and R1 loads: its logits are transformers' on the dequantized weights (and differ
    from the unquantized model's, so the scales were used); a weight without its scales is one line of bad input."""
    hf, fp8 = write_fp8_v3(tmp_path)
    ref = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "ref").eval()
    idx = ids(320, 2, 32)
    with torch.no_grad():
        logits = mla_moe.from_pretrained(tmp_path / "fp8")(idx)[0]
        assert max_diff(logits, ref(idx).logits) < 1e-4 and max_diff(logits, hf(idx).logits) > 1e-3
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())
    config["quantization_config"]["weight_block_size"] = "128"
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(config))
    with pytest.raises(mla_moe.InputError, match="in blocks of 128 is no layout"):
        mla_moe.from_pretrained(tmp_path / "fp8")
    del fp8["model.layers.1.mlp.experts.3.up_proj.weight_scale_inv"], config["quantization_config"]["weight_block_size"]
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(config))  # the block size's default: 128 x 128
    safetensors.torch.save_file(fp8, str(tmp_path / "fp8" / "model.safetensors"))
    with pytest.raises(mla_moe.InputError, match="experts.3.up_proj.weight' is FP8 without a weight_scale_inv"):
        mla_moe.from_pretrained(tmp_path / "fp8")


# ------------------------------------------------------------------------------------- MLA and its cache

@pytest.mark.parametrize("kw", [dict(), dict(q_lora_rank=24), dict(rope_interleave=False)])
def test_absorbed_equals_expanded(kw):
    """With a cache, attention runs in the latent space (W_UK folded into the query, W_UV into the output):
    the logits of a prefill and of single tokens equal the expanded forward's."""
    model = tiny(seed=3, **kw)
    idx = ids(300, 2, 32, seed=4)
    cache = [mla_moe.LatentCache(32) for _ in model.model.layers]
    with torch.no_grad():
        full = model(idx)[0]
        for a, b in [(0, 10), (10, 11), (11, 12), (12, 20), (20, 32)]:
            assert max_diff(model(idx[:, a:b], cache=cache, pos=a)[0], full[:, a:b]) < 1e-4, (a, b)  # order 4


def test_cache_holds_only_the_latent_and_the_rotary_key():
    model = tiny(seed=1)
    cache = [mla_moe.LatentCache(20) for _ in model.model.layers]
    with torch.no_grad():
        model(ids(300, 3, 20), cache=cache, pos=0)
    cfg = model.config
    assert cache[0].c_kv.shape == (3, 20, cfg.kv_lora_rank) and cache[0].k_rope.shape == (3, 20, cfg.qk_rope_head_dim)
    numbers = sum(c.c_kv.numel() + c.k_rope.numel() for c in cache) / (3 * 20)
    latent, mha = model.kv_bytes_per_token(4)  # float32
    assert 4 * numbers == latent == 4 * (16 + 8) * 3 and mha == 4 * 4 * (16 + 8 + 16) * 3


@pytest.mark.parametrize("prompt_len, new_tokens", [(5, 12), (8, 40)])  # the second slides past block_size 32
def test_cached_generation_equals_uncached(prompt_len, new_tokens):
    check_cached_equals_uncached(tiny(seed=1), 300, prompt_len, new_tokens)


# ------------------------------------------------------------------------------------- the gate and balancing

def test_gate_is_float32_under_autocast():
    """The gate's logits are float32 under bf16 autocast (V3's gate runs in float32): the affinities equal those of
    the float32 product computed outside autocast, exactly."""
    cfg = mla_moe.Config(n_embd=64, n_expert=8, top_k_experts=2, n_group=4, topk_group=2)
    gate = mla_moe.Gate(cfg)
    torch.manual_seed(0)
    torch.nn.init.normal_(gate.weight)
    x = torch.randn(32, 64).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, _, s = gate(x)
    assert s.dtype == torch.float32
    assert torch.equal(s, torch.sigmoid(x.float() @ gate.weight.t()))


def test_gate_equals_the_v3_rule_written_out():
    """For each token: the top-2 of (s + b) over the experts of the best group (groups scored by their two best
    s + b), weights s of the chosen ones normalised, times routed_scaling_factor; b does not enter the weights."""
    cfg = mla_moe.Config(n_embd=16, n_expert=8, top_k_experts=2, n_group=4, topk_group=1,
                         routed_scaling_factor=2.5)
    gate = mla_moe.Gate(cfg)
    torch.manual_seed(0)
    torch.nn.init.normal_(gate.weight)
    gate.e_score_correction_bias.normal_(0, 0.3)
    x = torch.randn(20, 16)
    weight, expert, s = gate(x)
    b = gate.e_score_correction_bias
    for n in range(20):
        sc = torch.sigmoid(x[n] @ gate.weight.t())
        biased = sc + b
        group = max(range(4), key=lambda g: biased[2 * g:2 * g + 2].topk(2).values.sum())
        chosen = sorted(range(2 * group, 2 * group + 2), key=lambda e: -biased[e])
        assert sorted(expert[n].tolist()) == sorted(chosen)
        w = {e: sc[e] / sc[chosen].sum() * 2.5 for e in chosen}
        assert weight[n].tolist() == pytest.approx([w[e].item() for e in expert[n].tolist()], rel=1e-5)


def test_bias_update_moves_the_load_toward_even():
    """Auxiliary-loss-free balancing alone (no gradient): a routing bias of +1 on experts 0 and 1 sends every
    token there (half the pairs each); moved against the load after each step, it spreads them again."""
    model = tiny(seed=2, n_layer=2, first_k_dense_replace=1, n_group=1, topk_group=1)
    moe = model.moe_layers()[0]
    moe.gate.e_score_correction_bias[:2] = 1.0
    x = ids(300, 4, 32, seed=8)
    loads = []
    for _ in range(40):
        with torch.no_grad():
            load = model(x)[2]["load"]
        loads.append(load.max().item())
        model.update_bias(load, 0.05)
    assert loads[0] == 0.5 and loads[-1] < 0.25  # even: 1/8 each
    assert moe.gate.e_score_correction_bias[:2].max() < 0.5


def test_sequence_balance_loss_formula():
    """V3 eq. 17-20 without alpha: per sequence sum_i f_i P_i, f_i = E / (k T) x the sequence's tokens sent to
    expert i, P_i the mean of s_i / sum_j s_j; averaged over the sequences."""
    moe = tiny(seed=4, n_layer=2).moe_layers()[0]
    x = torch.randn(3, 16, 64, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        _, stats = moe(x)
        _, expert, s = moe.gate(x.reshape(-1, 64))
    E, k, T = 8, 2, 16
    total = 0.0
    for b in range(3):
        rows = slice(b * T, (b + 1) * T)
        f = [E / (k * T) * (expert[rows] == i).sum().item() for i in range(E)]
        sn = s[rows] / s[rows].sum(-1, keepdim=True)
        total += sum(f[i] * sn[:, i].mean().item() for i in range(E))
    assert stats[0].item() == pytest.approx(total / 3, rel=1e-5)
    assert stats[1:].sum().item() == pytest.approx(1.0)


def one_hot_rank(e, count):
    """The rank as mla_moe.py computed it before expert_rank: a one-hot (k N, E) and its running sum."""
    onehot = F.one_hot(e, count.numel())
    return (onehot.cumsum(0) * onehot).sum(-1) - 1


def test_dispatch_equals_the_one_hot_dispatch_exactly(monkeypatch):
    """Training: outputs, statistics and gradients bit for bit those of the one-hot ranking."""
    moe = tiny(seed=5, n_layer=2).moe_layers()[0].train()
    x = torch.randn(2, 24, 64, generator=torch.Generator().manual_seed(7), requires_grad=True)
    grad = torch.randn(2, 24, 64, generator=torch.Generator().manual_seed(8))
    runs = []
    for rank in (mla_moe.expert_rank, one_hot_rank):
        monkeypatch.setattr(mla_moe, "expert_rank", rank)
        y, stats = moe(x)
        runs.append([y, stats, *torch.autograd.grad(y, [x, *moe.parameters()], grad)])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("N", [1, 4])  # 4 tokens x top 2 = 8 pairs: as many as experts
def test_decoding_computes_only_the_chosen_experts(N, monkeypatch):
    """k N <= E pairs in eval mode: no grouped dispatch (expert_mlp is never called), and the matmul FLOPs are the
    gate's, the shared expert's and the chosen experts' exactly; outputs, statistics and gradients as the grouped
    path's (train mode: the same routing)."""
    moe = tiny(seed=6, n_layer=2).moe_layers()[0]
    x = torch.randn(1, N, 64, generator=torch.Generator().manual_seed(9), requires_grad=True)
    grouped = moe.train()(x)
    monkeypatch.setattr(mla_moe, "expert_mlp", None)  # calling it fails
    with FlopCounterMode(display=False) as flops:
        y, stats = moe.eval()(x)
    d, f, E, k = 64, 32, 8, 2  # tiny(): moe_intermediate_size 32, one shared expert of that width
    assert flops.get_total_flops() == 2 * N * d * E + 3 * 2 * N * d * f + N * k * 3 * 2 * d * f
    assert max_diff(y, grouped[0]) < 1e-5 and grouped[0].abs().max() > 0.1
    assert torch.allclose(stats, grouped[1])
    for a, b in zip(*(torch.autograd.grad(out, [x, *moe.parameters()], torch.ones_like(out))
                      for out in (y, grouped[0]))):
        assert max_diff(a, b) < 1e-4


def run_moe(moe, forward, x, grad):
    """(output, statistics, gradients of x and of every parameter) of moe through `forward`."""
    y, stats = forward(x)
    return [y, stats, *torch.autograd.grad(y, [x, *moe.parameters()], grad, allow_unused=True)]


@pytest.mark.parametrize("mode, T", [("train", 24), ("eval", 24), ("eval", 2)])  # eval, 2 tokens: chosen_experts
def test_moe_forward_equals_the_loop_over_experts(mode, T):
    """DeepSeekMoE.forward (the grouped dispatch; in eval with k N <= E pairs, chosen_experts) gives the output,
    the statistics and the gradients of forward_loop, V3 eq. 12 one expert at a time."""
    moe = tiny(seed=5, n_layer=2).moe_layers()[0].train(mode == "train")
    x = torch.randn(2 if T > 2 else 1, T, 64, generator=torch.Generator().manual_seed(7), requires_grad=True)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(8))
    fast, loop = run_moe(moe, moe.forward, x, grad), run_moe(moe, moe.forward_loop, x, grad)
    assert fast[0].abs().max() > 0.1 and torch.equal(fast[1], loop[1])
    for a, b in zip(fast, loop):  # the sums in another order: a difference of float32's rounding
        assert max_diff(a, b) <= 1e-6 * (1 + b.abs().max().item())


def test_model_through_the_loop_equals_the_default(monkeypatch):
    """The whole model in training, every DeepSeekMoE through forward_loop: the loss (balance term included), the
    expert load and every gradient as the default path's."""
    x = ids(300, 2, 33, seed=3)
    runs = []
    for forward in (mla_moe.DeepSeekMoE.forward, mla_moe.DeepSeekMoE.forward_loop):
        monkeypatch.setattr(mla_moe.DeepSeekMoE, "forward", forward)
        model = tiny(seed=6).train()
        _, loss, aux = model(x[:, :-1], x[:, 1:])
        loss.backward()
        runs.append([loss, aux["load"], *(p.grad for p in model.parameters())])
    assert torch.equal(runs[0][1], runs[1][1])
    for a, b in zip(*runs):
        assert max_diff(a, b) <= 1e-6 * (1 + b.abs().max().item())


def old_optimizer_rule(model):
    """The groups the harness inferred before optimizer_groups: decay = 2-D and up, Muon's = 2-D but not an
    nn.Embedding's weight nor lm_head.weight."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    return {name: "no_decay" if p.dim() < 2 else
            "muon" if p.dim() == 2 and id(p) not in embeddings and name != "lm_head.weight" else "decay"
            for name, p in model.named_parameters()}


@pytest.mark.parametrize("kw", [dict(), dict(q_lora_rank=24, tie_embeddings=True, n_shared_experts=0)])
def test_optimizer_groups_by_name(kw, tmp_path):
    """Every parameter named, in the group the shape rule gave it (MLA's projections, the gate's centroids, dense
    and shared SwiGLUs to Muon; embedding, head and the stacked (E, out, in) experts to AdamW with decay; the norm
    gains without), and the same after load_state_dict(assign=True) and after from_pretrained."""
    model = tiny(seed=1, **kw)
    groups = model.optimizer_groups()
    assert groups == old_optimizer_rule(model) and set(groups) == {n for n, _ in model.named_parameters()}
    assert groups["model.layers.1.mlp.gate.weight"] == groups["model.layers.0.mlp.down_proj.weight"] == "muon"
    assert groups["model.layers.1.mlp.up_proj"] == groups["model.embed_tokens.weight"] == "decay"
    assert groups["model.layers.1.self_attn.kv_a_layernorm.weight"] == "no_decay"
    with torch.device("meta"):
        empty = mla_moe.DeepSeek(model.config)
    empty.load_state_dict(model.state_dict(), assign=True)
    if model.config.tie_embeddings:  # assign=True replaced both: tied again, as from_pretrained does
        empty.lm_head.weight = empty.model.embed_tokens.weight
    assert empty.optimizer_groups() == groups
    if not kw:
        mla_moe.save_pretrained(tiny(seed=1, scoring="softmax", norm_topk_prob=False), tmp_path)
        assert mla_moe.from_pretrained(tmp_path).optimizer_groups() == groups


# ------------------------------------------------------------------------------------- causality, training, CLI

@pytest.mark.parametrize("t", [1, 7, 20, 31])
def test_causality(t):
    check_causal(tiny(seed=5), 300, t)


def test_overfit_one_batch():
    torch.manual_seed(0)
    model = mla_moe.DeepSeek(mla_moe.Config(vocab_size=100, block_size=32, n_layer=2, n_head=4, n_embd=32,
                                            intermediate_size=64, moe_intermediate_size=16, n_expert=4,
                                            top_k_experts=2, n_group=1, topk_group=1, first_k_dense_replace=1,
                                            q_lora_rank=0, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4,
                                            v_head_dim=8))
    check_overfits(model, 100)


def test_cli_flags_histogram_and_bias(tmp_path, monkeypatch, offline, capsys):
    script_home(mla_moe, tmp_path, monkeypatch)
    mla_moe.main(["--device", "cpu", "--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--n_expert", "8",
                  "--top_k_experts", "2", "--n_group", "2", "--topk_group", "1", "--kv_lora_rank", "8",
                  "--q_lora_rank", "16", "--block_size", "16", "--batch_size", "2", "--max_iters", "4",
                  "--eval_interval", "4", "--eval_iters", "1", "--log_interval", "2", "--max_new_tokens", "8"])
    out = capsys.readouterr().out
    assert "8 routed experts, top 2, 1 shared" in next(l for l in out.splitlines() if l.startswith("mla_moe |")) and "iter 4 | loss" in out and "balance" in out
    assert "latent cache: 128 bytes/token ((kv_lora_rank 8 + rotary key 8) x 2 layers x 4 bytes)" in out
    hist = out.split("expert load per layer")[1].splitlines()
    assert hist[1].startswith("  layer 1") and "bias" in hist[1]  # the real index: layer 0 is dense
    ckpt = torch.load(tmp_path / "out" / "mla_moe" / "ckpt.pt", map_location="cpu", weights_only=True)
    bias = ckpt["model"]["model.layers.1.mlp.gate.e_score_correction_bias"]
    steps = bias / 0.01  # moved by the default speed, +/- once per step for 4 steps: an integer in [-4, 4]
    assert bias.abs().max() > 0 and torch.allclose(steps, steps.round(), atol=1e-4) and steps.abs().max() <= 4
    assert ckpt["config"]["q_lora_rank"] == 16 and ckpt["config"]["first_k_dense_replace"] == 1
    with pytest.raises(SystemExit) as e:
        mla_moe.main(["--init_from", "resume", "--n_expert", "4"])
    assert e.value.code == 2 and "does not match" in capsys.readouterr().err


def test_grad_checkpoint_gives_the_same_loss_and_gradients():
    model = tiny(seed=6, dropout=0.1).train()
    x = ids(300, 2, 33, seed=3)
    grads = []
    for on in (False, True):
        model.grad_checkpoint = on
        model.zero_grad()
        torch.manual_seed(0)
        _, loss, aux = model(x[:, :-1], x[:, 1:])
        (loss + aux["balance"]).backward()
        grads.append((loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    assert grads[0][0] == grads[1][0] and len(grads[0][1]) == len(grads[1][1])
    for a, b in zip(grads[0][1], grads[1][1]):
        assert max_diff(a, b) < 1e-6


def test_latent_cache_in_the_autocast_dtype():
    """Under bf16 autocast both cached tensors are bf16 (2 bytes a number, as the sampling line says)."""
    model = tiny(seed=1)
    cache = [mla_moe.LatentCache(8) for _ in model.model.layers]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids(300, 1, 8), cache=cache, pos=0)
    assert cache[0].c_kv.dtype == cache[0].k_rope.dtype == torch.bfloat16


def test_cli_fine_tunes_a_pretrained_moe_with_the_router_flags(tmp_path, monkeypatch, offline, capsys):
    """The router's settings are run settings, not architecture: typed with --init_from a Hugging Face DeepSeek-V3
    they are no mismatch with the checkpoint (they were once refused as one) and they are the run's: the routing
    bias moves by the speed typed."""
    script_home(mla_moe, tmp_path, monkeypatch)
    make_hf(seed=2, scale=1.0, vocab_size=640).save_pretrained(tmp_path / "ckpt")
    train_tokenizer(tmp_path / "ckpt" / "tokenizer.json")
    flags = dict(bias_update_speed=0.25, seq_aux_loss_coef=0.003, dropout=0.1)
    mla_moe.main(["--init_from", str(tmp_path / "ckpt"), "--device", "cpu", "--max_iters", "2", "--block_size", "16",
                  "--batch_size", "2", "--eval_iters", "1", "--log_interval", "1", "--max_new_tokens", "2",
                  *[a for k, v in flags.items() for a in (f"--{k}", str(v))]])
    ckpt = torch.load(tmp_path / "out" / "mla_moe" / "ckpt.pt", map_location="cpu", weights_only=True)
    assert {k: ckpt["config"][k] for k in flags} == flags and ckpt["iter_num"] == 2
    name = "model.layers.1.mlp.gate.e_score_correction_bias"
    steps = (ckpt["model"][name] - mla_moe.read_safetensors(tmp_path / "ckpt" / "model.safetensors")[name]) / 0.25
    assert steps.abs().max() > 0.5 and torch.allclose(steps, steps.round(), atol=1e-4) and steps.abs().max() <= 2
