"""Benchmark mixtral.py against Hugging Face transformers' MixtralForCausalLM on the same weights, and its
mixture-of-experts dispatch against a plain loop over the experts.

A random Mixtral-shaped model (grouped-query attention, 8 experts, top 2) is built with transformers
(seeded), written with save_pretrained and read back with mixtral.from_pretrained, so both sides hold
identical fp32 weights; its logits must match HF's within 1e-4. As in bench_llama2.py the weights are drawn
with std 0.1, not 0.02, so that greedy decoding does not fall into a loop of a few tokens and the token check
means something. Rounds, warmup, medians and ratios are harness.py's: each round runs every measurement once
per implementation, the order flipping each round, round 0 a warmup; ratio = reference / ours (> 1: ours faster).

  train step     forward + backward, train mode, dropless routing, same batch and targets, no optimizer step,
                 against HF with the experts implementation transformers picks by default (grouped_mm)
  train, eager   the same against HF with experts_implementation="eager": its loop over the experts
  decode         greedy, batch 1, both with their KV cache; the generated tokens must be identical
  decode, vocab  the same at issue 19's shape: the same layers, vocab 4096, a 16-token prompt, 64 new tokens (a
                 smaller head: the experts weigh more); tokens identical. One token routes to k N = 2 <= 8
                 pairs, so mixtral.py decodes through chosen_experts (the chosen experts only, read in place)
  KV cache       mixtral.py with its cache vs mixtral.py recomputing the whole prefix at every token (reported)
  MoE layer      forward + backward of one mixtral.SparseMoE on (B, T, n_embd) against its forward_loop, the
                 paper's loop over the experts on the same weights and routing (each expert: gather its tokens,
                 SwiGLU, scale by the routing weight, add back); output and gradients must agree. Three rows: dropless (F.grouped_mm);
                 dropless with mixtral.GROUPED_MM = False (expert_mlp's own loop over the experts); capacity
                 mode (train mode, capacity_factor 1.25: one batched matmul over fixed-size expert buffers, may
                 drop tokens, so timed only)
  window cache   KV cache bytes of a small Mixtral after a prefill of 128 and 1024 tokens and a few decode
                 steps: with sliding_window W, Mistral's rolling buffer (KVCache(W), as generate makes), vs the
                 same weights without a window and a cache of the whole text; each must give the logits of
                 its model's forward without a cache
  GPU            only with CUDA: training throughput and MFU of a Mixtral of GPT-2 124M's shape (12 x 768,
                 12 heads, 4 kv heads, 8 experts top 2, vocab 50257, T=1024), dropless and capacity 1.25, each
                 with torch.compile and without; MFU counts the active parameters (top 2 of 8 experts) as
                 mixtral.py's training loop does: 6 N_active + 12 n_layer n_head head_dim T FLOPs per token

    python benchmarks/bench_mixtral.py                  # a few minutes on 2 CPU cores
    python benchmarks/bench_mixtral.py --quick          # tiny model, a smoke test (~10-30 s)
    python benchmarks/bench_mixtral.py --json out.json  # also write the results as JSON
"""
import time

T_START = time.perf_counter()  # the wall time printed at the end includes the imports

import argparse
import copy
import sys
from pathlib import Path

import torch
from transformers import MixtralConfig, MixtralForCausalLM

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # the models at the repo root, harness.py beside this file
import harness  # noqa: E402
import mixtral  # noqa: E402

# CPU sizes: GPT-2's vocabulary, a 1024 context, 4 narrow layers of 8 experts (top 2), GQA; moe_tokens = B x T
CONFIGS = {
    "default": dict(n_layer=4, n_head=4, n_kv_head=2, n_embd=256, batch=4, seq=256, prompt=8, decode=128,
                    kv_tokens=256, moe_tokens=(4, 512)),
    "quick": dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, batch=2, seq=64, prompt=8, decode=32, kv_tokens=64,
                  moe_tokens=(2, 256)),
}
VOCAB, CONTEXT, INIT_STD, N_EXPERT, TOP_K, CAPACITY = 50257, 1024, 0.1, 8, 2, 1.25
# GPU: a Mixtral of GPT-2 124M's shape, 8 experts of SwiGLU width 8/3 x 768 = 2048, top 2, untied head
MIXTRAL_GPU = dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_kv_head=4, n_embd=768,
                   intermediate_size=0, n_expert=8, top_k_experts=2)
GPU_SETTINGS = {"dropless, compile": (0.0, True), "dropless, no compile": (0.0, False),  # capacity_factor, compile
                f"capacity {CAPACITY}, compile": (CAPACITY, True), f"capacity {CAPACITY}, no compile": (CAPACITY, False)}


def swiglu_width(n_embd):
    """mixtral.Config's default width (intermediate_size=0: 8/3 n_embd rounded up to a multiple of 64), given to
    HF explicitly (MixtralConfig's own default is Mixtral 8x7B's 14336)."""
    cfg = mixtral.Config(vocab_size=1, n_layer=1, n_head=1, n_kv_head=1, n_embd=n_embd, intermediate_size=0)
    return cfg.intermediate_size


def cpu_rows(c, rounds, seed):
    torch.manual_seed(seed)
    hf_cfg = MixtralConfig(vocab_size=VOCAB, max_position_embeddings=CONTEXT, num_hidden_layers=c["n_layer"],
                           num_attention_heads=c["n_head"], num_key_value_heads=c["n_kv_head"],
                           hidden_size=c["n_embd"], intermediate_size=swiglu_width(c["n_embd"]),
                           num_local_experts=N_EXPERT, num_experts_per_tok=TOP_K, initializer_range=INIT_STD,
                           attention_dropout=0.0, sliding_window=None)
    hf = MixtralForCausalLM(hf_cfg)
    ours = harness.load_via_checkpoint(hf, mixtral.from_pretrained)
    ours.config.aux_loss_coef = ours.config.z_loss_coef = 0.0  # the cross-entropy alone, as HF's loss here
    hf_eager = copy.deepcopy(hf)  # the same weights, HF's loop over the experts
    hf_eager.set_experts_implementation("eager")
    idx = torch.randint(0, VOCAB, (c["batch"], c["seq"]), generator=torch.Generator().manual_seed(seed + 2))
    with torch.no_grad():
        logits_diff = (ours.eval()(idx)[0] - hf.eval()(idx).logits).abs().max().item()
    rows, checks, outputs = harness.lm_rows(ours, hf, c, rounds, seed, VOCAB, kv_target=None,
                                            train_refs=[("train_eager", "HF eager experts", hf_eager)])
    checks.update(logits_max_diff=logits_diff, logits_match=logits_diff < 1e-4,
                  decode_distinct_tokens=len(set(outputs["decode"][0][0, c["prompt"]:].tolist())),
                  train_loss_match=max(abs(checks["train_loss_ours"] - checks[k]) for k in
                                       ("train_loss_ref", "train_eager_loss_ref")) < 1e-4)
    rows[0]["tokens_per_s_ref"] = c["batch"] * c["seq"] / rows[0]["ref_median_s"]
    config = dict(c, vocab_size=VOCAB, max_position_embeddings=CONTEXT, intermediate_size=hf_cfg.intermediate_size,
                  n_expert=N_EXPERT, top_k=TOP_K, initializer_range=INIT_STD, params=ours.num_params(),
                  params_active=ours.num_params(active=True), params_with_embedding=ours.num_params(False),
                  hf_attn_implementation=hf.config._attn_implementation,
                  hf_experts_implementation=hf.config._experts_implementation,
                  hf_eager_experts_implementation=hf_eager.config._experts_implementation, seed=seed)
    return rows, checks, config


def decode_vocab_rows(c, rounds, seed, vocab=4096, prompt_len=16):
    """Greedy decode, batch 1, against HF at c's layers with a vocabulary of `vocab` (issue 19's shape): a row and the
    check that the tokens are identical."""
    torch.manual_seed(seed)
    hf = MixtralForCausalLM(MixtralConfig(
        vocab_size=vocab, max_position_embeddings=CONTEXT, num_hidden_layers=c["n_layer"],
        num_attention_heads=c["n_head"], num_key_value_heads=c["n_kv_head"], hidden_size=c["n_embd"],
        intermediate_size=swiglu_width(c["n_embd"]),
        num_local_experts=N_EXPERT, num_experts_per_tok=TOP_K, initializer_range=INIT_STD, attention_dropout=0.0,
        sliding_window=None)).eval()
    ours = harness.load_via_checkpoint(hf, mixtral.from_pretrained)
    prompt = torch.randint(0, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(seed + 1))
    eos = hf.generation_config.eos_token_id

    def gen_hf(n):
        return hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=eos,
                           attention_mask=torch.ones_like(prompt))

    n = c["decode"] // 2
    cases = {"decode_vocab": (n, harness.greedy(ours, prompt), gen_hf)}
    times, outputs = harness.run_rounds(cases, rounds, "decode round")
    row = harness.ratio_row("decode_vocab", f"greedy decode {n} tok after {prompt_len}, vocab {vocab}", "HF", 1.0,
                            *times["decode_vocab"])
    return [row], {"decode_vocab_tokens_identical": torch.equal(*outputs["decode_vocab"])}


def moe_rows(c, rounds, seed):
    """One SparseMoE's forward + backward (train mode, dropout 0) vs its forward_loop on the same input."""
    torch.manual_seed(seed)
    moe = mixtral.SparseMoE(mixtral.Config(vocab_size=1, n_layer=1, n_head=c["n_head"], n_kv_head=c["n_kv_head"],
                                           n_embd=c["n_embd"], intermediate_size=0, n_expert=N_EXPERT,
                                           top_k_experts=TOP_K)).train()
    with torch.no_grad():  # weights of std 1/sqrt(fan_in): outputs and gradients of order 1
        for p in moe.parameters():
            p.normal_(0.0, p.size(-1) ** -0.5)
    x, grad = torch.randn(*c["moe_tokens"], c["n_embd"]), torch.randn(*c["moe_tokens"], c["n_embd"])
    grouped_mm = mixtral.GROUPED_MM

    def step(fn, capacity=0.0, grouped=True):  # each run sets the mode it times; restored after the rounds
        def run(_):
            moe.capacity_factor, mixtral.GROUPED_MM = capacity, grouped and grouped_mm
            moe.zero_grad(set_to_none=True)
            xg = x.clone().requires_grad_()
            y = fn(xg)
            y.backward(grad)
            return [y.detach(), xg.grad] + [p.grad for p in moe.parameters()]

        return run

    def ours(x):
        return moe(x)[0]

    n = x.numel() // x.size(-1)
    variants = {  # key: (label, target, ours); the reference is SparseMoE.forward_loop in each
        "moe": (f"MoE layer fwd+bwd, dropless (grouped_mm), {n} tok x {c['n_embd']}, {N_EXPERT} experts top {TOP_K}",
                1.0, step(ours)),
        "moe_no_grouped_mm": ("MoE layer, dropless, GROUPED_MM = False", 1.0, step(ours, grouped=False)),
        "moe_capacity": (f"MoE layer, capacity {CAPACITY} (train mode)", None, step(ours, capacity=CAPACITY)),
    }
    ref = step(moe.forward_loop)
    times, outputs = harness.run_rounds({k: (0, f, ref) for k, (_, _, f) in variants.items()}, rounds, "MoE round")
    mixtral.GROUPED_MM, moe.capacity_factor = grouped_mm, CAPACITY
    with torch.no_grad():
        checks = {"moe_capacity_dropped_fraction": moe(x)[1][2].item()}  # stats: balance, z, dropped, loads
    moe.capacity_factor = 0.0
    rows = [harness.ratio_row(k, label, "loop", target, *times[k]) for k, (label, target, _) in variants.items()]
    for key in ("moe", "moe_no_grouped_mm"):
        ours_out, ref_out = outputs[key]
        out_diff = (ours_out[0] - ref_out[0]).abs().max().item()
        grad_rel = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(ours_out[1:], ref_out[1:]))
        checks.update({f"{key}_out_max_diff": out_diff, f"{key}_grad_max_rel_diff": grad_rel,
                       f"{key}_match": out_diff < 1e-4 and grad_rel < 1e-5})
    return rows, checks


@torch.no_grad()
def window_rows(seed, window=64, lengths=(128, 1024), steps=4):
    """KV cache bytes of a small Mixtral after a prefill of L tokens and `steps` decode steps: with a sliding
    window, a rolling KVCache(window) per layer, as generate makes; without one (the same weights), a
    KVCache(L + steps) holding the whole text. Each must give the logits of its model's forward over the whole
    text without a cache (at the last steps + 1 places)."""
    torch.manual_seed(seed)
    cfg = dict(vocab_size=256, block_size=2048, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=0)
    models = {"rolling": mixtral.Mixtral(mixtral.Config(**cfg, sliding_window=window)).eval()}
    for p in models["rolling"].parameters():  # std 0.1 as above: attention far from uniform, the window matters
        if p.dim() >= 2:
            p.normal_(0.0, INIT_STD)
    models["full"] = mixtral.Mixtral(mixtral.Config(**cfg)).eval()
    models["full"].load_state_dict(models["rolling"].state_dict())
    rows = []
    for L in lengths:
        ids = torch.randint(0, 256, (1, L + steps), generator=torch.Generator().manual_seed(seed + L))
        row = dict(window=window, prompt=L, tokens=L + steps)
        for kind, size in (("rolling", window), ("full", L + steps)):
            model, cache = models[kind], [mixtral.RollingKVCache(size) for _ in models[kind].model.layers]
            logits = [model(ids[:, :L], cache=cache)[0][0, -1]]
            logits += [model(ids[:, p:p + 1], cache=cache, pos=p)[0][0, -1] for p in range(L, L + steps)]
            row[f"{kind}_bytes"] = sum(c.k.nbytes + c.v.nbytes for c in cache)
            row[f"{kind}_logits_max_diff"] = (torch.stack(logits) - model(ids)[0][0, L - 1:]).abs().max().item()
        rows.append(row)
    per_slot = 2 * cfg["n_layer"] * cfg["n_kv_head"] * (cfg["n_embd"] // cfg["n_head"]) * 4  # K and V, fp32
    checks = {"window_cache_bytes_match": all(r["rolling_bytes"] == per_slot * window and
                                              r["full_bytes"] == per_slot * r["tokens"] for r in rows),
              "window_logits_match": all(max(r["rolling_logits_max_diff"], r["full_logits_max_diff"]) < 1e-4
                                         for r in rows)}
    return rows, checks


def active_flops(model):
    """Training FLOPs per token as mixtral.py counts them: active parameters, PaLM's attention term."""
    cfg = model.config
    span = min(cfg.block_size, cfg.sliding_window or cfg.block_size)
    return 6 * model.num_params(active=True) + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * span


def gpu_rows(batch_size, device="cuda", cfg=None, steps=30, warmup=5, settings=None):
    """{setting: train_throughput result} for GPU_SETTINGS, printed. (device, cfg, the step counts and settings, a
    part of GPU_SETTINGS, exist only to smoke-test this on a CPU with a tiny model.)"""
    cfg = cfg or MIXTRAL_GPU
    settings = settings or GPU_SETTINGS
    builds = {name: (lambda cf=cf: mixtral.Mixtral(mixtral.Config(**cfg, capacity_factor=cf)))
              for name, (cf, _) in settings.items()}
    options = {name: dict(compile=comp, flops_per_token=active_flops) for name, (_, comp) in settings.items()}
    out = harness.train_throughputs(builds, batch_size, device, steps, warmup, options)
    with torch.device("meta"):
        m = mixtral.Mixtral(mixtral.Config(**cfg))
    shape = (f"Mixtral {m.config.n_layer}x{m.config.n_embd}, {m.config.n_expert} experts top {m.config.top_k_experts}, "
             f"{m.num_params(active=True) / 1e6:.1f}M active of {m.num_params() / 1e6:.1f}M params")
    for name, g in out.items():
        g["params_active"] = m.num_params(active=True)
        print(harness.gpu_line(f"{shape}, {name.split(',')[0]},", g))
    return out


def main():
    p = harness.common_args(argparse.ArgumentParser(
        description="mixtral.py vs transformers' MixtralForCausalLM, and its MoE dispatch vs a loop (see the docstring)"))
    args = harness.parse_args(p)

    info = harness.machine()
    c = CONFIGS["quick" if args.quick else "default"]
    rows, checks, config = cpu_rows(c, args.rounds, args.seed)
    print(f"model: {config['n_layer']} layers, {config['n_embd']} wide, {config['n_head']} heads, "
          f"{config['n_kv_head']} kv heads, {N_EXPERT} experts top {TOP_K} of SwiGLU {config['intermediate_size']}, "
          f"vocab {VOCAB}, {config['params'] / 1e6:.1f}M params ({config['params_active'] / 1e6:.1f}M active, "
          f"{config['params_with_embedding'] / 1e6:.1f}M with the input embedding) | init std {INIT_STD} | fp32 | "
          f"HF attention {config['hf_attn_implementation']}, experts {config['hf_experts_implementation']} "
          f"(and {config['hf_eager_experts_implementation']}) | {args.rounds} rounds + 1 warmup, alternating, medians")
    decode, decode_checks = decode_vocab_rows(c, args.rounds, args.seed)
    rows += decode
    checks.update(decode_checks)
    moe, moe_checks = moe_rows(c, args.rounds, args.seed)
    checks.update(moe_checks)
    harness.print_ratio_table(rows + moe)
    print(f"logits vs HF: max diff {checks['logits_max_diff']:.1e} | train loss: ours {checks['train_loss_ours']:.6f}, "
          f"HF {checks['train_loss_ref']:.6f}, HF eager {checks['train_eager_loss_ref']:.6f} | train throughput: "
          f"ours {rows[0]['tokens_per_s_ours']:,.0f} tok/s, HF {rows[0]['tokens_per_s_ref']:,.0f} tok/s")
    print(f"greedy tokens identical to HF: {checks['decode_tokens_identical']} "
          f"({checks['decode_distinct_tokens']} distinct of {c['decode']}; vocab 4096: "
          f"{checks['decode_vocab_tokens_identical']}) | "
          f"with and without the KV cache: {checks['kv_cache_tokens_identical']}")
    print(f"MoE layer vs loop: output max diff {checks['moe_out_max_diff']:.1e}, gradients max rel diff "
          f"{checks['moe_grad_max_rel_diff']:.1e} (GROUPED_MM = False: {checks['moe_no_grouped_mm_out_max_diff']:.1e}, "
          f"{checks['moe_no_grouped_mm_grad_max_rel_diff']:.1e}) | capacity {CAPACITY} dropped "
          f"{100 * checks['moe_capacity_dropped_fraction']:.1f}% of the (token, expert) pairs")
    harness.print_legend(args.quick)

    window, window_checks = window_rows(args.seed)
    checks.update(window_checks)
    print(f"KV cache bytes (2 layers x 64, 2 kv heads, fp32) after a prefill and a few decode steps, sliding_window "
          f"{window[0]['window']} vs none; logits max diff vs the same model without a cache:")
    harness.print_table(("tokens in the text", f"rolling KVCache({window[0]['window']})", "full cache (no window)",
                         "rolling / full", "logits diff rolling / full"),
                        [(r["tokens"], f"{r['rolling_bytes']:,} B", f"{r['full_bytes']:,} B",
                          f"{r['rolling_bytes'] / r['full_bytes']:.3f}",
                          f"{r['rolling_logits_max_diff']:.1e} / {r['full_logits_max_diff']:.1e}") for r in window])

    gpu, gpu_ok = harness.gpu_section(lambda: gpu_rows(args.batch_size))
    # status 1: logits or losses off HF, different tokens, the MoE layer off the loop, a window cache that is not
    # W slots or gives other logits, or the GPU rows failed
    harness.finish(T_START, info, args.json, gpu_ok and harness.passed(checks), config=config, rounds=args.rounds,
                   rows=rows + moe, checks=checks, window_cache=window, gpu=gpu)


if __name__ == "__main__":
    main()
