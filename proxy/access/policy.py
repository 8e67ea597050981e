"""Access rules: who may pull which repository, first matching rule wins.

A rule matches a repository's *full name*, `<upstream>/<repository as the upstream
knows it>` (`docker.io/library/alpine`, `registry.example:5000/team/app`), with a glob:
`*` stands for any characters within one path component (`app-*`, or a whole
component), and a component that is exactly `**` stands for any number of components,
none included (`ghcr.io/acme/**` covers `ghcr.io/acme` and everything below it).
Repositories no rule matches fall to the default.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol

from proxy.registries import DOCKER_HUB, DOCKER_HUB_ALIASES

ANYONE = "anyone"
AUTHENTICATED = "authenticated"
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Pull = str | tuple[str, ...]  # ANYONE, AUTHENTICATED, or user names and "group:<name>"


class RuleConfig(Protocol):
    """A configured rule (`[[access]]`, proxy.config.AccessRule), as `Policy` reads it."""

    @property
    def repository(self) -> str: ...

    @property
    def pull(self) -> Pull: ...

    @property
    def networks(self) -> tuple[Network, ...]: ...


@dataclass(frozen=True, slots=True)
class User:
    """Someone who proved who they are (a password, or a token issued for them)."""

    name: str
    groups: frozenset[str] = frozenset()


def full_name(upstream: str, repo: str) -> str:
    """What rules match: Docker Hub under one name whatever alias the upstream was given."""
    return f"{DOCKER_HUB if upstream in DOCKER_HUB_ALIASES else upstream}/{repo}"


def compile_glob(pattern: str) -> re.Pattern[str]:
    """A regex for `pattern`, to be matched against the full name plus a trailing "/"."""
    parts = []
    for component in pattern.split("/"):
        if component == "**":
            parts.append("(?:[^/]+/)*")
        else:
            parts.append("[^/]*".join(re.escape(piece) for piece in component.split("*")) + "/")
    return re.compile("".join(parts))


@dataclass(frozen=True, slots=True)
class Rule:
    pattern: str
    regex: re.Pattern[str]
    pull: Pull
    networks: tuple[Network, ...] = ()

    @property
    def public(self) -> bool:
        return self.pull == ANYONE

    def admits(self, user: User | None) -> bool:
        """Whether `user` (None: anonymous) may pull, credentials being what counts."""
        if self.pull == ANYONE:
            return True
        if user is None:
            return False
        if self.pull == AUTHENTICATED:
            return True
        return user.name in self.pull or any(f"group:{group}" in self.pull for group in user.groups)

    def trusts(self, address: Address | None) -> bool:
        """Whether a client at `address` gets this rule's access without credentials."""
        return address is not None and any(address in network for network in self.networks)


class Policy:
    def __init__(self, rules: Sequence[RuleConfig], default: Pull) -> None:
        self.rules = [Rule(r.repository, compile_glob(r.repository), r.pull, r.networks) for r in rules]
        self.default = Rule("(default)", compile_glob("**"), default)
        self.open = self.default.public and all(rule.public for rule in self.rules)
        self.rule_for = lru_cache(maxsize=8192)(self._first_match)

    def _first_match(self, name: str) -> Rule:
        subject = name + "/"
        return next((rule for rule in self.rules if rule.regex.fullmatch(subject)), self.default)

    def allows(self, name: str, user: User | None, address: Address | None) -> bool:
        rule = self.rule_for(name)
        return rule.admits(user) or rule.trusts(address)
