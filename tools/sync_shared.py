"""Copy the shared text of one script to the others: its files section (from the '# --- ... files: ...' heading to
`def from_pretrained`), its harness (from the '# --- ... data' heading to the end), and every top-level definition
the other scripts also have by that name, except the model's own (tests/test_harness.py's OWN).

    python tools/sync_shared.py llama2.py            # after a fix in llama2.py's shared text
    python tools/sync_shared.py llama2.py --check    # list what differs, change nothing

Nothing here is imported by a script: each keeps its own copy, and tests/test_harness.py holds them to one text.
"""
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from test_harness import OWN, shared_parts  # noqa: E402

SCRIPTS = ["gpt2", "llama2", "mixtral", "mla_moe", "mamba", "lora", "bitnet", "infini_attention", "mamba2", "jamba",
           "transformer_xl"]


def definitions(src):
    """{name: (first line, last line)} of the top-level definitions, 0-based, end exclusive."""
    out = {}
    for node in ast.parse(src).body:
        name = getattr(node, "name", None) or getattr(getattr(node, "targets", [None])[0], "id", None)
        if name and name not in OWN:
            out[name] = (node.lineno - 1 - len(getattr(node, "decorator_list", [])), node.end_lineno)
    return out


def sync(source, target):
    """target's text with source's shared text in it."""
    files, harness = shared_parts(source)
    old_files, old_harness = shared_parts(target)
    target = target.replace(old_files, files).replace(old_harness, harness)
    theirs, mine = definitions(source), definitions(target)
    src_lines = source.splitlines(keepends=True)
    for name in sorted(set(theirs) & set(mine), key=lambda n: -mine[n][0]):  # bottom up: line numbers stay valid
        lines = target.splitlines(keepends=True)
        a, b = mine[name]
        target = "".join(lines[:a]) + "".join(src_lines[slice(*theirs[name])]) + "".join(lines[b:])
        mine = definitions(target)
    return target


def main():
    source = (ROOT / sys.argv[1]).read_text()
    for s in SCRIPTS:
        path = ROOT / f"{s}.py"
        if not path.exists() or path.name == Path(sys.argv[1]).name:
            continue
        old = path.read_text()
        new = sync(source, old)
        if new != old:
            print(f"{path.name}: {'differs' if '--check' in sys.argv else 'updated'}")
            if "--check" not in sys.argv:
                path.write_text(new)


if __name__ == "__main__":
    main()
