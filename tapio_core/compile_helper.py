"""The compile helper: bcc compiles and attaches one observer's BPF program in a short-lived process.

Importing bcc maps LLVM (about 60 MB) and every compile leaves about 50 MB more that a process
keeps for life. So the agent never imports bcc: for each observer it runs this file as a script
(``python -P .../compile_helper.py FD``: nothing of tapio_core is imported, which keeps the
helper quick to start) on one end of a Unix socket pair, sends the program text and compiler
flags, and receives the loaded objects' file descriptors (SCM_RIGHTS) with a description of each
map (:func:`tapio_core.bpf_objects.compile_in_helper` is the agent's side). The helper then exits
with ``os._exit``: bcc's clean-up would disable the tracepoint perf events the agent now shares.
A helper that crashes (LLVM does, on some inputs) fails that observer alone.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import socket
import sys
from typing import Any

#: The largest message either side sends (program text one way, map descriptions the other).
MESSAGE_LIMIT = 1 << 20
#: SCM_MAX_FD: the most descriptors one message carries.
MAX_FDS = 253


def _libbcc_tables(lib: Any) -> None:
    """Declare the libbcc calls that list a module's maps (bcc's Python module does not)."""
    for name, restype in {"bpf_table_name": ctypes.c_char_p, "bpf_table_key_desc_id": ctypes.c_char_p,
                          "bpf_table_leaf_desc_id": ctypes.c_char_p, "bpf_table_fd_id": ctypes.c_int,
                          "bpf_table_type_id": ctypes.c_int, "bpf_table_max_entries_id": ctypes.c_ulonglong,
                          "bpf_table_key_size_id": ctypes.c_size_t, "bpf_table_leaf_size_id": ctypes.c_size_t}.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = [ctypes.c_void_p, ctypes.c_ulonglong], restype
    lib.bpf_num_tables.argtypes, lib.bpf_num_tables.restype = [ctypes.c_void_p], ctypes.c_size_t


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
        raise ValueError(f"{len(fds)} BPF objects are more than one message carries ({MAX_FDS})")
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
