"""Compile apart, run light: bcc compiles and attaches one observer's BPF program in a short-lived process.

Importing bcc maps LLVM (about 60 MB) and every compile leaves about 50 MB more that a process
keeps for life. So the agent never imports bcc: for each observer it starts this module as a
helper (``python -m tapio_core.compile_helper FD``) on one end of a Unix socket pair, sends the
program text and compiler flags, and receives the loaded objects' file descriptors (SCM_RIGHTS)
with a description of each map. The helper then exits with ``os._exit``: bcc's clean-up would
disable the tracepoint perf events the agent now shares. A helper that crashes (LLVM does, on
some inputs) fails that observer alone.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import socket
import subprocess
import sys
from typing import Any

import attrs

from tapio_core.bpf_objects import BpfMap, LoadedProgram, ctype_from_description

#: The largest message either side sends (program text one way, map descriptions the other).
MESSAGE_LIMIT = 1 << 20
#: SCM_MAX_FD: the most descriptors one message carries.
MAX_FDS = 253
#: A compile takes seconds on a node and up to a minute under emulation; a helper silent for longer is stuck.
HELPER_TIMEOUT_S = 600.0


class CompileError(Exception):
    """The helper could not compile, load or attach the program (its message says why)."""


def compile_in_helper(text: str, cflags: list[str], perf_event_programs: tuple[str, ...] = ()) \
        -> tuple[LoadedProgram, int]:
    """Compile and attach in a helper process. Returns the loaded program and the helper's peak RSS in kB."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        helper = subprocess.Popen([sys.executable, "-m", "tapio_core.compile_helper", str(theirs.fileno())],
                                  pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
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


# --- the helper's side ---------------------------------------------------------


def _libbcc_tables(lib: Any) -> None:
    """Declare the libbcc calls that list a module's maps (bcc's Python module does not)."""
    for name, restype in {"bpf_table_name": ctypes.c_char_p, "bpf_table_key_desc_id": ctypes.c_char_p,
                          "bpf_table_leaf_desc_id": ctypes.c_char_p, "bpf_table_fd_id": ctypes.c_int,
                          "bpf_table_type_id": ctypes.c_int, "bpf_table_max_entries_id": ctypes.c_ulonglong,
                          "bpf_table_key_size_id": ctypes.c_size_t, "bpf_table_leaf_size_id": ctypes.c_size_t}.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = [ctypes.c_void_p, ctypes.c_ulonglong], restype
    lib.bpf_num_tables.argtypes, lib.bpf_num_tables.restype = [ctypes.c_void_p], ctypes.c_size_t


@attrs.define(eq=False)
class InProcessProgram(LoadedProgram):
    """A program compiled in this process, seen as the agent sees a helper's; ``bcc`` is bcc's own object,
    which owns the descriptors (``close()`` is its ``cleanup()``)."""

    bcc: Any = None

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


def compile_and_attach(request: dict[str, Any]) -> tuple[Any, dict[str, Any], list[int]]:
    """bcc compiles the program; its TRACEPOINT_PROBE and RAW_TRACEPOINT_PROBE functions attach as it loads.
    Returns bcc's object, the reply describing it, and the descriptors the reply's indexes name."""
    from bcc import BPF
    from bcc.libbcc import lib

    _libbcc_tables(lib)
    bpf = BPF(text=request["text"].encode(), cflags=request["cflags"])
    for name in request["perf_event_programs"]:
        bpf.load_func(name.encode(), BPF.PERF_EVENT)
    fds: list[int] = []
    programs = {}
    for name, function in bpf.funcs.items():  # the attached ones too: they show as the agent's in /proc/PID/fdinfo
        programs[name.decode()] = len(fds)
        fds.append(function.fd)
    attachments = []
    for fd in [*bpf.tracepoint_fds.values(), *bpf.raw_tracepoint_fds.values()]:
        attachments.append(len(fds))
        fds.append(fd)
    maps = []
    for index in range(lib.bpf_num_tables(bpf.module)):
        maps.append({
            "name": lib.bpf_table_name(bpf.module, index).decode(),
            "fd": len(fds),
            "type": lib.bpf_table_type_id(bpf.module, index),
            "max_entries": lib.bpf_table_max_entries_id(bpf.module, index),
            "key_size": lib.bpf_table_key_size_id(bpf.module, index),
            "value_size": lib.bpf_table_leaf_size_id(bpf.module, index),
            "key": json.loads(lib.bpf_table_key_desc_id(bpf.module, index) or b"null"),
            "value": json.loads(lib.bpf_table_leaf_desc_id(bpf.module, index) or b"null"),
        })
        fds.append(lib.bpf_table_fd_id(bpf.module, index))
    if len(fds) > MAX_FDS:
        raise CompileError(f"{len(fds)} BPF objects are more than one message carries ({MAX_FDS})")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return bpf, {"maps": maps, "programs": programs, "attachments": attachments, "peak_rss_kb": peak}, fds


def main(argv: list[str]) -> None:
    channel = socket.socket(fileno=int(argv[1]))
    request = json.loads(channel.recv(MESSAGE_LIMIT))
    try:
        _, reply, fds = compile_and_attach(request)
    except Exception as exc:  # bcc raises bare Exception; the agent turns this into the observer's error
        channel.sendall(json.dumps({"error": f"BPF compile/attach failed: {exc}"}).encode())
        os._exit(1)
    socket.send_fds(channel, [json.dumps(reply).encode()], fds)
    # Not sys.exit: bcc's atexit clean-up would detach what the agent now holds.
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv)
