"""Benchmark mla_moe.py (DeepSeek-V2/V3 multi-head latent attention + DeepSeekMoE) against Hugging Face
transformers' DeepseekV3ForCausalLM on the same weights, and its latent cache against an expanded one.

A random DeepSeek-V3-shaped model (MLA with a query latent, 16 routed experts in 4 groups, top 4 from 2 groups, one
shared expert, a dense first layer, sigmoid gating) is built with transformers (seeded), each MoE gate given a small
random e_score_correction_bias (std 0.05, enough to change some tokens' experts: the bias path is exercised), written
with save_pretrained and read back with mla_moe.from_pretrained: identical fp32 weights; the logits must match HF's
within 1e-4. As in bench_llama2.py the weights are drawn with std 0.1, not 0.02, so that greedy decoding does not
fall into a loop of a few tokens and the token check means something. Rounds, warmup, medians and ratios are
harness.py's: each round runs every measurement once per side, the order flipping each round, round 0 a warmup;
ratio = reference / ours (> 1: ours faster).

  train step     forward + backward, train mode, same batch and targets, no optimizer step, against HF with the
                 experts implementation transformers picks by default (grouped_mm); losses must agree
  train, eager   the same against HF with experts_implementation="eager": its loop over the experts
  decode         greedy, batch 1, an 8-token prompt; ours with its latent cache, HF with its own cache of per-head
                 keys and values; the generated tokens must be identical
  KV cache       ours with its latent cache vs ours recomputing the whole prefix at every token (reported)
  latent cache   ours only, greedy decode after a long prompt, batch 1: the latent cache generate makes (c_kv and
                 k_rope per token, attention absorbed) vs an expanded cache built here (per layer k = cat(k_nope,
                 k_rope) (B, H, L, dn + dr) and v (B, H, L, dv) from kv_b_proj, SDPA over them; generate's
                 LatentCache and MLA.forward are swapped for it during the call); ratio = expanded / latent time
                 (reported); the tokens must be identical
  dispatch       the routed experts' ranking (each (token, choice) pair's place in its expert's queue, and the
                 pairs per expert), mla_moe.expert_rank after a count by index_add_, against the one-hot
                 (k N, E) and its running sum it replaced (written here); at DeepSeek-V3's E = 256, k = 8 over
                 16K tokens, and at this bench's 16 experts top 4 over 1024 tokens (quick: smaller); the ranks
                 must be equal. Peak memory of one call from torch.profiler's allocation events (their running
                 sum's maximum; the expert ids, allocated before, not counted)
  cache bytes    per token, measured from each cache's tensors after the prefill; they must equal
                 kv_bytes_per_token(4) (fp32), [0] latent, [1] expanded. The same at DeepSeek-V3's shape
                 (mla_moe.Config() on the meta device: 61 layers, 128 heads, latent 512 + rope 64, nope 128, v 128),
                 in bf16: computed, not measured
  GPU            only with CUDA: training throughput and MFU of a DeepSeek of GPT-2 124M's shape (12 x 768, 12
                 heads, q latent 384, kv latent 192, nope 64, rope 32, v 64, 64 routed experts of width 256, top 6
                 from 4 of 8 groups, 2 shared, a dense first layer of 2048, vocab 50257, T=1024), torch.compile on
                 and off; cross-entropy only (no balance loss, no bias update); MFU counts what a token computes,
                 as mla_moe.py's training loop: 6 N_active + 6 n_layer n_head (dn + dr + dv) T FLOPs per token.
                 Then its attention alone (issue 19), bf16, forward + backward: SDPA with v's head dim 64 under
                 q/k's 96, as mla_moe.py runs it, against v padded to 96 and cut back (the flash kernel wants one
                 head dim): which is faster decides whether mla_moe.py pads

    python benchmarks/bench_mla_moe.py                  # a few minutes on 2 CPU cores
    python benchmarks/bench_mla_moe.py --quick          # tiny model, a smoke test (~25 s)
    python benchmarks/bench_mla_moe.py --json out.json  # also write the results as JSON
"""
import time

T_START = time.perf_counter()  # the wall time printed at the end includes the imports

import argparse
import contextlib
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # the models at the repo root, harness.py beside this file
import harness  # noqa: E402
import mla_moe  # noqa: E402

# CPU sizes: GPT-2's vocabulary, a 1024 context, 4 narrow layers (the first dense); MLA dims as (q latent, kv latent,
# nope, rope, v); latent_tokens: (prompt, new tokens) of the latent vs expanded cache rows
CONFIGS = {
    "default": dict(n_layer=4, n_head=4, n_embd=256, mla=(96, 64, 64, 32, 64), dense=704, expert=176, batch=4,
                    seq=256, prompt=8, decode=128, kv_tokens=256, latent_tokens=(256, 128)),
    "quick": dict(n_layer=2, n_head=4, n_embd=64, mla=(32, 16, 16, 8, 16), dense=176, expert=48, batch=2, seq=64,
                  prompt=8, decode=32, kv_tokens=64, latent_tokens=(64, 16)),
}
VOCAB, CONTEXT, INIT_STD, BIAS_STD = 50257, 1024, 0.1, 0.05
N_EXPERT, N_SHARED, TOP_K, N_GROUP, TOPK_GROUP, N_DENSE = 16, 1, 4, 4, 2, 1
# GPU: a DeepSeek of GPT-2 124M's shape; 8 active experts (6 routed + 2 shared) of 256 = the dense SwiGLU's 2048
DEEPSEEK_GPU = dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768, intermediate_size=2048,
                    moe_intermediate_size=256, n_expert=64, n_shared_experts=2, top_k_experts=6, n_group=8,
                    topk_group=4, first_k_dense_replace=1, q_lora_rank=384, kv_lora_rank=192, qk_nope_head_dim=64,
                    qk_rope_head_dim=32, v_head_dim=64)


def cpu_rows(c, rounds, seed):
    torch.manual_seed(seed)
    q_rank, kv_rank, dn, dr, dv = c["mla"]
    hf = DeepseekV3ForCausalLM(DeepseekV3Config(
        vocab_size=VOCAB, max_position_embeddings=CONTEXT, num_hidden_layers=c["n_layer"], hidden_size=c["n_embd"],
        num_attention_heads=c["n_head"], num_key_value_heads=c["n_head"], q_lora_rank=q_rank, kv_lora_rank=kv_rank,
        qk_nope_head_dim=dn, qk_rope_head_dim=dr, v_head_dim=dv, intermediate_size=c["dense"],
        moe_intermediate_size=c["expert"], n_routed_experts=N_EXPERT, n_shared_experts=N_SHARED,
        num_experts_per_tok=TOP_K, n_group=N_GROUP, topk_group=TOPK_GROUP, first_k_dense_replace=N_DENSE,
        initializer_range=INIT_STD, attention_dropout=0.0))
    with torch.no_grad():
        for layer in hf.model.layers[N_DENSE:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0.0, BIAS_STD)
    ours = harness.load_via_checkpoint(hf, mla_moe.from_pretrained)
    ours.config.seq_aux_loss_coef = 0.0  # the cross-entropy alone, as HF's loss here
    hf_eager = copy.deepcopy(hf)  # the same weights, HF's loop over the experts
    hf_eager.set_experts_implementation("eager")
    idx = torch.randint(0, VOCAB, (c["batch"], c["seq"]), generator=torch.Generator().manual_seed(seed + 2))
    gate, seen = ours.moe_layers()[0].gate, []  # the first MoE gate's input and choices: the tokens the bias reroutes
    hook = gate.register_forward_hook(lambda m, args, out: seen.extend((args[0], out[1].sort(-1).values)))
    with torch.no_grad():
        logits_diff = (ours.eval()(idx)[0] - hf.eval()(idx).logits).abs().max().item()
        hook.remove()
        unbiased = copy.deepcopy(gate).requires_grad_(False)
        unbiased.e_score_correction_bias.zero_()
    rerouted = (unbiased(seen[0])[1].sort(-1).values != seen[1]).any(-1).float().mean().item()
    rows, checks, outputs = harness.lm_rows(ours, hf, c, rounds, seed, VOCAB, kv_target=None,
                                            train_refs=[("train_eager", "HF eager experts", hf_eager)])
    checks.update(logits_max_diff=logits_diff, logits_match=logits_diff < 1e-4, bias_rerouted_fraction=rerouted,
                  decode_distinct_tokens=len(set(outputs["decode"][0][0, c["prompt"]:].tolist())),
                  train_loss_match=max(abs(checks["train_loss_ours"] - checks[k]) for k in
                                       ("train_loss_ref", "train_eager_loss_ref")) < 1e-4)
    rows[0]["tokens_per_s_ref"] = c["batch"] * c["seq"] / rows[0]["ref_median_s"]
    config = dict(c, mla_moe_config=vars(ours.config), bias_std=BIAS_STD, params=ours.num_params(),
                  params_active=ours.num_params(active=True), params_with_embedding=ours.num_params(False),
                  hf_attn_implementation=hf.config._attn_implementation, seed=seed,
                  hf_experts_implementation=hf.config._experts_implementation,
                  hf_eager_experts_implementation=hf_eager.config._experts_implementation)
    return ours, rows, checks, config


def one_hot_rank(expert, E):
    """The ranking mla_moe.py had before expert_rank: a one-hot of the pairs and its running sum, O(k N E) memory."""
    e = expert.t().reshape(-1)
    onehot = F.one_hot(e, E)
    return onehot.sum(0), (onehot.cumsum(0) * onehot).sum(-1) - 1


def sort_rank(expert, E):
    """mla_moe.DeepSeekMoE's ranking: the count (a bincount by index_add_), then expert_rank's stable sort."""
    e = expert.t().reshape(-1)
    count = e.new_zeros(E).index_add_(0, e, torch.ones_like(e))
    return count, mla_moe.expert_rank(e, count)


def peak_cpu_bytes(fn):
    """The most bytes torch holds on the CPU during fn(), over what it held before: allocation events in order."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    held = peak = 0
    for event in sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start):
        held += event.self_cpu_memory_usage
        peak = max(peak, held)
    return peak


def dispatch_rows(rounds, seed, quick):
    """The ranking at DeepSeek-V3's scale and at this bench's: time rows (one-hot / sort), peak bytes, equal ranks."""
    shapes = [(2048, 64, 8), (256, N_EXPERT, TOP_K)] if quick else [(16384, 256, 8), (1024, N_EXPERT, TOP_K)]
    rows, checks, cases, experts = [], {}, {}, {}
    for N, E, k in shapes:
        g = torch.Generator().manual_seed(seed + N)
        expert = experts[N, E, k] = torch.rand(N, E, generator=g).topk(k, dim=-1).indices  # k distinct experts
        cases[f"dispatch_{E}"] = (0, lambda _, x=expert, E=E: sort_rank(x, E),
                                  lambda _, x=expert, E=E: one_hot_rank(x, E))
    times, outputs = harness.run_rounds(cases, rounds, "dispatch round")
    for (N, E, k), key in zip(shapes, cases):
        rows.append(harness.ratio_row(key, f"MoE ranking, {N} tok, {E} experts top {k}", "one-hot", None, *times[key]))
        ours, ref = outputs[key]
        checks[f"{key}_ranks_match"] = torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])
        checks[f"{key}_peak_bytes"] = peak_cpu_bytes(lambda: sort_rank(experts[N, E, k], E))
        checks[f"{key}_one_hot_peak_bytes"] = peak_cpu_bytes(lambda: one_hot_rank(experts[N, E, k], E))
    return rows, checks, shapes


class ExpandedCache:
    """A plain multi-head cache for one MLA layer: per token and head the key cat(k_nope, k_rope) and the value,
    expanded from the latent by kv_b_proj (what MLA's absorbed form avoids holding)."""

    def __init__(self, length):
        self.length, self.k, self.v = length, None, None

    def update(self, k, v, pos):
        """Write k (B, H, T, dn + dr) and v (B, H, T, dv) at positions pos..pos+T-1; return everything so far."""
        B, H, T, _ = k.shape
        if self.k is None:
            self.k, self.v = k.new_zeros(B, H, self.length, k.size(-1)), v.new_zeros(B, H, self.length, v.size(-1))
        self.k[:, :, pos:pos + T], self.v[:, :, pos:pos + T] = k, v
        return self.k[:, :, :pos + T], self.v[:, :, :pos + T]


MLA_FORWARD = mla_moe.MLA.forward


def expanded_forward(self, x, cos, sin, cache=None, pos=0):
    """mla_moe.MLA.forward with an ExpandedCache: its expanded path, keys and values cached per head, SDPA over them."""
    if not isinstance(cache, ExpandedCache):
        return MLA_FORWARD(self, x, cos, sin, cache, pos)
    B, T, _ = x.shape
    H, dn, dr, dv, r = self.n_head, self.dn, self.dr, self.dv, self.r
    q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if hasattr(self, "q_a_proj") else self.q_proj(x)
    q_nope, q_rope = q.view(B, T, H, dn + dr).transpose(1, 2).split([dn, dr], dim=-1)
    c_kv, k_rope = self.kv_a_proj_with_mqa(x).split([r, dr], dim=-1)
    if self.interleave:  # as mla_moe.MLA: DeepSeek's adjacent pairs regrouped as evens then odds
        q_rope, k_rope = (torch.cat((t[..., 0::2], t[..., 1::2]), dim=-1) for t in (q_rope, k_rope))
    k_rope = mla_moe.apply_rotary(k_rope, cos, sin)
    k_nope, v = self.kv_b_proj(self.kv_a_layernorm(c_kv)).view(B, T, H, dn + dv).transpose(1, 2).split([dn, dv], -1)
    k, v = cache.update(torch.cat((k_nope, k_rope[:, None].expand(B, H, T, dr)), dim=-1), v, pos)
    q = torch.cat((q_nope, mla_moe.apply_rotary(q_rope, cos, sin)), dim=-1)
    mask = None if T == 1 else torch.ones(T, pos + T, dtype=torch.bool, device=x.device).tril(pos)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
    return self.o_proj(y.transpose(1, 2).reshape(B, T, H * dv))


@contextlib.contextmanager
def expanded_cache():
    """Inside: generate (and anything else making mla_moe.LatentCache) makes ExpandedCaches, MLA decodes with them."""
    saved = mla_moe.LatentCache, mla_moe.MLA.forward
    mla_moe.LatentCache, mla_moe.MLA.forward = ExpandedCache, expanded_forward
    try:
        yield
    finally:
        mla_moe.LatentCache, mla_moe.MLA.forward = saved


@torch.no_grad()
def latent_rows(model, c, rounds, seed):
    """Greedy decode with the latent cache vs the expanded one (a timed row), and each cache's bytes per token."""
    (P, N), latent_n, mha_n = c["latent_tokens"], *model.kv_bytes_per_token(1)
    prompt = torch.randint(0, VOCAB, (1, P), generator=torch.Generator().manual_seed(seed + 3))

    def expanded(n):
        with expanded_cache():
            return model.generate(prompt, n, temperature=0.0)

    def cache_bytes(kind):  # a prefill into the caches generate would make for P + N tokens
        with expanded_cache() if kind == "expanded" else contextlib.nullcontext():
            cache = [mla_moe.LatentCache(P + N) for _ in model.model.layers]
            model.hidden(prompt, cache)
        return sum(t.nbytes for layer in cache for t in vars(layer).values() if torch.is_tensor(t)) / (P + N)

    times, outputs = harness.run_rounds({"latent": (N, harness.greedy(model, prompt), expanded)}, rounds, "cache round")
    row = harness.ratio_row("latent_vs_expanded", f"greedy decode {N} tok after {P}, latent cache", "expanded cache",
                            None, *times["latent"])
    checks = {"latent_vs_expanded_tokens_identical": torch.equal(*outputs["latent"])}
    for kind, numbers in (("latent", latent_n), ("expanded", mha_n)):
        checks[f"{kind}_bytes_per_token"] = cache_bytes(kind)
        checks[f"{kind}_bytes_match"] = checks[f"{kind}_bytes_per_token"] == numbers * 4
    return row, checks


def v3_cache_numbers():
    """DeepSeek-V3's cache numbers per token (latent, expanded) from mla_moe.Config()'s defaults on the meta device,
    checked against the formula, and its parameters (all, active): computed, nothing allocated."""
    with torch.device("meta"):
        m = mla_moe.DeepSeek(mla_moe.Config())
    c = m.config
    formula = ((c.kv_lora_rank + c.qk_rope_head_dim) * c.n_layer,
               c.n_head * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim) * c.n_layer)
    return dict(latent=formula[0], expanded=formula[1], params=m.num_params(False),
                params_active=m.num_params(active=True), match=m.kv_bytes_per_token(1) == formula)


def active_flops(model):
    """Training FLOPs per token as mla_moe.py counts them: active parameters, attention over qk and v head dims."""
    c = model.config
    return (6 * model.num_params(active=True)
            + 6 * c.n_layer * c.n_head * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim) * c.block_size)


def gpu_rows(batch_size, device="cuda", cfg=None, steps=30, warmup=5, compiles=(True, False), pad_shape=None):
    """{"compile" / "no compile": train_throughput result, "pad_v": pad_v_row at the model's attention shape},
    printed. (device, cfg, the step counts, compiles and pad_shape exist only to smoke-test this on a CPU with a
    tiny model.)"""
    cfg = cfg or DEEPSEEK_GPU
    settings = {("compile" if comp else "no compile"): comp for comp in compiles}
    options = {name: dict(compile=comp, flops_per_token=active_flops) for name, comp in settings.items()}
    out = harness.train_throughputs({name: lambda: mla_moe.DeepSeek(mla_moe.Config(**cfg)) for name in settings},
                                    batch_size, device, steps, warmup, options)
    with torch.device("meta"):
        m = mla_moe.DeepSeek(mla_moe.Config(**cfg))
    c = m.config
    shape = (f"DeepSeek {c.n_layer}x{c.n_embd}, {c.n_expert} experts top {c.top_k_experts} + "
             f"{c.n_shared_experts} shared, {m.num_params(active=True) / 1e6:.1f}M active of "
             f"{m.num_params() / 1e6:.1f}M params,")
    for g in out.values():
        g["params_active"] = m.num_params(active=True)
        print(harness.gpu_line(shape, g))
    try:
        out["pad_v"] = pad_v_row(device, pad_shape or (batch_size, c.n_head, c.block_size,
                                                       c.qk_nope_head_dim + c.qk_rope_head_dim, c.v_head_dim))
    except Exception as e:  # never run on a GPU yet: keep the rows above
        out["pad_v"] = dict(error=f"{type(e).__name__}: {e}"[:2000])
        print(f"MLA attention rows failed: {out['pad_v']['error'][:300]}")
    return out


def pad_v_row(device, shape, reps=20):
    """Issue 19: MLA's attention alone, forward + backward in bf16 (float32 off CUDA), shape (B, H, T, q/k head dim,
    v head dim): scaled_dot_product_attention as mla_moe.py calls it, against v padded with zeros to the q/k head
    dim and the output cut back (what reference implementations do for FlashAttention, which wants one head dim).
    The padding changes no number: the extra output columns are zeros. Medians of reps calls; the backend each
    way can use is the one SDPA picks. Printed; returns the row (which to keep is for this measurement)."""
    device = torch.device(device)
    B, H, T, d_qk, d_v = shape
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(B, H, T, d, device=device, dtype=dtype, generator=g).requires_grad_()
               for d in (d_qk, d_qk, d_v))
    ways = {"as is": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
            "v padded": lambda: F.scaled_dot_product_attention(q, k, F.pad(v, (0, d_qk - d_v)), is_causal=True)[..., :d_v]}
    def fwd_bwd(f):
        q.grad = k.grad = v.grad = None
        y = f()
        y.backward(torch.ones_like(y))
        return y.detach(), v.grad.clone()

    row, outs = dict(shape=list(shape)), {}
    for name, f in ways.items():  # the first call is a warmup
        _, row[f"{name.replace(' ', '_')}_s"], outs[name] = harness.timed(lambda: fwd_bwd(f), reps, device)
    row["y_max_abs_diff"] = (outs["as is"][0] - outs["v padded"][0]).abs().max().item()
    row["v_grad_max_abs_diff"] = (outs["as is"][1] - outs["v padded"][1]).abs().max().item()
    print(f"MLA attention on {device.type}, B={B} H={H} T={T}, q/k head {d_qk}, v head {d_v}, fwd+bwd: as is "
          f"{row['as_is_s'] * 1e3:.2f} ms, v padded to {d_qk} {row['v_padded_s'] * 1e3:.2f} ms | as is / padded "
          f"{row['as_is_s'] / row['v_padded_s']:.2f}x | y differs by {row['y_max_abs_diff']:.1e}, v's gradient by "
          f"{row['v_grad_max_abs_diff']:.1e}")
    return row


def main():
    p = harness.common_args(argparse.ArgumentParser(
        description="mla_moe.py vs transformers' DeepseekV3ForCausalLM, and its latent cache vs an expanded one "
                    "(see the docstring)"))
    args = harness.parse_args(p)

    info = harness.machine()
    c = CONFIGS["quick" if args.quick else "default"]
    ours, rows, checks, config = cpu_rows(c, args.rounds, args.seed)
    q_rank, kv_rank, dn, dr, dv = c["mla"]
    print(f"model: {c['n_layer']} layers ({N_DENSE} dense), {c['n_embd']} wide, {c['n_head']} heads, MLA q latent "
          f"{q_rank}, kv latent {kv_rank}, nope/rope/v {dn}/{dr}/{dv}, {N_EXPERT} experts of {c['expert']} top {TOP_K} "
          f"({N_GROUP} groups, top {TOPK_GROUP}) + {N_SHARED} shared, vocab {VOCAB}, {config['params'] / 1e6:.1f}M "
          f"params ({config['params_active'] / 1e6:.1f}M active, {config['params_with_embedding'] / 1e6:.1f}M with the "
          f"input embedding) | init std {INIT_STD}, gate bias std {BIAS_STD} | fp32 | HF attention "
          f"{config['hf_attn_implementation']}, experts {config['hf_experts_implementation']} (and "
          f"{config['hf_eager_experts_implementation']}) | {args.rounds} rounds + 1 warmup, alternating, medians")
    latent_row, latent_checks = latent_rows(ours, c, args.rounds, args.seed)
    checks.update(latent_checks)
    dispatch, dispatch_checks, shapes = dispatch_rows(args.rounds, args.seed, args.quick)
    checks.update(dispatch_checks)
    harness.print_ratio_table(rows + [latent_row] + dispatch)
    print(f"logits vs HF: max diff {checks['logits_max_diff']:.1e} | train loss: ours {checks['train_loss_ours']:.6f}, "
          f"HF {checks['train_loss_ref']:.6f}, HF eager {checks['train_eager_loss_ref']:.6f} | train throughput: "
          f"ours {rows[0]['tokens_per_s_ours']:,.0f} tok/s, HF {rows[0]['tokens_per_s_ref']:,.0f} tok/s | gate bias "
          f"changes the experts of {100 * checks['bias_rerouted_fraction']:.0f}% of the tokens (first MoE layer)")
    print(f"greedy tokens identical to HF: {checks['decode_tokens_identical']} "
          f"({checks['decode_distinct_tokens']} distinct of {c['decode']}) | with and without the latent cache: "
          f"{checks['kv_cache_tokens_identical']} | latent vs expanded cache: "
          f"{checks['latent_vs_expanded_tokens_identical']}")
    print("MoE ranking, peak bytes of one call (torch.profiler's allocations), stable sort vs one-hot: " + ", ".join(
        f"{N} tok x {E} experts top {k}: {checks[f'dispatch_{E}_peak_bytes'] / 2**20:.2f} MiB vs "
        f"{checks[f'dispatch_{E}_one_hot_peak_bytes'] / 2**20:.1f} MiB" for N, E, k in shapes)
          + f" | ranks equal: {all(checks[f'dispatch_{E}_ranks_match'] for _, E, _ in shapes)}")
    harness.print_legend(args.quick)

    v3 = v3_cache_numbers()
    checks["v3_cache_formula_match"] = v3["match"]
    c3 = mla_moe.Config()
    print(f"cache per token, measured from the tensors after a prefill (this model, fp32); DeepSeek-V3 "
          f"(mla_moe.Config(): {c3.n_layer} layers, {c3.n_head} heads, latent {c3.kv_lora_rank} + rope "
          f"{c3.qk_rope_head_dim}, nope {c3.qk_nope_head_dim}, v {c3.v_head_dim}; {v3['params'] / 1e9:.1f}B params, "
          f"{v3['params_active'] / 1e9:.1f}B active) computed, not measured, in bf16:")
    bench = [checks[f"{kind}_bytes_per_token"] for kind in ("latent", "expanded")]
    harness.print_table(("model", "latent B/token", "expanded B/token", "expanded / latent", "how"), [
        (f"bench, {c['n_layer']} x {c['n_embd']}", *(f"{b:,.0f}" + ("" if b == 4 * n else f" MISMATCH ({4 * n:,})")
                                                      for b, n in zip(bench, ours.kv_bytes_per_token(1))),
         f"{bench[1] / bench[0]:.1f}x", "measured, fp32"),
        ("DeepSeek-V3", f"{2 * v3['latent']:,}", f"{2 * v3['expanded']:,}", f"{v3['expanded'] / v3['latent']:.1f}x",
         "computed, bf16")])

    gpu, gpu_ok = harness.gpu_section(lambda: gpu_rows(args.batch_size))
    # status 1: logits or losses off HF, different tokens (HF, no cache, expanded cache), a cache size that is not
    # kv_bytes_per_token, or the GPU rows failed
    harness.finish(T_START, info, args.json, gpu_ok and harness.passed(checks), config=config, rounds=args.rounds,
                   rows=rows + [latent_row] + dispatch, checks=checks, deepseek_v3_cache=v3, gpu=gpu)


if __name__ == "__main__":
    main()
