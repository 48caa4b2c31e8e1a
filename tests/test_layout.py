"""The package is what the README says it is: one `poslens` namespace, a one-way flow, small modules."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import poslens

ROOT = Path(poslens.__file__).parent
FLOW = ("tasks", "variants", "hooks", "probes", "analyses", "demos")


def poslens_imports(path: Path) -> set[str]:
    """Every `poslens.<...>` module a file imports (at any depth, lazy imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name == "poslens" or name.startswith("poslens.")}


def package_files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", FLOW)
def test_no_package_imports_one_to_its_right(package):
    right = {f"poslens.{other}" for other in FLOW[FLOW.index(package) + 1:]}
    for path in package_files(package):
        bad = {name for name in poslens_imports(path) if ".".join(name.split(".")[:2]) in right}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}, to the right of {package}"
        assert "poslens" not in poslens_imports(path), f"{path} imports the top-level poslens package"


def test_no_experiment_imports_another_and_measures_import_no_experiment():
    experiments = {f"poslens.analyses.experiments.{p.stem}" for p in package_files("analyses/experiments")
                   if p.stem not in ("__init__", "presets")}
    for path in package_files("analyses/experiments"):
        own = f"poslens.analyses.experiments.{path.stem}"
        assert not (poslens_imports(path) & (experiments - {own})), path
    for path in [*package_files("analyses/measures"), *package_files("analyses/figures")]:
        assert not any(name.startswith("poslens.analyses.experiments") for name in poslens_imports(path)), path


def test_analysis_and_demo_modules_stay_small():
    for path in [*package_files("analyses"), *package_files("demos")]:
        n_lines = len(path.read_text(encoding="utf-8").splitlines())
        assert n_lines <= 420, f"{path.relative_to(ROOT)} has {n_lines} lines"


def test_variants_import_nothing_from_tasks():
    for path in package_files("variants"):
        assert not any(name.startswith("poslens.tasks") for name in poslens_imports(path)), path


def test_bare_package_names_do_not_import_outside_the_repository(tmp_path):
    """Run from elsewhere with the working directory off sys.path: only the poslens namespace exists."""
    script = "import poslens.probes, poslens.cli\n" \
             "for name in ('hooks', 'probes', 'variants', 'tasks', 'analyses', 'demos'):\n" \
             "    try:\n        __import__(name)\n    except ModuleNotFoundError:\n        continue\n" \
             "    raise SystemExit(f'bare {name} imported')\n"
    result = subprocess.run([sys.executable, "-P", "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr + result.stdout


def test_the_wheel_installs_poslens_and_nothing_else(tmp_path):
    # a build writes build/ and *.egg-info beside the sources: keep them out of the checkout
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", "runs", "build", "dist", "*.egg-info",
                                                                "__pycache__", ".pytest_cache", ".hypothesis"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(tmp_path), str(source)], check=True, capture_output=True)
    [wheel] = tmp_path.glob("poslens-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if ".dist-info/" not in name}
    assert top_level == {"poslens"}
    packages = {str(Path(name).parent) for name in names if name.endswith("__init__.py")}
    assert {f"poslens/{package}" for package in FLOW} <= packages
    assert not any(name.startswith(("poslens/tests", "poslens/benchmarks")) for name in names)
    entry_points = next(name for name in names if name.endswith("entry_points.txt"))
    assert "poslens = poslens.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
