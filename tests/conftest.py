"""Shared test helpers. The scripts live at the repository root; each test file imports them from there."""
import http.server
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import functools
import warnings
from pathlib import Path

import pytest
import tiktoken
import torch

ROOT = Path(__file__).resolve().parent.parent
ALL_SCRIPTS = ["gpt2", "llama2", "mixtral", "mla_moe", "mamba", "lora", "bitnet", "infini_attention", "mamba2", "jamba",
               "transformer_xl"]
SCRIPTS = [s for s in ALL_SCRIPTS if (ROOT / f"{s}.py").exists()]
DEAD_PROXY = "http://127.0.0.1:9"  # nothing listens there: any download fails at once, as offline
# A text every machine has, as the scripts' own offline fallback: the Python standard library's source
CORPUS = "".join(p.read_text(encoding="utf-8", errors="ignore") for p in sorted(Path(os.__file__).parent.glob("*.py")))
CORPUS = CORPUS.replace("\0", "")[:300_000]

sys.path.insert(0, str(ROOT))


@functools.cache
def have_gpt2_bpe():
    """Whether tiktoken can give GPT-2's BPE here: from TIKTOKEN_CACHE_DIR (as CI sets it), its own cache, or a
    download."""
    try:
        tiktoken.get_encoding("gpt2")
        return True
    except Exception:
        return False


def needs_gpt2_bpe():
    if not have_gpt2_bpe():
        pytest.skip("tiktoken's gpt2 BPE files cannot be had here (offline, and no TIKTOKEN_CACHE_DIR that holds them)")


def offline_env(tmp_path, tiktoken=True):
    """Environment for a script under test: no network; tiktoken's files where this process finds them, or none."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "http_proxy", "https_proxy")}
    env.update(HTTP_PROXY=DEAD_PROXY, HTTPS_PROXY=DEAD_PROXY, PYTHONUNBUFFERED="1", ONEFILE_CACHE=str(tmp_path / "cache"))
    if not tiktoken:
        env["TIKTOKEN_CACHE_DIR"] = str(tmp_path / "no_tiktoken")
    return env


def copy_script(script, dest):
    """Copy one script alone into dest, as a reader would."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / f"{script}.py", dest)
    return dest


def run_script(cwd, args, env, launcher=(), timeout=600):
    """Run `python [launcher] script.py args` in cwd; return the CompletedProcess (text)."""
    return subprocess.run([sys.executable, *launcher, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def run_torchrun(cwd, argv, env, fresh=("out", "data"), nproc=2):
    """`python -m torch.distributed.run --standalone --nproc_per_node nproc argv` in cwd (CPU: gloo), run again once,
    with the folders `fresh` under cwd removed and a warning, when a rank aborted inside gloo at exit.

    Rare (CI once, with mla_moe and infini_attention; here once, mixtral): a rank aborts at interpreter exit, after
    its work, inside gloo's threads, which DDP keeps alive past destroy_process_group (tests/README.md)."""
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    env = env | {"PYTHONFAULTHANDLER": "1"}  # a crashing rank shows its stack
    r = run_script(cwd, argv, env, launcher=launcher)
    if r.returncode and "terminate called without an active exception" in r.stderr:
        warnings.warn(f"torchrun {' '.join(argv)} aborted inside gloo; ran it again. Its stderr:\n{r.stderr[-3000:]}")
        for folder in fresh:
            shutil.rmtree(Path(cwd) / folder, ignore_errors=True)
        r = run_script(cwd, argv, env, launcher=launcher)
    return r


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """In-process tests: downloads fail at once, hub files are cached under tmp_path."""
    for k in ("NO_PROXY", "no_proxy", "HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HTTP_PROXY", DEAD_PROXY)
    monkeypatch.setenv("HTTPS_PROXY", DEAD_PROXY)
    return tmp_path


# ----------------------------------------------------------------------------- helpers for model tests

def max_diff(a, b):
    return (a - b).abs().max().item()


def ids(vocab, B, T, seed=1):
    """(B, T) random token ids, seeded."""
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def hf_logits(hf, idx):
    with torch.no_grad():
        return hf(idx).logits


def check_scan_and_loop_match_hf(model, hf, vocab):
    """An SSM's logits through its parallel (training) path and its loop over time both equal HF's on (2, 64) random
    ids within 1e-4; logits of order > 1, so that the bound means something."""
    idx = ids(vocab, 2, 64)
    ref = hf_logits(hf, idx)
    assert ref.abs().max() > 1.0
    for parallel in (True, False):
        with torch.no_grad():
            logits, loss = model(idx, parallel=parallel)[:2]
        assert loss is None and logits.shape == ref.shape
        assert max_diff(logits, ref) < 1e-4


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one thread, and more so on a shared, loaded machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def check_overfits(model, vocab, steps=100):
    """AdamW on one batch of random tokens: the loss starts at chance, ln(vocab), and falls below a tenth of it
    (to about 0.02 of it in practice)."""
    x = ids(vocab, 4, 33, seed=0)
    x, y = x[:, :-1], x[:, 1:]
    opt = torch.optim.AdamW(model.train().parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        loss = model(x, y)[1]  # the MoE files: (logits, loss, aux)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert abs(losses[0] - math.log(vocab)) < 0.1
    assert losses[-1] < 0.1 * losses[0]


def check_cached_equals_uncached(model, vocab, prompt_len, new_tokens):
    """Greedy decoding with the model's cache gives the tokens of decoding without one (and not one token over
    and over); sampling with the same seed too."""
    idx = ids(vocab, 2, prompt_len, seed=2)
    cached = model.generate(idx, new_tokens, temperature=0.0, use_cache=True)
    uncached = model.generate(idx, new_tokens, temperature=0.0, use_cache=False)
    assert cached.shape == (2, prompt_len + new_tokens) and torch.equal(cached[:, :prompt_len], idx)
    assert torch.equal(cached, uncached)
    assert len(set(cached[:, prompt_len:].flatten().tolist())) > 5
    outs = []
    for use_cache in (True, False):
        torch.manual_seed(11)
        outs.append(model.generate(idx, new_tokens, temperature=1.0, top_k=50, use_cache=use_cache))
    assert torch.equal(*outs)


def check_greedy_matches_hf(model, hf, vocab, new_tokens, **hf_kw):
    """Greedy tokens of model.generate, with its cache and without, equal to hf.generate's (which wander)."""
    idx = ids(vocab, 2, 8, seed=5)
    with torch.no_grad():
        ref = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=new_tokens, do_sample=False, **hf_kw)
    assert ref.shape == (2, 8 + new_tokens)
    assert len(set(ref[:, 8:].flatten().tolist())) > 5  # a real test: not one token repeated
    for use_cache in (True, False):
        assert torch.equal(model.generate(idx, new_tokens, temperature=0.0, use_cache=use_cache), ref)


def check_variant_refused(module, hf, tmp_path, change):
    """A checkpoint whose config.json says `change` (a variant the script does not implement) is refused with
    InputError, never loaded into silently different logits."""
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(module.InputError):
        module.from_pretrained(tmp_path)


def scale_up(hf, scale):
    """A random HF model with RMSNorm blocks, made to give logits of order 1: weights times `scale`, norm
    gains random around 1; in eval mode."""
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(torch.randn_like(p) * 0.1 + 1.0) if name.endswith("norm.weight") else p.mul_(scale)
    return hf.eval()


def randomize(model, std=0.2):
    """A tiny model of ours with weights of std `std` (norm gains left at 1), so that greedy decoding wanders;
    in eval mode."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, std)
    return model.eval()


def check_causal(model, vocab, t, T=32):
    """Changing every token from position t on changes no logit before t, and does change those after."""
    idx = ids(vocab, 2, T, seed=6)
    changed = idx.clone()
    changed[:, t:] = (idx[:, t:] + 1 + ids(vocab - 2, 2, T - t, seed=t)) % vocab  # every future token differs
    with torch.no_grad():
        a, b = model(idx)[0], model(changed)[0]
    assert max_diff(a[:, :t], b[:, :t]) <= 1e-6
    assert max_diff(a[:, t:], b[:, t:]) > 1e-2


LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def train_tokenizer(path, style="llama3", vocab_size=600, normalizer=None):
    """A byte-level BPE trained on tiny-shakespeare with the `tokenizers` package, saved as tokenizer.json: Llama 3
    style (a regex split, then bytes) or GPT-2 style (GPT-NeoX's: the byte-level step splits); normalizer names
    one of tokenizers.normalizers ("NFC", "NFKC", "Lowercase") applied first."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    if style == "llama3":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if normalizer:
        tok.normalizer = getattr(normalizers, normalizer)()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([CORPUS[:200_000]], trainer)
    tok.save(str(path))
    return tok


def script_home(module, tmp_path, monkeypatch):
    """Run module's main() as if the script lived in tmp_path: its data/ and out/ there, data/shakespeare/input.txt
    seeded with CORPUS (so --data shakespeare needs no download: a text of its size)."""
    (tmp_path / "data" / "shakespeare").mkdir(parents=True, exist_ok=True)
    monkeypatch.setattr(module, "HERE", tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "shakespeare" / "input.txt").write_text(CORPUS)
    return tmp_path


class Server:
    """Files under root at http://127.0.0.1:port/<path>, with `Range: bytes=N-`; cut_once: paths whose next
    response is cut short (half the body, then the connection closes)."""

    def __init__(self, root):
        self.root, self.ranges, self.cut_once, self.requests, self.tokens = root, [], set(), [], []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                rel = self.path.lstrip("/")
                server.requests.append(rel)
                server.tokens.append(self.headers.get("Authorization"))
                f = server.root / rel
                if ".." in rel or not f.is_file():
                    self.send_error(404)
                    return
                data = f.read_bytes()
                start, rng = 0, self.headers.get("Range")
                if rng:
                    server.ranges.append((rel, rng))
                    start = int(rng.removeprefix("bytes=").rstrip("-"))
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                if rel in server.cut_once:
                    server.cut_once.discard(rel)
                    body = body[:len(body) // 2]
                    self.close_connection = True
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def http_server(tmp_path, monkeypatch):
    """A Server on tmp_path/srv, reached directly (no proxy, no HF_TOKEN)."""
    for k in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    (tmp_path / "srv").mkdir()
    s = Server(tmp_path / "srv")
    yield s
    s.close()


def serve_hub(module, server, monkeypatch, cache):
    """Point module's hub downloads at server, caching under cache."""
    monkeypatch.setattr(module, "HF_ENDPOINT", server.url)
    monkeypatch.setattr(module, "CACHE_DIR", cache)
    return server


def check_model_on_reference_attention(module, model, reference, layers, monkeypatch):
    """The whole model with `reference` in place of module.attention: the same logits, whole and by chunks after
    a KV cache, to 1e-5."""
    idx = ids(300, 2, 32, seed=4)
    with torch.no_grad():
        fast = model(idx)[0]
        monkeypatch.setattr(module, "attention", lambda q, k, v, pos=0, dropout=0.0: reference(q, k, v, pos))
        ref = model(idx)[0]
        cache = [module.KVCache(32) for _ in layers]
        chunks = torch.cat([model(idx[:, a:b], cache=cache, pos=a)[0] for a, b in [(0, 10), (10, 11), (11, 32)]], 1)
    assert max_diff(fast, ref) < 1e-5 and max_diff(fast, chunks) < 1e-5
