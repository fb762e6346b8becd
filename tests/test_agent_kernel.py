"""The agent runtime in-process against the real kernel, with a throwaway observer plugin.

Proves the plumbing every observer relies on: compile with the shared prelude,
BTF offsets passed as -D macros (a missing member disables only its feature),
settings written into BPF maps by ``tapio_observer_started``, records drained
from the real ring buffer through parse -> detect -> sink.
"""

import logging
import os
import threading
from pathlib import Path

import attrs
import pytest
from plugin_helpers import Collect

import tapio_core.bpf
from tapio_core import (
    Anomaly,
    BpfCounter,
    BtfField,
    ObserverSpec,
    OptionalTracepoint,
    TracepointField,
    hookimpl,
    record_dtype,
)
from tapio_core.agent import Agent, compile_helpers_at_once
from tapio_core.bpf import (
    ObserverLoadError,
    ObserverUnsupported,
    kernel_fit,
    load_observer,
    tracepoint_cflags,
    tracepoint_has_field,
)
from tapio_core.config import ConfigError
from tapio_core.occurrence import KernelClock
from tapio_core.pipeline import Pipeline
from tapio_core.plugins import load_plugins
from tapio_core.sink import SinkOptions

pytestmark = pytest.mark.kernel

TOY_SOURCE = r"""
#include <tapio.h>

BPF_ARRAY(toy_settings, u64, 2);  /* [0] the value to report, [1] the pid to watch */
BPF_PERCPU_ARRAY(toy_counts, u64, 2);  /* [1] events seen in the kernel */

struct toy_record {
    u64 timestamp_ns;
    u64 setting;
    u32 pid;
    u32 tgid_from_btf;
    u32 btf_seen;
    u32 missing_seen;
};

TRACEPOINT_PROBE(syscalls, sys_enter_getppid)
{
    int value_key = 0, pid_key = 1;
    u64 *value = toy_settings.lookup(&value_key);
    u64 *watched = toy_settings.lookup(&pid_key);
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    if (!value || !watched || pid != *watched)
        return 0;
    int seen_key = 1;
    u64 *seen = toy_counts.lookup(&seen_key);
    if (seen)
        (*seen)++;
    struct toy_record rec = {};
    rec.timestamp_ns = bpf_ktime_get_ns();
    rec.setting = *value;
    rec.pid = pid;
#ifdef TOY_TGID_OFFSET
    struct task_struct *task = (struct task_struct *)bpf_get_current_task();
    TAPIO_READ_AT(rec.tgid_from_btf, task, TOY_TGID_OFFSET);
    rec.btf_seen = 1;
#endif
#ifdef TOY_MISSING_OFFSET
    rec.missing_seen = 1;
#endif
    tapio_submit(&rec, sizeof(rec));
    return 0;
}
"""

TOY_RECORD = record_dtype([("timestamp_ns", "<u8"), ("setting", "<u8"), ("pid", "<u4"), ("tgid_from_btf", "<u4"),
                           ("btf_seen", "<u4"), ("missing_seen", "<u4")])


@attrs.frozen
class ToySettings:
    value: int = 7


class ToyObserver:
    def __init__(self, name, source, fail_start=None):
        self.name, self.source, self.fail_start = name, source, fail_start
        self.btf_seen = None

    @hookimpl
    def tapio_register_observers(self, register):
        register(ObserverSpec(
            name=self.name, bpf_source=self.source, record_dtype=TOY_RECORD,
            tracepoints=("syscalls:sys_enter_getppid",), config_type=ToySettings,
            bpf_counters=(BpfCounter("seen_in_kernel", "toy_counts", 1),  # per-CPU array
                          BpfCounter("configured_value", "toy_settings", 0)),  # plain array
            btf_fields=(BtfField("TOY_TGID_OFFSET", "task_struct", "tgid", feature="tgid"),
                        BtfField("TOY_MISSING_OFFSET", "task_struct", "no_such_member", feature="imaginary feature")),
        ))

    @hookimpl
    def tapio_observer_started(self, observer):
        if self.fail_start:
            raise self.fail_start(f"{observer.name}: refusing to start")
        self.btf_seen = observer.btf
        table = observer.bpf["toy_settings"]
        table[table.Key(0)] = table.Leaf(observer.config.value)
        table[table.Key(1)] = table.Leaf(os.getpid())

    @hookimpl
    def tapio_detect_anomalies(self, observer, events):
        return [Anomaly(type=f"kernel.{observer.name}.seen", timestamp_ns=int(e["timestamp_ns"]), severity="info",
                        outcome="success", data={k: int(e[k]) for k in TOY_RECORD.names}) for e in events]


@pytest.fixture
def toy_source(tmp_path):
    path = tmp_path / "toy.bpf.c"
    path.write_text(TOY_SOURCE)
    return path


def start_agent(extra, settings):
    loaded = load_plugins(allow=set(), extra=extra)
    pipeline = Pipeline.build(loaded, ["collect"], SinkOptions(data_dir=Path(".")), settings, KernelClock())
    agent = Agent(loaded, pipeline, recorder=None)
    agent.load(ebpf_dir=None)
    return agent


def test_tapio_observer_started_writes_settings_the_kernel_uses(toy_source, caplog):
    sink = Collect()
    caplog.set_level(logging.WARNING)
    toy = ToyObserver("toy", toy_source)
    agent = start_agent([("toy", toy), ("collect", sink)], {"toy": {"value": 42}})
    try:
        assert agent.pipeline.observers["toy"].status == "running"
        assert toy.btf_seen is not None  # parsed once, handed to the plugin while it starts
        assert agent.pipeline.observers["toy"].btf is None  # then let go: it is large
        for _ in range(3):
            os.getppid()
        agent.drain("toy")
        agent.housekeeping()
        assert agent.pipeline.observers["toy"].counters["seen_in_kernel"] == 3
        assert agent.pipeline.observers["toy"].counters["configured_value"] == 42
        agent.pipeline.observers["toy"].lost = 6  # as housekeeping finds it when the ring overflowed
        entry = agent.state()["observers"]["toy"]
        assert entry["lost"] == 6 and entry["lost_per_s"] > 0  # since the previous state: what health judges
        assert agent.state()["observers"]["toy"]["lost_per_s"] == 0  # nothing lost since
        agent.pipeline.observers["toy"].lost = 0
    finally:
        agent.shutdown()
    assert [o.data["setting"] for o in sink.received] == [42, 42, 42]
    first = sink.received[0].data
    assert first["pid"] == os.getpid()
    assert (first["btf_seen"], first["tgid_from_btf"]) == (1, os.getpid())  # offset came from BTF
    assert first["missing_seen"] == 0  # the member this kernel lacks stayed undefined
    assert "task_struct.no_such_member; imaginary feature disabled" in caplog.text
    assert "imaginary feature" in agent.pipeline.observers["toy"].status_reason
    assert agent.pipeline.observers["toy"].bpf is None  # detached


def test_one_observer_failing_leaves_the_others_running(toy_source, tmp_path, caplog):
    broken_source = tmp_path / "broken.bpf.c"
    broken_source.write_text("this is not C;\n")
    sink = Collect()
    agent = start_agent([
        ("toy", ToyObserver("toy", toy_source)),
        ("broken", ToyObserver("broken", broken_source)),
        ("refuses", ToyObserver("refuses", toy_source, fail_start=ObserverLoadError)),
        ("nopmu", ToyObserver("nopmu", toy_source, fail_start=ObserverUnsupported)),
        ("buggy", ToyObserver("buggy", toy_source, fail_start=KeyError)),  # a bug, not a declared failure
        ("collect", sink),
    ], {})
    try:
        statuses = {name: obs.status for name, obs in agent.pipeline.observers.items()}
        assert statuses == {"toy": "running", "broken": "failed", "refuses": "failed", "nopmu": "unsupported",
                            "buggy": "failed"}
        assert set(agent.readers) == {"toy"}
        assert "refusing to start" in agent.pipeline.observers["refuses"].status_reason
        assert agent.pipeline.observers["buggy"].status_reason.startswith("buggy: failed to start: KeyError")
        assert agent.pipeline.observers["buggy"].bpf is None  # detached at once
        os.getppid()
        agent.drain("toy")
    finally:
        agent.shutdown()
    assert [o.type for o in sink.received] == ["kernel.toy.seen"]
    assert "broken: BPF compile/attach failed" in caplog.text


def test_ebpf_dir_overrides_the_installed_source(toy_source, tmp_path):
    override = tmp_path / "override"
    override.mkdir()
    (override / "toy.bpf.c").write_text(TOY_SOURCE.replace("rec.setting = *value;", "rec.setting = *value + 1000;"))
    sink = Collect()
    loaded = load_plugins(allow=set(), extra=[("toy", ToyObserver("toy", toy_source)), ("collect", sink)])
    pipeline = Pipeline.build(loaded, ["collect"], SinkOptions(data_dir=Path(".")), {}, KernelClock())
    agent = Agent(loaded, pipeline, recorder=None)
    agent.load(ebpf_dir=override)
    try:
        os.getppid()
        agent.drain("toy")
    finally:
        agent.shutdown()
    assert [o.data["setting"] for o in sink.received] == [1007]



class CountingLoader:
    """The real load_observer, counting how many run at once and keeping what each returned."""

    def __init__(self):
        self.lock = threading.Lock()
        self.running = self.most_at_once = 0
        self.started = threading.Event()
        self.programs = []

    def __call__(self, spec, ebpf_dir, btf):
        with self.lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        self.started.set()
        try:
            program, disabled = load_observer(spec, ebpf_dir, btf)
            self.programs.append(program)
            return program, disabled
        finally:
            with self.lock:
                self.running -= 1


def toy_agent(tmp_path, names):
    source = tmp_path / "toy.bpf.c"
    source.write_text(TOY_SOURCE)
    loaded = load_plugins(allow=set(), extra=[*((n, ToyObserver(n, source)) for n in names), ("collect", Collect())])
    return Agent(loaded, Pipeline.build(loaded, ["collect"], SinkOptions(data_dir=tmp_path), {}, KernelClock()),
                 recorder=None)


def test_observers_compile_side_by_side_while_the_enrichers_start(tmp_path):
    agent = toy_agent(tmp_path, ["one", "two", "three"])
    loader = CountingLoader()
    compiling_meanwhile = []
    agent.load(None, meanwhile=lambda: compiling_meanwhile.append(loader.started.wait(60) and loader.running),
               loader=loader)
    try:
        assert {o.status for o in agent.pipeline.observers.values()} == {"running"}
        assert compiling_meanwhile[0] >= 1  # the enrichers' start overlapped a compile
        assert loader.most_at_once == compile_helpers_at_once()  # never more helpers than that at once
    finally:
        agent.shutdown()


def test_an_enricher_that_cannot_start_leaves_no_program_attached(tmp_path):
    agent = toy_agent(tmp_path, ["one", "two"])
    loader = CountingLoader()

    def refuse():
        loader.started.wait(60)
        raise ConfigError("kubernetes: no node name")

    with pytest.raises(ConfigError, match="no node name"):
        agent.load(None, meanwhile=refuse, loader=loader)
    assert len(loader.programs) == 2  # both compiles were waited for ...
    for program in loader.programs:  # ... and closed: nothing stays attached
        assert program.attachments == [] and program.maps == {}


def test_tracepoint_fields_define_their_macro_only_where_the_kernel_has_them(tmp_path, monkeypatch, caplog):
    fmt = tmp_path / "sched" / "sched_process_exit" / "format"
    fmt.parent.mkdir(parents=True)
    fmt.write_text("\tfield:pid_t pid;\toffset:24;\tsize:4;\tsigned:1;\n\tfield:bool group_dead;\toffset:32;\n")
    monkeypatch.setattr(tapio_core.bpf, "TRACEFS_EVENTS", tmp_path)
    spec = ObserverSpec(name="t", bpf_source=Path("t.bpf.c"), record_dtype=TOY_RECORD, tracepoints=(),
                        tracepoint_fields=(
                            TracepointField("HAS_GROUP_DEAD", "sched:sched_process_exit", "group_dead", "one"),
                            TracepointField("HAS_PRIO", "sched:sched_process_exit", "prio", "two"),
                            TracepointField("HAS_ERR", "tcp:tcp_retransmit_skb", "err", "three")),
                        optional_tracepoints=(OptionalTracepoint("HAS_EXIT", "sched:sched_process_exit", "four"),
                                              OptionalTracepoint("HAS_SEND", "sock:sock_send_length", "five")))
    assert tracepoint_cflags(spec) == (["-DHAS_EXIT=1", "-DHAS_GROUP_DEAD=1"], {
        "five": "the kernel has no tracepoint sock:sock_send_length",
        "two": "tracepoint sched:sched_process_exit has no field prio",
        "three": "tracepoint tcp:tcp_retransmit_skb has no field err"})
    # Required features: one lost stops the observer; a choice is met by any one of its features.
    stopped = kernel_fit(attrs.evolve(spec, required_features=("one", "two")), None)
    assert stopped.missing == ("two is required and tracepoint sched:sched_process_exit has no field prio",)
    chosen = kernel_fit(attrs.evolve(spec, required_features=(("two", "one"),)), None)
    assert chosen.missing == ()
    assert "two" not in chosen.disabled and "three" in chosen.disabled
    neither = kernel_fit(attrs.evolve(spec, required_features=(("two", "three"),)), None)
    assert len(neither.missing) == 2


def test_tracepoint_has_field_reads_this_kernels_format():
    assert tracepoint_has_field("sched:sched_process_exit", "comm")
    assert tracepoint_has_field("sock:inet_sock_set_state", "saddr_v6")  # an array field
    assert not tracepoint_has_field("sched:sched_process_exit", "no_such_field")
    assert not tracepoint_has_field("nosuch:event", "comm")


def scrape(url: str) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_metrics_are_the_agents_own_counts_and_the_probes_say_when_it_is_ready_and_alive(toy_source):
    import time

    from prometheus_client.parser import text_string_to_metric_families

    from tapio_core.metrics import MetricsServer

    sink, toy = Collect(), ToyObserver("toy", toy_source)
    loaded = load_plugins(allow=set(), extra=[("toy", toy), ("collect", sink)])
    pipeline = Pipeline.build(loaded, ["collect"], SinkOptions(data_dir=Path(".")), {"toy": {"value": 42}},
                              KernelClock())
    agent = Agent(loaded, pipeline, recorder=None)
    server = MetricsServer(agent, ("127.0.0.1", 0))
    url = f"http://127.0.0.1:{server.address[1]}"
    try:
        assert scrape(url + "/readyz") == (503, "observers are being compiled and attached\n")
        agent.load(ebpf_dir=None)
        agent.housekeeping()
        assert scrape(url + "/readyz") == (200, "ready\n") and scrape(url + "/healthz")[0] == 200
        for _ in range(3):
            os.getppid()
        agent.drain("toy")
        agent.housekeeping()
        status, text = scrape(url + "/metrics")
        assert status == 200
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in text_string_to_metric_families(text) for s in family.samples}
        observer = agent.pipeline.observers["toy"]
        assert observer.records == 3
        assert samples[("tapio_observer_records_total", (("observer", "toy"),))] == observer.records
        assert samples[("tapio_observer_anomalies_total", (("observer", "toy"), ("type", "kernel.toy.seen")))] == 3
        assert samples[("tapio_observer_up", (("observer", "toy"), ("status", "running")))] == 1
        assert samples[("tapio_observer_counts_total", (("count", "seen_in_kernel"), ("observer", "toy")))] == 3
        assert samples[("tapio_sink_delivered_total", (("sink", "collect"),))] == len(sink.received) == 3
        assert samples[("tapio_drain_seconds_count", ())] == 1
        agent.last_housekeeping = time.monotonic() - 60  # as if the loop had hung for a minute
        assert scrape(url + "/healthz") == (503, "the agent's loop is stuck\n")
        assert scrape(url + "/nothing")[0] == 404
    finally:
        server.close()
        agent.shutdown()


@pytest.mark.parametrize("text", ["", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:70000", "example.com:9464", ":0", "x:"])
def test_a_metrics_address_that_is_not_host_port_is_one_clear_error(text):
    from tapio_core.config import ConfigError
    from tapio_core.metrics import parse_address

    with pytest.raises(ConfigError, match="--metrics-addr"):
        parse_address(text)
    assert parse_address("[::1]:9464") == ("::1", 9464) and parse_address("0.0.0.0:1") == ("0.0.0.0", 1)
    # A port alone binds loopback: all interfaces only when asked for.
    assert parse_address("9464") == parse_address(":9464") == ("127.0.0.1", 9464)
