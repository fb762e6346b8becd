"""The agent's image, run the way deploy/daemonset.yaml runs it, watches this host's kernel.

``make image`` builds the image (deploy/build-image.sh: a debootstrap base, deploy/Dockerfile on
it, with podman). podman then runs it with what the manifest gives the agent's container and
nothing else -- host PID and network, its capabilities, security options, mounts, environment,
arguments and memory/CPU limits -- all read from the manifest by :func:`podman_run_args`, which
fails on anything in the manifest it does not know how to give, and the running container's own
configuration (``podman inspect``) is checked against the manifest. Two things differ, each for
this machine, not for the agent: the data volume is a test folder, not the host's /var/lib/tapio;
rlimits are set below podman's defaults, which this machine (no CAP_SYS_RESOURCE) cannot grant.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from kernel_helpers import closed_tcp_port, run_connects, scaled, wait_until

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
IMAGE = os.environ.get("TAPIO_IMAGE", "localhost/tapio-agent:dev")
#: crun refuses this host's mixed cgroup v1/v2 hierarchy; runc runs it (as containerd does on nodes).
PODMAN = ["podman", "--runtime=runc"]
DATA_DIR = "/var/lib/tapio"
ULIMITS = ["--ulimit", "nofile=16384:16384", "--ulimit", "nproc=4096:4096"]


def daemonset_container() -> tuple[dict[str, Any], dict[str, Any]]:
    """(pod spec, the agent's container) from deploy/daemonset.yaml."""
    documents = [doc for doc in yaml.safe_load_all((DEPLOY / "daemonset.yaml").read_text()) if doc]
    [daemonset] = [doc for doc in documents if doc["kind"] == "DaemonSet"]
    pod = daemonset["spec"]["template"]["spec"]
    [container] = pod["containers"]
    return pod, container


def podman_run_args(pod: dict[str, Any], container: dict[str, Any], node_name: str, data_dir: Path) -> list[str]:
    """``podman run`` arguments giving the container what the manifest gives it; ValueError on anything else."""
    args = ["--pid=host"] if pod.get("hostPID") else []
    args.append("--network=host" if pod.get("hostNetwork") else "--network=none")
    security = container.get("securityContext", {})
    known = {"privileged", "runAsUser", "runAsNonRoot", "allowPrivilegeEscalation", "readOnlyRootFilesystem",
             "capabilities", "seccompProfile", "appArmorProfile"}
    if set(security) - known:
        raise ValueError(f"securityContext fields this run does not give: {sorted(set(security) - known)}")
    if security.get("privileged"):
        args.append("--privileged")
    if "runAsUser" in security:
        args += ["--user", str(security["runAsUser"])]
    if security.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    if security.get("readOnlyRootFilesystem"):
        args.append("--read-only")
    capabilities = security.get("capabilities", {})
    args += [f"--cap-drop={name}" for name in capabilities.get("drop", [])]
    args += [f"--cap-add=CAP_{name}" for name in capabilities.get("add", [])]
    if security.get("seccompProfile", {}).get("type") == "Unconfined":
        args += ["--security-opt", "seccomp=unconfined"]
    if security.get("appArmorProfile", {}).get("type") == "Unconfined":
        args += ["--security-opt", "apparmor=unconfined"]
    volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        volume, target = volumes[mount["name"]], mount["mountPath"]
        if "hostPath" in volume:
            source = data_dir if target == DATA_DIR else volume["hostPath"]["path"]
            args += ["--volume", f"{source}:{target}" + (":ro" if mount.get("readOnly") else "")]
        elif "emptyDir" in volume and volume["emptyDir"].get("medium") == "Memory":
            size = volume["emptyDir"].get("sizeLimit", "64Mi").replace("Mi", "m")
            args += ["--tmpfs", f"{target}:size={size}"]
        else:
            raise ValueError(f"volume {mount['name']}: a kind this run does not give")
    for variable in container.get("env", []):
        if "value" in variable:
            args += ["--env", f"{variable['name']}={variable['value']}"]
        elif variable.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "spec.nodeName":
            args += ["--env", f"{variable['name']}={node_name}"]
        else:
            raise ValueError(f"env {variable['name']}: a source this run does not give")
    limits = container.get("resources", {}).get("limits", {})
    if "memory" in limits:
        args += ["--memory", limits["memory"].replace("Mi", "m")]
    if "cpu" in limits:
        args += ["--cpus", str(limits["cpu"])]
    return [*args, *ULIMITS]


def bounding_capability(name: str) -> bool:
    """Whether this process's bounding set holds capability ``name`` (e.g. CAP_BPF)."""
    numbers = {"CAP_DAC_READ_SEARCH": 2, "CAP_SYS_RESOURCE": 24, "CAP_PERFMON": 38, "CAP_BPF": 39}
    bounding = int(next(line.split()[1] for line in Path("/proc/self/status").read_text().splitlines()
                        if line.startswith("CapBnd:")), 16)
    return bool(bounding >> numbers[name] & 1)


def podman(*args: str, timeout: float = 60.0, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([*PODMAN, *args], capture_output=True, text=True, timeout=scaled(timeout), check=check)


def probe(name: str, spec: dict[str, Any]) -> int:
    """Run a probe as kubelet would: 0 when it passes. An exec probe runs in the container; an httpGet
    probe is a GET from this machine, whose network the container shares (host network, as on a node)."""
    timeout = spec.get("timeoutSeconds", 1) * 3
    if "exec" in spec:
        return podman("exec", name, *spec["exec"]["command"], timeout=timeout, check=False).returncode
    get = spec["httpGet"]
    url = f"http://{get.get('host', '127.0.0.1')}:{get['port']}{get.get('path', '/')}"
    try:
        with urllib.request.urlopen(url, timeout=scaled(timeout)) as answer:
            return 0 if 200 <= answer.status < 400 else 1
    except OSError:  # refused, or an HTTPError (4xx, 5xx): the probe fails
        return 1


def occurrences(name: str) -> list[dict[str, Any]]:
    """The JSON lines the container wrote to stdout so far (its stdout sink)."""
    out = podman("logs", name).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_the_run_gives_what_the_manifest_gives_and_refuses_what_it_cannot(tmp_path):
    pod, container = daemonset_container()
    args = podman_run_args(pod, container, "node-a", tmp_path)
    assert "--pid=host" in args and "--network=host" in args
    assert [a for a in args if a.startswith("--cap-")] == [
        "--cap-drop=ALL", *(f"--cap-add=CAP_{c}" for c in container["securityContext"]["capabilities"]["add"])]
    assert f"{tmp_path}:{DATA_DIR}" in args and "--privileged" not in args
    assert "NODE_NAME=node-a" in args
    broken = dict(container, securityContext={**container["securityContext"], "procMount": "Unmasked"})
    with pytest.raises(ValueError, match="procMount"):
        podman_run_args(pod, broken, "node-a", tmp_path)


@pytest.mark.image
def test_the_image_run_as_the_daemonset_runs_it_reports_the_hosts_kernel_and_passes_its_probes(tmp_path):
    pod, container = daemonset_container()
    name = f"tapio-test-{secrets.token_hex(4)}"
    data = tmp_path / "data"
    data.mkdir()
    args = podman_run_args(pod, container, os.uname().nodename, data)
    podman("run", "--detach", "--name", name, *args, IMAGE, *container.get("args", []))
    try:
        startup = container["startupProbe"]
        budget = startup["periodSeconds"] * startup["failureThreshold"]
        assert wait_until(lambda: probe(name, startup) == 0, budget), podman("logs", name).stderr[-3000:]
        for kind in ("readinessProbe", "livenessProbe"):
            assert probe(name, container[kind]) == 0, kind

        # What runs is what the manifest says: the container's own configuration.
        [inspect] = json.loads(podman("inspect", name).stdout)
        host = inspect["HostConfig"]
        assert (host["PidMode"], host["NetworkMode"], host["Privileged"]) == ("host", "host", False)
        assert host["ReadonlyRootfs"] is True
        added = {f"CAP_{c}" for c in container["securityContext"]["capabilities"]["add"]}
        # What it got: those this machine can grant at all (it has no CAP_SYS_RESOURCE to give).
        assert set(inspect["EffectiveCaps"]) == {c for c in added if bounding_capability(c)}
        mounts = {m["Destination"]: m for m in inspect["Mounts"]}
        wanted = {m["mountPath"] for m in container["volumeMounts"]} - {"/tmp"}  # /tmp is a tmpfs, not a mount
        assert set(mounts) == wanted
        assert all(mounts[m["mountPath"]]["RW"] is not m.get("readOnly", False)
                   for m in container["volumeMounts"] if m["mountPath"] in mounts)
        env = dict(item.split("=", 1) for item in inspect["Config"]["Env"])
        assert env["NODE_NAME"] == os.uname().nodename
        assert all(env[v["name"]] == v["value"] for v in container["env"] if "value" in v)

        # The host's kernel, seen from the container.
        port = closed_tcp_port("127.0.0.1")
        connect = run_connects("127.0.0.1", port)
        assert [a["errno"] for a in connect["attempts"]] == ["ECONNREFUSED"]
        # A container's main process (its PID namespace's init): a short-lived helper's exit is only counted.
        child = subprocess.Popen(["unshare", "--pid", "--fork", "sh", "-c", "exit 7"])
        assert child.wait() == 7

        def refused(occ):
            return (occ["type"] == "kernel.network.connection_refused" and occ["data"]["dst_port"] == port
                    and occ["data"]["pid"] == connect["pid"])

        def exited(occ):
            data = occ["data"]
            return (occ["type"] == "kernel.container.abnormal_exit" and data["main_process"]
                    and (data["comm"], data["exit_code"]) == ("sh", 7))

        assert wait_until(lambda: any(refused(o) for o in occurrences(name)) and
                        any(exited(o) for o in occurrences(name)), 20), occurrences(name)[-5:]
        seen = occurrences(name)
        assert [o["data"]["exit_code"] for o in seen if exited(o)] == [7]
        assert len([o for o in seen if refused(o)]) == 1

        status = json.loads(podman("exec", name, "tapio", "status", "--json").stdout)
        assert status["running"] is True
        observers = status["state"]["observers"]
        assert set(observers) == {"network", "container", "storage", "pmc"}
        for observer, entry in observers.items():
            assert entry["status"] in ("running", "unsupported"), (observer, entry)
            if entry["status"] == "unsupported":
                assert entry["reason"], observer
    finally:
        stopped = podman("stop", "--time", "30", name, check=False)
        code = podman("inspect", "--format", "{{.State.ExitCode}}", name, check=False).stdout.strip()
        logs = podman("logs", name, check=False).stderr
        podman("rm", "--force", name, check=False)
    assert stopped.returncode == 0 and code == "0", logs[-2000:]  # SIGTERM: drained, flushed, detached
    assert json.loads((data / "state.json").read_text())["agent"]["running"] is False
