"""Benchmark mamba.py against Hugging Face transformers' MambaForCausalLM on the same weights; its chunked scan
against the loop over time; and its per-token decoding cost at a short and two long contexts against llama2.py's.

A random Mamba (d_state 16, expand 2, conv 4, GPT-2's vocabulary) is built with transformers (seeded, HF's own
init: normal weights with its default initializer_range 0.1, S4D-real A), written with save_pretrained and read
back with mamba.from_pretrained, so both sides hold identical fp32 weights; the train losses must agree. Rounds,
warmup, medians and ratios are harness.py's: each round runs every measurement once per side, the order flipping
each round, round 0 a warmup; ratio = reference / ours (> 1: ours faster).

Which path the reference runs: mamba_ssm (the CUDA kernels) and mambapy are not installed, so MambaMixer takes its
pure-PyTorch path (torch fallbacks for causal_conv1d and the selective scan). Its config has use_mambapy False and
use_associative_scan True, but the associative scan is only taken while torch.compile traces the model, so eager
training runs mamba_selective_scan's sequential loop over time, one step per token (discrete_A[:, :, i] * state +
deltaB_u[:, :, i]); decoding runs its recurrent single-step update from the cache. No row with use_mambapy=True:
without the mambapy package that flag falls through to the same loop.

  train step   forward + backward, train mode, same batch and targets, no optimizer step, vs HF's default path
               above (target >= 2x); losses must agree within 1e-4
  decode       greedy, batch 1, an 8-token prompt; ours with its recurrent state, HF with its MambaCache; the
               generated tokens must be identical
  state cache  ours with its recurrent state vs ours recomputing the whole text at every token (reported)
  scan         mamba.selective_scan alone, forward + backward of sum(y * w) (w fixed, random) at B=1, d_inner 512,
               N=16, T = 256 ... 4096, inputs as at init (x ~ N(0, 1), Delta log-uniform in [0.001, 0.1],
               A = -(1..N), B, C ~ N(0, 1), D = 1): how="scan" (ChunkedScan: chunks of the sequence, the odd-even
               scan inside each, backward by hand from recomputed states) vs how="loop" (selective_scan_loop, autograd;
               ratio = loop / scan, so > 1: the scan is faster; targets: >= 1 at every T, and at T=4096 a live peak
               of at most 2x one (B, T, d_inner, N) fp32 tensor). Each measurement runs in fresh Python processes.
               Peak memory is the process's peak resident size (VmHWM in /proc/self/status, reset to the current
               size through /proc/self/clear_refs just before) during the first forward + backward minus its
               resident size just before (inputs built, nothing run): the memory that forward + backward adds
               (autograd's saved tensors, the gradients, temporaries). Not ru_maxrss: after exec it starts at the
               peak of the forked parent (this bench, holding models), so small peaks would read 0. The time is
               the median of the runs after that first one (up to 9, fewer once they pass 10 s; "1 run": only the
               first ran). A second process measures the memory alone with MALLOC_MMAP_THRESHOLD_=65536, so that
               glibc returns every freed block of 64 KiB or more at once: its peak ("live") is the bytes in use at
               once; the first's, with glibc's defaults, adds what the allocator kept of freed blocks, which varies
               from run to run (at T=4096 the scan's read 158 and 277 MiB in repeated runs, its live peak 155).
               Max abs difference of y and of the gradients (relative to the largest) between the two.
               (HF's loop indexes discrete_A[:, :, i]: the backward of each such select adds a zero tensor of the
               whole (B, d_inner, T, N) into the gradient, O(T^2) memory traffic, most of HF's train step below;
               mamba.py's loop walks unbind(1), whose backward stacks the steps' gradients once.)
  context      time per new token, greedy, batch 1, after a prompt of 128, 1024 and 4096 tokens: mamba.py (the model
               of the rows above) against a llama2.Llama of comparable size (half the layers, the same width, MHA, 4
               heads: "two stacks of the block to match the 12D^2 parameters of a Transformer's interleaved MHA
               and MLP blocks", section 3.4), random init; both decode from their cache: the prompt is prefilled
               once (not timed), then each round restores the state (mamba: copies the prompt's MambaState
               tensors back into the ones a step advances in place; llama2: its KVCache, whose slots past the prompt
               are rewritten) and times 32 steps of hidden() on the last token + lm_head + argmax, what generate
               does per token (the tokens are checked against generate's). Cache bytes at each context: mamba's measured
               from its MambaState tensors (must equal state_bytes(4)), llama2's kv_bytes_per_token(4) x context
  GPU          only with CUDA: training throughput and MFU of a Mamba of Mamba-130M's shape (24 x 768, d_state 16,
               expand 2, vocab 50257, T=2048), bf16 autocast + fused AdamW, torch.compile on and off, no activation
               checkpointing (the chunked scan keeps no (B, T, 1536, 16) state tensor for backward); MFU counts
               6 N FLOPs per token (no attention term), as mamba.py's training loop does; the first step's time
               (compiling) and the peak memory. --batch_size defaults to 4. Then the scan alone at that model's
               layer shape (4 x 2048, d_inner 1536, N 16), forward + backward, each compiled: the chunked scan
               against torch's associative_scan over (A_bar, B_bar x) as transformers takes it (issue 18: keep
               the faster). A failing way (associative_scan is a prototype) is reported with its error.

    python benchmarks/bench_mamba.py                  # about 3.5 minutes on 2 CPU cores
    python benchmarks/bench_mamba.py --quick          # tiny model, a smoke test (~40 s)
    python benchmarks/bench_mamba.py --json out.json  # also write the results as JSON
    python benchmarks/gpu_rows.py mamba                # the GPU rows alone
"""
import time

T_START = time.perf_counter()  # the wall time printed at the end includes the imports

import argparse
import importlib.util
import inspect
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch._higher_order_ops.associative_scan import associative_scan
from transformers import MambaConfig, MambaForCausalLM

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # the models at the repo root, harness.py beside this file
import harness  # noqa: E402
import llama2  # noqa: E402
import mamba  # noqa: E402

# CPU sizes: GPT-2's vocabulary, 4 layers 256 wide (d_inner 512). The train batch is 4 x 128, not 4 x 256: HF's
# loop costs O(T^2) in backward (see the docstring), about 70 s a step at 4 x 256 on 2 cores, 8 s at 4 x 128, and
# six of those would take 7 minutes. scan: (B, d_inner, N) and the lengths; ctx: the prompt lengths of the context rows,
# ctx_new tokens timed after each; llama: its shape (n_kv_head = n_head).
CONFIGS = {
    "default": dict(n_layer=4, n_embd=256, batch=4, seq=128, prompt=8, decode=128, kv_tokens=128,
                    scan=(1, 512, 16), scan_T=(256, 512, 1024, 2048, 4096), scan_reps=9,
                    scan_budget_s=10.0, ctx=(128, 1024, 4096), ctx_new=32, llama=dict(n_layer=2, n_head=4, n_embd=256)),
    "quick": dict(n_layer=2, n_embd=64, batch=2, seq=64, prompt=8, decode=32, kv_tokens=32,
                  scan=(1, 128, 16), scan_T=(128, 512), scan_reps=1, scan_budget_s=2.0,
                  ctx=(32, 512), ctx_new=8, llama=dict(n_layer=1, n_head=2, n_embd=64)),
}
VOCAB, D_STATE, EXPAND, D_CONV = 50257, 16, 2, 4
# GPU: Mamba-130M's shape (state-spaces/mamba-130m: 24 x 768), GPT-2's vocabulary, T=2048 as the paper's pretraining
MAMBA_GPU = dict(vocab_size=50257, block_size=2048, n_layer=24, n_embd=768, d_state=16, expand=2, d_conv=4)
SCAN_IMPLS = ("scan", "loop")  # selective_scan's how


def hf_scan_path(hf):
    """Which scan HF's eager training takes here, in words (see the docstring)."""
    from transformers.utils.import_utils import is_mambapy_available
    cfg = hf.config
    kernels = importlib.util.find_spec("mamba_ssm") is not None
    mambapy = is_mambapy_available()
    path = ("mamba_ssm kernels (CUDA)" if kernels else "mambapy pscan" if cfg.use_mambapy and mambapy
            else "sequential loop over time")
    return (f"{path} (mamba_ssm {'installed' if kernels else 'not installed'}, use_mambapy={cfg.use_mambapy}, mambapy "
            f"{'installed' if mambapy else 'not installed'}, use_associative_scan={cfg.use_associative_scan}: "
            "torch.compile only)")


def cpu_rows(c, rounds, seed):
    """Rows 1-2 (train, decode, state cache) through harness.lm_rows; returns rows, checks, config, ours."""
    torch.manual_seed(seed)
    hf_cfg = MambaConfig(vocab_size=VOCAB, hidden_size=c["n_embd"], num_hidden_layers=c["n_layer"], state_size=D_STATE,
                         expand=EXPAND, conv_kernel=D_CONV)
    hf = MambaForCausalLM(hf_cfg)
    ours = harness.load_via_checkpoint(hf, mamba.from_pretrained)
    rows, checks, outputs = harness.lm_rows(ours, hf, c, rounds, seed, VOCAB, kv_target=None)  # cache: reported
    r = rows[0]  # the train row's target is 2x here, not lm_rows' 1x
    rows[0] = dict(harness.ratio_row(r["key"], r["label"], "HF", 2.0, r["ours_s"], r["ref_s"]),
                   tokens_per_s_ours=r["tokens_per_s_ours"],
                   tokens_per_s_ref=c["batch"] * c["seq"] / r["ref_median_s"])
    rows[1]["label"] = f"greedy decode {c['decode']} tok, recurrent state"
    rows[2]["label"] = f"ours state cache vs recompute, {c['kv_tokens']} tok"
    loss_ours, loss_ref = checks["train_loss_ours"], checks["train_loss_ref"]
    checks["train_loss_match"] = abs(loss_ours - loss_ref) <= 1e-4 * max(1.0, abs(loss_ref))
    checks["decode_distinct_tokens"] = len(set(outputs["decode"][0][0, c["prompt"]:].tolist()))
    config = dict(c, vocab_size=VOCAB, d_state=D_STATE, expand=EXPAND, d_conv=D_CONV, d_inner=ours.config.d_inner,
                  dt_rank=ours.config.dt_rank, initializer_range=hf_cfg.initializer_range, params=ours.num_params(),
                  hf_scan_path=hf_scan_path(hf), seed=seed)
    return rows, checks, config, ours


# ------------------------------------------------------------------------------------------ scan

def scan_worker(spec):
    """One scan measurement, run in a fresh interpreter by run_scan_worker (inspect.getsource + this call), so it
    imports what it needs itself and reads no global of the bench. Prints one JSON line: time, peak memory."""
    import json, statistics, sys, time  # noqa: E401
    import torch
    sys.path.insert(0, spec["root"])
    import mamba
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])

    Bsz, T, E, N = spec["B"], spec["T"], spec["E"], spec["N"]
    g = torch.Generator().manual_seed(spec["seed"])
    x = torch.randn(Bsz, T, E, generator=g)
    delta = torch.exp(torch.empty(Bsz, T, E).uniform_(-6.9078, -2.3026, generator=g))  # log-uniform [0.001, 0.1]
    A = -torch.arange(1, N + 1, dtype=torch.float32).repeat(E, 1)                     # S4D-real
    Bm, C, D = torch.randn(Bsz, T, N, generator=g), torch.randn(Bsz, T, N, generator=g), torch.ones(E)
    w = torch.randn(Bsz, T, E, generator=g)
    leaves = [t.requires_grad_() for t in (x, delta, A, Bm, C, D)]
    scan = lambda: mamba.selective_scan(x, delta, A, Bm, C, D, how=spec["impl"])  # noqa: E731

    def run():
        for t in leaves:
            t.grad = None
        t0 = time.perf_counter()
        y, h = scan()
        (y * w).sum().backward()
        return time.perf_counter() - t0, y.detach(), h.detach()

    def status(key):  # KiB, from the kernel's accounting of this process's resident memory
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":"))

    # The peak must be this process's own. ru_maxrss is not: it is the larger of this process's VmHWM and a value
    # the kernel keeps from before exec, the peak of the forked copy of the parent (a bench holding models), so it
    # would only move past that. Writing "5" to /proc/self/clear_refs resets VmHWM to the current resident size.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = status("VmRSS")
    except (OSError, StopIteration):  # not Linux: time only
        base = None
    first, y, h = run()
    peak = None if base is None else (status("VmHWM") - base) * 1024
    times = []
    while len(times) < spec["reps"] and sum(times) + first < spec["budget_s"]:
        times.append(run()[0])
    torch.save(dict(y=y, h=h, grads=[t.grad for t in leaves]), spec["out"])
    print(json.dumps(dict(time_s=statistics.median(times) if times else first, runs_timed=len(times),
                          first_s=first, peak_bytes=peak)))


def run_scan_worker(spec, env=None):
    code = inspect.getsource(scan_worker) + f"\nscan_worker({spec!r})\n"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"scan worker {spec['impl']} T={spec['T']} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def mib(n):
    return "peak n/a (no /proc)" if n is None else f"{n / 2**20:,.0f} MiB"


def max_diffs(a, b):
    """(max abs diff of y, max abs diff of the last state, max over the gradients of max abs diff / max abs value)."""
    grads = max(((ga - gb).abs().max() / gb.abs().max().clamp_min(1e-30)).item()
                for ga, gb in zip(a["grads"], b["grads"]))
    return (a["y"] - b["y"]).abs().max().item(), (a["h"] - b["h"]).abs().max().item(), grads


def scan_rows(c, seed):
    """Row 3: for each T, each implementation in a fresh process (order flipping with T); returns rows, checks."""
    Bsz, E, N = c["scan"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, T in enumerate(c["scan_T"]):
            res = {}
            for impl in (SCAN_IMPLS if i % 2 == 0 else SCAN_IMPLS[::-1]):
                spec = dict(impl=impl, B=Bsz, T=T, E=E, N=N, seed=seed, reps=c["scan_reps"],
                            budget_s=c["scan_budget_s"], threads=torch.get_num_threads(), root=str(HERE.parent),
                            out=os.path.join(tmp, f"{impl}.pt"))
                res[impl] = run_scan_worker(spec)
                live = run_scan_worker(dict(spec, reps=0), dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536"))
                res[impl]["live_peak_bytes"] = live["peak_bytes"]
                print(f"scan T={T} {impl}: {harness.fmt_s(res[impl]['time_s'])}, {mib(res[impl]['peak_bytes'])}, "
                      f"live {mib(live['peak_bytes'])}", flush=True)
            row = dict(T=T, B=Bsz, d_inner=E, d_state=N, state_tensor_bytes=Bsz * T * E * N * 4, **res)
            row["y_diff"], row["h_diff"], row["grad_rel_diff"] = max_diffs(
                *(torch.load(os.path.join(tmp, f"{impl}.pt")) for impl in SCAN_IMPLS))
            rows.append(row)
    return rows, {"scan_loop_match": all(r["grad_rel_diff"] < 1e-4 and r["y_diff"] < 1e-3 for r in rows)}


def print_scan_table(rows):
    def cell(m):
        return (f"{harness.fmt_s(m['time_s'])}{' (1 run)' if m['runs_timed'] == 0 else ''}, {mib(m['peak_bytes'])}, "
                f"live {mib(m['live_peak_bytes'])}")

    harness.print_table(
        ("T", "(B,T,E,N) fp32", "scan", "loop", "time loop / scan", "scan live peak / (B,T,E,N)", "y max abs diff",
         "grads max rel diff"),
        [(r["T"], f"{r['state_tensor_bytes'] / 2**20:,.0f} MiB", cell(r["scan"]), cell(r["loop"]),
          f"{r['loop']['time_s'] / r['scan']['time_s']:.2f}x",
          "n/a" if r["scan"]["live_peak_bytes"] is None else
          f"{r['scan']['live_peak_bytes'] / r['state_tensor_bytes']:.2f}x",
          f"{r['y_diff']:.1e}", f"{r['grad_rel_diff']:.1e}") for r in rows])


# --------------------------------------------------------------------------------------- context

def mamba_stepper(model, prompt, State=mamba.MambaState):
    """Prefill prompt (1, L) once (its last position gives the first new token); returns n -> the n + 1 greedy
    tokens after the prompt, n of them one recurrent step each from the state the prompt left, and the states.
    State: the model's per-layer cache class, with .conv and .ssm (bench_mamba2.py passes mamba2's)."""
    V = model.config.vocab_size
    states = [State() for _ in model.backbone.layers]
    with torch.no_grad():
        first = model.lm_head(model.hidden(prompt, states)[:, -1])[:, :V].argmax(-1, keepdim=True)
    saved = [(s.conv.clone(), s.ssm.clone()) for s in states]  # a step advances the states in place

    @torch.no_grad()
    def run(n):
        for s, (conv, ssm) in zip(states, saved):
            s.conv.copy_(conv)
            s.ssm.copy_(ssm)
        tok, out = first, [first]
        for _ in range(n):
            tok = model.lm_head(model.hidden(tok, states)[:, -1])[:, :V].argmax(-1, keepdim=True)
            out.append(tok)
        return torch.cat(out, 1)
    return run, states


def llama_stepper(model, prompt, n_max):
    """The same for llama2.Llama with its KVCache: slots past the prompt are rewritten by each call."""
    V, L = model.config.vocab_size, prompt.size(1)
    cache = [llama2.KVCache(L + n_max + 1) for _ in model.model.layers]
    with torch.no_grad():
        first = model.lm_head(model.hidden(prompt, cache, 0)[:, -1])[:, :V].argmax(-1, keepdim=True)

    @torch.no_grad()
    def run(n):
        tok, out = first, [first]
        for pos in range(L, L + n):
            tok = model.lm_head(model.hidden(tok, cache, pos)[:, -1])[:, :V].argmax(-1, keepdim=True)
            out.append(tok)
        return torch.cat(out, 1)
    return run


def context_rows(c, ours, rounds, seed):
    """Row 4: per-token decoding time after short and long prompts, mamba vs llama2; returns rows, checks, config."""
    n, longest = c["ctx_new"], max(c["ctx"])
    torch.manual_seed(seed)
    lc = llama2.Config(vocab_size=VOCAB, block_size=longest + n + 1, n_kv_head=c["llama"]["n_head"], **c["llama"])
    llama = llama2.Llama(lc).eval()
    ours = ours.eval()
    cases, states, checks = {}, {}, {}
    for L in c["ctx"]:
        prompt = torch.randint(0, VOCAB, (1, L), generator=torch.Generator().manual_seed(seed + L))
        m_run, states[L] = mamba_stepper(ours, prompt)
        l_run = llama_stepper(llama, prompt, n)
        # the loops decode what generate does (one extra prefill each, not timed)
        checks[f"ctx{L}_mamba_tokens_identical"] = torch.equal(m_run(n), ours.generate(prompt, n + 1, 0)[:, L:])
        checks[f"ctx{L}_llama_tokens_identical"] = torch.equal(l_run(n), llama.generate(prompt, n + 1, 0)[:, L:])
        cases[f"ctx{L}"] = (n, m_run, l_run)
    times, _ = harness.run_rounds(cases, rounds, name="context round")
    rows = []
    for L in c["ctx"]:
        r = harness.ratio_row(f"ctx{L}", f"decode after {L} tok, per token", "llama2", None, *times[f"ctx{L}"])
        state = sum(s.conv.nbytes + s.ssm.nbytes for s in states[L])
        r.update(context=L, new_tokens=n, mamba_s_per_token=r["ours_median_s"] / n,
                 llama_s_per_token=r["ref_median_s"] / n, mamba_state_bytes=state,
                 mamba_state_bytes_formula=ours.state_bytes(4), llama_kv_bytes=llama.kv_bytes_per_token(4) * L)
        checks[f"ctx{L}_state_bytes_match"] = state == ours.state_bytes(4)
        rows.append(r)
    config = dict(llama=dict(n_layer=lc.n_layer, n_embd=lc.n_embd, n_head=lc.n_head, n_kv_head=lc.n_kv_head,
                             intermediate_size=lc.intermediate_size, block_size=lc.block_size,
                             params=llama.num_params(), params_with_embedding=llama.num_params(False)),
                  mamba_params=ours.num_params())
    return rows, checks, config


def print_context_table(rows):
    def ms(r, key):  # ms per token, and (xN) against the shortest context
        return f"{1000 * r[key]:.2f} (x{r[key] / rows[0][key]:.2f})"

    harness.print_table(
        ("context", "mamba ms/token", "llama2 ms/token", "llama2 / mamba (range)", "mamba state", "llama2 KV cache"),
        [(f"{r['context']:,} tok", ms(r, "mamba_s_per_token"), ms(r, "llama_s_per_token"),
          f"{r['ratio']:.2f}x ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})",
          f"{r['mamba_state_bytes']:,} B", f"{r['llama_kv_bytes']:,} B") for r in rows])


# ------------------------------------------------------------------------------------------- GPU

def combine(left, right):
    """Two steps of h_t = a_t h_{t-1} + b_t as one: (a1, b1) then (a2, b2) is (a2 a1, a2 b1 + b2), associative."""
    (a1, b1), (a2, b2) = left, right
    return a2 * a1, a2 * b1 + b2


def assoc_scan(x, delta, A, B, C, D, combine_mode="pointwise"):
    """selective_scan's y the way transformers' Mamba takes under torch.compile: torch's associative_scan (a
    prototype) over the pairs (A_bar_t, B_bar_t x_t), both (B, T, d_inner, N) tensors whole. "pointwise" compiles to
    one generated scan kernel (CUDA only); "generic" runs anywhere (the CPU smoke test)."""
    dA = torch.exp(delta[..., None] * A)                          # (B, T, d_inner, N)
    dBx = (delta * x)[..., None] * B[:, :, None, :]
    _, h = associative_scan(combine, (dA, dBx), dim=1, combine_mode=combine_mode)
    return (h * C[:, :, None, :]).sum(-1) + D * x


def scan_gpu_rows(device="cuda", shape=(4, 2048, 1536, 16), reps=10, compile=True):
    """Issue 18: forward + backward of the scan alone at Mamba-130M's layer shape (B, T, d_inner, N), fp32 (as
    mamba.py runs it under autocast), inputs as in the scan rows: mamba.selective_scan(how="scan"), the chunked
    scan, against assoc_scan, each torch.compile'd: the first call's time (compiling), the median of reps, the peak
    memory (CUDA), y's max abs difference from the chunked scan's. A way that fails gets its error. Printed."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    Bsz, T, E, N = shape
    g = torch.Generator().manual_seed(0)
    x, B, C = torch.randn(Bsz, T, E, generator=g), torch.randn(Bsz, T, N, generator=g), torch.randn(Bsz, T, N, generator=g)
    delta = torch.exp(torch.empty(Bsz, T, E).uniform_(-6.9078, -2.3026, generator=g))  # log-uniform [0.001, 0.1]
    A, D = -torch.arange(1, N + 1, dtype=torch.float32).repeat(E, 1), torch.ones(E)
    leaves = [t.to(device).requires_grad_() for t in (x, delta, A, B, C, D)]
    ways = {"chunked": lambda *a: mamba.selective_scan(*a, how="scan")[0],
            "associative_scan": lambda *a: assoc_scan(*a, combine_mode="pointwise" if cuda else "generic")}
    def fwd_bwd(f):
        for t in leaves:
            t.grad = None
        y = f(*leaves)
        y.sum().backward()
        return y.detach()

    rows, ref = {}, None
    for name, fn in ways.items():
        torch._dynamo.reset()
        f = torch.compile(fn) if compile else fn
        try:
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            first, median, y = harness.timed(lambda: fwd_bwd(f), reps, device)  # the first call compiles
            ref = y if ref is None else ref
            rows[name] = dict(first_s=first, time_s=median,
                              peak_bytes=torch.cuda.max_memory_allocated(device) if cuda else None,
                              y_max_abs_diff=(y - ref).abs().max().item())
            print(f"scan on {device.type}, {name}{'' if compile else ' (no compile)'}, B={Bsz} T={T} d_inner={E} "
                  f"N={N}, fwd+bwd: {median * 1e3:.1f} ms (first call {first:.1f} s) | peak "
                  f"{mib(rows[name]['peak_bytes']) if cuda else 'n/a'} | y vs chunked {rows[name]['y_max_abs_diff']:.1e}")
        except Exception as e:  # a prototype: say how it failed, keep the rows
            rows[name] = dict(error=f"{type(e).__name__}: {e}"[:2000])
            print(f"scan on {device.type}, {name}: failed: {rows[name]['error'][:300]}")
    return rows


def gpu_rows(batch_size, device="cuda", cfg=None, steps=20, warmup=5, compiles=(True, False), grad_checkpoint=False,
             scan_shape=(4, 2048, 1536, 16)):
    """{"compile" / "no compile": train_throughput result, "scan": scan_gpu_rows} for a Mamba of Mamba-130M's shape
    at T=2048, activation checkpointing off, printed. (device, cfg, the step counts, compiles and scan_shape exist
    only to smoke-test this on a CPU with a tiny model.)"""
    cfg = cfg or MAMBA_GPU

    def build():
        m = mamba.Mamba(mamba.Config(**cfg))
        m.grad_checkpoint = grad_checkpoint
        return m

    settings = {("compile" if comp else "no compile"): comp for comp in compiles}
    options = {name: dict(compile=comp, flops_per_token=lambda m: 6 * m.num_params())  # no attention term
               for name, comp in settings.items()}
    out = harness.train_throughputs({name: build for name in settings}, batch_size, device, steps, warmup, options)
    c = mamba.Config(**cfg)
    for g in out.values():
        g["grad_checkpoint"] = grad_checkpoint
        print(harness.gpu_line(f"Mamba {c.n_layer}x{c.n_embd}, d_state {c.d_state}, expand {c.expand}, "
                               f"{g['params'] / 1e6:.1f}M params, {'' if grad_checkpoint else 'no '}activation "
                               f"checkpointing,", g))
    out["scan"] = scan_gpu_rows(device, scan_shape, compile=True in compiles)
    return out


def main():
    p = harness.common_args(argparse.ArgumentParser(
        description="mamba.py vs transformers' MambaForCausalLM, its scan, and its decoding cost vs llama2.py "
                    "(see the docstring)"))
    p.set_defaults(batch_size=4)  # GPU rows: sequences of 2048 tokens here, (B, 2048, 1536, 16) fp32 scan states
    args = harness.parse_args(p)
    c = CONFIGS["quick" if args.quick else "default"]

    info = harness.machine()
    rows, checks, config, ours = cpu_rows(c, args.rounds, args.seed)
    print(f"model: {c['n_layer']} layers, {c['n_embd']} wide, d_inner {config['d_inner']}, d_state {D_STATE}, "
          f"dt_rank {config['dt_rank']}, conv {D_CONV}, vocab {VOCAB}, {config['params'] / 1e6:.1f}M params (embedding "
          f"tied) | HF init, initializer_range {config['initializer_range']} | fp32 | {args.rounds} rounds + 1 warmup, "
          f"alternating, medians\nHF training scan: {config['hf_scan_path']}")
    harness.print_ratio_table(rows)
    print(f"train loss: ours {checks['train_loss_ours']:.6f}, HF {checks['train_loss_ref']:.6f} | train throughput: "
          f"ours {rows[0]['tokens_per_s_ours']:,.0f} tok/s, HF {rows[0]['tokens_per_s_ref']:,.0f} tok/s")
    print(f"greedy tokens identical to HF: {checks['decode_tokens_identical']} "
          f"({checks['decode_distinct_tokens']} distinct of {c['decode']}) | "
          f"with and without the state cache: {checks['kv_cache_tokens_identical']}")
    harness.print_legend(args.quick)

    Bsz, E, N = c["scan"]
    scan, scan_checks = scan_rows(c, args.seed)
    checks.update(scan_checks)
    print(f"selective_scan alone, forward + backward, B={Bsz}, d_inner {E}, N={N}, fp32; each in a fresh process: "
          f"median time of the runs after the first, peak memory = peak resident size (VmHWM) over the first run "
          f"minus the resident size before it; live: the same with glibc returning freed blocks at once:")
    print_scan_table(scan)
    checks["scan_at_least_loop_speed"] = all(r["loop"]["time_s"] >= r["scan"]["time_s"] for r in scan)
    longest = scan[-1]["scan"]["live_peak_bytes"]  # the target's T (4096)
    checks["scan_peak_within_2x"] = longest is None or longest <= 2 * scan[-1]["state_tensor_bytes"]
    print(f"scan = loop within tolerance: {checks['scan_loop_match']} | scan as fast as the loop at every T: "
          f"{checks['scan_at_least_loop_speed']} | scan live peak within 2x a (B,T,E,N) tensor at T={scan[-1]['T']}: "
          f"{checks['scan_peak_within_2x']}")

    ctx, ctx_checks, ctx_config = context_rows(c, ours, args.rounds, args.seed)
    checks.update(ctx_checks)
    config.update(ctx_config)
    lm = ctx_config["llama"]
    print(f"decoding cost per token, greedy, batch 1, {c['ctx_new']} tokens after the prompt (prefill not timed), "
          f"{args.rounds} rounds: mamba.py above ({config['params'] / 1e6:.1f}M params) vs llama2.Llama "
          f"{lm['n_layer']} x {lm['n_embd']}, {lm['n_head']} heads MHA, SwiGLU {lm['intermediate_size']} "
          f"({lm['params'] / 1e6:.1f}M params, {lm['params_with_embedding'] / 1e6:.1f}M with its input embedding); "
          f"(xN) = per-token time / the shortest context's")
    print_context_table(ctx)
    print(f"tokens as generate's: {all(v for k, v in ctx_checks.items() if k.endswith('identical'))} | mamba state "
          f"bytes = state_bytes(4): {all(v for k, v in ctx_checks.items() if k.endswith('match'))}")

    gpu, gpu_ok = harness.gpu_section(lambda: gpu_rows(args.batch_size))
    # status 1: losses off HF, different tokens, a scan off the loop, a state size off state_bytes, or the GPU
    # rows failed
    harness.finish(T_START, info, args.json, gpu_ok and harness.passed(checks), config=config, rounds=args.rounds,
                   rows=rows, checks=checks, scan=scan, context=ctx, gpu=gpu)


if __name__ == "__main__":
    main()
