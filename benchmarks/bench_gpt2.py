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
import sys
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # the models at the repo root, harness.py beside this file
import gpt2  # noqa: E402
import harness  # noqa: E402

# CPU sizes: GPT-2's vocabulary and context, fewer/narrower layers than the 124M model.
CONFIGS = {
    "default": dict(n_layer=6, n_head=4, n_embd=256, batch=4, seq=256, prompt=8, decode=128, kv_tokens=256),
    "quick": dict(n_layer=2, n_head=2, n_embd=64, batch=2, seq=64, prompt=8, decode=32, kv_tokens=64),
}


def cpu_rows(c, rounds, seed):
    torch.manual_seed(seed)
    hf_cfg = GPT2Config(vocab_size=50257, n_positions=1024, n_layer=c["n_layer"], n_head=c["n_head"],
                        n_embd=c["n_embd"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = GPT2LMHeadModel(hf_cfg)
    ours = harness.load_via_checkpoint(hf, gpt2.from_pretrained)
    rows, checks, _ = harness.lm_rows(ours, hf, c, rounds, seed, vocab=50257, kv_target=3.0)
    return rows, checks, dict(c, vocab_size=50257, n_positions=1024, params=ours.num_params(), seed=seed)


def kv124_row(rounds, seed, new_tokens=256):
    """KV cache vs recompute at GPT-2 124M's own shape, where the blocks (85M parameters) outweigh the output
    layer (39M) that every decoded token pays for, cache or not. Returns (row, same tokens?)."""
    torch.manual_seed(seed)
    model = gpt2.GPT(gpt2.Config()).eval()
    prompt = torch.randint(0, 50257, (1, 8), generator=torch.Generator().manual_seed(seed + 1))
    case = (new_tokens, harness.greedy(model, prompt), harness.greedy(model, prompt, use_cache=False))
    times, outputs = harness.run_rounds({"kv_cache_124m": case}, rounds, name="kv124 round")
    row = harness.ratio_row("kv_cache_124m", f"ours KV cache vs recompute, {new_tokens} tok, 124M shape",
                            "ours, no cache", 3.0, *times["kv_cache_124m"])
    return row, torch.equal(*outputs["kv_cache_124m"])


def gpu_row(batch_size, device="cuda", cfg=None, steps=30, warmup=5, compile=True):
    """GPT-2 124M training throughput (harness.train_throughput), printed.
    (device, cfg, the step counts and compile exist only to smoke-test this on a CPU with a tiny model.)"""
    build = {"gpt2": lambda: gpt2.GPT(cfg or gpt2.Config())}  # 12 x 768, 12 heads, T=1024, vocab padded to 50304
    g = harness.train_throughputs(build, batch_size, device, steps, warmup,
                                  {"gpt2": dict(compile=compile)})["gpt2"]
    print(harness.gpu_line("GPT-2 124M", g))
    return g


def main():
    p = harness.common_args(argparse.ArgumentParser(description="gpt2.py vs transformers' GPT2LMHeadModel (see the docstring)"))
    p.add_argument("--kv124", type=int, default=0, metavar="N",
                   help="also time the KV cache at GPT-2 124M's shape over N rounds (~80 s a round on 2 cores)")
    args = harness.parse_args(p)

    info = harness.machine()
    rows, checks, config = cpu_rows(CONFIGS["quick" if args.quick else "default"], args.rounds, args.seed)
    if args.kv124 > 0:
        row, same = kv124_row(args.kv124, args.seed)
        rows.append(row)
        checks["kv_cache_124m_tokens_identical"] = same
    print(f"model: {config['n_layer']} layers, {config['n_embd']} wide, {config['n_head']} heads, vocab 50257, "
          f"{config['params'] / 1e6:.1f}M params | fp32 | {args.rounds} rounds + 1 warmup, alternating, medians")
    harness.print_ratio_table(rows)
    print(f"train loss: ours {checks['train_loss_ours']:.6f}, HF {checks['train_loss_ref']:.6f} | "
          f"ours train throughput {rows[0]['tokens_per_s_ours']:,.0f} tok/s")
    print(f"greedy tokens identical to HF: {checks['decode_tokens_identical']} | "
          f"with and without the KV cache: {checks['kv_cache_tokens_identical']}"
          + (f" (124M shape: {checks['kv_cache_124m_tokens_identical']})" if args.kv124 > 0 else ""))
    harness.print_legend(args.quick)

    gpu, gpu_ok = harness.gpu_section(lambda: gpu_row(args.batch_size))
    # status 1: different tokens, or the GPU rows failed
    harness.finish(T_START, info, args.json, gpu_ok and harness.passed(checks),
                   config=config, rounds=args.rounds, rows=rows, checks=checks, gpu=gpu)


if __name__ == "__main__":
    main()
