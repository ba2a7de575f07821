"""The one mapping from a regime's name to its :class:`~continual_mem.regimes.spec.RegimeSpec`."""
from __future__ import annotations

from .spec import PATHS, RegimeSpec

_REGISTRY: dict[str, RegimeSpec] = {}


def register(*specs: RegimeSpec) -> None:
    """Make regimes known by name (a family module calls this once, at import)."""
    for spec in specs:
        if spec.name in _REGISTRY and _REGISTRY[spec.name] is not spec:
            raise ValueError(f"regime {spec.name!r} is registered twice; give the new one another name")
        _REGISTRY[spec.name] = spec


def unregister(name: str) -> None:
    """Forget a regime (tests that register a plug-in of their own)."""
    _REGISTRY.pop(name, None)


def get_regime(name: str) -> RegimeSpec:
    """The regime called ``name``; ``ValueError`` naming the known ones otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown regime {name!r}; choose one of {', '.join(regime_names())}") from None


def regime_names() -> tuple[str, ...]:
    """Every registered regime, by path (head, token, side, then own passes), each family in its own order."""
    specs = list(_REGISTRY.values())
    return tuple(s.name for s in sorted(specs, key=lambda s: PATHS.index(s.path)))
