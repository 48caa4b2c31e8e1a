"""Renamed public names keep their old name for one release: it still works and warns, naming the new one."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import poslens
from poslens.analyses import executors
from poslens.analyses.measures import cut_effects, probe_sweep, swaps
from poslens.hooks import cuts
from poslens.variants import config

MODULES = [("poslens.analyses.sweep", "poslens.analyses.executors", executors),
           ("poslens.hooks.interventions", "poslens.hooks.cuts", cuts)]


@pytest.mark.parametrize(("old", "new", "module"), MODULES)
def test_an_old_module_name_is_the_new_module_and_warns(old, new, module):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=rf"{old} is renamed {new}; the old name goes in the next release"):
        alias = importlib.import_module(old)
    assert alias is module


def test_the_split_interventions_module_still_serves_its_names():
    sys.modules.pop("poslens.analyses.measures.interventions", None)
    with pytest.warns(DeprecationWarning, match="measures.swaps and poslens.analyses.measures.cut_effects"):
        old = importlib.import_module("poslens.analyses.measures.interventions")
    assert old.residual_cut_effects is cut_effects.residual_cut_effects
    assert ((old.position_swap, old.swap_readout, old.exchange)
            == (swaps.position_swap, swaps.swap_readout, swaps.exchange))


@pytest.mark.parametrize(("namespace", "old", "new"), [
    (poslens, "preset", "variant_config"),
    (poslens, "probe_sweep", "probe_table"),
    (poslens.variants, "preset", "variant_config"),
    (poslens.variants, "PRESET_NAMES", "VARIANT_NAMES"),
    (config, "preset", "variant_config"),
    (poslens.analyses, "probe_sweep", "probe_table"),
    (poslens.analyses, "sweep_probes", "run_probe_sweep"),
    (probe_sweep, "probe_sweep", "probe_table"),
    (probe_sweep, "sweep_probes", "run_probe_sweep"),
])
def test_an_old_name_is_the_new_object_and_warns(namespace, old, new):
    with pytest.warns(DeprecationWarning, match=rf"{namespace.__name__}\.{old} is renamed {namespace.__name__}\.{new}"):
        alias = getattr(namespace, old)
    assert alias is getattr(namespace, new)
    assert old not in getattr(namespace, "__all__", ())


def test_unknown_names_still_fail_plainly():
    for namespace in (poslens, poslens.variants, poslens.analyses, probe_sweep):
        with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
            namespace.no_such_name  # noqa: B018


def test_the_warning_points_at_the_users_line_so_python_shows_it():
    """Python shows a DeprecationWarning by default only when it is attributed to `__main__`."""
    script = "from poslens.variants import preset\nimport poslens.analyses.sweep\n"
    result = subprocess.run([sys.executable, "-P", "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "<string>:1: DeprecationWarning: poslens.variants.preset is renamed" in result.stderr
    assert ("<string>:2: DeprecationWarning: poslens.analyses.sweep is renamed poslens.analyses.executors"
            in result.stderr)
