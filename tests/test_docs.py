"""The manual works: the site builds with warnings as errors, every code block of README.md and docs/ runs,
the API reference lists every public name, and the README stays a short introduction whose test command is
the one CI runs.

Code blocks: the ```python blocks of one page run in order in one fresh namespace, in a temporary working
directory. A block preceded by the line `<!-- docs: compile-only (reason) -->` is only compiled
(docs/contributing.md).
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import poslens

pytestmark = pytest.mark.docs

ROOT = Path(poslens.__file__).parent
SUBPACKAGES = ("tasks", "variants", "hooks", "probes", "analyses", "demos")
COMPILE_ONLY = "<!-- docs: compile-only"
BLOCK = re.compile(r"^(?P<marker><!-- docs: compile-only[^\n]*-->\n)?```python\n(?P<code>.*?)^```", re.M | re.S)
README_MAX_LINES = 150
# analyses/tables.py sits at the 420-line limit of tests/test_layout.py: its functions other than export_table keep
# their prose docstrings until the module is split.
NO_SECTIONS_YET = {"read_table", "render_table", "side_by_side", "summarise_seeds", "wide_table", "export_tables"}
# Pages named in mkdocs.yml's nav that other branches are writing (docs/<topic>.md and benchmarks/results/<topic>.md);
# once they have landed, remove them here: any other missing nav page fails `test_every_nav_page_exists`.
PLANNED: set[str] = set()  # pages the nav may name before they exist


def pages() -> list[Path]:
    """README.md and every Markdown page of the site (docs/, the changelog and benchmarks/results/ by topic)."""
    docs = [path for path in sorted((ROOT / "docs").rglob("*.md")) if not path.is_symlink()]
    return [ROOT / "README.md", ROOT / "CHANGELOG.md", *docs, *sorted((ROOT / "benchmarks" / "results").glob("*.md"))]


def blocks(page: Path) -> list[tuple[int, str, bool]]:
    """The page's ```python blocks: (line number, code, compile only)."""
    text = page.read_text(encoding="utf-8")
    return [(text[: match.start("code")].count("\n") + 1, match["code"], match["marker"] is not None)
            for match in BLOCK.finditer(text)]


def test_the_block_reader_finds_what_is_there(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("intro\n```python\nx = 1\n```\n```bash\nls\n```\n<!-- docs: compile-only (network) -->\n"
                    "```python\nload('hub')\n```\n", encoding="utf-8")
    assert blocks(page) == [(3, "x = 1\n", False), (10, "load('hub')\n", True)]


@pytest.mark.parametrize("page", [path for path in pages() if blocks(path)], ids=lambda path: path.name)
def test_every_code_block_runs(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)  # tiny models gain nothing from threads; the shared CI machine gains a lot
    namespace = {"__name__": f"docs:{page.name}"}
    for line, code, compile_only in blocks(page):
        compiled = compile(code, f"{page.relative_to(ROOT)}:{line}", "exec")
        if not compile_only:
            exec(compiled, namespace)


def test_compile_only_blocks_stay_rare():
    marked = [(page.name, line) for page in pages() for line, _, compile_only in blocks(page) if compile_only]
    assert len(marked) <= 6, f"{marked}: most code blocks must run; keep compile-only blocks for network or hours"


def test_the_site_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs", reason="the docs build needs the docs extra: pip install -e '.[docs]'")
    pytest.importorskip("mkdocstrings_handlers.python", reason="the API reference needs mkdocstrings[python]: "
                                                               "pip install -e '.[docs]'")
    # mkdocstrings reads the source of the `poslens` that is imported here, wherever it is installed from
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "poslens").symlink_to(ROOT, target_is_directory=True)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "src"), "NO_MKDOCS_2_WARNING": "1"}
    built = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-4000:]
    api = (tmp_path / "site" / "api" / "analyses" / "index.html").read_text(encoding="utf-8")
    assert 'id="poslens.analyses.measures.probe_sweep.probe_table"' in api  # the reference is generated
    assert (tmp_path / "site" / "guide" / "patching" / "index.html").is_file()


def nav_pages() -> list[str]:
    text = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    nav = text[text.index("\nnav:"):]
    return re.findall(r":\s*([\w/.-]+\.md)\s*$", nav, re.M)


def test_every_nav_page_exists_and_every_page_is_in_the_nav():
    nav = nav_pages()
    missing = [page for page in nav if not (ROOT / "docs" / page).exists()]
    assert set(missing) <= PLANNED, f"pages in mkdocs.yml's nav that do not exist: {sorted(set(missing) - PLANNED)}"
    on_disk = {path.relative_to(ROOT / "docs").as_posix() for path in (ROOT / "docs").rglob("*.md")}
    assert on_disk <= set(nav), f"pages missing from mkdocs.yml's nav: {sorted(on_disk - set(nav))}"


@pytest.mark.parametrize("package", SUBPACKAGES)
def test_the_api_reference_lists_every_public_name(package):
    module = importlib.import_module(f"poslens.{package}")
    page = (ROOT / "docs" / "api" / f"{package}.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^::: poslens\.[\w.]*\.(\w+)$", page, re.M))
    assert set(module.__all__) <= documented, f"docs/api/{package}.md lacks {sorted(set(module.__all__) - documented)}"
    for name in module.__all__:
        getattr(module, name)  # every exported name resolves
    index = (ROOT / "docs" / "api" / "index.md").read_text(encoding="utf-8")
    assert all(f"`{name}`" in index for name in poslens.__all__)


def test_readme_is_short_and_its_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= README_MAX_LINES
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()[-1]
    assert ci in readme, f"the README must show .ci/run's command verbatim: {ci}"
    assert "load average" not in readme and "this machine" not in readme


def public_functions() -> dict[str, object]:
    """Every function among the top-level exports and the subpackages' `__all__`, by qualified name."""
    found = {f"poslens.{name}": getattr(poslens, name) for name in poslens.__all__}
    for package in SUBPACKAGES:
        module = importlib.import_module(f"poslens.{package}")
        found.update({f"poslens.{package}.{name}": getattr(module, name) for name in module.__all__})
    return {name: inspect.unwrap(obj) for name, obj in found.items() if inspect.isfunction(inspect.unwrap(obj))}


def test_public_functions_document_their_arguments_and_result():
    bad = []
    for name, function in public_functions().items():
        if function.__name__ in NO_SECTIONS_YET:
            continue
        doc, signature = inspect.getdoc(function) or "", inspect.signature(function)
        params = sorted(signature.parameters)
        args = doc.split("Args:")[1].split("Returns:")[0] if "Args:" in doc else ""
        documented = sorted(re.findall(r"^    \**(\w+)(?: \([^)]*\))?:", args, re.M))
        returns = "Returns:" in doc or signature.return_annotation in (None, "None")
        if documented != params or not returns:
            bad.append(f"{name}: Args {documented} for parameters {params}" + ("" if returns else ", no Returns"))
    assert not bad, "\n".join(bad)
