"""`tapio doctor`: node checks against crafted /sys-like trees, observers' tracepoints, and the real node."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
from pathlib import Path

import attrs
import numpy as np
import pytest
from click.testing import CliRunner
from kernel_helpers import TAPIO, scaled, tool_env

from tapio_core import BtfField, ObserverSpec, OptionalTracepoint, hookimpl
from tapio_core.bpf import BUNDLED_HEADERS, kernel_version
from tapio_core.cli import cli
from tapio_core.doctor import FAIL, OK, OPTIONAL, WARN, NodePaths, check_ring_buffer, needed_ok, run_checks
from tapio_core.plugins import load_plugins
from tapio_core.render import console, print_doctor

RELEASE = "6.18.0-test"
BTF = Path("/sys/kernel/btf/vmlinux")
needs_btf = pytest.mark.skipif(not BTF.exists(), reason="this kernel has no BTF to read struct fields from")


def node_tree(root: Path, *, tracefs=True, btf=True, headers=True, pmu=True) -> NodePaths:
    """A crafted node: each piece present or missing as asked."""
    paths = NodePaths(tracefs=root / "tracing", btf=root / "vmlinux", event_sources=root / "devices",
                      modules=root / "modules", kheaders=root / "kheaders.tar.xz",
                      bundled_headers=root / "bundled", environ={})
    (root / "devices" / "software").mkdir(parents=True)
    if tracefs:
        (root / "tracing" / "events" / "sched").mkdir(parents=True)
    if btf:
        paths.btf.write_bytes(BTF.read_bytes() if BTF.exists() else b"not btf")
    if headers:
        (root / "modules" / RELEASE / "build" / "include").mkdir(parents=True)
    if pmu:
        (root / "devices" / "cpu").mkdir()
    return paths


def by_name(checks) -> dict:
    return {(check.group, check.name): check for check in checks}


class Probe:
    """A throwaway observer plugin declaring the tracepoints and struct fields a test wants."""

    def __init__(self, name: str, tracepoints: tuple[str, ...], btf_fields: tuple[BtfField, ...] = (),
                 **declarations):
        self.spec = ObserverSpec(name=name, bpf_source=Path("/nonexistent.bpf.c"),
                                 record_dtype=np.dtype([("timestamp_ns", "<u8")]), tracepoints=tracepoints,
                                 btf_fields=btf_fields, **declarations)

    @hookimpl
    def tapio_register_observers(self, register):
        register(self.spec)


def probe_plugins(*probes: Probe):
    return load_plugins(allow=set(), extra=[(probe.spec.name, probe) for probe in probes])


def test_a_crafted_node_missing_everything_fails_each_check_with_what_to_do(tmp_path):
    paths = node_tree(tmp_path, tracefs=False, btf=False, headers=False, pmu=False)
    checks = by_name(run_checks(probe_plugins(), paths=paths, release=RELEASE))
    headers = checks[("node", "kernel headers")]
    assert headers.status == FAIL
    assert headers.fix.startswith("make setup (Tapio's own headers), or set TAPIO_KERNEL_HEADERS")
    assert checks[("node", "BTF")].status == FAIL
    assert "CONFIG_DEBUG_INFO_BTF=y" in checks[("node", "BTF")].fix
    assert checks[("node", "tracefs")].status == FAIL
    assert checks[("node", "tracefs")].fix == f"mount -t tracefs tracefs {tmp_path / 'tracing'}"
    assert checks[("node", "hardware PMU")].status == OPTIONAL  # only the pmc observer needs it
    assert "only the pmc observer needs it" in checks[("node", "hardware PMU")].detail
    assert checks[("plugins", "observers")].status == FAIL  # nothing to run
    assert not needed_ok(list(checks.values()))


@needs_btf
def test_a_crafted_node_with_everything_passes_and_names_what_it_found(tmp_path):
    paths = node_tree(tmp_path)
    plugins = probe_plugins(Probe("probe", ("sched:sched_process_exit",)))
    checks = run_checks(plugins, paths=paths, release=RELEASE)
    found = by_name(checks)
    for name in ("kernel headers", "BTF", "tracefs", "hardware PMU"):
        assert found[("node", name)].status == OK, found[("node", name)]
    assert found[("node", "hardware PMU")].detail == f"cpu under {tmp_path / 'devices'}"
    assert found[("node", "kernel headers")].detail.startswith(str(tmp_path / "modules" / RELEASE / "build"))


def test_without_libbpf_the_agent_cannot_read_its_maps_and_doctor_says_what_to_install(tmp_path, monkeypatch):
    import tapio_core.bpf_objects

    def missing():
        raise OSError("libbpf.so.1: cannot open shared object file: No such file or directory")

    monkeypatch.setattr(tapio_core.bpf_objects, "libbpf", missing)
    checks = by_name(run_checks(probe_plugins(), paths=node_tree(tmp_path), release=RELEASE))
    libbpf = checks[("node", "libbpf")]
    assert (libbpf.status, libbpf.fix) == (FAIL, "apt-get install libbpf1 (`make setup` installs it)")
    assert "cannot open shared object file" in libbpf.detail


def headers_tree(path: Path) -> Path:
    (path / "include" / "linux").mkdir(parents=True)
    (path / "include" / "linux" / "kconfig.h").write_text("")
    return path


def test_tapios_own_headers_come_before_the_nodes_and_a_named_tree_before_both(tmp_path):
    paths = node_tree(tmp_path)  # the node has headers too
    headers_tree(paths.bundled_headers)
    check = by_name(run_checks(probe_plugins(), paths=paths, release=RELEASE))[("node", "kernel headers")]
    assert (check.status, check.detail) == (OK, f"{paths.bundled_headers}: Tapio's own, installed beside it; "
                                                "any recent headers serve: every kernel struct offset comes from BTF")
    named = headers_tree(tmp_path / "named")
    paths = attrs.evolve(paths, environ={"TAPIO_KERNEL_HEADERS": str(named)})
    check = by_name(run_checks(probe_plugins(), paths=paths, release=RELEASE))[("node", "kernel headers")]
    assert check.detail.startswith(f"{named}: TAPIO_KERNEL_HEADERS names it;")
    paths = attrs.evolve(paths, environ={"TAPIO_KERNEL_HEADERS": str(tmp_path / "devices")})
    check = by_name(run_checks(probe_plugins(), paths=paths, release=RELEASE))[("node", "kernel headers")]
    assert (check.status, check.detail) == (
        FAIL, f"{tmp_path / 'devices'} (TAPIO_KERNEL_HEADERS names it) has no include/linux/kconfig.h")


def test_kernel_headers_may_come_from_the_kernel_itself(tmp_path):
    paths = node_tree(tmp_path, headers=False)
    paths.kheaders.write_bytes(b"xz")
    assert by_name(run_checks(probe_plugins(), paths=paths, release=RELEASE))[("node", "kernel headers")].status == OK


@pytest.mark.parametrize(("release", "version"), [
    ("6.18.44-fc-v657", (6, 18)), ("5.15.0-91-generic", (5, 15)), ("6", (6, 0)), ("weird", None)])
def test_kernel_version_parsing(release, version):
    assert kernel_version(release) == version


def test_a_kernel_older_than_5_8_has_no_ring_buffer():
    check = check_ring_buffer("5.4.0-150-generic")
    assert check.status == FAIL
    assert check.detail == "kernel 5.4.0-150-generic is older than 5.8, which added BPF ring buffers"
    assert check.fix == "upgrade the node to Linux 5.8 or later"


@pytest.mark.kernel
def test_each_tracepoint_of_each_observer_is_checked_as_the_agent_checks_it(tmp_path):
    plugins = probe_plugins(
        Probe("good", ("sock:inet_sock_set_state", "raw:block_rq_issue"),
              (BtfField("X", "sock", "__sk_common.skc_cookie", "cookies"),
               BtfField("Y", "sock", "no_such_member", "imaginary feature"))),
        Probe("bad", ("sock:no_such_tracepoint", "raw:no_such_raw_tracepoint")),
    )
    checks = by_name(run_checks(plugins, release=RELEASE))
    assert checks[("observer good", "tracepoint sock:inet_sock_set_state")].status == OK
    assert checks[("observer good", "raw tracepoint block_rq_issue")].status == OK
    missing = checks[("observer bad", "tracepoint sock:no_such_tracepoint")]
    assert (missing.status, missing.detail) == (FAIL, "this kernel lacks it: the bad observer cannot start")
    assert "leave bad out with --plugins" in missing.fix
    assert checks[("observer bad", "raw tracepoint no_such_raw_tracepoint")].status == FAIL
    lost = checks[("observer good", "imaginary feature")]
    assert (lost.status, lost.detail) == (WARN, "off: the kernel has no sock.no_such_member")
    assert ("observer good", "cookies") not in checks
    assert not needed_ok(list(checks.values()))


@pytest.mark.kernel
def test_a_required_feature_the_kernel_lacks_fails_the_observer_and_an_optional_one_only_warns(tmp_path):
    from tapio_core.bpf import ObserverLoadError, load_observer
    from tapio_core.btf import Btf

    cookie = BtfField("X", "sock", "__sk_common.skc_cookie", "cookies")
    imaginary = BtfField("Y", "sock", "no_such_member", "imaginary feature")
    plugins = probe_plugins(
        Probe("needy", ("sock:inet_sock_set_state",), (cookie, imaginary), required_features=("imaginary feature",)),
        Probe("chooser", ("sock:inet_sock_set_state",), (cookie, imaginary),
              required_features=(("imaginary feature", "cookies"),),
              optional_tracepoints=(OptionalTracepoint("Z", "sock:no_such_tracepoint", "sends"),)),
    )
    checks = by_name(run_checks(plugins, release=RELEASE))
    needed = checks[("observer needy", "required feature")]
    assert (needed.status, needed.detail) == (FAIL, "imaginary feature is required and the kernel has no "
                                                    "sock.no_such_member: the needy observer cannot start")
    # A choice met by another of its features loses nothing; an optional tracepoint only its feature.
    assert ("observer chooser", "imaginary feature") not in checks
    sends = checks[("observer chooser", "sends")]
    assert (sends.status, sends.detail) == (WARN, "off: the kernel has no tracepoint sock:no_such_tracepoint")
    # The agent does what doctor said: the needy observer is refused before any compile.
    with pytest.raises(ObserverLoadError, match="imaginary feature is required"):
        load_observer(plugins.observers["needy"][1], None, Btf.load())


def test_plugins_that_cannot_load_are_failures(tmp_path):
    result = CliRunner().invoke(cli, ["doctor", "--json", "--plugins", "no-such-plugin"])
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    plugin_check = next(check for check in report["checks"] if check["group"] == "plugins")
    assert plugin_check["status"] == FAIL
    assert "plugin(s) not installed: no-such-plugin" in plugin_check["detail"]


def test_a_plugin_that_fails_to_import_is_named_with_its_error(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "tapio_doctor_broken.py").write_text("raise ImportError('needs libfoo')\n")
    dist_info = site / "tapio_doctor_broken-0.0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: tapio-doctor-broken\nVersion: 0.0.1\n")
    (dist_info / "entry_points.txt").write_text("[tapio]\ndoctorbroken = tapio_doctor_broken\n")
    done = subprocess.run([str(TAPIO), "doctor", "--json"], capture_output=True, text=True, timeout=scaled(60),
                          env=tool_env({"PYTHONPATH": str(site)}))
    assert done.returncode == 1
    report = json.loads(done.stdout)
    broken = [c for c in report["checks"] if c["group"] == "plugins" and c["name"] == "doctorbroken"]
    assert broken == [{"group": "plugins", "name": "doctorbroken", "status": FAIL,
                       "detail": "failed to load: ImportError: needs libfoo",
                       "fix": "reinstall the plugin's distribution, or leave it out with --plugins / "
                              "TAPIO_LOAD_PLUGINS"}]


def test_human_output_lists_problems_and_what_to_do(tmp_path, capsys):
    checks = run_checks(probe_plugins(), paths=node_tree(tmp_path, tracefs=False), release=RELEASE)
    print_doctor(checks, needed_ok(checks), console())
    out = capsys.readouterr().out
    assert re.search(r"\n fail +tracefs +" + re.escape(str(tmp_path / "tracing" / "events")) + " is missing", out)
    assert f"-> mount -t tracefs tracefs {tmp_path / 'tracing'}" in out
    assert re.search(r"\n optional +hardware PMU", out) is None  # the crafted node has one
    assert out.rstrip().endswith("problem(s): fix them and run `tapio doctor` again.")


def test_plugins_lists_what_each_installed_plugin_provides():
    result = CliRunner().invoke(cli, ["plugins"])
    assert result.exit_code == 0
    network = next(line for line in result.output.splitlines() if line.split()[:1] == ["network"])
    version = importlib.metadata.version("tapio-observer-network")
    assert network.split()[1:5] == ["tapio-observer-network", version, "observer", "network"]
    assert "tapio_register_observers" in result.output
    kubernetes = next(line for line in result.output.splitlines() if line.split()[:1] == ["kubernetes"])
    assert kubernetes.split()[1] == "tapio-enrich-kubernetes" and "enricher kubernetes" in kubernetes
    listed = {p["name"]: p for p in json.loads(CliRunner().invoke(cli, ["plugins", "--json"]).output)}
    assert (listed["kubernetes"]["enrichers"], listed["network"]["observers"]) == (["kubernetes"], ["network"])


# -- the real node -------------------------------------------------------------------------------


@pytest.mark.kernel
def test_on_this_node_everything_needed_works():
    done = subprocess.run([str(TAPIO), "doctor", "--json"], capture_output=True, text=True, timeout=scaled(60),
                          env=tool_env())
    report = json.loads(done.stdout)
    failed = [c for c in report["checks"] if c["status"] == FAIL]
    assert (done.returncode, report["ok"], failed) == (0, True, [])
    checks = {(c["group"], c["name"]): c for c in report["checks"]}
    assert checks[("node", "ring buffer")]["detail"].startswith("a BPF ring buffer map was created")
    # make setup installed Tapio's own headers: what bcc compiles against on this node (and in the guests,
    # which have no headers at all); tool_env() passes no TAPIO_KERNEL_HEADERS.
    assert checks[("node", "kernel headers")]["detail"].startswith(f"{BUNDLED_HEADERS}: Tapio's own")
    for tracepoint in ("sock:inet_sock_set_state", "tcp:tcp_receive_reset", "tcp:tcp_retransmit_skb"):
        assert checks[("observer network", f"tracepoint {tracepoint}")]["status"] == OK
    has_pmu = os.path.isdir("/sys/bus/event_source/devices/cpu")
    assert checks[("node", "hardware PMU")]["status"] == (OK if has_pmu else OPTIONAL)
    human = subprocess.run([str(TAPIO), "doctor"], capture_output=True, text=True, timeout=scaled(60), env=tool_env())
    assert human.returncode == 0
    assert human.stdout.rstrip().endswith("Everything Tapio needs works on this node.")


@pytest.mark.kernel
def test_without_privileges_doctor_says_so_and_exits_1():
    unprivileged = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
                    "--bounding-set=-all"]
    done = subprocess.run([*unprivileged, str(TAPIO), "doctor", "--json"], capture_output=True, text=True,
                          timeout=scaled(60), cwd="/", env=tool_env({"HOME": "/"}))
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    checks = {(c["group"], c["name"]): c for c in json.loads(done.stdout)["checks"]}
    privileges = checks[("node", "privileges")]
    assert privileges["status"] == FAIL
    assert privileges["detail"] == "uid 65534 without CAP_SYS_ADMIN or CAP_BPF+CAP_PERFMON cannot load BPF programs"
    assert "CAP_BPF and CAP_PERFMON" in privileges["fix"]
