"""Which repository names are hosted: the `[hosted] repositories` globs, matched as access rules match."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from proxy.access.policy import compile_glob


class HostedNames:
    def __init__(self, patterns: Sequence[str]) -> None:
        self._regexes = [compile_glob(pattern) for pattern in patterns]
        self.matches = lru_cache(maxsize=8192)(self._matches)

    def _matches(self, name: str) -> bool:
        subject = name + "/"
        return any(regex.fullmatch(subject) for regex in self._regexes)
