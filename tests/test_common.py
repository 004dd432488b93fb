"""Functions every script carries its own copy of (CONVENTIONS.md: files share no code), tested once here
over each script present: sampling filters, the safetensors reader, downloads, data preparation, the LR schedule."""
import argparse
import importlib
import json
import math

import numpy as np
import pytest
import requests
import safetensors.torch
import torch

from conftest import SCRIPTS, max_diff


@pytest.fixture(params=SCRIPTS)
def m(request):
    return importlib.import_module(request.param)


@pytest.fixture
def server(http_server, m, monkeypatch, tmp_path):
    monkeypatch.setattr(m, "HF_ENDPOINT", http_server.url)
    monkeypatch.setattr(m, "CACHE_DIR", tmp_path / "cache")
    return http_server


# -------------------------------------------------------------------------------------- sampling

def test_sample_next_greedy_limits(m):
    torch.manual_seed(0)
    logits = torch.randn(64, 500) * 3
    best = logits.argmax(-1, keepdim=True)
    assert torch.equal(m.sample_next(logits, temperature=0.0), best)
    assert torch.equal(m.sample_next(logits, temperature=100.0, top_k=1), best)
    assert torch.equal(m.sample_next(logits, temperature=100.0, top_p=1e-6), best)
    assert not torch.equal(m.sample_next(logits, temperature=100.0), best)  # plain sampling is not argmax


PROBS = torch.tensor([0.05, 0.5, 0.15, 0.3, 0.0])  # top-2 and the 0.6 nucleus are both {1, 3}


@pytest.mark.parametrize("kwargs, expected", [
    (dict(), PROBS),
    (dict(top_k=2), PROBS * torch.tensor([0, 1, 0, 1, 0])),
    (dict(top_p=0.6), PROBS * torch.tensor([0, 1, 0, 1, 0])),
    (dict(top_k=3, top_p=0.6), PROBS * torch.tensor([0, 1, 0, 1, 0])),
    (dict(temperature=0.5), PROBS ** 2),
    (dict(temperature=0.5, top_k=3), PROBS ** 2 * torch.tensor([0, 1, 1, 1, 0])),
])
def test_sample_next_distribution(m, kwargs, expected):
    """Sampled frequencies follow softmax(logits / T) renormalised over the kept tokens; others never appear."""
    n = 20000
    logits = PROBS.clamp_min(1e-12).log().expand(n, 5)
    torch.manual_seed(0)
    out = m.sample_next(logits, **kwargs)
    assert out.shape == (n, 1)
    freq = torch.bincount(out.flatten(), minlength=5) / n
    expected = expected / expected.sum()
    assert torch.equal(freq > 0, expected > 0)
    assert max_diff(freq, expected) < 0.015



# ---------------------------------------------------------------------------- safetensors reader

def test_read_safetensors_matches_package(m, tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 5, generator=g),
        "f16": torch.randn(7, generator=g).half(),
        "bf16": torch.randn(2, 3, 4, generator=g).bfloat16(),
        "f64": torch.randn(3, generator=g).double(),
        "i64": torch.randint(-2**40, 2**40, (4, 2), generator=g),
        "i32": torch.randint(-2**30, 2**30, (5,), generator=g, dtype=torch.int32),
        "i16": torch.randint(-2**15, 2**15, (3,), generator=g, dtype=torch.int16),
        "i8": torch.randint(-128, 128, (9,), generator=g, dtype=torch.int8),
        "u8": torch.randint(0, 256, (2, 2, 2), generator=g, dtype=torch.uint8),
        "bool": torch.rand(6, generator=g) > 0.5,
        "f8": torch.randn(4, 4, generator=g).to(torch.float8_e4m3fn),  # DeepSeek-V3's release
        "scalar": torch.tensor(3.25),
        "empty": torch.zeros(0, 4),
    }
    path = tmp_path / "t.safetensors"
    safetensors.torch.save_file(tensors, str(path), metadata={"format": "pt"})
    got = m.read_safetensors(path)
    assert set(got) == set(tensors)
    for name, t in tensors.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        assert torch.equal(got[name].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), name  # bit for bit


def test_fp8_weights_without_their_scales_are_refused(m):
    """Only mla_moe.py applies an FP8 release's block scales (before load_weights): elsewhere FP8 is bad input,
    not weights silently cast without their scales."""
    model = torch.nn.Linear(4, 4)
    with pytest.raises(m.InputError, match="FP8"):
        m.load_weights(model, dict(weight=torch.ones(4, 4).to(torch.float8_e4m3fn), bias=torch.zeros(4)), "x", "cpu",
                       torch.float32)



# ------------------------------------------------------------------------------------- downloads

def test_download(m, server, tmp_path):
    payload = np.random.default_rng(0).integers(0, 256, 100_000, dtype=np.uint8).tobytes()
    (server.root / "f.bin").write_bytes(payload)
    dest = tmp_path / "out" / "f.bin"
    assert m.download(f"{server.url}/f.bin", dest) == dest
    assert dest.read_bytes() == payload and not server.ranges
    assert not dest.with_name("f.bin.part").exists()
    with pytest.raises(requests.HTTPError):
        m.download(f"{server.url}/missing.bin", tmp_path / "out" / "missing.bin")
    assert not (tmp_path / "out" / "missing.bin").exists()


def test_download_resumes(m, server, tmp_path):
    payload = np.random.default_rng(1).integers(0, 256, 3_000_000, dtype=np.uint8).tobytes()  # > one 1 MB chunk
    (server.root / "big.bin").write_bytes(payload)
    server.cut_once.add("big.bin")
    dest = tmp_path / "big.bin"
    part = tmp_path / "big.bin.part"
    with pytest.raises(requests.RequestException):
        m.download(f"{server.url}/big.bin", dest)
    assert not dest.exists()
    have = part.read_bytes()
    assert 0 < len(have) < len(payload) and payload.startswith(have)
    m.download(f"{server.url}/big.bin", dest)
    assert server.ranges == [("big.bin", f"bytes={len(have)}-")]
    assert dest.read_bytes() == payload and not part.exists()
    # a .part that is already whole: the server answers 416 and the file is just renamed
    dest.rename(part)
    m.download(f"{server.url}/big.bin", dest)
    assert dest.read_bytes() == payload and server.ranges[-1] == ("big.bin", f"bytes={len(payload)}-")



def test_hf_token_goes_to_the_hub_only(m, server, tmp_path, monkeypatch):
    """HF_TOKEN (for gated repos) is sent with requests to HF_ENDPOINT, and to no other host (tiny-shakespeare's)."""
    (server.root / "f.bin").write_bytes(b"x" * 100)
    monkeypatch.setenv("HF_TOKEN", "secret")
    m.download(f"{server.url}/f.bin", tmp_path / "a.bin")  # the server stands for the hub here
    m.download(server.url.replace("127.0.0.1", "localhost") + "/f.bin", tmp_path / "b.bin")  # another host
    assert server.tokens == ["Bearer secret", None]



# ------------------------------------------------------------------------------------------- data

def test_prepare_data_and_get_batch(m, tmp_path, monkeypatch, capsys):
    """A text tokenized once into llm.c-style token files (a 256-int32 header: magic, version, count), 90/10; the
    cache is made again for another tokenizer; get_batch draws windows of it, y being x shifted by one."""
    monkeypatch.setattr(m, "HERE", tmp_path)
    text = "".join(f"line {i}: naïve café — ünïcödé {i * i}\n" for i in range(200))
    src = tmp_path / "tiny.txt"
    src.write_text(text, encoding="utf-8")

    def load(d):
        meta = json.loads((d / "meta.json").read_text())
        train, val = (np.fromfile(d / f"{s}.bin", dtype=np.int32, count=256) for s in ("train", "val"))
        assert train[0] == val[0] == 20240520 and train[1] == val[1] == 1  # GPT-2-sized ids: uint16
        train, val = (np.fromfile(d / f"{s}.bin", dtype=np.uint16, offset=1024) for s in ("train", "val"))
        return meta, train, val

    files = m.prepare_data(str(src), m.load_tokenizer("bytes"))
    d = tmp_path / "data" / "tiny"
    meta, train, val = load(d)
    n = len(text.encode("utf-8"))
    assert meta["tokenizer"] == "bytes" and meta["vocab_size"] == 256
    assert (len(train), len(val)) == (len(files["train"][0]), len(files["val"][0])) == (int(0.9 * n), n - int(0.9 * n))
    assert bytes(np.concatenate([train, val]).astype(np.uint8)) == text.encode("utf-8")
    assert "tokenized" in capsys.readouterr().out
    m.prepare_data(str(src), m.load_tokenizer("bytes"))  # cached: not tokenized again
    assert "tokenized" not in capsys.readouterr().out

    torch.manual_seed(0)
    x, y = m.get_batch(files["train"], 8, 16, torch.device("cpu"))
    assert x.shape == y.shape == (8, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    windows = np.lib.stride_tricks.sliding_window_view(train, 17)
    for row in torch.cat([x, y[:, -1:]], 1).numpy():
        assert (windows == row).all(1).any()

    try:
        tok = m.load_tokenizer("gpt2")
    except m.InputError:
        pytest.skip("tiktoken's gpt2 files are not available")
    m.prepare_data(str(src), tok)
    meta, train, val = load(d)
    assert meta["tokenizer"] == "gpt2" and meta["vocab_size"] == 50257
    assert np.concatenate([train, val]).tolist() == tok[1](text)
    assert tok[2](np.concatenate([train, val]).tolist()) == text
    assert len(train) == int(0.9 * (len(train) + len(val)))
    m.prepare_data(str(src), m.load_tokenizer("bytes"))  # and back again
    meta, train, val = load(d)
    assert meta["tokenizer"] == "bytes" and bytes(np.concatenate([train, val]).astype(np.uint8)) == text.encode()


def test_damaged_token_files_are_bad_input(m, tmp_path, monkeypatch):
    """A token file cut short, or with another header, is one line of bad input, never a traceback or a misread."""
    monkeypatch.setattr(m, "HERE", tmp_path)
    (tmp_path / "t.txt").write_text("abcdefghij" * 100)
    m.prepare_data(str(tmp_path / "t.txt"), m.load_tokenizer("bytes"))
    f = tmp_path / "data" / "t" / "train.bin"
    good = f.read_bytes()
    for bad in (good[:-1], good[:100], b"", b"\0" * 4 + good[4:]):
        f.write_bytes(bad)
        with pytest.raises(m.InputError, match="not a whole token file"):
            m.read_tokens(f)


# ---------------------------------------------------------------------------------------- schedule

def test_lr_schedule(m):
    # two_stage: bitnet.py's option (off here; its own tests cover it), an unused attribute elsewhere
    args = argparse.Namespace(lr=1.0, min_lr=0.1, warmup_iters=10, lr_decay_iters=None, max_iters=110, two_stage=False)
    assert m.lr_at(0, args) == pytest.approx(0.1)
    assert m.lr_at(4, args) == pytest.approx(0.5)
    assert m.lr_at(9, args) == pytest.approx(1.0)
    assert m.lr_at(10, args) == pytest.approx(1.0)
    assert m.lr_at(60, args) == pytest.approx(0.55)
    assert m.lr_at(35, args) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))
    assert m.lr_at(110, args) == pytest.approx(0.1) and m.lr_at(500, args) == pytest.approx(0.1)
    lrs = [m.lr_at(i, args) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # decays monotonically
    args.lr_decay_iters = 60
    assert m.lr_at(35, args) == pytest.approx(0.55) and m.lr_at(60, args) == pytest.approx(0.1)
