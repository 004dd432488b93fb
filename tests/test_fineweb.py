"""--data fineweb10B / fineweb-edu10B against a local server standing for the hub ($HF_ENDPOINT): the shards (llm.c
token files of GPT-2's tokens) downloaded once, resumed, checked, refused for another tokenizer, and fetched by rank 0
alone under DDP. The download and header code is one text in every file (test_harness.py), so gpt2.py stands for all.
Shards here are synthetic: a header and 20,000 random tokens."""
import importlib
import shutil
import time
import types

import numpy as np
import pytest
import torch

from conftest import copy_script, needs_gpt2_bpe, offline_env, run_script, script_home, serve_hub

REPO = "datasets/kjj0/fineweb10B-gpt2/resolve/main"
VAL, TRAIN1, TRAIN2 = (f"{REPO}/fineweb_{f}.bin" for f in ("val_000000", "train_000001", "train_000002"))
TINY = ["--device", "cpu", "--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--block_size", "16", "--batch_size",
        "2", "--max_iters", "2", "--eval_iters", "1", "--eval_interval", "2", "--max_new_tokens", "2"]


def shard(path, tokens, magic=20240520, count=None):
    """An llm.c token file: 256 int32 (magic, version 1, token count), then the tokens as uint16."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = np.array([magic, 1, len(tokens) if count is None else count] + [0] * 253, np.int32)
    path.write_bytes(header.tobytes() + np.asarray(tokens, np.uint16).tobytes())
    return path


def tokens(seed, low=0, high=50257, n=20_000):
    return np.random.default_rng(seed).integers(low, high, n)


@pytest.fixture
def hub(http_server, tmp_path, monkeypatch):
    """gpt2.py run from tmp_path/home, its hub at the server, which holds a validation and two training shards."""
    needs_gpt2_bpe()
    m = importlib.import_module("gpt2")
    serve_hub(m, http_server, monkeypatch, tmp_path / "cache")
    script_home(m, tmp_path / "home", monkeypatch)
    for i, rel in enumerate((VAL, TRAIN1, TRAIN2)):
        shard(http_server.root / rel, tokens(i))
    return m, http_server, tmp_path / "home" / "data" / "fineweb10B"


def expect_error(m, argv, capsys):
    """main(argv) exits 2 with one line of error on stderr, no traceback, nothing else but downloads' progress lines
    ("\rname: x / y MB", ended also when a transfer breaks); that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        m.main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.split("\n") if line]
    assert e.value.code == 2 and lines[-1].startswith(f"{m.__name__}.py: error: ") and "Traceback" not in err, err
    assert all(line.startswith("\r") and line.endswith("MB") for line in lines[:-1]), err
    return lines[-1]


def test_train_on_fineweb_downloads_once(hub, capsys):
    """A short run downloads the validation shard and the one training shard it needs into data/fineweb10B/ (whole,
    no .part left), trains on them; a second run downloads nothing."""
    m, server, data = hub
    m.main([*TINY, "--data", "fineweb10B"])
    out = capsys.readouterr().out
    assert "data fineweb10B" in out.splitlines()[0] and "done | 2 iters" in out
    assert server.requests == [VAL, TRAIN1]
    assert sorted(p.name for p in data.iterdir()) == ["fineweb_train_000001.bin", "fineweb_val_000000.bin"]
    for rel in (VAL, TRAIN1):
        assert (data / rel.rsplit("/", 1)[1]).read_bytes() == (server.root / rel).read_bytes()
    assert not (data.parent / "shakespeare" / "meta.json").exists()  # nothing else was tokenized
    m.main([*TINY, "--data", "fineweb10B"])
    assert "done | 2 iters" in capsys.readouterr().out
    assert server.requests == [VAL, TRAIN1]


def test_fineweb_edu_names(hub):
    """fineweb-edu10B comes from its own repo, files named finewebedu_*, into data/fineweb-edu10B/."""
    m, server, _ = hub
    edu = "datasets/kjj0/finewebedu10B-gpt2/resolve/main/finewebedu"
    for i, f in enumerate(("val_000000", "train_000001")):
        shard(server.root / f"{edu}_{f}.bin", tokens(10 + i))
    files = m.prepare_data("fineweb-edu10B", m.load_tokenizer("gpt2"))
    assert server.requests == [f"{edu}_val_000000.bin", f"{edu}_train_000001.bin"]
    assert files["val"][0].tolist() == tokens(10).tolist() and files["train"][0].tolist() == tokens(11).tolist()
    home = m.HERE / "data" / "fineweb-edu10B"
    assert sorted(p.name for p in home.iterdir()) == ["finewebedu_train_000001.bin", "finewebedu_val_000000.bin"]


def test_shard_count_and_batches_from_each(hub):
    """--data_shards 2 fetches two training shards, and training batches are windows of either, never mixed; without
    the flag a run gets as many 100M-token shards as its max_iters x tokens/step need."""
    m, server, data = hub
    shard(server.root / TRAIN1, tokens(1, 0, 1000))  # the two shards' tokens told apart by their range
    shard(server.root / TRAIN2, tokens(2, 1000, 2000))
    env = types.SimpleNamespace(master=True, world=1, tokens=2 * 16, device=torch.device("cpu"))
    args = m.parse_args([*TINY, "--data", "fineweb10B", "--data_shards", "2"])[0]
    batch = m.text_batches(args, m.load_tokenizer("gpt2"), env)
    assert server.requests == [VAL, TRAIN1, TRAIN2]
    torch.manual_seed(0)
    seen = set()
    for _ in range(40):
        x, y = batch("train")
        assert x.shape == (2, 16) and torch.equal(x[:, 1:], y[:, :-1])
        high = bool(x.min() >= 1000)
        assert high or x.max() < 1000  # a batch is windows of one shard
        seen.add(high)
    assert seen == {False, True}
    x, _ = batch("val")
    windows = np.lib.stride_tricks.sliding_window_view(tokens(0), 16)
    assert all((windows == row).all(1).any() for row in x.numpy())

    shutil.rmtree(data)
    server.requests.clear()  # 3,125,001 steps of 32 tokens: just over 1e8 tokens, so two shards
    args = m.parse_args([*TINY, "--data", "fineweb10B", "--max_iters", "3125001"])[0]
    m.text_batches(args, m.load_tokenizer("gpt2"), env)
    assert server.requests == [VAL, TRAIN1, TRAIN2]


def test_cut_download_resumes(hub, capsys):
    """A shard whose download breaks off is one line of bad input, its bytes kept in a .part file; the next run asks
    for the rest (Range) and ends with the whole file."""
    m, server, data = hub
    shard(server.root / TRAIN1, tokens(1, n=1_500_000))  # 3 MB: the cut comes after many 64 KB chunks
    server.cut_once.add(TRAIN1)
    assert "cannot fetch --data fineweb10B" in expect_error(m, [*TINY, "--data", "fineweb10B"], capsys)
    part = data / "fineweb_train_000001.bin.part"
    have = part.stat().st_size
    assert 0 < have < (server.root / TRAIN1).stat().st_size and not (data / "fineweb_train_000001.bin").exists()
    files = m.prepare_data("fineweb10B", m.load_tokenizer("gpt2"))
    assert server.ranges == [(TRAIN1, f"bytes={have}-")] and not part.exists()
    assert (data / "fineweb_train_000001.bin").read_bytes() == (server.root / TRAIN1).read_bytes()
    assert files["train"][0].tolist() == tokens(1, n=1_500_000).tolist()


@pytest.mark.parametrize("damage", ["magic", "short"])
def test_damaged_shard_is_one_line(hub, capsys, damage):
    """A served shard with another magic number, or whose header counts more tokens than it holds, stops the run with
    one line naming the file, no traceback."""
    m, server, data = hub
    if damage == "magic":
        shard(server.root / TRAIN1, tokens(1), magic=20240801)  # uint32 files' magic, on uint16 tokens
    else:
        shard(server.root / TRAIN1, tokens(1), count=20_001)
    err = expect_error(m, [*TINY, "--data", "fineweb10B"], capsys)
    assert f"{data / 'fineweb_train_000001.bin'} is not a whole token file" in err


@pytest.mark.parametrize("where", ["404", "unreachable"])
def test_unreachable_hub_is_one_line(hub, capsys, monkeypatch, where):
    """Shards the endpoint does not have (404), or an endpoint nothing answers at: one line naming --data and the
    endpoint, exit 2, no file left behind."""
    m, server, data = hub
    if where == "404":
        (server.root / VAL).unlink()
    else:
        monkeypatch.setattr(m, "HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    err = expect_error(m, [*TINY, "--data", "fineweb10B"], capsys)
    assert f"cannot fetch --data fineweb10B from {m.HF_ENDPOINT}" in err
    assert server.requests == ([VAL] if where == "404" else [])
    assert not data.exists() or not any(data.iterdir())


def test_hf_token_sent_for_shards(hub, monkeypatch):
    """With $HF_TOKEN set, every shard request carries it as a bearer token."""
    m, server, _ = hub
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    m.prepare_data("fineweb10B", m.load_tokenizer("gpt2"), 2)
    assert server.requests == [VAL, TRAIN1, TRAIN2] and server.tokens == ["Bearer hf_secret"] * 3


def test_other_tokenizer_is_refused_before_download(http_server, tmp_path, monkeypatch, capsys):
    """llama2.py with tiktoken's files not to be had trains with byte tokens, which FineWeb's GPT-2 ids are not: one
    line, exit 2, and nothing asked of the hub."""
    m = importlib.import_module("llama2")
    serve_hub(m, http_server, monkeypatch, tmp_path / "cache")
    script_home(m, tmp_path / "home", monkeypatch)
    for rel in (VAL, TRAIN1):
        shard(http_server.root / rel, tokens(0))

    def no_bpe(name):
        raise ConnectionError("offline")
    monkeypatch.setattr(m.tiktoken, "get_encoding", no_bpe)
    err = expect_error(m, [*TINY, "--data", "fineweb10B"], capsys)
    assert "--data fineweb10B holds GPT-2's tokens, and this model's tokenizer is bytes" in err
    assert http_server.requests == [] and not (tmp_path / "home" / "data" / "fineweb10B").exists()


def test_ddp_rank0_downloads_once(http_server, tmp_path):
    """torchrun --nproc_per_node 2 on CPU (gloo), gpt2.py alone in a folder: rank 0 fetches each shard once while
    rank 1 waits, then both train on them."""
    needs_gpt2_bpe()
    server = http_server

    class Slow(server.httpd.RequestHandlerClass):  # a second an answer: a rank that did not wait would ask too
        def do_GET(self):
            time.sleep(1)
            super().do_GET()
    server.httpd.RequestHandlerClass = Slow
    work = copy_script("gpt2", tmp_path / "work")
    for i, rel in enumerate((VAL, TRAIN1)):
        shard(server.root / rel, tokens(i))
    env = {k: v for k, v in offline_env(tmp_path).items() if k.lower() not in ("http_proxy", "https_proxy")}
    env.update(HF_ENDPOINT=server.url, NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    r = run_script(work, ["gpt2.py", *TINY, "--data", "fineweb10B"], env, launcher=launcher)
    assert r.returncode == 0, r.stderr
    assert "DDP x2" in r.stdout and "data fineweb10B" in r.stdout and r.stdout.count("done | 2 iters") == 1
    assert sorted(server.requests) == sorted([VAL, TRAIN1]) and not server.ranges
    for rel in (VAL, TRAIN1):
        assert (work / "data" / "fineweb10B" / rel.rsplit("/", 1)[1]).read_bytes() == (server.root / rel).read_bytes()
