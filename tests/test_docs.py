"""README.md and docs/*.md name only what this checkout has.

Every relative link reaches a file (and its #anchor a heading of that page, by
GitHub's rules); every `make X` is a Makefile target; every `python -m bench
NAME` a registered scenario; every `remotemedia-engine COMMAND --flag` a real
subcommand and one of its options; every examples/ file named exists. And the
README keeps its promises to a newcomer: it opens with `make run` and
`make test`, and links every page of docs/. Fast: no models, no server.
"""

from __future__ import annotations

import ast
import functools
import re
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^\s*(```|~~~)")
_INLINE_CODE = re.compile(r"(`+)(.+?)\1", re.S)
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_EXAMPLE_FILE = re.compile(r"(?<![\w/.-])examples/[\w./-]+\.(?:json|py|toml|sh|c|h|wasm)\b")
_CLI = "remotemedia-engine"
_BENCH_WORDS = {"all", "list", "plot", "report"}  # python -m bench's own commands besides scenarios


@dataclass(frozen=True)
class Page:
    """A Markdown page split the way a reader sees it: prose, and code (spans and blocks)."""

    path: Path
    prose: str          # text outside fenced blocks, inline code kept
    code_lines: tuple[str, ...]   # each line of every fenced block
    code_spans: tuple[str, ...]   # each inline code span, its whitespace collapsed

    @property
    def name(self) -> str:
        return str(self.path.relative_to(ROOT))

    def code(self) -> list[str]:
        """Every piece of code on the page: block lines and inline spans."""
        return [*self.code_lines, *self.code_spans]


@functools.cache
def _page(path: Path) -> Page:
    prose, code, fence = [], [], None
    for line in path.read_text().splitlines():
        opening = _FENCE.match(line)
        if fence is None and opening:
            fence = opening.group(1)
            prose.append("")
        elif fence is not None:
            if line.strip().startswith(fence):
                fence = None
            else:
                code.append(line)
            prose.append("")
        else:
            prose.append(line)
    text = "\n".join(prose)
    spans = tuple(" ".join(m.group(2).split()) for m in _INLINE_CODE.finditer(text))
    return Page(path, text, tuple(code), spans)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: link text kept, lowercase, punctuation dropped, spaces → '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@functools.cache
def _anchors(path: Path) -> frozenset[str]:
    seen: Counter[str] = Counter()
    anchors = set()
    for line in _page(path).prose.splitlines():
        m = _HEADING.match(line)
        if not m:
            continue
        slug = _slug(m.group(2))
        anchors.add(f"{slug}-{seen[slug]}" if seen[slug] else slug)  # GitHub numbers repeats
        seen[slug] += 1
    return frozenset(anchors)


def _links(page: Page) -> list[str]:
    outside_code = _INLINE_CODE.sub(" ", page.prose)
    return [m.group(1) for m in _LINK.finditer(outside_code)]


def _link_problem(page: Page, target: str) -> str | None:
    if _SCHEME.match(target):
        return None  # a web address: not this checkout's to check
    path_part, _, anchor = target.partition("#")
    dest = (page.path.parent / path_part).resolve() if path_part else page.path
    if not dest.exists():
        return f"{page.name}: link to {target!r}: no such file"
    if not anchor:
        return None
    if dest.suffix != ".md":
        return f"{page.name}: link to {target!r}: an anchor into a file that is not Markdown"
    if anchor not in _anchors(dest):
        return f"{page.name}: link to {target!r}: {dest.name} has no heading with anchor #{anchor}"
    return None


def test_every_relative_link_reaches_a_file_and_its_anchor_a_heading():
    problems = [p for doc in DOCS for target in _links(_page(doc))
                if (p := _link_problem(_page(doc), target))]
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_the_readme_links_every_page_of_docs():
    linked = {(README.parent / t.partition("#")[0]).resolve()
              for t in _links(_page(README)) if not _SCHEME.match(t)}
    pages = [p for p in (ROOT / "docs").iterdir() if p.suffix in (".md", ".png")]
    missing = sorted(p.name for p in pages if p.resolve() not in linked)
    assert not missing, f"docs/ pages the README's map does not link: {missing}"


def test_the_readme_opens_with_make_run_and_make_test():
    first_block = _page(README).code_lines[:2]
    assert [line.split()[:2] for line in first_block] == [["make", "run"], ["make", "test"]], \
        f"the README's first code block should be `make run` then `make test`, not {first_block}"
    quickstart = _page(README).prose.split("## Quickstart", 1)[-1].split("\n## ", 1)[0]
    assert "open http://127.0.0.1:8080" in " ".join(quickstart.split()), \
        "the README's quickstart no longer says to open http://127.0.0.1:8080"


def _makefile_targets() -> set[str]:
    targets = set()
    for line in (ROOT / "Makefile").read_text().splitlines():
        m = re.match(r"^([^\s#=:][^=:]*?)\s*::?(?!=)", line)
        if m:
            targets.update(t for t in m.group(1).split() if "$" not in t and not t.startswith("."))
    return targets


def _make_targets_named(page: Page) -> list[str]:
    named = [m.group(1) for span in page.code_spans
             if (m := re.match(r"make\s+([A-Za-z_][\w.-]*)", span))]
    for line in page.code_lines:  # a command, not the verb in a comment
        named += re.findall(r"(?:^\s*|[;&|(]\s*|\$\s+)make\s+([A-Za-z_][\w.-]*)", line)
    return named


def test_every_make_target_named_exists():
    targets = _makefile_targets()
    assert {"run", "test"} <= targets, f"Makefile targets read wrongly: {sorted(targets)}"
    problems = [f"{doc.name}: `make {t}`" for doc in map(_page, DOCS)
                for t in _make_targets_named(doc) if t not in targets]
    assert not problems, f"make targets the Makefile lacks (it has {sorted(targets)}):\n" + "\n".join(problems)


def _bench_scenarios() -> set[str]:
    """The names registered with @scenario("NAME") in bench/, read without importing the scenarios."""
    names = set()
    for path in (ROOT / "bench").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "scenario"
                    and node.args and isinstance(node.args[0], ast.Constant)):
                names.add(node.args[0].value)
    return names


def test_every_bench_scenario_named_is_registered():
    scenarios = _bench_scenarios()
    assert {"voice_loop", "soak"} <= scenarios, f"bench scenarios read wrongly: {sorted(scenarios)}"
    problems = []
    for doc in map(_page, DOCS):
        for code in doc.code():
            for m in re.finditer(r"(?:python -m bench|remotemedia-engine bench)((?:[ \t]+[a-z0-9_]+)+)", code):
                problems += [f"{doc.name}: {m.group(0)!r}: {name}" for name in m.group(1).split()
                             if name not in scenarios | _BENCH_WORDS]
    assert not problems, "bench scenarios that are not registered:\n" + "\n".join(problems)


@functools.cache
def _cli_help(command: str | None) -> str | None:
    """`remotemedia-engine [COMMAND] --help`, or None when COMMAND is not a subcommand."""
    args = [sys.executable, "-m", "engine", *([command] if command else []), "--help"]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        assert "invalid choice" in done.stderr, f"{' '.join(args[1:])} failed: {done.stderr}"
        return None
    return done.stdout


def _cli_uses(page: Page) -> list[tuple[str, str]]:
    """(command, the rest of its line) for each `remotemedia-engine COMMAND ...` in the page's code,
    and each inline span that starts with a subcommand and shows a flag (`serve --http-port 8080`)."""
    uses = []
    for code in page.code():
        code = code.split(" #")[0]  # a shell comment says, it does not run
        for m in re.finditer(rf"{_CLI}[ \t]+(\S+)(.*)", code):
            uses.append((m.group(1), m.group(2)))
    for span in page.code_spans:
        m = re.match(r"(serve|run|validate|nodes|cleanup)\s+(--.*)", span)
        if m:
            uses.append((m.group(1), m.group(2)))
    return uses


def test_every_cli_subcommand_and_flag_named_exists():
    top = _cli_help(None)
    assert top, "remotemedia-engine --help failed"
    problems = []
    for doc in map(_page, DOCS):
        for command, rest in _cli_uses(doc):
            if command.startswith("-"):
                flags, help_text = [command.split("=")[0]], top
            else:
                help_text = _cli_help(command)
                if help_text is None:
                    problems.append(f"{doc.name}: `{_CLI} {command}`: no such subcommand")
                    continue
                # bench hands its words to python -m bench, checked above
                flags = [] if command == "bench" else re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", rest)
            known = set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", help_text))
            problems += [f"{doc.name}: `{_CLI} {command}` has no {flag}" for flag in flags if flag not in known]
    assert not problems, "command lines the CLI does not accept:\n" + "\n".join(problems)


def test_every_examples_file_named_exists():
    problems = [f"{doc.name}: {m.group(0)}" for doc in DOCS
                for m in _EXAMPLE_FILE.finditer(doc.read_text()) if not (ROOT / m.group(0)).is_file()]
    assert not problems, "files under examples/ that are not there:\n" + "\n".join(problems)
