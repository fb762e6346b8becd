"""An observer's BPF objects as the agent holds them: file descriptors, read and written through bpf(2).

bcc (and LLVM with it) lives only in the compile helper (:mod:`tapio_core.compile_helper`, started
by :func:`compile_in_helper`); the long-lived agent gets the helper's program, attachment and map
descriptors and uses the kernel's own libbpf for map access, a small C library already on every
machine that runs bcc.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs

from tapio_core.compile_helper import MAX_FDS, MESSAGE_LIMIT, compile_and_attach

#: The helper, run as a script so that it imports nothing of tapio_core.
HELPER = Path(__file__).with_name("compile_helper.py")
#: A compile takes seconds on a node and up to a minute under emulation; a helper silent for longer is stuck.
HELPER_TIMEOUT_S = 600.0

#: Map types whose lookup returns one value per possible CPU (uapi/linux/bpf.h).
PER_CPU_MAP_TYPES = frozenset({5, 6, 10})  # PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH

#: C type names as bcc's map key/value descriptions spell them.
C_SCALARS: dict[str, Any] = {
    "_Bool": ctypes.c_bool,
    "char": ctypes.c_char,
    "signed char": ctypes.c_byte,
    "unsigned char": ctypes.c_ubyte,
    "short": ctypes.c_short,
    "unsigned short": ctypes.c_ushort,
    "int": ctypes.c_int,
    "unsigned int": ctypes.c_uint,
    "long": ctypes.c_long,
    "unsigned long": ctypes.c_ulong,
    "long long": ctypes.c_longlong,
    "unsigned long long": ctypes.c_ulonglong,
    "__int128": ctypes.c_int64 * 2,
    "unsigned __int128": ctypes.c_uint64 * 2,
}


class BpfMapError(OSError):
    """A map operation the kernel refused (errno and strerror say why)."""


@functools.cache
def libbpf() -> ctypes.CDLL:
    lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
    for name, args in {
        "bpf_map_lookup_elem": (ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p),
        "bpf_map_update_elem": (ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint64),
        "bpf_map_delete_elem": (ctypes.c_int, ctypes.c_void_p),
        "bpf_map_get_next_key": (ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p),
    }.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = args, ctypes.c_int
    lib.libbpf_num_possible_cpus.argtypes, lib.libbpf_num_possible_cpus.restype = (), ctypes.c_int
    return lib


@functools.cache
def possible_cpus() -> int:
    count = libbpf().libbpf_num_possible_cpus()
    if count <= 0:
        raise OSError(-count, f"cannot count possible CPUs: {os.strerror(-count)}")
    return count


def ctype_from_description(description: Any) -> Any:
    """A ctypes type from bcc's JSON description of a map key or value: a C type name, or
    ``[name, [fields...], "struct" | "struct_packed" | "union"]`` where a field is ``[name, type]``,
    ``[name, type, [length]]`` (an array), ``[name, type, bits]`` or a nested description."""
    if isinstance(description, str):
        try:
            return C_SCALARS[description]
        except KeyError:
            raise ValueError(f"unknown C type {description!r} in a BPF map description") from None
    name, members, *kind = description
    kind = kind[0] if kind else "struct"
    fields, anonymous = [], []
    for member in members:
        member_name, member_type, *extra = member
        if member_type in ("struct", "struct_packed", "union") or (extra and extra[0] in ("struct", "struct_packed",
                                                                                          "union")):
            nested = ctype_from_description(member)
            if not member_name:
                member_name = f"__anon{len(anonymous)}"
                anonymous.append(member_name)
            fields.append((member_name, nested))
        elif extra and isinstance(extra[0], list):
            fields.append((member_name, ctype_from_description(member_type) * extra[0][0]))
        elif extra and isinstance(extra[0], int):
            fields.append((member_name, ctype_from_description(member_type), extra[0]))
        elif not extra:
            fields.append((member_name, ctype_from_description(member_type)))
        else:
            raise ValueError(f"cannot read the BPF map description member {member!r}")
    namespace: dict[str, Any] = {"_fields_": fields, "_anonymous_": anonymous}
    if kind == "struct_packed":
        namespace["_pack_"] = 1
    return type(str(name) or "anonymous", (ctypes.Union if kind == "union" else ctypes.Structure,), namespace)


class BpfMap:
    """One BPF map by file descriptor, with bcc's ``Key``/``Leaf`` types for its key and value."""

    def __init__(self, name: str, fd: int, map_type: int, max_entries: int, key_size: int, value_size: int,
                 key_type: Any = None, value_type: Any = None) -> None:
        self.name, self.fd, self.type, self.max_entries = name, fd, map_type, max_entries
        self.key_size, self.value_size = key_size, value_size
        self.Key = key_type or (ctypes.c_ubyte * key_size)
        self.Leaf = value_type or (ctypes.c_ubyte * value_size)

    @property
    def per_cpu(self) -> bool:
        return self.type in PER_CPU_MAP_TYPES

    def _key(self, key: Any) -> Any:
        return key if isinstance(key, self.Key) else self.Key(key)

    def _fail(self, operation: str, code: int) -> BpfMapError:
        return BpfMapError(-code, f"map {self.name}: {operation}: {os.strerror(-code)}")

    def get(self, key: Any, default: Any = None) -> Any:
        """The value at ``key`` (a ``Leaf``; for a per-CPU map, a list of one per possible CPU), or ``default``."""
        key = self._key(key)
        if self.per_cpu:
            stride = (ctypes.sizeof(self.Leaf) + 7) // 8 * 8
            buffer = ctypes.create_string_buffer(stride * possible_cpus())
        else:
            buffer = self.Leaf()
        code = libbpf().bpf_map_lookup_elem(self.fd, ctypes.byref(key), ctypes.byref(buffer))
        if code == -errno.ENOENT:
            return default
        if code < 0:
            raise self._fail("lookup", code)
        if self.per_cpu:
            return [self.Leaf.from_buffer_copy(buffer, cpu * stride) for cpu in range(possible_cpus())]
        return buffer

    def __getitem__(self, key: Any) -> Any:
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return value

    def __setitem__(self, key: Any, value: Any) -> None:
        if not isinstance(value, self.Leaf):
            value = self.Leaf(value)
        code = libbpf().bpf_map_update_elem(self.fd, ctypes.byref(self._key(key)), ctypes.byref(value), 0)
        if code < 0:
            raise self._fail("update", code)

    def __delitem__(self, key: Any) -> None:
        code = libbpf().bpf_map_delete_elem(self.fd, ctypes.byref(self._key(key)))
        if code < 0:
            raise KeyError(key) if code == -errno.ENOENT else self._fail("delete", code)

    def keys(self) -> Iterator[Any]:
        """Every key in the map (a snapshot walk: entries added meanwhile may or may not show)."""
        key, following = None, self.Key()
        while True:
            code = libbpf().bpf_map_get_next_key(self.fd, None if key is None else ctypes.byref(key),
                                                 ctypes.byref(following))
            if code == -errno.ENOENT:
                return
            if code < 0:
                raise self._fail("next key", code)
            key = self.Key.from_buffer_copy(following)
            yield key

    def __iter__(self) -> Iterator[Any]:
        return self.keys()

    def clear(self) -> None:
        for key in list(self.keys()):
            with contextlib.suppress(KeyError):
                del self[key]


@attrs.define(eq=False)
class LoadedProgram:
    """An observer's BPF as the compile helper loaded and attached it: maps and programs by name (the
    observer attaches its ``ObserverSpec.perf_event_programs`` itself), and the attachments (tracepoint
    perf events, raw tracepoint links) that keep the others running until :meth:`close`."""

    maps: dict[str, BpfMap]
    programs: dict[str, int]
    attachments: list[int]
    #: Descriptors the observer's own start-up opened (e.g. perf counters): closed with the rest.
    owned: list[int] = attrs.field(factory=list)

    def __getitem__(self, name: str) -> BpfMap:
        return self.maps[name]

    def __contains__(self, name: str) -> bool:
        return name in self.maps

    def detach(self) -> None:
        """Stop the programs running (attachments and perf events closed); the maps stay readable, so what
        the ring buffer holds can still be drained and the kernel's counts read."""
        fds, self.attachments, self.owned = [*self.attachments, *self.owned], [], []
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)

    def close(self) -> None:
        """Detach everything: attachments first, so no program runs on a map already closed."""
        self.detach()
        fds = [*self.programs.values(), *(m.fd for m in self.maps.values())]
        self.programs, self.maps = {}, {}
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


class CompileError(Exception):
    """The helper could not compile, load or attach the program (its message says why)."""


def compile_in_helper(text: str, cflags: list[str], perf_event_programs: tuple[str, ...] = ()) \
        -> tuple[LoadedProgram, int]:
    """Compile and attach in a helper process. Returns the loaded program and the helper's peak RSS in kB."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        # Its stdout goes to our stderr: the stdout sink's JSON must carry nothing else.
        helper = subprocess.Popen([sys.executable, "-P", str(HELPER), str(theirs.fileno())],
                                  pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=2)
        theirs.close()
        ours.settimeout(HELPER_TIMEOUT_S)
        try:
            ours.sendall(json.dumps({"text": text, "cflags": cflags,
                                     "perf_event_programs": list(perf_event_programs)}).encode())
            message, fds, _, _ = socket.recv_fds(ours, MESSAGE_LIMIT, MAX_FDS)
        except TimeoutError:
            helper.kill()
            helper.wait()
            raise CompileError(f"the compile helper gave no answer in {HELPER_TIMEOUT_S:.0f} s") from None
        except (ConnectionError, BrokenPipeError):  # it died before reading or answering
            message, fds = b"", []
        except OSError as exc:  # e.g. EMSGSIZE: a program text beyond the socket's buffer
            helper.kill()
            helper.wait()
            raise CompileError(f"cannot hand the program to the compile helper: {exc}") from None
        code = helper.wait()
    finally:
        ours.close()
    if not message:
        raise CompileError(f"the compile helper died ({describe_exit(code)}) before it answered")
    reply = json.loads(message)
    if "error" in reply:
        for fd in fds:
            os.close(fd)
        raise CompileError(reply["error"])
    return program_from_reply(reply, fds), int(reply["peak_rss_kb"])


def describe_exit(code: int) -> str:
    return f"killed by signal {-code}" if code < 0 else f"exit status {code}"


def program_from_reply(reply: dict[str, Any], fds: list[int]) -> LoadedProgram:
    maps = {}
    for entry in reply["maps"]:
        key_type = value_type = None
        try:
            key_type = ctype_from_description(entry["key"]) if entry["key"] else None
            value_type = ctype_from_description(entry["value"]) if entry["value"] else None
        except (ValueError, TypeError):
            pass  # raw bytes of the declared sizes serve (e.g. the ring buffer, read by mmap)
        maps[entry["name"]] = BpfMap(entry["name"], fds[entry["fd"]], entry["type"], entry["max_entries"],
                                     entry["key_size"], entry["value_size"], key_type, value_type)
    return LoadedProgram(maps=maps, programs={name: fds[index] for name, index in reply["programs"].items()},
                         attachments=[fds[index] for index in reply["attachments"]])


@attrs.define(eq=False)
class InProcessProgram(LoadedProgram):
    """A program compiled in this process, seen as the agent sees a helper's; ``bcc`` is bcc's own object,
    which owns the descriptors (``close()`` is its ``cleanup()``)."""

    bcc: Any = None

    def detach(self) -> None:
        pass  # bcc owns the attachments: they go with close()

    def close(self) -> None:
        if self.bcc is not None:
            self.bcc.cleanup()
            self.bcc = None


def compile_in_process(text: str, cflags: list[str], perf_event_programs: tuple[str, ...] = ()) -> InProcessProgram:
    """For benchmarks and tests that detach and re-attach programs through bcc; the agent never calls this."""
    bpf, reply, fds = compile_and_attach({"text": text, "cflags": cflags,
                                          "perf_event_programs": list(perf_event_programs)})
    program = program_from_reply(reply, fds)
    return InProcessProgram(maps=program.maps, programs=program.programs, attachments=program.attachments, bcc=bpf)
