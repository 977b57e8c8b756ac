"""Names a package re-exports from its modules, loaded on first use (PEP 562), so that importing the package alone
costs nothing: `opd` re-exports the losses without importing torch, `opd.lm` the loop's common names."""

from __future__ import annotations

import importlib
import sys
from typing import Callable


def lazy_exports(package: str, home: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """The `__getattr__` and `__dir__` of `package`: name -> `getattr(import_module(f"{package}.{home[name]}"), name)`
    on first use, then kept in the package's namespace so later lookups skip `__getattr__`."""
    def __getattr__(name: str):
        if name not in home:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{home[name]}"), name)
        vars(sys.modules[package])[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted([*vars(sys.modules[package]), *home])

    return __getattr__, __dir__
