"""Run only the GPU rows of the benches: each bench's GPU function called as its main() calls it, with its main()'s
--batch_size default unless --batch_size says otherwise, printing what it prints under a header line per bench.
A bench that fails (an exception, out of memory) prints one line on stderr and the next one runs; the exit status
is 1 if any failed. Without CUDA nothing runs (status 0), unless --smoke: then every bench's GPU code runs on the
CPU with tiny models (2 layers 32 wide, sequences of 32 tokens, a vocabulary of 256; transformer_xl's stays 50257;
lora: QLoRA alone, 1 layer 64 wide), torch.compile off, 1 timed step after 1 warmup step: whether the code runs,
not how fast (tests/test_gpu_rows.py runs that).

    python benchmarks/gpu_rows.py                      # all 11 benches, the most wanted first
    python benchmarks/gpu_rows.py mamba bitnet         # these two
    python benchmarks/gpu_rows.py --json gpu.json      # also write {bench: result or {"error": ...}} and the machine
    python benchmarks/gpu_rows.py --smoke              # on the CPU with tiny models: does every bench's GPU code run?
"""
import time

T_START = time.perf_counter()  # the wall time printed at the end includes the imports

import argparse
import gc
import importlib
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # the models at the repo root, the benches and harness.py beside this
import harness  # noqa: E402

# --smoke: sequences per step, tokens per sequence, vocabulary, and the tiny shapes (Config keywords)
B, T, V = 2, 32, 256
SHAPE = dict(vocab_size=V, n_layer=2, n_head=2, n_kv_head=1, n_embd=32)  # llama2 / bitnet / infini without block_size
LLAMA = dict(SHAPE, block_size=T)
GPT2 = dict(vocab_size=V, block_size=T, n_layer=2, n_head=2, n_embd=32)
MAMBA = dict(vocab_size=V, block_size=T, n_layer=2, n_embd=32, d_state=4, expand=2, d_conv=4)
MAMBA2 = dict(vocab_size=V, block_size=T, n_layer=2, n_embd=32, d_state=8, expand=2, headdim=16, chunk_size=16)
MIXTRAL = dict(LLAMA, intermediate_size=0, n_expert=4, top_k_experts=2)
DEEPSEEK = dict(vocab_size=V, block_size=T, n_layer=2, n_head=2, n_embd=32, intermediate_size=64,
                moe_intermediate_size=16, n_expert=4, n_shared_experts=1, top_k_experts=2, n_group=2, topk_group=1,
                first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                v_head_dim=8)
JAMBA = dict(LLAMA, intermediate_size=64, n_expert=4, top_k_experts=2, attn_layer_period=2, attn_layer_offset=1,
             expert_layer_period=2, expert_layer_offset=1, d_state=4, expand=2, d_conv=4)  # layers: Mamba, attn + MoE
XL = dict(n_layer=2, n_head=2, n_embd=32, segment_len=8, mem_len=8)  # windows of 4 segments = T
XL_LLAMA = dict(n_layer=2, n_head=2, n_kv_head=1, n_embd=32, block_size=T)  # bench_transformer_xl gives the vocab
LORA = dict(vocab_size=V, block_size=T, n_layer=1, n_head=2, n_embd=64)  # every adapted weight whole NF4 blocks of 64

# name: (its main()'s --batch_size default, its main()'s GPU call with batch size n, the --smoke call), b: the
# bench's module. The order they run in by default: the most wanted first, then the three never run on any device
# (mamba2, jamba, transformer_xl), then the rest.
BENCHES = {
    "mamba": (4, lambda b, n: b.gpu_rows(n),
              lambda b: b.gpu_rows(B, "cpu", MAMBA, 1, 1, compiles=(False,), scan_shape=(B, T, 16, 4))),
    "infini_attention": (8, lambda b, n: dict(forward=b.gpu_rows(), train=b.gpu_train_rows(n)),
                         lambda b: dict(forward=b.gpu_rows("cpu", SHAPE, 16, (T, 2 * T), reps=1),
                                        train=b.gpu_train_rows(B, "cpu", SHAPE, 16, T, 1, 1, compile=False))),
    "bitnet": (16, lambda b, n: b.gpu_rows(n),
               lambda b: b.gpu_rows(B, "cpu", LLAMA, 1, 1, compile=False, int_mm_shape=(((64, 32),), (T,)))),
    "mla_moe": (16, lambda b, n: b.gpu_rows(n),
                lambda b: b.gpu_rows(B, "cpu", DEEPSEEK, 1, 1, compiles=(False,), pad_shape=(B, 2, T, 16, 8))),
    "mamba2": (8, lambda b, n: b.gpu_rows(n),
               lambda b: b.gpu_rows(B, "cpu", dict(mamba2=MAMBA2, mamba=MAMBA, llama2=LLAMA), 1, 1, compile=False)),
    "jamba": (8, lambda b, n: b.gpu_rows(n), lambda b: b.gpu_rows(B, "cpu", JAMBA, 1, 1, compiles=(False,))),
    "transformer_xl": (16, lambda b, n: b.gpu_rows(n),
                       lambda b: b.gpu_rows(B, "cpu", XL, XL_LLAMA, 1, 1, compile=False)),
    "mixtral": (16, lambda b, n: b.gpu_rows(n),
                lambda b: b.gpu_rows(B, "cpu", MIXTRAL, 1, 1,
                                     settings={k: s for k, s in b.GPU_SETTINGS.items() if not s[1]})),  # no compile
    "lora": (16, lambda b, n: b.gpu_rows(n),  # --smoke: QLoRA alone (each method is a process: seconds to start)
             lambda b: b.gpu_rows(1, "cpu", LORA, T, 1, 1, methods=("qlora",))),
    "llama2": (16, lambda b, n: b.gpu_rows(n),
               lambda b: b.gpu_rows(B, "cpu", b.llama2.Config(**LLAMA), b.gpt2.Config(**GPT2), 1, 1, compile=False)),
    "gpt2": (16, lambda b, n: b.gpu_row(n), lambda b: b.gpu_row(B, "cpu", b.gpt2.Config(**GPT2), 1, 1, compile=False)),
}


def run(names, smoke=False, batch_size=None):
    """Each named bench's GPU rows (its smoke call with smoke=True), printed; returns ({name: its result, or
    {"error": ...}}, the names of those that failed)."""
    results, failed = {}, []
    for name in names:
        n, full, tiny = BENCHES[name]
        how = "--smoke: tiny models on the CPU" if smoke else f"batch size {batch_size or n}"
        print(f"\n=== bench_{name}.py: GPU rows ({how})", flush=True)
        try:
            b = importlib.import_module(f"bench_{name}")
            results[name] = tiny(b) if smoke else full(b, batch_size or n)
        except Exception as e:  # out of memory is a RuntimeError too
            results[name] = dict(error=f"{type(e).__name__}: {e}")
            failed.append(name)
            print(f"bench_{name}.py GPU rows failed: {results[name]['error']}", file=sys.stderr, flush=True)
        if torch.cuda.is_available():  # what a failed bench held, for the next one
            gc.collect()
            torch.cuda.empty_cache()
    return results, failed


def main():
    p = argparse.ArgumentParser(description="only the GPU rows of the benches (see the docstring)")
    p.add_argument("names", nargs="*", metavar="NAME",
                   help=f"benches to run (default: all, in this order): {' '.join(BENCHES)}")
    p.add_argument("--smoke", action="store_true", help="on the CPU with tiny models, no torch.compile, 1 step")
    p.add_argument("--batch_size", type=int, default=None, help="sequences per step for every bench named "
                   "(default: each bench's own, as its --batch_size)")
    p.add_argument("--json", metavar="PATH", help="also write the results and the machine here as JSON")
    args = p.parse_args()
    if set(args.names) - set(BENCHES):
        p.error(f"no such bench: {' '.join(sorted(set(args.names) - set(BENCHES)))} (the benches: {' '.join(BENCHES)})")
    if args.batch_size is not None and args.batch_size < 1:
        p.error("--batch_size must be positive")
    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device: GPU rows not measured (--smoke runs their code on the CPU with tiny models)")
        return
    info = harness.machine()
    results, failed = run(args.names or list(BENCHES), args.smoke, args.batch_size)
    print(f"\n{len(results) - len(failed)} of {len(results)} benches' GPU rows ran"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    harness.finish(T_START, info, args.json, not failed, smoke=args.smoke, batch_size=args.batch_size, **results)


if __name__ == "__main__":
    main()
