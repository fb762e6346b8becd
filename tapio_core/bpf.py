"""Compiling and attaching an observer's BPF program with bcc."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

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


def btf_cflags(spec: ObserverSpec, btf: Btf | None) -> tuple[list[str], list[str]]:
    """``-D`` flags for the BTF fields and raw tracepoint argument types this kernel has, and the
    features lost to those it does not."""
    flags, disabled = [], []
    for arg in spec.raw_tracepoint_args:
        found = btf.raw_tracepoint_arg(arg.tracepoint, arg.index) if btf is not None else None
        if found == arg.c_type:
            flags.append(f"-D{arg.macro}=1")
        else:
            disabled.append(arg.feature)
            log.warning("%s: raw tracepoint %s's argument %d is %s here, not %s; %s disabled", spec.name,
                        arg.tracepoint, arg.index, found or "unknown", arg.c_type, arg.feature)
    for field in spec.btf_fields:
        offset = btf.field_offset(field.struct, field.path) if btf is not None else None
        if offset is None:
            disabled.append(field.feature)
            log.warning(
                "%s: kernel has no %s.%s; %s disabled", spec.name, field.struct, field.path, field.feature
            )
        else:
            flags.append(f"-D{field.macro}={offset}")
    return flags, disabled


def tracepoint_cflags(spec: ObserverSpec) -> tuple[list[str], list[str]]:
    """``-D`` flags for the tracepoint fields this kernel has, and the features lost to those it lacks."""
    flags, disabled = [], []
    for field in spec.tracepoint_fields:
        if tracepoint_has_field(field.tracepoint, field.field):
            flags.append(f"-D{field.macro}=1")
        else:
            disabled.append(field.feature)
            log.warning("%s: tracepoint %s has no field %s on this kernel; %s disabled",
                        spec.name, field.tracepoint, field.field, field.feature)
    return flags, disabled


def missing_tracepoints(spec: ObserverSpec) -> list[str]:
    """Declared tracepoints this kernel lacks (``raw:NAME`` entries are checked in tracefs too)."""
    missing = []
    for name in spec.tracepoints:
        category, _, event = name.partition(":")
        # A raw tracepoint has no category of its own: any tracefs event of that name will do.
        found = (any(TRACEFS_EVENTS.glob(f"*/{event}")) if category == "raw"
                 else (TRACEFS_EVENTS / category / event).is_dir())
        if not found:
            missing.append(name)
    return missing


def tracepoint_has_field(tracepoint: str, field: str) -> bool:
    """Whether ``category:name`` carries ``field`` on this kernel (from its tracefs format)."""
    category, _, event = tracepoint.partition(":")
    try:
        text = (TRACEFS_EVENTS / category / event / "format").read_text()
    except OSError:
        return False
    return any(line.strip().startswith("field:") and line.split(";")[0].split()[-1].split("[")[0] == field
               for line in text.splitlines())


def read_counter(bpf: Any, map_name: str, index: int) -> int:
    """One slot of a BPF array map, summed over CPUs for a per-CPU map; 0 when the map is absent."""
    try:
        table = bpf[map_name.encode()]
    except KeyError:
        return 0
    if hasattr(table, "getvalue"):  # per-CPU: one value per CPU
        return int(sum(table.getvalue(table.Key(index))))
    return int(table[table.Key(index)].value)


def load_observer(spec: ObserverSpec, ebpf_dir: Path | None, btf: Btf | None) -> tuple[Any, list[str]]:
    """Compile and attach one observer. Returns the bcc BPF object and the disabled features."""
    missing = missing_tracepoints(spec)
    if missing:
        raise ObserverLoadError(f"{spec.name}: tracepoint(s) missing on this kernel: {', '.join(missing)}")
    source = resolve_source(spec, ebpf_dir)
    if not source.is_file():
        raise ObserverLoadError(f"{spec.name}: BPF source {source} not found")
    flags, disabled = btf_cflags(spec, btf)
    tracepoint_flags, tracepoint_disabled = tracepoint_cflags(spec)
    flags += tracepoint_flags
    disabled += tracepoint_disabled
    includes = [f"-I{ebpf_dir}"] if ebpf_dir is not None else []
    includes.append(f"-I{shared_include_dir()}")
    from bcc import BPF

    try:
        # TRACEPOINT_PROBE / RAW_TRACEPOINT_PROBE programs attach as bcc loads them.
        bpf = BPF(text=program_text(source, ebpf_dir).encode(), cflags=includes + flags + list(spec.cflags))
    except Exception as exc:
        raise ObserverLoadError(f"{spec.name}: BPF compile/attach failed: {exc}") from None
    return bpf, disabled


def read_lost(bpf: Any, counter: str | None) -> int:
    """Records the BPF side could not put in the ring buffer (summed over CPUs)."""
    return 0 if counter is None else read_counter(bpf, counter, 0)
