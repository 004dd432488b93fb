"""bpe.py against `tokenizers`' BpeTrainer and GPT-2's own BPE: characters per token on held-out text, and the time
to learn the merges. Each text is cut 90/10: the tokenizers learn on the first 90% and are measured on the last 10%.

    python benchmarks/compare_bpe.py                                  # tiny-shakespeare and the Python library's source
    python benchmarks/compare_bpe.py --shakespeare input.txt --vocab 512 1024 4096 16384
"""
import argparse
import os
import sys
import time
from pathlib import Path

import tiktoken

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bpe  # noqa: E402


def texts(shakespeare):
    """{name: text}: tiny-shakespeare when the file is there, and the Python library's source as the scripts'
    read_text has it offline (its .py files concatenated in sorted order, the first 1,500,000 characters)."""
    stdlib = "".join(p.read_text(errors="ignore") for p in sorted(Path(os.__file__).parent.glob("*.py")))[:1_500_000]
    out = {"tinyshakespeare": Path(shakespeare).read_text()} if Path(shakespeare).is_file() else {}
    return {**out, "python_stdlib": stdlib}


def hf_bpe(train, vocab_size):
    """`tokenizers`' BpeTrainer with the ByteLevel pre-tokenizer (GPT-2's regex), the same vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[bpe.SPECIAL], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([train], trainer)
    return tok


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shakespeare", default="data/shakespeare/input.txt", help="tiny-shakespeare's input.txt")
    p.add_argument("--vocab", type=int, nargs="+", default=[512, 1024, 4096, 16384])
    args = p.parse_args()
    gpt2 = tiktoken.get_encoding("gpt2")
    print(f"load average {os.getloadavg()[0]:.1f}, {os.cpu_count()} CPUs")
    print("| text | vocab | bpe.py chars/token | tokenizers chars/token | GPT-2 chars/token | bpe.py: s (CPU s) | "
          "tokenizers: s (CPU s) |\n|---|---|---|---|---|---|---|")
    for name, text in texts(args.shakespeare).items():
        cut = int(0.9 * len(text))
        train, test = text[:cut], text[cut:]
        for v in args.vocab:
            t0, c0 = time.perf_counter(), time.process_time()  # wall time, and CPU time of all threads
            vocab, _ = bpe.train(bpe.count_words(train), v - 1)
            t1, c1 = time.perf_counter(), time.process_time()
            hf = hf_bpe(train, v)
            t2, c2 = time.perf_counter(), time.process_time()
            ours = len(test) / len(bpe.encoding(vocab).encode_ordinary(test))
            theirs = len(test) / len(hf.encode(test).ids)
            ref = len(test) / len(gpt2.encode_ordinary(test))
            row = (f"| {name} | {v:,} | {ours:.3f} | {theirs:.3f} | {ref:.3f} | {t1 - t0:.2f} ({c1 - c0:.2f}) "
                   f"| {t2 - t1:.2f} ({c2 - c1:.2f}) |")
            print(row, flush=True)


if __name__ == "__main__":
    main()
