"""The storage observer's record layout, settings and classification, from records packed as the kernel packs them."""

from __future__ import annotations

import errno
import re
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from storage_records import FLUSH, REQ_SYNC, STORAGE_RECORD_C, WRITE, pack_storage_record

import tapio_observer_storage
from tapio_core import RunningObserver
from tapio_core.btf import Btf
from tapio_core.config import ConfigError, apply_overrides, build_settings
from tapio_observer_storage.detect import IO_ERROR, LATENCY_SPIKE, DeviceScreens, StorageDetector
from tapio_observer_storage.records import (
    STORAGE_RECORD,
    Operations,
    block_status,
    block_statuses,
    kernel_dev,
    operations_from_btf,
)
from tapio_observer_storage.settings import DeviceRule, StorageSettings

PLUGIN_DIR = Path(tapio_observer_storage.__file__).parent
OPERATIONS = Operations(mask=0xFF, names={0: "read", 1: "write", 2: "flush", 3: "discard"})
MS = 1_000_000


class FakeDeviceState:
    """Stands in for the ctypes leaf of BPF map ``devices``: a threshold and the kernel's baselines."""

    def __init__(self, warning_ns: int = 0, ops: str = "fresh") -> None:
        self.warning_ns, self.ops = warning_ns, ops


class FakeTable:
    """Stands in for the bcc map ``devices``: ``get``, ``table[Key(k)] = leaf``; optionally failing."""

    Key = staticmethod(int)
    Leaf = FakeDeviceState

    def __init__(self, fail: bool = False) -> None:
        self.values: dict[int, FakeDeviceState] = {}
        self.writes = 0
        self.fail = fail

    def get(self, key: int) -> FakeDeviceState | None:
        return self.values.get(key)

    def __setitem__(self, key: int, value: FakeDeviceState) -> None:
        if self.fail:
            raise Exception("Could not update table: [Errno 12] Cannot allocate memory")
        self.values[key] = value
        self.writes += 1


def detector(settings: StorageSettings | None = None, table: FakeTable | None = None,
             release: str = "6.18.0") -> StorageDetector:
    settings = settings or StorageSettings()
    return StorageDetector(settings, OPERATIONS, block_statuses(release), DeviceScreens(table))


def events(*records: bytes) -> np.ndarray:
    return np.frombuffer(b"".join(records), STORAGE_RECORD)


# -- layout -----------------------------------------------------------------------------------------


def test_numpy_layout_matches_the_packed_c_struct():
    assert STORAGE_RECORD.itemsize == STORAGE_RECORD_C.size == 152


C_FIELD = re.compile(r"^\s*(?:struct\s+)?\w+\s+(\w+)(?:\[\w+\])?;", re.M)


def c_struct(text: str, name: str) -> str:
    return re.search(rf"struct {name} \{{.*?\n\}};", text, re.S).group(0)


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc to lay the C struct out")
def test_c_struct_and_numpy_dtype_have_the_same_fields_at_the_same_offsets(tmp_path):
    """Compiles the real declarations from storage.bpf.c and tapio.h and asks C for each offset."""
    source = (PLUGIN_DIR / "storage.bpf.c").read_text()
    from tapio_core.bpf import shared_include_dir

    task = c_struct((shared_include_dir() / "tapio.h").read_text(), "tapio_task")
    record = c_struct(source, "storage_record")
    fields = C_FIELD.findall(record.split("{", 1)[1])
    assert fields == list(STORAGE_RECORD.names)
    prints = "".join(f'printf("{f} %zu\\n", offsetof(struct storage_record, {f}));' for f in fields)
    program = tmp_path / "layout.c"
    program.write_text(
        "#include <stdio.h>\n#include <stddef.h>\n#include <stdint.h>\n"
        "typedef uint64_t u64; typedef uint32_t u32; typedef uint16_t u16; typedef uint8_t u8;\n"
        f"#define DISK_NAME_LEN 32\n{task}\n{record}\n"
        f'int main(void) {{ {prints} printf("sizeof %zu\\n", sizeof(struct storage_record)); return 0; }}\n'
    )
    subprocess.run(["gcc", "-o", str(tmp_path / "layout"), str(program)], check=True, capture_output=True)
    printed = subprocess.run([str(tmp_path / "layout")], check=True, capture_output=True, text=True).stdout
    offsets = dict(line.split() for line in printed.splitlines())
    assert {name: int(offset) for name, offset in offsets.items()} == {
        **{name: STORAGE_RECORD.fields[name][1] for name in STORAGE_RECORD.names},
        "sizeof": STORAGE_RECORD.itemsize,
    }


def test_a_packed_record_parses_back_field_by_field():
    raw = pack_storage_record(ts=7, latency=8, sector=9, baseline=10, deviation=11, samples=12,
                              queue=0xFFFF_8880_1234_5000, pid=15, tid=16, cgroup=17, comm=b"writer",
                              major=259, minor=1,
                              size=4096, completed=512, cmd_flags=WRITE, status=10, partial=1, matched=1,
                              disk=b"nvme0n1")
    [row] = events(raw)
    assert (row["timestamp_ns"], row["latency_ns"], row["sector"]) == (7, 8, 9)
    assert (row["baseline_ns"], row["baseline_deviation_ns"], row["baseline_samples"]) == (10, 11, 12)
    assert row["queue"] == 0xFFFF_8880_1234_5000
    assert (row["task"]["pid"], row["task"]["tid"], row["task"]["cgroup_id"], row["task"]["comm"]) == (
        15, 16, 17, b"writer")
    assert (row["dev_major"], row["dev_minor"], row["bytes"], row["completed_bytes"]) == (259, 1, 4096, 512)
    assert (row["cmd_flags"], row["status"], row["partial"], row["device_matched"], row["disk_name"]) == (
        WRITE, 10, 1, 1, b"nvme0n1")


# -- I/O errors -------------------------------------------------------------------------------------


def test_nospc_write_becomes_one_exact_io_error_attributed_to_the_issuer():
    raw = pack_storage_record(ts=5_000, latency=13_000, status=3, baseline=38_000, deviation=7_000, samples=68)
    [anomaly] = detector().detect(events(raw))
    assert anomaly.type == IO_ERROR
    assert (anomaly.severity, anomaly.outcome, anomaly.error_code) == ("critical", "failure", "ENOSPC")
    assert anomaly.error_message == (
        "write of 65536 bytes at sector 25600 on loop3 completed with BLK_STS_NOSPC (critical space allocation)")
    assert anomaly.timestamp_ns == 5_000
    assert anomaly.fingerprint == raw
    assert anomaly.data == {
        "pid": 4242, "tid": 4243, "comm": "dd", "cgroup_id": 99,
        "device": "loop3", "dev_major": 7, "dev_minor": 3,
        "operation": "write", "cmd_flags": WRITE | REQ_SYNC, "sector": 25_600, "bytes": 65_536,
        "completed_bytes": 65_536, "partial": False,
        "latency_ns": 13_000, "baseline_latency_ns": 38_000, "baseline_deviation_ns": 7_000, "baseline_samples": 68,
        "status": "BLK_STS_NOSPC", "status_code": 3, "errno": errno.ENOSPC, "status_from_errno": False,
    }


@pytest.mark.parametrize(("errno_value", "status", "code"), [
    (errno.ENOSPC, "BLK_STS_NOSPC", 3), (errno.EIO, "BLK_STS_IOERR", 10), (errno.ETIMEDOUT, "BLK_STS_TIMEOUT", 2),
    (errno.EPERM, "errno EPERM", None),  # no status maps to it: said so, not guessed
])
def test_an_errno_from_a_kernel_like_5_10_names_the_one_status_blk_errors_maps_to_it(errno_value, status, code):
    """On 5.10, block_rq_complete hands over blk_status_to_errno()'s result, which the record marks."""
    raw = pack_storage_record(status=errno_value, status_is_errno=1)
    [anomaly] = detector(release="5.10.0-32-amd64").detect(events(raw))
    assert (anomaly.type, anomaly.error_code) == (IO_ERROR, errno.errorcode[errno_value])
    data = anomaly.data
    assert (data["status"], data["status_code"], data["errno"], data["status_from_errno"]) == (
        status, code, errno_value, True)


def test_an_error_is_reported_however_fast_and_a_slow_error_is_still_one_io_error():
    fast = pack_storage_record(latency=1, status=10, ts=1)
    slow = pack_storage_record(latency=60_000 * MS, status=2, ts=2)
    anomalies = detector().detect(events(fast, slow))
    assert [(a.type, a.data["status"], a.error_code) for a in anomalies] == [
        (IO_ERROR, "BLK_STS_IOERR", "EIO"), (IO_ERROR, "BLK_STS_TIMEOUT", "ETIMEDOUT")]


def test_what_the_kernels_rate_limit_held_back_rides_on_the_next_record_and_only_there():
    first = pack_storage_record(status=10, ts=1)
    after_a_flood = pack_storage_record(status=10, ts=2, suppressed=1234)
    spike = pack_storage_record(latency=5_000 * MS, ts=3, suppressed=7)
    anomalies = detector().detect(events(first, after_a_flood, spike))
    assert [a.data.get("suppressed") for a in anomalies] == [None, 1234, 7]


def test_an_unknown_status_code_is_named_by_number_with_the_kernels_fallback_errno():
    [anomaly] = detector().detect(events(pack_storage_record(status=200)))
    assert (anomaly.data["status"], anomaly.data["status_code"], anomaly.error_code) == ("BLK_STS_200", 200, "EIO")
    assert anomaly.data["errno"] == errno.EIO


@pytest.mark.parametrize(("release", "code", "name", "errno_name"), [
    ("6.18.44-fc-v657", 3, "BLK_STS_NOSPC", "ENOSPC"),
    ("4.19.0", 3, "BLK_STS_NOSPC", "ENOSPC"),
    ("6.18.44-fc-v657", 14, "BLK_STS_ZONE_OPEN_RESOURCE", "ETOOMANYREFS"),
    ("6.9.12", 14, "BLK_STS_ZONE_RESOURCE", "EIO"),
    ("6.9.12", 15, "BLK_STS_ZONE_OPEN_RESOURCE", "ETOOMANYREFS"),
    ("6.9.12", 18, "BLK_STS_DURATION_LIMIT", "ETIME"),
    ("6.10.0", 17, "BLK_STS_DURATION_LIMIT", "ETIME"),
    ("6.11.0", 19, "BLK_STS_INVAL", "EINVAL"),  # before the 2026 renumbering
    ("6.18.0", 18, "BLK_STS_INVAL", "EINVAL"),  # after it
])
def test_block_status_codes_follow_the_kernel_version_that_defined_them(release, code, name, errno_name):
    status = block_status(code, block_statuses(release))
    assert (status.name, status.errno) == (name, errno_name)


# -- latency spikes ---------------------------------------------------------------------------------


def test_slow_write_is_a_warning_then_a_critical_spike_with_the_baseline_and_thresholds():
    settings = StorageSettings(warning_ms=100.0, critical_ms=1000.0)
    warning = pack_storage_record(latency=150 * MS, ts=1)
    critical = pack_storage_record(latency=2_000 * MS, ts=2)
    anomalies = detector(settings).detect(events(warning, critical))
    assert [(a.type, a.severity, a.outcome) for a in anomalies] == [
        (LATENCY_SPIKE, "warning", "success"), (LATENCY_SPIKE, "critical", "success")]
    assert anomalies[1].error_code is None
    data = anomalies[1].data
    assert (data["latency_ns"], data["baseline_latency_ns"], data["baseline_deviation_ns"]) == (
        2_000 * MS, 12_000, 3_000)
    assert (data["warning_threshold_ns"], data["critical_threshold_ns"], data["threshold_rule"]) == (
        100 * MS, 1_000 * MS, "default")
    assert (data["pid"], data["comm"], data["device"], data["operation"]) == (4242, "dd", "loop3", "write")
    assert "status" not in data


def test_exactly_at_the_threshold_counts_and_just_below_does_not():
    settings = StorageSettings(warning_ms=100.0, critical_ms=1000.0)
    batch = events(pack_storage_record(latency=100 * MS - 1), pack_storage_record(latency=100 * MS),
                   pack_storage_record(latency=1000 * MS - 1), pack_storage_record(latency=1000 * MS))
    assert [a.severity for a in detector(settings).detect(batch)] == ["warning", "warning", "critical"]


def test_per_device_rules_pick_thresholds_by_glob_first_match_wins_and_inherit_defaults():
    settings = build_settings(StorageSettings, "storage", {"storage": {
        "warning_ms": 50, "critical_ms": 500,
        "devices": [{"match": "nvme*", "warning_ms": 5, "critical_ms": 20},
                    {"match": "nvme0n*", "warning_ms": 1},  # never reached: nvme* matches first
                    {"match": "loop?", "critical_ms": 5000}],
    }})
    d = detector(settings)
    batch = events(
        pack_storage_record(latency=10 * MS, disk=b"nvme0n1", major=259, minor=0, ts=1),   # nvme*: warning
        pack_storage_record(latency=30 * MS, disk=b"nvme1n1", major=259, minor=1, ts=2),   # nvme*: critical
        pack_storage_record(latency=1_000 * MS, disk=b"loop3", ts=3),                       # loop?: warning
        pack_storage_record(latency=40 * MS, disk=b"vda", major=254, minor=0, ts=4),        # default: nothing
        pack_storage_record(latency=600 * MS, disk=b"loop12", major=7, minor=12, ts=5),     # default: critical
    )
    found = d.detect(batch)
    assert [(a.data["device"], a.severity, a.data["threshold_rule"]) for a in found] == [
        ("nvme0n1", "warning", "nvme*"), ("nvme1n1", "critical", "nvme*"),
        ("loop3", "warning", "loop?"), ("loop12", "critical", "default")]
    assert [(a.data["warning_threshold_ns"], a.data["critical_threshold_ns"]) for a in found] == [
        (5 * MS, 20 * MS), (5 * MS, 20 * MS), (50 * MS, 5000 * MS), (50 * MS, 500 * MS)]
    assert d.counters()["screened_in_userspace"] == 1  # vda: the kernel's screen was lower than its threshold


def test_kernel_screen_is_the_lowest_warning_any_device_could_have():
    assert StorageSettings().screen_ns() == 100 * MS
    settings = StorageSettings(warning_ms=50.0, devices=(
        DeviceRule("sd*", warning_ms=500.0), DeviceRule("nvme*", warning_ms=2.5), DeviceRule("x*")))
    assert settings.screen_ns() == 2_500_000


def test_no_baseline_yet_is_null_not_zero():
    [anomaly] = detector().detect(events(pack_storage_record(samples=0, baseline=0, deviation=0)))
    assert (anomaly.data["baseline_latency_ns"], anomaly.data["baseline_deviation_ns"],
            anomaly.data["baseline_samples"]) == (None, None, 0)


def test_partial_completion_flush_operation_and_a_device_without_a_name():
    raw = pack_storage_record(cmd_flags=FLUSH | REQ_SYNC, size=8192, completed=4096, partial=1, disk=b"",
                              major=8, minor=16)
    [anomaly] = detector().detect(events(raw))
    data = anomaly.data
    assert (data["operation"], data["partial"], data["completed_bytes"]) == ("flush", True, 4096)
    assert anomaly.data["device"] == "8:16"


def test_operation_outside_the_known_enum_is_named_by_number():
    [anomaly] = detector().detect(events(pack_storage_record(cmd_flags=0x22 | REQ_SYNC)))
    assert anomaly.data["operation"] == "op_34"


def test_comm_and_disk_name_stop_at_nul_and_survive_bad_utf8():
    [anomaly] = detector().detect(events(pack_storage_record(comm=b"a\xffb\0junk", disk=b"loop3\0xx")))
    assert (anomaly.data["comm"], anomaly.data["device"]) == ("a\ufffdb", "loop3")


def test_mixed_batch_keeps_kernel_order():
    batch = events(pack_storage_record(ts=1, status=3), pack_storage_record(ts=2, latency=1),
                   pack_storage_record(ts=3, latency=5_000 * MS), pack_storage_record(ts=4, status=10))
    assert [(a.timestamp_ns, a.type) for a in detector().detect(batch)] == [
        (1, IO_ERROR), (3, LATENCY_SPIKE), (4, IO_ERROR)]


def test_counters_count_what_the_userspace_screen_dropped_and_the_devices_seen():
    d = detector()
    d.detect(events(pack_storage_record(latency=1)))
    d.detect(events(pack_storage_record(latency=1, ts=2, disk=b"vda", queue=0xFFFF_8880_0000_9000)))
    assert d.counters() == {"screened_in_userspace": 2, "devices_screened_in_kernel": 2}
    assert d.detect(events()) == []


# -- the kernel's per-device screen -----------------------------------------------------------------


LOOP3_QUEUE, VDA_QUEUE = 0xFFFF_8880_0000_3000, 0xFFFF_8880_0000_9000


def test_a_device_seen_for_the_first_time_gets_its_own_kernel_threshold_once():
    settings = StorageSettings(warning_ms=100.0, devices=(DeviceRule("loop*", warning_ms=500.0, critical_ms=2000.0),))
    table = FakeTable()
    table.values[LOOP3_QUEUE] = FakeDeviceState(ops="learned by the kernel")
    d = detector(settings, table)
    d.detect(events(pack_storage_record(disk=b"loop3", queue=LOOP3_QUEUE, ts=1),
                    pack_storage_record(disk=b"loop3", queue=LOOP3_QUEUE),
                    pack_storage_record(disk=b"vda", major=254, minor=0, queue=VDA_QUEUE)))
    # The second loop3 record was sent before the kernel had the threshold: written again, harmlessly.
    assert {queue: state.warning_ns for queue, state in table.values.items()} == {
        LOOP3_QUEUE: 500 * MS, VDA_QUEUE: 100 * MS}
    assert table.values[LOOP3_QUEUE].ops == "learned by the kernel"  # only the threshold is ours
    writes = table.writes
    d.detect(events(pack_storage_record(disk=b"loop3", queue=LOOP3_QUEUE, matched=1)))
    assert table.writes == writes  # the kernel judged with it already: nothing to do
    # The same queue address now belongs to another disk (one removed, another created): matched again.
    d.detect(events(pack_storage_record(disk=b"sdz", major=8, minor=0, queue=LOOP3_QUEUE, matched=1)))
    assert table.values[LOOP3_QUEUE].warning_ns == 100 * MS
    # The kernel lost the entry (its LRU map evicted it): the next record says so, and it is written again.
    del table.values[LOOP3_QUEUE]
    d.detect(events(pack_storage_record(disk=b"sdz", major=8, minor=0, queue=LOOP3_QUEUE, matched=0)))
    assert table.values[LOOP3_QUEUE].warning_ns == 100 * MS


def test_a_failed_map_update_leaves_the_device_on_the_common_screen_and_warns_once(caplog):
    d = detector(table=FakeTable(fail=True))
    batch = events(pack_storage_record(disk=b"loop1", minor=1), pack_storage_record(disk=b"loop2", minor=2))
    anomalies = d.detect(batch)
    assert len(anomalies) == 2  # judging does not depend on the map
    assert d.counters()["devices_screened_in_kernel"] == 0
    assert caplog.text.count("cannot give") == 1


def test_kernel_dev_is_the_kernels_internal_encoding():
    assert kernel_dev(7, 3) == 7 << 20 | 3
    assert kernel_dev(259, 1_048_575) == 259 << 20 | 0xFFFFF


# -- operations from BTF ----------------------------------------------------------------------------


@pytest.mark.kernel  # the running kernel's BTF: required in CI like every kernel test, never skipped quietly
def test_operations_come_from_the_running_kernels_btf():
    btf = Btf.load()
    operations = operations_from_btf(btf)
    assert operations.mask == 0xFF
    assert {operations.name(op) for op in (0, 1, 2, 3)} == {"read", "write", "flush", "discard"}
    assert operations.name(1 | REQ_SYNC) == "write"


def test_operations_of_kernels_before_6_0_come_from_enum_req_opf():
    """5.10's BTF names the enum req_opf (its values are 6.x's); a synthetic blob stands in for it."""
    from test_btf import ENUM, BlobBuilder

    blob = BlobBuilder()
    values = [("REQ_OP_READ", 0), ("REQ_OP_WRITE", 1), ("REQ_OP_FLUSH", 2), ("REQ_OP_DISCARD", 3),
              ("REQ_OP_WRITE_ZEROES", 9)]
    blob.add(ENUM, "req_opf", 4, vlen=len(values),
             extra=b"".join(struct.pack("<Ii", blob.s(name), value) for name, value in values))
    blob.add(ENUM, "req_flag_bits", 4, vlen=1, extra=struct.pack("<Ii", blob.s("__REQ_FAILFAST_DEV"), 8))
    operations = operations_from_btf(Btf(blob.blob()))
    assert operations.mask == 0xFF
    assert [operations.name(op | REQ_SYNC) for op in (0, 1, 2, 3, 9)] == [
        "read", "write", "flush", "discard", "write_zeroes"]


# -- settings ---------------------------------------------------------------------------------------


def test_settings_from_set_flags_including_an_inline_device_rule():
    raw = apply_overrides({}, ["storage.warning_ms=20", 'storage.devices=[{match="loop*", warning_ms=500}]'])
    settings = build_settings(StorageSettings, "storage", raw)
    assert settings.thresholds("loop3").warning_ns == 500 * MS
    assert settings.thresholds("loop3").critical_ns == 1000 * MS
    assert settings.thresholds("nvme0n1").warning_ns == 20 * MS


@pytest.mark.parametrize(("table", "message"), [
    ({"warning_ms": -1}, "config [storage]: 'warning_ms' must be > 0.0: -1.0"),
    ({"warning_ms": 500, "critical_ms": 100}, "config [storage]: critical_ms must be >= warning_ms, got 100.0 < 500.0"),
    ({"devices": [{"match": "loop*", "critical_ms": 1}]},
     "config [storage]: devices[0] ('loop*'): critical_ms must be >= warning_ms, got 1.0 < 100.0"),
    ({"devices": [{"match": " "}]},
     "config [storage]: devices[0]: 'match' must be a device name or glob such as 'nvme*', not empty"),
    ({"record_burst": 0}, "config [storage]: 'record_burst' must be >= 1: 0"),
    ({"record_rate_per_s": 0}, "config [storage]: 'record_rate_per_s' must be >= 0.001: 0.0"),
    ({"threshold": 5}, "config [storage]: unknown key threshold (known: critical_ms, devices, record_burst, "
                       "record_rate_per_s, warning_ms)"),
])
def test_bad_settings_stop_start_up_with_one_line_naming_the_key(table, message):
    with pytest.raises(ConfigError) as caught:
        build_settings(StorageSettings, "storage", {"storage": table})
    assert str(caught.value) == message


# -- the hook, as replay calls it -------------------------------------------------------------------


def test_kernel_counts_are_declared_for_the_agent_to_read():
    counters = {(c.name, c.map, c.index) for c in tapio_observer_storage.OBSERVER.bpf_counters}
    assert counters == {("unmatched_completions", "storage_counts", 0), ("inflight_overflows", "storage_counts", 1),
                        ("suppressed", "storage_counts", 2)}
    source = (PLUGIN_DIR / "storage.bpf.c").read_text()
    assert "#define COUNT_UNMATCHED 0" in source and "#define COUNT_OVERFLOW  1" in source
    assert "#define COUNT_SUPPRESSED 2" in source


def test_replay_path_builds_its_detector_and_fills_the_observers_counters():
    observer = RunningObserver(spec=tapio_observer_storage.OBSERVER, config=StorageSettings(warning_ms=10.0))
    batch = events(pack_storage_record(latency=20 * MS), pack_storage_record(latency=5 * MS, ts=9))
    anomalies = tapio_observer_storage.tapio_detect_anomalies(observer=observer, events=batch)
    assert [a.type for a in anomalies] == [LATENCY_SPIKE]
    assert anomalies[0].data["operation"] == "write"
    assert observer.counters == {"screened_in_userspace": 1, "devices_screened_in_kernel": 1}
    assert observer.state["detector"].screens.table is None  # nothing to write into during a replay
