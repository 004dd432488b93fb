"""Benchmark llama2.py against Hugging Face transformers' LlamaForCausalLM on the same weights.

A random Llama-shaped model (grouped-query attention) is built with transformers (seeded), written with
save_pretrained and read back with llama2.from_pretrained, so both sides hold identical fp32 weights. Its
weights are drawn with std 0.1 instead of Llama's 0.02: at 0.02 a random model's greedy decoding falls
into a loop of a few tokens (7 distinct ones in 128 at the default size), which would let a wrong model
pass the token check; at 0.1 nearly every token is new. Each round runs every measurement once per
implementation, the order flipping each round (so a neighbour's load on the CPU hits both alike); round 0
is a warmup and is not counted. A time is the median over the rounds and a ratio is reference / ours,
so > 1 means llama2.py is faster.

  train step  forward + backward, train mode, dropout 0, same batch and targets; no optimizer step
              (torch's AdamW would be the same code on both sides); grads set to None between steps
  decode      greedy, batch 1, both with their KV cache; the generated tokens must be identical
  KV cache    llama2.py with its cache vs llama2.py recomputing the whole prefix at every token (reported)
  KV bytes    bytes per token the cache holds, MHA vs GQA vs MQA at llama2.py's CPU and CUDA preset sizes,
              measured from the KVCache buffers after a prefill and checked against kv_bytes_per_token
  GPU         only with CUDA: training throughput and MFU of a Llama of GPT-2 124M's shape (12 x 768,
              12 heads, 4 kv heads, vocab 50257, T=1024) and of gpt2.py's 124M, the same helper timing
              both (bf16 autocast, torch.compile, fused AdamW), warmup excluded

    python benchmarks/bench_llama2.py                  # a few minutes on 2 CPU cores
    python benchmarks/bench_llama2.py --quick          # tiny model, a smoke test (~20 s)
    python benchmarks/bench_llama2.py --json out.json  # also write the results as JSON
"""
import time

T_START = time.perf_counter()  # the wall time printed at the end includes the imports

import argparse
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # the models at the repo root, harness.py beside this file
import gpt2  # noqa: E402
import harness  # noqa: E402
import llama2  # noqa: E402

# CPU sizes: GPT-2's vocabulary, a 1024 context, 6 narrow layers; GQA with 2 query heads per kv head.
CONFIGS = {
    "default": dict(n_layer=6, n_head=4, n_kv_head=2, n_embd=256, batch=4, seq=256, prompt=8, decode=128,
                    kv_tokens=256),
    "quick": dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, batch=2, seq=64, prompt=8, decode=32, kv_tokens=64),
}
VOCAB, CONTEXT, INIT_STD = 50257, 1024, 0.1
# GPU: a Llama of GPT-2 124M's shape (12 layers, 768 wide, 12 heads), GQA with 4 kv heads, untied head
LLAMA_GPU = dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_kv_head=4, n_embd=768)


def swiglu_width(n_embd):
    """llama2.Config's default SwiGLU width, 8/3 n_embd rounded up to a multiple of 64, given to HF explicitly
    (LlamaConfig's own default is 11008, Llama 2 7B's)."""
    return llama2.Config(vocab_size=1, n_layer=1, n_head=1, n_kv_head=1, n_embd=n_embd).intermediate_size


def cpu_rows(c, rounds, seed):
    torch.manual_seed(seed)
    hf_cfg = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=CONTEXT, num_hidden_layers=c["n_layer"],
                         num_attention_heads=c["n_head"], num_key_value_heads=c["n_kv_head"],
                         hidden_size=c["n_embd"], intermediate_size=swiglu_width(c["n_embd"]),
                         initializer_range=INIT_STD, attention_dropout=0.0)
    hf = LlamaForCausalLM(hf_cfg)
    ours = harness.load_via_checkpoint(hf, llama2.from_pretrained)
    rows, checks, outputs = harness.lm_rows(ours, hf, c, rounds, seed, VOCAB, kv_target=None)  # cache: reported
    checks["decode_distinct_tokens"] = len(set(outputs["decode"][0][0, c["prompt"]:].tolist()))
    rows[0]["tokens_per_s_ref"] = c["batch"] * c["seq"] / rows[0]["ref_median_s"]
    config = dict(c, vocab_size=VOCAB, max_position_embeddings=CONTEXT, intermediate_size=hf_cfg.intermediate_size,
                  initializer_range=INIT_STD, params=ours.num_params(), params_with_embedding=ours.num_params(False),
                  hf_attn_implementation=hf.config._attn_implementation, seed=seed)
    return rows, checks, config


@torch.no_grad()
def kv_bytes_rows(seed):
    """KV cache bytes per token for MHA, GQA and MQA at llama2.py's CPU and CUDA preset sizes, fp32.

    A prefill of L tokens (L = the preset's block_size, batch 1) goes through the model with a fresh
    llama2.KVCache(L) per layer, as generate does; the bytes of the K and V buffers then held, summed over the
    layers and divided by L, are compared with model.kv_bytes_per_token(4). The vocabulary (256, raw bytes)
    does not enter the cache."""
    rows = []
    for preset in ("cpu", "cuda"):
        p = llama2.PRESETS[preset]
        L = p["block_size"]
        mha = None
        for kind, n_kv in (("MHA", p["n_head"]), ("GQA", p["n_kv_head"]), ("MQA", 1)):
            torch.manual_seed(seed)
            cfg = llama2.Config(vocab_size=256, block_size=L, n_layer=p["n_layer"], n_head=p["n_head"],
                                n_kv_head=n_kv, n_embd=p["n_embd"])
            model = llama2.Llama(cfg).eval()
            cache = [llama2.KVCache(L) for _ in model.model.layers]
            model(torch.randint(0, 256, (1, L), generator=torch.Generator().manual_seed(seed)), cache=cache, pos=0)
            measured = sum(c.k.nbytes + c.v.nbytes for c in cache) / L
            mha = mha or measured
            rows.append(dict(preset=preset, attention=kind, n_layer=cfg.n_layer, n_embd=cfg.n_embd, n_head=cfg.n_head,
                             n_kv_head=n_kv, head_dim=cfg.head_dim, cache_len=L, bytes_per_token=measured,
                             kv_bytes_per_token=model.kv_bytes_per_token(4), vs_mha=measured / mha,
                             match=measured == model.kv_bytes_per_token(4)))
    return rows


def gpu_rows(batch_size, device="cuda", llama_cfg=None, gpt2_cfg=None, steps=30, warmup=5, compile=True):
    """{"llama": ..., "gpt2": ...}: the Llama of GPT-2's shape and gpt2.py's 124M, timed by the same helper
    (harness.train_throughput), printed. (device, the configs, the step counts and compile exist only to smoke-test
    this on a CPU with tiny models.)"""
    out = harness.train_throughputs({"llama": lambda: llama2.Llama(llama_cfg or llama2.Config(**LLAMA_GPU)),
                                     "gpt2": lambda: gpt2.GPT(gpt2_cfg or gpt2.Config())},
                                    batch_size, device, steps, warmup,
                                    {name: dict(compile=compile) for name in ("llama", "gpt2")})
    for name, g in out.items():
        what = ("Llama 12x768, 12 heads / 4 kv heads" if name == "llama" else "GPT-2 124M (gpt2.py)")
        params = f"{g['params'] / 1e6:.1f}M params ({g['params_with_embedding'] / 1e6:.1f}M in all)"
        print(harness.gpu_line(f"{what}, {params},", g))
    return out


def main():
    p = harness.common_args(argparse.ArgumentParser(description="llama2.py vs transformers' LlamaForCausalLM (see the docstring)"))
    args = harness.parse_args(p)

    info = harness.machine()
    rows, checks, config = cpu_rows(CONFIGS["quick" if args.quick else "default"], args.rounds, args.seed)
    print(f"model: {config['n_layer']} layers, {config['n_embd']} wide, {config['n_head']} heads, "
          f"{config['n_kv_head']} kv heads, SwiGLU {config['intermediate_size']}, vocab {VOCAB}, "
          f"{config['params'] / 1e6:.1f}M params ({config['params_with_embedding'] / 1e6:.1f}M with the input "
          f"embedding) | init std {INIT_STD} | fp32 | HF attention {config['hf_attn_implementation']} | "
          f"{args.rounds} rounds + 1 warmup, alternating, medians")
    harness.print_ratio_table(rows)
    print(f"train loss: ours {checks['train_loss_ours']:.6f}, HF {checks['train_loss_ref']:.6f} | "
          f"train throughput: ours {rows[0]['tokens_per_s_ours']:,.0f} tok/s, HF {rows[0]['tokens_per_s_ref']:,.0f} tok/s")
    print(f"greedy tokens identical to HF: {checks['decode_tokens_identical']} "
          f"({checks['decode_distinct_tokens']} distinct of {config['decode']}) | "
          f"with and without the KV cache: {checks['kv_cache_tokens_identical']}")
    harness.print_legend(args.quick)

    kv = kv_bytes_rows(args.seed)
    checks["kv_bytes_per_token_match"] = all(r["match"] for r in kv)
    print("KV cache bytes per token, fp32, measured from the KVCache buffers after a prefill of the preset's "
          "block_size tokens:")
    harness.print_table(("preset", "attention", "layers x width", "heads / kv heads", "measured B/token",
                         "kv_bytes_per_token(4)", "vs MHA"),
                        [(f"llama2 {r['preset']}", r["attention"], f"{r['n_layer']} x {r['n_embd']}",
                          f"{r['n_head']} / {r['n_kv_head']}", f"{r['bytes_per_token']:,.0f}",
                          f"{r['kv_bytes_per_token']:,}" + ("" if r["match"] else " MISMATCH"), f"{r['vs_mha']:.3f}")
                         for r in kv])

    gpu, gpu_ok = harness.gpu_section(lambda: gpu_rows(args.batch_size))
    # status 1: different tokens, a cache size that is not kv_bytes_per_token, or the GPU rows failed
    harness.finish(T_START, info, args.json, gpu_ok and harness.passed(checks),
                   config=config, rounds=args.rounds, rows=rows, checks=checks, kv_bytes=kv, gpu=gpu)


if __name__ == "__main__":
    main()
