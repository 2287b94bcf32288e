"""The README is a front door, and every link in it and in docs/ resolves.

Checked offline: a relative link must name a file or folder of the repository, and a
``#fragment`` must name a heading of the Markdown file it points into, slugged as
GitHub slugs headings. External (http, https, mailto) links are not fetched. Code
spans that name a path in one of the repository's top-level folders must name one that
exists, so that moving a file cannot leave the documentation pointing at nothing.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 300
# Top-level folders of the repository; a code span naming a path in one must exist.
REPO_FOLDERS = ("bankd", "bench", "client", "deploy", "docs", "proto", "tests", "trainer")

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
# [text](target "title") and ![alt](target); the text may hold one level of brackets.
INLINE_LINK = re.compile(
    r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^()\s<>]*)>?(?:\s+\"[^\"]*\")?\s*\)"
)
REFERENCE_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"", re.IGNORECASE)
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def doc_files() -> list[Path]:
    """The Markdown pages this test guards: the README, docs/, bench/ and deploy/."""
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]
    files += [ROOT / "bench" / "README.md", ROOT / "deploy" / "README.md"]
    return [p for p in files if p.is_file()]


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) for every line outside fenced code blocks."""
    out, fence = [], None
    for number, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if fence is None and m:
            fence = m.group(1)[0] * 3
        elif fence is not None and m and m.group(1).startswith(fence):
            fence = None
        elif fence is None:
            out.append((number, line))
    return out


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading (github-slugger's rules, on the rendered text).

    The rendered text drops inline markup: links keep their text, code spans their
    content, emphasis markers and HTML tags go. Then: lower case; every character that
    is not a letter, mark, number, connector (``_``), space or hyphen is removed; each
    space becomes a hyphen (runs are not collapsed).
    """
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text)
    text = text.replace("`", "").replace("*", "")
    kept = [
        c
        for c in text.lower()
        if c in " -" or unicodedata.category(c)[0] in "LMN" or unicodedata.category(c) == "Pc"
    ]
    return "".join(kept).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every #fragment that leads somewhere in a Markdown file."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        found.update(HTML_ANCHOR.findall(line))
        m = HEADING.match(line)
        if not m:
            continue
        slug = github_slug(m.group(2))
        # GitHub numbers repeated headings: x, x-1, x-2, ...
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        found.add(slug if n == 0 else f"{slug}-{n}")
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link outside code blocks and code spans."""
    out = []
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        bare = CODE_SPAN.sub(lambda m: "c" * len(m.group(0)), line)
        out += [(number, t) for t in INLINE_LINK.findall(bare)]
        m = REFERENCE_DEF.match(bare)
        if m:
            out.append((number, m.group(1)))
    return out


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """A message for each relative link of ``path`` that does not resolve."""
    errors = []
    for number, target in links(path):
        where = f"{path.relative_to(root)}:{number}: {target!r}"
        if SCHEME.match(target):
            continue  # external: not fetched
        file_part, _, fragment = target.partition("#")
        if not file_part and not fragment:
            errors.append(f"{where}: empty link")
            continue
        dest = path if not file_part else (path.parent / unquote(file_part)).resolve()
        if file_part.startswith("/"):
            dest = (root / unquote(file_part).lstrip("/")).resolve()
        if not dest.is_relative_to(root.resolve()):
            errors.append(f"{where}: points outside the repository")
        elif not dest.exists():
            errors.append(f"{where}: no such file")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            errors.append(f"{where}: no heading with anchor #{fragment} in {dest.name}")
    return errors


def missing_code_paths(path: Path, root: Path = ROOT) -> list[str]:
    """A message for each code span naming a repository path that does not exist."""
    errors = []
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        for m in CODE_SPAN.finditer(line):
            span = m.group(2).strip()
            first = span.split("/", 1)[0]
            if "/" not in span or first not in REPO_FOLDERS or re.search(r"[\s*<>{}]", span):
                continue
            if not (root / span).exists():
                errors.append(f"{path.relative_to(root)}:{number}: `{span}` does not exist")
    return errors


def test_readme_is_a_front_door() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    lines = text.splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"
    first_screen = "\n".join(lines[:50])
    assert "make demo" in first_screen and "make test" in first_screen


@pytest.mark.parametrize("page", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(page: Path) -> None:
    assert broken_links(page) == []


@pytest.mark.parametrize("page", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_code_paths_exist(page: Path) -> None:
    assert missing_code_paths(page) == []


def test_readme_reaches_every_docs_page() -> None:
    linked = {t.partition("#")[0] for _, t in links(ROOT / "README.md")}
    pages = {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")}
    assert pages, "docs/ has no pages"
    assert pages <= linked, f"not linked from README.md: {sorted(pages - linked)}"


@pytest.mark.parametrize(
    ("heading", "slug"),
    [
        ("Reproducing the paper's study", "reproducing-the-papers-study"),
        ("`search_latency.py`: the Search RPC", "search_latencypy-the-search-rpc"),
        ("Data-parallel build (torchrun)", "data-parallel-build-torchrun"),
        ("Values **through** [shared memory](x.md)", "values-through-shared-memory"),
        ("GPU search, B=1024 -- k=5", "gpu-search-b1024----k5"),
        ("Über große Bänke", "über-große-bänke"),
    ],
)
def test_github_slug(heading: str, slug: str) -> None:
    assert github_slug(heading) == slug


def test_checker_catches_broken_links(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "other.md").write_text("# Other page\n\n## Same\n\n## Same\n")
    page = tmp_path / "README.md"
    page.write_text(
        "# Title\n\n## A section\n\n"
        "[ok](docs/other.md) [ok](docs/other.md#other-page) [ok](#a-section)\n"
        "[ok, repeated heading](docs/other.md#same-1) [ok](https://example.invalid/x)\n"
        "[gone](docs/missing.md) [bad anchor](docs/other.md#nothing) [bad](#b-section)\n"
        "[outside](../elsewhere.md)\n"
        "`[in code](docs/missing.md)`\n\n"
        "```\n[in a fence](docs/missing.md)\n```\n\n"
        "`docs/other.md` exists, `docs/gone.md` does not, `bank/bank.faiss` is output\n"
    )
    errors = broken_links(page, root=tmp_path)
    assert len(errors) == 4, errors
    assert "docs/missing.md" in errors[0] and "no such file" in errors[0]
    assert "#nothing" in errors[1] and "#b-section" in errors[2]
    assert "outside the repository" in errors[3]
    assert missing_code_paths(page, root=tmp_path) == [
        "README.md:15: `docs/gone.md` does not exist"
    ]
