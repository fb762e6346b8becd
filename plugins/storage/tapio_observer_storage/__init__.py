"""Tapio storage observer: block requests that failed or were slow, from the real kernel."""

from __future__ import annotations

from pathlib import Path

from tapio_core import BpfCounter, BtfField, ObserverSpec, RawTracepointArg, hookimpl
from tapio_core.bpf import ObserverLoadError
from tapio_core.btf import Btf, BtfError
from tapio_observer_storage.detect import DeviceScreens, StorageDetector
from tapio_observer_storage.records import (
    STORAGE_RECORD,
    block_statuses,
    operations_from_btf,
    running_kernel_operations,
)
from tapio_observer_storage.settings import StorageSettings

_DEVICE = "block request device"
# Two kernels' ways to the request's disk, and to its completion status: any one of each will do.
_DISK_OF_QUEUE, _DISK_OF_REQUEST = "disk of the request queue", "disk of the request (rq_disk)"
_BLK_STATUS, _ERRNO_STATUS = "completion status as blk_status_t", "completion status as an errno"

OBSERVER = ObserverSpec(
    name="storage",
    bpf_source=Path(__file__).with_name("storage.bpf.c"),
    record_dtype=STORAGE_RECORD,
    tracepoints=("raw:block_rq_issue", "raw:block_rq_complete", "raw:block_rq_insert", "raw:block_rq_merge"),
    btf_fields=(
        BtfField("STORAGE_RQ_QUEUE_OFFSET", "request", "q", feature=_DEVICE),
        BtfField("STORAGE_QUEUE_DISK_OFFSET", "request_queue", "disk", feature=_DISK_OF_QUEUE),
        BtfField("STORAGE_RQ_DISK_OFFSET", "request", "rq_disk", feature=_DISK_OF_REQUEST),
        BtfField("STORAGE_DISK_MAJOR_OFFSET", "gendisk", "major", feature=_DEVICE),
        BtfField("STORAGE_DISK_FIRST_MINOR_OFFSET", "gendisk", "first_minor", feature=_DEVICE),
        BtfField("STORAGE_RQ_CMD_FLAGS_OFFSET", "request", "cmd_flags", feature="block request operation"),
        BtfField("STORAGE_RQ_DATA_LEN_OFFSET", "request", "__data_len", feature="block request size"),
        BtfField("STORAGE_RQ_SECTOR_OFFSET", "request", "__sector", feature="block request sector"),
        BtfField("STORAGE_DISK_NAME_OFFSET", "gendisk", "disk_name", feature="block device names"),
    ),
    raw_tracepoint_args=(
        RawTracepointArg("STORAGE_STATUS_IS_BLK_STATUS", "block_rq_complete", 1, "unsigned char",
                         feature=_BLK_STATUS),
        RawTracepointArg("STORAGE_STATUS_IS_ERRNO", "block_rq_complete", 1, "int", feature=_ERRNO_STATUS),
    ),
    required_features=(
        _DEVICE, (_DISK_OF_QUEUE, _DISK_OF_REQUEST), "block request operation", "block request size",
        (_BLK_STATUS, _ERRNO_STATUS),
    ),
    description="block I/O errors and latency spikes, per request",
    config_type=StorageSettings,
    bpf_counters=(
        BpfCounter("unmatched_completions", "storage_counts", 0),  # COUNT_UNMATCHED in storage.bpf.c
        BpfCounter("inflight_overflows", "storage_counts", 1),  # COUNT_OVERFLOW
        BpfCounter("suppressed", "storage_counts", 2),  # COUNT_SUPPRESSED: held back by the rate limit
    ),
)

# storage_settings slots in storage.bpf.c
SETTING_SCREEN_NS, SETTING_OP_MASK, SETTING_RECORD_COST_NS, SETTING_RECORD_BURST_NS = 0, 1, 2, 3


@hookimpl
def tapio_register_observers(register):
    register(OBSERVER)


@hookimpl
def tapio_observer_started(observer):
    """Give the kernel its screen for unknown devices, this kernel's REQ_OP_MASK and the records' rate limit."""
    try:
        operations = operations_from_btf(observer.btf or Btf.load())
    except BtfError as exc:
        raise ObserverLoadError(f"storage: cannot read request operations from kernel BTF: {exc}") from None
    settings: StorageSettings = observer.config
    table = observer.bpf["storage_settings"]
    table[table.Key(SETTING_OP_MASK)] = table.Leaf(operations.mask)
    table[table.Key(SETTING_SCREEN_NS)] = table.Leaf(settings.screen_ns())
    table[table.Key(SETTING_RECORD_COST_NS)] = table.Leaf(settings.record_cost_ns())
    table[table.Key(SETTING_RECORD_BURST_NS)] = table.Leaf(settings.record_burst_ns())
    screens = DeviceScreens(observer.bpf["devices"])
    observer.state["detector"] = StorageDetector(settings, operations, block_statuses(), screens)


@hookimpl
def tapio_detect_anomalies(observer, events):
    detector = observer.state.get("detector")
    if detector is None:  # a replay: no kernel to configure, names from this machine's kernel
        settings = observer.config
        detector = observer.state["detector"] = StorageDetector(
            settings, running_kernel_operations(), block_statuses(), DeviceScreens()
        )
    anomalies = detector.detect(events)
    observer.counters.update(detector.counters())
    return anomalies
