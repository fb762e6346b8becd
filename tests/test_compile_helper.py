"""The compile helper hands a loaded, attached program to a process that never imports bcc."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kernel_helpers import scaled

from tapio_core.bpf_objects import CompileError, compile_in_helper, ctype_from_description, possible_cpus
from tapio_core.ringbuf import RingBufferReader

PROGRAM = r"""
struct pair { u32 number; char name[8]; };
BPF_HASH(calls, u32, u64, 16);
BPF_PERCPU_ARRAY(per_cpu, u64, 2);
BPF_ARRAY(pairs, struct pair, 4);
BPF_ARRAY(config, u32, 1);
BPF_RINGBUF_OUTPUT(events, 1);

TRACEPOINT_PROBE(syscalls, sys_enter_getppid) {
    u32 zero = 0, me = bpf_get_current_pid_tgid() >> 32;
    u32 *tgid = config.lookup(&zero);
    if (!tgid || *tgid != me)
        return 0;
    u64 first = 1, *count = calls.lookup(&me);
    if (count)
        __sync_fetch_and_add(count, 1);
    else
        calls.update(&me, &first);
    u64 *slot = per_cpu.lookup(&zero);
    if (slot)
        (*slot)++;
    return 0;
}
"""


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def map_id(fd: int) -> int:
    for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
        if line.startswith("map_id:"):
            return int(line.split()[1])
    raise AssertionError(f"fd {fd} is not a BPF map")


def map_exists(identifier: int) -> bool:
    return subprocess.run(["bpftool", "map", "show", "id", str(identifier)], capture_output=True).returncode == 0


@pytest.mark.kernel
def test_a_program_from_the_helper_runs_after_the_helper_exits_and_its_maps_work_by_descriptor():
    program, helper_peak_kb = compile_in_helper(PROGRAM, [])
    try:
        assert helper_peak_kb > 10_000  # bcc and LLVM were in the helper, not here
        assert set(program.maps) == {"calls", "per_cpu", "pairs", "config", "events"}
        assert "tracepoint__syscalls__sys_enter_getppid" in program.programs and len(program.attachments) == 1
        program["config"][0] = os.getpid()
        for _ in range(5):
            os.getppid()
        assert program["calls"][os.getpid()].value == 5
        assert [key.value for key in program["calls"]] == [os.getpid()]
        per_cpu = program["per_cpu"][0]
        assert len(per_cpu) == possible_cpus() and sum(leaf.value for leaf in per_cpu) == 5
        pair = program["pairs"].Leaf(number=7, name=b"tapio")
        program["pairs"][2] = pair
        assert (program["pairs"][2].number, program["pairs"][2].name) == (7, b"tapio")
        program["calls"].clear()
        assert program["calls"].get(os.getpid()) is None
        with pytest.raises(KeyError):
            del program["calls"][os.getpid()]
        with pytest.raises(OSError, match="map pairs: update"):
            program["pairs"][4] = pair  # beyond max_entries
        events = program["events"]
        with RingBufferReader(events.fd, events.max_entries, 8) as reader:
            assert reader.read_batch() == b""
    finally:
        ids = [map_id(table.fd) for table in program.maps.values()]
        program.close()
    # Closing the descriptors is the whole detach: the kernel frees the maps once no program holds them.
    deadline = time.monotonic() + scaled(5)
    while any(map_exists(i) for i in ids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map_exists(i) for i in ids)


@pytest.mark.kernel
def test_a_program_that_does_not_compile_is_one_error_naming_the_cause_and_leaves_no_descriptor():
    before = open_fds()
    with pytest.raises(CompileError, match="BPF compile/attach failed"):
        compile_in_helper("int broken(void) { return undeclared_name; }", [])
    assert open_fds() == before


def test_a_helper_that_dies_before_answering_is_an_error_not_a_hang(monkeypatch):
    monkeypatch.setattr(sys, "executable", "/bin/false")
    with pytest.raises(CompileError, match=r"died \(exit status 1\)"):
        compile_in_helper(PROGRAM, [])


def test_map_descriptions_become_the_ctypes_layout_bcc_gives():
    description = ["outer", [["id", "unsigned long long"], ["comm", "char", [16]], ["flags", "unsigned int", 3],
                             ["", [["a", "int"], ["b", "unsigned int"]], "union"]], "struct"]
    outer = ctype_from_description(description)
    assert ctypes.sizeof(outer) == 8 + 16 + 8
    value = outer(id=1, comm=b"tapio", flags=5, a=-1)
    assert (value.id, value.comm, value.flags, value.b) == (1, b"tapio", 5, 0xFFFFFFFF)
    packed = ctype_from_description(["p", [["x", "char"], ["y", "unsigned int"]], "struct_packed"])
    assert ctypes.sizeof(packed) == 5
    with pytest.raises(ValueError, match="unknown C type"):
        ctype_from_description("struct imaginary")


def test_a_program_too_large_to_hand_over_is_an_error_naming_why():
    before = open_fds()
    with pytest.raises(CompileError):
        compile_in_helper("/* " + "x" * (2 << 20) + " */\n" + PROGRAM, [])
    assert open_fds() == before
