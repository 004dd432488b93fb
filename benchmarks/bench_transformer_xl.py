"""Benchmark transformer_xl.py: validation loss against llama2.py at evaluation memory lengths, and decoding cost.

No maintained reference implementation exists (transformers dropped TransfoXL), so nothing here is timed against
one; the model's equations are checked in tests/test_transformer_xl.py. What is measured:

  val loss    A Transformer-XL and a Llama of llama2.py, both of the CPU preset's size (4 layers x 128, 4 heads; the
              Llama with 2 kv heads and SwiGLU), trained here on tiny-shakespeare (GPT-2 BPE) for the same steps of
              the same 512 tokens: the Llama on blocks of 64 (its preset), the Transformer-XL on windows of 4 segments
              of 32 with a memory of 32 (its preset), AdamW, warmup + cosine, each file's own configure_optimizer,
              lr_at and get_batch. Then the whole validation text, read as 4 parallel streams: the Llama in
              back-to-back blocks of 64 (its context), the Transformer-XL in windows of 128 with the memory restarting
              at each window (the training layout) and with the memory carried along the stream at memory lengths
              0, 1x, 2x and 4x the segment (the paper's tables 6 and 7, at our scale: a context longer at evaluation
              than in training).
  decoding    ms per new token, greedy, batch 1: transformer_xl.py with the memory as its cache vs recomputing the
              whole text at every token, vs llama2.py with its KV cache; and the cache's bytes.
  GPU         only with CUDA: training throughput and MFU of the CUDA presets' shapes (6 x 384, windows of 512),
              Transformer-XL vs Llama, the same helper timing both (bf16 autocast, torch.compile, fused AdamW).

    python benchmarks/bench_transformer_xl.py                  # two trainings of the CPU preset's 200 steps
    python benchmarks/bench_transformer_xl.py --quick          # tiny models, 30 steps: a smoke test
    python benchmarks/bench_transformer_xl.py --json out.json  # also write the results as JSON
"""
import time

T_START = time.perf_counter()  # the wall time printed at the end includes the imports

import argparse
import math
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # the models at the repo root, harness.py beside this file
import harness  # noqa: E402
import llama2  # noqa: E402
import transformer_xl as txl  # noqa: E402

SHAPES = {  # the CPU presets' model sizes; quick: a smoke test
    "default": dict(n_layer=4, n_head=4, n_embd=128, steps=200, decode=64),
    "quick": dict(n_layer=2, n_head=2, n_embd=64, steps=30, decode=16),
}
TRAIN = dict(batch_size=4, block_size=128, segment_len=32, mem_len=32, llama_batch=8, llama_block=64, lr=3e-3,
             min_lr=3e-4, warmup_iters=20, weight_decay=0.1, grad_clip=1.0)
STREAMS = 4
MEMORIES = (0, 1, 2, 4)  # evaluation memory, in segments
GPU_XL = dict(n_layer=6, n_head=6, n_embd=384, segment_len=128, mem_len=128)  # the CUDA preset, windows of 512
GPU_LLAMA = dict(n_layer=6, n_head=6, n_kv_head=2, n_embd=384, block_size=512)


def train(model, files, batch_size, block_size, steps, seed):
    """steps of AdamW on batches of get_batch, the schedule and optimizer of the files' harness (the same text in
    both); returns the last 10 steps' mean loss."""
    args = SimpleNamespace(**TRAIN, max_iters=steps, lr_decay_iters=None, optimizer="adamw")
    opt, = llama2.configure_optimizer(model, args, torch.device("cpu"))
    model.train()
    losses = []
    for it in range(steps):
        for group in opt.param_groups:
            group.update(lr=llama2.lr_at(it, args) * group["lr_scale"], weight_decay=args.weight_decay * group["decay"])
        torch.manual_seed(seed * 1_000_003 + it)
        x, y = llama2.get_batch(files, batch_size, block_size, torch.device("cpu"))
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return statistics.mean(losses[-10:])


@torch.no_grad()
def window_loss(model, tokens, window):
    """Mean loss over tokens read as STREAMS parallel streams in back-to-back windows, each window on its own."""
    n = (len(tokens) - 1) // STREAMS
    xy = torch.as_tensor(np.asarray(tokens[:n * STREAMS + 1], dtype=np.int64))
    x, y = xy[:-1].view(STREAMS, n), xy[1:].view(STREAMS, n)
    model.eval()
    total = sum(F.cross_entropy(model(x[:, t:t + window])[0].flatten(0, 1), y[:, t:t + window].flatten(),
                                reduction="sum").item() for t in range(0, n, window))
    return total / (n * STREAMS)


def val_rows(c, seed):
    """Train both models, then the val-loss table rows; returns (rows, models, val tokens)."""
    tokenizer = txl.load_tokenizer("gpt2")
    files = txl.prepare_data("shakespeare", tokenizer)
    shape = dict(n_layer=c["n_layer"], n_head=c["n_head"], n_embd=c["n_embd"])
    torch.manual_seed(seed)
    xl = txl.TransformerXL(txl.Config(vocab_size=tokenizer[3], segment_len=TRAIN["segment_len"],
                                      mem_len=TRAIN["mem_len"], **shape))
    torch.manual_seed(seed)
    llama = llama2.Llama(llama2.Config(vocab_size=tokenizer[3], block_size=TRAIN["llama_block"],
                                       n_kv_head=max(1, c["n_head"] // 2), **shape))
    t = time.perf_counter()
    xl_train = train(xl, files["train"], TRAIN["batch_size"], TRAIN["block_size"], c["steps"], seed)
    t_xl = time.perf_counter() - t
    llama_train = train(llama, files["train"], TRAIN["llama_batch"], TRAIN["llama_block"], c["steps"], seed)
    t_llama = time.perf_counter() - t - t_xl
    val = files["val"][0]
    L = TRAIN["segment_len"]
    ctx = torch.autocast("cpu", enabled=False)
    rows = [dict(model="llama2.py", params=llama.num_params(), evaluation=f"blocks of {TRAIN['llama_block']} "
                 "(its training context)", memory=None, val=window_loss(llama, val, TRAIN["llama_block"]),
                 train_last10=llama_train, train_s=t_llama),
            dict(model="transformer_xl.py", params=xl.num_params(), evaluation=f"windows of {TRAIN['block_size']}, "
                 f"memory {TRAIN['mem_len']} inside each (training's layout)", memory=TRAIN["mem_len"],
                 val=window_loss(xl, val, TRAIN["block_size"]), train_last10=xl_train, train_s=t_xl)]
    for k in MEMORIES:
        rows.append(dict(model="transformer_xl.py", params=xl.num_params(), memory=k * L,
                         evaluation=f"memory {k * L} ({k}x the segment) carried along the stream",
                         val=txl.stream_loss(xl, val, STREAMS, TRAIN["block_size"], k * L, ctx), train_s=t_xl))
    return rows, xl, llama, len(val)


def decode_rows(c, xl, llama, rounds, seed):
    """ms per new token, greedy, batch 1, prompt of 8: XL with its memory vs recomputing, and vs llama2's KV cache."""
    prompt = torch.randint(0, 50257, (1, 8), generator=torch.Generator().manual_seed(seed))
    n = c["decode"]
    cases = {"cache": (n, harness.greedy(xl, prompt), harness.greedy(xl, prompt, use_cache=False)),
             "llama": (n, harness.greedy(xl, prompt), harness.greedy(llama, prompt))}
    times, outputs = harness.run_rounds(cases, rounds)
    rows = [harness.ratio_row("cache", f"transformer_xl.py decode {n} tok, memory cache", "ours, no cache", None,
                              *times["cache"]),
            harness.ratio_row("llama", f"transformer_xl.py decode {n} tok, memory cache", "llama2.py, KV cache",
                              None, *times["llama"])]
    checks = dict(cache_tokens_identical=torch.equal(*outputs["cache"]))
    return rows, checks


def gpu_rows(batch_size, device="cuda", xl_shape=None, llama_shape=None, steps=30, warmup=5, compile=True):
    """Training throughput of the CUDA presets' shapes (harness.train_throughput reads config.block_size: the
    Transformer-XL's window is given it as one). (device, the shapes, steps and compile exist only to smoke-test this
    on a CPU with tiny models.)"""
    def xl():
        model = txl.TransformerXL(txl.Config(vocab_size=50257, **(xl_shape or GPU_XL)))
        model.config.block_size = 4 * model.config.segment_len  # windows of 4 segments, as the CUDA preset
        return model
    cfg = txl.Config(vocab_size=50257, **(xl_shape or GPU_XL))
    options = {name: dict(compile=compile) for name in ("transformer_xl", "llama")}
    options["transformer_xl"]["flops_per_token"] = lambda m: txl.flops_per_token(m, m.config.block_size)
    out = harness.train_throughputs({"transformer_xl": xl,
                                     "llama": lambda: llama2.Llama(llama2.Config(vocab_size=50257,
                                                                                 **(llama_shape or GPU_LLAMA)))},
                                    batch_size, device, steps, warmup, options)
    what = {"transformer_xl": f"Transformer-XL {cfg.n_layer}x{cfg.n_embd}, segments of {cfg.segment_len}, memory "
                              f"{cfg.mem_len},", "llama": "Llama (llama2.py) of the same size, blocks of 512,"}
    for name, g in out.items():
        print(harness.gpu_line(f"{what[name]} {g['params'] / 1e6:.1f}M params,", g))
    return out


def main():
    p = harness.common_args(argparse.ArgumentParser(description="transformer_xl.py: val loss vs llama2.py at "
                                                                "several memory lengths, decoding cost"))
    args = harness.parse_args(p)
    info = harness.machine()
    c = SHAPES["quick" if args.quick else "default"]
    rows, xl, llama, n_val = val_rows(c, args.seed)
    print(f"models: {c['n_layer']} layers x {c['n_embd']}, {c['n_head']} heads; {c['steps']} steps of "
          f"{TRAIN['batch_size'] * TRAIN['block_size']} tokens each, tiny-shakespeare (GPT-2 BPE); val: all "
          f"{n_val:,} val tokens as {STREAMS} parallel streams | fp32")
    harness.print_table(("model", "non-emb params", "evaluation", "val loss", "ppl", "train loss (last 10)",
                         "train time"),
                        [(r["model"], f"{r['params'] / 1e6:.2f}M", r["evaluation"], f"{r['val']:.4f}",
                          f"{math.exp(r['val']):.1f}", f"{r['train_last10']:.4f}" if "train_last10" in r else "",
                          f"{r['train_s']:.0f} s" if "train_last10" in r else "") for r in rows])
    dec, checks = decode_rows(c, xl, llama, args.rounds, args.seed)
    harness.print_ratio_table(dec)
    cfg = xl.config
    M = cfg.mem_len + cfg.segment_len - 1
    print(f"greedy tokens with and without the memory cache identical: {checks['cache_tokens_identical']} | memory "
          f"cache: {M} positions x {xl.memory_bytes_per_token(4):,} B = {M * xl.memory_bytes_per_token(4):,} B at any "
          f"length; llama2.py's KV cache: {llama.kv_bytes_per_token(4):,} B per token of context")
    harness.print_legend(args.quick)
    gpu, gpu_ok = harness.gpu_section(lambda: gpu_rows(args.batch_size))
    harness.finish(T_START, info, args.json, gpu_ok and harness.passed(checks), shape=c, train=TRAIN, val_rows=rows,
                   rounds=args.rounds, decode_rows=dec, checks=checks, gpu=gpu)


if __name__ == "__main__":
    main()
