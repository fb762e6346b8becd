"""Every manifest in deploy/ loads into the Kubernetes client's models, field for field, and says what it must.

Loading is ``yaml.safe_load_all`` then the client's own deserializer into
``V1DaemonSet``, ``V1ClusterRole``...; the model is serialized back and must
equal the YAML, so a misspelt or unknown field (which the deserializer drops
silently) fails here instead of at ``kubectl apply``. Then the DaemonSet and
RBAC are checked against what the agent and the kubernetes enrichment need.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client import ApiClient

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
MANIFESTS = sorted(DEPLOY.glob("*.yaml"))


def documents() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in MANIFESTS:
        for index, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc is not None:
                found.append((f"{path.name}#{index}", doc))
    return found


DOCUMENTS = documents()


def model_name(doc: dict[str, Any]) -> str:
    """``apps/v1`` + ``DaemonSet`` -> ``V1DaemonSet``: the client's class for that object."""
    version = doc["apiVersion"].rsplit("/", 1)[-1]
    return version[0].upper() + version[1:] + doc["kind"]


def load(doc: dict[str, Any]) -> Any:
    name = model_name(doc)
    assert hasattr(client, name), f"the kubernetes client has no model {name} (apiVersion or kind misspelt?)"
    return ApiClient().deserialize(json.dumps(doc), name, "application/json")


def differences(yaml_value: Any, model_value: Any, path: str = "") -> list[str]:
    """Where the YAML says something the model did not keep (an unknown key) or kept differently."""
    if isinstance(yaml_value, dict) and isinstance(model_value, dict):
        found = []
        for key, value in yaml_value.items():
            if key not in model_value:
                found.append(f"{path}.{key}: not a field of the model (misspelt?)")
            else:
                found += differences(value, model_value[key], f"{path}.{key}")
        return found
    if isinstance(yaml_value, list) and isinstance(model_value, list) and len(yaml_value) == len(model_value):
        return [d for i, (a, b) in enumerate(zip(yaml_value, model_value, strict=True))
                for d in differences(a, b, f"{path}[{i}]")]
    if yaml_value != model_value:
        return [f"{path}: {yaml_value!r} became {model_value!r}"]
    return []


def test_deploy_has_the_manifests_the_issue_asks_for():
    kinds = sorted(doc["kind"] for _, doc in DOCUMENTS)
    assert kinds == ["ClusterRole", "ClusterRoleBinding", "DaemonSet", "Namespace", "ServiceAccount"]


@pytest.mark.parametrize(("where", "doc"), DOCUMENTS, ids=[where for where, _ in DOCUMENTS])
def test_manifest_loads_into_the_client_models_field_for_field(where, doc):
    obj = load(doc)
    assert type(obj).__name__ == model_name(doc)
    assert differences(doc, ApiClient().sanitize_for_serialization(obj)) == []


def test_a_misspelt_field_is_caught():
    doc = copy.deepcopy(by_kind("DaemonSet"))
    doc["spec"]["template"]["spec"]["hostPid"] = True  # hostPID
    doc["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilites"] = {"add": ["BPF"]}
    assert sorted(differences(doc, ApiClient().sanitize_for_serialization(load(doc)))) == [
        ".spec.template.spec.containers[0].securityContext.capabilites: not a field of the model (misspelt?)",
        ".spec.template.spec.hostPid: not a field of the model (misspelt?)",
    ]


def test_a_value_of_the_wrong_type_is_caught():
    doc = copy.deepcopy(by_kind("DaemonSet"))
    doc["spec"]["template"]["spec"]["containers"][0]["env"] = {"NODE_NAME": "x"}  # must be a list
    with pytest.raises(ValueError, match="V1EnvVar"):  # pydantic's ValidationError
        load(doc)


# -- what the manifests must say ---------------------------------------------------------------------


def by_kind(kind: str) -> dict[str, Any]:
    [doc] = [doc for _, doc in DOCUMENTS if doc["kind"] == kind]
    return doc


@pytest.fixture
def daemonset() -> client.V1DaemonSet:
    return load(by_kind("DaemonSet"))


@pytest.fixture
def agent(daemonset) -> client.V1Container:
    [container] = daemonset.spec.template.spec.containers
    return container


def test_daemonset_selects_its_own_pods_and_runs_as_the_service_account(daemonset):
    assert daemonset.spec.selector.match_labels.items() <= daemonset.spec.template.metadata.labels.items()
    account = load(by_kind("ServiceAccount"))
    assert daemonset.spec.template.spec.service_account_name == account.metadata.name
    assert daemonset.metadata.namespace == account.metadata.namespace == load(by_kind("Namespace")).metadata.name


def test_node_name_comes_from_the_downward_api(agent):
    [node] = [env for env in agent.env if env.name == "NODE_NAME"]
    assert node.value_from.field_ref.field_path == "spec.nodeName"


def test_exact_capabilities_host_pid_and_no_privileged_mode(daemonset, agent):
    assert daemonset.spec.template.spec.host_pid is True
    security = agent.security_context
    assert security.privileged is False
    assert security.capabilities.drop == ["ALL"]
    assert sorted(security.capabilities.add) == ["BPF", "DAC_READ_SEARCH", "PERFMON", "SYS_RESOURCE"]
    assert security.read_only_root_filesystem is True
    assert security.allow_privilege_escalation is False


def test_host_mounts_are_read_only_and_cover_what_bcc_and_the_enrichment_read_and_no_headers(daemonset, agent):
    volumes = {v.name: v for v in daemonset.spec.template.spec.volumes}
    mounts = {m.mount_path: m for m in agent.volume_mounts}
    assert all(m.name in volumes for m in mounts.values()), "a mount names a volume that does not exist"
    host = {path: volumes[m.name].host_path.path for path, m in mounts.items() if volumes[m.name].host_path}
    for path in ("/sys/kernel/tracing", "/sys/fs/cgroup", "/sys/kernel/btf"):
        assert host.get(path) == path, f"{path} is not the host's"
        assert mounts[path].read_only is True, f"{path} is writable"
    # bcc compiles against the image's own headers: none of the node's are mounted
    assert not [path for path in mounts if path.startswith(("/lib/modules", "/usr/src"))]
    assert host["/var/lib/tapio"] == "/var/lib/tapio" and not mounts["/var/lib/tapio"].read_only
    data_dir = next(e.value for e in agent.env if e.name == "TAPIO_DATA_DIR")
    assert data_dir == "/var/lib/tapio"


def test_host_network_so_the_agent_never_depends_on_the_pod_network_it_reports_on(daemonset):
    spec = daemonset.spec.template.spec
    assert spec.host_network is True
    assert spec.dns_policy == "ClusterFirstWithHostNet"  # cluster DNS still answers


def test_probes_ask_the_agents_own_endpoints_on_the_loopback_it_binds(agent):
    env = {e.name: e.value for e in agent.env}
    host, _, port = env["TAPIO_METRICS_ADDR"].rpartition(":")
    paths = {}
    for kind in ("startup_probe", "readiness_probe", "liveness_probe"):
        get = getattr(agent, kind).http_get
        assert (get.host, get.port) == (host, int(port)) == ("127.0.0.1", 9464)
        paths[kind] = get.path
    assert paths == {"startup_probe": "/readyz", "readiness_probe": "/readyz", "liveness_probe": "/healthz"}
    # compiling the observers at start may take a minute on a slow node: liveness waits for it
    assert agent.startup_probe.period_seconds * agent.startup_probe.failure_threshold >= 60


def test_resources_have_requests_and_limits(agent):
    resources = agent.resources
    assert set(resources.requests) == set(resources.limits) == {"cpu", "memory"}
    assert quantity(resources.requests["memory"]) <= quantity(resources.limits["memory"])
    assert quantity(resources.requests["cpu"]) <= quantity(resources.limits["cpu"])


def quantity(text: str) -> float:
    number, unit = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", text).groups()
    return float(number) * {"": 1, "m": 1e-3, "Mi": 2**20, "Gi": 2**30}[unit]


def test_rbac_grants_exactly_what_the_enrichment_calls():
    role = load(by_kind("ClusterRole"))
    granted = {(group, resource, verb) for rule in role.rules for group in rule.api_groups
               for resource in rule.resources for verb in rule.verbs}
    # list/watch pods of this node, get the owners of pods (see tapio_enrich_kubernetes/api.py)
    assert granted == {("", "pods", "list"), ("", "pods", "watch"), ("apps", "replicasets", "get"),
                       ("batch", "jobs", "get")}
    binding = load(by_kind("ClusterRoleBinding"))
    account = load(by_kind("ServiceAccount"))
    assert (binding.role_ref.kind, binding.role_ref.name) == ("ClusterRole", role.metadata.name)
    assert [(s.kind, s.name, s.namespace) for s in binding.subjects] == [
        ("ServiceAccount", account.metadata.name, account.metadata.namespace)]


def test_namespace_admits_the_agents_pods():
    labels = load(by_kind("Namespace")).metadata.labels
    assert labels["pod-security.kubernetes.io/enforce"] == "privileged"


# -- the image ------------------------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of deploy/Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [tuple(line.split(None, 1)) for line in lines]


def test_dockerfile_copies_what_exists_and_installs_every_plugin_the_makefile_would():
    steps = dockerfile()
    sources = [source for instruction, args in steps if instruction == "COPY" for source in args.split()[:-1]]
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
    assert {"pyproject.toml", "tapio_core/", "ebpf/", "plugins/"} <= set(sources)
    run = " ".join(args for instruction, args in steps if instruction == "RUN")
    assert "python3-bpfcc" in run, "bcc's Python module comes from Debian's python3-bpfcc"
    assert "plugins/*/ plugins/sinks/*/" in run, "the image must find plugins where the Makefile does"


def test_image_entrypoint_is_the_agent_with_the_daemonsets_arguments(agent):
    steps = dict(dockerfile())
    # The venv's python, without docstrings (-OO, whose byte code the image compiles), runs the console script.
    assert json.loads(steps["ENTRYPOINT"]) == ["/opt/tapio/venv/bin/python3", "-OO", "/opt/tapio/venv/bin/tapio-agent"]
    assert "python3 -OO -m compileall" in " ".join(args for instruction, args in dockerfile() if instruction == "RUN")
    scripts = re.search(r"\[project\.scripts\](.*?)\n\[", (ROOT / "pyproject.toml").read_text(), re.S).group(1)
    assert re.search(r"^tapio-agent\s*=", scripts, re.M), "tapio-agent is no longer a console script"
    assert agent.args == json.loads(steps["CMD"])
    assert agent.command is None  # the image's entrypoint runs
