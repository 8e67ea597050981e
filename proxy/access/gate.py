"""The access check on each request, and `/token`, the Docker token flow's endpoint.

A repository anyone may pull is served without looking at credentials at all: that
is the hot path, and it costs one cached rule lookup. Otherwise a client in one of the
rule's networks needs none; everyone else needs Basic credentials or a token from
`/token`. Presented credentials are always checked, so a bad password or an edited
token gets 401, never silently less access. A caller who proved who they are but may
not pull gets 403; a token that merely lacks the repository gets 401
`insufficient_scope`, which makes clients fetch a new one.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from proxy import tls
from proxy.access.policy import Action, Address, Network, Policy, User
from proxy.access.tokens import SERVICE, Grant, InvalidToken, Tokens
from proxy.access.users import Users
from proxy.errors import BadRequest, Denied, RegistryError, Unauthorized
from proxy.record import record_of
from proxy.routing import Route, Router, route_name

_HOST = re.compile(r"(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")  # fullmatch, ASCII digits


@dataclass(frozen=True, slots=True)
class Caller:
    user: User | None  # None: anonymous, or a token handed out anonymously
    grant: Grant | None = None  # set when the caller showed a token


ANONYMOUS = Caller(None)


def parse_address(text: str) -> Address | None:
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # a dual-stack socket's view of an IPv4 client
    return address


def client_address(peer: str | None, forwarded: Sequence[str], trusted: Sequence[Network]) -> Address | None:
    """The client's address: the socket peer, or from `X-Forwarded-For` as far as trusted proxies vouch.

    Walking the header from the right, each hop is believed only while the address
    that reported it is a trusted proxy, so a client cannot choose what it claims.
    """
    address = parse_address(peer) if peer else None
    hops = [hop for header in forwarded for hop in header.split(",")]
    while address is not None and hops and any(address in network for network in trusted):
        earlier = parse_address(hops.pop())
        if earlier is None:
            break
        address = earlier
    return address


def denied(name: str, action: Action = Action.PULL) -> Denied:
    return Denied("requested access to the resource is denied", _access_detail(name, action))


def _log_user(request: Request, user: User) -> None:
    record_of(request.scope).user = user.name  # for the access log


def _access_detail(name: str | None, action: Action = Action.PULL) -> list[dict[str, str]] | None:
    return [{"Type": "repository", "Name": name, "Action": str(action)}] if name else None


def _scope_actions(action: Action) -> str:
    """What a challenge asks a token for: pushing needs pull too (clients check what exists first)."""
    return "pull,push" if action is Action.PUSH else str(action)


def _never_hosted(name: str) -> bool:
    return False


class Gate:
    def __init__(
        self,
        policy: Policy,
        users: Users,
        tokens: Tokens,
        trusted_proxies: Sequence[Network],
        hosted: Callable[[str], bool] = _never_hosted,
    ) -> None:
        self.policy = policy
        self.users = users
        self.tokens = tokens
        self.trusted_proxies = tuple(trusted_proxies)
        self.hosted = hosted  # whether a name is a hosted repository's (`[hosted] repositories`)

    def address(self, request: Request) -> Address | None:
        peer = request.client.host if request.client else None
        return client_address(peer, request.headers.getlist("x-forwarded-for"), self.trusted_proxies)

    def _trusted_peer(self, request: Request) -> bool:
        peer = parse_address(request.client.host) if request.client else None
        return peer is not None and any(peer in network for network in self.trusted_proxies)

    def challenge(
        self,
        request: Request,
        name: str | None,
        message: str,
        error: str | None = None,
        action: Action = Action.PULL,
    ) -> Unauthorized:
        """401 with the `WWW-Authenticate: Bearer` header that starts a client's token flow."""
        scheme = request.url.scheme
        if self._trusted_peer(request) and request.headers.get("x-forwarded-proto") in ("http", "https"):
            scheme = request.headers["x-forwarded-proto"]
        host = request.headers.get("host", "")
        if not _HOST.fullmatch(host):
            server = request.scope.get("server") or ("localhost", 80)
            host = f"{server[0]}:{server[1]}"
        realm = f"{scheme}://{host}/token"
        ns = request.query_params.get("ns")
        if ns:  # the token request must route the scope's name the same way
            realm += "?" + urlencode({"ns": ns})
        header = f'Bearer realm="{realm}",service="{SERVICE}"'
        if name:
            header += f',scope="repository:{name}:{_scope_actions(action)}"'
        if error:
            header += f',error="{error}"'
        return Unauthorized(message, _access_detail(name, action), header)

    async def basic_user(self, request: Request, value: str) -> User | None:
        try:
            name, sep, password = base64.b64decode(value, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        if not sep or not name:
            return None
        address = self.address(request)
        user = await self.users.authenticate(name, password, str(address) if address else "unknown")
        if user is not None:
            _log_user(request, user)
        return user

    def certificate_user(self, request: Request) -> User | None:
        """The holder of the connection's verified client certificate (`server.tls_client_ca`):
        its Common Name is the user, its Organizations are groups, besides the user's configured ones."""
        identity = tls.client_identity(request.scope)
        if identity is None:
            return None
        user = User(identity.name, self.users.user(identity.name).groups | identity.groups)
        _log_user(request, user)
        return user

    async def caller(self, request: Request, name: str | None = None, action: Action = Action.PULL) -> Caller:
        """Who presented what; 401 when the credentials are wrong (`name` goes into the challenge).

        Credentials in the request win over a client certificate, which stands for its holder otherwise.
        """
        header = request.headers.get("authorization")
        if not header:
            user = self.certificate_user(request)
            return ANONYMOUS if user is None else Caller(user)
        scheme, _, value = header.partition(" ")
        scheme = scheme.lower()
        if scheme == "basic":
            user = await self.basic_user(request, value.strip())
            if user is None:
                raise self.challenge(request, name, "incorrect username or password", action=action)
            return Caller(user)
        if scheme == "bearer":
            try:
                grant = self.tokens.verify(value.strip())
            except InvalidToken:
                raise self.challenge(request, name, "invalid or expired token", "invalid_token", action) from None
            if grant.subject is None:
                return Caller(None, grant)
            user = self.users.user(grant.subject)
            _log_user(request, user)
            return Caller(user, grant)
        raise self.challenge(request, name, f"unsupported authorization scheme {scheme!r}", action=action)

    async def authorize(self, request: Request, route: Route) -> None:
        """Raise 401 or 403 unless the caller may pull from `route`'s repository."""
        full = route_name(route)
        rule = self.policy.rule_for(full)
        if rule.public or rule.trusts(self.address(request)):
            return
        name = request.path_params["name"]
        caller = await self.caller(request, name)
        if caller.grant is not None:
            if full in caller.grant.repositories:
                return
            if caller.user is None:
                raise self.challenge(request, name, "authentication required", "insufficient_scope")
            if rule.admits(caller.user):
                raise self.challenge(request, name, f"the token does not grant pull on {name}", "insufficient_scope")
            raise denied(name)
        if caller.user is None:
            raise self.challenge(request, name, "authentication required")
        if not rule.admits(caller.user):
            raise denied(name)

    async def authorize_hosted(self, request: Request, name: str, action: Action) -> None:
        """Raise 401 or 403 unless the caller may do `action` on the hosted repository `name`.

        A hosted repository's full name is its name as pushed; a rule's networks admit pulls only.
        """
        rule = self.policy.rule_for(name)
        if rule.admits(None, action) or (action is Action.PULL and rule.trusts(self.address(request))):
            return
        caller = await self.caller(request, name, action)
        if caller.grant is not None:
            if caller.grant.allows(name, str(action)):
                return
            if caller.user is None or rule.admits(caller.user, action):
                message = f"the token does not grant {action} on {name}"
                raise self.challenge(request, name, message, "insufficient_scope", action)
            raise denied(name, action)
        if caller.user is None:
            raise self.challenge(request, name, "authentication required", action=action)
        if not rule.admits(caller.user, action):
            raise denied(name, action)

    async def check_base(self, request: Request) -> None:
        """`/v2/`: registries answer 401 to a caller without credentials, which starts the token flow."""
        if not self.policy.open and await self.caller(request) is ANONYMOUS:
            raise self.challenge(request, None, "authentication required")


async def token(request: Request) -> Response:
    """`GET /token?service=pullproxy&scope=repository:<name>:pull`: a token for what the caller may pull.

    Anonymous callers get one too (for what anyone may pull), as Docker clients ask for
    one before every pull. Scopes the caller may not have are left out, not refused.
    Networks do not count here: a token leaves the network it was issued to; a verified
    client certificate does, as its holder's credentials.
    """
    gate: Gate = request.app.state.gate
    router: Router = request.app.state.router
    user = None
    header = request.headers.get("authorization")
    if header:
        scheme, _, value = header.partition(" ")
        user = await gate.basic_user(request, value.strip()) if scheme.lower() == "basic" else None
        if user is None:
            raise Unauthorized("incorrect username or password", challenge=f'Basic realm="{SERVICE}"')
    else:
        user = gate.certificate_user(request)
    service = request.query_params.get("service")
    if service is not None and service != SERVICE:
        raise BadRequest(f"this token service is {SERVICE!r}, not {service!r}")
    account = request.query_params.get("account")
    if user is not None and account and account != user.name:
        raise Unauthorized("account does not match the credentials")
    granted: dict[str, set[str]] = {}
    ns = request.query_params.get("ns")
    for scope in (s for value in request.query_params.getlist("scope") for s in value.split()):
        kind, _, rest = scope.partition(":")
        name, _, actions = rest.rpartition(":")
        wanted = set(actions.split(","))
        if kind != "repository":
            continue
        if gate.hosted(name):  # pushed as named: push and delete too
            full = name
            asked = [a for a in Action if str(a) in wanted or "*" in wanted]
        else:
            if not {"pull", "*"} & wanted:
                continue
            try:
                full = route_name(router.route(name, ns))
            except RegistryError:  # not a name this mirror serves
                continue
            asked = [Action.PULL]
        rule = gate.policy.rule_for(full)
        allowed = {str(action) for action in asked if rule.admits(user, action)}
        if allowed:
            granted.setdefault(full, set()).update(allowed)
    return JSONResponse(gate.tokens.issue(user.name if user else None, granted))
