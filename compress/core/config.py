"""Helpers for typed configs: value checks that name the key and the valid choices, and the few parsers
every config group shares. Import-light (no torch): the CLI validates before anything heavy loads."""

from __future__ import annotations

import os
import re
from typing import Any, Iterable, Optional, Tuple

from compress.core.errors import ConfigError


def choice(key: str, value: Any, choices: Iterable) -> None:
    choices = list(choices)
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not valid. Valid choices: {', '.join(map(str, choices))}")


def positive(key: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{key}={value!r} is not valid: it must be a positive integer")


def non_negative(key: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"{key}={value!r} is not valid: it must be an integer >= 0")


def fraction(key: str, value: Any, lo: float = 0.0, hi: float = 1.0, lo_open: bool = False,
             hi_open: bool = True) -> None:
    """``value`` a number in the interval (``lo``, ``hi``) with the given open / closed ends."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        v = float(value)
        ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise ConfigError(f"{key}={value!r} is not valid: it must be in {interval}")


def regexes(key: str, values: Iterable[str]) -> None:
    for rx in values:
        try:
            re.compile(rx)
        except re.error as e:
            raise ConfigError(f"{key} has an invalid regex {rx!r}: {e}") from None


def tristate(key: str, value: Any) -> str:
    """``auto`` / ``true`` / ``false`` from a bool or a string (Hydra gives either)."""
    v = ("true" if value else "false") if isinstance(value, bool) else str(value).lower()
    choice(key, v, ("auto", "true", "false"))
    return v


def parse_pattern(pattern: str, key: str = "prune.pattern") -> Optional[Tuple[int, int]]:
    """``"unstructured"`` -> None; ``"2:4"`` -> (2, 4) meaning 2 weights kept in every 4."""
    if pattern == "unstructured":
        return None
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(pattern))
    if not m:
        raise ConfigError(f"{key}={pattern!r} is not valid. Valid choices: 'unstructured' or 'N:M' with 0 < N < M "
                          "(e.g. 2:4, 4:8)")
    n, m_ = int(m.group(1)), int(m.group(2))
    if not 0 < n < m_:
        raise ConfigError(f"{key}={pattern!r} is not valid: N:M needs 0 < N < M (N weights kept in every M)")
    return n, m_


def dataset_key(source: str) -> str:
    """The metric key of an eval dataset: a named source as is (``wikitext2``), a local file by its stem
    (``metrics.ppl.my_corpus`` for ``/data/my_corpus.txt``)."""
    if "/" in source or "\\" in source or "." in source:
        return os.path.splitext(os.path.basename(source))[0] or source
    return source
