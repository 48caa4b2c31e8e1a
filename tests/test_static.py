"""Static checks of the source checkout: ruff's lint rules (the format check among them) and mypy's types.

Their configuration is in pyproject.toml (`[tool.ruff]`, `[tool.mypy]`). The format check is pycodestyle's rules
(`E`, `W`; lines at most 120 characters) in `ruff check`, not `ruff format` (docs/contributing.md#checks says why).
Each test runs the tool as a developer would and fails with the tool's own report. They read the checkout, so
they skip where poslens is installed from a wheel (no pyproject.toml beside the package).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import poslens

ROOT = Path(poslens.__file__).parent
pytestmark = pytest.mark.skipif(not (ROOT / "pyproject.toml").is_file(),
                                reason="the static checks read a source checkout (poslens is installed from a wheel)")


def run_tool(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m <args>` from the repository root, so the tool reads its settings from pyproject.toml."""
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def report(result: subprocess.CompletedProcess) -> str:
    return f"`{' '.join(result.args[2:])}` exited with {result.returncode}:\n{result.stdout}{result.stderr}"


def test_ruff_lint_is_clean():
    pytest.importorskip("ruff", reason="ruff is in the test extra: pip install -e '.[test]'")
    result = run_tool("ruff", "check", ".")
    assert result.returncode == 0, report(result)


def test_mypy_finds_no_type_errors(tmp_path, request):
    """mypy on the packages `[tool.mypy] packages` names. The repository root is the package itself, so it is
    linked as `poslens` in a temporary folder that goes on mypy's search path (`MYPYPATH`)."""
    pytest.importorskip("mypy", reason="mypy is in the test extra: pip install -e '.[test]'")
    (tmp_path / "poslens").symlink_to(ROOT, target_is_directory=True)
    # Kept between runs in pytest's cache folder: a cold check reads torch and TransformerLens (seconds), a warm
    # one only what changed.
    cache = request.config.cache.mkdir("mypy") if request.config.cache is not None else tmp_path / "mypy-cache"
    env = {**os.environ, "MYPYPATH": str(tmp_path)}
    result = run_tool("mypy", "--config-file", str(ROOT / "pyproject.toml"), "--cache-dir", str(cache), env=env)
    assert result.returncode == 0, report(result)
    checked = re.search(r"no issues found in (\d+) source files", result.stdout)
    assert checked and int(checked[1]) >= 25, report(result)  # the four packages, not an empty selection
