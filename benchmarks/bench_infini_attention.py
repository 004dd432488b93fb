"""Benchmark infini_attention.py against llama2.py's full attention at the same size: time per token and peak memory
of a pass over a sequence of 1K, 4K and 16K tokens, and the time per generated token and the bytes of the cache
after a context of 1K, 4K and 16K tokens.

The two models have one shape (2 layers, 256 wide, 4 heads, 2 key/value heads, SwiGLU 704, a vocabulary of 256:
raw UTF-8 bytes, what both scripts fall back to offline; so the logits, T x 256, take no more than an activation)
and the same weights: a llama2.Llama is built (block_size 16K + what decoding needs), its matrices drawn from
N(0, 0.1) as bench_llama2.py does (at Llama's 0.02 a random model's greedy decoding loops over a few tokens, which
would let a wrong cache pass the token checks), and its state_dict is loaded into an InfiniTransformer with
segments of 512 tokens and the delta memory update, whose gates, which the Llama lacks, stay at 0 (sigmoid 0.5).
fp32. Everything runs with one torch thread unless --threads says otherwise: on this machine's 2 shared cores,
with the other core busy, 2 threads ran the same forward pass about 5 times slower than 1 (a thread waiting at
each op for the other); the ratios below do not depend on it.

  forward      one pass over a random sequence of T = 1K, 4K, 16K tokens, batch 1, with targets (the loss is
               computed, as in training): with torch.no_grad, and forward + backward (train mode, dropout 0; the
               gradients of the weights are set to None before each pass). Each (model, T) runs in a fresh Python
               process, which measures the no_grad pass and then forward + backward: after a 64-token pass of
               each kind (one-time allocations), before each kind it hands freed memory back to the system
               (glibc malloc_trim) and resets the process's peak resident size (writing "5" to
               /proc/self/clear_refs); peak memory = the peak resident size (VmHWM) over the first pass minus the
               resident size just before it: what the pass adds (activations, saved tensors, gradients,
               temporaries) beyond the weights and the input. Not ru_maxrss: after exec it starts at the peak of
               the forked parent (this bench), and it cannot be reset. Time = the median of the passes after
               the first (up to 2, fewer once they would pass 20 s; "1 run": only the first), per token = / T.
               Which model goes first flips from T to T. Attention on this CPU is SDPA's flash kernel for both
               (no T x T matrix is materialised: the table shows what one would take, per layer, fp32), so both
               are O(T) in memory; what differs is full attention's O(T^2) time against Infini's
               O(T x segment).
  fwd+bwd A/B  forward + backward at T = 1K (batch 1, with the loss, train mode, dropout 0, gradients set to None
               before each pass), timed in this process with harness.run_rounds (5 rounds + 1 warmup, the order of
               the pair flipping each round, medians, range = the per-round ratios), Infini with segments of 256
               (4 segments: the CUDA preset's) and of 512 (this bench's), each against llama2.py's Llama (target:
               no slower, ratio >= 1) and against the same model with each attention layer running
               Attention.segment_loop, the file's loop over segments (the paper as written, the reference the
               tests hold forward equal to), in place of forward; same weights, and their losses must
               agree (1e-5)
  decode       greedy, batch 1, each model from its own cache, after a context of L = 1K, 4K, 16K tokens: a random
               prompt of L - 32 tokens is prefilled once (not timed), then 64 tokens are decoded one at a time
               (hidden() on the last token + lm_head + argmax, what generate does per token) and timed as two
               rows: positions L - 32 .. L - 1, the last 32 of an Infini segment (its local attention over up to
               512 keys, and at the last one the segment written into the memory), and L .. L + 31, the first
               32 of the next (a nearly empty segment). Each round restores the state the row starts from
               (Infini: M and z, which a step replaces, and the unfinished segment's buffer, which a step writes
               into: copied back from a copy, 0.5 MB a layer once per row of 32 tokens, inside the timing; llama2: its KVCache, whose slots from
               the row's first position are rewritten). harness.run_rounds: 5 rounds + 1
               warmup, the order of the two models flipping each round, medians; ratio = llama2 / Infini (> 1:
               Infini faster). The 65 tokens must equal those of each model's generate(prompt, 65, 0), and
               the logits of the prefill must be finite. Cache bytes when the row starts: Infini's
               state_bytes(state) (M and z per layer and key/value head, fp32, plus, inside a segment, the buffer
               of its keys and values, segment_len - 1 slots: must equal that formula, and be the same at every L
               at a segment's start),
               llama2's kv_bytes_per_token(4) x the tokens it holds (its KVCache buffers, allocated for the
               prompt + 65, are checked against kv_bytes_per_token too)
  checks       Infini with and without its cache (generate's use_cache) gives the same 16 greedy tokens after a
               prompt of 1016 tokens (the memory holds one segment; decoding crosses into the third); Infini's
               logits on a sequence of one segment equal llama2's (max abs difference <= 1e-5: an empty memory
               is read as nothing, so both compute the same); every loss and prefill's logits finite
  GPU          only with CUDA: the forward rows again, in one process (peak = torch.cuda.max_memory_allocated over
               the first pass minus memory_allocated before it; time = the median of 3 passes after it), bf16
               autocast over fp32 weights, at T = 1K, 4K, 16K, 64K, for a Llama of GPT-2 124M's shape (12 x 768,
               12 heads, 4 kv heads, Llama 2's vocabulary of 32000) and an Infini model holding its weights with
               the paper's segments of 2048 tokens. Untested: no GPU was available when this was written; its
               code path is smoke-tested on the CPU with a tiny model (gpu_rows(device="cpu", ...), peaks n/a).
               Then training throughput at infini_attention.py's CUDA preset shape (6 x 384, 6 heads, 2 kv heads,
               GPT-2's vocabulary, T = 1024, Infini in 4 segments of 256, the delta memory, --batch_size 8 by
               default, dropout 0): llama2.Llama and Infini through harness.train_throughput (bf16 autocast,
               torch.compile, fused AdamW, 5 warmup steps + 30 timed), target (issue 19): Infini's tokens/s >= 0.7
               x llama2's. Also untested on a GPU (none lent while it was written); smoke-tested on the CPU with a
               tiny model and compile=False

    python benchmarks/bench_infini_attention.py                  # about 5 minutes on 2 shared CPU cores
    python benchmarks/bench_infini_attention.py --quick          # tiny model, a smoke test: 25 s, 50 s when the
                                                                 # other core is busy (6 processes importing torch)
    python benchmarks/bench_infini_attention.py --json out.json  # also write the results as JSON
    python -c "import bench_infini_attention as b; b.gpu_rows()"  # from benchmarks/: the GPU forward rows alone
    python -c "import bench_infini_attention as b; b.gpu_train_rows(8)"  # the GPU training throughput alone
"""
import time

T_START = time.perf_counter()  # the wall time printed at the end includes the imports

import argparse
import copy
import inspect
import json
import math
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # the models at the repo root, harness.py beside this file
import harness  # noqa: E402
import infini_attention  # noqa: E402
import llama2  # noqa: E402

# CPU sizes. fwd_T: the forward lengths; fwd_reps / fwd_budget_s: timed passes after the first, and when to stop
# adding them; ctx: the decode contexts (multiples of segment_len), ctx_new tokens timed on each side of L;
# short_new: the tokens of the cached / uncached check, after a prompt of 2 segments - short_new / 2.
CONFIGS = {
    "default": dict(shape=dict(vocab_size=256, n_layer=2, n_head=4, n_kv_head=2, n_embd=256), segment_len=512,
                    fwd_T=(1024, 4096, 16384), fwd_reps=2, fwd_budget_s=20.0, ctx=(1024, 4096, 16384), ctx_new=32,
                    short_new=16, ab_T=1024, ab_segments=(256, 512)),
    "quick": dict(shape=dict(vocab_size=256, n_layer=2, n_head=4, n_kv_head=2, n_embd=64), segment_len=64,
                  fwd_T=(256, 512, 1024), fwd_reps=1, fwd_budget_s=2.0, ctx=(256, 512, 1024), ctx_new=8,
                  short_new=8, ab_T=256, ab_segments=(64,)),
}
INIT_STD, MEMORY_UPDATE = 0.1, "delta"
MODELS = ("llama2", "infini")  # the reference, then ours (harness's ratios: reference / ours)
# GPU: a Llama of GPT-2 124M's shape (bench_llama2.py's), Llama 2's vocabulary, the paper's segments of 2048
GPU_SHAPE = dict(vocab_size=32000, n_layer=12, n_head=12, n_kv_head=4, n_embd=768)
GPU_SEGMENT, GPU_T = 2048, (1024, 4096, 16384, 65536)
# GPU training throughput (issue 19's target: Infini >= 0.7 x llama2's tokens/s): infini_attention.py's CUDA preset
# (6 x 384, 6 heads, 2 kv heads, 4 segments of 256 per sequence of 1024), GPT-2's vocabulary, batch --batch_size
GPU_PRESET = dict(vocab_size=50257, n_layer=6, n_head=6, n_kv_head=2, n_embd=384)
GPU_PRESET_SEGMENT, GPU_PRESET_T, GPU_TRAIN_TARGET = 256, 1024, 0.7


def build_models(shape, segment_len, block_size, seed, init_std, memory_update):
    """(llama, infini) holding the same weights: a llama2.Llama, its matrices drawn from N(0, init_std), and an
    InfiniTransformer loaded from its state_dict (the gates, not in it, stay at their init). Both in eval mode.
    (Also run inside the forward workers, through inspect.getsource: it reads no global of this file.)"""
    torch.manual_seed(seed)
    llama = llama2.Llama(llama2.Config(block_size=block_size, **shape))
    for p in llama.parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, mean=0.0, std=init_std)
    infini = infini_attention.InfiniTransformer(infini_attention.Config(segment_len=segment_len,
                                                                        memory_update=memory_update, **shape))
    missing, unexpected = infini.load_state_dict(llama.state_dict(), strict=False)
    if unexpected or not all(k.endswith("self_attn.gate") for k in missing):
        raise RuntimeError(f"llama2 -> infini weights: missing {missing}, unexpected {unexpected}")
    return llama.eval(), infini.eval()


# --------------------------------------------------------------------------------------- forward

def forward_worker(spec):
    """One (model, T) in a fresh interpreter (run_forward_worker: the imports, build_models' source, this
    function's and a call, so it reads no global of this file): the no_grad pass, then forward + backward, each
    its peak memory and time (see the docstring). Prints one JSON line."""
    import ctypes, json, statistics, time  # noqa: E401
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    llama, infini = build_models(spec["shape"], spec["segment_len"], spec["block_size"], spec["seed"],
                                 spec["init_std"], spec["memory_update"])
    model = llama if spec["model"] == "llama2" else infini
    del llama, infini
    T = spec["T"]
    x = torch.randint(0, spec["shape"]["vocab_size"], (1, T + 1), generator=torch.Generator().manual_seed(spec["seed"]))
    idx, targets = x[:, :-1].contiguous(), x[:, 1:].contiguous()

    def status(key):  # KiB, from the kernel's accounting of this process's resident memory
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":"))

    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim  # freed heap memory back to the system (glibc)
    except (OSError, AttributeError):
        trim = None

    def run(grad, n=T):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        if grad:
            model.train()
            loss = model(idx[:, :n], targets[:, :n])[1]
            loss.backward()
        else:
            model.eval()
            with torch.no_grad():
                loss = model(idx[:, :n], targets[:, :n])[1]
        return time.perf_counter() - t0, loss.item()

    run(False, 64), run(True, 64)  # one-time allocations (thread pools, kernels' buffers) before any measurement
    out = {}
    for mode, grad in (("no_grad", False), ("fwd_bwd", True)):
        model.zero_grad(set_to_none=True)
        if trim is not None:
            trim(0)
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            base = status("VmRSS")
        except (OSError, StopIteration):  # not Linux: time only
            base = None
        first, loss = run(grad)
        peak = None if base is None else (status("VmHWM") - base) * 1024
        times = []
        while len(times) < spec["reps"] and first + sum(times) < spec["budget_s"]:
            times.append(run(grad)[0])
        out[mode] = dict(time_s=statistics.median(times) if times else first, runs_timed=len(times), first_s=first,
                         peak_bytes=peak, loss=loss)
    print(json.dumps(out))


def run_forward_worker(spec):
    imports = f"import sys\nsys.path.insert(0, {spec['root']!r})\n" + "".join(
        f"import {m}\n" for m in ("torch", "infini_attention", "llama2"))
    code = "\n".join((imports, inspect.getsource(build_models), inspect.getsource(forward_worker),
                      f"forward_worker({spec!r})\n"))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"forward worker {spec['model']} T={spec['T']} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def mib(n):
    return "n/a" if n is None else f"{n / 2**20:,.0f} MiB"


def forward_rows(c, seed, block_size):
    """For each T, each model in a fresh process (order flipping with T); returns rows (one per T and pass), checks."""
    results = {}
    for i, T in enumerate(c["fwd_T"]):
        for name in (MODELS if i % 2 == 0 else MODELS[::-1]):
            spec = dict(model=name, T=T, shape=c["shape"], segment_len=c["segment_len"], block_size=block_size,
                        seed=seed, init_std=INIT_STD, memory_update=MEMORY_UPDATE, reps=c["fwd_reps"],
                        budget_s=c["fwd_budget_s"], threads=torch.get_num_threads(), root=str(HERE.parent))
            results[name, T] = res = run_forward_worker(spec)
            print(f"forward T={T} {name}: " + ", ".join(
                f"{mode} {harness.fmt_s(m['time_s'])} {mib(m['peak_bytes'])}" for mode, m in res.items()), flush=True)
    rows = [dict(T=T, mode=mode, scores_bytes=c["shape"]["n_head"] * T * T * 4,
                 **{name: results[name, T][mode] for name in MODELS})
            for T in c["fwd_T"] for mode in ("no_grad", "fwd_bwd")]
    checks = {"forward_losses_finite": all(math.isfinite(r[name]["loss"]) for r in rows for name in MODELS)}
    return rows, checks


def print_forward_table(rows, scores_column=True):
    def cell(m):
        if "error" in m:
            return m["error"]
        return (f"{harness.fmt_s(m['time_s'])}{' (1 run)' if m.get('runs_timed') == 0 else ''} = "
                f"{1e6 * m['time_s'] / m['T']:,.0f} us/tok, {mib(m['peak_bytes'])}")

    def ratio(r):
        a, b = r["llama2"], r["infini"]
        return "-" if "error" in a or "error" in b else f"{a['time_s'] / b['time_s']:.2f}x"

    def peaks(r):
        a, b = r["llama2"].get("peak_bytes"), r["infini"].get("peak_bytes")
        return "-" if not a or not b else f"{a / b:.2f}x"

    scores = ("n_head T^2 fp32 (one layer's scores)",) if scores_column else ()
    harness.print_table(
        ("T", "pass", "llama2.py: time = per token, peak", "infini_attention.py: time = per token, peak",
         "time llama2 / infini", "peak llama2 / infini") + scores,
        [(f"{r['T']:,}", r["mode"].replace("fwd_bwd", "fwd+bwd"), cell(dict(r["llama2"], T=r["T"])),
          cell(dict(r["infini"], T=r["T"])), ratio(r), peaks(r))
         + ((mib(r["scores_bytes"]),) if scores_column else ()) for r in rows])


# ----------------------------------------------------------------------------------------- fwd+bwd A/B

def looped(model):
    """A copy of model whose attention layers run Attention.segment_loop (the loop over segments) as forward."""
    model = copy.deepcopy(model)
    for block in model.model.layers:
        block.self_attn.forward = block.self_attn.segment_loop
    return model


def train_rows(c, rounds, seed):
    """Forward + backward at T = c["ab_T"], A/B in this process: Infini (segments of each c["ab_segments"]) against
    llama2.Llama and against Infini's segment_loop, all holding the same weights. Returns rows, checks."""
    T, V = c["ab_T"], c["shape"]["vocab_size"]
    x = torch.randint(0, V, (1, T + 1), generator=torch.Generator().manual_seed(seed + 3))
    idx, targets = x[:, :-1].contiguous(), x[:, 1:].contiguous()

    def step(model):
        def run(_):
            model.train().zero_grad(set_to_none=True)
            loss = model(idx, targets)[1]
            loss.backward()
            return loss.item()
        return run

    cases, specs = {}, []
    for S in c["ab_segments"]:
        llama, infini = build_models(c["shape"], S, T, seed, INIT_STD, MEMORY_UPDATE)
        cases[f"seg{S}_llama2"] = (0, step(infini), step(llama))
        specs.append((f"seg{S}_llama2", f"fwd+bwd T={T:,}, Infini segments of {S}", "llama2.py", 1.0))
        cases[f"seg{S}_looped"] = (0, step(infini), step(looped(infini)))
        specs.append((f"seg{S}_looped", f"fwd+bwd T={T:,}, segments of {S}", "segment_loop", None))
    times, outputs = harness.run_rounds(cases, rounds, name="fwd+bwd round")
    rows = [harness.ratio_row(key, label, ref, target, *times[key]) for key, label, ref, target in specs]
    for r in rows:
        r["tokens_per_s_ours"], r["tokens_per_s_ref"] = T / r["ours_median_s"], T / r["ref_median_s"]
    checks = {"ab_losses_finite": all(math.isfinite(v) for pair in outputs.values() for v in pair)}
    checks.update({f"{key}_loss_match": abs(a - b) <= 1e-5 for key, (a, b) in outputs.items() if "looped" in key})
    return rows, checks


# ---------------------------------------------------------------------------------------- decode

def infini_decoder(model, prompt, n):
    """Prefill prompt (1, P) into a fresh state (its last position gives the first new token); returns
    dict(first, finite, end, start, tokens, end_state_bytes, start_state_bytes, filled): end(k) / start(k) decode
    k greedy tokens one at a time from the state after the prompt / after the prompt + n tokens, restoring it
    first (a step replaces M and z, and writes its key and value into the unfinished segment's buffer: that is
    restored from a copy, one copy of the buffer per call, outside the per-token cost)."""
    V = model.config.vocab_size
    state = model.new_state()

    def next_token(idx):
        return model.lm_head(model.hidden(idx, state)[0][:, -1])[:, :V].argmax(-1, keepdim=True)

    def snapshot():
        return [(s.M, s.z, None if s.buffer is None else s.buffer.clone(), s.filled) for s in state]

    def runner(tok0, snap):
        @torch.no_grad()
        def run(k):
            for s, (M, z, buffer, filled) in zip(state, snap):
                s.M, s.z, s.filled = M, z, filled
                s.buffer = None if buffer is None else buffer.clone()
            tok, out = tok0, []
            for _ in range(k):
                tok = next_token(tok)
                out.append(tok)
            return torch.cat(out, 1)
        return run

    with torch.no_grad():
        logits = model.lm_head(model.hidden(prompt, state)[0][:, -1])[:, :V]
    first = logits.argmax(-1, keepdim=True)
    d = dict(first=first, finite=bool(torch.isfinite(logits).all()), filled=state[0].filled,
             end_state_bytes=model.state_bytes(state))
    d["end"] = runner(first, snapshot())
    toks_end = d["end"](n)
    d["start_state_bytes"], d["start_filled"] = model.state_bytes(state), state[0].filled
    d["start"] = runner(toks_end[:, -1:], snapshot())
    d["tokens"] = torch.cat([first, toks_end, d["start"](n)], 1)
    return d


def llama_decoder(model, prompt, n):
    """The same for llama2.Llama with a KVCache per layer for the prompt + 2n + 1 tokens: end(k) decodes from
    position P, start(k) from P + n (slots from there on are rewritten by each call)."""
    V, P = model.config.vocab_size, prompt.size(1)
    cache = [llama2.KVCache(P + 2 * n + 1) for _ in model.model.layers]

    def runner(tok0, pos0):
        @torch.no_grad()
        def run(k):
            tok, out = tok0, []
            for pos in range(pos0, pos0 + k):
                tok = model.lm_head(model.hidden(tok, cache, pos)[:, -1])[:, :V].argmax(-1, keepdim=True)
                out.append(tok)
            return torch.cat(out, 1)
        return run

    with torch.no_grad():
        logits = model.lm_head(model.hidden(prompt, cache, 0)[:, -1])[:, :V]
    first = logits.argmax(-1, keepdim=True)
    d = dict(first=first, finite=bool(torch.isfinite(logits).all()), end=runner(first, P))
    toks_end = d["end"](n)
    d["start"] = runner(toks_end[:, -1:], P + n)
    d["tokens"] = torch.cat([first, toks_end, d["start"](n)], 1)
    d["buffer_bytes"], d["buffer_tokens"] = sum(c.k.nbytes + c.v.nbytes for c in cache), P + 2 * n + 1
    return d


def infini_state_formula(cfg, filled, itemsize=4):
    """M (d x d) and z (d) per layer and key/value head, fp32, plus, inside a segment (filled > 0), the buffer of
    its keys and values: segment_len - 1 slots of K and V."""
    d, kv = cfg.head_dim, cfg.n_kv_head
    slots = cfg.segment_len - 1 if filled else 0
    return cfg.n_layer * kv * (d * d + d) * 4 + 2 * cfg.n_layer * kv * slots * d * itemsize


def decode_rows(c, llama, infini, rounds, seed):
    """Per L: prefill L - n tokens into each model, time n tokens before L and n after; returns rows, checks."""
    n, S, V = c["ctx_new"], c["segment_len"], c["shape"]["vocab_size"]
    cases, dec, checks = {}, {}, {}
    for L in c["ctx"]:
        assert L % S == 0 and n < S, "the context rows need L a multiple of segment_len, ctx_new < segment_len"
        prompt = torch.randint(0, V, (1, L - n), generator=torch.Generator().manual_seed(seed + L))
        dec[L] = {"infini": infini_decoder(infini, prompt, n), "llama2": llama_decoder(llama, prompt, n)}
        for name, model in (("infini", infini), ("llama2", llama)):  # one more prefill each, not timed
            checks[f"ctx{L}_{name}_tokens_identical"] = torch.equal(
                dec[L][name]["tokens"], model.generate(prompt, 2 * n + 1, temperature=0.0)[:, L - n:])
            checks[f"ctx{L}_{name}_prefill_finite"] = dec[L][name]["finite"]
        cases[f"ctx{L}_end"] = (n, dec[L]["infini"]["end"], dec[L]["llama2"]["end"])
        cases[f"ctx{L}_start"] = (n, dec[L]["infini"]["start"], dec[L]["llama2"]["start"])
        print(f"decode L={L}: prefilled, tokens as generate's: "
              f"{checks[f'ctx{L}_infini_tokens_identical'] and checks[f'ctx{L}_llama2_tokens_identical']}", flush=True)
    times, _ = harness.run_rounds(cases, rounds, name="decode round")
    rows = []
    kv_per_token = llama.kv_bytes_per_token(4)
    for L in c["ctx"]:
        di, dl = dec[L]["infini"], dec[L]["llama2"]
        for half, first_pos, filled, state in (("end", L - n, di["filled"], di["end_state_bytes"]),
                                               ("start", L, di["start_filled"], di["start_state_bytes"])):
            r = harness.ratio_row(f"ctx{L}_{half}", f"positions {first_pos}..{first_pos + n - 1}", "llama2", None,
                                  *times[f"ctx{L}_{half}"])
            r.update(context=L, half=half, first_pos=first_pos, new_tokens=n, infini_filled=filled,
                     infini_s_per_token=r["ours_median_s"] / n, llama_s_per_token=r["ref_median_s"] / n,
                     infini_state_bytes=state, infini_state_formula=infini_state_formula(infini.config, filled),
                     llama_kv_bytes=kv_per_token * first_pos)
            checks[f"ctx{L}_{half}_infini_state_bytes_match"] = state == r["infini_state_formula"]
            rows.append(r)
        checks[f"ctx{L}_llama2_kv_buffer_bytes_match"] = dl["buffer_bytes"] == kv_per_token * dl["buffer_tokens"]
        checks[f"ctx{L}_distinct_tokens"] = {name: len(set(dec[L][name]["tokens"][0].tolist())) for name in MODELS}
    starts = {r["infini_state_bytes"] for r in rows if r["half"] == "start"}
    checks["infini_state_flat_match"] = len(starts) == 1 and starts == {infini_state_formula(infini.config, 0)}
    return rows, checks


def print_decode_table(rows, segment_len):
    def ms(r, key):  # ms per token, and (xN) against the first row's
        return f"{1000 * r[key]:.2f} (x{r[key] / rows[0][key]:.2f})"

    harness.print_table(
        ("context L", "timed positions", "Infini segment", "llama2 ms/token", "infini ms/token",
         "llama2 / infini (range)", "llama2 KV cache", "infini state"),
        [(f"{r['context']:,}", f"{r['first_pos']:,}..{r['first_pos'] + r['new_tokens'] - 1:,}",
          f"{r['infini_filled']}..{r['infini_filled'] + r['new_tokens'] - 1} of {segment_len}",
          ms(r, "llama_s_per_token"), ms(r, "infini_s_per_token"),
          f"{r['ratio']:.2f}x ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})",
          f"{r['llama_kv_bytes']:,} B", f"{r['infini_state_bytes']:,} B") for r in rows])


# ---------------------------------------------------------------------------------------- checks

@torch.no_grad()
def other_checks(c, llama, infini, seed):
    """Infini's cached and uncached greedy tokens; Infini's logits = llama2's on one segment."""
    S, V, n = c["segment_len"], c["shape"]["vocab_size"], c["short_new"]
    prompt = torch.randint(0, V, (1, 2 * S - n // 2), generator=torch.Generator().manual_seed(seed + 1))
    cached = infini.generate(prompt, n, temperature=0.0, use_cache=True)
    uncached = infini.generate(prompt, n, temperature=0.0, use_cache=False)
    x = torch.randint(0, V, (1, S), generator=torch.Generator().manual_seed(seed + 2))
    li, ll = infini(x)[0], llama(x)[0]
    diff = (li - ll).abs().max().item()
    return {"infini_cache_tokens_identical": torch.equal(cached, uncached),
            "infini_cache_distinct_tokens": len(set(cached[0, prompt.size(1):].tolist())),
            "one_segment_logits_max_abs_diff": diff, "one_segment_logits_match": diff <= 1e-5,
            "one_segment_logits_finite": bool(torch.isfinite(li).all() and torch.isfinite(ll).all())}


# ------------------------------------------------------------------------------------------- GPU

def gpu_rows(device="cuda", shape=None, segment_len=GPU_SEGMENT, lengths=GPU_T, reps=3, seed=1337):
    """The forward rows on one device in one process, bf16 autocast over fp32 weights, printed; returns the rows.
    On a CPU (device="cpu", a tiny shape: a smoke test of this code) the peaks are None."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    shape = shape or GPU_SHAPE
    llama, infini = build_models(shape, segment_len, max(lengths), seed, 0.02, MEMORY_UPDATE)
    models = dict(llama2=llama.to(device), infini=infini.to(device))
    results = {}
    for i, T in enumerate(lengths):
        x = torch.randint(0, shape["vocab_size"], (1, T + 1), device=device,
                          generator=torch.Generator(device).manual_seed(seed))
        idx, targets = x[:, :-1].contiguous(), x[:, 1:].contiguous()
        for name in (MODELS if i % 2 == 0 else MODELS[::-1]):
            model = models[name]

            def run(grad):
                model.zero_grad(set_to_none=True)
                sync()
                t0 = time.perf_counter()
                with torch.autocast(device.type, dtype=torch.bfloat16), torch.set_grad_enabled(grad):
                    loss = model.train(grad)(idx, targets)[1]
                if grad:
                    loss.backward()
                sync()
                return time.perf_counter() - t0, loss.item()

            for mode, grad in (("no_grad", False), ("fwd_bwd", True)):
                try:
                    model.zero_grad(set_to_none=True)
                    if cuda:
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats(device)
                        base = torch.cuda.memory_allocated(device)
                    first, loss = run(grad)
                    peak = torch.cuda.max_memory_allocated(device) - base if cuda else None
                    times = [run(grad)[0] for _ in range(reps)]
                    results[name, T, mode] = dict(time_s=sorted(times)[len(times) // 2], runs_timed=reps,
                                                  first_s=first, peak_bytes=peak, loss=loss)
                except torch.cuda.OutOfMemoryError as e:
                    results[name, T, mode] = dict(error=f"out of memory ({str(e).splitlines()[0][:60]})")
                model.zero_grad(set_to_none=True)
    rows = [dict(T=T, mode=mode, **{name: results[name, T, mode] for name in MODELS})
            for T in lengths for mode in ("no_grad", "fwd_bwd")]
    name = torch.cuda.get_device_name(device) if cuda else "cpu (smoke test)"
    print(f"GPU {name}: {shape['n_layer']} x {shape['n_embd']}, {shape['n_head']} heads, {shape['n_kv_head']} kv "
          f"heads, vocab {shape['vocab_size']}, Infini segments of {segment_len}; bf16 autocast, fp32 weights, no "
          f"torch.compile, batch 1; time = median of {reps} passes after the first, peak = max_memory_allocated "
          f"over the first minus memory_allocated before:")
    print_forward_table(rows, scores_column=False)
    return dict(device=name, shape=shape, segment_len=segment_len, rows=rows)


def gpu_train_rows(batch_size, device="cuda", shape=None, segment_len=GPU_PRESET_SEGMENT, T=GPU_PRESET_T, steps=30,
                   warmup=5, compile=True):
    """Training throughput (harness.train_throughput: bf16 autocast, torch.compile, fused AdamW) of llama2.Llama and
    of Infini at the CUDA preset's shape, printed with Infini's tokens/s over llama2's against GPU_TRAIN_TARGET.
    (device, shape, the step counts and compile exist only to smoke-test this on a CPU with a tiny model.)"""
    shape = shape or GPU_PRESET

    def infini():
        model = infini_attention.InfiniTransformer(infini_attention.Config(segment_len=segment_len,
                                                                           memory_update=MEMORY_UPDATE, **shape))
        model.config.block_size = T  # the sequence length train_throughput reads (Infini's Config has no such field)
        return model

    builds = {"llama2": lambda: llama2.Llama(llama2.Config(block_size=T, **shape)), "infini": infini}
    options = {"llama2": dict(compile=compile),
               "infini": dict(compile=compile, flops_per_token=lambda m: infini_attention.flops_per_token(m, T))}
    out = harness.train_throughputs(builds, batch_size, device, steps, warmup, options)
    for name, g in out.items():
        print(harness.gpu_line(f"{name} {shape['n_layer']}x{shape['n_embd']}, {shape['n_head']} heads, "
                               f"{shape['n_kv_head']} kv heads" + (f", segments of {segment_len}," if name == "infini"
                                                                    else ","), g))
    ratio = out["infini"]["tokens_per_s"] / out["llama2"]["tokens_per_s"]
    print(f"GPU train tokens/s infini / llama2: {ratio:.2f} (target >= {GPU_TRAIN_TARGET}: "
          f"{'yes' if ratio >= GPU_TRAIN_TARGET else 'NO'})")
    return dict(throughput=out, ratio=ratio, target=GPU_TRAIN_TARGET)


def main():
    p = harness.common_args(argparse.ArgumentParser(
        description="infini_attention.py vs llama2.py's full attention: forward time and peak memory at 1K-16K "
                    "tokens, decoding cost and cache bytes after 1K-16K tokens (see the docstring)"))
    p.set_defaults(threads=1)  # one torch thread: see the docstring (--threads 0: torch's own choice)
    p.set_defaults(batch_size=8)  # the GPU training rows: the CUDA preset's batch
    args = harness.parse_args(p)
    c = CONFIGS["quick" if args.quick else "default"]
    block_size = max(max(c["fwd_T"]), max(c["ctx"]) + c["ctx_new"] + 1)

    info = harness.machine()
    llama, infini = build_models(c["shape"], c["segment_len"], block_size, args.seed, INIT_STD, MEMORY_UPDATE)
    lc, ic = llama.config, infini.config
    config = dict(c, intermediate_size=lc.intermediate_size, head_dim=lc.head_dim, block_size=block_size,
                  init_std=INIT_STD, memory_update=MEMORY_UPDATE, llama_params=llama.num_params(False),
                  infini_params=infini.num_params(False), seed=args.seed)
    print(f"models: {lc.n_layer} layers, {lc.n_embd} wide, {lc.n_head} heads, {lc.n_kv_head} kv heads, SwiGLU "
          f"{lc.intermediate_size}, vocab {lc.vocab_size}, the same weights (N(0, {INIT_STD})): llama2.Llama, "
          f"block_size {block_size:,}, {config['llama_params'] / 1e6:.2f}M params | InfiniTransformer, segments of "
          f"{ic.segment_len}, {ic.memory_update} memory, {config['infini_params'] / 1e6:.2f}M params (+ gates) | fp32")

    fwd, checks = forward_rows(c, args.seed, block_size)
    print(f"forward pass over T tokens, batch 1, with the loss; each (model, T) in a fresh process, no_grad then "
          f"fwd+bwd; time = median of up to {c['fwd_reps']} passes after the first (per token = / T); peak = peak "
          f"resident size over the first pass minus the size before it (VmHWM reset through /proc/self/clear_refs):")
    print_forward_table(fwd)

    ab, ab_checks = train_rows(c, args.rounds, args.seed)
    checks.update(ab_checks)
    print(f"forward + backward, batch 1, T={c['ab_T']:,}, with the loss, in this process: {args.rounds} rounds + 1 "
          f"warmup, each pair alternating, medians, range = the per-round ratios:")
    harness.print_ratio_table(ab)
    harness.print_legend(args.quick)
    print(f"losses equal to segment_loop's: {harness.passed(ab_checks)} | losses finite: "
          f"{ab_checks['ab_losses_finite']}")

    dec, dec_checks = decode_rows(c, llama, infini, args.rounds, args.seed)
    checks.update(dec_checks)
    print(f"decoding cost per token, greedy, batch 1, each model from its cache after a prompt of L - {c['ctx_new']} "
          f"tokens (prefill not timed): {c['ctx_new']} tokens before L and {c['ctx_new']} after, {args.rounds} rounds "
          f"+ 1 warmup, alternating, medians, range = the per-round ratios; (xN) = per-token time / the first "
          f"row's; cache bytes when the row starts (llama2: kv_bytes_per_token(4) x tokens; Infini: state_bytes, "
          f"at most {infini_state_formula(ic, ic.segment_len - 1):,} B at any L):")
    print_decode_table(dec, c["segment_len"])

    def every(suffix):
        return all(v for k, v in dec_checks.items() if k.endswith(suffix))

    distinct = ", ".join("{llama2}/{infini}".format(**dec_checks[f"ctx{L}_distinct_tokens"]) for L in c["ctx"])
    print(f"tokens as generate's: {every('tokens_identical')} | prefill logits finite: {every('finite')} | Infini "
          f"state = formula: {every('state_bytes_match')}, the same at every segment start: "
          f"{dec_checks['infini_state_flat_match']} | llama2 KV buffers = kv_bytes_per_token: "
          f"{every('kv_buffer_bytes_match')} | distinct tokens of {2 * c['ctx_new'] + 1} (llama2/infini): {distinct}")

    more = other_checks(c, llama, infini, args.seed)
    checks.update(more)
    print(f"Infini cached = uncached greedy tokens ({c['short_new']} after "
          f"{2 * c['segment_len'] - c['short_new'] // 2} tokens, {more['infini_cache_distinct_tokens']} distinct): "
          f"{more['infini_cache_tokens_identical']} | "
          f"Infini logits = llama2's on one segment ({c['segment_len']} tokens): max abs diff "
          f"{more['one_segment_logits_max_abs_diff']:.1e}, {more['one_segment_logits_match']} | forward losses "
          f"finite: {checks['forward_losses_finite']}")

    gpu, gpu_ok = harness.gpu_section(lambda: dict(forward=gpu_rows(), train=gpu_train_rows(args.batch_size)))
    ok = gpu_ok and harness.passed(checks) and all(v for k, v in checks.items() if k.endswith("finite"))
    # status 1: tokens off generate's or cached off uncached, a cache size off its formula, Infini off llama2 on
    # one segment, a loss or logits not finite, or the GPU rows failed
    harness.finish(T_START, info, args.json, ok, config=config, rounds=args.rounds, forward=fwd, fwd_bwd_ab=ab,
                   decode=dec, checks=checks, gpu=gpu)


if __name__ == "__main__":
    main()
