"""The method registry: every pruning method, quantizer, structured importance and block transform
registers itself here, from its own module, with its name, its config dataclass (only its own fields)
and its implementation. Nothing else names a method: the Hydra group options, ``compress list``,
validation and ``compare``'s labels are read from here.

A method module does::

    @dataclass
    class RIAConfig(CalibratedMaskConfig):
        method: str = "ria"
        a: float = 0.5

    @register("prune", "ria", RIAConfig)
    class RIA(MaskMethod):
        ...

Kinds (the config group a method is chosen in) and the stage that runs it:

* ``prune``: masks for linears (stage ``prune``), or structured removal (stage ``structured``);
* ``quant``: quantizers (stage ``quant``);
* ``transform``: block transforms applied inside the quant stage before its quantizer (AWQ);
* ``importance``: structural importances, chosen by ``prune.importance`` of the structured method.

This module is import-light (no torch): configs are validated before anything heavy loads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from compress.core.errors import ConfigError

KINDS = ("prune", "quant", "transform", "importance")


@dataclass
class MethodConfig:
    """Base of every method's config. ``method`` names the registered method (set by the group option);
    subclasses add their own fields and extend :meth:`validate`. ``group`` is the config group, for
    messages (``prune.sparsity=...``)."""

    method: str = "none"

    group = "method"  # class attribute, set by register()

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Check every value; raise :class:`ConfigError` naming ``<group>.<key>`` and the valid values."""

    def key(self, name: str) -> str:
        return f"{self.group}.{name}"

    def label(self) -> str:
        """A short description of the setting for tables and plots (``compress compare``)."""
        return self.method

    @classmethod
    def keys(cls) -> List[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def changed(self) -> Dict[str, Any]:
        """The fields whose values differ from the class defaults."""
        out = {}
        for f in dataclasses.fields(self):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if getattr(self, f.name) != default:
                out[f.name] = getattr(self, f.name)
        return out


@dataclass
class NoneConfig(MethodConfig):
    """The slot is off (no prune / quant stage, no transform)."""

    method: str = "none"


@dataclass(frozen=True)
class MethodSpec:
    kind: str
    name: str
    config: type
    impl: Any
    stage: Optional[str]  # the stage that runs it (None: nothing runs, e.g. "none")
    summary: str
    # keys of a shared config that only this method uses (structured importances): refused with another
    owns: Tuple[str, ...] = field(default=())
    module: str = ""


_REGISTRY: Dict[str, Dict[str, MethodSpec]] = {k: {} for k in KINDS}


def _summary(obj) -> str:
    doc = (getattr(obj, "__doc__", None) or "").strip()
    return doc.splitlines()[0].rstrip(".") if doc else ""


def register(kind: str, name: str, config: Optional[type] = None, stage: Optional[str] = None,
             owns: Tuple[str, ...] = ()) -> Callable:
    """Class or function decorator: register ``impl`` as method ``name`` of ``kind`` with its ``config``
    dataclass (a :class:`MethodConfig` subclass whose ``method`` default is ``name``). ``stage``: the
    stage that runs it (default: the kind's own, ``prune`` / ``quant``; transforms run in ``quant``)."""
    if kind not in KINDS:
        raise ValueError(f"unknown method kind {kind!r}; valid: {', '.join(KINDS)}")

    def deco(impl):
        if name in _REGISTRY[kind]:
            raise ValueError(f"{kind} method {name!r} is registered twice ({_REGISTRY[kind][name].module} and "
                             f"{getattr(impl, '__module__', '?')})")
        if config is not None:
            default = next((f.default for f in dataclasses.fields(config) if f.name == "method"), None)
            if default != name:
                raise ValueError(f"{config.__name__}.method defaults to {default!r}, not {name!r}")
            config.group = kind
        _REGISTRY[kind][name] = MethodSpec(kind, name, config, impl, stage if stage is not None else
                                           {"prune": "prune", "quant": "quant", "transform": "quant"}.get(kind),
                                           _summary(impl) or _summary(config), tuple(owns),
                                           getattr(impl, "__module__", ""))
        return impl
    return deco


def register_none(kind: str) -> None:
    """The ``none`` option of a group (the slot is off)."""
    if "none" not in _REGISTRY[kind]:
        _REGISTRY[kind]["none"] = MethodSpec(kind, "none", NoneConfig, None, None, "off")


for _kind in ("prune", "quant", "transform"):
    register_none(_kind)


def names(kind: str) -> List[str]:
    return sorted(_REGISTRY[kind])


def specs(kind: str) -> List[MethodSpec]:
    return [_REGISTRY[kind][n] for n in names(kind)]


def get(kind: str, name: str) -> MethodSpec:
    spec = _REGISTRY[kind].get(name)
    if spec is None:
        raise ConfigError(f"{kind}={name!r} is not a registered {kind} method. Valid choices: "
                          f"{', '.join(names(kind))}")
    return spec


def spec_of(cfg: MethodConfig, group: Optional[str] = None) -> MethodSpec:
    """The registered method a config belongs to (``group``: needed for ``none``, which every group has)."""
    return get(group or type(cfg).group, cfg.method)


def make_config(kind: str, name: str, **values) -> MethodConfig:
    """``make_config("prune", "wanda", pattern="2:4")``: the method's config, with a key it does not have
    refused by name."""
    spec = get(kind, name)
    bad = [k for k in values if k not in spec.config.keys()]
    if bad:
        raise ConfigError(not_a_key(kind, name, bad[0]))
    return spec.config(**values)


def not_a_key(kind: str, name: str, key: str) -> str:
    spec = get(kind, name)
    owner = [s.name for s in specs(kind) if s.config is not None and key in s.config.keys()]
    hint = f" It is a key of {kind}={'|'.join(owner)}." if owner else ""
    return (f"{kind}.{key} is not a key of {kind}={name} ({spec.config.__name__}).{hint} Keys of {kind}={name}: "
            + ", ".join(k for k in spec.config.keys() if k != "method"))
