"""What the bench_*.py scripts share: the machine line, the shared flags, the alternating timed rounds, the
rows and tables, the GPU training throughput, and the wall time / JSON / exit status at the end.

A bench times each case once per implementation in every round, the order flipping from round to round
(so a neighbour's load on the CPU hits both alike); round 0 is a warmup and is not counted. A time is the
median over the rounds and a ratio is reference / ours, so > 1 means ours is faster.
"""
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

PEAK_BF16 = (("H100", 989e12), ("H200", 989e12), ("A100", 312e12))  # dense tensor-core FLOP/s


def common_args(p):
    """Add the flags every bench takes to the argparse parser p; returns p."""
    p.add_argument("--rounds", type=int, default=None, help="timed rounds after one warmup round (default 5; 2 with --quick)")
    p.add_argument("--quick", action="store_true", help="tiny model: a smoke test of this script")
    p.add_argument("--json", metavar="PATH", help="also write the results here as JSON")
    p.add_argument("--batch_size", type=int, default=16, help="GPU rows: sequences of 1024 tokens per step (no grad accumulation)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's own choice)")
    p.add_argument("--seed", type=int, default=1337)
    return p


def parse_args(p):
    """Parse, check the common flags and apply them; args.rounds is filled in (5, or 2 with --quick)."""
    args = p.parse_args()
    args.rounds = args.rounds or (2 if args.quick else 5)
    if args.rounds < 1 or args.batch_size < 1 or args.threads < 0:
        p.error("--rounds and --batch_size must be positive, --threads not negative")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return args


def machine():
    """Print the machine line and return it as a dict (load_end is added by finish)."""
    cpu = platform.processor() or "unknown CPU"
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = dict(cpu=cpu, cores=os.cpu_count(), threads=torch.get_num_threads(), torch=torch.__version__,
                transformers=transformers.__version__, python=platform.python_version(), load_start=os.getloadavg()[0])
    print(f"machine: {info['cpu']} | {info['cores']} cores | {info['threads']} torch threads | "
          f"torch {info['torch']} | transformers {info['transformers']} | python {info['python']} | "
          f"load avg {info['load_start']:.1f}")
    return info


def run_rounds(cases, rounds, name="round"):
    """cases: {key: (n, ours, reference)}, each a function of n (new tokens; the warmup round passes at most 8).
    Returns times {key: (ours seconds, reference seconds)}, one per timed round, and outputs {key: (ours, reference)}
    from round 1."""
    times = {key: ([], []) for key in cases}
    outputs = {}
    for r in range(rounds + 1):
        t0 = time.perf_counter()
        for key, (n, *fns) in cases.items():
            outs = [None, None]
            for i in ((0, 1) if r % 2 == 0 else (1, 0)):
                t = time.perf_counter()
                outs[i] = fns[i](min(n, 8) if r == 0 else n)
                dt = time.perf_counter() - t
                if r > 0:
                    times[key][i].append(dt)
            if r == 1:
                outputs[key] = tuple(outs)
        print(f"{name} {r}{' (warmup)' if r == 0 else ''}: {time.perf_counter() - t0:.1f} s", flush=True)
    return times, outputs


def ratio_row(key, label, ref_label, target, ours_t, ref_t):
    """A row of the timing table from the per-round times; target None: reported only."""
    per_round = [b / a for a, b in zip(ours_t, ref_t)]  # the two runs of one round, side by side
    ratio = statistics.median(ref_t) / statistics.median(ours_t)
    met = "-" if target is None else "yes" if ratio >= target else "~noise" if max(per_round) >= target else "NO"
    return dict(key=key, label=label, reference=ref_label, ours_s=ours_t, ref_s=ref_t,
                ours_median_s=statistics.median(ours_t), ref_median_s=statistics.median(ref_t),
                ratio=ratio, ratio_min=min(per_round), ratio_max=max(per_round), target=target, met=met)


def load_via_checkpoint(hf, from_pretrained):
    """Ours, loaded with from_pretrained from the HF model written with save_pretrained: the same weights."""
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        return from_pretrained(d)  # dropout 0.0 by default


def greedy(model, prompt, use_cache=True):
    """Ours: n -> prompt plus n greedy tokens (generate(idx, n, temperature, use_cache), as gpt2.py and llama2.py)."""
    return lambda n: model.eval().generate(prompt, n, temperature=0.0, use_cache=use_cache)


def lm_rows(ours, hf, c, rounds, seed, vocab, kv_target, train_refs=()):
    """The rows of a causal LM against its HF twin holding the same weights, c giving batch, seq, prompt, decode
    and kv_tokens:
      train     forward + backward, train mode, same batch and targets, no optimizer step
      decode    greedy, batch 1, both with their KV cache
      kv_cache  ours with its cache vs ours recomputing the prefix at every token (target kv_target)
    train_refs: (key, reference label, HF model) of more HF models (the same weights run another way) whose train
    step is timed against ours too, a row each after train. Returns rows, checks (train losses, tokens identical)
    and the outputs of round 1."""
    x = torch.randint(0, vocab, (c["batch"], c["seq"] + 1), generator=torch.Generator().manual_seed(seed))
    idx = x[:, :-1].contiguous()
    targets = x[:, 1:].clone()
    targets[:, -1] = -1
    prompt = torch.randint(0, vocab, (1, c["prompt"]), generator=torch.Generator().manual_seed(seed + 1))
    eos = hf.generation_config.eos_token_id

    def gen_hf(n):  # min_new_tokens: an eos never ends it early; pad=eos only silences the missing-pad warning
        return hf.eval().generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=eos,
                                  attention_mask=torch.ones_like(prompt))

    def train(model, is_hf):
        def step(_):
            model.train()
            torch.manual_seed(seed)
            model.zero_grad(set_to_none=True)
            if is_hf:  # HF shifts labels itself: labels=idx predicts idx[1:], the last position ignored
                loss = model(input_ids=idx, labels=idx, use_cache=False).loss
            else:      # the same targets for ours: idx shifted by one, the last position ignored (-1)
                loss = model(idx, targets)[1]
            loss.backward()
            return loss.item()
        return step

    cases = {  # key: (new tokens, ours, reference)
        "train": (0, train(ours, False), train(hf, True)),
        **{key: (0, train(ours, False), train(ref, True)) for key, _, ref in train_refs},
        "decode": (c["decode"], greedy(ours, prompt), gen_hf),
        "kv_cache": (c["kv_tokens"], greedy(ours, prompt), greedy(ours, prompt, use_cache=False)),
    }
    times, outputs = run_rounds(cases, rounds)
    checks = {
        "train_loss_ours": outputs["train"][0], "train_loss_ref": outputs["train"][1],
        "decode_tokens_identical": torch.equal(*outputs["decode"]),
        "kv_cache_tokens_identical": torch.equal(*outputs["kv_cache"]),
        **{f"{key}_loss_ref": outputs[key][1] for key, _, _ in train_refs},
    }
    specs = [  # key, label, reference label, target
        ("train", f"train step (fwd+bwd, no optim), {c['batch']}x{c['seq']} tok", "HF", 1.0),
        *((key, f"train step, {c['batch']}x{c['seq']} tok", ref_label, 1.0) for key, ref_label, _ in train_refs),
        ("decode", f"greedy decode {c['decode']} tok, KV cache", "HF", 1.0),
        ("kv_cache", f"ours KV cache vs recompute, {c['kv_tokens']} tok", "ours, no cache", kv_target),
    ]
    rows = [ratio_row(key, label, ref_label, target, *times[key]) for key, label, ref_label, target in specs]
    rows[0]["tokens_per_s_ours"] = c["batch"] * c["seq"] / rows[0]["ours_median_s"]
    return rows, checks, outputs


def fmt_s(t):
    return f"{t * 1000:.0f} ms" if t < 1 else f"{t:.2f} s"


def print_table(header, table):
    """Columns padded to their widest cell, separated by ' | ', a line of dashes under the header."""
    widths = [max(len(str(line[i])) for line in [header] + table) for i in range(len(header))]
    for line in [header, tuple("-" * w for w in widths)] + table:
        print(" | ".join(str(v).ljust(w) for v, w in zip(line, widths)))


def print_ratio_table(rows):
    print_table(("measurement", "ours", "reference", "ratio (range)", "target", "met?"),
                [(r["label"], fmt_s(r["ours_median_s"]), f"{fmt_s(r['ref_median_s'])} ({r['reference']})",
                  f"{r['ratio']:.2f}x ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})",
                  "reported" if r["target"] is None else f">= {r['target']:.1f}x", r["met"]) for r in rows])


def print_legend(quick):
    print("ratio = reference time / ours (> 1: ours faster); range = the per-round ratios; "
          "~noise = median misses the target but some round met it"
          + ("\n--quick: a smoke test, its sizes are too small for the targets to mean anything" if quick else ""))


def timed(fn, reps, device):
    """fn() run reps + 1 times on device, synchronised around each call: (the first call's seconds, which with
    torch.compile is mostly compiling, the median of the others', the last call's result)."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    times = []
    for _ in range(reps + 1):
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t)
    return times[0], statistics.median(times[1:]), out


def train_throughput(model, batch_size, steps=30, warmup=5, device="cuda", compile=True, flops_per_token=None):
    """Training throughput of a model with model(idx, targets) -> (logits, loss), num_params() and
    config.block_size / vocab_size / n_layer / n_embd (gpt2.GPT, llama2.Llama): bf16 autocast, torch.compile
    (unless compile=False), fused AdamW, one micro-step per step, warmup steps not timed. flops_per_token(model):
    the FLOPs of training on one token, for MFU (default: PaLM's, from all of num_params()). Also the first step's
    time (with compile, mostly compiling) and, on CUDA, the peak memory allocated. (device exists only to smoke-test
    this on a CPU with a tiny model.)"""
    device = torch.device(device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    cfg = model.config
    model = model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    compiled = torch.compile(model) if compile else model
    T = cfg.block_size
    x = torch.randint(0, cfg.vocab_size, (batch_size, T + 1), device=device)
    idx, targets = x[:, :-1].contiguous(), x[:, 1:].contiguous()

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = compiled(idx, targets)[1]  # the MoE files also return aux
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    for i in range(warmup):  # the first step compiles; none of these is timed
        loss = step()
        if i == 0:
            sync()
            first_step_s = time.perf_counter() - t  # with compile: mostly compiling
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    dt = (time.perf_counter() - t) / steps
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = next((f for key, f in PEAK_BF16 if key in name), None)
    tok_s = batch_size * T / dt
    # PaLM appendix B; the attention term takes n_head * head_dim = n_embd
    flops_per_token = (flops_per_token(model) if flops_per_token else
                       6 * model.num_params() + 12 * cfg.n_layer * cfg.n_embd * T)
    return dict(device=name, batch_size=batch_size, seq=T, steps=steps, warmup=warmup, compile=compile,
                step_ms=dt * 1000, tokens_per_s=tok_s, params=model.num_params(), params_with_embedding=model.num_params(False),
                flops_per_token=flops_per_token, peak_flops=peak,
                mfu=flops_per_token * tok_s / peak if peak else None, warmup_loss=loss.item(),
                first_step_s=first_step_s, peak_memory_bytes=torch.cuda.max_memory_allocated(device) if cuda else None)


def train_throughputs(builds, batch_size, device="cuda", steps=30, warmup=5, options=None):
    """{name: train_throughput(build(), ...)} for builds {name: build}, each model seeded with 0 and compiled afresh;
    options: {name: more keyword arguments of train_throughput (compile, flops_per_token)}."""
    out = {}
    for name, build in builds.items():
        torch.manual_seed(0)
        torch._dynamo.reset()  # the next model compiles afresh, not against the last one's cache limits
        out[name] = train_throughput(build(), batch_size, steps, warmup, device, **(options or {}).get(name, {}))
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    return out


def gpu_line(what, g):
    """The printed line of a train_throughput result; what names the model (and ends with a comma if more follows)."""
    mfu = f"{100 * g['mfu']:.1f}%" if g["mfu"] is not None else "n/a (peak of this GPU unknown)"
    compiled = " + torch.compile" if g.get("compile", True) else " (no torch.compile)"
    peak = "n/a" if g["peak_memory_bytes"] is None else f"{g['peak_memory_bytes'] / 2**30:.1f} GiB"
    return (f"GPU {g['device']}: {what} train, bf16 autocast{compiled} + fused AdamW, "
            f"B={g['batch_size']} x T={g['seq']}: {g['step_ms']:.1f} ms/step | {g['tokens_per_s']:,.0f} tok/s | MFU {mfu}"
            f" | first step {g['first_step_s']:.1f} s | peak {peak}")


def gpu_section(measure):
    """measure() (which prints its rows) only with CUDA. Returns (its result, ok); a failure there (out of memory,
    no compiler) must not lose the CPU rows already printed: it gives ({"error": ...}, False)."""
    if not torch.cuda.is_available():
        print("no CUDA device: GPU rows not measured")
        return None, True
    try:
        return measure(), True
    except Exception as e:
        gpu = dict(error=f"{type(e).__name__}: {e}")
        print(f"GPU rows failed: {gpu['error']}", file=sys.stderr)
        return gpu, False


def passed(checks):
    """The checks that must hold: every *identical and *match entry."""
    return all(v for k, v in checks.items() if k.endswith(("identical", "match")))


def finish(t_start, info, json_path, ok, **results):
    """Print the wall time (since t_start) and the load, write machine, **results and wall_s to json_path if
    given, and exit with status 1 if not ok."""
    wall = time.perf_counter() - t_start
    info["load_end"] = os.getloadavg()[0]
    print(f"wall time {wall:.0f} s | load avg {info['load_end']:.1f} "
          "(another process on the CPU makes every time noisier, with 2+ threads most)")
    if json_path:
        Path(json_path).write_text(json.dumps(dict(machine=info, **results, wall_s=wall), indent=1))
        print(f"wrote {json_path}")
    if not ok:
        sys.exit(1)
