"""Regimes as plug-ins: each family module declares its regimes (:class:`RegimeSpec`) and registers them here.

Every module of this package other than ``spec`` and ``registry`` is a family and is imported on first use, so a
new regime is one new module (plus its test). Outside code may :func:`register` its own.
"""
from __future__ import annotations

import importlib
import pkgutil

from .registry import get_regime, regime_names, register, unregister
from .spec import PATHS, RegimeSpec

_INFRASTRUCTURE = frozenset({"spec", "registry"})

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name not in _INFRASTRUCTURE:
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["PATHS", "RegimeSpec", "get_regime", "regime_names", "register", "unregister"]
