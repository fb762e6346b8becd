"""What the container observer costs process exits: a fork/exit loop.

A compiled helper (built into a temp dir at bench time, so Python's own cost does
not hide the tracing cost) forks FORKS children that exit at once, reaping each
before the next, and prints the wall time and the CPU time (its own plus its
reaped children's, where ``sched_process_exit`` runs) that took. Three modes,
interleaved round by round with the order rotated:

- untraced: nothing on ``sched_process_exit``;
- empty: a program that returns at once on ``sched_process_exit`` (and one on
  the ``mark_victim`` raw tracepoint, which never fires here): the floor;
- container: the observer's program as the agent compiles it, configured by its
  own ``tapio_observer_started`` (default settings, but every non-zero exit reported and unlimited, so
  that the abnormal-exit figure measures a reported exit).

Slowdowns are CPU time, the median over rounds of each round's ratio to the same
round's untraced sample: on a shared 2-core VM wall time mostly measures the
neighbours. A fork/exit costs ~150 us and the programs ~0.1 us, so the slowdowns
are 1.00 within the noise (printed to stderr); the kernel's own BPF statistics
give the programs' run time per exit precisely, for successful exits (the hot
path: judged and dropped in BPF) and abnormal ones (a record built, with its
cgroup path, and sent). Goal (issue 4): the observer's slowdown within noise of
none and at most 1.5 x the empty program's.

Side by side with bcc's own ``exitsnoop`` (Debian's bpfcc-tools), running alone on the same loop:
its programs' time per exit, and the observer's over it (``*_vs_exitsnoop_by_program_time``, goal
< 1), for successful and abnormal exits.
"""

from __future__ import annotations

import statistics
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from common import BenchError, bpf_run_time_stats, median, note, program_stats, require_root, running_tool

FORKS = 1_000
ROUNDS = 30
#: Statistics passes per figure (median): an interrupt landing in a program run inflates its time.
STATS_PASSES = 5
#: Abnormal exits in the statistics pass: their records must fit the observer's ring (256 KiB).
ABNORMAL_FORKS = 500
EXIT_TRACEPOINT = b"sched:sched_process_exit"
EXIT_PROGRAM = b"tracepoint__sched__sched_process_exit"

HELPER_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static long long ns(struct timespec t) { return t.tv_sec * 1000000000LL + t.tv_nsec; }
static long long children_cpu_ns(void)
{
    struct rusage usage;
    getrusage(RUSAGE_CHILDREN, &usage);
    return (usage.ru_utime.tv_sec + usage.ru_stime.tv_sec) * 1000000000LL
           + (usage.ru_utime.tv_usec + usage.ru_stime.tv_usec) * 1000LL;
}

/* usage: fork_exit FORKS CODE -> "WALL_NS CPU_NS" of FORKS fork+_exit(CODE)+waitpid; CPU time
 * is this process's plus its reaped children's (where sched_process_exit runs). */
int main(int argc, char **argv)
{
    if (argc != 3)
        return 2;
    long forks = atol(argv[1]);
    int code = atoi(argv[2]);
    struct timespec wall0, wall1, cpu0, cpu1;
    long long children0 = children_cpu_ns();
    clock_gettime(CLOCK_MONOTONIC, &wall0);
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &cpu0);
    for (long i = 0; i < forks; i++) {
        pid_t pid = fork();
        if (pid < 0) {
            perror("fork");
            return 1;
        }
        if (pid == 0)
            _exit(code);
        int status;
        if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status) != code) {
            fprintf(stderr, "child %d: unexpected status %#x\n", pid, status);
            return 1;
        }
    }
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &cpu1);
    clock_gettime(CLOCK_MONOTONIC, &wall1);
    printf("%lld %lld\n", ns(wall1) - ns(wall0), ns(cpu1) - ns(cpu0) + children_cpu_ns() - children0);
    return 0;
}
"""

EMPTY_PROGRAMS = """
TRACEPOINT_PROBE(sched, sched_process_exit) { return 0; }
RAW_TRACEPOINT_PROBE(mark_victim) { return 0; }
"""


def run_checked(*command: str) -> str:
    done = subprocess.run(list(command), capture_output=True, text=True)
    if done.returncode != 0:
        raise BenchError(f"{' '.join(command)} failed: {done.stderr.strip()}")
    return done.stdout.strip()


class ExitProgram:
    """A loaded bcc program whose sched_process_exit program is attached only while a mode is measured."""

    def __init__(self, bpf: Any) -> None:
        self.bpf = bpf
        self.detach()  # bcc attaches TRACEPOINT_PROBEs on load

    def attach(self) -> None:
        self.bpf.attach_tracepoint(tp=EXIT_TRACEPOINT, fn_name=EXIT_PROGRAM)

    def detach(self) -> None:
        self.bpf.detach_tracepoint(EXIT_TRACEPOINT)

    @property
    def fd(self) -> int:
        return self.bpf.funcs[EXIT_PROGRAM].fd


def load_container_observer() -> tuple[ExitProgram, Any]:
    """The observer's program as the agent builds it, configured by its own start hook."""
    import tapio_observer_container
    from tapio_core import RunningObserver
    from tapio_core.bpf import observer_build
    from tapio_core.bpf_objects import compile_in_process
    from tapio_core.btf import Btf
    from tapio_observer_container.settings import ContainerSettings

    spec = tapio_observer_container.OBSERVER
    build = observer_build(spec, None, Btf.load())
    if build.disabled:
        raise BenchError(f"container observer lacks BTF members here: {', '.join(build.disabled)}")
    program = compile_in_process(build.text, build.cflags)
    # Every non-zero exit reported, unlimited: the abnormal-exit figure is what a reported exit costs (by default
    # the loop's short-lived exits would only be counted, in the kernel).
    settings = ContainerSettings(min_runtime_s=0, record_rate_per_s=1e6, record_burst=1_000_000)
    observer = RunningObserver(spec=spec, config=settings, bpf=program)
    tapio_observer_container.tapio_observer_started(observer=observer)
    return ExitProgram(program.bcc), observer


def run() -> dict[str, float]:
    require_root("bench_container")
    try:
        from bcc import BPF
    except ImportError:
        raise BenchError("bcc's Python module is missing: run `make setup`") from None
    with tempfile.TemporaryDirectory(prefix="tapio-bench-container-") as scratch:
        helper = Path(scratch) / "fork_exit"
        source = helper.with_suffix(".c")
        source.write_text(HELPER_C)
        run_checked("gcc", "-O2", "-o", str(helper), str(source))
        empty = ExitProgram(BPF(text=EMPTY_PROGRAMS.encode()))
        try:
            container, observer = load_container_observer()
            try:
                modes = {"empty": empty, "container": container}
                samples = measure(str(helper), modes)
                bpf_ns = {name: median(bpf_ns_per_exit(str(helper), program, FORKS, 0) for _ in range(STATS_PASSES))
                          for name, program in modes.items()}
                abnormal_ns = median(abnormal_exit_ns(str(helper), container, observer) for _ in range(STATS_PASSES))
                tool_ns = exitsnoop_ns_per_exit(str(helper))
            finally:
                observer.bpf.close()
        finally:
            empty.bpf.cleanup()
    return {**figures(samples, bpf_ns, abnormal_ns), **versus_exitsnoop(tool_ns, bpf_ns["container"], abnormal_ns)}


def fork_exits(helper: str, forks: int = FORKS, code: int = 0) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the helper and its children) of ``forks`` fork/exits."""
    wall_ns, cpu_ns = run_checked(helper, str(forks), str(code)).split()
    return int(wall_ns) / 1e9, int(cpu_ns) / 1e9


def measure(helper: str, modes: dict[str, ExitProgram]) -> dict[str, list[tuple[float, float]]]:
    """(wall, CPU) seconds per sample of FORKS fork/exits, per mode."""
    fork_exits(helper)  # warm-up: page cache, CPU frequency
    samples: dict[str, list[tuple[float, float]]] = {"untraced": [], **{name: [] for name in modes}}
    names = list(samples)
    for round_no in range(ROUNDS):
        shift = round_no % len(names)
        for name in names[shift:] + names[:shift]:
            program = modes.get(name)
            if program is not None:
                program.attach()
            try:
                samples[name].append(fork_exits(helper))
            finally:
                if program is not None:
                    program.detach()
    note("bench_container: median per fork/exit, wall / CPU: " + ", ".join(
        f"{name} {median(w for w, _ in s) / FORKS * 1e6:.1f} / {median(c for _, c in s) / FORKS * 1e6:.1f} us"
        for name, s in samples.items()))
    return samples


def bpf_ns_per_exit(helper: str, program: ExitProgram, forks: int, code: int) -> float:
    """Run time of the exit program per run, from the kernel's BPF statistics.

    Statistics count only while the fd ``bpf_enable_stats`` returns is open, and cost a
    clock read per run themselves, so this pass is apart from the timed rounds.
    """
    with bpf_run_time_stats():
        program.attach()
        try:
            run_ns, runs = program_stats(program.fd)
            fork_exits(helper, forks, code)
            run_ns_after, runs_after = program_stats(program.fd)
        finally:
            program.detach()
    if runs_after - runs < forks:
        raise BenchError(f"sched_process_exit ran {runs_after - runs} times for {forks} exits")
    return (run_ns_after - run_ns) / (runs_after - runs)


def abnormal_exit_ns(helper: str, container: ExitProgram, observer: Any) -> float:
    """Per-exit run time when every child exits with code 1: each becomes a record, checked to arrive."""
    from tapio_core.ringbuf import RingBufferReader

    record = observer.spec.record_dtype
    ring = observer.bpf["events"]
    reader = RingBufferReader(ring.fd, ring.max_entries, record.itemsize)
    try:
        reader.read_batch()  # whatever the node's own processes left there
        ns = bpf_ns_per_exit(helper, container, ABNORMAL_FORKS, 1)
        import numpy as np

        events = np.frombuffer(reader.read_batch(), record)
    finally:
        reader.close()
    ours = int(((events["exit_status"] == 1 << 8) & (events["task"]["comm"] == b"fork_exit")).sum())
    if ours < ABNORMAL_FORKS:
        raise BenchError(f"{ours} of {ABNORMAL_FORKS} abnormal exits reached the ring buffer")
    return ns



def exitsnoop_ns_per_exit(helper: str) -> dict[int, float]:
    """bcc's exitsnoop (every exit, sent to userspace) on the same loop: its programs' run time per exit,
    for exits with code 0 and code 1."""
    ns = {}
    with running_tool("exitsnoop") as tool:
        for code, forks in ((0, FORKS), (1, ABNORMAL_FORKS)):
            passes = []
            for _ in range(STATS_PASSES):
                with bpf_run_time_stats():
                    before, runs_before = tool.run_time()
                    fork_exits(helper, forks, code)
                    after, runs_after = tool.run_time()
                if runs_after - runs_before < forks:
                    raise BenchError(f"exitsnoop's programs ran {runs_after - runs_before} times for {forks} exits")
                passes.append((after - before) / forks)
            ns[code] = median(passes)
    return ns


def versus_exitsnoop(tool_ns: dict[int, float], observer_ns: float, observer_abnormal_ns: float) -> dict[str, float]:
    """The observer's program time per exit over exitsnoop's (goal < 1): what each adds to an exit."""
    return {
        "container_exitsnoop_bpf_ns_per_exit": tool_ns[0],
        "container_exitsnoop_bpf_ns_per_abnormal_exit": tool_ns[1],
        "container_observer_vs_exitsnoop_by_program_time": observer_ns / tool_ns[0],
        "container_observer_vs_exitsnoop_abnormal_by_program_time": observer_abnormal_ns / tool_ns[1],
    }


def figures(samples: dict[str, list[tuple[float, float]]], bpf_ns: dict[str, float],
            abnormal_ns: float) -> dict[str, float]:
    """Slowdowns from CPU time (what tracing adds; other work on the node shows far less in it than in
    wall time), each the median over rounds of that round's ratio to its untraced sample."""
    cpu = {mode: [c for _, c in values] for mode, values in samples.items()}

    def slowdown(mode: str) -> float:
        return statistics.median(t / base for t, base in zip(cpu[mode], cpu["untraced"], strict=True))

    quartiles = statistics.quantiles([t / median(cpu["untraced"]) for t in cpu["untraced"]], n=4)
    note(f"bench_container: untraced CPU time per round, interquartile {quartiles[0]:.3f}..{quartiles[2]:.3f} "
         "of its median (the noise)")
    return {
        "container_untraced_forks_per_s": FORKS / median(w for w, _ in samples["untraced"]),
        "container_empty_programs_slowdown": slowdown("empty"),
        "container_observer_slowdown": slowdown("container"),
        "container_observer_vs_empty_slowdown": slowdown("container") / slowdown("empty"),
        "container_empty_programs_bpf_ns_per_exit": bpf_ns["empty"],
        "container_observer_bpf_ns_per_exit": bpf_ns["container"],
        "container_observer_bpf_ns_per_abnormal_exit": abnormal_ns,
    }
