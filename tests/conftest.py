"""Shared test helpers. The scripts live at the repository root; each test file imports them from there."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
TIKTOKEN_DIR = SHARED / "tiktoken"
SHAKESPEARE = SHARED / "data" / "tinyshakespeare.txt"
ALL_SCRIPTS = ["gpt2", "llama2", "mixtral", "mla_moe", "mamba", "lora", "bitnet", "infini_attention"]
SCRIPTS = [s for s in ALL_SCRIPTS if (ROOT / f"{s}.py").exists()]
DEAD_PROXY = "http://127.0.0.1:9"  # nothing listens there: any download fails at once, as offline

sys.path.insert(0, str(ROOT))
if TIKTOKEN_DIR.is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(TIKTOKEN_DIR))


def offline_env(tmp_path, tiktoken=True):
    """Environment for a script under test: no network, tiktoken's files from ../shared when wanted."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "http_proxy", "https_proxy")}
    env.update(HTTP_PROXY=DEAD_PROXY, HTTPS_PROXY=DEAD_PROXY, PYTHONUNBUFFERED="1", ONEFILE_CACHE=str(tmp_path / "cache"))
    env["TIKTOKEN_CACHE_DIR"] = str(TIKTOKEN_DIR) if tiktoken and TIKTOKEN_DIR.is_dir() else str(tmp_path / "no_tiktoken")
    return env


def copy_script(script, dest, shakespeare=True):
    """Copy one script alone into dest, as a reader would, with tiny-shakespeare seeded in its data/ folder."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / f"{script}.py", dest)
    if shakespeare and SHAKESPEARE.exists():
        (dest / "data" / "shakespeare").mkdir(parents=True, exist_ok=True)
        shutil.copy(SHAKESPEARE, dest / "data" / "shakespeare" / "input.txt")
    return dest


def run_script(cwd, args, env, launcher=(), timeout=600):
    """Run `python [launcher] script.py args` in cwd; return the CompletedProcess (text)."""
    return subprocess.run([sys.executable, *launcher, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """In-process tests: downloads fail at once, hub files are cached under tmp_path."""
    for k in ("NO_PROXY", "no_proxy", "HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HTTP_PROXY", DEAD_PROXY)
    monkeypatch.setenv("HTTPS_PROXY", DEAD_PROXY)
    return tmp_path
