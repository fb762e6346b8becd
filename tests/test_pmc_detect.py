"""The pmc observer's record layout, settings and classification, from counter streams replayed.

Streams are cumulative per-CPU readings packed exactly as pmc.bpf.c packs
them (tests/pmc_helpers.py), plus one stream recorded by the real agent
(tests/pmc_recordings/). Every test goes through the same parse and detect
path the agent runs.
"""

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from kernel_helpers import TAPIO, tool_env
from pmc_helpers import ALL_COUNTERS, NO_STALLS, PMC_RECORD_C, SECOND, CounterStream, classify, pack_pmc_record

from tapio_core import RunningObserver
from tapio_core.config import ConfigError, build_settings
from tapio_observer_pmc import OBSERVER, tapio_detect_anomalies, tapio_observer_stopping
from tapio_observer_pmc.detect import CPU_STALL, IPC_DEGRADATION, MEMORY_PRESSURE, Detector, intervals
from tapio_observer_pmc.records import PMC_RECORD
from tapio_observer_pmc.settings import PmcSettings

RECORDINGS = Path(__file__).with_name("pmc_recordings")
BPF_SOURCE = Path(__file__).parents[1] / "plugins/pmc/tapio_observer_pmc/pmc.bpf.c"
HOUR = 3600


# -- layout ----------------------------------------------------------------------------------------


def test_numpy_layout_matches_the_c_struct():
    assert PMC_RECORD.itemsize == PMC_RECORD_C.size == 88
    source = BPF_SOURCE.read_text()
    # the C struct declares the same fields in the same order
    struct_body = source.split("struct pmc_record {", 1)[1].split("};", 1)[0]
    declared = [line.split()[1].split("[")[0].rstrip(";") for line in struct_body.splitlines()
                if line.strip().startswith("u")]
    assert declared == list(PMC_RECORD.names)


def test_a_record_packed_as_the_kernel_packs_it_parses_back():
    raw = pack_pmc_record(3, 123_456, (10, 20, 30), (40, 50, 60), (70, 80, 90), valid=0b101)
    [row] = np.frombuffer(raw, PMC_RECORD)
    assert (row["cpu"], row["timestamp_ns"], row["valid"]) == (3, 123_456, 0b101)
    assert row["counter"].tolist() == [10, 20, 30]
    assert row["enabled"].tolist() == [40, 50, 60]
    assert row["running"].tolist() == [70, 80, 90]


def test_intervals_are_deltas_between_consecutive_readings():
    stream = CounterStream(cpus=(0,)).run(2, ipc=2.0, stall_pct=10.0, cycles=1_000_000_000)
    found, unusable = intervals(stream.events())
    assert unusable == 0
    assert [(i.cycles, i.instructions, i.stall_cycles) for i in found] == [(1e9, 2e9, 1e8)] * 2
    assert [(i.ipc, i.stall_pct) for i in found] == [(2.0, 10.0)] * 2
    assert found[0].end_ns == found[1].start_ns


# -- the scenarios -------------------------------------------------------------------------


def test_short_stall_after_an_hour_of_healthy_history_fires():
    stream = CounterStream().run(HOUR, ipc=1.8, stall_pct=20.0)
    started = stream.now + 1000  # the last healthy reading of CPU 1 (1 µs after CPU 0's)
    stream.run(3, cpu1={"stall_pct": 85.0, "ipc": 0.9}).run(10)
    # Over cumulative totals the stall would be invisible: CPU 1 stalled 20.2 % of all its cycles.
    [last] = np.frombuffer(stream.records[-1], PMC_RECORD)
    assert last["cpu"] == 1 and 100 * last["counter"][2] / last["counter"][0] < 21
    [anomaly] = classify(stream.data(), batch=64)
    assert anomaly.type == CPU_STALL
    assert (anomaly.severity, anomaly.outcome) == ("critical", "failure")
    data = anomaly.data
    assert data["cpu"] == 1
    assert anomaly.timestamp_ns == data["start_ns"] == started
    assert data["duration_ns"] == 3 * SECOND
    assert (data["intervals"], data["worst_stall_pct"], data["stall_pct"], data["ended"]) == (3, 85.0, 85.0, True)
    assert data["cycles"] == 3 * 2_000_000_000
    assert data["stall_cycles"] == 3 * 1_700_000_000
    assert data["missing_counters"] == []


def test_short_ipc_drop_after_an_hour_fires_against_the_learned_baseline():
    stream = CounterStream().run(HOUR, ipc=1.8, stall_pct=10.0).run(4, cpu0={"ipc": 0.5}).run(5)
    [anomaly] = classify(stream.data(), batch=500)
    assert anomaly.type == IPC_DEGRADATION
    assert (anomaly.severity, anomaly.outcome) == ("warning", "failure")
    data = anomaly.data
    assert (data["cpu"], data["intervals"], data["worst_ipc"], data["ipc"]) == (0, 4, 0.5, 0.5)
    assert data["baseline_ipc"] == 1.8
    assert (data["ipc_threshold"], data["ipc_drop_pct"]) == (1.0, 50.0)
    assert data["duration_ns"] == 4 * SECOND


def test_an_episode_is_reported_once_when_it_ends_not_while_it_lasts():
    detector = Detector(PmcSettings(recovery_intervals=2))
    stream = CounterStream(cpus=(0,)).run(50)
    assert classify(stream.data(), detector=detector) == []
    seen = []
    for stall in [60, 70, 90, 65, 30, 80, 20, 20, 20, 20]:  # a healthy blip at 30 does not end it
        stream.records.clear()
        stream.run(1, stall_pct=stall)
        seen.append(len(classify(stream.data(), detector=detector)))
    # One record per call: the episode is reported on the second healthy interval after 80.
    assert seen == [0, 0, 0, 0, 0, 0, 0, 1, 0, 0]


def test_recovery_closes_the_episode_with_its_worst_value_and_a_new_one_can_start():
    stream = (CounterStream(cpus=(0,)).run(40)
              .run(2, stall_pct=60).run(3, stall_pct=30)
              .run(1, stall_pct=70).run(3))
    first, second = classify(stream.data())
    assert first.type == second.type == MEMORY_PRESSURE  # neither passed 75 %
    assert (first.data["intervals"], first.data["worst_stall_pct"]) == (2, 60.0)
    assert (second.data["intervals"], second.data["worst_stall_pct"]) == (1, 70.0)
    assert first.data["end_ns"] < second.data["start_ns"]
    assert first.severity == "warning"


def test_a_stall_that_escalates_is_one_cpu_stall_not_two_occurrences():
    stream = CounterStream(cpus=(0,)).run(40).run(2, stall_pct=55).run(2, stall_pct=90).run(2, stall_pct=55).run(3)
    [anomaly] = classify(stream.data())
    assert anomaly.type == CPU_STALL
    assert (anomaly.data["intervals"], anomaly.data["worst_stall_pct"]) == (6, 90.0)
    assert anomaly.data["stall_pct"] == pytest.approx((2 * 55 + 2 * 90 + 2 * 55) / 6, abs=0.001)


def test_missing_stall_counter_judges_ipc_only_and_says_so():
    stream = (CounterStream(valid=NO_STALLS).run(100, ipc=2.0, stall_pct=95.0)
              .run(3, cpu1={"ipc": 0.4}).run(5, stall_pct=95.0))
    [anomaly] = classify(stream.data())
    assert anomaly.type == IPC_DEGRADATION
    data = anomaly.data
    assert data["missing_counters"] == ["stall_cycles"]
    assert (data["stall_cycles"], data["stall_pct"]) == (None, None)
    assert (data["cpu"], data["worst_ipc"], data["baseline_ipc"]) == (1, 0.4, 2.0)


def test_missing_instructions_counter_judges_stalls_only():
    stream = CounterStream(valid=ALL_COUNTERS & ~0b010).run(100, ipc=0.1).run(2, cpu0={"stall_pct": 80}).run(3)
    [anomaly] = classify(stream.data())
    assert anomaly.type == CPU_STALL
    assert anomaly.data["missing_counters"] == ["instructions"]
    assert (anomaly.data["instructions"], anomaly.data["ipc"]) == (None, None)


# -- judgement details ---------------------------------------------------------------------------


def test_low_ipc_that_is_usual_for_this_cpu_is_not_a_degradation():
    # A memory-bound CPU whose IPC is always 0.6: below the threshold, never well below its own baseline.
    stream = CounterStream(cpus=(0,)).run(200, ipc=0.6, stall_pct=30).run(10, ipc=0.45, stall_pct=30).run(5, ipc=0.6)
    assert classify(stream.data()) == []


def test_ipc_is_not_judged_before_a_baseline_is_learnt():
    stream = CounterStream(cpus=(0,)).run(5, ipc=2.0).run(5, ipc=0.3).run(40, ipc=2.0)
    assert classify(stream.data(), baseline_intervals=30) == []
    assert [a.type for a in classify(stream.data(), baseline_intervals=5)] == [IPC_DEGRADATION]


def test_idle_intervals_are_not_judged_but_count_towards_recovery():
    stream = CounterStream(cpus=(0,)).run(40).run(5, stall_pct=90, ipc=0.1, cycles=50_000_000)  # 50k cycles/ms
    assert classify(stream.data()) == []
    stream.run(2, stall_pct=90).run(2, stall_pct=90, cycles=1000)
    [anomaly] = classify(stream.data())
    assert anomaly.data["intervals"] == 2


def test_baseline_is_not_learnt_from_degraded_intervals():
    # A long stall with low IPC must not drag the IPC baseline down.
    stream = CounterStream(cpus=(0,)).run(40, ipc=2.0).run(200, ipc=0.5, stall_pct=90).run(5, ipc=2.0, stall_pct=10)
    detector = Detector(PmcSettings())
    classify(stream.data(), detector=detector)
    assert detector.cpus[0].baseline.value == pytest.approx(2.0)


def test_multiplexed_counters_are_scaled_and_flagged():
    stream = CounterStream(cpus=(0,)).run(40).run(2, stall_pct=80, running_share=0.25).run(3)
    [anomaly] = classify(stream.data())
    assert anomaly.data["multiplexed"] is True
    assert anomaly.data["cycles"] == pytest.approx(2 * 2_000_000_000, rel=1e-6)  # scaled back up
    assert anomaly.data["worst_stall_pct"] == pytest.approx(80.0, abs=0.001)


def test_a_counter_that_goes_backwards_skips_that_interval_only():
    stream = CounterStream(cpus=(0,)).run(40)
    stream.totals[0] = [0, 0, 0]  # reopened: counting restarts
    stream.run(1).run(2, stall_pct=90).run(3)
    detector = Detector(PmcSettings())
    [anomaly] = classify(stream.data(), detector=detector)
    assert anomaly.data["intervals"] == 2
    assert detector.counts["unusable_intervals"] == 1


def test_cpus_are_judged_independently_and_batching_does_not_matter():
    stream = (CounterStream(cpus=(0, 1, 2)).run(60)
              .run(3, cpu0={"stall_pct": 60}, cpu2={"ipc": 0.3})
              .run(4, cpu1={"stall_pct": 95}).run(4))
    whole = classify(stream.data())
    assert sorted((a.data["cpu"], a.type) for a in whole) == [
        (0, MEMORY_PRESSURE), (1, CPU_STALL), (2, IPC_DEGRADATION)]
    for batch in (1, 2, 7, 50):
        assert [a.data for a in classify(stream.data(), batch=batch)] == [a.data for a in whole]
    # Records out of time order within a batch are put back in order.
    shuffled = b"".join(np.random.default_rng(1).permutation(np.array(stream.records, dtype=object)))
    assert [a.data for a in classify(shuffled)] == [a.data for a in whole]


def test_a_repeated_or_late_record_is_ignored():
    stream = CounterStream(cpus=(0,)).run(40).run(2, stall_pct=90).run(3)
    detector = Detector(PmcSettings())
    events = stream.events()
    first = detector.feed(events[:42])
    again = detector.feed(np.concatenate([events[40:41], events[42:]]))
    assert first == [] and [a.data["intervals"] for a in again] == [2]
    assert detector.counts["out_of_order_records"] == 1


def test_a_long_episode_is_reported_in_progress_every_max_episode_s():
    stream = CounterStream(cpus=(0,)).run(40).run(25, stall_pct=90).run(3)
    found = classify(stream.data(), max_episode_s=10)
    assert [(a.outcome, a.data["ended"], a.data["intervals"]) for a in found] == [
        ("in_progress", False, 10), ("in_progress", False, 10), ("failure", True, 5)]
    assert found[0].data["end_ns"] == found[1].data["start_ns"]


def test_a_cpu_that_goes_quiet_has_recovered():
    # The sampling timer does not fire on an idle CPU: CPU 1 stops reporting mid-episode.
    stream = CounterStream().run(40).run(2, cpu1={"stall_pct": 90}).run(4, cpus=(0,))
    [anomaly] = classify(stream.data())
    assert (anomaly.data["cpu"], anomaly.data["intervals"], anomaly.data["ended"]) == (1, 2, True)


def test_the_hook_keeps_state_across_batches_and_publishes_counts():
    observer = RunningObserver(spec=OBSERVER, config=PmcSettings())
    stream = CounterStream(cpus=(0,)).run(40).run(2, stall_pct=90).run(3)
    events = stream.events()
    assert tapio_detect_anomalies(observer, events[:42]) == []
    [anomaly] = tapio_detect_anomalies(observer, events[42:])
    assert anomaly.type == CPU_STALL
    assert observer.counters["intervals"] == 45
    assert observer.counters["episodes_open"] == 0


def test_episodes_open_at_stop_go_out_in_progress():
    observer = RunningObserver(spec=OBSERVER, config=PmcSettings())
    stream = CounterStream(cpus=(0, 1)).run(40).run(3, stall_pct=90)
    assert tapio_detect_anomalies(observer, stream.events()) == []
    assert observer.counters["episodes_open"] == 2
    stopping = tapio_observer_stopping(observer)
    assert sorted((a.type, a.outcome, a.data["cpu"], a.data["ended"]) for a in stopping) == [
        (CPU_STALL, "in_progress", 0, False), (CPU_STALL, "in_progress", 1, False)]
    assert tapio_observer_stopping(observer) == []  # handed over once


# -- settings --------------------------------------------------------------------------------------


def test_default_settings_and_overrides():
    assert build_settings(PmcSettings, "pmc", {}) == PmcSettings()
    settings = build_settings(PmcSettings, "pmc", {"pmc": {"interval_ms": 250, "skip_counters": ["stall_cycles"],
                                                           "stall_warning_pct": 40}})
    assert (settings.interval_ms, settings.skip_counters, settings.stall_warning_pct) == (250, ("stall_cycles",), 40.0)


@pytest.mark.parametrize(("table", "message"), [
    ({"stall_critical_pct": 40}, "config [pmc]: 'stall_critical_pct' must be above stall_warning_pct (50.0): 40"),
    ({"skip_counters": ["cycles"]}, "config [pmc]: 'skip_counters' must name only instructions, stall_cycles: cycles"),
    ({"counters": "bogus"}, "config [pmc]: 'counters' must be in"),
    ({"interval_ms": 5}, "config [pmc]: 'interval_ms' must be >= 10: 5"),
    ({"ipc_drop_pct": 100}, "config [pmc]: 'ipc_drop_pct' must be < 100.0: 100"),
    ({"treshold": 1}, "config [pmc]: unknown key treshold (known: "),
])
def test_bad_settings_are_one_line_naming_the_key(table, message):
    with pytest.raises(ConfigError) as caught:
        build_settings(PmcSettings, "pmc", {"pmc": table})
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)


# -- replay ----------------------------------------------------------------------------------------


def replay(recording: Path, tmp_path: Path, *settings: str) -> list[dict]:
    args = [str(TAPIO), "replay", str(recording), "--plugins", "pmc,stdout", "--sink", "stdout",
            "--data-dir", str(tmp_path)]
    for setting in settings:
        args += ["--set", setting]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60, env=tool_env(), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def test_tapio_replay_of_a_recorded_stream_gives_the_detector_verdict(tmp_path):
    stream = CounterStream().run(600).run(3, cpu1={"stall_pct": 85.0}).run(3)
    printed = replay(stream.write_recording(tmp_path / "stall.rec"), tmp_path)
    expected = classify(stream.data())
    assert [(o["type"], o["severity"], o["outcome"]) for o in printed] == [(CPU_STALL, "critical", "failure")]
    assert printed[0]["data"] == dict(expected[0].data, timestamp_ns=expected[0].timestamp_ns)
    # Replaying under other thresholds judges the same counters again.
    assert [o["type"] for o in replay(tmp_path / "stall.rec", tmp_path, "pmc.stall_critical_pct=90")] == [
        MEMORY_PRESSURE]


def test_replay_of_a_stream_recorded_by_the_agent_on_this_machine_kind(tmp_path):
    printed = replay(RECORDINGS / "software_page_fault_burst.rec", tmp_path,
                     "pmc.interval_ms=100", "pmc.stall_warning_pct=0.005", "pmc.stall_critical_pct=0.5")
    [occurrence] = printed
    assert occurrence["type"] == MEMORY_PRESSURE
    data = occurrence["data"]
    assert (data["cpu"], data["intervals"], data["stall_cycles"], data["ended"]) == (1, 8, 121_754, True)
    assert data["worst_stall_pct"] == 0.026
    assert data["duration_ns"] == 800_002_088
