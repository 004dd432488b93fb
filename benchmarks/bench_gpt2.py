"""Benchmark gpt2.py against Hugging Face transformers' GPT2LMHeadModel on the same weights.

A random GPT-2-shaped model is built with transformers (seeded), written with save_pretrained and read
back with gpt2.from_pretrained, so both sides hold identical fp32 weights. Each round runs every
measurement once per implementation, the order flipping each round (so a neighbour's load on the CPU
hits both alike); round 0 is a warmup and is not counted. A time is the median over the rounds and a
ratio is reference / ours, so > 1 means gpt2.py is faster.

  train step  forward + backward, train mode, dropout 0, same batch and targets; no optimizer step
              (torch's AdamW would be the same code on both sides); grads set to None between steps
  decode      greedy, batch 1, both with their KV cache; the generated tokens must be identical
  KV cache    gpt2.py with its cache vs gpt2.py recomputing the whole prefix at every token
  GPU         only with CUDA: GPT-2 124M training throughput and MFU (bf16 autocast, torch.compile,
              fused AdamW, T=1024), warmup excluded, torch.cuda.synchronize() around the timing

    python benchmarks/bench_gpt2.py                  # a few minutes on 2 CPU cores
    python benchmarks/bench_gpt2.py --quick          # tiny model, a smoke test (~20 s)
    python benchmarks/bench_gpt2.py --json out.json  # also write the results as JSON
"""
import time

T_START = time.perf_counter()  # the wall time printed at the end includes the imports

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import gpt2  # noqa: E402

# CPU sizes: GPT-2's vocabulary and context, fewer/narrower layers than the 124M model.
CONFIGS = {
    "default": dict(n_layer=6, n_head=4, n_embd=256, batch=4, seq=256, prompt=8, decode=128, kv_tokens=256),
    "quick": dict(n_layer=2, n_head=2, n_embd=64, batch=2, seq=64, prompt=8, decode=32, kv_tokens=64),
}
PEAK_BF16 = (("H100", 989e12), ("H200", 989e12), ("A100", 312e12))  # dense tensor-core FLOP/s


def machine():
    cpu = platform.processor() or "unknown CPU"
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return dict(cpu=cpu, cores=os.cpu_count(), threads=torch.get_num_threads(), torch=torch.__version__,
                transformers=transformers.__version__, python=platform.python_version(), load_start=os.getloadavg()[0])


def train_step(model, idx, targets, hf):
    model.zero_grad(set_to_none=True)
    if hf:  # HF shifts labels itself: labels=idx predicts idx[1:], the last position ignored
        loss = model(input_ids=idx, labels=idx, use_cache=False).loss
    else:   # the same targets for gpt2.py: idx shifted by one, the last position ignored (-1)
        loss = model(idx, targets)[1]
    loss.backward()
    return loss.item()


def cpu_rows(c, rounds, seed):
    torch.manual_seed(seed)
    hf_cfg = GPT2Config(vocab_size=50257, n_positions=1024, n_layer=c["n_layer"], n_head=c["n_head"],
                        n_embd=c["n_embd"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = GPT2LMHeadModel(hf_cfg)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = gpt2.from_pretrained(d)  # dropout 0.0 by default

    x = torch.randint(0, 50257, (c["batch"], c["seq"] + 1), generator=torch.Generator().manual_seed(seed))
    idx = x[:, :-1].contiguous()
    targets = x[:, 1:].clone()
    targets[:, -1] = -1
    prompt = torch.randint(0, 50257, (1, c["prompt"]), generator=torch.Generator().manual_seed(seed + 1))
    eos = hf.generation_config.eos_token_id

    def gen_ours(n, use_cache=True):
        return ours.eval().generate(prompt, n, temperature=0.0, use_cache=use_cache)

    def gen_hf(n):
        return hf.eval().generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=eos,
                                  attention_mask=torch.ones_like(prompt))

    def train(model, is_hf):
        def step(_):
            model.train()
            torch.manual_seed(seed)
            return train_step(model, idx, targets, is_hf)
        return step

    cases = {  # name: (new tokens, ours, reference); the warmup round generates only a few tokens
        "train": (0, train(ours, False), train(hf, True)),
        "decode": (c["decode"], gen_ours, gen_hf),
        "kv_cache": (c["kv_tokens"], gen_ours, lambda n: gen_ours(n, use_cache=False)),
    }
    times = {name: ([], []) for name in cases}
    outputs = {}
    for r in range(rounds + 1):
        t0 = time.perf_counter()
        for name, (n, *fns) in cases.items():
            for i in ((0, 1) if r % 2 == 0 else (1, 0)):
                t = time.perf_counter()
                out = fns[i](min(n, 8) if r == 0 else n)
                dt = time.perf_counter() - t
                if r > 0:
                    times[name][i].append(dt)
                if r == 1:  # checked below: same loss, same tokens
                    outputs[name, i] = out
        print(f"round {r}{' (warmup)' if r == 0 else ''}: {time.perf_counter() - t0:.1f} s", flush=True)

    checks = {
        "train_loss_ours": outputs["train", 0], "train_loss_ref": outputs["train", 1],
        "decode_tokens_identical": torch.equal(outputs["decode", 0], outputs["decode", 1]),
        "kv_cache_tokens_identical": torch.equal(outputs["kv_cache", 0], outputs["kv_cache", 1]),
    }
    n_tok = c["batch"] * c["seq"]
    specs = [  # key, label, reference label, target
        ("train", f"train step (fwd+bwd, no optim), {c['batch']}x{c['seq']} tok", "HF", 1.0),
        ("decode", f"greedy decode {c['decode']} tok, KV cache", "HF", 1.0),
        ("kv_cache", f"ours KV cache vs recompute, {c['kv_tokens']} tok", "ours, no cache", 3.0),
    ]
    rows = [make_row(key, label, ref_label, target, *times[key]) for key, label, ref_label, target in specs]
    rows[0]["tokens_per_s_ours"] = n_tok / rows[0]["ours_median_s"]
    return rows, checks, dict(c, vocab_size=50257, n_positions=1024, params=ours.num_params(), seed=seed)


def make_row(key, label, ref_label, target, ours_t, ref_t):
    per_round = [b / a for a, b in zip(ours_t, ref_t)]  # the two runs of one round, side by side
    ratio = statistics.median(ref_t) / statistics.median(ours_t)
    met = "yes" if ratio >= target else "~noise" if max(per_round) >= target else "NO"
    return dict(key=key, label=label, reference=ref_label, ours_s=ours_t, ref_s=ref_t,
                ours_median_s=statistics.median(ours_t), ref_median_s=statistics.median(ref_t),
                ratio=ratio, ratio_min=min(per_round), ratio_max=max(per_round), target=target, met=met)


def kv124_row(rounds, seed, new_tokens=256):
    """KV cache vs recompute at GPT-2 124M's own shape, where the blocks (85M parameters) outweigh the output
    layer (39M) that every decoded token pays for, cache or not. Returns (row, same tokens?)."""
    torch.manual_seed(seed)
    model = gpt2.GPT(gpt2.Config()).eval()
    prompt = torch.randint(0, 50257, (1, 8), generator=torch.Generator().manual_seed(seed + 1))
    fns = [lambda n, c=c: model.generate(prompt, n, temperature=0.0, use_cache=c) for c in (True, False)]
    times, outs = ([], []), {}
    for r in range(rounds + 1):  # round 0: a warmup of a few tokens
        for i in ((0, 1) if r % 2 == 0 else (1, 0)):
            t = time.perf_counter()
            outs[i] = fns[i](8 if r == 0 else new_tokens)
            if r > 0:
                times[i].append(time.perf_counter() - t)
        print(f"kv124 round {r}{' (warmup)' if r == 0 else ''} done", flush=True)
    row = make_row("kv_cache_124m", f"ours KV cache vs recompute, {new_tokens} tok, 124M shape", "ours, no cache",
                   3.0, *times)
    return row, torch.equal(outs[0], outs[1])


def gpu_row(batch_size, steps=30, warmup=5, device="cuda", cfg=None):
    """GPT-2 124M training throughput: bf16 autocast, torch.compile, fused AdamW, one micro-step per step.
    (device and cfg exist only to smoke-test this function on a CPU with a tiny model.)"""
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    cfg = cfg or gpt2.Config()  # 12 layers, 768 wide, 12 heads, T=1024, vocab 50257 padded to 50304
    model = gpt2.GPT(cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    compiled = torch.compile(model)
    T = cfg.block_size
    x = torch.randint(0, cfg.vocab_size, (batch_size, T + 1), device=device)
    idx, targets = x[:, :-1].contiguous(), x[:, 1:].contiguous()

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            _, loss = compiled(idx, targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(warmup):  # the first step compiles; none of these is timed
        loss = step()
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    dt = (time.perf_counter() - t) / steps
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = next((f for key, f in PEAK_BF16 if key in name), None)
    tok_s = batch_size * T / dt
    flops_per_token = 6 * model.num_params() + 12 * cfg.n_layer * cfg.n_embd * T  # PaLM appendix B
    return dict(device=name, batch_size=batch_size, seq=T, steps=steps, warmup=warmup, step_ms=dt * 1000,
                tokens_per_s=tok_s, params=model.num_params(), flops_per_token=flops_per_token, peak_flops=peak,
                mfu=flops_per_token * tok_s / peak if peak else None, warmup_loss=loss.item())


def fmt_s(t):
    return f"{t * 1000:.0f} ms" if t < 1 else f"{t:.2f} s"


def main():
    p = argparse.ArgumentParser(description="gpt2.py vs transformers' GPT2LMHeadModel (see the docstring)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds after one warmup round (default 5; 2 with --quick)")
    p.add_argument("--quick", action="store_true", help="tiny model: a smoke test of this script")
    p.add_argument("--json", metavar="PATH", help="also write the results here as JSON")
    p.add_argument("--batch_size", type=int, default=16, help="GPU rows: sequences of 1024 tokens per step (no grad accumulation)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's own choice)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--kv124", type=int, default=0, metavar="N",
                   help="also time the KV cache at GPT-2 124M's shape over N rounds (~80 s a round on 2 cores)")
    args = p.parse_args()
    rounds = args.rounds or (2 if args.quick else 5)
    if rounds < 1 or args.batch_size < 1 or args.threads < 0:
        p.error("--rounds and --batch_size must be positive, --threads not negative")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    info = machine()
    print(f"machine: {info['cpu']} | {info['cores']} cores | {info['threads']} torch threads | "
          f"torch {info['torch']} | transformers {info['transformers']} | python {info['python']} | "
          f"load avg {info['load_start']:.1f}")
    rows, checks, config = cpu_rows(CONFIGS["quick" if args.quick else "default"], rounds, args.seed)
    if args.kv124 > 0:
        row, same = kv124_row(args.kv124, args.seed)
        rows.append(row)
        checks["kv_cache_124m_tokens_identical"] = same
    print(f"model: {config['n_layer']} layers, {config['n_embd']} wide, {config['n_head']} heads, vocab 50257, "
          f"{config['params'] / 1e6:.1f}M params | fp32 | {rounds} rounds + 1 warmup, alternating, medians")

    header = ("measurement", "ours", "reference", "ratio (range)", "target", "met?")
    table = [(r["label"], fmt_s(r["ours_median_s"]), f"{fmt_s(r['ref_median_s'])} ({r['reference']})",
              f"{r['ratio']:.2f}x ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})", f">= {r['target']:.1f}x", r["met"])
             for r in rows]
    widths = [max(len(str(line[i])) for line in [header] + table) for i in range(len(header))]
    for line in [header, tuple("-" * w for w in widths)] + table:
        print(" | ".join(str(v).ljust(w) for v, w in zip(line, widths)))
    print(f"train loss: ours {checks['train_loss_ours']:.6f}, HF {checks['train_loss_ref']:.6f} | "
          f"ours train throughput {rows[0]['tokens_per_s_ours']:,.0f} tok/s")
    print(f"greedy tokens identical to HF: {checks['decode_tokens_identical']} | "
          f"with and without the KV cache: {checks['kv_cache_tokens_identical']}"
          + (f" (124M shape: {checks['kv_cache_124m_tokens_identical']})" if args.kv124 > 0 else ""))
    print("ratio = reference time / ours (> 1: ours faster); range = the per-round ratios; "
          "~noise = median misses the target but some round met it"
          + ("\n--quick: a smoke test, its sizes are too small for the targets to mean anything" if args.quick else ""))

    gpu, ok = None, all(v for k, v in checks.items() if k.endswith("identical"))
    if not torch.cuda.is_available():
        print("no CUDA device: GPU rows not measured")
    else:
        try:  # a failure here (out of memory, no compiler) must not lose the CPU rows above
            gpu = gpu_row(args.batch_size)
            mfu = f"{100 * gpu['mfu']:.1f}%" if gpu["mfu"] is not None else "n/a (peak of this GPU unknown)"
            print(f"GPU {gpu['device']}: GPT-2 124M train, bf16 autocast + torch.compile + fused AdamW, "
                  f"B={gpu['batch_size']} x T={gpu['seq']}: {gpu['step_ms']:.1f} ms/step | "
                  f"{gpu['tokens_per_s']:,.0f} tok/s | MFU {mfu}")
        except Exception as e:
            gpu, ok = dict(error=f"{type(e).__name__}: {e}"), False
            print(f"GPU rows failed: {gpu['error']}", file=sys.stderr)
    wall = time.perf_counter() - T_START
    info["load_end"] = os.getloadavg()[0]
    print(f"wall time {wall:.0f} s | load avg {info['load_end']:.1f} "
          "(another process on the CPU makes every time noisier, with 2+ threads most)")

    if args.json:
        Path(args.json).write_text(json.dumps(dict(machine=info, config=config, rounds=rounds, rows=rows,
                                                   checks=checks, gpu=gpu, wall_s=wall), indent=1))
        print(f"wrote {args.json}")
    if not ok:  # different tokens, or the GPU rows failed
        sys.exit(1)


if __name__ == "__main__":
    main()
