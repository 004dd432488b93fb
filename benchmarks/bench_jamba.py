"""Benchmark jamba.py against Hugging Face transformers' JambaForCausalLM on the same weights; its hybrid cache's
bytes and per-token decoding time at growing context against llama2.py and mamba.py of similar size.

A random Jamba (M M A M: one attention layer in four, at 2; the MoE in layers 1 and 3, 16 experts, top 2; GQA 4
heads / 2 kv heads; d_state 16, expand 2, conv 4; GPT-2's vocabulary) is built with transformers (seeded, HF's own
init), written with save_pretrained and read back with jamba.from_pretrained, so both sides hold identical fp32
weights; the train losses must agree. Rounds, warmup, medians and ratios are harness.py's: each round runs every
measurement once per side, the order flipping each round, round 0 a warmup; ratio = reference / ours (> 1: ours
faster).

Which path the reference runs: mamba_ssm and causal_conv1d are not installed, so JambaMambaMixer takes its
pure-PyTorch path: in eager training the sequential loop over time of mamba_selective_scan (its associative scan
is only taken while torch.compile traces the model), in decoding its one-step update; its experts loop over the
experts that got tokens (JambaExperts, the default "eager" experts implementation).

  train step   forward + backward, train mode, same batch and targets, no optimizer step (target >= 1x: no slower);
               losses must agree within 1e-4: the cross-entropy alone (ours with aux_loss_coef 0, as HF adds its
               balance loss only with output_router_logits, off by default)
  decode       greedy, batch 1, an 8-token prompt; ours with its hybrid cache, HF with its cache (target >= 1x); the
               generated tokens must be identical
  cache        ours with the hybrid cache vs ours recomputing the whole text at every token (reported)
  context      time per new token, greedy, batch 1, after a prompt of 128, 1024 and 4096 tokens: jamba.py (the model
               above) against llama2.Llama (4 layers, the same width, GQA 4/2: all attention) and mamba.Mamba (8
               layers, the same width: all Mamba), random init, all three from their caches: the prompt is prefilled
               once (not timed), then each round restores the cache (the Mamba states copied back into the tensors a
               step advances in place; KV slots past the prompt are rewritten) and times 32 steps of hidden() on the
               last token + lm_head + argmax, what generate does per token (the tokens are checked against
               generate's). Cache bytes per sequence at each context: counted from the cache's tensors (must equal
               jamba's cache_bytes, mamba's state_bytes, llama2's kv_bytes_per_token x length), fp32
  GPU          only with CUDA: training throughput and MFU of a Jamba of about 125M active parameters (8 x 768, the
               paper's 1:7 ratio: one attention layer at 4; 16 experts, top 2, in every other layer, SwiGLU 2048; GQA
               12/4; GPT-2's vocabulary; T=2048), bf16 autocast + fused AdamW, torch.compile on and off; MFU counts
               jamba.flops_per_token (6 x active parameters + the attention layer's scores), as the training loop does

    python benchmarks/bench_jamba.py                  # a few minutes on 2 CPU cores
    python benchmarks/bench_jamba.py --quick          # tiny model, a smoke test
    python benchmarks/bench_jamba.py --json out.json  # also write the results as JSON
"""
import time

T_START = time.perf_counter()  # the wall time printed at the end includes the imports

import argparse
import sys
from pathlib import Path

import torch
from transformers import JambaConfig, JambaForCausalLM

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # the models at the repo root, harness.py beside this file
import harness  # noqa: E402
import jamba  # noqa: E402
import llama2  # noqa: E402
import mamba  # noqa: E402

# CPU sizes: GPT-2's vocabulary, 4 layers 256 wide (d_inner 512). The train batch is 4 x 128: HF's loop over time
# costs O(T^2) in backward (see bench_mamba.py). ctx: the prompt lengths of the context rows, ctx_new tokens timed
# after each.
CONFIGS = {
    "default": dict(n_layer=4, n_embd=256, batch=4, seq=128, prompt=8, decode=64, kv_tokens=64, ctx=(128, 1024, 4096),
                    ctx_new=32),
    "quick": dict(n_layer=4, n_embd=64, batch=2, seq=32, prompt=8, decode=16, kv_tokens=16, ctx=(32, 256), ctx_new=8),
}
VOCAB = 50257
LAYOUT = dict(num_attention_heads=4, num_key_value_heads=2, num_experts=16, num_experts_per_tok=2, attn_layer_period=4,
              attn_layer_offset=2, expert_layer_period=2, expert_layer_offset=1, mamba_d_state=16, mamba_expand=2,
              mamba_d_conv=4)
# GPU: about 125M active parameters (lm_head included), the paper's layer ratio and MoE (section 3)
JAMBA_GPU = dict(vocab_size=50257, block_size=2048, n_layer=8, n_head=12, n_kv_head=4, n_embd=768, intermediate_size=2048,
                 n_expert=16, top_k_experts=2, attn_layer_period=8, attn_layer_offset=4, expert_layer_period=2,
                 expert_layer_offset=1, d_state=16, expand=2, d_conv=4)


def cpu_rows(c, rounds, seed):
    """Rows 1-3 (train, decode, cache) through harness.lm_rows; returns rows, checks, config, ours."""
    torch.manual_seed(seed)
    width = -(-8 * c["n_embd"] // 3 // 64) * 64
    hf_cfg = JambaConfig(vocab_size=VOCAB, hidden_size=c["n_embd"], intermediate_size=width,
                         num_hidden_layers=c["n_layer"], **LAYOUT)
    hf = JambaForCausalLM(hf_cfg)
    ours = harness.load_via_checkpoint(hf, jamba.from_pretrained)
    ours.config.aux_loss_coef = 0.0  # HF adds its balance loss only with output_router_logits (default off)
    rows, checks, outputs = harness.lm_rows(ours, hf, c, rounds, seed, VOCAB, kv_target=None)  # cache: reported
    r = rows[0]
    rows[0]["tokens_per_s_ref"] = c["batch"] * c["seq"] / r["ref_median_s"]
    rows[1]["label"] = f"greedy decode {c['decode']} tok, hybrid cache"
    rows[2]["label"] = f"ours hybrid cache vs recompute, {c['kv_tokens']} tok"
    loss_ours, loss_ref = checks["train_loss_ours"], checks["train_loss_ref"]
    checks["train_loss_match"] = abs(loss_ours - loss_ref) <= 1e-4 * max(1.0, abs(loss_ref))
    checks["decode_distinct_tokens"] = len(set(outputs["decode"][0][0, c["prompt"]:].tolist()))
    config = dict(c, vocab_size=VOCAB, **LAYOUT, intermediate_size=width, params=ours.num_params(),
                  active_params=ours.num_params(active=True), seed=seed)
    return rows, checks, config, ours


# --------------------------------------------------------------------------------------- context

def stepper(model, prompt, n_max, cache, pos_arg=True):
    """Prefill prompt (1, L) once into cache (its last position gives the first new token); returns n -> the n + 1
    greedy tokens after the prompt, n of them one step each from the cache the prompt left. The Mamba states a step
    advances in place are copied back first; KV slots past the prompt are rewritten."""
    V, L = model.config.vocab_size, prompt.size(1)

    def hidden(tok, pos):
        return model.hidden(tok, cache, pos)[0] if pos_arg else model.hidden(tok, cache)  # jamba's: (x, router)

    with torch.no_grad():
        first = model.lm_head(hidden(prompt, 0)[:, -1])[:, :V].argmax(-1, keepdim=True)
    states = [c for c in cache if isinstance(c, (jamba.MambaState, mamba.MambaState))]
    saved = [(s.conv.clone(), s.ssm.clone()) for s in states]

    @torch.no_grad()
    def run(n):
        for s, (conv, ssm) in zip(states, saved):
            s.conv.copy_(conv)
            s.ssm.copy_(ssm)
        tok, out = first, [first]
        for pos in range(L, L + n):
            tok = model.lm_head(hidden(tok, pos)[:, -1])[:, :V].argmax(-1, keepdim=True)
            out.append(tok)
        return torch.cat(out, 1)
    return run


def held_bytes(cache):
    return sum(t.nbytes for c in cache for t in vars(c).values() if torch.is_tensor(t))


def context_rows(c, ours, rounds, seed):
    """Row 4: per-token decoding time after short and long prompts, jamba vs llama2 vs mamba; rows, checks, config."""
    n, longest, d = c["ctx_new"], max(c["ctx"]), c["n_embd"]
    torch.manual_seed(seed)
    lc = llama2.Config(vocab_size=VOCAB, block_size=longest + n + 1, n_layer=c["n_layer"], n_head=4, n_kv_head=2, n_embd=d)
    llama = llama2.Llama(lc).eval()
    mc = mamba.Config(vocab_size=VOCAB, n_layer=2 * c["n_layer"], n_embd=d, d_state=16)
    mam = mamba.Mamba(mc).eval()
    ours = ours.eval()
    cases, held, checks, rows = {}, {}, {}, []
    for L in c["ctx"]:
        prompt = torch.randint(0, VOCAB, (1, L), generator=torch.Generator().manual_seed(seed + L))
        caches = dict(jamba=ours.new_cache(L + n + 1), llama2=[llama2.KVCache(L + n + 1) for _ in range(lc.n_layer)],
                      mamba=[mamba.MambaState() for _ in range(mc.n_layer)])
        runs = dict(jamba=stepper(ours, prompt, n, caches["jamba"]), llama2=stepper(llama, prompt, n, caches["llama2"]),
                    mamba=stepper(mam, prompt, n, caches["mamba"], pos_arg=False))
        for name, model in (("jamba", ours), ("llama2", llama), ("mamba", mam)):
            checks[f"ctx{L}_{name}_tokens_identical"] = torch.equal(runs[name](n), model.generate(prompt, n + 1, 0)[:, L:])
        held[L] = {name: held_bytes(cache) for name, cache in caches.items()}
        checks[f"ctx{L}_bytes_match"] = held[L] == dict(jamba=ours.cache_bytes(L + n + 1)[0],
                                                        llama2=llama.kv_bytes_per_token(4) * (L + n + 1),
                                                        mamba=mam.state_bytes(4))
        cases[f"ctx{L}_llama2"] = (n, runs["jamba"], runs["llama2"])
        cases[f"ctx{L}_mamba"] = (n, runs["jamba"], runs["mamba"])
    times, _ = harness.run_rounds(cases, rounds, name="context round")
    for L in c["ctx"]:
        a = harness.ratio_row(f"ctx{L}_llama2", f"decode after {L} tok", "llama2", None, *times[f"ctx{L}_llama2"])
        b = harness.ratio_row(f"ctx{L}_mamba", f"decode after {L} tok", "mamba", None, *times[f"ctx{L}_mamba"])
        jamba_t = sorted(a["ours_s"] + b["ours_s"])[len(a["ours_s"])]  # the median of all jamba's runs
        rows.append(dict(context=L, new_tokens=n, jamba_s_per_token=jamba_t / n,
                         llama2_s_per_token=a["ref_median_s"] / n, mamba_s_per_token=b["ref_median_s"] / n,
                         llama2_ratio=a["ratio"], llama2_range=(a["ratio_min"], a["ratio_max"]), mamba_ratio=b["ratio"],
                         mamba_range=(b["ratio_min"], b["ratio_max"]),
                         jamba_cache_bytes=ours.cache_bytes(L)[0], all_attention_bytes=ours.cache_bytes(L)[1],
                         llama2_cache_bytes=llama.kv_bytes_per_token(4) * L, mamba_cache_bytes=mam.state_bytes(4),
                         held_bytes=held[L]))
    config = dict(llama=dict(n_layer=lc.n_layer, n_embd=d, n_head=4, n_kv_head=2, params=llama.num_params()),
                  mamba=dict(n_layer=mc.n_layer, n_embd=d, params=mam.num_params()),
                  jamba_params=ours.num_params(), jamba_active_params=ours.num_params(active=True))
    return rows, checks, config


def print_context_table(rows):
    def ms(r, key):  # ms per token, and (xN) against the shortest context
        return f"{1000 * r[key]:.2f} (x{r[key] / rows[0][key]:.2f})"

    harness.print_table(
        ("context", "jamba ms/tok", "llama2 ms/tok", "mamba ms/tok", "llama2/jamba", "mamba/jamba",
         "jamba cache", "llama2 cache", "mamba cache"),
        [(f"{r['context']:,} tok", ms(r, "jamba_s_per_token"), ms(r, "llama2_s_per_token"), ms(r, "mamba_s_per_token"),
          f"{r['llama2_ratio']:.2f}x ({r['llama2_range'][0]:.2f}-{r['llama2_range'][1]:.2f})",
          f"{r['mamba_ratio']:.2f}x ({r['mamba_range'][0]:.2f}-{r['mamba_range'][1]:.2f})",
          f"{r['jamba_cache_bytes']:,} B", f"{r['llama2_cache_bytes']:,} B", f"{r['mamba_cache_bytes']:,} B")
         for r in rows])


# ------------------------------------------------------------------------------------------- GPU

def gpu_rows(batch_size, device="cuda", cfg=None, steps=20, warmup=5, compiles=(True, False)):
    """{"compile" / "no compile": train_throughput result} for the ~125M-active Jamba at T=2048, printed. (device,
    cfg, the step counts and compiles exist only to smoke-test this on a CPU with a tiny model.)"""
    cfg = cfg or JAMBA_GPU
    settings = {("compile" if comp else "no compile"): comp for comp in compiles}
    options = {name: dict(compile=comp, flops_per_token=lambda m: jamba.flops_per_token(m, m.config.block_size))
               for name, comp in settings.items()}
    out = harness.train_throughputs({name: lambda: jamba.Jamba(jamba.Config(**cfg)) for name in settings}, batch_size,
                                    device, steps, warmup, options)
    for g in out.values():
        print(harness.gpu_line(f"Jamba {cfg['n_layer']}x{cfg['n_embd']}, {cfg['n_expert']} experts top "
                               f"{cfg['top_k_experts']}, {g['params'] / 1e6:.1f}M params,", g))
    return out


def main():
    p = harness.common_args(argparse.ArgumentParser(
        description="jamba.py vs transformers' JambaForCausalLM, and its decoding cost vs llama2.py and mamba.py "
                    "(see the docstring)"))
    p.set_defaults(batch_size=8)  # GPU rows: sequences of 2048 tokens here
    args = harness.parse_args(p)
    c = CONFIGS["quick" if args.quick else "default"]

    info = harness.machine()
    rows, checks, config, ours = cpu_rows(c, args.rounds, args.seed)
    print(f"model: {c['n_layer']} layers (M M A M), {c['n_embd']} wide, MoE in layers 1 and 3 (16 experts, top 2), "
          f"SwiGLU {config['intermediate_size']}, vocab {VOCAB}, {config['params'] / 1e6:.1f}M params, "
          f"{config['active_params'] / 1e6:.1f}M active | HF init | fp32 | {args.rounds} rounds + 1 warmup, "
          "alternating, medians")
    harness.print_ratio_table(rows)
    print(f"train loss: ours {checks['train_loss_ours']:.6f}, HF {checks['train_loss_ref']:.6f} | train throughput: "
          f"ours {rows[0]['tokens_per_s_ours']:,.0f} tok/s, HF {rows[0]['tokens_per_s_ref']:,.0f} tok/s")
    print(f"greedy tokens identical to HF: {checks['decode_tokens_identical']} "
          f"({checks['decode_distinct_tokens']} distinct of {c['decode']}) | "
          f"with and without the hybrid cache: {checks['kv_cache_tokens_identical']}")
    harness.print_legend(args.quick)

    ctx, ctx_checks, ctx_config = context_rows(c, ours, args.rounds, args.seed)
    checks.update(ctx_checks)
    config.update(ctx_config)
    print(f"decoding cost per token, greedy, batch 1, {c['ctx_new']} tokens after the prompt (prefill not timed), "
          f"{args.rounds} rounds: jamba.py above vs llama2.Llama {c['n_layer']} x {c['n_embd']} GQA 4/2 "
          f"({ctx_config['llama']['params'] / 1e6:.1f}M params) and mamba.Mamba {2 * c['n_layer']} x {c['n_embd']} "
          f"({ctx_config['mamba']['params'] / 1e6:.1f}M params); cache bytes per sequence, fp32; (xN) = per-token time "
          "/ the shortest context's; ratio = other / jamba (> 1: jamba faster)")
    print_context_table(ctx)
    print(f"tokens as generate's: {all(v for k, v in ctx_checks.items() if k.endswith('identical'))} | cache bytes "
          f"counted = the formulas: {all(v for k, v in ctx_checks.items() if k.endswith('match'))}")
    with torch.device("meta"):  # shapes only: no 52B parameters in memory
        released = jamba.Jamba(jamba.Config())
    for T in (1024, 262144):
        hybrid, full = released.cache_bytes(T, 2)
        print(f"Jamba-v0.1's shape, bf16, {T // 1024}K tokens: hybrid cache {hybrid / 2**30:.3f} GiB, all-attention "
              f"{full / 2**30:.3f} GiB ({full / hybrid:.1f}x)")

    gpu, gpu_ok = harness.gpu_section(lambda: gpu_rows(args.batch_size))
    harness.finish(T_START, info, args.json, gpu_ok and harness.passed(checks), config=config, rounds=args.rounds,
                   rows=rows, checks=checks, context=ctx, gpu=gpu)


if __name__ == "__main__":
    main()
