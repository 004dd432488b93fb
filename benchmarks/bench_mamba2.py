"""Benchmark mamba2.py against Hugging Face transformers' Mamba2ForCausalLM on the same weights; its chunked SSD
against the loop over time; and its per-token decoding cost at a short and a long context next to mamba.py's and
llama2.py's.

A random Mamba-2 (GPT-2's vocabulary, headdim 64, d_state 64, ngroups 1, conv 4, chunk 256) is built with
transformers (seeded, HF's own init), written with save_pretrained and read back with mamba2.from_pretrained, so both
sides hold identical fp32 weights; the train losses must agree. Rounds, warmup, medians and ratios are harness.py's:
each round runs every measurement once per side, the order flipping each round, round 0 a warmup; ratio = reference
/ ours (> 1: ours faster).

Which path the reference runs: mamba_ssm and causal_conv1d (the CUDA/Triton kernels) are not installed, so
Mamba2Mixer takes its pure-PyTorch path: the same chunked algorithm (Listing 1) with B and C repeated to every head,
an explicit (b, c, l, s, h) score tensor, and the segment sums recomputed per head.

  train step   forward + backward, train mode, same batch and targets, no optimizer step (target > 1x: faster);
               losses must agree within 1e-4
  decode       greedy, batch 1, an 8-token prompt; ours with its recurrent state, HF with its cache; tokens identical
  state cache  ours with its recurrent state vs ours recomputing the whole text at every token (reported)
  ssd          the SSD alone, forward + backward of sum(y * w) + sum(h^2), B=1, 8 heads x 64, N=64, G=1,
               T = 256 ... 8192: mamba2.ssd_chunked (Q = 256) vs mamba2.ssd_loop, the reference (ratio = loop /
               chunk). Each measurement runs in a fresh Python process: its time is the median of the runs after
               the first (within a budget); memory two ways: "peak", the rise of the process's peak resident
               size (VmHWM, reset through /proc/self/clear_refs) over the first forward + backward (glibc's
               defaults: it includes freed blocks the allocator kept, so it varies from run to run), and
               "saved", the bytes autograd keeps for backward (saved_tensors_hooks, each storage once, the inputs
               not counted), which is exact.
  context      time per new token, greedy, batch 1, after prompts of 1K and 16K tokens (--quick: 32 and 512):
               mamba2.py (the model above), mamba.py (the same width and depth, d_state 16) and llama2.py (the same
               width, half the layers, MHA, 4 heads: a Transformer block holds about two Mamba blocks' parameters),
               random init, each from its own cache; the prompt is prefilled once (not timed), then each round
               restores the cache and times 32 steps of hidden() on the last token + lm_head + argmax
  GPU          only with CUDA: training tokens/s, MFU and peak memory of Mamba-2 130M's shape (24 x 768, d_state 128,
               headdim 64, expand 2, vocab 50257, T=2048), bf16 autocast + torch.compile + fused AdamW, next to
               mamba.py's Mamba-130M shape and llama2.py's GPT-2-124M shape (12 x 768, 12 heads) on the same GPU
               (target: Mamba-2 within 2x of llama2's tokens/s). Mamba-2's MFU counts 6 N + the SSD's matmuls
               (mamba2.flops_per_token), mamba's 6 N, llama2's 6 N + attention.

    python benchmarks/bench_mamba2.py                  # several minutes on 2 CPU cores
    python benchmarks/bench_mamba2.py --quick          # tiny model, a smoke test
    python benchmarks/bench_mamba2.py --json out.json  # also write the results as JSON
"""
import argparse
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import Mamba2Config, Mamba2ForCausalLM

T_START = time.perf_counter()  # the wall time printed at the end includes the imports
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import harness  # noqa: E402
import llama2  # noqa: E402
import mamba  # noqa: E402
import mamba2  # noqa: E402
from bench_mamba import llama_stepper, mamba_stepper  # noqa: E402  the decoding loops, the same here

CONFIGS = {
    "default": dict(n_layer=4, n_embd=256, batch=4, seq=512, prompt=8, decode=64, kv_tokens=64,
                    ssd_T=(256, 1024, 4096, 8192), ssd_reps=5, ssd_budget_s=20.0, ctx=(1024, 16384), ctx_new=32,
                    llama=dict(n_layer=2, n_head=4, n_embd=256)),
    "quick": dict(n_layer=2, n_embd=64, batch=2, seq=128, prompt=8, decode=16, kv_tokens=16,
                  ssd_T=(256, 1024), ssd_reps=2, ssd_budget_s=5.0, ctx=(32, 512), ctx_new=8,
                  llama=dict(n_layer=1, n_head=2, n_embd=64)),
}
VOCAB, HEADDIM, D_STATE, CHUNK = 50257, 64, 64, 256
SSD = dict(B=1, H=8, P=64, G=1, N=64, Q=256)
GPU_MAMBA2 = dict(vocab_size=50257, block_size=2048, n_layer=24, n_embd=768, d_state=128, headdim=64, expand=2)
GPU_MAMBA = dict(vocab_size=50257, block_size=2048, n_layer=24, n_embd=768, d_state=16, expand=2)
GPU_LLAMA = dict(vocab_size=50257, block_size=2048, n_layer=12, n_embd=768, n_head=12, n_kv_head=12)


def cpu_rows(c, rounds, seed):
    """Train, decode and state-cache rows through harness.lm_rows; returns rows, checks, config, ours."""
    torch.manual_seed(seed)
    hf_cfg = Mamba2Config(vocab_size=VOCAB, hidden_size=c["n_embd"], num_hidden_layers=c["n_layer"],
                          state_size=D_STATE, expand=2, head_dim=HEADDIM, num_heads=2 * c["n_embd"] // HEADDIM,
                          n_groups=1, chunk_size=CHUNK, tie_word_embeddings=True)
    hf = Mamba2ForCausalLM(hf_cfg)
    ours = harness.load_via_checkpoint(hf, mamba2.from_pretrained)
    rows, checks, outputs = harness.lm_rows(ours, hf, c, rounds, seed, VOCAB, kv_target=None)
    rows[1]["label"] = f"greedy decode {c['decode']} tok, recurrent state"
    rows[2]["label"] = f"ours state cache vs recompute, {c['kv_tokens']} tok"
    rows[0]["tokens_per_s_ref"] = c["batch"] * c["seq"] / rows[0]["ref_median_s"]
    checks["train_loss_match"] = abs(checks["train_loss_ours"] - checks["train_loss_ref"]) <= 1e-4 * max(
        1.0, abs(checks["train_loss_ref"]))
    config = dict(c, vocab_size=VOCAB, headdim=HEADDIM, d_state=D_STATE, chunk_size=CHUNK, n_head=ours.config.n_head,
                  params=ours.num_params(), seed=seed)
    return rows, checks, config, ours


# ------------------------------------------------------------------------------------------ SSD

def ssd_worker(spec):
    """One SSD measurement, run in a fresh interpreter (inspect.getsource + this call): it imports what it needs
    and reads no global of the bench. Prints one JSON line: time, peak memory."""
    import json, statistics, sys, time  # noqa: E401
    import torch
    sys.path.insert(0, spec["root"])
    import mamba2
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    b, T, H, P, G, N = (spec[k] for k in ("B", "T", "H", "P", "G", "N"))
    g = torch.Generator().manual_seed(spec["seed"])
    x = torch.randn(b, T, H, P, generator=g)
    dt = torch.exp(torch.empty(b, T, H).uniform_(-6.9078, -2.3026, generator=g))  # log-uniform [0.001, 0.1]
    A = -torch.empty(H).uniform_(1.0, 16.0, generator=g)
    Bm, C, D = torch.randn(b, T, G, N, generator=g), torch.randn(b, T, G, N, generator=g), torch.ones(H)
    w = torch.randn(b, T, H, P, generator=g)
    leaves = [t.requires_grad_() for t in (x, dt, A, Bm, C, D)]

    saved = {}

    def pack(t):  # what autograd keeps for backward, each storage once
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    def run():
        for t in leaves:
            t.grad = None
        t0 = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if spec["impl"] == "chunk":
                y, h = mamba2.ssd_chunked(*leaves, spec["Q"])
            else:
                y, h = mamba2.ssd_loop(*leaves)
        ((y * w).sum() + h.square().sum()).backward()
        return time.perf_counter() - t0, y.detach(), h.detach()

    def status(key):  # KiB
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":"))

    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        base = status("VmRSS")
    except (OSError, StopIteration):
        base = None
    first, y, h = run()
    peak = None if base is None else (status("VmHWM") - base) * 1024
    saved_bytes = sum(saved.values()) - sum(t.nbytes for t in leaves)  # the inputs are there anyway
    times = []
    while len(times) < spec["reps"] and sum(times) + first < spec["budget_s"]:
        times.append(run()[0])
    torch.save(dict(y=y, h=h, grads=[t.grad for t in leaves]), spec["out"])
    print(json.dumps(dict(time_s=statistics.median(times) if times else first, runs_timed=len(times),
                          first_s=first, peak_bytes=peak, saved_bytes=saved_bytes)))


def run_ssd_worker(spec):
    code = inspect.getsource(ssd_worker) + f"\nssd_worker({spec!r})\n"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"ssd worker {spec['impl']} T={spec['T']} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def mib(n):
    return "n/a" if n is None else f"{n / 2**20:,.1f} MiB"


def ssd_rows(c, seed):
    """For each T, chunk and loop each in a fresh process (order flipping with T); returns rows, checks."""
    rows, impls = [], ("chunk", "loop")
    with tempfile.TemporaryDirectory() as tmp:
        for i, T in enumerate(c["ssd_T"]):
            res = {}
            for impl in (impls if i % 2 == 0 else impls[::-1]):
                spec = dict(SSD, impl=impl, T=T, seed=seed, reps=c["ssd_reps"], budget_s=c["ssd_budget_s"],
                            threads=torch.get_num_threads(), root=str(HERE.parent), out=os.path.join(tmp, f"{impl}.pt"))
                res[impl] = run_ssd_worker(spec)
                print(f"ssd T={T} {impl}: {harness.fmt_s(res[impl]['time_s'])}, peak {mib(res[impl]['peak_bytes'])}, "
                      f"saved for backward {mib(res[impl]['saved_bytes'])}", flush=True)
            a, b = (torch.load(os.path.join(tmp, f"{impl}.pt")) for impl in impls)
            grads = max(((ga - gb).abs().max() / gb.abs().max().clamp_min(1e-30)).item()
                        for ga, gb in zip(a["grads"], b["grads"]))
            rows.append(dict(T=T, **res, y_diff=(a["y"] - b["y"]).abs().max().item(),
                             h_diff=(a["h"] - b["h"]).abs().max().item(), grad_rel_diff=grads))
    return rows, {"ssd_loop_match": all(r["grad_rel_diff"] < 1e-4 and r["y_diff"] < 1e-3 for r in rows)}


def print_ssd_table(rows):
    harness.print_table(
        ("T", "chunk time", "loop time", "loop / chunk", "chunk peak / saved", "loop peak / saved", "y max abs diff",
         "grads max rel diff"),
        [(r["T"], harness.fmt_s(r["chunk"]["time_s"]), harness.fmt_s(r["loop"]["time_s"]),
          f"{r['loop']['time_s'] / r['chunk']['time_s']:.1f}x",
          f"{mib(r['chunk']['peak_bytes'])} / {mib(r['chunk']['saved_bytes'])}",
          f"{mib(r['loop']['peak_bytes'])} / {mib(r['loop']['saved_bytes'])}", f"{r['y_diff']:.1e}",
          f"{r['grad_rel_diff']:.1e}") for r in rows])


# --------------------------------------------------------------------------------------- context

def context_rows(c, ours, rounds, seed):
    """Per-token decoding time after a short and a long prompt: mamba2 vs mamba, and mamba2 vs llama2."""
    n, longest = c["ctx_new"], max(c["ctx"])
    torch.manual_seed(seed)
    m1 = mamba.Mamba(mamba.Config(vocab_size=VOCAB, n_layer=c["n_layer"], n_embd=c["n_embd"], d_state=16)).eval()
    lc = llama2.Config(vocab_size=VOCAB, block_size=longest + n + 1, n_kv_head=c["llama"]["n_head"], **c["llama"])
    llama = llama2.Llama(lc).eval()
    ours = ours.eval()
    cases, checks, state_bytes = {}, {}, {}
    for L in c["ctx"]:
        prompt = torch.randint(0, VOCAB, (1, L), generator=torch.Generator().manual_seed(seed + L))
        run2, states2 = mamba_stepper(ours, prompt, mamba2.Mamba2State)
        run1, states1 = mamba_stepper(m1, prompt)
        runl = llama_stepper(llama, prompt, n)
        checks[f"ctx{L}_mamba2_tokens_identical"] = torch.equal(run2(n), ours.generate(prompt, n + 1, 0)[:, L:])
        checks[f"ctx{L}_mamba2_state_bytes_match"] = sum(s.conv.nbytes + s.ssm.nbytes for s in states2) == \
            ours.state_bytes(4)
        state_bytes[L] = (ours.state_bytes(4), m1.state_bytes(4), llama.kv_bytes_per_token(4) * L)
        cases[f"ctx{L}_mamba"] = (n, run2, run1)
        cases[f"ctx{L}_llama"] = (n, run2, runl)
    times, _ = harness.run_rounds(cases, rounds, name="context round")
    rows = []
    for L in c["ctx"]:
        for ref, label in (("mamba", "mamba.py"), ("llama", "llama2.py")):
            r = harness.ratio_row(f"ctx{L}_{ref}", f"decode after {L:,} tok, per token", label, None,
                                  *times[f"ctx{L}_{ref}"])
            r.update(context=L, ours_ms_per_token=1000 * r["ours_median_s"] / n,
                     ref_ms_per_token=1000 * r["ref_median_s"] / n, ours_cache_bytes=state_bytes[L][0],
                     ref_cache_bytes=state_bytes[L][1 if ref == "mamba" else 2])
            rows.append(r)
    config = dict(mamba_params=m1.num_params(), llama=dict(n_layer=lc.n_layer, n_embd=lc.n_embd, n_head=lc.n_head,
                                                            params=llama.num_params()))
    return rows, checks, config


def print_context_table(rows):
    harness.print_table(
        ("context", "mamba2 ms/token", "reference ms/token", "ref / mamba2 (range)", "mamba2 cache", "reference cache"),
        [(f"{r['context']:,} tok", f"{r['ours_ms_per_token']:.2f}", f"{r['ref_ms_per_token']:.2f} ({r['reference']})",
          f"{r['ratio']:.2f}x ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})", f"{r['ours_cache_bytes']:,} B",
          f"{r['ref_cache_bytes']:,} B") for r in rows])


# ------------------------------------------------------------------------------------------- GPU

def gpu_rows(batch_size, device="cuda", shapes=None, steps=30, warmup=5, compile=True):
    """Training throughput, MFU and peak memory (torch.cuda.max_memory_allocated; None off CUDA) of Mamba-2 130M's
    shape, mamba.py's and llama2.py's, T=2048, printed. (device, shapes: {"mamba2" / "mamba" / "llama2": Config
    keywords}, the step counts and compile exist only to smoke-test this on a CPU with tiny models.)"""
    shapes = shapes or dict(mamba2=GPU_MAMBA2, mamba=GPU_MAMBA, llama2=GPU_LLAMA)
    builds = {"mamba2": lambda: mamba2.Mamba2(mamba2.Config(**shapes["mamba2"])),
              "mamba": lambda: mamba.Mamba(mamba.Config(**shapes["mamba"])),
              "llama2": lambda: llama2.Llama(llama2.Config(**shapes["llama2"]))}
    flops = {"mamba2": lambda m: mamba2.flops_per_token(m, m.config.block_size), "mamba": lambda m: 6 * m.num_params(),
             "llama2": None}
    out = {}
    for name, build in builds.items():  # harness.train_throughput measures the peak memory (None off CUDA)
        out[name] = harness.train_throughputs({name: build}, batch_size, device, steps, warmup,
                                              {name: dict(compile=compile, flops_per_token=flops[name])})[name]
        print(harness.gpu_line(f"{name} {out[name]['params'] / 1e6:.1f}M params,", out[name]))
    ratio = out["mamba2"]["tokens_per_s"] / out["llama2"]["tokens_per_s"]
    out["mamba2_vs_llama2_tokens_per_s"] = ratio
    print(f"mamba2 tokens/s / llama2 tokens/s: {ratio:.2f} (target >= 0.5)")
    return out


def main():
    p = harness.common_args(argparse.ArgumentParser(
        description="mamba2.py vs transformers' Mamba2ForCausalLM, its SSD, and its decoding cost (see the docstring)"))
    p.set_defaults(batch_size=8)  # GPU rows: sequences of 2048 tokens
    args = harness.parse_args(p)
    c = CONFIGS["quick" if args.quick else "default"]

    info = harness.machine()
    rows, checks, config, ours = cpu_rows(c, args.rounds, args.seed)
    print(f"model: {c['n_layer']} layers, {c['n_embd']} wide, {config['n_head']} heads x {HEADDIM}, d_state {D_STATE}, "
          f"chunk {CHUNK}, vocab {VOCAB}, {config['params'] / 1e6:.1f}M params (tied) | HF init | fp32 | "
          f"{args.rounds} rounds + 1 warmup, alternating, medians")
    harness.print_ratio_table(rows)
    print(f"train loss: ours {checks['train_loss_ours']:.6f}, HF {checks['train_loss_ref']:.6f} | train throughput: "
          f"ours {rows[0]['tokens_per_s_ours']:,.0f} tok/s, HF {rows[0]['tokens_per_s_ref']:,.0f} tok/s")
    print(f"greedy tokens identical to HF: {checks['decode_tokens_identical']} | with and without the state cache: "
          f"{checks['kv_cache_tokens_identical']}")
    harness.print_legend(args.quick)

    ssd, ssd_checks = ssd_rows(c, args.seed)
    checks.update(ssd_checks)
    print(f"mamba2.ssd_chunked and ssd_loop alone, forward + backward, B={SSD['B']}, {SSD['H']} heads x "
          f"{SSD['P']}, N={SSD['N']}, "
          f"G={SSD['G']}, Q={SSD['Q']}, fp32, each in a fresh process (peak: the rise of VmHWM over the first run; "
          f"saved: what autograd keeps for backward):")
    print_ssd_table(ssd)

    ctx, ctx_checks, ctx_config = context_rows(c, ours, args.rounds, args.seed)
    checks.update(ctx_checks)
    config.update(ctx_config)
    print(f"decoding cost per token, greedy, batch 1, {c['ctx_new']} tokens after the prompt (prefill not timed): "
          f"mamba2.py above vs mamba.py ({c['n_layer']} x {c['n_embd']}, d_state 16, "
          f"{ctx_config['mamba_params'] / 1e6:.1f}M) and llama2.py ({c['llama']['n_layer']} x {c['llama']['n_embd']}, "
          f"{ctx_config['llama']['params'] / 1e6:.1f}M)")
    print_context_table(ctx)

    gpu, gpu_ok = harness.gpu_section(lambda: gpu_rows(args.batch_size))
    harness.finish(T_START, info, args.json, gpu_ok and harness.passed(checks), config=config, rounds=args.rounds,
                   rows=rows, checks=checks, ssd=ssd, context=ctx, gpu=gpu)


if __name__ == "__main__":
    main()
