"""A small Python reader of kernel BTF (no C library), for struct offsets and enum values.

Tapio's BPF programs must read kernel struct fields at the offsets of the *running*
kernel: the installed headers may be older than it. The agent asks this module for
offsets at load time and passes them to the BPF compile as ``-D`` macros.
Only what that needs is decoded: type records are indexed in one pass, and member
lists are read on demand.
"""

from __future__ import annotations

import os
from array import array
from functools import lru_cache
from struct import Struct, iter_unpack, unpack_from
from struct import error as StructError

__all__ = ["Btf", "BtfError"]

_MAGIC = 0xEB9F
# Kind numbers of the BTF format (include/uapi/linux/btf.h), indexed by kind.
_KINDS = ("unkn", "int", "ptr", "array", "struct", "union", "enum", "fwd", "typedef", "volatile", "const")
_KINDS += ("restrict", "func", "func_proto", "var", "datasec", "float", "decl_tag", "type_tag", "enum64")
_INT, _PTR, _ARRAY, _STRUCT, _UNION, _ENUM, _TYPEDEF, _VOLATILE, _CONST = 1, 2, 3, 4, 5, 6, 8, 9, 10
_RESTRICT, _FLOAT, _TYPE_TAG, _ENUM64 = 11, 16, 18, 19
# Bytes after the 12-byte common record: a fixed part plus a part per vlen entry.
_FIXED = (0, 4, 0, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 4, 0, 0)
_PER_VLEN = (0, 0, 0, 0, 12, 12, 8, 0, 0, 0, 0, 0, 0, 8, 0, 12, 0, 0, 0, 12)
_MODIFIERS = frozenset((_TYPEDEF, _VOLATILE, _CONST, _RESTRICT, _TYPE_TAG))
_POINTER_SIZE = 8  # BTF does not record it; Tapio only targets 64-bit kernels.


class BtfError(Exception):
    """The BTF blob is malformed, or a request cannot be answered with a byte offset."""


class Btf:
    """An index over one BTF blob; type ids start at 1 (0 is ``void``)."""

    def __init__(self, data: bytes) -> None:
        """Parse the header and index every type record (kind, name, where its data starts)."""
        if len(data) < 24:
            raise BtfError("BTF blob too short for a header")
        for end in "<>":
            if unpack_from(end + "H", data, 0)[0] == _MAGIC:
                break
        else:
            raise BtfError("bad BTF magic")
        self._end = end
        hdr_len, type_off, type_len, str_off, str_len = unpack_from(end + "4xIIIII", data, 0)
        t0, s0 = hdr_len + type_off, hdr_len + str_off
        if hdr_len < 24 or t0 + type_len > len(data) or s0 + str_len > len(data):
            raise BtfError("BTF sections run past the end of the blob")
        self._data = memoryview(data)
        self._strs = bytes(data[s0 : s0 + str_len])
        # Per type id (0 is void): where its record starts and its name's string offset. Flat arrays, not
        # Python objects per type: the agent parses vmlinux's 100k+ types and keeps its memory small.
        self._offs = array("I", [0])
        self._name_offs = array("I", [0])
        hdr = Struct(end + "III").unpack_from
        offs, name_offs, fixed, per = self._offs, self._name_offs, _FIXED, _PER_VLEN
        off, stop = t0, t0 + type_len
        try:
            while off < stop:
                name_off, info, _ = hdr(data, off)
                kind = (info >> 24) & 0x1F
                offs.append(off)
                name_offs.append(name_off)
                off += 12 + fixed[kind] + per[kind] * (info & 0xFFFF)
        except (IndexError, ValueError, StructError, OverflowError) as exc:
            raise BtfError(f"malformed BTF type section at byte {off}: {exc}") from exc
        if off != stop:
            raise BtfError("BTF type section does not end on a record boundary")
        self._members = lru_cache(maxsize=4096)(self._read_members)

    def _ids_named(self, name: str) -> list[int]:
        """Type ids named ``name``, in id order: the name's offsets in the string section, then the types
        whose name is at one of them."""
        needle = b"\0" + name.encode() + b"\0"
        offsets = []
        at = self._strs.find(needle)
        while at != -1:
            offsets.append(at + 1)
            at = self._strs.find(needle, at + 1)
        if not offsets:
            return []
        import numpy as np

        return np.flatnonzero(np.isin(np.frombuffer(self._name_offs, dtype=np.uint32), offsets)).tolist()

    @classmethod
    def load(cls, path: str | os.PathLike = "/sys/kernel/btf/vmlinux") -> Btf:
        """Read and index a BTF file, by default the running kernel's."""
        try:
            with open(path, "rb") as f:
                return cls(f.read())
        except OSError as exc:
            raise BtfError(f"cannot read BTF from {path}: {exc}") from exc

    def _rec(self, tid: int) -> tuple[int, int, int, int, int]:
        """(kind, kind_flag, vlen, size_or_type, offset of trailing data) of a type id."""
        if not 0 < tid < len(self._offs):
            raise BtfError(f"type id {tid} out of range")
        off = self._offs[tid]
        _, info, st = unpack_from(self._end + "III", self._data, off)
        return (info >> 24) & 0x1F, info >> 31, info & 0xFFFF, st, off + 12

    def _str(self, off: int) -> str:
        return self._strs[off : self._strs.index(b"\0", off)].decode()

    def _resolve(self, tid: int) -> int:
        """Follow typedef/const/volatile/restrict/type_tag to the underlying type id."""
        for _ in range(64):
            if tid == 0:
                return 0
            kind, _kf, _vl, st, _o = self._rec(tid)
            if kind not in _MODIFIERS:
                return tid
            tid = st
        raise BtfError("modifier chain too long (loop?)")

    def _read_members(self, tid: int) -> tuple[tuple[str, int, int, int], ...]:
        """(name, type id, bit offset, bitfield size) of each member of a struct/union."""
        _kind, kflag, vlen, _size, off = self._rec(tid)
        out = []
        for name_off, mtype, moff in iter_unpack(self._end + "III", self._data[off : off + 12 * vlen]):
            bits, bitsize = (moff & 0xFFFFFF, moff >> 24) if kflag else (moff, 0)
            out.append((self._str(name_off) if name_off else "", mtype, bits, bitsize))
        return tuple(out)

    def _find_struct(self, name: str) -> int | None:
        """The first struct/union named ``name`` with members (or through a typedef)."""
        first = None
        for tid in self._ids_named(name):
            rid = self._resolve(tid)
            kind, _kf, vlen, _st, _o = self._rec(rid) if rid else (0, 0, 0, 0, 0)
            if kind in (_STRUCT, _UNION):
                if vlen:
                    return rid
                first = first or rid
        return first

    def _find_member(self, tid: int, name: str) -> tuple[int, int, int] | None:
        """(type id, bit offset, bitfield size) of ``name``, looking into anonymous members."""
        for mname, mtype, bits, bitsize in self._members(tid):
            if mname == name:
                return mtype, bits, bitsize
            if not mname:
                inner = self._resolve(mtype)
                if inner and self._rec(inner)[0] in (_STRUCT, _UNION):
                    hit = self._find_member(inner, name)
                    if hit is not None:
                        return hit[0], bits + hit[1], hit[2]
        return None

    def _locate(self, struct_name: str, path: str) -> tuple[int, int] | None:
        """(member type id, byte offset) of a dotted member path, or None if it is absent."""
        tid = self._find_struct(struct_name)
        if tid is None:
            return None
        total, mtype = 0, tid
        for part in path.split("."):
            cur = self._resolve(mtype)
            if not cur or self._rec(cur)[0] not in (_STRUCT, _UNION):
                return None
            hit = self._find_member(cur, part)
            if hit is None:
                return None
            mtype, bits, bitsize = hit
            total += bits
        inner = self._resolve(mtype)
        if inner:
            kind, _kf, _vl, size, doff = self._rec(inner)
            if kind == _INT:
                enc = unpack_from(self._end + "I", self._data, doff)[0]
                if (enc >> 16) & 0xFF or (enc & 0xFF) != 8 * size:
                    bitsize = bitsize or enc & 0xFF  # old-style bitfield, encoded in the int type
        if bitsize or total % 8:
            raise BtfError(f"{struct_name}.{path} is a bitfield; it has no byte offset")
        return mtype, total // 8

    def has_type(self, name: str, kind: str | None = None) -> bool:
        """Whether a type of that name (and kind: "struct", "enum", ... ) exists."""
        for tid in self._ids_named(name):
            k = _KINDS[self._rec(tid)[0]]
            if kind is None or k == kind or (kind == "enum" and k == "enum64"):
                return True
        return False

    def field_offset(self, struct: str, path: str) -> int | None:
        """Byte offset of ``path`` (e.g. "__sk_common.skc_cookie") in ``struct``, or None."""
        hit = self._locate(struct, path)
        return None if hit is None else hit[1]

    def field_size(self, struct: str, path: str) -> int | None:
        """Byte size of the member's type (arrays: whole array; pointers: 8), or None."""
        hit = self._locate(struct, path)
        return None if hit is None else self._sizeof(hit[0])

    def _sizeof(self, tid: int) -> int | None:
        tid = self._resolve(tid)
        if not tid:
            return None
        kind, _kf, _vl, st, doff = self._rec(tid)
        if kind == _PTR:
            return _POINTER_SIZE
        if kind == _ARRAY:
            elem, _index, n = unpack_from(self._end + "III", self._data, doff)
            es = self._sizeof(elem)
            return None if es is None else es * n
        if kind in (_INT, _STRUCT, _UNION, _ENUM, _ENUM64, _FLOAT):
            return st
        return None

    def raw_tracepoint_arg(self, tracepoint: str, index: int) -> str | None:
        """The C type of a raw tracepoint's argument ``index`` (``ctx->args[index]``), e.g.
        ``"struct task_struct *"`` or ``"int"``, from the kernel's ``btf_trace_<tracepoint>``
        prototype; None when BTF does not have it."""
        for tid in self._ids_named(f"btf_trace_{tracepoint}"):
            proto = self._resolve(tid)
            kind, _kf, _vl, target, _o = self._rec(proto) if proto else (0, 0, 0, 0, 0)
            if kind == _PTR:
                proto = self._resolve(target)
            kind, _kf, vlen, _st, off = self._rec(proto) if proto else (0, 0, 0, 0, 0)
            if kind != _KINDS.index("func_proto") or index + 1 >= vlen:
                continue
            # The first parameter is the tracepoint's own ``void *__data``; ctx->args[] are the rest.
            _name_off, ptype = unpack_from(self._end + "II", self._data, off + 8 * (index + 1))
            return self._type_name(ptype)
        return None

    def _type_name(self, tid: int) -> str:
        """A C spelling of a type that is enough to tell one argument type from another."""
        tid = self._resolve(tid)
        if not tid:
            return "void"
        kind, _kf, _vl, st, _o = self._rec(tid)
        if kind == _PTR:
            return self._type_name(st) + " *"
        name_off = unpack_from(self._end + "I", self._data, self._offs[tid])[0]
        name = self._str(name_off) if name_off else ""
        return f"{_KINDS[kind]} {name}" if kind in (_STRUCT, _UNION, _ENUM, _ENUM64) else name or _KINDS[kind]

    def enum_value(self, enum: str, name: str) -> int | None:
        """Value of enumerator ``name`` in ``enum``; enum "" searches anonymous enums."""
        ids = self._ids_named(enum) if enum else range(1, len(self._offs))
        for tid in ids:
            if not enum and unpack_from(self._end + "I", self._data, self._offs[tid])[0]:
                continue  # named; only anonymous enums are searched for enum ""
            kind, kflag, vlen, _st, off = self._rec(tid)
            if kind not in (_ENUM, _ENUM64):
                continue
            fmt = self._end + ("III" if kind == _ENUM64 else "Ii" if kflag else "II")
            for vals in iter_unpack(fmt, self._data[off : off + (12 if kind == _ENUM64 else 8) * vlen]):
                if self._str(vals[0]) == name:
                    if kind == _ENUM:
                        return vals[1]
                    v = vals[1] | vals[2] << 32
                    return v - (1 << 64) if kflag and v >> 63 else v
        return None
