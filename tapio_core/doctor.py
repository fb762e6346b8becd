"""`tapio doctor`: does this node have what Tapio needs? Each check says what works, what does not, what to do.

Statuses: ``ok``; ``fail`` -- something needed is missing, the agent (or one of
its observers) cannot run; ``warn`` -- it runs with a feature lost;
``optional`` -- missing, but only an optional observer needs it. The observer
checks are the agent's own (:func:`tapio_core.bpf.kernel_fit`), so the doctor
and the agent agree.
"""

from __future__ import annotations

import ctypes
import os
import re
from pathlib import Path
from typing import Any

import attrs

from tapio_core.bpf import (
    BUNDLED_HEADERS,
    CAP_BPF,
    CAP_PERFMON,
    CAP_SYS_ADMIN,
    effective_capabilities,
    find_kernel_headers,
    is_headers_tree,
    kernel_version,
)
from tapio_core.plugins import LoadedPlugins

OK, FAIL, WARN, OPTIONAL = "ok", "fail", "warn", "optional"
AS_ROOT = "run `tapio doctor` as root (as the agent runs) to check this"
RINGBUF_SINCE = (5, 8)
BPF_MAP_TYPE_RINGBUF = 27
#: Names the kernel gives a hardware PMU under /sys/bus/event_source/devices.
PMU_DEVICES = re.compile(r"^(cpu|cpu_core|cpu_atom|armv\d.*pmu.*)$")


@attrs.frozen
class Check:
    group: str
    name: str
    status: str
    detail: str
    fix: str = ""

    def to_dict(self) -> dict[str, str]:
        return attrs.asdict(self)


@attrs.frozen
class NodePaths:
    """Where the kernel shows what it supports; tests point these at crafted directories."""

    tracefs: Path = Path("/sys/kernel/tracing")
    btf: Path = Path("/sys/kernel/btf/vmlinux")
    event_sources: Path = Path("/sys/bus/event_source/devices")
    modules: Path = Path("/lib/modules")
    kheaders: Path = Path("/sys/kernel/kheaders.tar.xz")
    bundled_headers: Path = BUNDLED_HEADERS
    #: The environment TAPIO_KERNEL_HEADERS / BCC_KERNEL_SOURCE are read from (None: the process's).
    environ: dict[str, str] | None = None


def needed_ok(checks: list[Check]) -> bool:
    """True when everything needed works: nothing failed (warnings and optional gaps are fine)."""
    return all(check.status != FAIL for check in checks)


def run_checks(
    plugins: LoadedPlugins | None,
    plugin_error: str | None = None,
    paths: NodePaths = NodePaths(),
    release: str | None = None,
) -> list[Check]:
    """Every check, node first, then each installed observer's tracepoints and kernel struct fields."""
    release = release or os.uname().release
    btf, btf_check = check_btf(paths, plugins)
    checks = [check_privileges(), check_bcc(), check_libbpf(), check_headers(paths, release), btf_check,
              check_tracefs(paths), check_ring_buffer(release), check_pmu(paths)]
    checks += check_plugins(plugins, plugin_error)
    if plugins is not None:
        checks += check_observers(plugins, btf)
    return checks


def node(name: str, status: str, detail: str, fix: str = "") -> Check:
    return Check("node", name, status, detail, fix)


def check_privileges() -> Check:
    caps = effective_capabilities()
    has = lambda cap: bool(caps >> cap & 1)
    if has(CAP_SYS_ADMIN):
        who = "root" if os.geteuid() == 0 else f"uid {os.geteuid()} with CAP_SYS_ADMIN"
        return node("privileges", OK, f"{who}: can load BPF programs")
    if has(CAP_BPF) and has(CAP_PERFMON):
        return node("privileges", OK, "CAP_BPF and CAP_PERFMON: can load BPF programs")
    return node("privileges", FAIL,
                f"uid {os.geteuid()} without CAP_SYS_ADMIN or CAP_BPF+CAP_PERFMON cannot load BPF programs",
                "run tapio-agent (and this check) as root, or grant CAP_BPF and CAP_PERFMON "
                "(a pod's securityContext.capabilities.add)")


def check_bcc() -> Check:
    try:
        import bcc
    except ImportError as exc:
        return node("bcc", FAIL, f"bcc's Python module does not import: {exc}",
                    "apt-get install python3-bpfcc (`make setup` installs it and links it into the venv)")
    return node("bcc", OK, f"bcc {getattr(bcc, '__version__', '?')} imports")


def check_libbpf() -> Check:
    """The agent reads and writes its maps through libbpf (bcc runs only in the compile helpers)."""
    from tapio_core.bpf_objects import libbpf

    try:
        libbpf()
    except (OSError, AttributeError) as exc:
        return node("libbpf", FAIL, f"libbpf.so.1 does not load: {exc}",
                    "apt-get install libbpf1 (`make setup` installs it)")
    return node("libbpf", OK, "libbpf.so.1 loads: the agent reads its maps through it")


def check_headers(paths: NodePaths, release: str) -> Check:
    headers = find_kernel_headers(paths.bundled_headers, paths.modules, paths.kheaders, release, paths.environ)
    safe = "any recent headers serve: every kernel struct offset comes from BTF"
    if headers.path is None:
        return node("kernel headers", FAIL, f"none for bcc to compile BPF programs against (not "
                    f"{paths.bundled_headers}, {paths.modules / release / 'build'} or {paths.kheaders})",
                    "make setup (Tapio's own headers), or set TAPIO_KERNEL_HEADERS to a kernel headers tree; "
                    + safe)
    if headers.tell_bcc and not is_headers_tree(headers.path):
        return node("kernel headers", FAIL, f"{headers.path} ({headers.origin}) has no include/linux/kconfig.h",
                    "point TAPIO_KERNEL_HEADERS at one tree with a kernel's include/ and its generated headers")
    shown = f"{headers.path} -> {headers.path.resolve()}" if headers.path.is_symlink() else str(headers.path)
    return node("kernel headers", OK, f"{shown}: {headers.origin}; {safe}")


def check_btf(paths: NodePaths, plugins: LoadedPlugins | None) -> tuple[Any, Check]:
    from tapio_core.btf import Btf, BtfError

    try:
        btf = Btf.load(paths.btf)
    except BtfError as exc:
        features = sorted({field.feature for _, spec in (plugins.observers.values() if plugins else ())
                           for field in spec.btf_fields})
        lost = f"; lost without it: {', '.join(features)}" if features else ""
        return None, node("BTF", FAIL, f"{exc}{lost}",
                          "boot a kernel built with CONFIG_DEBUG_INFO_BTF=y: Tapio reads kernel struct "
                          "offsets from it, never from headers")
    return btf, node("BTF", OK, f"{paths.btf} ({paths.btf.stat().st_size / 2**20:.1f} MiB)")


def check_tracefs(paths: NodePaths) -> Check:
    events = paths.tracefs / "events"
    try:
        populated = events.is_dir() and any(events.iterdir())
    except PermissionError:
        return node("tracefs", WARN, f"cannot look into {events}: permission denied", AS_ROOT)
    except OSError:
        populated = False
    if populated:
        return node("tracefs", OK, f"{events}")
    return node("tracefs", FAIL, f"{events} is missing or empty: tracepoints cannot be found or attached",
                f"mount -t tracefs tracefs {paths.tracefs}")


def check_ring_buffer(release: str) -> Check:
    version = kernel_version(release)
    wanted = ".".join(map(str, RINGBUF_SINCE))
    if version is not None and version < RINGBUF_SINCE:
        return node("ring buffer", FAIL, f"kernel {release} is older than {wanted}, which added BPF ring buffers",
                    f"upgrade the node to Linux {wanted} or later")
    error = create_ring_buffer()
    if error is None:
        return node("ring buffer", OK, f"a BPF ring buffer map was created (kernel {release})")
    if isinstance(error, PermissionError) or error.errno is None:
        return node("ring buffer", OK, f"kernel {release} >= {wanted} (no test map: {error})")
    return node("ring buffer", FAIL, f"creating a BPF ring buffer map failed: {error}",
                "check the kernel's BPF settings (CONFIG_BPF_SYSCALL, lockdown, LSM policy) in dmesg")


def create_ring_buffer() -> OSError | None:
    """Create and close a one-page BPF_MAP_TYPE_RINGBUF through libbcc; the error, or None when it worked."""
    try:
        from bcc.libbcc import lib
    except ImportError:
        return OSError(None, "bcc is not importable")
    libbcc = ctypes.CDLL(lib._name, use_errno=True)
    create = libbcc.bcc_create_map
    create.restype = ctypes.c_int
    create.argtypes = [ctypes.c_int, ctypes.c_char_p] + [ctypes.c_int] * 4
    fd = create(BPF_MAP_TYPE_RINGBUF, b"tapio_doctor", 0, 0, os.sysconf("SC_PAGE_SIZE"), 0)
    if fd < 0:
        code = -fd if fd < -1 else ctypes.get_errno()
        error = OSError(code, os.strerror(code))
        return PermissionError(code, os.strerror(code)) if code in (1, 13) else error
    os.close(fd)
    return None


def check_pmu(paths: NodePaths) -> Check:
    try:
        found = sorted(entry.name for entry in paths.event_sources.iterdir() if PMU_DEVICES.match(entry.name))
    except OSError:
        found = []
    if found:
        return node("hardware PMU", OK, f"{', '.join(found)} under {paths.event_sources}")
    return node("hardware PMU", OPTIONAL,
                f"none under {paths.event_sources} (a VM without a virtual PMU?): only the pmc observer needs it "
                "and reports itself unsupported; everything else runs",
                "for CPU counters, run on bare metal or enable the hypervisor's vPMU")


def check_plugins(plugins: LoadedPlugins | None, plugin_error: str | None) -> list[Check]:
    fix = "reinstall the plugin's distribution, or leave it out with --plugins / TAPIO_LOAD_PLUGINS"
    if plugins is None:
        return [Check("plugins", "plugins", FAIL, plugin_error or "the plugins could not be loaded", fix)]
    checks = [Check("plugins", name, FAIL, f"failed to load: {error}", fix) for name, error in plugins.failed.items()]
    if not plugins.observers:
        checks.append(Check("plugins", "observers", FAIL, "no observer plugin is installed",
                            "install one, e.g. pip install tapio-observer-network"))
    return checks


def check_observers(plugins: LoadedPlugins, btf: Any) -> list[Check]:
    """Each observer as the agent would load it here (:func:`tapio_core.bpf.kernel_fit`): what stops it,
    which features it runs without and why, and its tracepoints one by one."""
    from tapio_core.bpf import kernel_fit, tracepoint_exists

    checks = []
    for name, (_plugin, spec) in sorted(plugins.observers.items()):
        group = f"observer {name}"
        try:
            fit = kernel_fit(spec, btf)
            present = {tracepoint: tracepoint_exists(tracepoint) for tracepoint in spec.tracepoints}
        except PermissionError:
            checks.append(Check(group, "tracepoints", WARN, "cannot look them up in tracefs: permission denied",
                                AS_ROOT))
            continue
        for tracepoint, found in present.items():
            category, _, event = tracepoint.partition(":")
            label = f"raw tracepoint {event}" if category == "raw" else f"tracepoint {tracepoint}"
            checks.append(Check(group, label, OK, "present") if found else
                          Check(group, label, FAIL, f"this kernel lacks it: the {name} observer cannot start",
                                f"a kernel with this tracepoint, or leave {name} out with --plugins"))
        for why in fit.missing:
            if not why.startswith("the kernel has no tracepoint"):  # said above, one line per tracepoint
                checks.append(Check(group, "required feature", FAIL, f"{why}: the {name} observer cannot start",
                                    f"a newer kernel, or leave {name} out with --plugins"))
        for feature, why in sorted(fit.disabled.items()):
            checks.append(Check(group, feature, WARN, f"off: {why}",
                                "the observer runs without this feature; a newer kernel has it"))
        if not spec.tracepoints:
            checks.append(Check(group, "tracepoints", OK, "uses none"))
        if not fit.missing and not fit.disabled:
            checks.append(Check(group, "kernel features", OK, "every declared feature is available"))
    return checks
