"""Real registry clients driven by the tests: skopeo, containerd/ctr, and a
byte-level reproduction of the Docker daemon's mirror requests.

A mirror is only useful if the clients people actually use accept it, so
integration tests go through these rather than through a hand-written client.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import ssl
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from .images import DOCKER_LIST, DOCKER_MANIFEST, INDEX_TYPES, OCI_INDEX, OCI_MANIFEST
from .ports import free_port
from .procs import Closing, spawn, stop, tail

SKOPEO = "/usr/bin/skopeo"
CONTAINERD = "/usr/bin/containerd"
CTR = "/usr/bin/ctr"
DEFAULT_TIMEOUT = 120.0


class CommandError(RuntimeError):
    """A client command failed; the message carries its stderr."""

    def __init__(self, argv: Sequence[str], returncode: int | None, stdout: str, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        super().__init__(
            f"{' '.join(self.argv)} -> exit {returncode}\nstderr:\n{stderr[-4000:]}\nstdout:\n{stdout[-2000:]}"
        )


def run(
    argv: Sequence[str], *, timeout: float = DEFAULT_TIMEOUT, check: bool = True, input: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run a command with a hard timeout; raise CommandError with stderr on failure."""
    try:
        proc = subprocess.run(
            list(argv),
            capture_output=True,
            timeout=timeout,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        stderr = _text(exc.stderr) + f"\n<timed out after {timeout}s>"
        raise CommandError(argv, None, _text(exc.stdout), stderr) from exc
    if check and proc.returncode != 0:
        raise CommandError(argv, proc.returncode, _text(proc.stdout), _text(proc.stderr))
    return proc


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


# --------------------------------------------------------------------------- skopeo


def _skopeo_globals(registries_conf: str | Path | None) -> list[str]:
    # --insecure-policy: do not depend on the host's /etc/containers/policy.json.
    argv = [SKOPEO, "--insecure-policy"]
    if registries_conf is not None:
        argv += ["--registries-conf", str(registries_conf)]
    return argv


def skopeo_copy(
    src: str,
    dest: str,
    *,
    all: bool = False,
    authfile: str | Path | None = None,
    creds: str | None = None,
    registries_conf: str | Path | None = None,
    extra: Sequence[str] = (),
    timeout: float = DEFAULT_TIMEOUT,
    cert_dir: str | Path | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """``skopeo copy SRC DEST`` with TLS verification off for ``docker://`` ends.

    With TLS verification off, skopeo tries https first and falls back to plain
    http, which is what reaches our 127.0.0.1 servers. Copy to ``dir:PATH`` to get
    the exact manifest bytes (``manifest.json``; with ``--all`` each child as
    ``<hex>.manifest.json``) and blobs (named by hex digest). With ``cert_dir`` the
    source is verified over HTTPS instead: ``ca.crt`` there is trusted, and a
    ``client.cert``/``client.key`` pair is presented.
    """
    argv = [*_skopeo_globals(registries_conf), "copy", "--retry-times", "0"]
    if all:
        argv.append("--all")
    if cert_dir is not None:
        argv += ["--src-tls-verify=true", "--src-cert-dir", str(cert_dir)]
    elif src.startswith("docker://"):
        argv.append("--src-tls-verify=false")
    if dest.startswith("docker://"):
        argv.append("--dest-tls-verify=false")
    if authfile is not None:
        argv += ["--authfile", str(authfile)]
    if creds is not None:
        argv += ["--src-creds", creds]
    argv += [*extra, src, dest]
    return run(argv, timeout=timeout)


def skopeo_inspect_raw(
    ref: str,
    *,
    authfile: str | Path | None = None,
    creds: str | None = None,
    registries_conf: str | Path | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> bytes:
    """Raw manifest bytes of ``ref`` (``docker://...``) as skopeo receives them."""
    argv = [*_skopeo_globals(registries_conf), "inspect", "--raw", "--retry-times", "0"]
    if ref.startswith("docker://"):
        argv.append("--tls-verify=false")
    if authfile is not None:
        argv += ["--authfile", str(authfile)]
    if creds is not None:
        argv += ["--creds", creds]
    argv.append(ref)
    return run(argv, timeout=timeout).stdout


def write_authfile(path: str | Path, host: str, user: str, password: str) -> Path:
    """containers-auth.json for ``host`` (``127.0.0.1:PORT``); also valid for docker."""
    import base64

    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    out = Path(path)
    out.write_text(json.dumps({"auths": {host: {"auth": token}}}))
    return out


def write_registries_conf(path: str | Path, registry_name: str, mirror_host: str, insecure: bool = True) -> Path:
    """registries.conf mapping ``registry_name`` to an insecure (http) mirror only.

    ``mirror_host`` is ``127.0.0.1:PORT``. The primary location is also the mirror
    (marked insecure) so skopeo never tries to reach the real registry. With
    ``insecure=False`` the mirror is verified over HTTPS, as ``[[registry.mirror]]``.
    """
    out = Path(path)
    if not insecure:
        # The primary location is a closed port: only the mirror can answer.
        out.write_text(
            "unqualified-search-registries = []\n\n"
            "[[registry]]\n"
            f'prefix = "{registry_name}"\n'
            f'location = "127.0.0.1:{free_port()}"\n'
            "[[registry.mirror]]\n"
            f'location = "{mirror_host}"\n'
        )
        return out
    out.write_text(
        "unqualified-search-registries = []\n\n"
        "[[registry]]\n"
        f'prefix = "{registry_name}"\n'
        f'location = "{mirror_host}"\n'
        "insecure = true\n"
    )
    return out


def read_dir_image(path: str | Path) -> dict[str, bytes]:
    """All files of a skopeo ``dir:`` destination, keyed by file name."""
    return {p.name: p.read_bytes() for p in Path(path).iterdir() if p.is_file()}


# --------------------------------------------------------------------------- containerd


def write_hosts_toml(
    hosts_dir: str | Path,
    registry_name: str,
    mirror_url: str,
    override_path: bool = False,
    *,
    server: str | None = None,
    ca: str | Path | None = None,
    client: tuple[str | Path, str | Path] | None = None,
) -> Path:
    """Write ``HOSTS_DIR/<registry_name>/hosts.toml`` sending pulls to ``mirror_url``.

    containerd adds ``?ns=<registry_name>`` to every request it sends to a
    *mirror* host (not to the ``server``). ``server`` defaults to a closed
    127.0.0.1 port: containerd falls back to the server when the mirror fails,
    and the default for docker.io (registry-1.docker.io) would trigger a DNS
    lookup leaving the machine. With ``override_path`` the mirror URL is used as
    the API root verbatim (it must then end in ``/v2``). With ``ca`` an https mirror
    is verified against that CA (no ``skip_verify``), and ``client`` is a
    (cert, key) pair containerd presents to it.
    """
    folder = Path(hosts_dir) / registry_name
    folder.mkdir(parents=True, exist_ok=True)
    if server is None:
        server = f"http://127.0.0.1:{free_port()}"
    lines = [
        f'server = "{server}"',
        "",
        f'[host."{mirror_url}"]',
        '  capabilities = ["pull", "resolve"]',
        f'  ca = "{ca}"' if ca is not None else "  skip_verify = true",
    ]
    if client is not None:
        lines.append(f'  client = [["{client[0]}", "{client[1]}"]]')
    if override_path:
        lines.append("  override_path = true")
    path = folder / "hosts.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


# Plugins a pull does not need; cri would also try to manage CNI/iptables, opt
# writes to /opt/containerd, and the runtimes would look for cgroups/shims.
_DISABLED_PLUGINS = [
    "io.containerd.grpc.v1.cri",
    "io.containerd.internal.v1.opt",
    "io.containerd.internal.v1.restart",
    "io.containerd.internal.v1.tracing",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.runtime.v1.linux",
    "io.containerd.runtime.v2.task",
    "io.containerd.monitor.v1.cgroups",
    "io.containerd.service.v1.tasks-service",
    "io.containerd.grpc.v1.tasks",
]


@dataclass
class PullResult:
    ref: str
    stdout: str
    stderr: str


class Containerd(Closing):
    """A private containerd daemon (root, state and sockets in a short /tmp dir).

    Only content, metadata, snapshotter, diff and image services are loaded, so
    ``ctr images pull`` (with unpack) works as root in the sandbox without
    touching the host's /var/lib/containerd or /run/containerd.
    """

    def __init__(self, *, snapshotter: str = "overlayfs", namespace: str = "pullproxy", start: bool = True):
        # unix socket paths must stay under ~104 bytes: keep the folder short.
        self.dir = Path(tempfile.mkdtemp(prefix="ctd", dir="/tmp"))
        self.socket = str(self.dir / "c.sock")
        self.config_path = self.dir / "config.toml"
        self.log_path = self.dir / "containerd.log"
        self.hosts_dir = self.dir / "hosts"
        self.hosts_dir.mkdir()
        self.snapshotter = snapshotter
        self.namespace = namespace
        self._proc: subprocess.Popen[bytes] | None = None
        self._write_config()
        if start:
            try:
                self.start()
            except BaseException:
                self.close()
                raise

    def _write_config(self) -> None:
        d = self.dir
        disabled = ", ".join(f'"{p}"' for p in _DISABLED_PLUGINS)
        self.config_path.write_text(
            "version = 2\n"
            f'root = "{d}/root"\n'
            f'state = "{d}/state"\n'
            f"disabled_plugins = [{disabled}]\n\n"
            "[grpc]\n"
            f'  address = "{d}/c.sock"\n\n'
            "[ttrpc]\n"
            f'  address = "{d}/t.sock"\n\n'
            "[debug]\n"
            f'  address = "{d}/d.sock"\n'
            '  level = "info"\n\n'
            "[metrics]\n"
            '  address = ""\n'
        )

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 20.0) -> Containerd:
        if self.running:
            return self
        self._proc = spawn([CONTAINERD, "--config", str(self.config_path)], self.log_path)
        deadline = time.monotonic() + timeout
        while True:
            if not self.running:
                raise RuntimeError(f"containerd exited during start-up:\n{tail(self.log_path)}")
            if (
                Path(self.socket).exists()
                and run([CTR, "--address", self.socket, "version"], timeout=10, check=False).returncode == 0
            ):
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"containerd not ready after {timeout}s:\n{tail(self.log_path)}")
            time.sleep(0.05)

    def stop(self) -> None:
        stop(self._proc)
        self._proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def ctr(
        self, *args: str, timeout: float = DEFAULT_TIMEOUT, check: bool = True
    ) -> subprocess.CompletedProcess[bytes]:
        """``ctr --address SOCK --namespace NS ARGS...``."""
        return run([CTR, "--address", self.socket, "--namespace", self.namespace, *args], timeout=timeout, check=check)

    def write_hosts_toml(self, registry_name: str, mirror_url: str, override_path: bool = False) -> Path:
        """Convenience: :func:`write_hosts_toml` into this daemon's own hosts dir."""
        return write_hosts_toml(self.hosts_dir, registry_name, mirror_url, override_path)

    def pull(
        self,
        ref: str,
        hosts_dir: str | Path | None = None,
        *,
        user: str | None = None,
        platform: str | None = None,
        all_platforms: bool = False,
        unpack: bool = True,
        plain_http: bool = False,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> PullResult:
        """``ctr images pull`` through the hosts.toml mirror config.

        ``ref`` is fully qualified (``docker.io/library/alpine:latest``); the
        registry part selects ``HOSTS_DIR/<registry>/hosts.toml``, whose
        ``http://`` mirror URL already implies plain HTTP (``plain_http`` is only
        needed for a ref without a hosts.toml). ``unpack=False`` runs ``ctr content
        fetch`` instead, for artifacts such as Helm charts that cannot be unpacked.
        With ``all_platforms`` every platform is fetched and unpacked.
        """
        verb = ["images", "pull"] if unpack else ["content", "fetch"]
        args = [*verb, "--hosts-dir", str(hosts_dir or self.hosts_dir)]
        if user is not None:
            args += ["--user", user]
        if plain_http:
            args.append("--plain-http")
        if all_platforms:
            args.append("--all-platforms")
        elif platform is not None:
            args += ["--platform", platform]
        if unpack:
            args += ["--snapshotter", self.snapshotter]
        args.append(ref)
        proc = self.ctr(*args, timeout=timeout)
        return PullResult(ref, _text(proc.stdout), _text(proc.stderr))

    def images(self) -> dict[str, str]:
        """``{ref: manifest digest}`` of every image in the namespace."""
        out = self.ctr("images", "ls").stdout.decode()
        result = {}
        for line in out.splitlines()[1:]:
            parts = line.split()
            if len(parts) >= 3:
                result[parts[0]] = parts[2]
        return result

    def content(self, digest: str) -> bytes:
        """Raw bytes of a blob/manifest from the content store (``ctr content get``)."""
        return self.ctr("content", "get", digest).stdout

    def content_digests(self) -> set[str]:
        out = self.ctr("content", "ls", "-q").stdout.decode()
        return {line.strip() for line in out.splitlines() if line.strip()}

    def remove_image(self, ref: str) -> None:
        self.ctr("images", "rm", "--sync", ref)

    def gc(self) -> None:
        """Forget every image so a re-pull goes to the mirror again.

        ``images rm --sync`` waits for containerd's GC, which also drops the
        content and the unpacked snapshots (otherwise a re-pull skips layers whose
        snapshot exists). Leftover unreferenced content is removed explicitly.
        """
        refs = list(self.images())
        if refs:
            self.ctr("images", "rm", "--sync", *refs)
        digests = self.content_digests()
        if digests:
            self.ctr("content", "rm", *sorted(digests), check=False)


# --------------------------------------------------------------------------- docker daemon


#: The Accept values dockerd 20+/24+ sends for a manifest HEAD/GET, one header
#: line each (Go's http.Header.Add), not one comma-joined line.
DOCKER_ACCEPTS: tuple[str, ...] = (
    DOCKER_MANIFEST,
    DOCKER_LIST,
    OCI_MANIFEST,
    OCI_INDEX,
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
    "application/json",
)
DOCKER_USER_AGENT = (
    "docker/24.0.7 go/go1.20.10 git-commit/311b9ff kernel/6.1.0 os/linux arch/amd64 "
    "UpstreamClient(Docker-Client/24.0.7 \\(linux\\))"
)


@dataclass
class DockerPull:
    """Everything :func:`docker_daemon_pull` fetched, for assertions."""

    tag_digest: str
    tag_media_type: str
    manifests: dict[str, bytes] = field(default_factory=dict)
    blobs: dict[str, int] = field(default_factory=dict)
    requests: list[tuple[str, str, int]] = field(default_factory=list)
    platform_digest: str = ""


def docker_daemon_pull(
    base_url: str,
    repo: str,
    tag: str,
    *,
    auth: tuple[str, str] | httpx.Auth | None = None,
    os_name: str = "linux",
    arch: str = "amd64",
    timeout: float = 60.0,
    verify: ssl.SSLContext | bool = True,
) -> DockerPull:
    """Reproduce dockerd's request sequence against a ``registry-mirrors`` entry.

    dockerd pings ``/v2/``, resolves the tag with a HEAD carrying six separate
    Accept lines and ``Connection: close``, GETs the manifest by digest,
    descends into the platform child of an index, then fetches config and
    layers; every digest is verified. ``repo`` is e.g. ``library/alpine``
    (dockerd always adds ``library/`` for official images, and sends no ``ns``).
    ``verify`` trusts an HTTPS mirror's CA, as ``certs.d/<host:port>/ca.crt`` does for dockerd.
    """
    base = base_url.rstrip("/")
    accept = [("Accept", a) for a in DOCKER_ACCEPTS]
    log: list[tuple[str, str, int]] = []
    with httpx.Client(auth=auth, timeout=timeout, headers={"User-Agent": DOCKER_USER_AGENT}, verify=verify) as client:

        def request(method: str, path: str, headers: list[tuple[str, str]] | None = None) -> httpx.Response:
            resp = client.request(method, base + path, headers=headers)
            log.append((method, path, resp.status_code))
            return resp

        ping = request("GET", "/v2/")
        if ping.status_code not in (200, 401):
            raise AssertionError(f"/v2/ ping answered {ping.status_code}")
        head = request("HEAD", f"/v2/{repo}/manifests/{tag}", [*accept, ("Connection", "close")])
        if head.status_code != 200:
            raise AssertionError(f"HEAD {repo}:{tag} answered {head.status_code}")
        digest = head.headers.get("Docker-Content-Digest", "")
        if not digest.startswith("sha256:"):
            raise AssertionError(f"HEAD {repo}:{tag} gave no Docker-Content-Digest: {dict(head.headers)}")
        result = DockerPull(tag_digest=digest, tag_media_type=head.headers.get("Content-Type", ""), requests=log)

        def get_manifest(ref: str) -> dict[str, Any]:
            resp = request("GET", f"/v2/{repo}/manifests/{ref}", accept)
            if resp.status_code != 200:
                raise AssertionError(f"GET manifest {ref} answered {resp.status_code}")
            _check_digest(resp.content, ref)
            result.manifests[ref] = resp.content
            parsed: dict[str, Any] = json.loads(resp.content)
            parsed.setdefault("mediaType", resp.headers.get("Content-Type", ""))
            return parsed

        manifest = get_manifest(digest)
        result.platform_digest = digest
        if manifest["mediaType"] in INDEX_TYPES:
            result.platform_digest = _pick_platform(manifest, os_name, arch)
            manifest = get_manifest(result.platform_digest)
        for desc in [manifest["config"], *manifest.get("layers", [])]:
            path = f"/v2/{repo}/blobs/{desc['digest']}"
            h = hashlib.sha256()
            size = 0
            with client.stream("GET", base + path) as resp:
                log.append(("GET", path, resp.status_code))
                if resp.status_code != 200:
                    raise AssertionError(f"GET blob {desc['digest']} answered {resp.status_code}")
                for chunk in resp.iter_bytes():
                    h.update(chunk)
                    size += len(chunk)
            if "sha256:" + h.hexdigest() != desc["digest"] or size != desc["size"]:
                raise AssertionError(f"blob {desc['digest']} came back as sha256:{h.hexdigest()} ({size} B)")
            result.blobs[desc["digest"]] = size
        return result


def _check_digest(data: bytes, digest: str) -> None:
    got = "sha256:" + hashlib.sha256(data).hexdigest()
    if got != digest:
        raise AssertionError(f"content for {digest} hashes to {got}")


def _pick_platform(index: dict[str, Any], os_name: str, arch: str) -> str:
    for desc in index.get("manifests", []):
        plat = desc.get("platform") or {}
        if plat.get("os") == os_name and plat.get("architecture") == arch:
            return str(desc["digest"])
    raise AssertionError(f"index has no {os_name}/{arch} manifest")
