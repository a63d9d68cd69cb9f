"""The documentation resolves: every relative Markdown link of README.md and docs/*.md points at a file of the
repository (and at a heading of it, when the link names an anchor of a Markdown file), every repository path
written in backticks in those files exists, and no .py or .md file of the repository refers to a file, a heading
or a numbered section that is not in the repository (a reader who copies a script can follow its pointers); the
same for requirements.txt, the Makefile and the accelerate configs."""
import glob
import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
# first path components that name the repository's own folders: a backticked token starting with one of these and
# holding a "/" is read as a repository path (output paths such as lora/..., runs/..., samples/..., checkpoints/...,
# transformer/ start otherwise and are not checked)
TOP = ("common", "rewards", "tests", "docs", "bench", "scripts", "models", "datasets", ".ci")
LINK = re.compile(r"!?\[([^\]]*)\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)")
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:, ...
# references written in .py and .md files: a document named in capitals (README.md), a path under one of the
# repository's folders ending in .md/.py/.yaml/.json, a Markdown file with an anchor (docs/video.md#recipes), and
# numbered sections of a sectioned document (`docs/algorithms.md C.4`, `docs/models.md 3.5/3.6`, `... decision 3`)
DOC_NAME = re.compile(r"(?<![\w/.\-])([A-Z][A-Z0-9_\-]*\.md)\b")
REPO_PATH = re.compile(r"(?<![\w/.\-])((?:%s)/[\w./{},*\-]*\.(?:md|py|yaml|json))(?![\w/])" % "|".join(TOP))
UPWARD = re.compile(r"(?<![\w/.\-])((?:\.\./)+[\w./\-]+\.(?:md|py|yaml|json))")  # going up: still inside?
ANCHORED = re.compile(r"(?<![\w/.\-])([\w./\-]+\.md)#([\w\-]+)")
SECTION = r"(?:[A-Z]|\d+)(?:\.\d+)?(?![\w.]\w)"
SECTION_REF = re.compile(r"(?<![\w/.\-])(docs/[\w\-]+\.md),?[ \t]+(?:sections?[ \t]+)?"
                         r"(%s(?:[ \t]*(?:,|/|-|and)[ \t]*%s)*)" % (SECTION, SECTION))
DECISION = re.compile(r"\bdecisions?[ \t]+(\d+)((?:[ \t]*(?:,|-|and)[ \t]*\d+)*)")


def _read(rel):
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        return f.read()


def _prose_lines(text):
    """(line number, line) outside fenced code blocks."""
    inside = False
    for n, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            inside = not inside
            continue
        if not inside:
            yield n, line


def _without_code_spans(line):
    return re.sub(r"`[^`]*`", "", line)


def _slug(heading):
    """GitHub's anchor of a heading: markup dropped, lower case, punctuation removed, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(rel):
    seen, out = {}, set()
    for _, line in _prose_lines(_read(rel)):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = _slug(m.group(1))
            k = seen.get(base, 0)
            seen[base] = k + 1
            out.add(base if k == 0 else f"{base}-{k}")
    return out


def _links(rel):
    for n, line in _prose_lines(_read(rel)):
        for m in LINK.finditer(_without_code_spans(line)):
            yield n, m.group(2)


def test_markdown_links_resolve():
    bad = []
    for rel in DOCS:
        here = os.path.dirname(rel)
        for n, target in _links(rel):
            if EXTERNAL.match(target):
                continue
            path, _, anchor = target.partition("#")
            dest = os.path.normpath(os.path.join(here, path)) if path else rel
            if not os.path.exists(os.path.join(ROOT, dest)):
                bad.append(f"{rel}:{n}: {target} (no file {dest})")
            elif anchor and dest.endswith(".md") and anchor.lower() not in _anchors(dest):
                bad.append(f"{rel}:{n}: {target} (no heading #{anchor} in {dest})")
    assert not bad, "links that do not resolve:\n" + "\n".join(bad)


def _expand(token):
    """`a/{b,c}.py` -> a/b.py, a/c.py (one brace group)."""
    m = re.search(r"\{([^{}]*)\}", token)
    if not m:
        return [token]
    return [token[:m.start()] + part + token[m.end():] for part in m.group(1).split(",")]


def _looks_like_repo_path(token):
    if not re.fullmatch(r"[\w.\-/{},*]+", token) or token.startswith("/"):
        return False
    if "/" in token:
        return token.split("/", 1)[0] in TOP
    return re.fullmatch(r"[\w\-]+\.(py|md)", token) is not None  # a top-level script or document


def _backticked_paths(rel):
    for n, line in _prose_lines(_read(rel)):
        for span in re.findall(r"`([^`]+)`", line):
            for token in span.split():
                token = token.strip("()[],;:'\"")
                if _looks_like_repo_path(token):
                    yield n, token


def _repo_file_names():
    """Base names of the repository's files (hidden folders such as .git and .venv left out)."""
    names = set()
    for d, dirs, files in os.walk(ROOT):
        dirs[:] = [x for x in dirs if not x.startswith(".") and x != "__pycache__"]
        names.update(files)
    return names


def _exists(path, names):
    if "/" not in path:  # a bare name: a top-level file, or a file named in context ("`shapes.py`" of rewards/)
        return os.path.exists(os.path.join(ROOT, path)) or path in names
    full = os.path.join(ROOT, path.rstrip("/"))
    return bool(glob.glob(full)) if "*" in path else os.path.exists(full)


@pytest.mark.parametrize("rel", DOCS)
def test_backticked_repository_paths_exist(rel):
    bad, names = [], _repo_file_names()
    for n, token in _backticked_paths(rel):
        for path in _expand(token):
            if not _exists(path, names):
                bad.append(f"{rel}:{n}: `{token}` ({path} not in the repository)")
    assert not bad, "backticked paths that do not exist:\n" + "\n".join(bad)


def test_the_path_rule_is_conservative():
    # repository paths are checked; outputs, placeholders and flags are not
    for token in ("common/sampler.py", "docs/video.md", "bench/speed.py", "models/shapes-flux", "datasets/demo-edit",
                  "grpo.py", "tests/test_model_*.py", "common/models/{flux1,sd3}.py", ".ci/run"):
        assert _looks_like_repo_path(token), token
    for token in ("lora/pytorch_lora_weights.safetensors", "runs/grpo/lora", "samples/eval_base.png",
                  "checkpoints/checkpoint-STEP/", "transformer/", "lora/transformer_2/", "metrics.jsonl",
                  "common/models/<name>.py", "--model-path", "/models/FLUX.1-dev", "rewards.server"):
        assert not _looks_like_repo_path(token), token
    assert _expand("common/models/{flux1,sd3}.py") == ["common/models/flux1.py", "common/models/sd3.py"]
    assert _slug("GRPO loss: PPO clip and KL") == "grpo-loss-ppo-clip-and-kl"
    assert _slug("`sd3_5`") == "sd3_5"


TEXT = (".py", ".md", ".txt", ".yaml", ".yml", ".toml", ".cfg")  # and Makefile, .ci/run


def _sources():
    """The repository's code, documents and configuration (tracked, or new and not ignored): .py, .md, .txt, .yaml,
    Makefile, .ci/run; run outputs (bench/results/) and data (datasets/, models/) left out."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: every file but hidden folders (.ci kept)
        out = []
        for d, dirs, files in os.walk(ROOT):
            dirs[:] = [x for x in dirs if not x.startswith(".") or x == ".ci"]
            out += [os.path.relpath(os.path.join(d, f), ROOT).replace(os.sep, "/") for f in files]
    return sorted(f for f in set(out) if (f.endswith(TEXT) or f in ("Makefile", ".ci/run"))
                  and not f.startswith(("bench/results/", "datasets/", "models/"))
                  and os.path.exists(os.path.join(ROOT, f)))


def _written_by_a_bench(path):
    """A bench/results/ file not there yet that a bench writes (`bench/gpu.py` needs a GPU): its name is a string
    literal of a bench/*.py."""
    if not path.startswith("bench/results/"):
        return False
    name = '"%s"' % os.path.basename(path)
    return any(name in _read(os.path.relpath(p, ROOT)) for p in glob.glob(os.path.join(ROOT, "bench", "*.py")))


def _resolves(path, rel, names):
    """`path` as written in `rel`: from the repository root or from `rel`'s folder; a bare name anywhere."""
    for base in (ROOT, os.path.join(ROOT, os.path.dirname(rel))):
        full = os.path.normpath(os.path.join(base, path))
        if glob.glob(full) if "*" in path else os.path.exists(full):
            return os.path.relpath(full, ROOT)
    if "/" not in path and path in names:
        return path
    return None


def _sections(rel):
    """The numbered sections of a Markdown file: `## C. GRPO` -> C, `### C.4 PPO clip` -> C.4, `## 4. LoRA` -> 4."""
    out = set()
    for _, line in _prose_lines(_read(rel)):
        m = re.match(r"^#{1,6}\s+([A-Z]|\d+)(?:\.(\d+))?[.\s]", line)
        if m:
            out.add(m.group(1) + (f".{m.group(2)}" if m.group(2) else ""))
    return out


def _decisions(rel):
    """The numbers of the rows of `rel`'s "Design decisions" table."""
    text = _read(rel)
    start = text.find("## Design decisions")
    if start < 0:
        return set()
    end = text.find("\n## ", start + 1)
    return {int(n) for n in re.findall(r"^\|\s*(\d+)\s*\|", text[start:end if end > 0 else None], re.M)}


def _file_references(rel, names):
    bad = []
    for n, line in enumerate(_read(rel).splitlines(), 1):
        for m in DOC_NAME.finditer(line):
            if not _resolves(m.group(1), rel, names):
                bad.append(f"{rel}:{n}: {m.group(1)} (no such file in the repository)")
        for m in REPO_PATH.finditer(line):
            for path in _expand(m.group(1)):
                if not _resolves(path, rel, names) and not _written_by_a_bench(path):
                    bad.append(f"{rel}:{n}: {m.group(1)} ({path} not in the repository)")
        for m in UPWARD.finditer(line):
            full = os.path.normpath(os.path.join(ROOT, os.path.dirname(rel), m.group(1)))
            if os.path.relpath(full, ROOT).startswith("..") or not os.path.exists(full):
                bad.append(f"{rel}:{n}: {m.group(1)} (not a file of the repository)")
        for m in ANCHORED.finditer(line):
            dest = _resolves(m.group(1), rel, names)
            if dest and dest.endswith(".md") and m.group(2).lower() not in _anchors(dest):
                bad.append(f"{rel}:{n}: {m.group(0)} (no heading #{m.group(2)} in {dest})")
    return bad


def _section_references(rel):
    bad = []
    for n, line in enumerate(_read(rel).splitlines(), 1):
        for m in SECTION_REF.finditer(line):
            dest = m.group(1)
            if not os.path.exists(os.path.join(ROOT, dest)):
                continue  # a missing file is the other test's finding
            have = _sections(dest)
            if not have:
                continue  # a document without numbered sections: "docs/video.md A ..." is prose
            for label in re.findall(SECTION, m.group(2)):
                if label not in have:
                    bad.append(f"{rel}:{n}: {dest} {label} (no section {label} in {dest})")
        if "algorithms.md" in line:
            have = _decisions("docs/algorithms.md")
            for m in DECISION.finditer(line):
                for k in [m.group(1)] + re.findall(r"\d+", m.group(2)):
                    if int(k) not in have:
                        bad.append(f"{rel}:{n}: decision {k} (not in docs/algorithms.md's Design decisions)")
    return bad


def test_file_references_in_code_and_docs_resolve():
    bad, names = [], _repo_file_names()
    for rel in _sources():
        bad += _file_references(rel, names)
    assert not bad, "references to files or headings that are not in the repository (the math is in " \
                    "docs/algorithms.md, the model facts in docs/models.md):\n" + "\n".join(bad)


def test_section_references_name_existing_sections():
    bad = []
    for rel in _sources():
        bad += _section_references(rel)
    assert not bad, "references to numbered sections that do not exist:\n" + "\n".join(bad)


def test_the_reference_rules_find_what_they_should():
    doc = "ALGORITHMS" + ".md"  # spelled apart so that this file itself refers to no missing document
    assert DOC_NAME.findall(f"(see {doc} C.4) and README.md") == [doc, "README.md"]
    assert DOC_NAME.findall("docs/models.md, lora/x.md, peers.md") == []
    outside = "../../shared/docs/X" + ".md"  # spelled apart, as above
    assert UPWARD.findall(f"(../README.md) and {outside}") == ["../README.md", outside]
    assert REPO_PATH.findall("(`common/sampler.py`), docs/video.md; runs/grpo/x.json common/models/<name>.py") == \
        ["common/sampler.py", "docs/video.md"]
    refs = [(m.group(1), re.findall(SECTION, m.group(2))) for m in SECTION_REF.finditer(
        "(docs/algorithms.md sections A, B), docs/algorithms.md C.4; docs/models.md 3.9/3.10 (Wan), "
        "docs/algorithms.md B.2-B.4; docs/algorithms.md E.6, F.4; docs/models.md 4: 20; docs/algorithms.md C.")]
    assert refs == [("docs/algorithms.md", ["A", "B"]), ("docs/algorithms.md", ["C.4"]),
                    ("docs/models.md", ["3.9", "3.10"]), ("docs/algorithms.md", ["B.2", "B.4"]),
                    ("docs/algorithms.md", ["E.6", "F.4"]), ("docs/models.md", ["4"]), ("docs/algorithms.md", ["C"])]
    assert [m.group(1) for m in DECISION.finditer("(docs/algorithms.md C.3, decision 3)")] == ["3"]
    assert _written_by_a_bench("bench/results/peers.md") and not _written_by_a_bench("bench/results/" + "nothing.md")
