"""Benchmark bitnet.py: the size of its packed weights against fp16, its validation loss against llama2.py's
full-precision Llama of the same shape trained the same way, its CPU speed against Hugging Face transformers'
BitNetForCausalLM on the same weights and against llama2.py, and its GPU training throughput.

Rounds, warmup, medians and ratios are harness.py's: each round runs every timed measurement once per side, the
order flipping each round (so a neighbour's load on the CPU hits both alike), round 0 a warmup; ratio =
reference / ours (> 1: bitnet.py faster). On a shared 2-core machine every time is noisy: the range column shows
how much. There, --threads 1 gives steadier and, for bitnet.py, far lower times: torch.round over 4096 elements or
more runs as an OpenMP parallel region, which waits for every thread of the team, and with the cores busy elsewhere
that took ~7 ms a call here (8 us on one thread); BitNet rounds every weight matrix at every call from its master
weights, where a Llama rounds nothing.

  size         bytes of the block linears (q, k, v, o, gate, up, down of every layer) after bitnet.pack, measured
               from the buffers (uint8 codes, four to a byte, + one float32 scale each) against the same linears
               in fp16 (2 bytes a weight), target packed <= 1/7 of fp16; and the whole model, the embedding, the
               head and the norms in fp16 in both forms (reported). At three shapes: bitnet.py's CPU preset
               (4 x 128, GPT-2's vocabulary), its CUDA preset (6 x 384), both built for real, and the released
               BitNet b1.58 2B-4T (30 x 2560, 20 heads / 5 kv heads, intermediate 6912, vocab 128256, tied
               embedding as its config.json), built and packed on the meta device (shapes only, nothing
               allocated; with --quick all three). Every number must equal what bitnet.packed_size() computes,
               before and after pack.
  val loss     bitnet.py against llama2.py, each run as its own command line (`python bitnet.py ...`,
               `python llama2.py ...`, --device cpu, fp32) with the same shape (--n_layer --n_head --n_kv_head
               --n_embd --intermediate_size: the CPU preset's), the same --data, --block_size, --batch_size,
               --max_iters, --eval_interval, --eval_iters and --seed, so both see the same batches in the same
               order (both draw each step's batch from step_seed); the losses are read from each run's
               out_dir/metrics.jsonl. The two feed-forwards differ (llama2: SwiGLU; bitnet: squared-ReLU gated,
               with sub-norms before o_proj and down_proj), and so do the rotary bases (each script's default:
               10000 and 500000). Runs: BitNet b1.58 and the Llama at bitnet.py's default learning rate, and
               both again at llama2.py's (where the two defaults differ), so each is seen at its own default
               and both at the same rate; then the 1-bit BitNet (--weight_bits 1) and BitNet b1.58 with
               --two_stage, at bitnet.py's default. --lr and --min_lr are passed explicitly (the preset's pair
               of the script named); everything else is each script's CPU preset. Fewer iterations than the
               preset's 200 (--val_iters, default 100) to fit the section in about ten minutes on 2 idle cores;
               --quick: 2 steps on a smaller shape, 3 runs (see val_runs). The runs go --jobs at a
               time, each with cores / jobs torch threads (on a busy machine two one-thread processes side by
               side ran faster than one process with 2 threads). Reported, no target.
  train step   forward + backward, fp32, train mode, same batch and targets, no optimizer step: bitnet.py
               against transformers' BitNetForCausalLM loaded with quantization_config {"linear_class":
               "autobitlinear", "quantization_mode": "online"} (AutoBitLinear: master weights quantized at every
               forward) from the same checkpoint (target >= 1x); and against a llama2.Llama of the same shape
               (random weights: reported, the cost of the quantizers and the sub-norms). transformers' bitnet
               integration wraps its quantizers in @torch.compile; HF runs eager here (torch._dynamo disabled
               for this section), as does ours.
  decode       greedy, batch 1, KV cache: bitnet.py from its master weights against HF (target >= 1x); bitnet.py
               packed (bitnet.pack: int8 codes unpacked once, torch._int_mm on a CPU) against itself from the
               master weights (reported, as tokens/s); ours with its cache against
               recomputing the prefix (reported). Packed and master tokens must be identical (the same codes
               and scales, the same arithmetic). HF's tokens and ours with and without the cache are compared
               and reported, not required: 8-bit activation quantization rounds x * 127 / max|x|, and where two
               correct implementations differ by one float rounding next to a .5 boundary one activation code
               flips and the logits move by ~1% from there on; the logits of HF and ours on ours' decoded text
               (one forward each) are shown beside it.
  before/after the straight-through estimator's form (issue 30), each in the same rounds: the train step (as
               above) at two shapes, issue 19's (4 x 256, vocab 4096, batch 4 x 128; --quick: 2 x 64, vocab 512) and
               this section's, before and after against HF (target after >= 1x) and after against before; the packed
               model's greedy decode and its forward over a batch (4 x 64 tokens) after against before. After is
               bitnet.py: z + (q - z).detach() with z = x * s (the b1.58 note's form). Before is its quantizers as
               they were, rebuilt here (before_issue30): one autograd.Function (STE) whose forward hands on the codes
               and whose backward is the gradient of x * s. Before and after must agree bit for bit (losses, every
               gradient, packed logits and tokens).
  GPU          only with CUDA: training throughput and MFU of a BitNet of GPT-2 124M's shape (12 x 768, 12 heads,
               4 kv heads, vocab 50257, T=1024) and of llama2.py's Llama of the same shape, the same helper timing
               both (harness.train_throughput: bf16 autocast, torch.compile, fused AdamW, warmup excluded).
               FLOPs per token: 6 N + 12 n_layer n_embd T for both (PaLM, appendix B); the quantizers'
               elementwise work (absmean, absmax, round, clamp, rescale) is not counted. Then the packed model's
               product (issue 19) at BitNet b1.58 2B-4T's linears and 32 / 512 / 4096 tokens: torch._int_mm (int8
               codes, int32 sums, exact) against F.linear of the codes in bf16 (what int_matmul runs off a CPU under
               autocast) and in float32, medians of 20 calls (reported: which to keep is for that measurement).

    python benchmarks/bench_bitnet.py                  # 15-50 minutes on 2 CPU cores, by how busy they are
    python benchmarks/bench_bitnet.py --quick          # tiny shapes, a smoke test (~1 minute on 2 busy cores)
    python benchmarks/bench_bitnet.py --json out.json  # also write the results as JSON
    python benchmarks/bench_bitnet.py --data /path/to/input.txt --val_iters 200   # the preset's full 200 steps
    cd benchmarks && python -c "import bench_bitnet as b; b.gpu_rows(16)"       # the GPU rows alone

Set TIKTOKEN_CACHE_DIR to a folder holding tiktoken's GPT-2 files when offline: both scripts then tokenize with
GPT-2's BPE (without it they fall back to raw bytes, both alike; the tokenizer used is printed).
"""
import time

T_START = time.perf_counter()  # the wall time printed at the end includes the imports

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch._dynamo
import torch.nn.functional as F
from transformers import BitNetConfig, BitNetForCausalLM

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]  # the models at the repo root, harness.py beside this file
import bitnet  # noqa: E402
import harness  # noqa: E402
import llama2  # noqa: E402

VOCAB, CONTEXT, INIT_STD = 50257, 1024, 0.1
PRESET_KEYS = ("n_layer", "n_head", "n_kv_head", "n_embd", "block_size")
# size: (name, Config keywords, build on the meta device)
SIZE_SHAPES = [
    ("bitnet.py CPU preset", dict(vocab_size=VOCAB, **{k: bitnet.PRESETS["cpu"][k] for k in PRESET_KEYS}), False),
    ("bitnet.py CUDA preset", dict(vocab_size=VOCAB, **{k: bitnet.PRESETS["cuda"][k] for k in PRESET_KEYS}), False),
    ("BitNet b1.58 2B-4T", dict(vocab_size=128256, block_size=4096, n_layer=30, n_head=20, n_kv_head=5, n_embd=2560,
                                intermediate_size=6912, tie_embeddings=True), True),
]
TARGET_SHRINK = 7  # the block linears packed: at most 1/7 of their fp16 bytes
# val loss: the shape and the run lengths (batch_size and block_size as the CPU preset in the full mode)
VAL = {
    "default": dict({k: bitnet.PRESETS["cpu"][k] for k in PRESET_KEYS}, batch_size=bitnet.PRESETS["cpu"]["batch_size"],
                    max_iters=100, eval_interval=50, eval_iters=10),
    # warmup 1: --two_stage's second stage is reached; quick: fewer runs (see val_runs)
    "quick": dict(n_layer=2, n_head=2, n_kv_head=1, n_embd=64, block_size=32, batch_size=4, max_iters=2,
                  eval_interval=2, eval_iters=1, warmup_iters=1, quick=True),
}
# CPU speed: GPT-2's vocabulary, a 1024 context, 6 layers 256 wide, GQA (as bench_llama2.py), weights std 0.1
CONFIGS = {
    "default": dict(n_layer=6, n_head=4, n_kv_head=2, n_embd=256, batch=4, seq=256, prompt=8, decode=64, kv_tokens=64),
    "quick": dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, batch=2, seq=64, prompt=8, decode=8, kv_tokens=8),
}
# the second train-step shape (issue 19, where bitnet.py was measured slowest against HF): 4 x 256, vocab 4096, 4 x 128
ISSUE19 = {"default": dict(n_layer=4, n_head=4, n_kv_head=2, n_embd=256, batch=4, seq=128, vocab=4096),
           "quick": dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, batch=2, seq=32, vocab=512)}
# GPU: GPT-2 124M's shape (12 layers, 768 wide, 12 heads), GQA with 4 kv heads, untied head; bitnet and llama2 alike
GPU_SHAPE = dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_kv_head=4, n_embd=768)
# the packed matmul on a GPU (issue 19: torch._int_mm against the bf16 matmul): (in, out) of BitNet b1.58 2B-4T's
# linears (q and o, k and v, gate and up, down) at these token counts (CUDA's _int_mm wants more than 16 rows)
INT_MM_LINEARS, INT_MM_TOKENS = ((2560, 2560), (2560, 640), (2560, 6912), (6912, 2560)), (32, 512, 4096)


def mb(n):
    return f"{n / 1e6:,.3f} MB"


def ffn_width(n_embd):
    """bitnet.Config's default feed-forward width (8/3 n_embd rounded up to 64), given to llama2 and HF explicitly."""
    return bitnet.Config(vocab_size=1, n_layer=1, n_head=1, n_kv_head=1, n_embd=n_embd).intermediate_size


# ------------------------------------------------------------------------------------------- size

def size_row(name, kwargs, meta, seed):
    """Bytes of one BitNet's block linears and of the rest, in fp16 and packed, measured from the tensors (on the
    meta device: from their shapes and dtypes) and checked against bitnet.packed_size before and after pack."""
    cfg = bitnet.Config(**kwargs)
    torch.manual_seed(seed)
    with torch.device("meta") if meta else nullcontext():
        model = bitnet.BitNet(cfg)
    linears = [m for m in model.modules() if isinstance(m, bitnet.BitLinear)]
    in_linears = {id(m.weight) for m in linears}
    fp16 = sum(m.weight.to(torch.float16).nbytes for m in linears)
    others = sum(p.to(torch.float16).nbytes for p in {id(p): p for p in model.parameters()  # a tied head once
                                                        if id(p) not in in_linears}.values())
    before = bitnet.packed_size(model)
    bitnet.pack(model)
    packed_mods = [m for m in model.modules() if isinstance(m, bitnet.PackedBitLinear)]
    codes = sum(m.weight.nbytes for m in packed_mods)
    scales = sum(m.weight_scale.nbytes for m in packed_mods)
    packed = codes + scales
    after = bitnet.packed_size(model)
    weights = sum(m.in_features * m.out_features for m in packed_mods)
    return dict(shape=name, meta=meta, n_layer=cfg.n_layer, n_embd=cfg.n_embd, n_head=cfg.n_head,
                n_kv_head=cfg.n_kv_head, intermediate_size=cfg.intermediate_size, vocab_size=cfg.vocab_size,
                tie_embeddings=cfg.tie_embeddings, linears=len(packed_mods), linear_weights=weights,
                linears_fp16_bytes=fp16, packed_codes_bytes=codes, packed_scales_bytes=scales, packed_bytes=packed,
                bits_per_weight=8 * packed / weights, packed_over_fp16=packed / fp16,
                target_met=packed * TARGET_SHRINK <= fp16, others_fp16_bytes=others, model_fp16_bytes=fp16 + others,
                model_packed_bytes=packed + others, packed_size_before=before, packed_size_after=after,
                match=len(packed_mods) == len(linears) and before == after == (packed, fp16, others)
                and all(m.weight.dtype == torch.uint8 for m in packed_mods))


def print_size_table(rows):
    harness.print_table(
        ("shape", "block linears", "fp16", "packed (codes + scales)", "bits/weight", "packed / fp16", "<= 1/7?",
         "whole model fp16", "whole packed", "whole packed / fp16"),
        [(f"{r['shape']}: {r['n_layer']} x {r['n_embd']}{' (meta)' if r['meta'] else ''}",
          f"{r['linears']} x, {r['linear_weights'] / 1e6:,.2f}M weights", mb(r["linears_fp16_bytes"]),
          f"{mb(r['packed_bytes'])} ({r['packed_codes_bytes']:,} + {r['packed_scales_bytes']:,} B)",
          f"{r['bits_per_weight']:.4f}", f"{r['packed_over_fp16']:.4f} (1/{1 / r['packed_over_fp16']:.2f})",
          "PASS" if r["target_met"] else "FAIL", mb(r["model_fp16_bytes"]), mb(r["model_packed_bytes"]),
          f"{r['model_packed_bytes'] / r['model_fp16_bytes']:.3f}") for r in rows])


# --------------------------------------------------------------------------------------- val loss

def val_runs(quick=False):
    """The runs: (name, script, weights, lr, min_lr, whose default that lr is, extra flags). BitNet b1.58 and the
    Llama at each distinct default (lr, min_lr) of the two scripts' CPU presets, then the 1-bit and two-stage
    BitNets at bitnet.py's. quick: at bitnet.py's lr only, and one 1-bit run with --two_stage (3 runs, not 6)."""
    defaults = {s: (m.PRESETS["cpu"]["lr"], m.PRESETS["cpu"]["min_lr"])
                for s, m in (("bitnet", bitnet), ("llama2", llama2))}
    owners = {}
    for script, sched in defaults.items():
        owners.setdefault(sched, []).append(f"{script}.py")
    runs = []
    for (lr, min_lr), who in owners.items():
        if quick and (lr, min_lr) != defaults["bitnet"]:
            continue
        runs += [dict(name=f"b1.58 @ {lr:g}", script="bitnet", weights="ternary, BitNet b1.58", lr=lr, min_lr=min_lr,
                      default_of=who, flags=[]),
                 dict(name=f"fp @ {lr:g}", script="llama2", weights="fp32 (llama2.py)", lr=lr, min_lr=min_lr,
                      default_of=who, flags=[])]
    variants = [("1-bit", "binary, BitNet (--weight_bits 1)", ["--weight_bits", "1"]),
                ("b1.58 two-stage", "ternary, --two_stage", ["--two_stage"])]
    if quick:
        variants = [("1-bit two-stage", "binary, --weight_bits 1 --two_stage", ["--weight_bits", "1", "--two_stage"])]
    lr, min_lr = defaults["bitnet"]
    runs += [dict(name=f"{name} @ {lr:g}", script="bitnet", weights=weights, lr=lr, min_lr=min_lr,
                  default_of=owners[defaults["bitnet"]], flags=flags) for name, weights, flags in variants]
    return runs, defaults


def train_run(run, v, data, seed, threads, out_dir):
    """One training run as a command line; returns the run with its evals {iter: (train, val)}, ms/iter, wall time,
    exit status, the tokenizer and parameter count it printed."""
    cmd = [sys.executable, str(ROOT / f"{run['script']}.py"), "--device", "cpu", "--data", data, "--out_dir", out_dir,
           "--seed", str(seed), "--lr", repr(run["lr"]), "--min_lr", repr(run["min_lr"]), "--max_new_tokens", "1",
           "--log_interval", str(v["eval_interval"]), "--intermediate_size", str(v["intermediate_size"])]
    cmd += [a for k in (*PRESET_KEYS, "batch_size", "max_iters", "eval_interval", "eval_iters", "warmup_iters")
            if k in v for a in (f"--{k}", str(v[k]))] + run["flags"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t
    metrics = Path(out_dir) / "metrics.jsonl"
    records = [json.loads(l) for l in metrics.read_text().splitlines()] if metrics.exists() else []
    evals = {r["iter"]: (r["train"], r["val"]) for r in records if "val" in r}
    ms = [r["ms"] for r in records if "ms" in r]
    header = next((l for l in p.stdout.splitlines() if l.startswith(f"{run['script']} | ")), "")
    fields = {f.split(" ", 1)[0]: f.split(" ", 1)[-1] for f in header.split(" | ")}
    ok = p.returncode == 0 and v["max_iters"] in evals and all(math.isfinite(x) for e in evals.values() for x in e)
    print(f"  {run['name']}: {'done' if ok else 'FAILED'} in {wall:.0f} s", flush=True)
    if not ok:
        print(f"  {' '.join(cmd)}\n  exit {p.returncode}: {p.stderr[-1500:]}", file=sys.stderr)
    return dict(run, cmd=cmd[1:], evals=evals, s_per_iter=sum(ms) / len(ms) / 1000 if ms else None, wall_s=wall,
                returncode=p.returncode, ok=ok, tokenizer=fields.get("tokenizer"),
                params=next((f.split("M params")[0] for f in header.split(" | ") if "M params" in f), None))


def val_rows(v, data, seed, jobs, threads):
    """All val runs, `jobs` at a time (default: as many as cores, at most one per run), each with `threads` torch
    threads (default: cores / jobs). The data cache is made first, here, so that no two runs write it at once."""
    runs, defaults = val_runs(v.get("quick", False))
    v = dict(v, intermediate_size=ffn_width(v["n_embd"]))
    bitnet.prepare_data(data, bitnet.load_tokenizer())  # the same cache both scripts read (data/<name>/)
    jobs = jobs or min(os.cpu_count() or 1, len(runs))
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    print(f"val runs: {len(runs)} of {v['max_iters']} steps, {jobs} at a time, {threads} torch thread(s) each:",
          flush=True)
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(jobs) as pool:
        done = list(pool.map(lambda ir: train_run(ir[1], v, data, seed, threads, os.path.join(tmp, str(ir[0]))),
                             enumerate(runs)))
    return done, dict(v, data=data, jobs=jobs, threads=threads, default_lrs=defaults, seed=seed)


def print_val_table(runs, v):
    iters = sorted({i for r in runs for i in r["evals"]})

    def loss(r, i, k):
        return f"{r['evals'][i][k]:.4f}" if i in r["evals"] else "-"

    harness.print_table(
        ("run", "script", "weights", "lr / min_lr (default of)", *(f"val @{i}" for i in iters),
         f"train @{iters[-1] if iters else '-'}", "params", "s/iter", "wall"),
        [(r["name"], f"{r['script']}.py", r["weights"], f"{r['lr']:g} / {r['min_lr']:g} ({', '.join(r['default_of'])})",
          *(loss(r, i, 1) for i in iters), loss(r, iters[-1], 0) if iters else "-", f"{r['params']}M",
          f"{r['s_per_iter']:.2f}" if r["s_per_iter"] else "-", f"{r['wall_s']:.0f} s") for r in runs])
    final = {(r["script"], r["lr"], tuple(r["flags"])): r["evals"].get(v["max_iters"], (math.nan, math.nan))[1]
             for r in runs}
    d = v["default_lrs"]
    lines = [f"b1.58 - fp at the same lr {lr:g}: {final[('bitnet', lr, ())] - final[('llama2', lr, ())]:+.4f}"
             for lr in dict.fromkeys(r["lr"] for r in runs if not r["flags"])]
    own = (("bitnet", d["bitnet"][0], ()), ("llama2", d["llama2"][0], ()))
    if d["bitnet"] == d["llama2"]:
        lines.append(f"(the two scripts' CPU presets have the same default lr / min_lr, {d['bitnet'][0]:g} / "
                     f"{d['bitnet'][1]:g}: own defaults and same lr are the same runs)")
    elif own[1] in final:
        lines.append(f"each at its own default (b1.58 @ {own[0][1]:g}, fp @ {own[1][1]:g}): "
                     f"{final[own[0]] - final[own[1]]:+.4f}")
    else:
        lines.append(f"--quick: at bitnet.py's default only (llama2.py's is {own[1][1]:g})")
    print(f"final val loss differences: {'; '.join(lines)}")


# ---------------------------------------------------------------------------------------- CPU speed

def hf_twin(c, seed, vocab=VOCAB):
    """A random BitNetForCausalLM (seeded, weights std INIT_STD, norms perturbed so that their weights matter),
    written with save_pretrained and its config given the online quantization_config, then read back by both
    transformers (AutoBitLinear, master weights) and bitnet.from_pretrained: (hf, ours), the same fp32 weights."""
    torch.manual_seed(seed)
    hf_cfg = BitNetConfig(vocab_size=vocab, max_position_embeddings=CONTEXT, num_hidden_layers=c["n_layer"],
                          num_attention_heads=c["n_head"], num_key_value_heads=c["n_kv_head"], hidden_size=c["n_embd"],
                          intermediate_size=ffn_width(c["n_embd"]), initializer_range=INIT_STD, attention_dropout=0.0,
                          bos_token_id=vocab - 1, eos_token_id=vocab - 1)
    hf = BitNetForCausalLM(hf_cfg)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        cfg_path = Path(d) / "config.json"
        cfg_json = json.loads(cfg_path.read_text())
        cfg_json["quantization_config"] = dict(quant_method="bitnet", linear_class="autobitlinear",
                                               quantization_mode="online")
        cfg_path.write_text(json.dumps(cfg_json))
        return BitNetForCausalLM.from_pretrained(d), bitnet.from_pretrained(d)


def train_step(model, idx, targets, seed):
    """n -> the loss of one forward + backward of one of our models (as harness.lm_rows times ours)."""
    def step(_):
        model.train()
        torch.manual_seed(seed)
        model.zero_grad(set_to_none=True)
        loss = model(idx, targets)[1]
        loss.backward()
        return loss.item()
    return step


def first_difference(a, b, start):
    """Index (counted from start) of the first token where a and b (1, T) differ; None if identical."""
    diff = (a[0, start:] != b[0, start:]).nonzero()
    return int(diff[0]) if len(diff) else None


def agreement(same, first, n):
    """'True', or 'False (the first k of n agree)'."""
    return f"{same}" + ("" if first is None else f" (the first {first} of {n} agree)")


def speed_rows(c, rounds, seed):
    """Train and decode rows against HF (harness.lm_rows), then the llama2 train row and the packed decode row."""
    hf, ours = hf_twin(c, seed)
    rows, checks, outputs = harness.lm_rows(ours, hf, c, rounds, seed, VOCAB, kv_target=None)  # cache: reported
    rows[0]["tokens_per_s_ref"] = c["batch"] * c["seq"] / rows[0]["ref_median_s"]
    ours_text, hf_text = outputs["decode"]
    # the same batch and prompt as lm_rows
    x = torch.randint(0, VOCAB, (c["batch"], c["seq"] + 1), generator=torch.Generator().manual_seed(seed))
    idx, targets = x[:, :-1].contiguous(), x[:, 1:].clone()
    targets[:, -1] = -1
    prompt = torch.randint(0, VOCAB, (1, c["prompt"]), generator=torch.Generator().manual_seed(seed + 1))
    torch.manual_seed(seed)
    lcfg = llama2.Config(vocab_size=VOCAB, block_size=CONTEXT, n_layer=c["n_layer"], n_head=c["n_head"],
                         n_kv_head=c["n_kv_head"], n_embd=c["n_embd"], intermediate_size=ours.config.intermediate_size)
    llama = llama2.Llama(lcfg)
    packed = bitnet.pack(copy.deepcopy(ours)).eval()
    cases = {"train_llama": (0, train_step(ours, idx, targets, seed), train_step(llama, idx, targets, seed)),
             "decode_packed": (c["decode"], harness.greedy(packed, prompt), harness.greedy(ours, prompt))}
    times, outs = harness.run_rounds(cases, rounds, name="round (llama2, packed)")
    rows += [harness.ratio_row("train_llama", f"train step, {c['batch']}x{c['seq']} tok", "llama2.Llama fp32", None,
                               *times["train_llama"]),
             harness.ratio_row("decode_packed", f"greedy decode {c['decode']} tok, packed (int8 codes)",
                               "master weights", None, *times["decode_packed"])]
    for r in rows:
        if r["key"].startswith("decode"):
            r["tokens_per_s_ours"], r["tokens_per_s_ref"] = (c["decode"] / r[k]
                                                             for k in ("ours_median_s", "ref_median_s"))
    with torch.no_grad():  # HF and ours on ours' decoded text, one forward each
        la, lb = hf.eval()(ours_text).logits, ours.eval()(ours_text)[0]
    checks = dict(
        packed_tokens_identical=torch.equal(outs["decode_packed"][0], outs["decode_packed"][1])
        and torch.equal(outs["decode_packed"][0], ours_text),
        train_loss_ours=checks["train_loss_ours"], train_loss_ref=checks["train_loss_ref"],
        train_loss_llama=outs["train_llama"][1],
        hf_tokens_same=checks["decode_tokens_identical"],
        hf_first_difference=first_difference(ours_text, hf_text, c["prompt"]),
        hf_argmax_agree=(la.argmax(-1) == lb.argmax(-1)).float().mean().item(),
        hf_logits_max_rel_diff=((la - lb).abs().max() / la.abs().max()).item(),
        kv_cache_tokens_same=checks["kv_cache_tokens_identical"],
        kv_cache_first_difference=first_difference(*outputs["kv_cache"], c["prompt"]),
        decode_distinct_tokens=len(set(ours_text[0, c["prompt"]:].tolist())))
    config = dict(c, vocab_size=VOCAB, max_position_embeddings=CONTEXT, intermediate_size=ours.config.intermediate_size,
                  initializer_range=INIT_STD, params=ours.num_params(), params_with_embedding=ours.num_params(False),
                  llama_params=llama.num_params(), hf_attn_implementation=hf.config._attn_implementation,
                  hf_linear=type(hf.model.layers[0].mlp.up_proj).__name__, seed=seed)
    return rows, checks, config


# ------------------------------------------------------------------------------------- before / after

class STE(torch.autograd.Function):
    """bitnet.py's straight-through estimator before issue 30: ste(x, s, q) is q in the forward pass (no arithmetic)
    and the gradient of x * s in the backward."""

    @staticmethod
    def forward(ctx, x, s, q):
        ctx.save_for_backward(s)
        return q

    @staticmethod
    def backward(ctx, grad):
        (s,) = ctx.saved_tensors
        return grad * s, None, None


def old_quantize_activations(x):
    x = x.float()
    s = 127.0 / x.detach().abs().amax(-1, keepdim=True).clamp(min=1e-5)
    return STE.apply(x, s, (x.detach() * s).round_().clamp_(-128, 127)), s


def old_quantize_weights(w, bits):
    w = w.float()
    s = 1.0 / w.detach().abs().mean().clamp(min=1e-5)
    codes = torch.where(w > w.mean(), 1.0, -1.0) if bits == 1 else (w.detach() * s).round_().clamp_(-1, 1)
    return STE.apply(w, s, codes), s


@contextmanager
def before_issue30():
    """bitnet.py's quantizers as they ran before issue 30 (the same numbers, bit for bit: checked by the callers)."""
    saved = bitnet.quantize_activations, bitnet.quantize_weights
    bitnet.quantize_activations, bitnet.quantize_weights = old_quantize_activations, old_quantize_weights
    try:
        yield
    finally:
        bitnet.quantize_activations, bitnet.quantize_weights = saved


def run_before(fn):
    """n -> fn(n) run inside before_issue30()."""
    def run(n):
        with before_issue30():
            return fn(n)
    return run


def hf_train_step(hf, idx):
    """n -> the loss of one forward + backward of HF (labels = idx, as harness.lm_rows)."""
    def step(_):
        hf.train()
        torch.manual_seed(0)
        hf.zero_grad(set_to_none=True)
        loss = hf(input_ids=idx, labels=idx, use_cache=False).loss
        loss.backward()
        return loss.item()
    return step


def before_after_rows(quick, rounds, seed):
    """Issue 30's rows, each timed in the same rounds: the train step (fwd + bwd) at issue 19's shape and at the
    speed section's, before and after against HF, and after against before; the packed model's greedy decode and
    its forward over a batch, after against before (the activations' estimator runs there too). Before: the
    quantizers with the STE autograd.Function. Returns rows and checks (before and after agree bit for bit:
    losses, gradients, logits, tokens)."""
    rows, checks = [], {}
    for name, c in (("issue19", ISSUE19[quick]), ("speed", dict(CONFIGS[quick], vocab=VOCAB))):
        hf, ours = hf_twin(c, seed, c["vocab"])
        x = torch.randint(0, c["vocab"], (c["batch"], c["seq"] + 1), generator=torch.Generator().manual_seed(seed))
        idx, targets = x[:, :-1].contiguous(), x[:, 1:].clone()
        targets[:, -1] = -1
        after = train_step(ours, idx, targets, seed)
        grads = lambda: [p.grad.clone() for p in ours.parameters()]  # noqa: E731
        checks[f"before_after_{name}_train_loss_identical"] = after(0) == run_before(after)(0)
        g_before = grads()
        after(0)
        checks[f"before_after_{name}_train_grads_identical"] = all(torch.equal(a, b) for a, b in zip(g_before, grads()))
        cases = {"after_hf": (0, after, hf_train_step(hf, idx)),
                 "before_hf": (0, run_before(after), hf_train_step(hf, idx)),
                 "after_before": (0, after, run_before(after))}
        times, _ = harness.run_rounds(cases, rounds, name=f"round (train, {name} shape)")
        what = f"train step, {c['n_layer']} x {c['n_embd']}, vocab {c['vocab']}, {c['batch']}x{c['seq']} tok"
        rows += [harness.ratio_row(f"train_{name}_after", f"{what}: after", "HF", 1.0, *times["after_hf"]),
                 harness.ratio_row(f"train_{name}_before", f"{what}: before", "HF", None, *times["before_hf"]),
                 harness.ratio_row(f"train_{name}_gain", f"{what}: after", "before", None, *times["after_before"])]
    c = CONFIGS[quick]
    packed = bitnet.pack(copy.deepcopy(ours)).eval()
    prompt = torch.randint(0, VOCAB, (1, c["prompt"]), generator=torch.Generator().manual_seed(seed + 1))
    batch = idx[:, :c["seq"] // 4]

    def forward(n):
        with torch.no_grad():
            return packed(batch)[0]

    cases = {"decode": (c["decode"], harness.greedy(packed, prompt), run_before(harness.greedy(packed, prompt))),
             "forward": (0, forward, run_before(forward))}
    times, outs = harness.run_rounds(cases, rounds, name="round (packed, before/after)")
    checks["before_after_packed_tokens_identical"] = torch.equal(*outs["decode"])
    checks["before_after_packed_logits_identical"] = torch.equal(*outs["forward"])
    rows += [harness.ratio_row("packed_decode_gain", f"packed greedy decode {c['decode']} tok: after", "before", None,
                               *times["decode"]),
             harness.ratio_row("packed_forward_gain", f"packed forward {batch.size(0)}x{batch.size(1)} tok: after",
                               "before", None, *times["forward"])]
    return rows, checks


# ------------------------------------------------------------------------------------------- GPU

def gpu_rows(batch_size, device="cuda", shape=None, steps=30, warmup=5, compile=True, int_mm_shape=None):
    """{"bitnet": ..., "llama": ..., "int_mm": ...}: a BitNet and a llama2.Llama of GPT-2 124M's shape, timed by the
    same helper (harness.train_throughput), and int_mm_rows at 2B-4T's linears, printed. (device, shape, the step
    counts, compile and int_mm_shape, (linears, tokens), exist only to smoke-test this on a CPU with tiny models.)"""
    shape = shape or GPU_SHAPE
    out = harness.train_throughputs({"bitnet": lambda: bitnet.BitNet(bitnet.Config(**shape)),
                                     "llama": lambda: llama2.Llama(llama2.Config(**shape))},
                                    batch_size, device, steps, warmup,
                                    {name: dict(compile=compile) for name in ("bitnet", "llama")})
    for name, g in out.items():
        what = (f"BitNet b1.58 {shape['n_layer']}x{shape['n_embd']}" if name == "bitnet"
                else f"llama2.Llama {shape['n_layer']}x{shape['n_embd']}")
        params = f"{g['params'] / 1e6:.1f}M params ({g['params_with_embedding'] / 1e6:.1f}M in all)"
        print(harness.gpu_line(f"{what}, {shape['n_head']} heads / {shape['n_kv_head']} kv heads, {params},", g))
    if out["bitnet"]["tokens_per_s"] and out["llama"]["tokens_per_s"]:
        print(f"BitNet / Llama training tokens/s: {out['bitnet']['tokens_per_s'] / out['llama']['tokens_per_s']:.2f} "
              "(MFU: 6 N + attention FLOPs; the quantizers' elementwise work is not counted)")
    try:
        out["int_mm"] = int_mm_rows(device, *(int_mm_shape or (INT_MM_LINEARS, INT_MM_TOKENS)))
    except Exception as e:  # never run on a GPU yet (_int_mm has its own rules there): keep the rows above
        out["int_mm"] = dict(error=f"{type(e).__name__}: {e}"[:2000])
        print(f"packed matmul rows failed: {out['int_mm']['error'][:300]}")
    return out


def int_mm_rows(device, linears, tokens, reps=20):
    """The packed model's product, activation codes (tokens, in) by ternary weight codes (out, in), three ways on the
    device: torch._int_mm (int8 by int8, int32 sums: exact), F.linear of both as bf16 (what bitnet.int_matmul runs
    off a CPU under autocast) and as float32. Medians of reps calls after a warmup; printed; returns the rows."""
    device, rows = torch.device(device), []
    for (d_in, d_out), n in ((lin, n) for lin in linears for n in tokens):
        x = torch.randint(-128, 128, (n, d_in), device=device, dtype=torch.int8)
        w = torch.randint(-1, 2, (d_out, d_in), device=device, dtype=torch.int8)
        xb, wb, xf, wf = x.bfloat16(), w.bfloat16(), x.float(), w.float()
        ways = {"int_mm": lambda: torch._int_mm(x, w.t()), "bf16": lambda: F.linear(xb, wb),
                "fp32": lambda: F.linear(xf, wf)}
        row = dict(d_in=d_in, d_out=d_out, tokens=n)
        for name, f in ways.items():  # the first call is a warmup
            row[f"{name}_s"] = harness.timed(f, reps, device)[1]
        row["int_mm_exact"] = torch.equal(ways["int_mm"]().float(), ways["fp32"]())
        rows.append(row)
        print(f"packed matmul {n} x {d_in} -> {d_out} on {device.type}: _int_mm {row['int_mm_s'] * 1e6:,.0f} us, "
              f"bf16 {row['bf16_s'] * 1e6:,.0f} us, fp32 {row['fp32_s'] * 1e6:,.0f} us | bf16 / _int_mm "
              f"{row['bf16_s'] / row['int_mm_s']:.2f}x | _int_mm = fp32 exactly: {row['int_mm_exact']}")
    return rows


def main():
    p = harness.common_args(argparse.ArgumentParser(
        description="bitnet.py: packed size, val loss vs llama2.py, CPU speed vs transformers, GPU throughput "
                    "(see the docstring)"))
    p.add_argument("--data", default="shakespeare",
                   help="--data of the val runs, given to both scripts: 'shakespeare' or a UTF-8 text file")
    p.add_argument("--val_iters", type=int, default=None,
                   help="training steps of each val run (default 100; 2 with --quick)")
    p.add_argument("--jobs", type=int, default=None,
                   help="val runs at a time (default: min(cores, runs))")
    args = harness.parse_args(p)
    quick = "quick" if args.quick else "default"
    ok = True

    info = harness.machine()
    sizes = [size_row(name, kw, meta or args.quick, args.seed) for name, kw, meta in SIZE_SHAPES]
    checks = {"size_bytes_match": all(r["match"] for r in sizes)}
    print("size: block linears packed (bitnet.pack: uint8 codes four to a byte + a float32 scale each, from the "
          "buffers) vs the same in fp16; whole model = + embedding, head and norms in fp16 in both:")
    print_size_table(sizes)
    print(f"target: packed block linears <= 1/{TARGET_SHRINK} of fp16 | every number = bitnet.packed_size() before "
          f"and after pack: {checks['size_bytes_match']}")
    ok &= all(r["target_met"] for r in sizes)

    v = dict(VAL[quick])
    if args.val_iters:
        v.update(max_iters=args.val_iters, eval_interval=max(1, args.val_iters // 2))
    runs, vc = val_rows(v, args.data, args.seed, args.jobs, args.threads)
    tokenizers = {r["tokenizer"] for r in runs}
    checks["val_same_tokenizer_match"] = len(tokenizers) == 1
    ok &= all(r["ok"] for r in runs)
    print(f"val loss: bitnet.py vs llama2.py from the command line, --device cpu, fp32, "
          f"{vc['n_layer']} x {vc['n_embd']}, {vc['n_head']} heads / {vc['n_kv_head']} kv heads, intermediate "
          f"{vc['intermediate_size']}, block {vc['block_size']}, batch {vc['batch_size']}, {vc['max_iters']} steps, "
          f"eval every {vc['eval_interval']} on {vc['eval_iters']} batches per split, seed {args.seed}, data "
          f"{args.data}, tokenizer {', '.join(map(str, tokenizers))}; other settings each script's CPU preset; "
          f"s/iter excludes evals ({vc['jobs']} runs at a time, so it is not a speed comparison):")
    print_val_table(runs, vc)

    c = CONFIGS[quick]
    with torch._dynamo.config.patch(disable=True):  # HF's quantizers are @torch.compile functions: eager on CPU here
        rows, speed_checks, config = speed_rows(c, args.rounds, args.seed)
    checks.update(speed_checks)
    print(f"model: {c['n_layer']} layers, {c['n_embd']} wide, {c['n_head']} heads, {c['n_kv_head']} kv heads, "
          f"intermediate {config['intermediate_size']}, vocab {VOCAB}, {config['params'] / 1e6:.1f}M params "
          f"({config['params_with_embedding'] / 1e6:.1f}M with the input embedding) | init std {INIT_STD} | fp32 | "
          f"HF {config['hf_linear']}, attention {config['hf_attn_implementation']}, eager | {args.rounds} rounds + "
          f"1 warmup, alternating, medians")
    harness.print_ratio_table(rows)
    print(f"train loss: ours {checks['train_loss_ours']:.6f}, HF {checks['train_loss_ref']:.6f}, llama2 "
          f"{checks['train_loss_llama']:.6f} | train throughput: ours {rows[0]['tokens_per_s_ours']:,.0f} tok/s, "
          f"HF {rows[0]['tokens_per_s_ref']:,.0f} tok/s")
    dec = {r["key"]: r for r in rows}
    print(f"greedy decode: master {dec['decode_packed']['tokens_per_s_ref']:.1f} tok/s, packed "
          f"{dec['decode_packed']['tokens_per_s_ours']:.1f} tok/s, HF {dec['decode']['tokens_per_s_ref']:.1f} tok/s | "
          f"packed tokens identical to master: {checks['packed_tokens_identical']} "
          f"({checks['decode_distinct_tokens']} distinct of {c['decode']})")
    hf_same = agreement(checks["hf_tokens_same"], checks["hf_first_difference"], c["decode"])
    cache_same = agreement(checks["kv_cache_tokens_same"], checks["kv_cache_first_difference"], c["kv_tokens"])
    print(f"HF's greedy tokens = ours: {hf_same} | on ours' text, one forward: argmax agrees at "
          f"{100 * checks['hf_argmax_agree']:.1f}% of positions, max |logit diff| "
          f"{checks['hf_logits_max_rel_diff']:.1e} of max |logit| | ours with and without the KV cache: {cache_same} "
          "(reported, not required: see the docstring)")
    with torch._dynamo.config.patch(disable=True):
        issue_rows, issue_checks = before_after_rows(quick, args.rounds, args.seed)
    checks.update(issue_checks)
    print("issue 30, before / after (before: the straight-through estimator as one autograd.Function; after: "
          f"z + (q - z).detach(); the same numbers bit for bit: {all(issue_checks.values())}):")
    harness.print_ratio_table(issue_rows)
    harness.print_legend(args.quick)

    gpu, gpu_ok = harness.gpu_section(lambda: gpu_rows(args.batch_size))
    # status 1: a size off packed_size or over 1/7, a val run failed or the runs tokenized differently, packed tokens
    # not the master's, or the GPU rows failed
    harness.finish(T_START, info, args.json, ok and gpu_ok and harness.passed(checks), sizes=sizes,
                   val=dict(config=vc, runs=runs), config=config, rounds=args.rounds, rows=rows + issue_rows,
                   checks=checks,
                   gpu=gpu)


if __name__ == "__main__":
    main()
