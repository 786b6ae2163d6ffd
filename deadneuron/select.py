"""Selectors: shell-style globs over site names, module names and activation kinds.

``encoder.*`` matches every site under ``encoder``; ``kind:gelu`` (or just ``gelu``) matches every GELU
site. A site is selected when any of its names matches any pattern.
"""

from __future__ import annotations

import glob
from collections.abc import Iterable, Sequence
from fnmatch import fnmatchcase


def matches(candidates: Iterable[str], patterns: Sequence[str]) -> bool:
    names = [c for c in candidates if c]
    return any(fnmatchcase(n, p) for p in patterns for n in names)


def site_selector(site: str) -> str:
    """The selector that picks exactly the site named ``site``: its name with glob characters escaped; a
    site named by a bare word (a module at the model's top, ``relu``) would also read as a kind, so its
    module is selected instead (``module:relu``); a top-level Sequential index (``5``) is kept."""
    word = not site.isdigit() and not any(ch in site for ch in ".>#:")  # a Sequential index is no kind
    return f"module:{glob.escape(site)}" if word else glob.escape(site)

