"""What the running kernel offers an observer, and loading its BPF program (compiled by bcc in a helper)."""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import re
import struct
import sys
import time
from pathlib import Path

import attrs

from tapio_core.bpf_objects import LoadedProgram
from tapio_core.btf import Btf
from tapio_core.observer import ObserverSpec

log = logging.getLogger("tapio.bpf")


class ObserverLoadError(Exception):
    """One observer's BPF could not be compiled or attached; the others go on."""


class ObserverUnsupported(ObserverLoadError):
    """This machine lacks what the observer needs (e.g. a hardware PMU): not a fault, a fact."""


def shared_include_dir() -> Path:
    import tapio_core.ebpf

    return Path(next(iter(tapio_core.ebpf.__path__)))


PRELUDE = "tapio_prelude.bpf.c"


def program_text(source: Path, ebpf_dir: Path | None) -> str:
    """The observer's source behind the shared prelude (ring buffer, loss counter, tapio_submit).

    bcc rewrites map calls only in the main source, so shared code that uses
    maps is put in front of it as text; ``#line`` keeps compiler messages
    pointing at the observer's own file and lines.
    """
    prelude = Path(ebpf_dir) / PRELUDE if ebpf_dir is not None else None
    if prelude is None or not prelude.is_file():
        prelude = shared_include_dir() / PRELUDE
    return f'{prelude.read_text()}\n#line 1 "{source}"\n{source.read_text()}'


def resolve_source(spec: ObserverSpec, ebpf_dir: Path | None) -> Path:
    """The observer's own source, or a same-named file in ``--ebpf-dir`` when there is one."""
    if ebpf_dir is not None:
        override = Path(ebpf_dir) / Path(spec.bpf_source).name
        if override.is_file():
            return override
    return Path(spec.bpf_source)


#: Where tracefs lists the kernel's trace events (tests point it elsewhere).
TRACEFS_EVENTS = Path("/sys/kernel/tracing/events")


def btf_cflags(spec: ObserverSpec, btf: Btf | None) -> tuple[list[str], dict[str, str]]:
    """``-D`` flags for the BTF fields and raw tracepoint argument types this kernel has, and the
    features lost to those it does not (feature -> why)."""
    flags, disabled = [], {}
    for arg in spec.raw_tracepoint_args:
        found = btf.raw_tracepoint_arg(arg.tracepoint, arg.index) if btf is not None else None
        if found == arg.c_type:
            flags.append(f"-D{arg.macro}=1")
        else:
            disabled.setdefault(arg.feature, f"raw tracepoint {arg.tracepoint} has no argument {arg.index}"
                                if found is None and btf is not None else
                                f"raw tracepoint {arg.tracepoint}'s argument {arg.index} is "
                                f"{found or 'unknown'} here, not {arg.c_type}")
    for field in spec.btf_fields:
        offset = btf.field_offset(field.struct, field.path) if btf is not None else None
        if offset is None:
            disabled.setdefault(field.feature, f"the kernel has no {field.struct}.{field.path}")
        else:
            flags.append(f"-D{field.macro}={offset}")
    return flags, disabled


def tracepoint_cflags(spec: ObserverSpec) -> tuple[list[str], dict[str, str]]:
    """``-D`` flags for the optional tracepoints and tracepoint fields this kernel has, and the features
    lost to those it lacks (feature -> why)."""
    flags, disabled = [], {}
    for optional in spec.optional_tracepoints:
        if tracepoint_exists(optional.tracepoint):
            flags.append(f"-D{optional.macro}=1")
        else:
            disabled.setdefault(optional.feature, f"the kernel has no tracepoint {optional.tracepoint}")
    for field in spec.tracepoint_fields:
        if tracepoint_has_field(field.tracepoint, field.field):
            flags.append(f"-D{field.macro}=1")
        else:
            disabled.setdefault(field.feature, f"tracepoint {field.tracepoint} has no field {field.field}")
    return flags, disabled


#: Linux capability numbers: loading BPF programs needs CAP_SYS_ADMIN, or CAP_BPF with CAP_PERFMON (5.8+).
CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 21, 38, 39


def effective_capabilities() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def can_load_bpf() -> bool:
    caps = effective_capabilities()
    has = lambda cap: bool(caps >> cap & 1)
    return has(CAP_SYS_ADMIN) or (has(CAP_BPF) and has(CAP_PERFMON))


#: Where ``make setup`` and the image put Tapio's own kernel headers: beside its Python environment.
BUNDLED_HEADERS = Path(sys.prefix) / "share" / "tapio" / "kernel-headers"


@attrs.frozen
class KernelHeaders:
    """The headers bcc compiles against, and who chose them; ``path`` None: bcc finds none."""

    path: Path | None
    origin: str
    #: A single merged tree bcc must be told of (BCC_KERNEL_SOURCE); the node's own build/source pair
    #: under /lib/modules bcc finds by itself, and must not be told of (it would lose the source half).
    tell_bcc: bool = False


def is_headers_tree(path: Path) -> bool:
    """Whether ``path`` is one tree bcc can compile against (it looks for include/linux/kconfig.h)."""
    return (path / "include" / "linux" / "kconfig.h").is_file()


def find_kernel_headers(
    bundled: Path = BUNDLED_HEADERS,
    modules: Path = Path("/lib/modules"),
    kheaders: Path = Path("/sys/kernel/kheaders.tar.xz"),
    release: str | None = None,
    environ: dict[str, str] | None = None,
) -> KernelHeaders:
    """Headers named by TAPIO_KERNEL_HEADERS (or bcc's own BCC_KERNEL_SOURCE), else Tapio's own, else
    the node's. Any recent headers serve: they give bcc type declarations and macros, while every
    kernel struct offset comes from BTF, so the node needs none installed."""
    environ = os.environ if environ is None else environ
    for variable in ("TAPIO_KERNEL_HEADERS", "BCC_KERNEL_SOURCE"):
        if environ.get(variable):
            return KernelHeaders(Path(environ[variable]), f"{variable} names it", tell_bcc=True)
    if is_headers_tree(bundled):
        return KernelHeaders(bundled, "Tapio's own, installed beside it", tell_bcc=True)
    build = modules / (release or os.uname().release) / "build"
    if (build / "include").is_dir() or (build / "Makefile").is_file():
        return KernelHeaders(build, "the node's")
    if kheaders.exists():
        return KernelHeaders(kheaders, "the kernel's built-in (CONFIG_IKHEADERS)")
    return KernelHeaders(None, "none found")


def use_kernel_headers() -> KernelHeaders:
    """Point bcc at :func:`find_kernel_headers`' choice (bcc reads BCC_KERNEL_SOURCE at each compile)."""
    headers = find_kernel_headers()
    if headers.tell_bcc:
        os.environ["BCC_KERNEL_SOURCE"] = str(headers.path)
    return headers


def kernel_version(release: str | None = None) -> tuple[int, int] | None:
    """(major, minor) of a kernel release such as ``6.18.44-fc-v657`` (default: the running kernel's); None
    when it does not start with a version."""
    match = re.match(r"(\d+)(?:\.(\d+))?", release if release is not None else os.uname().release)
    return (int(match.group(1)), int(match.group(2) or 0)) if match else None


def tracepoint_exists(name: str) -> bool:
    """Whether tracefs lists ``category:name`` (``raw:NAME``: any category's event of that name)."""
    category, _, event = name.partition(":")
    # A raw tracepoint has no category of its own: any tracefs event of that name will do.
    return any(TRACEFS_EVENTS.glob(f"*/{event}")) if category == "raw" else (TRACEFS_EVENTS / category / event).is_dir()


def missing_tracepoints(spec: ObserverSpec) -> list[str]:
    """Required tracepoints this kernel lacks (``raw:NAME`` entries are checked in tracefs too)."""
    return [name for name in spec.tracepoints if not tracepoint_exists(name)]


@attrs.frozen
class KernelFit:
    """What the running kernel offers one observer; the agent compiles by it and ``tapio doctor`` reports it,
    so the two cannot disagree."""

    #: ``-D`` flags for what this kernel has.
    cflags: tuple[str, ...]
    #: Features off on this kernel, each with why.
    disabled: dict[str, str]
    #: Why the observer cannot run here at all (missing required tracepoints and features); empty if it can.
    missing: tuple[str, ...]


def kernel_fit(spec: ObserverSpec, btf: Btf | None) -> KernelFit:
    """Resolve every declaration of ``spec`` against this kernel (tracefs, BTF, the BPF verifier)."""
    missing = [f"the kernel has no tracepoint {name}" for name in missing_tracepoints(spec)]
    flags, disabled = btf_cflags(spec, btf)
    tracepoint_flags, tracepoint_disabled = tracepoint_cflags(spec)
    flags += tracepoint_flags
    for feature, why in tracepoint_disabled.items():
        disabled.setdefault(feature, why)
    if bpf_atomics():
        flags.append(f"-D{ATOMICS_MACRO}=1")
    for required in spec.required_features:
        choices = (required,) if isinstance(required, str) else required
        if all(choice in disabled for choice in choices):
            missing += [f"{choice} is required and {disabled[choice]}" for choice in choices]
        elif len(choices) > 1:
            for choice in choices:  # another choice serves: nothing is lost
                disabled.pop(choice, None)
    return KernelFit(tuple(flags), disabled, tuple(missing))


#: Defined for BPF programs where the verifier accepts atomic compare-and-swap and fetch-and-add whose
#: result is used (Linux 5.12); ``tapio_cas`` in ``tapio.h`` emulates them elsewhere.
ATOMICS_MACRO = "TAPIO_BPF_ATOMICS"
_BPF_PROG_LOAD, _BPF_PROG_TYPE_SOCKET_FILTER, _SYS_BPF_X86_64 = 5, 1, 321


@functools.cache
def bpf_atomics() -> bool:
    """Whether this kernel's verifier accepts BPF_ATOMIC compare-and-swap: a six-instruction program is
    loaded through bpf(2) and closed. False also where no program can be loaded (no privilege): the
    emulation works everywhere."""
    # r1 = 0; *(u64 *)(r10 - 8) = r1; r0 = 0; r2 = 1; r0 = cmpxchg(r10 - 8, r0, r2); exit
    program = struct.pack("<" + "BBhi" * 6,
                          0xB7, 1, 0, 0, 0x7B, 10 | 1 << 4, -8, 0, 0xB7, 0, 0, 0, 0xB7, 2, 0, 1,
                          0xDB, 10 | 2 << 4, -8, 0xF1, 0x95, 0, 0, 0)
    insns = ctypes.create_string_buffer(program, len(program))
    license_ = ctypes.create_string_buffer(b"GPL")
    attr = ctypes.create_string_buffer(struct.pack("<IIQQ", _BPF_PROG_TYPE_SOCKET_FILTER, 6,
                                                   ctypes.addressof(insns), ctypes.addressof(license_)), 128)
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(_SYS_BPF_X86_64, _BPF_PROG_LOAD, attr, ctypes.sizeof(attr))
    if fd < 0:
        log.debug("BPF atomics probe: %s", os.strerror(ctypes.get_errno()))
        return False
    os.close(fd)
    return True


def tracepoint_format(tracepoint: str) -> str | None:
    """``category:name``'s tracefs format on this kernel, None where it has no such tracepoint."""
    category, _, event = tracepoint.partition(":")
    try:
        return (TRACEFS_EVENTS / category / event / "format").read_text()
    except OSError:
        return None


def tracepoint_has_field(tracepoint: str, field: str) -> bool:
    """Whether ``category:name`` carries ``field`` on this kernel (from its tracefs format)."""
    text = tracepoint_format(tracepoint)
    if text is None:
        return False
    return any(line.strip().startswith("field:") and line.split(";")[0].split()[-1].split("[")[0] == field
               for line in text.splitlines())


def tracepoint_symbols(tracepoint: str, field: str) -> dict[int, str]:
    """The names ``category:name``'s print format gives ``field``'s values (its ``__print_symbolic``), by value;
    empty when this kernel's tracepoint has no such table. Enum values move between kernels: read them here."""
    text = tracepoint_format(tracepoint)
    if text is None:
        return {}
    found = re.search(rf"__print_symbolic\(REC->{re.escape(field)},(.*)", text)
    if found is None:
        return {}
    return {int(value, 0): name for value, name in re.findall(r'\{\s*([0-9xa-fA-F]+)\s*,\s*"([^"]*)"\s*\}',
                                                                   found.group(1))}


@functools.lru_cache(maxsize=1024)
def kernel_symbol(address: int, kallsyms: Path = Path("/proc/kallsyms")) -> str:
    """A kernel text address as ``function+0xoffset`` (what the kernel's own %pS prints), from /proc/kallsyms;
    the bare hex address when it cannot say (addresses hidden from this user, or none before it)."""
    best, name = 0, ""
    try:
        with kallsyms.open() as symbols:
            for line in symbols:
                value, kind, symbol = line.split()[:3]
                at = int(value, 16)
                if best < at <= address and kind in "tTwW":
                    best, name = at, symbol
    except (OSError, ValueError):
        pass
    return f"{name}+{address - best:#x}" if name else f"{address:#x}"


def write_struct(table, values: dict) -> None:
    """Slot 0 of a one-entry array map, field by field; a list fills an array member word by word."""
    leaf = table.Leaf()
    for field, value in values.items():
        if isinstance(value, list):
            for index, word in enumerate(value):
                getattr(leaf, field)[index] = word
        else:
            setattr(leaf, field, value)
    table[table.Key(0)] = leaf


def read_counter(program: LoadedProgram, map_name: str, index: int) -> int:
    """One slot of a BPF array map, summed over CPUs for a per-CPU map; 0 when the map is absent."""
    table = program.maps.get(map_name)
    if table is None:
        return 0
    value = table.get(index)
    if value is None:
        return 0
    if table.per_cpu:  # one value per CPU
        return int(sum(leaf.value for leaf in value))
    return int(value.value)


@attrs.frozen
class ObserverBuild:
    """What bcc compiles for one observer on this kernel: the program text, its flags, and the features off."""

    text: str
    cflags: list[str]
    disabled: dict[str, str]


def observer_build(spec: ObserverSpec, ebpf_dir: Path | None, btf: Btf | None) -> ObserverBuild:
    """Resolve ``spec`` against this kernel; ObserverLoadError when it cannot run here."""
    fit = kernel_fit(spec, btf)
    if fit.missing:
        raise ObserverLoadError(f"{spec.name}: cannot run on this kernel: {'; '.join(fit.missing)}")
    for feature, why in fit.disabled.items():
        log.warning("%s: %s; %s disabled", spec.name, why, feature)
    source = resolve_source(spec, ebpf_dir)
    if not source.is_file():
        raise ObserverLoadError(f"{spec.name}: BPF source {source} not found")
    includes = [f"-I{ebpf_dir}"] if ebpf_dir is not None else []
    includes.append(f"-I{shared_include_dir()}")
    use_kernel_headers()  # a compile helper inherits BCC_KERNEL_SOURCE
    return ObserverBuild(program_text(source, ebpf_dir), [*includes, *fit.cflags, *spec.cflags], dict(fit.disabled))


def load_observer(spec: ObserverSpec, ebpf_dir: Path | None, btf: Btf | None) -> tuple[LoadedProgram, dict[str, str]]:
    """Compile and attach one observer in a compile helper (bcc never enters this process).

    Returns the loaded program (its descriptors) and the disabled features (feature -> why).
    """
    from tapio_core.bpf_objects import CompileError, compile_in_helper

    build = observer_build(spec, ebpf_dir, btf)
    started = time.monotonic()
    try:
        program, helper_peak_kb = compile_in_helper(build.text, build.cflags, spec.perf_event_programs)
    except CompileError as exc:
        raise ObserverLoadError(f"{spec.name}: {exc}") from None
    log.info("%s: compiled and attached in %.1f s by a helper process that peaked at %.0f MB RSS", spec.name,
             time.monotonic() - started, helper_peak_kb / 1024)
    if spec.ring_buffer not in program:
        program.close()
        raise ObserverLoadError(f"{spec.name}: the BPF program has no map {spec.ring_buffer}")
    return program, build.disabled


def read_lost(program: LoadedProgram, counter: str | None) -> int:
    """Records the BPF side could not put in the ring buffer (summed over CPUs)."""
    return 0 if counter is None else read_counter(program, counter, 0)
