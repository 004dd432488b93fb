"""Same job, same name, same text (CONVENTIONS.md): what the files share is held word for word identical here, so a
fix made in one file and not copied to the others fails. tools/sync_shared.py copies it from one file to the rest."""
import ast
from collections import defaultdict

import pytest

from conftest import ROOT, SCRIPTS

# The names each file defines for its own model; every other name that two files define must be the same text.
OWN = {"Config", "Attention", "Block", "PRESETS", "RUN_TIME", "add_model_flags", "build_model", "flops_per_token",
       "schedule", "batches", "show_sample", "from_pretrained", "save_pretrained"}
FILES_HEADING = " files: checkpoints, token files, downloads"


def sources():
    return {s: (ROOT / f"{s}.py").read_text() for s in SCRIPTS}


def shared_parts(src):
    """(the files section up to from_pretrained, the harness from the data marker to the end) of a script."""
    lines = src.splitlines(keepends=True)
    files = next(i for i, l in enumerate(lines) if l.startswith("# ---") and l.rstrip().endswith(FILES_HEADING))
    own = next(i for i, l in enumerate(lines) if l.startswith("def from_pretrained("))
    data = next(i for i, l in enumerate(lines) if l.startswith("# ---") and l.rstrip().endswith(" data"))
    assert files < own < data
    return "".join(lines[files:own]), "".join(lines[data:])


@pytest.mark.skipif(len(SCRIPTS) < 2, reason="one script: nothing to compare")
def test_the_files_section_and_the_harness_are_one_text():
    parts = {s: shared_parts(src) for s, src in sources().items()}
    first = SCRIPTS[0]
    for s, (files, harness) in parts.items():
        assert files == parts[first][0], f"{s}.py's files section differs from {first}.py's"
        assert harness == parts[first][1], f"{s}.py's harness (from '# --- data' on) differs from {first}.py's"


def test_same_name_same_text():
    """RMSNorm, apply_rotary, KVCache, FeedForward, sample_next, expert_mlp, GPT-2's classes in gpt2.py and lora.py,
    and everything else two files define by one name, is one text; a file that needs another behaviour gives it
    another name (bitnet.py's BitFeedForward, mixtral.py's RollingKVCache, mla_moe.py's yarn_rope_frequencies)."""
    versions = defaultdict(lambda: defaultdict(list))
    for s, src in sources().items():
        lines = src.splitlines(keepends=True)  # (ast.get_source_segment splits the whole file at every call)
        for node in ast.parse(src).body:
            name = getattr(node, "name", None) or getattr(getattr(node, "targets", [None])[0], "id", None)
            if name and name not in OWN:
                versions[name]["".join(lines[node.lineno - 1:node.end_lineno])].append(s)
    drift = {name: [files for files in texts.values()] for name, texts in versions.items() if len(texts) > 1}
    assert not drift, f"one name, several texts: {drift}"
    for name in ("RMSNorm", "apply_rotary", "KVCache", "FeedForward", "sample_next", "load_tokenizer", "train", "main"):
        assert name in versions  # the test sees what it claims to check
    assert {"gpt2", "lora"} <= set(sum(versions["GPT"].values(), []))


def test_nothing_points_outside_the_repository():
    """A user's clone has nothing beside it: no script, test, benchmark or document may need the CI machine's shared
    folder (CI's own script, .ci/run, may use it when it is there)."""
    outside = "../" + "shared"  # spelt apart, so that this file does not find itself
    files = [*ROOT.glob("*.py"), *ROOT.glob("*.md"), *ROOT.glob("tests/*.py"), *ROOT.glob("benchmarks/*"),
             *ROOT.glob("tools/*"), *ROOT.glob("data/*")]
    assert [f.name for f in files if f.is_file() and outside in f.read_text()] == []
