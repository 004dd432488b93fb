"""bpe.py: the plain trainer is the paper's loop and the fast one gives the same merges; the tokenizer.json it writes
encodes as our tiktoken encoder does under `tokenizers`, transformers and the scripts' own readers (llama2.hf_tokenizer,
gpt2.load_tokenizer), on text it was not trained on; decoding gives back any text; bad input is one line, exit 2."""
import json
import random
from pathlib import Path

import pytest

import bpe
from conftest import CORPUS, ROOT, offline_env, run_script

TRAIN, VOCAB = CORPUS[:60_000], 600
# Held-out text: other Python source, prose, and what the training text lacks: emoji (with a skin tone and a zero
# width joiner), CJK, Arabic digits, control bytes, runs of spaces, tabs and newlines, a lone carriage return.
HELD = (CORPUS[200_000:215_000] + "\nTo be, or not to be, that is the question: 1234567 -- 3.14159\n"
        + "emoji 😀👍🏽👩‍👩‍👧 CJK 中文字符、日本語のテキスト 한국어 ١٢٣ Ωμέγα \x00\x01\x07\x1b[0m\x7f"
        + "  a    b\t\t c\n\n\n    d \r\n\r e" + " " * 17 + "end")


@pytest.fixture(scope="module", params=["gpt2", "llama3"])
def learned(request, tmp_path_factory):
    """(pattern, vocab, path of its tokenizer.json) of a BPE learned on a slice of the Python library's source."""
    vocab, _ = bpe.train(bpe.count_words(TRAIN, request.param), VOCAB - 1)
    path = tmp_path_factory.mktemp(request.param) / "tokenizer.json"
    path.write_text(json.dumps(bpe.tokenizer_json(vocab, request.param), ensure_ascii=False))
    return request.param, vocab, path


def test_plain_is_the_papers_loop():
    """Sennrich et al.'s example words (their section 3.2, without the end-of-word symbol): 'es' and 'st' both occur
    9 times, and the tie goes to the smaller ids (e, s); then 'est' (9), then 'lo' and 'ow' tie at 7: 'lo', 'low'."""
    counts = {b"low": 5, b"lower": 2, b"newest": 6, b"widest": 3}
    vocab, merges = bpe.train_plain(counts, 260)
    assert vocab[256:] == [b"es", b"est", b"lo", b"low"]
    assert merges == [(ord("e"), ord("s"), 256), (256, ord("t"), 257), (ord("l"), ord("o"), 258), (258, ord("w"), 259)]


@pytest.mark.parametrize("pattern", ["gpt2", "llama3"])
def test_fast_equals_plain(pattern):
    """The same vocabulary and merges, ties included (the last merges are mostly ties of small counts)."""
    counts = bpe.count_words(CORPUS[:15_000], pattern)
    plain = bpe.train_plain(counts, 450)
    assert bpe.train(counts, 450) == plain
    assert len(plain[0]) == 450 and [m[2] for m in plain[1]] == list(range(256, 450))  # one new id per merge


def test_tokenizers_and_transformers_encode_as_tiktoken(learned):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast
    pattern, vocab, path = learned
    ours = bpe.encoding(vocab, pattern).encode_ordinary(HELD)
    assert len(ours) < 0.5 * len(HELD.encode())  # merges learned on other text do apply
    assert Tokenizer.from_file(str(path)).encode(HELD).ids == ours
    hf = PreTrainedTokenizerFast(tokenizer_file=str(path))
    assert hf.encode(HELD) == ours
    assert hf.convert_tokens_to_ids(bpe.SPECIAL) == VOCAB - 1 == len(vocab)
    assert Tokenizer.from_file(str(path)).encode("a<|endoftext|>b").ids[1] == VOCAB - 1


def test_the_scripts_read_it(learned):
    """llama2.hf_tokenizer (ids must grow along the merges) and gpt2.load_tokenizer, as `--init_from` reads a
    checkpoint's tokenizer.json, give our ids and decode them back."""
    import gpt2
    import llama2
    pattern, vocab, path = learned
    ours = bpe.encoding(vocab, pattern).encode_ordinary(HELD)
    for name, encode, decode, n_vocab in (llama2.hf_tokenizer(path), gpt2.load_tokenizer(str(path))):
        assert encode(HELD) == ours and decode(ours) == HELD and n_vocab == VOCAB


def test_decoding_gives_back_any_text(learned):
    """Random UTF-8 (any code point but surrogates, from all planes) through our encoder and `tokenizers`' decoder."""
    from tokenizers import Tokenizer
    pattern, vocab, path = learned
    enc, hf = bpe.encoding(vocab, pattern), Tokenizer.from_file(str(path))
    rng = random.Random(0)
    for _ in range(20):
        planes = lambda: [rng.randrange(0x80), rng.randrange(0xD800), rng.randrange(0xE000, 0x110000)]
        text = "".join(chr(rng.choice(planes())) for _ in range(200))
        ids = enc.encode_ordinary(text)
        assert enc.decode(ids) == text and hf.decode(ids) == text and hf.encode(text).ids == ids


def test_command_line(tmp_path):
    """A run writes tokenizer.json and encodes --encode's text; the plain loop writes the same file."""
    (tmp_path / "input.txt").write_text(CORPUS[:20_000])
    env = offline_env(tmp_path)
    args = [str(ROOT / "bpe.py"), "--data", "input.txt", "--vocab_size", "300", "--pattern", "llama3"]
    r = run_script(tmp_path, [*args, "--out", "fast.json", "--encode", "def main():<|endoftext|>"], env)
    assert r.returncode == 0, r.stderr
    assert "[" in r.stdout and ", 299]" in r.stdout and "'<|endoftext|>'" in r.stdout
    r = run_script(tmp_path, [*args, "--out", "plain.json", "--plain"], env)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "fast.json").read_text() == (tmp_path / "plain.json").read_text()
    assert len(json.loads((tmp_path / "fast.json").read_text())["model"]["vocab"]) == 300


@pytest.mark.parametrize("args, message", [
    (["--data", "empty.txt"], "is empty"),
    (["--data", "missing.txt"], "no such file"),
    (["--data", "binary.bin"], "not UTF-8"),
    (["--data", "input.txt", "--vocab_size", "256"], "at least 257"),
    (["--data", "input.txt", "--out", "no/such/dir/tokenizer.json"], "no directory"),
    (["--data", "input.txt", "--out", "."], "a directory"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "binary.bin").write_bytes(b"\xff\xfe\x00text")
    (tmp_path / "input.txt").write_text("hello world, hello bytes")
    r = run_script(tmp_path, [str(ROOT / "bpe.py"), *args], offline_env(tmp_path))
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("bpe.py: error:") and message in r.stderr, r.stderr


def test_unwritable_output_is_one_line_and_exit_2(tmp_path):
    """An OSError when the file is written (Linux's /dev/full: no space left, even for root)."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    (tmp_path / "input.txt").write_text("hello world, hello bytes")
    r = run_script(tmp_path, [str(ROOT / "bpe.py"), "--data", "input.txt", "--out", "/dev/full"], offline_env(tmp_path))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "No space left" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_train_any_file_with_its_tokenizer(tmp_path, monkeypatch, offline, capsys):
    """--tokenizer FILE: gpt2.py trains from scratch on bpe.py's tokens (any file name); the token cache is keyed by
    the file's content (the same path with other merges tokenizes again); the checkpoint records it, so resume and
    its sample use it; typed with resume, or a file that is not there: one line, exit 2."""
    import gpt2
    from conftest import script_home
    script_home(gpt2, tmp_path, monkeypatch)
    path = tmp_path / "mine.json"
    tiny = ["--device", "cpu", "--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--block_size", "16", "--batch_size",
            "2", "--eval_iters", "1", "--log_interval", "1", "--max_new_tokens", "4"]
    for text in (TRAIN, CORPUS[100_000:160_000]):  # the same size, other merges, the same file name
        path.write_text(json.dumps(bpe.tokenizer_json(bpe.train(bpe.count_words(text), 299)[0], "gpt2")))
        gpt2.main([*tiny, "--tokenizer", str(path), "--max_iters", "2"])
        out = capsys.readouterr().out
        assert f"tokenizer {path}" in out and f"tokenized shakespeare with {path}" in out  # the second time too
        meta = json.loads((tmp_path / "data" / "shakespeare" / "meta.json").read_text())
        assert meta["vocab_size"] == 300 and meta["tokenizer"] != str(path)  # a hash of the content
    gpt2.main([*tiny, "--init_from", "resume", "--max_iters", "3"])
    out = capsys.readouterr().out
    assert f"tokenizer {path}" in out and "tokenized" not in out and "iter 3 |" in out
    for bad, says in ((["--init_from", "resume", "--tokenizer", str(path)], "from scratch"),
                      (["--tokenizer", str(tmp_path / "none.json")], "no such tokenizer.json")):
        with pytest.raises(SystemExit) as e:
            gpt2.main([*tiny, *bad])
        assert e.value.code == 2 and says in capsys.readouterr().err
