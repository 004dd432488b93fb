"""Byte-pair encoding in one file: learning a byte-level BPE tokenizer from a text.

Paper: Sennrich, Haddow & Birch 2016, "Neural Machine Translation of Rare Words with Subword Units" (arXiv 1508.07909):
start from single symbols, count every adjacent pair of symbols over the words of the text (each word weighted by
how often it occurs), merge the most frequent pair into a new symbol, repeat until the vocabulary is big enough
(its Algorithm 1). GPT-2 (Radford et al. 2019) runs it on bytes instead of characters, so that any text can be
encoded with no unknown token, and splits the text into words with a regex first, so that no token crosses a word,
a run of digits or of punctuation; the word keeps its leading space, so no end-of-word symbol is needed.

What is here: the regex pre-tokenization (GPT-2's pattern, or Llama 3's with --pattern llama3); the training loop
twice, plainly (`train_plain`, the paper's loop as written) and fast (`train`, which updates the pair counts
only where a merge changed them and gives the same vocabulary); encoding with tiktoken on the learned ranks; and the
result as a Hugging Face tokenizer.json, which `tokenizers`, transformers' `PreTrainedTokenizerFast` and the other
scripts' `--init_from` / `load_tokenizer` read. What is not: BPE-dropout, SentencePiece's unigram model, training
on more text than fits in memory.

Ids: the 256 bytes are ids 0..255 by byte value (not in GPT-2's order of its printable characters); each merge that
makes a new token takes the next id, in merge order, so a token's id is its rank for tiktoken, which merges the
pair of lowest rank first; <|endoftext|> comes right after the merges, at vocab_size - 1 (so --vocab_size is at
least 257: the bytes and it). Ties between pairs of equal count go to the smallest pair of ids (first id, then
second), so a text always gives the same tokenizer. tokenizer.json's merges list, in id order, every split of each
token into two tokens (see hf_merges), so that `tokenizers` encodes as tiktoken does; the tests check it on held-out
text, with emoji, CJK and control bytes. Measured against `tokenizers`' own trainer: benchmarks/compare_bpe.py.

    python bpe.py --data input.txt --vocab_size 1024 --out tokenizer.json
    python bpe.py --data input.txt --vocab_size 1024 --pattern llama3 --encode "Hello, world!"
    python bpe.py --data input.txt --vocab_size 512 --plain     # the plain loop: the same merges, slowly
"""
import argparse
import collections
import heapq
import json
import sys
import time
from pathlib import Path

import regex
import tiktoken

# The regexes that split a text into words before BPE: GPT-2's (as `tokenizers`' ByteLevel step writes it), and
# Llama 3's (from its tokenizer.json), which also splits numbers into runs of at most three digits.
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PATTERNS = {"gpt2": GPT2_SPLIT, "llama3": LLAMA3_SPLIT}
SPECIAL = "<|endoftext|>"


class InputError(Exception):
    """Bad input from the user: the command line prints it as one line and exits with status 2."""


# ----------------------------------------------------------------------------------------- learning the merges

def count_words(text, pattern="gpt2"):
    """Counter of the text's words as bytes: the pieces of the regex split (pre-tokenization), UTF-8 encoded."""
    return collections.Counter(piece.encode() for piece in regex.findall(PATTERNS[pattern], text))


def merge(word, pair, new):
    """word (a tuple of ids) with each occurrence of pair, left to right, replaced by the id new."""
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(new)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def add_token(vocab, ids, token):
    """The id of token (bytes), appended to vocab if it is new. Two merges can spell one token ("ab"+"c" and
    "a"+"bc"): the second merges into the first's id, as `tokenizers`' trainer does (tiktoken knows a token by its
    bytes, one rank each)."""
    if token not in ids:
        ids[token] = len(vocab)
        vocab.append(token)
    return ids[token]


def train_plain(counts, n_vocab):
    """Algorithm 1 of the paper on bytes: (vocab, merges) for counts {word bytes: count}, merging until the vocabulary
    has n_vocab tokens or no word has two tokens left. vocab: the tokens' bytes by id; merges: (a, b, new id)."""
    words = {tuple(w): n for w, n in counts.items()}  # each word as a tuple of ids, the bytes first
    vocab = [bytes([b]) for b in range(256)]
    ids = {t: i for i, t in enumerate(vocab)}
    merges = []
    while len(vocab) < n_vocab:
        pairs = collections.Counter()  # every adjacent pair, over all words, weighted by the word's count
        for w, n in words.items():
            for pair in zip(w, w[1:]):
                pairs[pair] += n
        if not pairs:
            break
        a, b = min(pairs, key=lambda p: (-pairs[p], p))  # the most frequent pair; ties: the smallest ids
        new = add_token(vocab, ids, vocab[a] + vocab[b])
        merges.append((a, b, new))
        words = {merge(w, (a, b), new): n for w, n in words.items()}
    return vocab, merges


def train(counts, n_vocab):
    """The same as train_plain, fast. A merge changes only the words that hold its pair, so the pair counts are
    kept between merges and updated for those words alone (an index: pair -> words that hold it); the most
    frequent pair comes from a heap of (-count, pair), whose entries may be stale: a merge only lowers the counts of
    the pairs it breaks (those are fixed when they reach the top) and makes new pairs, which are pushed."""
    words, freq = [tuple(w) for w in counts], list(counts.values())
    pairs, where = collections.Counter(), collections.defaultdict(set)
    for i, w in enumerate(words):
        for pair in zip(w, w[1:]):
            pairs[pair] += freq[i]
            where[pair].add(i)
    heap = [(-n, p) for p, n in pairs.items()]
    heapq.heapify(heap)
    vocab = [bytes([b]) for b in range(256)]
    ids = {t: i for i, t in enumerate(vocab)}
    merges = []
    while len(vocab) < n_vocab and heap:
        n, pair = heapq.heappop(heap)
        if -n != pairs[pair]:  # stale: its count fell since it was pushed
            if pairs[pair] > 0:
                heapq.heappush(heap, (-pairs[pair], pair))
            continue
        new = add_token(vocab, ids, vocab[pair[0]] + vocab[pair[1]])
        merges.append((*pair, new))
        grown = set()
        for i in where.pop(pair):
            w, m = words[i], merge(words[i], pair, new)
            if len(m) == len(w):
                continue  # an earlier merge took the pair out of this word
            for p in zip(w, w[1:]):
                pairs[p] -= freq[i]
            for p in zip(m, m[1:]):
                pairs[p] += freq[i]
                where[p].add(i)
                if new in p:
                    grown.add(p)
            words[i] = m
        for p in grown:  # pairs with the new token: their counts can have grown
            heapq.heappush(heap, (-pairs[p], p))
    return vocab, merges


# ----------------------------------------------------------------------------------------- encoding, tokenizer.json

def encoding(vocab, pattern="gpt2", name="bpe"):
    """tiktoken Encoding of the learned vocabulary: the regex split, then in each word the adjacent pair whose bytes
    form the token of lowest rank (id) is merged first, until none does."""
    return tiktoken.Encoding(name, pat_str=PATTERNS[pattern], mergeable_ranks={t: i for i, t in enumerate(vocab)},
                             special_tokens={SPECIAL: len(vocab)})


def byte_encoder():
    """GPT-2's table from bytes to the printable characters that tokenizer.json writes tokens in: printable Latin-1
    bytes stand for themselves, the other 68 bytes for chr(256 + n), n counting them in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def hf_merges(vocab):
    """tokenizer.json's merges, in id order of the token they make: for each token every split of its bytes into two
    tokens (as transformers writes Llama 3's from tiktoken's ranks), not only the merge that made it. `tokenizers`
    merges only the pairs it lists; tiktoken merges any two tokens whose bytes form a token; so they agree."""
    ids = {t: i for i, t in enumerate(vocab)}
    merges = []
    for t in vocab[256:]:
        splits = [(ids[t[:k]], ids[t[k:]]) for k in range(1, len(t)) if t[:k] in ids and t[k:] in ids]
        merges.extend(sorted(splits))
    return merges


def tokenizer_json(vocab, pattern="gpt2"):
    """The Hugging Face tokenizer.json of a byte-level BPE, as `tokenizers` writes GPT-2's (--pattern gpt2) or Llama
    3's (llama3: a regex split, then bytes to characters), with <|endoftext|> an added token after the merges."""
    char = byte_encoder()
    spell = lambda t: "".join(char[b] for b in t)
    byte_level = dict(type="ByteLevel", add_prefix_space=False, trim_offsets=True, use_regex=pattern == "gpt2")
    split = dict(type="Split", pattern={"Regex": LLAMA3_SPLIT}, behavior="Isolated", invert=False)
    special = dict(id=len(vocab), content=SPECIAL, single_word=False, lstrip=False, rstrip=False, normalized=False,
                   special=True)
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [special], "normalizer": None,
        "pre_tokenizer": byte_level if pattern == "gpt2" else dict(type="Sequence", pretokenizers=[split, byte_level]),
        "post_processor": dict(type="ByteLevel", add_prefix_space=True, trim_offsets=False, use_regex=True),
        "decoder": dict(type="ByteLevel", add_prefix_space=True, trim_offsets=True, use_regex=True),
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
            "ignore_merges": True,  # a word that is a token is that token, as tiktoken does
            "vocab": {**{spell(t): i for i, t in enumerate(vocab)}, SPECIAL: len(vocab)},
            "merges": [[spell(vocab[a]), spell(vocab[b])] for a, b in hf_merges(vocab)],
        },
    }


# ----------------------------------------------------------------------------------------- command line

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0] + " (see the module docstring)")
    p.add_argument("--data", required=True, help="a UTF-8 text file to learn the merges from")
    p.add_argument("--vocab_size", type=int, default=1024, help="bytes + merges + <|endoftext|> (at least 257)")
    p.add_argument("--out", default="tokenizer.json", help="where to write the Hugging Face tokenizer.json")
    p.add_argument("--pattern", default="gpt2", choices=list(PATTERNS), help="the pre-tokenization regex")
    p.add_argument("--plain", action="store_true", help="train with the plain loop (slow), not the fast one")
    p.add_argument("--encode", help="a text to encode with the learned tokenizer, its ids and tokens printed")
    return p.parse_args(argv)


def read_data(data):
    """The text of --data, a non-empty UTF-8 file."""
    path = Path(data)
    if not path.is_file():
        raise InputError(f"--data '{data}': " + ("a directory, not a text file" if path.is_dir() else "no such file"))
    try:
        text = path.read_bytes().decode()
    except UnicodeError:
        raise InputError(f"--data '{data}' is not UTF-8 text") from None
    if not text:
        raise InputError(f"--data '{data}' is empty")
    return text


def run(args):
    if args.vocab_size < 257:
        raise InputError(f"--vocab_size must be at least 257 (256 bytes and {SPECIAL}), got {args.vocab_size}")
    out = Path(args.out)
    if out.is_dir() or not out.parent.is_dir():
        raise InputError(f"--out '{out}': " + ("a directory" if out.is_dir() else f"no directory {out.parent}"))
    text = read_data(args.data)
    t0 = time.perf_counter()
    counts = count_words(text, args.pattern)
    t1 = time.perf_counter()
    vocab, merges = (train_plain if args.plain else train)(counts, args.vocab_size - 1)
    t2 = time.perf_counter()
    print(f"{len(text):,} characters, {len(counts):,} distinct words ({t1 - t0:.2f} s); {len(merges):,} merges, "
          f"{len(vocab) - 256:,} new tokens ({t2 - t1:.2f} s)")
    if len(vocab) + 1 < args.vocab_size:
        print(f"note: no pair left to merge; the vocabulary has {len(vocab) + 1} tokens, not {args.vocab_size}")
    out.write_text(json.dumps(tokenizer_json(vocab, args.pattern), ensure_ascii=False, indent=1), encoding="utf-8")
    enc = encoding(vocab, args.pattern)
    print(f"wrote {out}: {len(text) / len(enc.encode_ordinary(text)):.2f} characters per token on --data")
    if args.encode is not None:
        ids = enc.encode(args.encode, allowed_special="all")
        print(ids)
        print([enc.decode_single_token_bytes(i).decode(errors="backslashreplace") for i in ids])  # a byte: \xf0


def main(argv=None):
    try:
        run(parse_args(argv))  # argv None: sys.argv
    except (InputError, OSError) as e:  # OSError: a file that cannot be read or written
        print(f"{Path(__file__).name}: error: {' '.join(str(e).split())}", file=sys.stderr)  # one line, always
        sys.exit(2)


if __name__ == "__main__":
    main()
