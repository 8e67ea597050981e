"""The fleet examples in deploy/ parse, and the pullproxy config each carries loads as a replica's would."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from proxy import config as configuration
from proxy.config import Backend
from proxy.fleet.peers import this_replica

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
SECRETS = {"PULLPROXY_S3_ACCESS_KEY": "a", "PULLPROXY_S3_SECRET_KEY": "b", "PULLPROXY_PEER_SECRET": "c"}


def _load(text: str, tmp_path: Path, env: dict[str, str]) -> configuration.Config:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return configuration.load(path, env)


def test_compose_runs_three_replicas_on_s3_and_redis_behind_haproxy(tmp_path: Path) -> None:
    doc: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = doc["services"]
    replicas = sorted(name for name in services if name.startswith("pullproxy-"))
    assert replicas == ["pullproxy-1", "pullproxy-2", "pullproxy-3"]
    assert {"haproxy", "redis", "seaweedfs"} <= set(services)
    config = _load(doc["configs"]["pullproxy"]["content"], tmp_path, SECRETS)
    assert config.storage.backend is Backend.S3 and config.coordination is not None
    assert config.coordination.peer_secret == "c"
    for name in replicas:  # each replica's host name is the service name the others resolve
        assert services[name]["hostname"] == name
        assert set(SECRETS) <= set(services[name]["environment"])
    haproxy = doc["configs"]["haproxy"]["content"]
    assert re.findall(r"server (\S+) (\S+):5000", haproxy) == [(name, name) for name in replicas]
    # haproxy itself checks the file, with the service names as loopback addresses (no DNS lookup).
    local = re.sub(r"pullproxy-\d:5000", "127.0.0.1:5000", haproxy).replace("libc,", "")
    (tmp_path / "haproxy.cfg").write_text(local)
    check = subprocess.run(["/usr/sbin/haproxy", "-c", "-f", str(tmp_path / "haproxy.cfg")], capture_output=True)
    assert check.returncode == 0, check.stderr.decode()


def test_kubernetes_replicas_advertise_their_pod_ip_and_take_secrets_from_a_secret(tmp_path: Path) -> None:
    docs = [d for d in yaml.safe_load_all((DEPLOY / "kubernetes.yaml").read_text()) if d]
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert {("Deployment", "pullproxy"), ("Service", "pullproxy"), ("Secret", "pullproxy")} <= kinds
    assert {("Deployment", "pullproxy-redis"), ("Service", "pullproxy-redis")} <= kinds
    deployment = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "pullproxy")
    assert deployment["spec"]["replicas"] >= 2
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert all(env[name]["valueFrom"]["secretKeyRef"]["name"] == "pullproxy" for name in SECRETS)
    config_map = next(d for d in docs if d["kind"] == "ConfigMap")
    listen = env["PULLPROXY_SERVER_LISTEN"]["value"].replace("$(POD_IP)", "10.1.2.3")
    config = _load(config_map["data"]["config.toml"], tmp_path, {**SECRETS, "PULLPROXY_SERVER_LISTEN": listen})
    assert config.storage.backend is Backend.S3 and config.coordination is not None
    assert config.coordination.redis.startswith("redis://pullproxy-redis:")
    assert this_replica(config).url == "http://10.1.2.3:5000"
