"""The README's commands run as written: every `python FILE.py ...` or `torchrun ... FILE.py ...` line of its bash
blocks names a file that exists and flags that its parser accepts with values its checks accept (what can be
checked without a network or a GPU); every benchmark it names exists; every link to a file points at one."""
import importlib
import re
import shlex

import pytest

from conftest import ROOT

README = (ROOT / "README.md").read_text()


def commands():
    """(script, argv) for each command line of the README's bash blocks, continuation lines joined."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):  # HF_TOKEN=... before the command
                words = words[1:]
            if words[:1] not in (["python"], ["torchrun"]) or words[1:2] == ["-m"]:
                continue  # pip install ..., python -m pytest ...
            at = next(i for i, w in enumerate(words) if w.endswith(".py"))
            out.append((words[at], words[at + 1:]))
    return out


COMMANDS = commands()
SCRIPTS = sorted({s for s, _ in COMMANDS if "/" not in s})


def test_the_readme_has_commands_for_every_file():
    assert len(COMMANDS) > 30
    assert {p.name for p in ROOT.glob("*.py")} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_each_command_parses(script):
    m = importlib.import_module(script.removesuffix(".py"))
    for s, argv in COMMANDS:
        if s == script and not hasattr(m, "PRESETS"):  # bpe.py: a tool, not a model's training script
            m.parse_args(argv)
        elif s == script:
            args, given = m.parse_args(argv)  # argparse exits on an unknown flag or a bad value
            for k, v in m.PRESETS["cuda" if args.device == "cuda" else "cpu"].items():  # as run() fills them
                setattr(args, k, v if getattr(args, k) is None else getattr(args, k))
            m.check_args(args)                # and the shared checks raise InputError on a value out of range
            assert given <= set(vars(args))


def anchor(heading):
    """GitHub's id for a Markdown heading: lower case, punctuation but - and _ dropped, spaces to -."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_named_benchmarks_and_links_exist():
    for s, _ in COMMANDS:
        if "/" in s:
            assert (ROOT / s).is_file(), s
    for target, fragment in re.findall(r"\]\(([^)#:]+)(?:#([^)]*))?\)", README):
        assert (ROOT / target).exists(), target
        if fragment:
            headings = re.findall(r"^#+ (.*)$", (ROOT / target).read_text(), flags=re.M)
            assert fragment in {anchor(h) for h in headings}, f"{target}#{fragment}"


def test_the_tables_line_counts_are_the_files():
    """The README's first table gives each script's length in lines: it is the file's."""
    rows = [r.split("|") for r in (ROOT / "README.md").read_text().splitlines() if r.startswith("| [`")]
    counts = {r[1].strip().split("`")[1]: r[5].strip() for r in rows if r[5].strip().isdigit()}
    assert len(counts) >= 11
    for script, n in counts.items():
        assert int(n) == len((ROOT / script).read_text().splitlines()), script
