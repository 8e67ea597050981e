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
from enum import StrEnum
from functools import lru_cache
from typing import Protocol

from proxy.registries import DOCKER_HUB, DOCKER_HUB_ALIASES

ANYONE = "anyone"
AUTHENTICATED = "authenticated"
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Pull = str | tuple[str, ...]  # ANYONE, AUTHENTICATED, or user names and "group:<name>"


class Action(StrEnum):
    """What a caller asks to do with a repository, as token scopes name it."""

    PULL = "pull"
    PUSH = "push"
    DELETE = "delete"


class RuleConfig(Protocol):
    """A configured rule (`[[access]]`, proxy.config.AccessRule), as `Policy` reads it."""

    @property
    def repository(self) -> str: ...

    @property
    def pull(self) -> Pull: ...

    @property
    def networks(self) -> tuple[Network, ...]: ...

    @property
    def push(self) -> Pull | None: ...

    @property
    def delete(self) -> Pull | None: ...


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
    push: Pull = ()
    delete: Pull = ()

    @property
    def public(self) -> bool:
        return self.pull == ANYONE

    def who(self, action: Action) -> Pull:
        return self.pull if action is Action.PULL else self.push if action is Action.PUSH else self.delete

    def admits(self, user: User | None, action: Action = Action.PULL) -> bool:
        """Whether `user` (None: anonymous) may do `action`, credentials being what counts."""
        who = self.who(action)
        if who == ANYONE:
            return True
        if user is None:
            return False
        if who == AUTHENTICATED:
            return True
        return user.name in who or any(f"group:{group}" in who for group in user.groups)

    def trusts(self, address: Address | None) -> bool:
        """Whether a client at `address` gets this rule's access without credentials."""
        return address is not None and any(address in network for network in self.networks)


class Policy:
    """`writers`: who may push and delete where a rule does not say (anyone without `[auth]`, else nobody)."""

    def __init__(self, rules: Sequence[RuleConfig], default: Pull, writers: Pull = ()) -> None:
        self.rules = [
            Rule(
                r.repository,
                compile_glob(r.repository),
                r.pull,
                r.networks,
                writers if writers == ANYONE or r.push is None else r.push,
                writers if writers == ANYONE or r.delete is None else r.delete,
            )
            for r in rules
        ]
        self.default = Rule("(default)", compile_glob("**"), default, (), writers, writers)
        self.open = self.default.public and all(rule.public for rule in self.rules)
        self.rule_for = lru_cache(maxsize=8192)(self._first_match)

    def _first_match(self, name: str) -> Rule:
        subject = name + "/"
        return next((rule for rule in self.rules if rule.regex.fullmatch(subject)), self.default)

    def allows(self, name: str, user: User | None, address: Address | None) -> bool:
        rule = self.rule_for(name)
        return rule.admits(user) or rule.trusts(address)
