"""Tests for tapio_core.btf: a synthetic BTF blob, and the running kernel's BTF against bpftool.

The offsets the agent hands to BPF programs come from this reader, so a wrong offset is a
silently wrong observation: the real-kernel tests cross-check it against bpftool's own dump.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess

import pytest

from tapio_core.btf import Btf, BtfError

VMLINUX = "/sys/kernel/btf/vmlinux"

# -- a synthetic blob ------------------------------------------------------------------------

INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST = 1, 2, 3, 4, 5, 6, 7, 8, 9, 10
FUNC, FUNC_PROTO, VAR, DATASEC, FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = 12, 13, 14, 15, 16, 17, 18, 19


class BlobBuilder:
    """Builds a little-endian BTF blob by hand, so the reader is tested against the format itself."""

    def __init__(self) -> None:
        self.strs = bytearray(b"\0")
        self.types = bytearray()
        self.next_id = 1

    def s(self, name: str) -> int:
        if not name:
            return 0
        off = len(self.strs)
        self.strs += name.encode() + b"\0"
        return off

    def add(
        self, kind: int, name: str, size_or_type: int, vlen: int = 0, kflag: int = 0, extra: bytes = b""
    ) -> int:
        info = (kflag << 31) | (kind << 24) | vlen
        self.types += struct.pack("<III", self.s(name), info, size_or_type) + extra
        self.next_id += 1
        return self.next_id - 1

    def int_(
        self, name: str, size: int, bits: int | None = None, bit_off: int = 0, signed: bool = True
    ) -> int:
        enc = (1 if signed else 0) << 24 | bit_off << 16 | (size * 8 if bits is None else bits)
        return self.add(INT, name, size, extra=struct.pack("<I", enc))

    def composite(self, kind: int, name: str, size: int, members: list[tuple], kflag: int = 0) -> int:
        extra = b"".join(
            struct.pack("<III", self.s(m[0]), m[1], (m[3] << 24 | m[2]) if kflag else m[2]) for m in members
        )
        return self.add(kind, name, size, vlen=len(members), kflag=kflag, extra=extra)

    def blob(self) -> bytes:
        hdr = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(self.types), len(self.types), len(self.strs))
        return hdr + bytes(self.types) + bytes(self.strs)


@pytest.fixture(scope="module")
def synth() -> Btf:
    b = BlobBuilder()
    i32 = b.int_("int", 4)
    u32 = b.int_("unsigned int", 4, signed=False)
    u64 = b.int_("long long unsigned int", 8, signed=False)
    u3 = b.int_("u3", 4, bits=3)  # old-style bitfield: the width lives in the int type
    ptr = b.add(PTR, "", i32)
    arr = b.add(ARRAY, "", 0, extra=struct.pack("<III", i32, u32, 3))
    b.add(FLOAT, "double", 8)
    # kinds the reader only has to step over correctly
    proto = b.add(FUNC_PROTO, "", i32, vlen=2, extra=struct.pack("<IIII", b.s("a"), i32, b.s("b"), u64))
    fn = b.add(FUNC, "do_thing", proto, vlen=1)
    b.add(DECL_TAG, "tag", fn, extra=struct.pack("<i", -1))
    b.add(TYPE_TAG, "user", ptr)
    var = b.add(VAR, "a_var", i32, extra=struct.pack("<I", 1))
    b.add(DATASEC, ".data", 4, vlen=1, extra=struct.pack("<III", var, 0, 4))
    b.add(FWD, "later", 0)
    b.add(STRUCT, "outer", 0)  # an empty duplicate first: the reader must prefer the one with members
    anon = b.composite(UNION, "", 4, [("named", i32, 0), ("alt", u32, 0)])
    anon_s = b.composite(STRUCT, "", 8, [("deep", u64, 0)])
    outer = b.composite(
        STRUCT,
        "outer",
        40,
        [
            ("first", i32, 0, 0),
            ("", anon, 32, 0),
            ("flags", u32, 64, 3),
            ("tail", u32, 72, 0),
            ("arr", arr, 96, 0),
            ("p", ptr, 192, 0),
            ("", anon_s, 256, 0),
        ],
        kflag=1,
    )
    td = b.add(TYPEDEF, "outer_t", outer)
    cst = b.add(CONST, "", td)
    vol = b.add(VOLATILE, "", cst)
    b.composite(STRUCT, "wrapper", 48, [("pad", u64, 0), ("o", vol, 64)])
    b.composite(STRUCT, "oldbits", 4, [("f", u3, 5), ("g", u3, 8)])
    enum_vals = struct.pack("<Ii", b.s("RED"), 0) + struct.pack("<Ii", b.s("MINUS"), -2)
    b.add(ENUM, "color", 4, vlen=2, kflag=1, extra=enum_vals)
    b.add(ENUM, "", 4, vlen=1, extra=struct.pack("<II", b.s("ANON_ONE"), 7))
    big = (1 << 40) + 5
    neg = (-3) & ((1 << 64) - 1)
    e64 = struct.pack("<III", b.s("BIG"), big & 0xFFFFFFFF, big >> 32)
    e64 += struct.pack("<III", b.s("NEG"), neg & 0xFFFFFFFF, neg >> 32)
    b.add(ENUM64, "wide", 8, vlen=2, kflag=1, extra=e64)
    return Btf(b.blob())


def test_synthetic_offsets_through_anonymous_members(synth: Btf) -> None:
    assert synth.field_offset("outer", "first") == 0
    assert synth.field_offset("outer", "named") == 4  # inside the anonymous union
    assert synth.field_offset("outer", "alt") == 4
    assert synth.field_offset("outer", "deep") == 32  # inside the anonymous struct
    assert synth.field_offset("outer", "tail") == 9
    assert synth.field_offset("outer_t", "named") == 4  # named through its typedef
    assert synth.field_offset("wrapper", "o.named") == 12  # volatile const typedef'd struct
    assert synth.field_offset("wrapper", "o.deep") == 40


def test_synthetic_sizes(synth: Btf) -> None:
    assert synth.field_size("outer", "first") == 4
    assert synth.field_size("outer", "arr") == 12
    assert synth.field_size("outer", "p") == 8
    assert synth.field_size("outer", "deep") == 8
    assert synth.field_size("wrapper", "o") == 40
    assert synth.field_size("wrapper", "o.named") == 4


def test_synthetic_missing_is_none(synth: Btf) -> None:
    assert synth.field_offset("nosuch", "first") is None
    assert synth.field_offset("outer", "nosuch") is None
    assert synth.field_offset("wrapper", "o.nosuch") is None
    assert synth.field_offset("outer", "first.x") is None  # an int has no members
    assert synth.field_size("outer", "nosuch") is None


def test_synthetic_bitfields_raise(synth: Btf) -> None:
    with pytest.raises(BtfError):
        synth.field_offset("outer", "flags")  # kind_flag encoding
    with pytest.raises(BtfError):
        synth.field_offset("oldbits", "f")  # old encoding, unaligned
    with pytest.raises(BtfError):
        synth.field_offset("oldbits", "g")  # old encoding, byte aligned but still a bitfield


def test_synthetic_has_type_and_enums(synth: Btf) -> None:
    assert synth.has_type("outer", "struct") and synth.has_type("outer_t", "typedef")
    assert synth.has_type("do_thing", "func") and synth.has_type("int")
    assert synth.has_type("wide", "enum") and synth.has_type("wide", "enum64")
    assert not synth.has_type("outer", "union") and not synth.has_type("nosuch")
    assert synth.enum_value("color", "RED") == 0
    assert synth.enum_value("color", "MINUS") == -2
    assert synth.enum_value("color", "NOPE") is None
    assert synth.enum_value("", "ANON_ONE") == 7
    assert synth.enum_value("", "RED") is None  # "" searches anonymous enums only
    assert synth.enum_value("wide", "BIG") == (1 << 40) + 5
    assert synth.enum_value("wide", "NEG") == -3
    assert synth.enum_value("nosuch", "RED") is None


def test_malformed_blobs_raise() -> None:
    with pytest.raises(BtfError):
        Btf(b"\0" * 24)
    good = BlobBuilder()
    good.int_("int", 4)
    blob = bytearray(good.blob())
    struct.pack_into("<I", blob, 12, 100)  # type_len past the end
    with pytest.raises(BtfError):
        Btf(bytes(blob))
    with pytest.raises(BtfError):
        Btf.load("/nonexistent/btf")


# -- the running kernel, cross-checked against bpftool -----------------------------------------

_HEAD = re.compile(r"^\[(\d+)\] (\S+) '([^']*)'(.*)$")
_MEMBER = re.compile(r"^\s+'([^']*)'(.*)$")
_MODS = {"TYPEDEF", "CONST", "VOLATILE", "RESTRICT", "TYPE_TAG"}


@pytest.fixture(scope="module")
def bpftool_types() -> dict[int, tuple[str, str, dict, list]]:
    """id -> (kind, name, attrs, members) from ``bpftool btf dump ... format raw``."""
    if shutil.which("bpftool") is None:
        if os.environ.get("TAPIO_REQUIRE_KERNEL_TESTS") == "1":
            pytest.fail("bpftool is missing (apt-get install -y bpftool)")
        pytest.skip("bpftool is missing (apt-get install -y bpftool)")
    out = subprocess.run(
        ["bpftool", "btf", "dump", "file", VMLINUX, "format", "raw"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    types: dict[int, tuple[str, str, dict, list]] = {}
    cur: list | None = None
    for line in out.splitlines():
        if m := _HEAD.match(line):
            attrs = dict(kv.split("=", 1) for kv in m[4].split() if "=" in kv)
            cur = []
            types[int(m[1])] = (m[2], m[3], attrs, cur)
        elif (m := _MEMBER.match(line)) and cur is not None:
            cur.append((m[1], dict(kv.split("=", 1) for kv in m[2].split())))
    return types


def _bpftool_offset(types: dict, struct_name: str, path: str) -> int | None:
    """An independent walk of bpftool's dump: the first non-empty struct/union of that name."""
    tid = next(
        (i for i, t in types.items() if t[0] in ("STRUCT", "UNION") and t[1] == struct_name and t[3]),
        None,
    )
    if tid is None:
        return None

    def strip(t: int) -> int:
        while types[t][0] in _MODS:
            t = int(types[t][2]["type_id"])
        return t

    def find(t: int, name: str) -> int | None:
        for mname, attrs in types[t][3]:
            bits = int(attrs["bits_offset"])
            if mname == name:
                return bits
            inner = strip(int(attrs["type_id"]))
            if mname == "(anon)" and types[inner][0] in ("STRUCT", "UNION"):
                sub = find(inner, name)
                if sub is not None:
                    return bits + sub
        return None

    def member_type(t: int, name: str) -> int:
        for mname, attrs in types[t][3]:
            if mname == name:
                return int(attrs["type_id"])
            inner = strip(int(attrs["type_id"]))
            if mname == "(anon)" and types[inner][0] in ("STRUCT", "UNION") and find(inner, name) is not None:
                return member_type(inner, name)
        raise KeyError(name)

    total = 0
    for part in path.split("."):
        tid = strip(tid)
        bits = find(tid, part)
        if bits is None:
            return None
        total += bits
        tid = member_type(tid, part)
    assert total % 8 == 0
    return total // 8


@pytest.fixture(scope="module")
def kernel_btf() -> Btf:
    return Btf.load(VMLINUX)


REAL_FIELDS = [
    ("task_struct", "exit_code"),
    ("task_struct", "tgid"),
    ("task_struct", "pid"),
    ("task_struct", "comm"),
    ("sock", "__sk_common.skc_cookie"),
    ("sock", "__sk_common.skc_family"),
    ("tcp_sock", "srtt_us"),
    ("request", "q"),
    ("mem_cgroup", "memory"),
    ("mem_cgroup", "memory.max"),
]


@pytest.mark.kernel
@pytest.mark.parametrize(("struct_name", "path"), REAL_FIELDS)
def test_kernel_offsets_match_bpftool(
    kernel_btf: Btf, bpftool_types: dict, struct_name: str, path: str
) -> None:
    expected = _bpftool_offset(bpftool_types, struct_name, path)
    assert expected is not None, f"{struct_name}.{path} missing from this kernel's BTF"
    assert kernel_btf.field_offset(struct_name, path) == expected


@pytest.mark.kernel
def test_kernel_sizes_and_missing(kernel_btf: Btf) -> None:
    assert kernel_btf.field_size("task_struct", "exit_code") == 4
    assert kernel_btf.field_size("sock", "__sk_common.skc_cookie") == 8
    assert kernel_btf.field_size("task_struct", "comm") == 16
    assert kernel_btf.field_offset("task_struct", "no_such_field") is None
    assert kernel_btf.field_offset("no_such_struct_xyz", "pid") is None
    assert kernel_btf.field_size("no_such_struct_xyz", "pid") is None
    assert kernel_btf.has_type("task_struct", "struct") and not kernel_btf.has_type("task_struct", "enum")


@pytest.mark.kernel
def test_kernel_enum_matches_bpftool(kernel_btf: Btf, bpftool_types: dict) -> None:
    vals = [
        int(attrs["val"])
        for kind, name, _a, members in bpftool_types.values()
        if kind == "ENUM" and name == "cgroup_subsys_id"
        for mname, attrs in members
        if mname == "memory_cgrp_id"
    ]
    assert vals, "memory_cgrp_id missing from bpftool's dump"
    assert kernel_btf.enum_value("cgroup_subsys_id", "memory_cgrp_id") == vals[0]
    assert kernel_btf.enum_value("cgroup_subsys_id", "no_such_id") is None


@pytest.mark.kernel
def test_kernel_bitfield_raises(kernel_btf: Btf, bpftool_types: dict) -> None:
    task = next(t for t in bpftool_types.values() if t[0] == "STRUCT" and t[1] == "task_struct" and t[3])
    bitfield = next(name for name, attrs in task[3] if int(attrs.get("bitfield_size", 0)))
    with pytest.raises(BtfError):
        kernel_btf.field_offset("task_struct", bitfield)


@pytest.mark.kernel
def _bpftool_type_name(types: dict, tid: int) -> str:
    """The C spelling of a type by bpftool's dump: qualifiers and typedefs seen through, as btf.py does."""
    while tid:
        kind, name, attrs, _members = types[tid]
        if kind in ("TYPEDEF", "CONST", "VOLATILE", "RESTRICT", "TYPE_TAG"):
            tid = int(attrs["type_id"])
        elif kind == "PTR":
            return _bpftool_type_name(types, int(attrs["type_id"])) + " *"
        elif kind in ("STRUCT", "UNION", "ENUM", "ENUM64"):
            return f"{kind.lower()} {name}"
        else:
            return name
    return "void"


def test_raw_tracepoint_argument_types_match_bpftool(kernel_btf: Btf, bpftool_types: dict) -> None:
    """ctx->args[i] of a raw tracepoint is parameter i + 1 of its btf_trace_ prototype (after __data), on
    whatever this kernel made them (mark_victim's first is a pid before ~6.8, block_rq_issue's a queue
    before 5.11)."""
    for tracepoint in ("mark_victim", "block_rq_issue", "sched_process_exit", "tcp_probe"):
        [typedef] = [tid for tid, (kind, name, _a, _m) in bpftool_types.items()
                     if kind == "TYPEDEF" and name == f"btf_trace_{tracepoint}"]
        proto = int(bpftool_types[int(bpftool_types[typedef][2]["type_id"])][2]["type_id"])
        assert bpftool_types[proto][0] == "FUNC_PROTO"
        params = bpftool_types[proto][3][1:]  # after void *__data
        assert params, tracepoint
        for index, (_name, param) in enumerate(params):
            expected = _bpftool_type_name(bpftool_types, int(param["type_id"]))
            assert kernel_btf.raw_tracepoint_arg(tracepoint, index) == expected, (tracepoint, index)
        assert kernel_btf.raw_tracepoint_arg(tracepoint, len(params)) is None
    # Every kernel of the matrix hands sched_process_exit the exiting task.
    assert kernel_btf.raw_tracepoint_arg("sched_process_exit", 0) == "struct task_struct *"
    assert kernel_btf.raw_tracepoint_arg("mark_victim", 0) in ("struct task_struct *", "int")
    assert kernel_btf.raw_tracepoint_arg("no_such_tracepoint", 0) is None
