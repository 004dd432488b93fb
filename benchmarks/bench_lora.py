"""Benchmark lora.py's fine-tuning methods against each other at GPT-2 124M's shape: full fine-tuning vs LoRA vs QLoRA.

There is no download here: the base is lora.GPT(lora.Config()), GPT-2 124M's shape (12 layers x 768, 12 heads,
vocab 50257 padded to 50304, context 1024, the input embedding tied to the head) with random weights (seeded,
lora.py's own init). Weights do not change what is measured below (counts, bytes, memory, time), only the losses.
The three methods, each in a fresh Python process (so a peak is that method's alone, not the one before's):

  full   every parameter trainable (124.48M, the tied wte/lm_head matrix counted once), lora.configure_optimizer:
         AdamW (betas 0.9, 0.95), weight decay 0.1 on the matrices, lr 1e-4
  LoRA   lora.add_lora(model, rank 8, alpha 16, targets c_attn, c_proj, c_fc: attn.c_attn, attn.c_proj, mlp.c_fc and
         mlp.c_proj of every block); only the adapters trainable; the same optimizer, lr 1e-3 (as
         lora.py's: B starts at zero); the learning rates change the losses printed, nothing measured
  QLoRA  lora.quantize_nf4(model) (those layers' weights as NF4 codes, block 64, scales double-quantized) and then
         add_lora as above: the adapters train against the dequantized 4-bit base

Per method, in that process:
  trainable      parameters that require grad, and their share of the whole model's 124.48M
  model          bytes of the model's parameters and buffers (each tensor once): NF4 shrinks the adapted layers'
                 weights from 32 to ~4.13 bits; wte (38.6M), wpe, LayerNorms and biases stay float32
  grads          bytes of the .grad tensors after a step
  optim state    bytes of AdamW's state tensors after the steps (exp_avg, exp_avg_sq: 8 bytes per trainable
                 parameter, plus a 4-byte step counter per parameter tensor)
  RSS            CPU: the process's resident size with the model, optimizer and batch built (before any step), and
                 its peak resident size over the training steps (VmHWM in /proc/self/status, reset to the current
                 size through /proc/self/clear_refs just before the first step: the building of the float32 model
                 that QLoRA then quantizes is not in it, and the peak is this process's own, not ru_maxrss, which
                 starts from the forked parent's)
  step time      forward + backward + AdamW step (+ zero_grad), fp32, batch 1 x 256 tokens of a fixed random batch,
                 the median over the timed steps after 2 warmup steps (the first allocates AdamW's state);
                 forward + backward and the optimizer step are also given apart
  checkpoint     torch.save into a BytesIO: the whole state_dict (full: the model; LoRA/QLoRA: base + adapters, an
                 NF4 base as its codes and scales) and lora_state_dict(model), what an adapter-only checkpoint holds
  NF4            (QLoRA) bits per weight of the NF4 layers (codes, int8 scales, their float32 scales, the offset),
                 and the time to dequantize all of them once (a step does it twice: forward and backward; on a
                 CPU the CPU time of one thread, time.thread_time, which load on the machine barely changes)
  QLoRA int64    a fourth method, for issue 19's before/after: QLoRA with NF4Linear.weight_as replaced by
                 weight_as_int64 below, lora.py's dequantization before issue 19 (an int64 copy of the codes indexing
                 the (256, 2) pair table in 2-D, then a multiply into a new tensor): the same outputs bit for bit,
                 its peak RSS and step time beside the others
  A/B            issue 19's row: LoRA, QLoRA and QLoRA int64 built in this process and stepped in turn, round after
                 round (interleaved, so load falls on all three alike), one torch thread (with 2 threads a loaded
                 machine stalls each op at its barrier): per method the median (range) of the step's wall and CPU
                 time (time.thread_time), and QLoRA's / LoRA's per round: the median (range) of those ratios;
                 target QLoRA / LoRA <= 1.3x (it was 1.9x). Check: QLoRA's losses are QLoRA int64's, bit for bit
Checks (exit status 1 if one fails): LoRA's trainable count is n_layer x rank x 16 x n_embd (the four adapted
layers per block); LoRA's first loss equals full fine-tuning's (B starts at zero, so the function is the base's);
every loss is finite; the optimizer state is 8 bytes per trainable parameter plus the step counters; in the A/B,
QLoRA's losses are QLoRA int64's.

  GPU    only with CUDA: the same four, each in a fresh process, bf16 autocast (float32 weights, the NF4 base
         dequantized to bf16), fused AdamW, no torch.compile, B=--batch_size x T=1024: step time (median of 20
         after 5 warmup, torch.cuda.synchronize() around each) and torch.cuda.max_memory_allocated over the steps

    python benchmarks/bench_lora.py                  # about 6 minutes on 2 CPU cores
    python benchmarks/bench_lora.py --quick          # tiny model, a smoke test (~40 s)
    python benchmarks/bench_lora.py --json out.json  # also write the results as JSON
    python benchmarks/bench_lora.py --rounds 9       # timed steps per method (default 5; 2 with --quick)
    python -c "import bench_lora as b; b.gpu_rows(16)"   # from benchmarks/: the GPU rows alone
"""
import time

T_START = time.perf_counter()  # the wall time printed at the end includes the imports

import argparse
import inspect
import json
import statistics
import subprocess
import sys
import types
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # the models at the repo root, harness.py beside this file
import harness  # noqa: E402
import lora  # noqa: E402

# CPU sizes. default: GPT-2 124M's shape (lora.Config()'s defaults); quick: a tiny GPT with GPT-2's vocabulary.
# Every adapted weight must be a whole number of NF4 blocks (64, two codes per byte): all of these are.
CONFIGS = {
    "default": dict(model=dict(), batch=1, seq=256, warmup=2),
    "quick": dict(model=dict(n_layer=2, n_head=2, n_embd=64, block_size=256), batch=1, seq=64, warmup=1),
}
METHODS = ("full", "lora", "qlora", "qlora_int64")
NAMES = {"full": "full fine-tuning", "lora": "LoRA", "qlora": "QLoRA", "qlora_int64": "QLoRA int64 (before #19)"}
LORA = dict(rank=8, alpha=16, targets=("c_attn", "c_proj", "c_fc"))
LR = {"full": 1e-4, "lora": 1e-3, "qlora": 1e-3, "qlora_int64": 1e-3}  # adapters (B at 0) take a higher rate


def weight_as_int64(self, dtype):
    """lora.NF4Linear.weight_as before issue 19, verbatim: an int64 copy of the codes indexes the (256, 2) pair
    table, the product is a new float32 tensor, then cast to dtype."""
    n_blocks = self.in_features * self.out_features // self.block_size
    absmax = (self.absmax_q.float() * self.absmax_scale[:, None]).flatten()[:n_blocks] + self.offset
    w = self.pairs[self.packed.long()].view(n_blocks, self.block_size) * absmax[:, None]
    return w.view(self.out_features, self.in_features).to(dtype)


def method_worker(spec):
    """One method's measurements, run in a fresh interpreter by run_worker (inspect.getsource + this call), so it
    imports what it needs itself and reads no global of the bench. Returns a dict (JSON-able)."""
    import io, math, statistics, sys, time, types  # noqa: E401
    from contextlib import nullcontext
    import torch
    sys.path.insert(0, spec["root"])
    import lora
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    method = spec["method"]
    if spec["weight_as"]:  # QLoRA int64: the dequantization before issue 19 (weight_as_int64's source)
        ns = dict(torch=torch)
        exec(spec["weight_as"], ns)
        lora.NF4Linear.weight_as = ns["weight_as_int64"]

    def status(key):  # KiB, the kernel's accounting of this process's resident memory
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":"))

    def rss_reset():  # "5" resets VmHWM to the current resident size; None where there is no /proc
        try:
            hwm = status("VmHWM") * 1024
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return status("VmRSS") * 1024, hwm
        except (OSError, StopIteration):
            return None, None

    def nbytes(tensors):
        seen, n = set(), 0
        for t in tensors:
            if t is not None and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                n += t.numel() * t.element_size()
        return n

    torch.manual_seed(spec["seed"])  # the same base weights in every process
    cfg = lora.Config(**spec["model"])
    model = lora.GPT(cfg)
    total = sum(p.numel() for p in model.parameters())  # the tied wte/lm_head once
    if method.startswith("qlora"):
        lora.quantize_nf4(model, 64, spec["targets"])
    if method != "full":
        lora.add_lora(model, spec["rank"], spec["alpha"], spec["targets"])
    model.to(device).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    [opt] = lora.configure_optimizer(model, types.SimpleNamespace(lr=spec["lr"], weight_decay=0.1, optimizer="adamw"),
                                     device)
    x = torch.randint(0, cfg.vocab_size, (spec["batch"], spec["seq"] + 1),
                      generator=torch.Generator().manual_seed(spec["seed"] + 1)).to(device)
    idx, targets = x[:, :-1].contiguous(), x[:, 1:].contiguous()
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if spec["autocast"] else nullcontext()

    def step():
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with ctx:
            _, loss = model(idx, targets)
        loss.backward()
        sync()
        t1 = time.perf_counter()
        opt.step()
        sync()
        return t1 - t0, time.perf_counter() - t1, loss.item()

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        cuda_before = torch.cuda.memory_allocated(device)
    rss_before, hwm_build = rss_reset()
    fb, op, losses = [], [], []
    for i in range(spec["warmup"] + spec["steps"]):
        t_fb, t_op, loss = step()
        losses.append(loss)
        if i >= spec["warmup"]:
            fb.append(t_fb)
            op.append(t_op)
    rss_peak = status("VmHWM") * 1024 if rss_before is not None else None
    out = dict(method=method, device=str(device), autocast=spec["autocast"], batch=spec["batch"], seq=spec["seq"],
               warmup=spec["warmup"], steps=spec["steps"], total_params=total,
               trainable_params=sum(p.numel() for p in trainable), trainable_tensors=len(trainable),
               model_bytes=nbytes(list(model.parameters()) + list(model.buffers())),
               grad_bytes=nbytes(p.grad for p in trainable),
               optim_state_bytes=sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                                     if torch.is_tensor(t)),
               step_s=[a + b for a, b in zip(fb, op)], fwd_bwd_s=fb, optim_s=op, losses=losses,
               losses_finite=all(math.isfinite(v) for v in losses),
               rss_before_bytes=rss_before, rss_peak_bytes=rss_peak, rss_peak_with_build_bytes=hwm_build)
    out["step_median_s"] = statistics.median(out["step_s"])
    out["fwd_bwd_median_s"], out["optim_median_s"] = statistics.median(fb), statistics.median(op)
    if cuda:
        out.update(device_name=torch.cuda.get_device_name(device), cuda_before_bytes=cuda_before,
                   cuda_peak_bytes=torch.cuda.max_memory_allocated(device))
    nf4 = [m for m in model.modules() if isinstance(m, lora.NF4Linear)]
    if nf4:
        n = sum(m.in_features * m.out_features for m in nf4)
        out.update(nf4_layers=len(nf4), nf4_weights=n,
                   nf4_bits_per_weight=sum(m.bits_per_weight() * m.in_features * m.out_features for m in nf4) / n)
        dtype = torch.bfloat16 if spec["autocast"] else torch.float32
        clock = time.perf_counter if cuda else time.thread_time  # CPU: one thread's CPU time (load stalls 2+ threads)
        threads = torch.get_num_threads()
        torch.set_num_threads(threads if cuda else 1)
        times = []
        with torch.no_grad():
            for _ in range(spec["steps"] + 1):  # the first warms up
                sync()
                t = clock()
                for m in nf4:
                    m.weight_as(dtype)
                sync()
                times.append(clock() - t)
        torch.set_num_threads(threads)
        out["nf4_dequant_all_s"] = statistics.median(times[1:])
    if spec["sizes"]:  # after the peak: these buffers are not in it
        def saved(obj):
            buf = io.BytesIO()
            torch.save(obj, buf)
            return buf.getbuffer().nbytes
        out["state_dict_file_bytes"] = saved(model.state_dict())
        out["adapter_file_bytes"] = saved(lora.lora_state_dict(model)) if method != "full" else None
    return out


def run_worker(spec):
    code = inspect.getsource(method_worker) + f"\nimport json\nprint(json.dumps(method_worker({spec!r})))\n"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{spec['method']} worker failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_methods(c, steps, seed, device="cpu", autocast=False, sizes=True, methods=METHODS):
    """{method: method_worker result}, each of methods in a fresh process, in that order."""
    out = {}
    for method in methods:
        spec = dict(method=method, model=c["model"], batch=c["batch"], seq=c["seq"], warmup=c["warmup"], steps=steps,
                    seed=seed, lr=LR[method], device=device, autocast=autocast, sizes=sizes,
                    threads=torch.get_num_threads() if device == "cpu" else 0, root=str(HERE.parent),
                    rank=LORA["rank"], alpha=LORA["alpha"], targets=LORA["targets"],
                    weight_as=inspect.getsource(weight_as_int64) if method == "qlora_int64" else None)
        t = time.perf_counter()
        out[method] = r = run_worker(spec)
        print(f"{NAMES[method]}: {harness.fmt_s(r['step_median_s'])}/step, process {time.perf_counter() - t:.1f} s",
              flush=True)
    return out


def mb(n):
    return "n/a" if n is None else f"{n / 1e6:,.1f} MB"


def checks_of(res, c):
    """The checks listed in the docstring (the *match entries decide the exit status with harness.passed)."""
    cfg = lora.Config(**c["model"])
    full, lo = res["full"], res["lora"]
    return {
        "lora_trainable_match": lo["trainable_params"] == cfg.n_layer * LORA["rank"] * 16 * cfg.n_embd,
        "qlora_trainable_match": res["qlora"]["trainable_params"] == lo["trainable_params"],
        "lora_initial_loss_match": abs(lo["losses"][0] - full["losses"][0]) <= 1e-6 * abs(full["losses"][0]),
        "losses_finite_match": all(r["losses_finite"] for r in res.values()),
        "optim_state_bytes_match": all(r["optim_state_bytes"] == 8 * r["trainable_params"] + 4 * r["trainable_tensors"]
                                       for r in res.values()),
        "initial_losses": {m: r["losses"][0] for m, r in res.items()},
        "final_losses": {m: r["losses"][-1] for m, r in res.items()},
    }


def print_cpu_tables(res, c):
    total = res["full"]["total_params"]
    lo = res["lora"]["step_median_s"]

    def trainable(r):
        return f"{r['trainable_params']:,} ({100 * r['trainable_params'] / total:.2f}%)"

    def peak(r):
        if r["rss_peak_bytes"] is None:
            return "n/a (no /proc)"
        return f"{mb(r['rss_peak_bytes'])} (+{mb(r['rss_peak_bytes'] - r['rss_before_bytes'])})"

    def ckpt(r):
        return mb(r["state_dict_file_bytes"]) + ("" if r["adapter_file_bytes"] is None
                                                 else f" (adapters: {mb(r['adapter_file_bytes'])})")

    def step(r):
        fmt = harness.fmt_s
        return f"{fmt(r['step_median_s'])} ({fmt(min(r['step_s']))}-{fmt(max(r['step_s']))})"

    harness.print_table(
        ("method", "trainable params", "model", "grads", "optim state", "RSS before steps",
         "peak RSS in steps (+ added)", "state_dict file (adapter-only)"),
        [(NAMES[m], trainable(r), mb(r["model_bytes"]), mb(r["grad_bytes"]), mb(r["optim_state_bytes"]),
          mb(r["rss_before_bytes"]), peak(r), ckpt(r)) for m, r in res.items()])
    print()
    harness.print_table(
        ("method", "step: median (range)", "fwd+bwd", "AdamW step", "tokens/s", "step / LoRA's"),
        [(NAMES[m], step(r), harness.fmt_s(r["fwd_bwd_median_s"]), harness.fmt_s(r["optim_median_s"]),
          f"{c['batch'] * c['seq'] / r['step_median_s']:,.0f}", f"{r['step_median_s'] / lo:.2f}x")
         for m, r in res.items()])


def dequant_ab(c, rounds, seed):
    """Issue 19's A/B (see the docstring): {"wall_s"/"cpu_s": {method: [per round]}, "ratio_wall"/"ratio_cpu":
    {method: [step / LoRA's step, per round]}, "losses": {method: [...]}} for LoRA, QLoRA and QLoRA int64."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = lora.Config(**c["model"])
    x = torch.randint(0, cfg.vocab_size, (c["batch"], c["seq"] + 1), generator=torch.Generator().manual_seed(seed + 1))
    idx, targets = x[:, :-1].contiguous(), x[:, 1:].contiguous()
    runs = {}
    for method in ("lora", "qlora", "qlora_int64"):
        torch.manual_seed(seed)  # the same base weights as the workers'
        model = lora.GPT(cfg)
        if method != "lora":
            lora.quantize_nf4(model, 64, LORA["targets"])
        lora.add_lora(model, LORA["rank"], LORA["alpha"], LORA["targets"]).train()
        for m in model.modules():
            if method == "qlora_int64" and isinstance(m, lora.NF4Linear):
                m.weight_as = types.MethodType(weight_as_int64, m)
        opt_args = types.SimpleNamespace(lr=LR[method], weight_decay=0.1, optimizer="adamw")
        runs[method] = (model, *lora.configure_optimizer(model, opt_args, torch.device("cpu")))
    out = {k: {m: [] for m in runs} for k in ("wall_s", "cpu_s", "losses")}
    for r in range(c["warmup"] + rounds):
        for method, (model, opt) in runs.items():
            t, t_cpu = time.perf_counter(), time.thread_time()
            opt.zero_grad(set_to_none=True)
            _, loss = model(idx, targets)
            loss.backward()
            opt.step()
            if r >= c["warmup"]:
                out["wall_s"][method].append(time.perf_counter() - t)
                out["cpu_s"][method].append(time.thread_time() - t_cpu)
            out["losses"][method].append(loss.item())
    torch.set_num_threads(threads)
    for k in ("wall", "cpu"):
        out["ratio_" + k] = {m: [a / b for a, b in zip(v, out[k + "_s"]["lora"])] for m, v in out[k + "_s"].items()}
    return out


def print_ab(ab):
    def cell(v, fmt):
        return f"{fmt(statistics.median(v))} ({fmt(min(v))}-{fmt(max(v))})"

    def ratio(v):
        return f"{v:.2f}x"

    print(f"issue 19, interleaved A/B in one process, 1 torch thread, {len(ab['wall_s']['lora'])} rounds "
          f"(target: QLoRA / LoRA <= 1.3x; before issue 19 ~1.9x):")
    harness.print_table(
        ("method", "step wall: median (range)", "step CPU time", "/ LoRA's, per round: wall", "CPU time"),
        [(NAMES[m], cell(ab["wall_s"][m], harness.fmt_s), cell(ab["cpu_s"][m], harness.fmt_s),
          cell(ab["ratio_wall"][m], ratio), cell(ab["ratio_cpu"][m], ratio)) for m in ab["wall_s"]])


# ------------------------------------------------------------------------------------------- GPU

def gpu_rows(batch_size, device="cuda", cfg=None, seq=None, steps=20, warmup=5, methods=METHODS):
    """{method: method_worker result} for the four (METHODS) at GPT-2 124M's shape, bf16 autocast, B=batch_size x T=1024,
    each in a fresh process, printed. (device, cfg, seq, the step counts and methods, some of METHODS with "qlora"
    among them, exist only to smoke-test this on a CPU with a tiny model: a process takes seconds to start.)"""
    cfg = dict(cfg or {})
    seq = seq or cfg.get("block_size", 1024)
    c = dict(model=cfg, batch=batch_size, seq=seq, warmup=warmup)
    res = run_methods(c, steps, seed=1337, device=device, autocast=True, sizes=False, methods=methods)
    name = res["qlora"].get("device_name", device)
    print(f"GPU {name}: bf16 autocast, fused AdamW, no torch.compile, B={batch_size} x T={seq}, "
          f"median of {steps} steps after {warmup}:")
    peak = "cuda_peak_bytes" if device == "cuda" else "rss_peak_bytes"
    harness.print_table(
        ("method", "trainable params", "model", "optim state", "memory before steps", "peak memory in steps",
         "step", "tokens/s"),
        [(NAMES[m], f"{r['trainable_params']:,}", mb(r["model_bytes"]), mb(r["optim_state_bytes"]),
          mb(r.get("cuda_before_bytes", r["rss_before_bytes"])), mb(r[peak]), f"{1000 * r['step_median_s']:.1f} ms",
          f"{batch_size * seq / r['step_median_s']:,.0f}") for m, r in res.items()])
    print(f"(memory: torch.cuda.memory_allocated / max_memory_allocated{'' if device == 'cuda' else '; here RSS'}; "
          f"QLoRA NF4 dequantize all {res['qlora']['nf4_layers']} layers to bf16: "
          f"{1000 * res['qlora']['nf4_dequant_all_s']:.1f} ms, twice per step)")
    return res


def main():
    p = harness.common_args(argparse.ArgumentParser(
        description="lora.py: full fine-tuning vs LoRA vs QLoRA at GPT-2 124M's shape (see the docstring)"))
    args = harness.parse_args(p)  # --rounds: timed steps per method (after the warmup steps)
    c = CONFIGS["quick" if args.quick else "default"]

    info = harness.machine()
    res = run_methods(c, args.rounds, args.seed)
    ab = dequant_ab(c, args.rounds, args.seed)
    checks = checks_of(res, c)
    checks["qlora_int64_losses_identical"] = ab["losses"]["qlora"] == ab["losses"]["qlora_int64"]
    full, lo, q = res["full"], res["lora"], res["qlora"]
    cfg = lora.Config(**c["model"])
    print(f"model: GPT-2 124M's shape, random weights (no download): {cfg.n_layer} layers x {cfg.n_embd}, "
          f"{cfg.n_head} heads, vocab {cfg.vocab_size} (padded to {cfg.padded_vocab_size}), {full['total_params']:,} "
          f"params (tied wte/lm_head once) | LoRA rank {LORA['rank']}, alpha {LORA['alpha']} on "
          f"{','.join(LORA['targets'])} | fp32, batch {c['batch']} x {c['seq']} tokens, AdamW | step times: median "
          f"of {args.rounds} steps after {c['warmup']} warmup | each method in a fresh process"
          if not args.quick else
          f"model (--quick, tiny): {cfg.n_layer} layers x {cfg.n_embd}, vocab {cfg.vocab_size}, "
          f"{full['total_params']:,} params | fp32, batch {c['batch']} x {c['seq']}, {args.rounds} steps after "
          f"{c['warmup']} warmup")
    print_cpu_tables(res, c)
    print(f"MB = 10^6 bytes | model: parameters + buffers | RSS: resident size of the method's process (torch and "
          f"lora.py imported, model, optimizer and batch built); peak: VmHWM over the {c['warmup'] + args.rounds} "
          f"steps, (+ what the steps added to the resident size before them) | state_dict file: torch.save of "
          f"model.state_dict() (adapter-only: of lora_state_dict(model)) into memory")
    n = q["nf4_weights"]
    print(f"QLoRA NF4: {q['nf4_layers']} layers, {n:,} weights at {q['nf4_bits_per_weight']:.3f} bits each "
          f"({n * q['nf4_bits_per_weight'] / 8e6:,.1f} MB against {4 * n / 1e6:,.1f} MB in float32); dequantizing "
          f"all of them to float32 once: {harness.fmt_s(q['nf4_dequant_all_s'])} CPU time, 1 thread (a step does it "
          f"twice: forward, and again in backward; before issue 19: "
          f"{harness.fmt_s(res['qlora_int64']['nf4_dequant_all_s'])})")
    print_ab(ab)
    print(f"checkpoint: adapters {lo['adapter_file_bytes']:,} bytes vs the full model's state_dict "
          f"{full['state_dict_file_bytes']:,} bytes ({full['state_dict_file_bytes'] / lo['adapter_file_bytes']:.0f}x "
          f"smaller); QLoRA's whole state_dict (NF4 base + adapters): {q['state_dict_file_bytes']:,} bytes")
    print("losses, first -> last step (the same batch every step): " + ", ".join(
        f"{NAMES[m]} {checks['initial_losses'][m]:.4f} -> {checks['final_losses'][m]:.4f}" for m in METHODS))
    print(f"checks: LoRA trainable = n_layer x r x 16 x n_embd: {checks['lora_trainable_match']} | LoRA first loss = "
          f"full's: {checks['lora_initial_loss_match']} | optimizer state = 8 B/param + step counters: "
          f"{checks['optim_state_bytes_match']} | losses finite: {checks['losses_finite_match']} | QLoRA's losses "
          f"= QLoRA int64's (A/B): {checks['qlora_int64_losses_identical']}")
    if args.quick:
        print("--quick: a smoke test, its sizes are too small for the numbers to mean anything")

    gpu, gpu_ok = harness.gpu_section(lambda: gpu_rows(args.batch_size))
    # status 1: a check above failed, or the GPU rows failed
    harness.finish(T_START, info, args.json, gpu_ok and harness.passed(checks),
                   config=dict(c, lora=LORA, lr=LR, seed=args.seed, total_params=full["total_params"]),
                   rounds=args.rounds, methods=res, checks=checks, dequant_ab=ab, gpu=gpu)


if __name__ == "__main__":
    main()
