"""The container observer's record layout, classification and settings, from records packed as the kernel packs them."""

import logging
import re
import signal
from pathlib import Path

import attrs
import numpy as np
import pytest
from container_records import CONTAINER_RECORD_C, pack_container_record, pack_exit, pack_oom
from plugin_helpers import Collect

from tapio_core.btf import Btf
from tapio_core.config import ConfigError, build_settings
from tapio_core.occurrence import KernelClock
from tapio_core.pipeline import Pipeline
from tapio_core.plugins import load_plugins
from tapio_core.sink import SinkOptions
from tapio_observer_container import bitmap, exit_policy
from tapio_observer_container import records as records_module
from tapio_observer_container.detect import container_anomalies
from tapio_observer_container.layout import (
    CGROUP_V1,
    CGROUP_V2,
    MAIN_PROCESS,
    OOM_KILLER_SIGKILL,
    UNKNOWN,
    KernelLayout,
    function_range,
    kernel_layout,
    memory_controller_version,
    oom_killer_range,
    rss_counter_offsets,
)
from tapio_observer_container.records import (
    CONTAINER_RECORD,
    FLAG_CGROUP,
    FLAG_MAIN_PROCESS,
    FLAG_MEMORY,
    FLAG_PATH_TRUNCATED,
)
from tapio_observer_container.settings import FATAL_SIGNALS, ContainerSettings

MIB = 1 << 20


def anomalies_of(*records):
    return container_anomalies(np.frombuffer(b"".join(records), CONTAINER_RECORD))


def test_numpy_layout_matches_the_c_struct():
    assert CONTAINER_RECORD.itemsize == CONTAINER_RECORD_C.size == 392


# -- abnormal exits -------------------------------------------------------------------------------


def test_exit_code_record_becomes_one_warning_with_exact_facts():
    [anomaly] = anomalies_of(pack_exit(3 << 8, ts=5_000, pid=10, tid=12, cgroup=4160, comm=b"sh",
                                       path=b"/process_api/abc"))
    assert (anomaly.type, anomaly.severity, anomaly.outcome) == ("kernel.container.abnormal_exit", "warning", "failure")
    assert (anomaly.error_code, anomaly.error_message) == ("NONZERO_EXIT", "exited with code 3")
    assert anomaly.timestamp_ns == 5_000
    assert anomaly.data == {
        "pid": 10, "tid": 12, "comm": "sh", "cgroup_id": 4160, "cgroup_path": "/process_api/abc",
        "cgroup_path_truncated": False, "cgroup_version": 1,
        "exit_status": 0x300, "exit_code": 3, "signal": None, "core_dumped": False,
        "main_process": False, "runtime_ms": None, "crash_loop_exits": 0, "quiet_exits": 0,
    }


def test_a_crash_loops_main_process_exit_carries_its_folded_exits_and_the_cgroups_quiet_ones():
    [anomaly] = anomalies_of(pack_exit(1 << 8, flags=FLAG_CGROUP | FLAG_MAIN_PROCESS, runtime_ns=2_500_000_000,
                                       crash_loop_exits=7, quiet_exits=300, suppressed=0))
    assert {key: anomaly.data[key] for key in ("main_process", "runtime_ms", "crash_loop_exits", "quiet_exits")} == {
        "main_process": True, "runtime_ms": 2500, "crash_loop_exits": 7, "quiet_exits": 300}
    assert "suppressed" not in anomaly.data
    [limited] = anomalies_of(pack_exit(0x0B, suppressed=4))
    assert limited.data["suppressed"] == 4


@pytest.mark.parametrize(("status", "name", "core", "message"), [
    (0x0B, "SIGSEGV", False, "killed by SIGSEGV"),
    (0x8B, "SIGSEGV", True, "killed by SIGSEGV (core dumped)"),
    (0x09, "SIGKILL", False, "killed by SIGKILL"),
    (0x86, "SIGABRT", True, "killed by SIGABRT (core dumped)"),
    (35, "SIGRTMIN+1", False, "killed by SIGRTMIN+1"),
])
def test_signal_deaths_are_errors_naming_the_signal(status, name, core, message):
    [anomaly] = anomalies_of(pack_exit(status))
    assert (anomaly.severity, anomaly.error_code, anomaly.error_message) == ("error", name, message)
    data = anomaly.data
    assert (data["signal"], data["exit_code"], data["core_dumped"], data["exit_status"]) == (
        status & 0x7F, None, core, status)


def test_exit_without_cgroup_facts_reports_null_not_zero():
    [anomaly] = anomalies_of(pack_exit(1 << 8, flags=0, cgroup=0, path=b"", cgroup_mode=2))
    data = anomaly.data
    assert (data["cgroup_id"], data["cgroup_path"], data["cgroup_version"]) == (None, None, None)
    assert data["exit_code"] == 1


def test_truncated_cgroup_path_is_flagged():
    [anomaly] = anomalies_of(pack_exit(1 << 8, flags=FLAG_CGROUP | FLAG_PATH_TRUNCATED, path=b"/a" * 127))
    assert anomaly.data["cgroup_path_truncated"] is True
    assert anomaly.data["cgroup_path"] == "/a" * 127


def test_comm_and_path_stop_at_nul_and_survive_bad_utf8():
    [anomaly] = anomalies_of(pack_exit(1 << 8, comm=b"a\xffb\0junk", path=b"/x\0/stale/bytes"))
    assert (anomaly.data["comm"], anomaly.data["cgroup_path"]) == ("a\ufffdb", "/x")


# -- OOM kills ------------------------------------------------------------------------------------


def test_oom_kill_record_becomes_one_critical_with_the_victims_facts():
    [anomaly] = anomalies_of(pack_oom(
        ts=9_000, pid=300, tid=301, comm=b"python3", cgroup=6866, path=b"/tapio-test", limit=64 * MIB,
        usage=64 * MIB, file_rss=2 * MIB, anon_rss=60 * MIB, shmem_rss=MIB, oom_score_adj=1000,
        trigger_pid=400, trigger_comm=b"allocator",
    ))
    assert (anomaly.type, anomaly.severity, anomaly.outcome) == ("kernel.container.oom_kill", "critical", "failure")
    assert anomaly.error_code == "OOM_KILLED"
    assert anomaly.data == {
        "pid": 300, "tid": 301, "comm": "python3", "cgroup_id": 6866, "cgroup_path": "/tapio-test",
        "cgroup_path_truncated": False, "cgroup_version": 1,
        "memory_limit_bytes": 64 * MIB, "memory_usage_bytes": 64 * MIB,
        "rss_bytes": 63 * MIB, "anon_rss_bytes": 60 * MIB, "file_rss_bytes": 2 * MIB, "shmem_rss_bytes": MIB,
        "oom_score_adj": 1000, "trigger_pid": 400, "trigger_comm": "allocator",
    }


def test_oom_kill_facts_the_kernel_lacked_are_null():
    [anomaly] = anomalies_of(pack_oom(flags=0, limit=0, usage=0, oom_score_adj=0))
    data = anomaly.data
    for key in ("cgroup_id", "cgroup_path", "memory_limit_bytes", "memory_usage_bytes", "rss_bytes",
                "anon_rss_bytes", "file_rss_bytes", "shmem_rss_bytes", "oom_score_adj", "trigger_pid", "trigger_comm"):
        assert data[key] is None, key


def test_unlimited_memory_cgroup_has_usage_but_no_limit():
    [anomaly] = anomalies_of(pack_oom(flags=FLAG_CGROUP | FLAG_MEMORY, usage=5 * MIB))
    assert (anomaly.data["memory_limit_bytes"], anomaly.data["memory_usage_bytes"]) == (None, 5 * MIB)


def test_mixed_batch_keeps_kernel_order_and_ignores_unknown_kinds():
    anomalies = anomalies_of(
        pack_exit(0x0B, ts=30),
        pack_container_record(0, ts=15),
        pack_oom(ts=10),
        pack_container_record(99, ts=20),
        pack_exit(2 << 8, ts=40),
    )
    assert [(a.timestamp_ns, a.type.rsplit(".", 1)[1]) for a in anomalies] == [
        (10, "oom_kill"), (30, "abnormal_exit"), (40, "abnormal_exit"),
    ]


def test_empty_batch_has_no_anomalies():
    assert container_anomalies(np.frombuffer(b"", CONTAINER_RECORD)) == []


def test_installed_plugin_runs_in_the_pipeline_as_replay_does(tmp_path):
    sink = Collect()
    plugins = load_plugins({"container"}, extra=[("collect", sink)])
    assert plugins.observers["container"][0] == "container"
    settings = {"container": {"ignore_exit_codes": [3]}}  # filters act in BPF; replay judges what was recorded
    pipeline = Pipeline.build(plugins, ["collect"], SinkOptions(data_dir=tmp_path), settings, KernelClock())
    pipeline.ingest("container", pack_exit(3 << 8, ts=1) + pack_oom(ts=2, pid=77))
    assert [(o.type, o.data["pid"], o.data["timestamp_ns"]) for o in sink.received] == [
        ("kernel.container.abnormal_exit", 4242, 1), ("kernel.container.oom_kill", 77, 2),
    ]
    assert pipeline.observers["container"].records == 2


# -- settings -------------------------------------------------------------------------------------


def settings(**table):
    return build_settings(ContainerSettings, "container", {"container": table})


def test_default_settings_report_crashes_and_ignore_nothing():
    defaults = settings()
    assert defaults == ContainerSettings()
    assert (defaults.ignore_exit_codes, defaults.ignore_signals, defaults.ignore_process_names) == ((), (), ())
    assert defaults.report_signals == tuple(int(getattr(signal, name)) for name in FATAL_SIGNALS)
    assert (defaults.min_runtime_s, defaults.crash_loop_window_s) == (10.0, 600.0)


def test_exit_policy_in_the_kernels_units():
    policy = exit_policy(settings(report_signals=["SEGV", "TERM", "KILL"], ignore_signals=["KILL"], min_runtime_s=2,
                                  record_rate_per_s=0.5, record_burst=3, crash_loop_window_s=60))
    assert policy == {
        "ignored_exit_codes": [0, 0, 0, 0], "reported_signals": [1 << 11 | 1 << 15, 0],
        "min_runtime_ns": 2_000_000_000, "record_cost_ns": 2_000_000_000, "record_burst_ns": 6_000_000_000,
        "crash_loop_ns": 60_000_000_000,
    }


def test_settings_normalise_signals_and_drop_duplicates():
    parsed = settings(ignore_exit_codes=[143, 3, 143], ignore_signals=["SIGTERM", "pipe", 15, "9"],
                      ignore_process_names=["sleep"], cgroup_mode="v2")
    assert parsed == ContainerSettings(ignore_exit_codes=(143, 3), ignore_signals=(15, 13, 9),
                                       ignore_process_names=("sleep",), cgroup_mode="v2")


@pytest.mark.parametrize(("table", "message"), [
    ({"ignore_process_names": "sleep"}, "'ignore_process_names' must be a list"),
    ({"ignore_process_names": ["a" * 16]}, "process names of 1..15 bytes"),
    ({"ignore_exit_codes": [0]}, "exit codes 1..255 (0 is never reported): 0"),
    ({"ignore_exit_codes": [256]}, "exit codes 1..255"),
    ({"ignore_exit_codes": ["3"]}, "exit codes 1..255"),
    ({"ignore_exit_codes": [True]}, "exit codes 1..255"),
    ({"ignore_signals": ["SIGFOO"]}, "'ignore_signals' must hold signals"),
    ({"ignore_signals": [0]}, "'ignore_signals' must hold signals"),
    ({"cgroup_mode": "v3"}, "'cgroup_mode' must be in"),
    ({"bogus": 1}, "unknown key bogus"),
])
def test_bad_settings_are_one_line_naming_the_key(table, message):
    with pytest.raises(ConfigError) as caught:
        settings(**table)
    assert str(caught.value).startswith("config [container]: ")
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_ignore_sets_become_the_bitmaps_the_kernel_tests():
    assert bitmap((1, 63, 64, 255), 4) == [1 << 1 | 1 << 63, 1, 0, 1 << 63]
    assert bitmap((), 2) == [0, 0]


# -- kernel layout (what BTF cannot give as -D macros) ---------------------------------------------

PROC_CGROUPS_V1 = "#subsys_name\thierarchy\tnum_cgroups\tenabled\ncpu\t1\t1\t1\nmemory\t4\t35\t1\n"
PROC_CGROUPS_V2 = "#subsys_name\thierarchy\tnum_cgroups\tenabled\ncpu\t0\t1\t1\nmemory\t0\t80\t1\n"
PROC_CGROUPS_DISABLED = "#subsys_name\thierarchy\tnum_cgroups\tenabled\nmemory\t4\t1\t0\n"


@pytest.mark.parametrize(("text", "version"), [
    (PROC_CGROUPS_V1, CGROUP_V1), (PROC_CGROUPS_V2, CGROUP_V2), (PROC_CGROUPS_DISABLED, CGROUP_V2), ("", CGROUP_V2),
])
def test_memory_controller_version_from_proc_cgroups(text, version):
    assert memory_controller_version(text) == version


VMLINUX = Path("/sys/kernel/btf/vmlinux")


@pytest.mark.kernel  # reads this kernel's BTF
def test_rss_counters_are_the_shared_count_of_each_per_cpu_counter():
    btf = Btf.load(VMLINUX)
    offsets = rss_counter_offsets(btf)
    base = btf.field_offset("mm_struct", "rss_stat")
    assert offsets is not None and all(offset >= base for offset in offsets)
    # file, anon, shmem: three different counters, each at the same place within its element
    assert len(set(offsets)) == 3
    size = btf.field_size("mm_struct", "rss_stat")
    assert all(offset < base + size for offset in offsets)


@pytest.mark.kernel
def test_this_kernels_btf_gives_every_map_fed_fact():
    layout, lost = kernel_layout(Btf.load(VMLINUX), CGROUP_V2, oom_killer=oom_killer_range())
    assert lost == []
    assert layout.memory_cgrp_id >= 0 and layout.kn_parent_offset >= 0
    assert 0 < layout.oom_killer_start < layout.oom_killer_end


def test_a_kernel_without_btf_loses_only_the_map_fed_features(caplog):
    caplog.set_level(logging.WARNING)
    layout, lost = kernel_layout(None, CGROUP_V1, page_size=4096)
    assert lost == ["memory limit and usage and the v1 memory cgroup", "cgroup paths", "RSS of OOM victims",
                    MAIN_PROCESS, OOM_KILLER_SIGKILL]  # nor where out_of_memory() is
    assert layout == KernelLayout(page_size=4096, unlimited_pages=((1 << 63) - 1) // 4096, memory_cgrp_id=UNKNOWN,
                                  kn_parent_offset=UNKNOWN, rss_file_offset=UNKNOWN, rss_anon_offset=UNKNOWN,
                                  rss_shmem_offset=UNKNOWN, oom_killer_start=0, oom_killer_end=0,
                                  upid_size=UNKNOWN, cgroup_mode=CGROUP_V1)
    assert "cgroup paths disabled" in caplog.text


def test_layout_fields_mirror_the_c_struct_order():
    source = (Path(records_module.__file__).with_name("container.bpf.c")).read_text()
    body = source.split("struct kernel_layout {", 1)[1].split("};", 1)[0]
    c_fields = [line.split(";")[0].split()[-1] for line in body.splitlines() if ";" in line]
    assert c_fields == [field.name for field in attrs.fields(KernelLayout)] + ["configured"]


def test_kinds_and_flags_match_the_c_defines():
    source = (Path(records_module.__file__).with_name("container.bpf.c")).read_text()
    defines = dict(re.findall(r"^#define ((?:KIND|FLAG)_\w+)\s+(.+?)\s*$", source, re.MULTILINE))
    names = [name for name in dir(records_module) if name.startswith(("KIND_", "FLAG_"))]
    python = {name: getattr(records_module, name) for name in names}
    assert {name: eval(value) for name, value in defines.items()} == python  # "(1 << 3)" and plain ints





def test_a_function_ends_where_the_next_kallsyms_symbol_starts():
    kallsyms = ("ffffffff815b0610 t oom_kill_process\nffffffff815b1010 T out_of_memory\n"
                "ffffffff815b1510 T __pfx_pagefault_out_of_memory\n")
    assert function_range(kallsyms, "out_of_memory") == (0xFFFFFFFF815B1010, 0xFFFFFFFF815B1510)
    assert function_range(kallsyms, "pagefault_out_of_memory") == (0, 0)  # only its padding is there
    hidden = "0000000000000000 T out_of_memory\n0000000000000000 T pagefault_out_of_memory\n"  # kptr_restrict
    assert function_range(hidden, "out_of_memory") == (0, 0)
