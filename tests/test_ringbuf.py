"""Tests of tapio_core.ringbuf.RingBufferReader.

Two kinds: a fake ring in a memfd with the kernel's layout (runs anywhere, and can hold
states a real producer only shows by chance, like a BUSY record followed by committed
ones), and ``kernel`` tests against real BPF ring buffers fed from a tracepoint on
getppid(2), filtered on the tgids the test allows.
"""

from __future__ import annotations

import ctypes as ct
import mmap
import os
import select
import struct
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tapio_core.ringbuf import BUSY_BIT, DISCARD_BIT, RingBufferReader

PAGE = mmap.PAGESIZE

# ---------------------------------------------------------------------------------------------
# Fake ring: same file layout as the kernel's (consumer page, producer page, data twice).


class FakeRing:
    """A producer writing the kernel's record format into a memfd the reader maps."""

    def __init__(self, data_size: int = PAGE) -> None:
        self.size = data_size
        self.fd = os.memfd_create("fake-ringbuf")
        os.ftruncate(self.fd, 2 * PAGE + 2 * data_size)
        self.mm = mmap.mmap(self.fd, 2 * PAGE + 2 * data_size)
        self.prod = 0

    def _write(self, pos: int, data: bytes) -> None:
        # Byte k of the data area appears at k and at k + size, as with the kernel's double map.
        for i, b in enumerate(data):
            k = (pos + i) % self.size
            self.mm[2 * PAGE + k] = b
            self.mm[2 * PAGE + self.size + k] = b

    def put(self, payload: bytes, *, busy: bool = False, discard: bool = False) -> int:
        pos = self.prod
        hdr = len(payload) | (BUSY_BIT if busy else 0) | (DISCARD_BIT if discard else 0)
        rec = struct.pack("=II", hdr, 0) + payload
        rec += b"\0" * (-len(rec) % 8)
        assert self.prod + len(rec) - self.consumer <= self.size, "fake ring overflow"
        self._write(pos, rec)
        self.prod += len(rec)
        struct.pack_into("=Q", self.mm, PAGE, self.prod)
        return pos

    def commit(self, pos: int) -> None:
        hdr = struct.unpack_from("=I", self.mm, 2 * PAGE + pos % self.size)[0]
        self._write(pos, struct.pack("=I", hdr & ~BUSY_BIT))

    @property
    def consumer(self) -> int:
        return struct.unpack_from("=Q", self.mm, 0)[0]

    def reader(self, record_size: int) -> RingBufferReader:
        return RingBufferReader(self.fd, self.size, record_size)

    def close(self) -> None:
        self.mm.close()
        os.close(self.fd)


@pytest.fixture
def fake() -> Iterator[FakeRing]:
    ring = FakeRing()
    yield ring
    ring.close()


def rec(i: int, size: int = 16) -> bytes:
    return bytes((i + k) & 0xFF for k in range(size))


def test_fake_batch_order_and_consumer_position(fake: FakeRing) -> None:
    with fake.reader(16) as r:
        assert not r.pending() and r.read_batch() == b""
        for i in range(10):
            fake.put(rec(i))
        assert r.pending()
        assert r.read_batch() == b"".join(rec(i) for i in range(10))
        assert fake.consumer == fake.prod == 10 * 24
        assert not r.pending() and r.read_batch() == b""


def test_fake_stops_at_first_busy_record(fake: FakeRing) -> None:
    with fake.reader(16) as r:
        fake.put(rec(0))
        busy = fake.put(rec(1), busy=True)
        fake.put(rec(2))  # committed, but behind a busy one
        assert r.read_batch() == rec(0)
        assert fake.consumer == busy
        assert not r.pending() and r.read_batch() == b""
        fake.commit(busy)
        assert r.pending()
        assert r.read_batch() == rec(1) + rec(2)
        assert fake.consumer == fake.prod


def test_fake_discarded_and_malformed_are_consumed_and_counted(fake: FakeRing) -> None:
    with fake.reader(16) as r:
        fake.put(rec(0))
        fake.put(rec(1), discard=True)
        fake.put(rec(2, 40))  # another length
        fake.put(rec(3))
        fake.put(rec(4, 40), discard=True)
        fake.put(rec(5))
        fake.put(rec(6, 4))  # tail shorter than one of our records
        assert r.read_batch() == rec(0) + rec(3) + rec(5)
        assert (r.discarded, r.malformed) == (2, 2)
        assert fake.consumer == fake.prod


def test_fake_max_records_counts_returned_records(fake: FakeRing) -> None:
    with fake.reader(16) as r:
        for i in range(12):
            fake.put(rec(i), discard=i % 3 == 0)
        assert r.read_batch(0) == b""
        assert r.read_batch(3) == rec(1) + rec(2) + rec(4)
        assert r.read_batch(1) == rec(5)
        assert r.read_batch() == b"".join(rec(i) for i in (7, 8, 10, 11))
        assert r.discarded == 4


def test_fake_wrap_around(fake: FakeRing) -> None:
    seen: list[bytes] = []
    want: list[bytes] = []
    with fake.reader(40) as r:
        n = 0
        for rnd in range(200):
            for _ in range(1 + rnd % 40):  # up to 40 * 48 bytes: less than 2 rings, drained each round
                if fake.prod + 48 - fake.consumer > fake.size:
                    break
                if n % 7 == 3:
                    fake.put(rec(n, 24))  # malformed, also wraps
                else:
                    fake.put(rec(n, 40))
                    want.append(rec(n, 40))
                n += 1
            data = r.read_batch()
            seen.extend(data[i : i + 40] for i in range(0, len(data), 40))
        assert fake.prod > 10 * fake.size
        assert seen == want
        assert r.malformed == n - len(want)


def test_bad_arguments_and_close() -> None:
    ring = FakeRing()
    try:
        with pytest.raises(ValueError):
            RingBufferReader(ring.fd, 3 * PAGE, 16)
        with pytest.raises(ValueError):
            RingBufferReader(ring.fd, PAGE, PAGE)
        r = ring.reader(16)
        assert r.fileno() == ring.fd
        r.close()
        r.close()
        with pytest.raises(ValueError):
            r.read_batch()
    finally:
        ring.close()


# ---------------------------------------------------------------------------------------------
# Real BPF ring buffers.

PAYLOAD = 24
REC = np.dtype(
    [
        ("seq", "<u8"),
        ("cpu", "<u4"),
        ("pid", "<u4"),
        ("tid", "<u4"),
        ("pad", "<u4"),
        ("payload", "u1", PAYLOAD),
    ]
)
REC_SIZE = REC.itemsize  # 48

# config: 0 ring mask (1 events, 2 tiny, 4 events2); 1 discard every Nth on events; 2 a short
# record every Nth on events; 3 if set, 16 helper calls between reserve and submit on events.
# stats: 0 seq; 1/2/3 output failures on events/tiny/events2; 4 discards done; 5 short records.
BPF_TEXT = r"""
struct rec_t { u64 seq; u32 cpu; u32 pid; u32 tid; u32 pad; u8 payload[@PAYLOAD@]; };
struct short_t { u64 seq; u64 a; u64 b; };

BPF_RINGBUF_OUTPUT(events, 16);
BPF_RINGBUF_OUTPUT(tiny, 1);
BPF_RINGBUF_OUTPUT(events2, 16);
BPF_HASH(tgids, u32, u8, 16);
BPF_ARRAY(config, u64, 4);
BPF_ARRAY(stats, u64, 8);
#ifndef HAVE_ATOMICS
BPF_HASH(seq_lock, u64, u8, 64);  /* one key; spare entries for each CPU's free list */
#endif

static __always_inline void bump(int idx) {
    u64 *v = stats.lookup(&idx);
    if (v)
        __sync_fetch_and_add(v, 1);
}

static __always_inline void fill(struct rec_t *r, u64 seq, u64 id) {
    r->seq = seq;
    r->cpu = bpf_get_smp_processor_id();
    r->pid = id >> 32;
    r->tid = (u32)id;
    r->pad = 0;
#pragma unroll
    for (int i = 0; i < @PAYLOAD@; i++)
        r->payload[i] = (seq + i) & 0xff;
}

static __always_inline u64 cfg(int idx) {
    u64 *v = config.lookup(&idx);
    return v ? *v : 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_getppid) {
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    if (!tgids.lookup(&tgid))
        return 0;
    int zero = 0;
    u64 *counter = stats.lookup(&zero);
    if (!counter)
        return 0;
#ifdef HAVE_ATOMICS
    u64 seq = __sync_fetch_and_add(counter, 1);
#else
    /* Before 5.12 the verifier takes no atomic whose result is used: the sequence is taken under a
     * map-insert lock (as the prelude's tapio_cas does), retried while another CPU holds it. */
    u64 key = 0, seq = 0;
    u8 one = 1;
    int locked = 0;
    for (int i = 0; i < 4096 && !locked; i++)  /* a bounded loop: 5.3+ */
        locked = seq_lock.insert(&key, &one) == 0;
    if (!locked)
        return 0;  /* never seen here: two CPUs hold it for a few instructions */
    seq = *counter;
    *counter = seq + 1;
    seq_lock.delete(&key);
#endif
    u64 mask = cfg(0), dper = cfg(1), sper = cfg(2);
    struct rec_t r = {};
    fill(&r, seq, id);
    if (mask & 1) {
        if (dper && seq % dper == 0) {
            struct rec_t *p = events.ringbuf_reserve(sizeof(struct rec_t));
            if (p) {
                fill(p, seq, id);
                events.ringbuf_discard(p, 0);
                bump(4);
            } else {
                bump(1);
            }
        } else if (sper && seq % sper == sper - 1) {
            struct short_t s = {seq, 1, 2};
            if (events.ringbuf_output(&s, sizeof(s), 0))
                bump(1);
            else
                bump(5);
        } else {
            struct rec_t *p = events.ringbuf_reserve(sizeof(struct rec_t));
            if (p) {
                fill(p, seq, id);
                u32 junk = 0;
                if (cfg(3)) {  // widen the reserved-but-busy window
#pragma unroll
                    for (int i = 0; i < 16; i++)
                        junk ^= bpf_get_prandom_u32();
                }
                p->pad = junk & 0;
                events.ringbuf_submit(p, 0);
            } else {
                bump(1);
            }
        }
    }
    if ((mask & 2) && tiny.ringbuf_output(&r, sizeof(r), 0))
        bump(2);
    if ((mask & 4) && events2.ringbuf_output(&r, sizeof(r), 0))
        bump(3);
    return 0;
}
""".replace("@PAYLOAD@", str(PAYLOAD))


class Prog:
    """The loaded program plus knobs; each test starts with empty rings and zeroed stats."""

    def __init__(self) -> None:
        from bcc import BPF

        from tapio_core.bpf import bpf_atomics

        self.bpf = BPF(text=BPF_TEXT.encode(), cflags=["-DHAVE_ATOMICS=1"] if bpf_atomics() else [])

    def set(self, idx: int, value: int, table: str = "config") -> None:
        self.bpf[table.encode()][ct.c_int(idx)] = ct.c_uint64(value)

    def stat(self, idx: int) -> int:
        return int(self.bpf[b"stats"][ct.c_int(idx)].value)

    def allow(self, *tgids: int) -> None:
        t = self.bpf[b"tgids"]
        t.clear()
        for tgid in tgids:
            t[ct.c_uint32(tgid)] = ct.c_uint8(1)

    def reader(self, name: str = "events") -> RingBufferReader:
        table = self.bpf[name.encode()]
        return RingBufferReader(table.map_fd, table.max_entries, REC_SIZE)

    def reset(self, mask: int, discard_every: int = 0, short_every: int = 0, spin: int = 0) -> None:
        self.allow()
        for name in ("events", "tiny", "events2"):
            with self.reader(name) as r:
                while r.read_batch():
                    pass
        for i in range(8):
            self.set(i, 0, "stats")
        self.set(0, mask)
        self.set(1, discard_every)
        self.set(2, short_every)
        self.set(3, spin)
        self.allow(os.getpid())


@pytest.fixture(scope="module")
def bpf_prog() -> Iterator[Prog]:
    prog = Prog()
    yield prog
    prog.bpf.cleanup()


@pytest.fixture
def prog(bpf_prog: Prog) -> Prog:
    bpf_prog.reset(mask=1)
    return bpf_prog


def records(data: bytes) -> np.ndarray:
    assert len(data) % REC_SIZE == 0
    return np.frombuffer(data, dtype=REC)


def check_contents(recs: np.ndarray, pids: set[int]) -> None:
    assert set(np.unique(recs["pid"]).tolist()) <= pids
    assert (recs["cpu"] < os.cpu_count()).all() and (recs["pad"] == 0).all()
    want = (recs["seq"][:, None] + np.arange(PAYLOAD, dtype=np.uint64)) & 0xFF
    assert (recs["payload"] == want).all()


@pytest.mark.kernel
def test_batch_contents_and_order(prog: Prog) -> None:
    with prog.reader() as r:
        assert not r.pending() and r.read_batch() == b""
        for _ in range(100):
            os.getppid()
        assert r.pending()
        recs = records(r.read_batch())
        assert recs["seq"].tolist() == list(range(100))
        assert (recs["pid"] == os.getpid()).all()
        assert (recs["tid"] == threading.get_native_id()).all()
        check_contents(recs, {os.getpid()})
        assert not r.pending() and r.read_batch() == b""
        assert (r.malformed, r.discarded, prog.stat(1)) == (0, 0, 0)


@pytest.mark.kernel
def test_max_records(prog: Prog) -> None:
    with prog.reader() as r:
        for _ in range(50):
            os.getppid()
        assert r.read_batch(0) == b""
        first = records(r.read_batch(7))
        second = records(r.read_batch(1))
        rest = records(r.read_batch())
        assert first["seq"].tolist() == list(range(7))
        assert second["seq"].tolist() == [7]
        assert rest["seq"].tolist() == list(range(8, 50))


@pytest.mark.kernel
def test_wrap_around_small_ring(prog: Prog) -> None:
    prog.reset(mask=2)
    seen: list[np.ndarray] = []
    with prog.reader("tiny") as r:
        calls = 0
        for rnd in range(400):  # 1..73 records per round; 73 of 56 bytes fill the 4 KiB ring
            for _ in range(1 + rnd * 7 % 73):
                os.getppid()
                calls += 1
            seen.append(records(r.read_batch()))
        for _ in range(200):  # overfill once: the kernel reports what it dropped
            os.getppid()
            calls += 1
        seen.append(records(r.read_batch()))
    recs = np.concatenate(seen)
    lost = prog.stat(2)
    assert calls * 56 > 50 * PAGE
    assert 0 < lost < 200 and len(recs) + lost == calls
    assert recs["seq"].tolist() == list(range(len(recs)))  # only the tail of the overfill is lost
    check_contents(recs, {os.getpid()})


@pytest.mark.kernel
def test_discarded_records(prog: Prog) -> None:
    prog.reset(mask=1, discard_every=3)
    with prog.reader() as r:
        for _ in range(90):
            os.getppid()
        recs = records(r.read_batch())
        assert recs["seq"].tolist() == [s for s in range(90) if s % 3]
        assert r.discarded == prog.stat(4) == 30
        check_contents(recs, {os.getpid()})


@pytest.mark.kernel
def test_records_of_another_length(prog: Prog) -> None:
    prog.reset(mask=1, short_every=5)
    with prog.reader() as r:
        for _ in range(100):  # the last record (seq 99) is a short one, at the tail
            os.getppid()
        recs = records(r.read_batch())
        assert recs["seq"].tolist() == [s for s in range(100) if s % 5 != 4]
        assert r.malformed == prog.stat(5) == 20
        check_contents(recs, {os.getpid()})


def _produce(go_fd: int, cpu: int, n: int, burst: int) -> None:
    """Child: pinned to cpu, wait for the start signal, then n getppid() calls in short bursts."""
    os.sched_setaffinity(0, {cpu})
    os.read(go_fd, 1)
    for i in range(n):
        os.getppid()
        if i % burst == burst - 1:
            time.sleep(0.0002)  # leave the reader some CPU on a 2-core machine


@pytest.mark.kernel
def test_concurrent_producers_every_record_once(prog: Prog) -> None:
    prog.reset(mask=1, spin=1)  # records stay BUSY a little longer, so the reader meets some
    n, burst = 200_000, 100
    cpus = sorted(os.sched_getaffinity(0))[:2]  # one producer per CPU (the scheduler may not spread them)
    go_r, go_w = os.pipe()
    children = []
    for k in range(2):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            try:
                _produce(go_r, cpus[k % len(cpus)], n, burst)
            finally:
                os._exit(0)
        children.append(pid)
    os.close(go_r)
    prog.allow(*children)
    chunks: list[bytes] = []
    with prog.reader() as r:
        os.write(go_w, b"xx")
        os.close(go_w)
        running = set(children)
        while running:
            r.wait(0.05)
            chunks.append(r.read_batch())
            for pid in list(running):
                if os.waitpid(pid, os.WNOHANG)[0]:
                    running.discard(pid)
        chunks.append(r.read_batch())  # everything the children caused is committed by now
    recs = records(b"".join(chunks))
    seq, lost = recs["seq"], prog.stat(1)
    info = f"{len(seq)} seen, {lost} lost, {r.malformed} malformed, {len(chunks)} batches"
    assert len(np.unique(seq)) == len(seq), info  # none twice
    assert len(seq) + lost == 2 * n == prog.stat(0), info  # none lost that the kernel did not report
    assert len(seq) > n // 5, info  # the reader kept up with a fair part of it, concurrently
    for pid in children:
        mine = seq[recs["pid"] == pid]
        assert (np.diff(mine.astype(np.int64)) > 0).all(), info  # one thread's records stay in order
    assert set(np.unique(recs["cpu"]).tolist()) == set(cpus), info
    check_contents(recs, set(children))


@pytest.mark.kernel
def test_same_records_as_bcc_consumer(prog: Prog) -> None:
    prog.reset(mask=1 | 4, discard_every=7, short_every=11)
    from_bcc: list[bytes] = []

    def collect(ctx: object, data: int, size: int) -> int:
        if size == REC_SIZE:
            from_bcc.append(ct.string_at(data, size))
        return 0

    prog.bpf[b"events2"].open_ring_buffer(collect)
    ours: list[bytes] = []
    with prog.reader() as r:
        for rnd in range(20):
            for _ in range(rnd * 50):
                os.getppid()
            ours.append(r.read_batch())
            prog.bpf.ring_buffer_consume()
    data = b"".join(ours)
    assert prog.stat(1) == prog.stat(3) == 0
    got = [data[i : i + REC_SIZE] for i in range(0, len(data), REC_SIZE)]
    # events2 gets every record; events drops the discarded and short ones' seqs.
    kept = [b for b in from_bcc if records(b)["seq"][0] % 7 and records(b)["seq"][0] % 11 != 10]
    assert len(got) > 5000 and got == kept


@pytest.mark.kernel
def test_epoll_wakeup_is_never_lost(prog: Prog) -> None:
    rounds = 2000
    go, stop = threading.Event(), threading.Event()

    def producer() -> None:
        for i in range(rounds):
            while not go.wait(0.1):
                if stop.is_set():
                    return
            go.clear()
            if i % 4 == 0:
                time.sleep(0.0002)  # the reader is surely asleep in epoll by now
            else:
                for _ in range(i % 64):  # vary the race with the reader going to sleep
                    pass
            os.getppid()

    with prog.reader() as r, ThreadPoolExecutor(1) as pool:
        done = pool.submit(producer)
        try:
            for i in range(rounds):
                go.set()
                assert r.wait(2.0), f"lost wakeup in round {i}"
                assert records(r.read_batch())["seq"].tolist() == [i]
        finally:
            stop.set()
        done.result(10)
        # And the fd itself, for callers with their own loop.
        assert select.select([r], [], [], 0)[0] == []
        os.getppid()
        assert select.select([r], [], [], 2.0)[0] == [r]
        assert len(r.read_batch()) == REC_SIZE
