"""Old names kept for one release after a rename: each still works and warns, naming the new one.

A rename that users may have met in the README or the docs keeps its old name for a release, so
that a notebook written against it runs and is told what to change. An old module name warns when
it is first imported; an old function or constant name warns when it is looked up (`from m import
old`, `m.old`), through the module's `__getattr__` (PEP 562). Both warn with a `DeprecationWarning`
attributed to the user's line, so Python shows it there by default.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Mapping
from typing import Any


def warn_renamed(old: str, new: str) -> None:
    """Warn that `old` is now `new`, attributed to the line that used `old`.

    Called at the top level of an old module, or by `renamed_attributes`: two frames up is the
    user's line (Python skips the import machinery's frames).

    Args:
        old: the old dotted name.
        new: the new dotted name(s).
    """
    warnings.warn(f"{old} is renamed {new}; the old name goes in the next release", DeprecationWarning, stacklevel=3)


def renamed_attributes(module: str, renames: Mapping[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` that resolves each old name to its new one, with a `warn_renamed` warning.

    Args:
        module: the module's `__name__` (its new names are looked up there, on first use).
        renames: old name → new name, both in `module`.

    Returns:
        The `__getattr__` to assign in `module`.
    """
    def getattr_(name: str) -> Any:
        if name not in renames:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        warn_renamed(f"{module}.{name}", f"{module}.{renames[name]}")
        return getattr(sys.modules[module], renames[name])

    return getattr_
