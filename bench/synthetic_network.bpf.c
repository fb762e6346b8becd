/* Benchmark producer: a burst of synthetic network records per getppid(2) call.
 *
 * Not a program of its own: bench_ingest.py appends it to the network observer's
 * program text (tapio_core.bpf.program_text), so `struct network_record`, the
 * `events` ring buffer and tapio_submit() are the observer's real ones and the
 * records land exactly where the agent would read them.
 *
 * Only the benchmark's own process triggers it (slot BENCH_TGID). Every
 * BENCH_ANOMALY_EVERY-th record is a failed connect, alternately refused and
 * timed out; the others are kind 0, which the detector ignores.
 */

#ifndef BENCH_BURST
#define BENCH_BURST 64
#endif

#define BENCH_TGID          0
#define BENCH_ANOMALY_EVERY 1  /* 0 stops the producer */
#define BENCH_SEQ           2  /* records produced so far */
#define BENCH_AF_INET6      10

BPF_ARRAY(bench_config, u64, 3);

static __always_inline u64 bench_get(int slot)
{
    u64 *value = bench_config.lookup(&slot);
    return value ? *value : 0;
}

static __always_inline u16 bench_dst_port(u64 seq)
{
    switch (seq % 5) {
    case 0: return 443;
    case 1: return 80;
    case 2: return 5432;
    case 3: return 6379;
    default: return 8080;
    }
}

/* 10.0.a.b / 10.96.a.b, or fd00::a:b / fd00:96::a:b; all 16 bytes set, the record is reused. */
static __always_inline void bench_addr(u8 *addr, u16 family, u8 net, u64 host)
{
    __builtin_memset(addr, 0, 16);
    if (family == BENCH_AF_INET6) {
        addr[0] = 0xfd;
        addr[3] = net;
        addr[14] = (host >> 8) & 0xff;
        addr[15] = (host & 0xff) | 1;
    } else {
        addr[0] = 10;
        addr[1] = net;
        addr[2] = (host >> 8) & 0xff;
        addr[3] = (host & 0xff) | 1;
    }
}

TRACEPOINT_PROBE(syscalls, sys_enter_getppid)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (tgid != bench_get(BENCH_TGID))
        return 0;
    u64 every = bench_get(BENCH_ANOMALY_EVERY);
    if (every == 0)
        return 0;
    int slot = BENCH_SEQ;
    u64 *counter = bench_config.lookup(&slot);
    if (!counter)
        return 0;
    u64 first = __sync_fetch_and_add(counter, BENCH_BURST);

    struct network_record rec = {};
    tapio_current_task(&rec.task);
    u64 now = bpf_ktime_get_ns();
#pragma unroll
    for (int i = 0; i < BENCH_BURST; i++) {
        u64 seq = first + i;
        u64 mix = seq * 0x9E3779B97F4A7C15ULL;  /* varies fields even when `every` aligns seq */
        u64 nth = seq / every;  /* which failed connect, among the anomalous ones */
        int anomalous = seq % every == 0;
        int refused = !(nth & 1);
        u64 duration = refused ? 150000 + (mix >> 40) % 97 * 10000           /* RST after 0.15-1.1 ms */
                               : (1000000000ULL << (nth % 6)) - 1;     /* SYN retries: 1-32 s */

        rec.timestamp_ns = now + i;
        rec.syn_sent_ns = rec.timestamp_ns > duration ? rec.timestamp_ns - duration : 0;
        rec.sock_cookie = refused ? 0x100000 + seq : (nth & 2 ? 0x200000 + seq : 0);
        rec.task.pid = 1000 + (mix >> 20) % 30000;
        rec.task.tid = rec.task.pid + (mix >> 60);
        rec.kind = !anomalous ? 0 : refused ? KIND_CONNECT_REFUSED : KIND_CONNECT_TIMEOUT;
        rec.family = nth % 8 == 7 ? BENCH_AF_INET6 : FAMILY_INET;
        rec.protocol = PROTO_TCP;
        rec.src_port = 32768 + (mix >> 8) % 28232;
        rec.dst_port = bench_dst_port(mix >> 33);
        rec.old_state = TCP_SYN_SENT;
        rec.new_state = TCP_CLOSE;
        rec.syn_retransmits = refused ? 0 : 1 + nth % 6;
        rec.in_task_context = refused;
        bench_addr(rec.src_addr, rec.family, 0, mix >> 48);
        bench_addr(rec.dst_addr, rec.family, 96, nth * 37);
        tapio_submit(&rec, sizeof(rec));
    }
    return 0;
}
