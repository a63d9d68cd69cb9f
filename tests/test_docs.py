"""The documentation resolves: every relative Markdown link of README.md and docs/*.md points at a file of the
repository (and at a heading of it, when the link names an anchor of a Markdown file), every repository path
written in backticks in those files exists, and no file refers to documents that are not in the repository."""
import glob
import os
import re

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
MISSING_DOCS = re.compile(r"\b(ALGORITHMS|MODELS)\.md\b")


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
    assert _expand("common/models/{a,b}.py") == ["common/models/a.py", "common/models/b.py"]
    assert _slug("GRPO loss: PPO clip and KL") == "grpo-loss-ppo-clip-and-kl"
    assert _slug("`sd3_5`") == "sd3_5"


def test_no_reference_to_documents_outside_the_repository():
    bad = [f"{rel}:{n}: {line.strip()}" for rel in DOCS for n, line in enumerate(_read(rel).splitlines(), 1)
           if MISSING_DOCS.search(line)]
    assert not bad, "references to ALGORITHMS.md / MODELS.md (not in the repository; use docs/algorithms.md and " \
                    "docs/models.md):\n" + "\n".join(bad)
