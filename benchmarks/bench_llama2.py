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
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import gpt2  # noqa: E402
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
PEAK_BF16 = (("H100", 989e12), ("H200", 989e12), ("A100", 312e12))  # dense tensor-core FLOP/s


def machine():
    cpu = platform.processor() or "unknown CPU"
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return dict(cpu=cpu, cores=os.cpu_count(), threads=torch.get_num_threads(), torch=torch.__version__,
                transformers=transformers.__version__, python=platform.python_version(), load_start=os.getloadavg()[0])


def swiglu_width(n_embd):
    """llama2.Config's default SwiGLU width, 8/3 n_embd rounded up to a multiple of 64, given to HF explicitly
    (LlamaConfig's own default is 11008, Llama 2 7B's)."""
    return llama2.Config(vocab_size=1, n_layer=1, n_head=1, n_kv_head=1, n_embd=n_embd).intermediate_size


def train_step(model, idx, targets, hf):
    model.zero_grad(set_to_none=True)
    if hf:  # HF shifts labels itself: labels=idx predicts idx[1:], the last position ignored
        loss = model(input_ids=idx, labels=idx, use_cache=False).loss
    else:   # the same targets for llama2.py: idx shifted by one, the last position ignored (-1)
        loss = model(idx, targets)[1]
    loss.backward()
    return loss.item()


def cpu_rows(c, rounds, seed):
    torch.manual_seed(seed)
    hf_cfg = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=CONTEXT, num_hidden_layers=c["n_layer"],
                         num_attention_heads=c["n_head"], num_key_value_heads=c["n_kv_head"],
                         hidden_size=c["n_embd"], intermediate_size=swiglu_width(c["n_embd"]),
                         initializer_range=INIT_STD, attention_dropout=0.0)
    hf = LlamaForCausalLM(hf_cfg)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = llama2.from_pretrained(d)  # dropout 0.0 by default

    x = torch.randint(0, VOCAB, (c["batch"], c["seq"] + 1), generator=torch.Generator().manual_seed(seed))
    idx = x[:, :-1].contiguous()
    targets = x[:, 1:].clone()
    targets[:, -1] = -1
    prompt = torch.randint(0, VOCAB, (1, c["prompt"]), generator=torch.Generator().manual_seed(seed + 1))
    eos = hf.generation_config.eos_token_id

    def gen_ours(n, use_cache=True):
        return ours.eval().generate(prompt, n, temperature=0.0, use_cache=use_cache)

    def gen_hf(n):  # min_new_tokens: an eos never ends it early; pad=eos only silences the missing-pad warning
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

    new = outputs["decode", 0][0, c["prompt"]:].tolist()
    checks = {
        "train_loss_ours": outputs["train", 0], "train_loss_ref": outputs["train", 1],
        "decode_tokens_identical": torch.equal(outputs["decode", 0], outputs["decode", 1]),
        "kv_cache_tokens_identical": torch.equal(outputs["kv_cache", 0], outputs["kv_cache", 1]),
        "decode_distinct_tokens": len(set(new)),
    }
    n_tok = c["batch"] * c["seq"]
    specs = [  # key, label, reference label, target (None: reported only)
        ("train", f"train step (fwd+bwd, no optim), {c['batch']}x{c['seq']} tok", "HF", 1.0),
        ("decode", f"greedy decode {c['decode']} tok, KV cache", "HF", 1.0),
        ("kv_cache", f"ours KV cache vs recompute, {c['kv_tokens']} tok", "ours, no cache", None),
    ]
    rows = [make_row(key, label, ref_label, target, *times[key]) for key, label, ref_label, target in specs]
    rows[0]["tokens_per_s_ours"] = n_tok / rows[0]["ours_median_s"]
    rows[0]["tokens_per_s_ref"] = n_tok / rows[0]["ref_median_s"]
    config = dict(c, vocab_size=VOCAB, max_position_embeddings=CONTEXT, intermediate_size=hf_cfg.intermediate_size,
                  initializer_range=INIT_STD, params=ours.num_params(), params_with_embedding=ours.num_params(False),
                  hf_attn_implementation=hf.config._attn_implementation, seed=seed)
    return rows, checks, config


def make_row(key, label, ref_label, target, ours_t, ref_t):
    per_round = [b / a for a, b in zip(ours_t, ref_t)]  # the two runs of one round, side by side
    ratio = statistics.median(ref_t) / statistics.median(ours_t)
    met = "-" if target is None else "yes" if ratio >= target else "~noise" if max(per_round) >= target else "NO"
    return dict(key=key, label=label, reference=ref_label, ours_s=ours_t, ref_s=ref_t,
                ours_median_s=statistics.median(ours_t), ref_median_s=statistics.median(ref_t),
                ratio=ratio, ratio_min=min(per_round), ratio_max=max(per_round), target=target, met=met)


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


def train_throughput(model, batch_size, steps=30, warmup=5, device="cuda"):
    """Training throughput of gpt2.GPT or llama2.Llama (both: model(idx, targets) -> (logits, loss), num_params(),
    config.block_size / vocab_size / n_layer / n_embd): bf16 autocast, torch.compile, fused AdamW, one micro-step
    per step. (device exists only to smoke-test this function on a CPU with a tiny model.)"""
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    cfg = model.config
    model = model.to(device).train()
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
    # PaLM appendix B; the attention term holds for both as n_head * head_dim = n_embd here
    flops_per_token = 6 * model.num_params() + 12 * cfg.n_layer * cfg.n_embd * T
    return dict(device=name, batch_size=batch_size, seq=T, steps=steps, warmup=warmup, step_ms=dt * 1000,
                tokens_per_s=tok_s, params=model.num_params(), params_with_embedding=model.num_params(False),
                flops_per_token=flops_per_token, peak_flops=peak,
                mfu=flops_per_token * tok_s / peak if peak else None, warmup_loss=loss.item())


def gpu_rows(batch_size, device="cuda", llama_cfg=None, gpt2_cfg=None, steps=30, warmup=5):
    """{"llama": ..., "gpt2": ...}: the Llama of GPT-2's shape and gpt2.py's 124M, timed by the same helper.
    (device, the configs and the step counts exist only to smoke-test this on a CPU with tiny models.)"""
    out = {}
    for name, build in (("llama", lambda: llama2.Llama(llama_cfg or llama2.Config(**LLAMA_GPU))),
                        ("gpt2", lambda: gpt2.GPT(gpt2_cfg or gpt2.Config()))):
        torch.manual_seed(0)
        torch._dynamo.reset()  # the second model compiles afresh, not against the first one's cache limits
        out[name] = train_throughput(build(), batch_size, steps, warmup, device)
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    return out


def fmt_s(t):
    return f"{t * 1000:.0f} ms" if t < 1 else f"{t:.2f} s"


def print_table(header, table):
    widths = [max(len(str(line[i])) for line in [header] + table) for i in range(len(header))]
    for line in [header, tuple("-" * w for w in widths)] + table:
        print(" | ".join(str(v).ljust(w) for v, w in zip(line, widths)))


def main():
    p = argparse.ArgumentParser(description="llama2.py vs transformers' LlamaForCausalLM (see the docstring)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds after one warmup round (default 5; 2 with --quick)")
    p.add_argument("--quick", action="store_true", help="tiny model: a smoke test of this script")
    p.add_argument("--json", metavar="PATH", help="also write the results here as JSON")
    p.add_argument("--batch_size", type=int, default=16, help="GPU rows: sequences of 1024 tokens per step (no grad accumulation)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's own choice)")
    p.add_argument("--seed", type=int, default=1337)
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
    print(f"model: {config['n_layer']} layers, {config['n_embd']} wide, {config['n_head']} heads, "
          f"{config['n_kv_head']} kv heads, SwiGLU {config['intermediate_size']}, vocab {VOCAB}, "
          f"{config['params'] / 1e6:.1f}M params ({config['params_with_embedding'] / 1e6:.1f}M with the input "
          f"embedding) | init std {INIT_STD} | fp32 | HF attention {config['hf_attn_implementation']} | "
          f"{rounds} rounds + 1 warmup, alternating, medians")

    header = ("measurement", "ours", "reference", "ratio (range)", "target", "met?")
    print_table(header, [(r["label"], fmt_s(r["ours_median_s"]), f"{fmt_s(r['ref_median_s'])} ({r['reference']})",
                          f"{r['ratio']:.2f}x ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})",
                          "reported" if r["target"] is None else f">= {r['target']:.1f}x", r["met"]) for r in rows])
    print(f"train loss: ours {checks['train_loss_ours']:.6f}, HF {checks['train_loss_ref']:.6f} | "
          f"train throughput: ours {rows[0]['tokens_per_s_ours']:,.0f} tok/s, HF {rows[0]['tokens_per_s_ref']:,.0f} tok/s")
    print(f"greedy tokens identical to HF: {checks['decode_tokens_identical']} "
          f"({checks['decode_distinct_tokens']} distinct of {config['decode']}) | "
          f"with and without the KV cache: {checks['kv_cache_tokens_identical']}")
    print("ratio = reference time / ours (> 1: ours faster); range = the per-round ratios; "
          "~noise = median misses the target but some round met it"
          + ("\n--quick: a smoke test, its sizes are too small for the targets to mean anything" if args.quick else ""))

    kv = kv_bytes_rows(args.seed)
    checks["kv_bytes_per_token_match"] = all(r["match"] for r in kv)
    print("KV cache bytes per token, fp32, measured from the KVCache buffers after a prefill of the preset's "
          "block_size tokens:")
    print_table(("preset", "attention", "layers x width", "heads / kv heads", "measured B/token",
                 "kv_bytes_per_token(4)", "vs MHA"),
                [(f"llama2 {r['preset']}", r["attention"], f"{r['n_layer']} x {r['n_embd']}",
                  f"{r['n_head']} / {r['n_kv_head']}", f"{r['bytes_per_token']:,.0f}", f"{r['kv_bytes_per_token']:,}"
                  + ("" if r["match"] else " MISMATCH"), f"{r['vs_mha']:.3f}") for r in kv])

    gpu, ok = None, all(v for k, v in checks.items() if k.endswith(("identical", "match")))
    if not torch.cuda.is_available():
        print("no CUDA device: GPU rows not measured")
    else:
        try:  # a failure here (out of memory, no compiler) must not lose the CPU rows above
            gpu = gpu_rows(args.batch_size)
            for name, g in gpu.items():
                mfu = f"{100 * g['mfu']:.1f}%" if g["mfu"] is not None else "n/a (peak of this GPU unknown)"
                what = ("Llama 12x768, 12 heads / 4 kv heads" if name == "llama" else "GPT-2 124M (gpt2.py)")
                print(f"GPU {g['device']}: {what}, {g['params'] / 1e6:.1f}M params "
                      f"({g['params_with_embedding'] / 1e6:.1f}M in all), train, bf16 autocast + torch.compile + "
                      f"fused AdamW, B={g['batch_size']} x T={g['seq']}: {g['step_ms']:.1f} ms/step | "
                      f"{g['tokens_per_s']:,.0f} tok/s | MFU {mfu}")
        except Exception as e:
            gpu, ok = dict(error=f"{type(e).__name__}: {e}"), False
            print(f"GPU rows failed: {gpu['error']}", file=sys.stderr)
    wall = time.perf_counter() - T_START
    info["load_end"] = os.getloadavg()[0]
    print(f"wall time {wall:.0f} s | load avg {info['load_end']:.1f} "
          "(another process on the CPU makes every time noisier, with 2+ threads most)")

    if args.json:
        Path(args.json).write_text(json.dumps(dict(machine=info, config=config, rounds=rounds, rows=rows,
                                                   checks=checks, kv_bytes=kv, gpu=gpu, wall_s=wall), indent=1))
        print(f"wrote {args.json}")
    if not ok:  # different tokens, a cache size that is not kv_bytes_per_token, or the GPU rows failed
        sys.exit(1)


if __name__ == "__main__":
    main()
