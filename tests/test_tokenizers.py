"""A checkpoint's tokenizer.json run without the `tokenizers` package (the files section's hf_tokenizer): the same ids
as `tokenizers`' encode(text, add_special_tokens=False) and the same text as its decode, for the layouts of the
published checkpoints: SentencePiece-style BPE with byte fallback (Llama 2's normalizer; Mistral v0.3's and
Mixtral's Metaspace, both prepend schemes, split or not) and byte-level BPE behind several Split steps
(DeepSeek-V3's); a damaged file is one line of bad input; the command line samples text with them."""
import json

import pytest
import torch

from conftest import CORPUS, script_home
import llama2

# Text unlike the training text: byte fallback (emoji, CJK, control bytes, accents), runs of spaces, newlines
UNSEEN = ("  leading spaces, trailing spaces   \n\n\tTabs\tand\r\nCRLF; naïve café, ünïcödé — 🙂🚀 日本語のテキスト "
          "中文 123456789 x\x00y\x07z\x1b[0m   many     spaces    \n def f(x):\n        return x ** 2  # ok\n  ")
DEEPSEEK_SPLITS = [r"\p{N}{1,3}", "[一-龥\u3040-ゟ゠-ヿ]+",
                   r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+"
                   r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"]


def sentencepiece_bpe(path, layout, bytes_kept=range(256)):
    """A SentencePiece-style BPE (byte fallback, '▁' for spaces) trained on CORPUS with `tokenizers`, saved in the
    tokenizer.json layout of Llama 2 ("llama2": normalizer Prepend + Replace, no pre_tokenizer) or of Mistral v0.3
    and Mixtral (("first" or "always", split): no normalizer, a Metaspace pre_tokenizer); vocabulary: <unk>, <s>,
    </s>, the <0xNN> tokens of bytes_kept, then the trained pieces."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    if layout == "llama2":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=layout[0], split=layout[1])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=700, show_progress=False, limit_alphabet=80)
    tok.train_from_iterator(CORPUS[:60_000].splitlines(), trainer)
    spec = json.loads(tok.to_str())
    trained = spec["model"]["vocab"]
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in bytes_kept])}
    for t in sorted(trained, key=trained.get):
        vocab.setdefault(t, len(vocab))
    spec["model"]["vocab"] = vocab
    spec["added_tokens"] = [dict(id=i, content=t, single_word=False, lstrip=False, rstrip=False, normalized=False,
                                 special=True) for i, t in enumerate(["<unk>", "<s>", "</s>"])]
    path.write_text(json.dumps(spec))
    return Tokenizer.from_file(str(path))


def deepseek_bpe(path):
    """A byte-level BPE behind DeepSeek-V3's pre_tokenizer (three regex Splits, isolated, then ByteLevel without
    its regex) and its empty normalizer Sequence, trained on CORPUS with `tokenizers`."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence([])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in DEEPSEEK_SPLITS]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([CORPUS[:100_000]], trainer)
    tok.save(str(path))
    return tok


def check_same_as_tokenizers(ref, path, texts):
    name, encode, decode, vocab = llama2.hf_tokenizer(path)
    assert name == str(path) and vocab == ref.get_vocab_size()
    for text in texts:
        ids = encode(text)
        assert ids == ref.encode(text, add_special_tokens=False).ids, repr(text[:80])
        assert decode(ids) == ref.decode(ids, skip_special_tokens=False), repr(text[:80])  # specials shown
    return encode, decode


SMALL = ["", " ", "  ", "a", " a", "a ", "\n", " \n ", "🙂", " 🙂 x", "x\x00", "日本"]


@pytest.mark.parametrize("layout", ["llama2", ("first", False), ("always", False), ("first", True),
                                    ("always", True)])
def test_sentencepiece_layouts_match_tokenizers(tmp_path, layout):
    ref = sentencepiece_bpe(tmp_path / "tokenizer.json", layout)
    encode, decode = check_same_as_tokenizers(ref, tmp_path / "tokenizer.json",
                                              [UNSEEN, CORPUS[-30_000:], CORPUS[-3000:] + UNSEEN * 3, *SMALL])
    ids = encode(UNSEEN)
    assert {f"<0x{b:02X}>" for b in "🙂".encode()} <= {ref.id_to_token(i) for i in ids}  # byte fallback used
    assert decode(ids) == (UNSEEN if layout == "llama2" else UNSEEN[1:])  # Metaspace adds no '▁' to a leading space
    assert len(encode(CORPUS[-30_000:])) < 0.75 * 30_000  # merges at work


def test_unk_token_and_fuse_unk_without_some_bytes(tmp_path):
    """A vocabulary without the <0xNN> tokens of 4-byte UTF-8 (emoji): those characters are <unk>, runs fused."""
    ref = sentencepiece_bpe(tmp_path / "tokenizer.json", "llama2", bytes_kept=range(0xF0))
    encode, _ = check_same_as_tokenizers(ref, tmp_path / "tokenizer.json", [UNSEEN, "a🙂🚀b 🙂", *SMALL])
    assert encode("a🙂🚀b").count(0) == 1


def test_ignore_merges(tmp_path):
    """ignore_merges: a piece that is a token is that token, whatever the merges would make of it."""
    from tokenizers import Tokenizer
    sentencepiece_bpe(tmp_path / "t.json", ("always", True))
    spec = json.loads((tmp_path / "t.json").read_text())
    spec["model"]["ignore_merges"] = True
    spec["model"]["vocab"]["▁def▁f(x):"] = len(spec["model"]["vocab"])  # a token no merge makes
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    ref = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    check_same_as_tokenizers(ref, tmp_path / "tokenizer.json", [UNSEEN, CORPUS[-5000:], *SMALL])


def test_deepseek_v3_layout_matches_tokenizers(tmp_path):
    ref = deepseek_bpe(tmp_path / "tokenizer.json")
    encode, decode = check_same_as_tokenizers(ref, tmp_path / "tokenizer.json",
                                              [UNSEEN, CORPUS[-30_000:], "x 12345 日本語のテキスト", *SMALL])
    assert decode(encode(UNSEEN)) == UNSEEN and len(encode(CORPUS[-30_000:])) < 0.6 * 30_000
    assert decode([0] + encode("ab")) == "<｜begin▁of▁sentence｜>ab"  # added tokens decode, as the specials they are


@pytest.mark.parametrize("damage", ["not json", "[1, 2]", '{"model": {"type": "BPE"}}',
                                    '{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a b"]}}'])
def test_damaged_tokenizer_json_is_bad_input(tmp_path, damage):
    (tmp_path / "tokenizer.json").write_text(damage)
    with pytest.raises(llama2.InputError, match=r"tokenizer.json is damaged \("):
        llama2.hf_tokenizer(tmp_path / "tokenizer.json")


def test_other_kinds_give_none(tmp_path):
    """Well-formed tokenizers of a kind this file does not run: None (token ids for --sample_only)."""
    assert llama2.hf_tokenizer(tmp_path / "missing.json") is None
    unigram = {"model": {"type": "Unigram", "vocab": [["▁a", -1.0]]}, "normalizer": None, "pre_tokenizer": None}
    (tmp_path / "t.json").write_text(json.dumps(unigram))
    assert llama2.hf_tokenizer(tmp_path / "t.json") is None
    sentencepiece_bpe(tmp_path / "t.json", "llama2")
    spec = json.loads((tmp_path / "t.json").read_text())
    for key, value in [("normalizer", {"type": "Lowercase"}), ("decoder", {"type": "WordPiece", "prefix": "##"})]:
        (tmp_path / "u.json").write_text(json.dumps({**spec, key: value}))
        assert llama2.hf_tokenizer(tmp_path / "u.json") is None


def test_nfkc_and_merges_out_of_id_order_run_in_python(tmp_path):
    """Byte-level BPEs tiktoken cannot run exactly: an NFKC normalizer; ids that do not grow along the merges."""
    from tokenizers import Tokenizer
    from conftest import train_tokenizer
    ref = train_tokenizer(tmp_path / "tokenizer.json", "gpt2", normalizer="NFKC")
    check_same_as_tokenizers(ref, tmp_path / "tokenizer.json", [UNSEEN + " ﬁne ① ｆｕｌｌ", CORPUS[-5000:], *SMALL])
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    last, first = spec["model"]["merges"][-1], spec["model"]["merges"][0]
    a, b = [("".join(m.split(" ")) if isinstance(m, str) else "".join(m)) for m in (first, last)]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # the first merge's token gets the last id
    (tmp_path / "swapped.json").write_text(json.dumps(spec))
    check_same_as_tokenizers(Tokenizer.from_file(str(tmp_path / "swapped.json")), tmp_path / "swapped.json",
                             [UNSEEN, CORPUS[-5000:], *SMALL])


# ------------------------------------------------------------------------------- the command line

def tiny_llama2_checkpoint(path):
    """A tiny random Llama written by llama2.save_pretrained in bf16 (no dtype in config.json: the tensors say it)
    with a Llama 2 style tokenizer.json; <s> = 1 and </s> = 2, as Llama 2's."""
    path.mkdir()
    ref = sentencepiece_bpe(path / "tokenizer.json", "llama2")
    torch.manual_seed(0)
    model = llama2.Llama(llama2.Config(vocab_size=ref.get_vocab_size(), block_size=64, n_layer=1, n_head=2,
                                       n_kv_head=1, n_embd=32, bos_token_id=1))
    llama2.save_pretrained(model.to(torch.bfloat16), path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "eos_token_id": 2}))
    return ref, model


def samples(out):
    return [s.split("\n---")[0] for s in out.split(" ---\n")[1:]]


def test_cli_samples_text_in_bf16_and_stops_at_eos(tmp_path, monkeypatch, offline, capsys):
    script_home(llama2, tmp_path, monkeypatch)
    ref, model = tiny_llama2_checkpoint(tmp_path / "tiny-llama2")
    sample = ["--init_from", str(tmp_path / "tiny-llama2"), "--sample_only", "--device", "cpu", "--max_new_tokens", "8",
              "--num_samples", "2", "--prompt", "def", "--block_size", "32"]
    llama2.main(sample)
    out = capsys.readouterr().out
    first = out.splitlines()[0]
    size = sum(p.numel() for p in model.parameters()) * 2
    assert "| bfloat16 |" in first and f"tokenizer {tmp_path / 'tiny-llama2' / 'tokenizer.json'}" in first
    assert f"weights {size / 1e6:.2f} MB bf16" in first  # kept in bf16 on a CPU, and sampled so
    texts = samples(out)
    assert len(texts) == 2 and texts[0] != texts[1] and all(t.startswith("def") for t in texts)
    assert "[" not in "".join(texts) and "<0x" not in "".join(texts)  # text, not ids or byte tokens
    _, encode, decode, _ = llama2.pretrained_tokenizer(tmp_path / "tiny-llama2", sample_only=True)
    ids = encode("def f(x):")  # the printed text ends at the first </s> (2, config.json's eos_token_id)
    assert decode(ids + [2] + encode(" more")) == decode(ids) == ref.decode(ids) == "def f(x):"
    config = json.loads((tmp_path / "tiny-llama2" / "config.json").read_text())
    (tmp_path / "tiny-llama2" / "config.json").write_text(json.dumps({**config, "torch_dtype": "float32"}))
    llama2.main(sample)  # config.json's dtype comes first
    assert "| float32 |" in capsys.readouterr().out.splitlines()[0]
    llama2.main(sample + ["--dtype", "float32"])  # and --dtype before it
    assert f"weights {size * 2 / 1e6:.2f} MB fp32" in capsys.readouterr().out.splitlines()[0]


def test_cli_damaged_tokenizer_json_is_one_line(tmp_path, monkeypatch, offline, capsys):
    script_home(llama2, tmp_path, monkeypatch)
    tiny_llama2_checkpoint(tmp_path / "tiny-llama2")
    (tmp_path / "tiny-llama2" / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": {"a": 0}}}')
    with pytest.raises(SystemExit) as e:
        llama2.main(["--init_from", str(tmp_path / "tiny-llama2"), "--sample_only", "--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "tokenizer.json is damaged (KeyError: 'merges')" in err
