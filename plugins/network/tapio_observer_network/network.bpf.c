/* Tapio network observer: TCP anomalies judged in the kernel, bounded records out.
 *
 * Per connection: a failed connect (refused, timed out) and an established
 * connection reset by the peer, one record each, rate-limited per kind and
 * destination (a token bucket in `record_limits`).
 * Aggregated: retransmits and received RSTs are counted per destination (and
 * RSTs node-wide) in sliding windows (`windows`); only the event that makes a
 * count cross its threshold becomes a record. Smoothed RTT is compared with a
 * baseline learned per destination host across connections (`rtts`).
 * Whatever is held back is counted per key and carried in that key's next
 * record (`suppressed`). Thresholds, windows and limits come from the
 * `network_settings` map, which the agent writes at start-up.
 *
 * Storms fold what they explain: while a destination's RST storm is open, its
 * refused connects and resets are counted into the storm, not sent. The storm
 * is one record when it starts and one when it ends, with its counts; the end
 * comes from `network_tick`, which the agent runs on a once-a-second clock (a
 * cpu-clock perf event): no later event may ever come to end it.
 *
 * Attribution: retransmits, resets and RTT samples are often reported from
 * softirq or timer context, where the current task is not the socket's owner.
 * `owners` remembers the owner of each socket from its own process context
 * (its connect; else a send or a read) until the socket closes; records take it from there.
 * Every connect pays for that, so it is a set-associative table indexed by a
 * hash of the socket's address rather than a hash map: finding a socket's
 * bucket is a few instructions with no helper call, its tags share one cache
 * line, and there is nothing to allocate or free. A bucket holds OWNER_WAYS
 * sockets; a new socket finding its bucket full takes a live one's place
 * (counted as untracked), as an LRU map would evict.
 *
 * Packet drops (Linux 5.17+, where kfree_skb says why): a drop whose reason the settings do not call
 * routine is one record per reason, namespace and destination, rate-limited like connection failures;
 * a dropped SYN or SYN-ACK is also remembered by its connection's addresses (`syn_drops`), so the
 * connect that then fails carries the reason. Listen-queue overflows: `listeners` holds the listening
 * sockets opened while the agent runs, and network_tick reads each one's drop count (sock.sk_drops,
 * which the kernel raises for every connection a listener drops) once a second.
 *
 * Atomics: counts are added with __sync_fetch_and_add whose result is unused, which every kernel's
 * verifier accepts; compare-and-swap and taking a count go through tapio_cas / tapio_take (the
 * prelude), which emulate them exactly where the verifier has no BPF atomics (before Linux 5.12).
 */
#include <tapio.h>  /* the agent puts events, tapio_lost and tapio_submit() before this */
#include <uapi/linux/bpf_perf_event.h>

#define TCP_ESTABLISHED 1
#define TCP_SYN_SENT    2
#define TCP_SYN_RECV    3
#define TCP_CLOSE       7
#define TCP_LISTEN      10
#define PROTO_TCP       6
#define PROTO_UDP       17
#define FAMILY_INET     2
#define FAMILY_INET6    10
#define TAPIO_ETH_P_IP   0x0800
#define TAPIO_ETH_P_IPV6 0x86DD
#define TCP_FLAG_SYN    0x02
#define TCP_FLAG_ACK    0x10

#define KIND_CONNECT_REFUSED  1
#define KIND_CONNECT_TIMEOUT  2
#define KIND_CONNECTION_RESET 3
#define KIND_RETRANSMIT_SPIKE 4
#define KIND_RTT_DEGRADATION  5
#define KIND_RST_STORM        6
#define KIND_CONNECT_FAILED   7  /* ended by another error: an ICMP host or network unreachable, ... */
#define KIND_RST_STORM_END    8  /* a destination's storm calmed down: what it folded */
#define KIND_PACKET_DROP      9
#define KIND_LISTEN_OVERFLOW  10

/* errno values (asm-generic, the same on every architecture Tapio runs on) */
#define TAPIO_ETIMEDOUT    110
#define TAPIO_ECONNREFUSED 111

#define SCOPE_DESTINATION 1
#define SCOPE_NODE        2

/* A window is this many slots; its count covers the current slot and the ones before it. */
#define WINDOW_SLOTS 8

/* Mirrors NETWORK_RECORD in tapio_observer_network/records.py. */
struct network_record {
    u64 timestamp_ns;
    u64 syn_sent_ns;
    u64 sock_cookie;
    struct tapio_task task;
    u32 kind;
    u16 family;
    u16 protocol;
    u16 src_port;
    u16 dst_port;
    u8 old_state;
    u8 new_state;
    u8 syn_retransmits;
    u8 in_task_context;
    u8 src_addr[16];
    u8 dst_addr[16];
    u32 count;             /* retransmits / RSTs in the window when it crossed */
    u32 failed;            /* of those retransmits, attempts the kernel reported failed */
    u32 suppressed;        /* events of this key held back since its previous record */
    u32 window_ms;
    u32 total_retrans;     /* tcp_sock.total_retrans: segments this socket retransmitted */
    u32 snd_cwnd;
    u32 srtt_us;
    u32 baseline_srtt_us;
    u32 samples;           /* RTT samples the baseline was learned from */
    u8 owner_known;        /* task is the socket's owner (else zero: never the current task) */
    u8 scope;              /* rst_storm: SCOPE_DESTINATION or SCOPE_NODE */
    u8 rst_received;       /* failed connect: the peer answered the SYN with RST */
    u8 failed_known;       /* retransmit_spike: this kernel tells failed attempts apart (failed counts) */
    u32 netns;             /* the socket's network namespace (inode number), 0 if unknown or node-wide */
    int sk_error;          /* failed connect: the socket's error (errno) as it closed, 0 none, -1 unknown */
    u32 refused;           /* rst_storm: refused connects to the destination folded into this record */
    u32 reset;             /* rst_storm: connection resets from the destination folded into this record */
    u64 started_ns;        /* rst_storm end: when the episode started */
    u32 episode_open;      /* rst_storm start: an end record will follow (the clock runs) */
    u32 drop_reason;       /* packet_drop, or a failed connect whose SYN was dropped: the kernel's reason */
    u64 drop_location;     /* ...and where the kernel freed the packet (a text address) */
    u32 backlog;           /* listen_overflow: the listener's accept-queue limit */
    u32 queue_len;         /* listen_overflow: connections waiting in its accept queue */
    u8 tcp_flags;          /* packet_drop: the dropped TCP segment's flags */
    u8 reserved[7];
};

/* Mirrors kernel_settings() in tapio_observer_network/settings.py. */
struct network_settings {
    u64 configured;
    u64 connection_cost_ns;     /* a record costs this much credit... */
    u64 connection_burst_ns;    /* ...of a bucket this big, refilled at 1 ns per ns */
    u64 retransmit_slot_ns;
    u64 retransmit_cooldown_ns;
    u64 rst_slot_ns;
    u64 rst_cooldown_ns;
    u64 rtt_learn_interval_ns;
    u64 rtt_cooldown_ns;
    u64 abandoned_min_ns;       /* a connect the application ends sooner, unanswered, is not reported */
    u32 retransmit_threshold;
    u32 retransmit_window_ms;
    u32 rst_threshold;
    u32 rst_node_threshold;
    u32 rst_window_ms;
    u32 rtt_factor_x16;
    u32 rtt_floor_us;
    u32 rtt_min_samples;
    u32 storm_clock;            /* network_tick runs: destination storms stay open until it ends them */
    u32 reserved;
    u64 drop_cost_ns;           /* packet_drop's token bucket, per reason, namespace and destination */
    u64 drop_burst_ns;
    u64 listen_cooldown_ns;     /* a listener still dropping is reported again after this long */
    u64 ignored_drops[4];       /* bit N: drop reason N is routine here, not reported */
};

BPF_ARRAY(network_settings, struct network_settings, 1);

struct socket_owner {
    struct tapio_task task;
    u64 syn_sent_ns;       /* 0 until the attempt fails, when the socket tells (see connect_started_ns) */
    u64 sock_cookie;
    u8 connecting;         /* from CLOSE->SYN_SENT to the attempt's end (kept up only without BTF state) */
    u8 reset_received;
    u8 syn_retransmits;
    u8 reserved[5];
};

/* Destination of a kind of event: addr/port of the peer in a network namespace (127.0.0.1:15001 in
 * one pod is not the one in the next); zero for node-wide counts. */
struct flow_key {
    u8 addr[16];
    u16 port;
    u16 family;
    u32 kind;
    u32 netns;
};

struct window_state {
    u64 newest_slot;
    u64 last_record_ns;
    u64 suppressed;
    u64 active;            /* an episode crossed the threshold and has not calmed down */
    u64 ticked;            /* ...and network_tick ends it (else the first event after it calmed) */
    u64 folded_refused;    /* refused connects and resets to the destination during the episode */
    u64 folded_reset;
    u32 counts[WINDOW_SLOTS];
    u32 failed[WINDOW_SLOTS];
};

struct window_result {
    u32 count;
    u32 failed;
    u32 suppressed;
};

struct rtt_state {
    u64 baseline_x16;      /* learned smoothed RTT, µs * 16 */
    u64 samples;
    u64 last_learn_ns;
    u64 last_record_ns;
    u64 suppressed;
    u64 degraded;
};

/* Counts the agent reads into the observer's counters every second (BpfCounter in __init__.py). */
#define COUNT_SUPPRESSED 0  /* events held back by a rate limit, an episode or a cool-down */
#define COUNT_UNTRACKED  1  /* events their key found no room for in its map: not judged or not limited */
#define COUNT_ABANDONED  2  /* connects the application ended early, before any answer: not reported */
BPF_PERCPU_ARRAY(network_counts, u64, 3);

#ifndef OWNER_BUCKET_BITS     /* a -D flag may shrink it (the tests fill a small one) */
#define OWNER_BUCKET_BITS 14  /* 16384 buckets of 4: 65536 sockets, 4 MiB */
#endif
#define OWNER_WAYS        4
#define OWNER_WRITING     1   /* a tag while its way is being filled: never a socket's address */
struct owner_bucket {
    u64 sk[OWNER_WAYS];    /* tags: whose each way is, 0 when free */
    struct socket_owner owner[OWNER_WAYS];
};
BPF_ARRAY(owners, struct owner_bucket, 1 << OWNER_BUCKET_BITS);
BPF_TABLE("lru_hash", struct flow_key, struct tapio_limit, record_limits, 16384);
BPF_TABLE("lru_hash", struct flow_key, struct window_state, windows, 16384);
BPF_TABLE("lru_hash", struct flow_key, struct rtt_state, rtts, 16384);

/* Destination storms network_tick is to end: a slot is free, being filled, or holds one storm's key. */
#define OPEN_STORMS    64
#define STORM_FREE     0
#define STORM_CLAIMED  1
#define STORM_READY    2
struct open_storm {
    u64 state;
    struct flow_key key;
};
BPF_ARRAY(open_storms, struct open_storm, OPEN_STORMS);

#if defined(TAPIO_SK_DROPS_OFFSET) && defined(TAPIO_SK_ACK_BACKLOG_OFFSET) && defined(TAPIO_SK_MAX_ACK_BACKLOG_OFFSET)
#define TAPIO_LISTEN_OVERFLOWS 1
#endif
#if defined(TAPIO_KFREE_SKB) && defined(TAPIO_KFREE_SKB_REASON) && defined(TAPIO_SKB_HEAD_OFFSET) && \
    defined(TAPIO_SKB_NETWORK_HEADER_OFFSET) && defined(TAPIO_SKB_PROTOCOL_OFFSET)
#define TAPIO_PACKET_DROPS 1
#endif

#ifdef TAPIO_LISTEN_OVERFLOWS
/* Listening sockets whose drop count network_tick watches: a slot per hash of the socket's address
 * (sk 0: free; OWNER_WRITING: being filled). A listener finding its slot taken is not watched (counted). */
#define LISTENER_BITS 9
#define LISTENERS     (1 << LISTENER_BITS)
#define LISTENERS_PER_TICK 128  /* the verifier walks every turn of the loop: a quarter of them per tick */
struct listener {
    u64 sk;
    u64 last_record_ns;
    u64 reported_drops;      /* sock.sk_drops as of its last record (or when it started listening) */
    struct tapio_task task;  /* who called listen() */
    u8 addr[16];
    u32 netns;
    u16 port;
    u16 family;
};
BPF_ARRAY(listeners, struct listener, LISTENERS);
BPF_ARRAY(listener_cursor, u32, 1);  /* where the next tick's share starts */
#endif

#ifdef TAPIO_PACKET_DROPS
/* A connection's addresses as its connecting side sees them (source: the connecting socket's own). */
struct connection_tuple {
    u8 saddr[16];
    u8 daddr[16];
    u16 sport;
    u16 dport;
    u32 reserved;
};
/* The last SYN (or SYN-ACK) of a connection the kernel dropped, and why: its failed connect carries it. */
struct syn_drop {
    u64 timestamp_ns;
    u64 location;
    u32 reason;
    u32 count;
};
BPF_TABLE("lru_hash", struct connection_tuple, struct syn_drop, syn_drops, 8192);
#endif

/* The socket whose RTT sample this CPU judged last, and in which jiffy. */
struct probe_gate {
    u64 sk;
    u64 jiffies;
};
BPF_PERCPU_ARRAY(probe_gates, struct probe_gate, 1);

static __always_inline struct network_settings *settings(void)
{
    int zero = 0;
    struct network_settings *cfg = network_settings.lookup(&zero);
    return cfg && cfg->configured ? cfg : 0;
}

static __always_inline void count(int slot)
{
    tapio_count(network_counts.lookup(&slot));
}

static __always_inline void count_untracked(void)
{
    count(COUNT_UNTRACKED);
}

/* One more event of a key held back: carried in the key's next record, and counted node-wide. */
static __always_inline void hold_back(u64 *suppressed)
{
    __sync_fetch_and_add(suppressed, 1);
    count(COUNT_SUPPRESSED);
}

static __always_inline struct owner_bucket *owner_bucket(u64 sk)
{
    u32 index = tapio_pointer_slot(sk, OWNER_BUCKET_BITS);
    return owners.lookup(&index);
}

/* The owner remembered for sk, or 0. */
static __always_inline struct socket_owner *owner_of(u64 sk)
{
    struct owner_bucket *bucket = owner_bucket(sk);
    if (!bucket)
        return 0;
#pragma unroll
    for (int way = 0; way < OWNER_WAYS; way++) {
        if (bucket->sk[way] == sk)
            return &bucket->owner[way];
    }
    return 0;
}

/* A way of sk's bucket taken for filling: sk's own, else a free one, else a live socket's (its owner
 * is forgotten: counted). 0 when another CPU is filling that way. Once filled, owner_publish(*tag). */
static __always_inline struct socket_owner *owner_claim(u64 sk, u64 **tag)
{
    struct owner_bucket *bucket = owner_bucket(sk);
    if (!bucket)
        return 0;
    u32 way = (u32)(sk >> 10) & (OWNER_WAYS - 1);  /* the live one to take over if nothing better */
    int rank = 0;                                 /* 1: a free way found, 2: sk's own */
#pragma unroll
    for (int i = 0; i < OWNER_WAYS; i++) {
        u64 held = bucket->sk[i];
        if (held == sk) {
            way = i;
            rank = 2;
        } else if (held == 0 && rank == 0) {
            way = i;
            rank = 1;
        }
    }
    way &= OWNER_WAYS - 1;
    u64 previous = bucket->sk[way];
    if (previous == OWNER_WRITING || !tapio_cas(&bucket->sk[way], previous, OWNER_WRITING)) {
        count(COUNT_UNTRACKED);
        return 0;
    }
    if (previous != 0 && previous != sk)
        count(COUNT_UNTRACKED);  /* a live socket's owner is forgotten */
    *tag = &bucket->sk[way];
    return &bucket->owner[way];
}

static __always_inline void owner_publish(u64 *tag, u64 sk)
{
    *tag = sk;  /* after the fields: a reader matching sk finds them written */
}

/* sk closed: its way is free again, so a later socket at this address inherits nothing. */
static __always_inline void owner_forget(u64 sk)
{
    struct owner_bucket *bucket = owner_bucket(sk);
    if (!bucket)
        return;
#pragma unroll
    for (int way = 0; way < OWNER_WAYS; way++) {
        if (bucket->sk[way] == sk)
            tapio_cas(&bucket->sk[way], sk, 0);
    }
}

static __always_inline u64 socket_cookie(const void *sk)
{
    u64 cookie = 0;
#ifdef TAPIO_SKC_COOKIE_OFFSET
    /* Zero until something asked the kernel for it; set once it has. */
    TAPIO_READ_AT(cookie, sk, TAPIO_SKC_COOKIE_OFFSET);
#endif
    return cookie;
}

/* When a failed connect's first SYN left, in bpf_ktime_get_ns() time, 0 if unknown. Taking the clock
 * on every connect would cost each connect more than all the rest of this observer (a clock read is
 * the dearest thing on that path), so it is read from the socket once the attempt fails:
 * - the SYN's own transmit time (sk_buff.skb_mstamp_ns of the only segment queued), exact, while it
 *   was sent once; only the RST handler can read it, before the kernel frees the queue;
 * - else tcp_sock.retrans_stamp, which the kernel sets to the first SYN's time in milliseconds of
 *   the same clock (a route with the tcp_usec_ts feature makes it microseconds: not handled).
 * Kernels whose BTF lacks these members take the clock at SYN_SENT instead (TAPIO_CONNECT_CLOCK). */
static __always_inline u64 syn_skb_sent_ns(const void *sk)
{
    u64 sent = 0;
#if defined(TAPIO_SK_RTX_QUEUE_OFFSET) && defined(TAPIO_SKB_RBNODE_OFFSET) && defined(TAPIO_SKB_MSTAMP_OFFSET)
    const char *node = 0;
    TAPIO_READ_AT(node, sk, TAPIO_SK_RTX_QUEUE_OFFSET);
    if (node)
        TAPIO_READ_AT(sent, node - TAPIO_SKB_RBNODE_OFFSET, TAPIO_SKB_MSTAMP_OFFSET);
#endif
    return sent;
}

static __always_inline u64 first_syn_sent_ns(const void *sk, u64 now)
{
#ifdef TAPIO_TCP_RETRANS_STAMP_OFFSET
    u32 stamp_ms = 0;
    TAPIO_READ_AT(stamp_ms, sk, TAPIO_TCP_RETRANS_STAMP_OFFSET);
    u64 now_ms = now / 1000000;
    u32 elapsed_ms = (u32)now_ms - stamp_ms;  /* the stamp is the low 32 bits of the ms count */
    if (stamp_ms == 0 || elapsed_ms > now_ms)
        return 0;
    return (now_ms - elapsed_ms) * 1000000;
#else
    return 0;
#endif
}

#if !defined(TAPIO_TCP_RETRANS_STAMP_OFFSET)
#define TAPIO_CONNECT_CLOCK 1
#endif

/* The socket's network namespace by inode number (as /proc/PID/ns/net names it), 0 when this
 * kernel's BTF does not say. Read only on the paths that key or report a destination. */
static __always_inline u32 socket_netns(const void *sk)
{
    u32 inum = 0;
#if defined(TAPIO_SKC_NET_OFFSET) && defined(TAPIO_NET_NS_INUM_OFFSET)
    const char *net = 0;
    TAPIO_READ_AT(net, sk, TAPIO_SKC_NET_OFFSET);
    if (net)
        TAPIO_READ_AT(inum, net, TAPIO_NET_NS_INUM_OFFSET);
#endif
    return inum;
}

/* The socket's error (sock.sk_err, an errno), -1 when this kernel's BTF does not say where it is.
 * The kernel sets it before it moves a failing connect to CLOSE: ECONNREFUSED for a RST or an ICMP
 * port unreachable, ETIMEDOUT (or an earlier ICMP error) when the SYNs went unanswered, the ICMP
 * error's errno for an unreachable host or network; 0 when the application itself ended the attempt. */
static __always_inline int socket_error(const void *sk)
{
    int err = -1;
#ifdef TAPIO_SK_ERR_OFFSET
    TAPIO_READ_AT(err, sk, TAPIO_SK_ERR_OFFSET);
#endif
    return err;
}

/* SYN retransmits of a connect whose owner entry was lost (inet_connection_sock.icsk_retransmits),
 * 0 when this kernel's BTF does not say where it is. */
static __always_inline u8 socket_syn_retransmits(const void *sk)
{
    u8 retransmits = 0;
#ifdef TAPIO_ICSK_RETRANSMITS_OFFSET
    TAPIO_READ_AT(retransmits, sk, TAPIO_ICSK_RETRANSMITS_OFFSET);
#endif
    return retransmits;
}

/* The socket's TCP state, 0 when this kernel's BTF does not say where it is. */
static __always_inline u8 socket_state(const void *sk)
{
    u8 state = 0;
#ifdef TAPIO_SKC_STATE_OFFSET
    TAPIO_READ_AT(state, sk, TAPIO_SKC_STATE_OFFSET);
#endif
    return state;
}

/* The socket's address family (sock.skc_family): 5.10's tcp tracepoints do not carry it (6.1's do). */
static __always_inline u16 socket_family(const void *sk)
{
    u16 family = 0;
#ifdef TAPIO_SKC_FAMILY_OFFSET
    TAPIO_READ_AT(family, sk, TAPIO_SKC_FAMILY_OFFSET);
#endif
    return family;
}

static __always_inline void copy_addr(u8 *dst, u16 family, const u8 *v4, const u8 *v6)
{
    if (family == FAMILY_INET)
        __builtin_memcpy(dst, v4, 4);
    else
        __builtin_memcpy(dst, v6, 16);
}

/* The owner remembered for sk, never the current task: zero and owner_known 0 when unknown. */
static __always_inline void set_owner(struct network_record *rec, u64 sk)
{
    struct socket_owner *owner = owner_of(sk);
    if (!owner)
        return;
    rec->task = owner->task;
    rec->owner_known = 1;
    rec->in_task_context = (bpf_get_current_pid_tgid() >> 32) == owner->task.pid;
}

#ifdef TAPIO_LISTEN_OVERFLOWS
/* Connections sk dropped so far (sock.sk_drops: tcp_listendrop raises it). */
static __always_inline u32 listener_drops(u64 sk)
{
    int drops = 0;
    TAPIO_READ_AT(drops, (const void *)sk, TAPIO_SK_DROPS_OFFSET);
    return (u32)drops;
}

/* sk started listening: watched from now, its drops so far not counted. */
static __always_inline void listener_watch(u64 sk, u16 family, u16 port, const u8 *addr)
{
    u32 index = tapio_pointer_slot(sk, LISTENER_BITS);
    struct listener *l = listeners.lookup(&index);
    if (!l)
        return;
    u64 held = l->sk;
    if ((held != 0 && held != sk) || !tapio_cas(&l->sk, held, OWNER_WRITING)) {
        count(COUNT_UNTRACKED);  /* its slot holds another listener */
        return;
    }
    l->reported_drops = listener_drops(sk);
    l->last_record_ns = 0;
    tapio_current_task(&l->task);
    l->netns = socket_netns((const void *)sk);
    l->port = port;
    l->family = family;
    __builtin_memcpy(l->addr, addr, 16);
    l->sk = sk;  /* published after the fields */
}

/* One record of what listener l (socket sk, whose drop count now is `drops`) dropped since its last. */
static __always_inline void listener_report(struct listener *l, u64 sk, u32 drops, u64 now)
{
    struct network_record rec = {};
    rec.timestamp_ns = now;
    rec.kind = KIND_LISTEN_OVERFLOW;
    rec.task = l->task;
    rec.owner_known = 1;
    rec.netns = l->netns;
    rec.family = l->family;
    rec.protocol = PROTO_TCP;
    rec.src_port = l->port;
    __builtin_memcpy(rec.src_addr, l->addr, 16);
    u64 reported = l->reported_drops;
    rec.count = drops - (u32)reported;
    TAPIO_READ_AT(rec.backlog, (const void *)sk, TAPIO_SK_MAX_ACK_BACKLOG_OFFSET);
    TAPIO_READ_AT(rec.queue_len, (const void *)sk, TAPIO_SK_ACK_BACKLOG_OFFSET);
    rec.sock_cookie = socket_cookie((const void *)sk);
    /* Closed (its slot reused) while being read, or reported meanwhile by the tick or the close on
     * another CPU: this record would count them twice. */
    if (l->sk != sk || !tapio_cas(&l->reported_drops, reported, drops))
        return;
    l->last_record_ns = now;
    tapio_submit(&rec, sizeof(rec));
}

/* sk stops listening: what it dropped since its last record is reported now, whatever the cool-down
 * (nothing is left to carry it), and its slot is free again. */
static __always_inline void listener_closed(u64 sk)
{
    u32 index = tapio_pointer_slot(sk, LISTENER_BITS);
    struct listener *l = listeners.lookup(&index);
    if (!l || l->sk != sk)
        return;
    u32 drops = listener_drops(sk);
    if (drops != l->reported_drops)
        listener_report(l, sk, drops, bpf_ktime_get_ns());
    tapio_cas(&l->sk, sk, 0);
}
#endif

/* Token bucket per key (tapio_limit_allows): 1 to send a record now (taking the key's suppressed count),
 * 0 to hold it back. */
static __always_inline int bucket_allows(struct flow_key *key, u64 now, u64 cost_ns, u64 burst_ns,
                                         u32 *suppressed)
{
    struct tapio_limit fresh = {};
    fresh.credit_ns = burst_ns;
    fresh.last_ns = now;
    struct tapio_limit *limit = record_limits.lookup_or_try_init(key, &fresh);
    if (!limit) {
        count(COUNT_UNTRACKED);
        return 1;
    }
    if (tapio_limit_allows(limit, now, cost_ns, burst_ns, suppressed))
        return 1;
    count(COUNT_SUPPRESSED);
    return 0;
}

static __always_inline int limit_allows(struct network_settings *cfg, struct flow_key *key, u64 now,
                                        u32 *suppressed)
{
    if (!cfg)
        return 1;  /* not configured yet (the first instants after attach): nothing to limit by */
    return bucket_allows(key, now, cfg->connection_cost_ns, cfg->connection_burst_ns, suppressed);
}

/* The events a key's window holds as seen from `slot` (a new event there would find them), read
 * without moving the window on. */
static __always_inline u32 window_count_at(struct window_state *w, u64 slot)
{
    u64 newest = w->newest_slot;
    u32 count = 0;
#pragma unroll
    for (int i = 0; i < WINDOW_SLOTS; i++) {
        if (newest >= (u64)i && newest - i + WINDOW_SLOTS > slot)
            count += w->counts[(newest - i) & (WINDOW_SLOTS - 1)];
    }
    return count;
}

/* Whether an episode is calm at `slot`: a new event there would not count as still going. */
static __always_inline int window_calm_at(struct window_state *w, u64 slot, u32 threshold)
{
    return 2 * (u64)window_count_at(w, slot) < (u64)threshold;
}

/* A slot of open_storms for key, so that network_tick ends its episode: 0 when all are taken. */
static __always_inline int open_storm(struct flow_key *key)
{
    for (u32 i = 0; i < OPEN_STORMS; i++) {
        u32 index = i;
        struct open_storm *slot = open_storms.lookup(&index);
        if (!slot || slot->state != STORM_FREE || !tapio_cas(&slot->state, STORM_FREE, STORM_CLAIMED))
            continue;
        slot->key = *key;
        slot->state = STORM_READY;  /* after the key: network_tick reads only ready slots */
        return 1;
    }
    return 0;
}

/* Counts one event into key's sliding window. Returns 1 when this event crosses the threshold and
 * starts an episode to report (out filled), 0 otherwise. An episode lasts until the count before a
 * new event is below half the threshold -- judged by network_tick when `ticked` (and an open_storms
 * slot was free), else by that event; events during it, and a crossing within the cool-down of the
 * key's previous record, are counted as suppressed. */
static __always_inline int window_event(struct flow_key *key, u64 now, u64 slot_ns, u32 threshold,
                                        u64 cooldown_ns, int failed, int ticked, struct window_result *out)
{
    if (slot_ns == 0 || threshold == 0)
        return 0;
    struct window_state fresh = {};
    struct window_state *w = windows.lookup_or_try_init(key, &fresh);
    if (!w) {
        count(COUNT_UNTRACKED);
        return 0;
    }
    u64 slot = now / slot_ns;
    u64 newest = w->newest_slot;
    /* Only the CPU that moves the window on clears the slots it leaves behind. */
    if (slot > newest && tapio_cas(&w->newest_slot, newest, slot)) {
#pragma unroll
        for (int i = 1; i <= WINDOW_SLOTS; i++) {
            if (newest + i <= slot) {
                w->counts[(newest + i) & (WINDOW_SLOTS - 1)] = 0;
                w->failed[(newest + i) & (WINDOW_SLOTS - 1)] = 0;
            }
        }
    }
    u32 index = slot & (WINDOW_SLOTS - 1);
    __sync_fetch_and_add(&w->counts[index], 1);
    if (failed)
        __sync_fetch_and_add(&w->failed[index], 1);
    u32 count = 0, failures = 0;
#pragma unroll
    for (int i = 0; i < WINDOW_SLOTS; i++) {
        count += w->counts[i];
        failures += w->failed[i];
    }
    if (w->active) {
        if (w->ticked || 2 * (u64)count >= (u64)threshold + 2) {  /* (count - 1) * 2 >= threshold: still going */
            hold_back(&w->suppressed);
            return 0;
        }
        tapio_cas(&w->active, 1, 0);  /* calmed down: the episode is over */
    }
    if (count < threshold)
        return 0;
    u64 last = w->last_record_ns;
    if (ticked && last && now - last < cooldown_ns) {  /* no episode to end: held back until the cool-down ends */
        hold_back(&w->suppressed);
        return 0;
    }
    if (!tapio_cas(&w->active, 0, 1)) {  /* another CPU crossed first */
        hold_back(&w->suppressed);
        return 0;
    }
    if (last && now - last < cooldown_ns) {
        hold_back(&w->suppressed);
        return 0;
    }
    w->ticked = ticked && open_storm(key);
    if (ticked && !w->ticked)
        count_untracked();  /* every slot taken: this episode ends on an event, folding nothing */
    w->last_record_ns = now;
    out->count = count;
    out->failed = failures;
    out->suppressed = w->suppressed ? tapio_take(&w->suppressed) : 0;
    return 1;
}

/* 1 when the destination of `key` (a connection failure's) is in an RST storm that the clock ends:
 * the failure is counted into the storm, not sent. */
static __always_inline int folded_into_storm(struct flow_key *key, int refused)
{
    struct flow_key storm = *key;
    storm.kind = KIND_RST_STORM;
    struct window_state *w = windows.lookup(&storm);
    if (!w || !w->active || !w->ticked)
        return 0;
    __sync_fetch_and_add(refused ? &w->folded_refused : &w->folded_reset, 1);
    count(COUNT_SUPPRESSED);
    return 1;
}

/* A failed connect whose SYN (or its SYN-ACK) the kernel was seen dropping: the drop's reason, where,
 * and how many of its packets, from syn_drops (taken: the next connect on these addresses starts afresh). */
static __always_inline void syn_dropped(struct network_record *rec)
{
#ifdef TAPIO_PACKET_DROPS
    struct connection_tuple tuple = {};
    __builtin_memcpy(tuple.saddr, rec->src_addr, 16);
    __builtin_memcpy(tuple.daddr, rec->dst_addr, 16);
    tuple.sport = rec->src_port;
    tuple.dport = rec->dst_port;
    struct syn_drop *drop = syn_drops.lookup(&tuple);
    if (!drop)
        return;
    if (!rec->syn_sent_ns || drop->timestamp_ns >= rec->syn_sent_ns) {  /* not an earlier connect's */
        rec->drop_reason = drop->reason;
        rec->drop_location = drop->location;
        rec->count = drop->count;
    }
    syn_drops.delete(&tuple);
#endif
}

/* sk's owner is the current task, from now: a connect (connecting: its SYN_SENT time is kept for
 * the connect's duration) or a send or read of a socket seen for the first time. 0 when no way could
 * be claimed (counted by owner_claim). */
static __always_inline int owner_record_current(u64 sk, u8 connecting)
{
    u64 *tag;
    struct socket_owner *owner = owner_claim(sk, &tag);
    if (!owner)
        return 0;
    tapio_current_task(&owner->task);
    owner->syn_sent_ns = 0;
#ifdef TAPIO_CONNECT_CLOCK
    if (connecting)
        owner->syn_sent_ns = bpf_ktime_get_ns();
#endif
    owner->sock_cookie = 0;
    owner->connecting = connecting;
    owner->reset_received = 0;
    owner->syn_retransmits = 0;
    owner_publish(tag, sk);
    return 1;
}

TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
    if (args->protocol != PROTO_TCP)
        return 0;
    u64 sk = (u64)args->skaddr;
    int newstate = args->newstate;
    if (newstate == TCP_SYN_SENT) {
        owner_record_current(sk, 1);
        return 0;
    }
#ifdef TAPIO_LISTEN_OVERFLOWS
    if (newstate == TCP_LISTEN) {  /* in listen(), in its caller's context */
        u8 addr[16] = {};
        copy_addr(addr, args->family, args->saddr, args->saddr_v6);
        listener_watch(sk, args->family, args->sport, addr);
        return 0;
    }
    if (args->oldstate == TCP_LISTEN)
        listener_closed(sk);
#endif
    if (args->oldstate != TCP_SYN_SENT) {
        if (newstate == TCP_CLOSE)
            owner_forget(sk);
        return 0;
    }
    if (newstate != TCP_CLOSE) {  /* connected: the entry stays as the socket's owner */
#ifndef TAPIO_SKC_STATE_OFFSET
        /* Without the socket's state, the flag is what tells a later RST from a refusal. */
        struct socket_owner *connected = owner_of(sk);
        if (connected)
            connected->connecting = 0;
#endif
        return 0;
    }
    /* A failed connect: reported whether or not its owner is still remembered (the socket's own error
     * tells how it ended; the owner, when known, who it was). */
    struct socket_owner *owner = owner_of(sk);
    struct network_record rec = {};
    rec.timestamp_ns = bpf_ktime_get_ns();
    rec.sk_error = socket_error(args->skaddr);
    if (owner) {
        rec.rst_received = owner->reset_received;
        rec.syn_retransmits = owner->syn_retransmits;
    } else if (rec.sk_error < 0) {
        count(COUNT_UNTRACKED);  /* neither the owner nor this kernel's BTF can say how it ended */
        return 0;
    } else {
        rec.syn_retransmits = socket_syn_retransmits(args->skaddr);
    }
    if (rec.rst_received || rec.sk_error == TAPIO_ECONNREFUSED)
        rec.kind = KIND_CONNECT_REFUSED;
    else if (rec.sk_error > 0 && rec.sk_error != TAPIO_ETIMEDOUT)
        rec.kind = KIND_CONNECT_FAILED;
    else
        rec.kind = KIND_CONNECT_TIMEOUT;  /* the kernel gave up, the application did, or unknown */
    rec.syn_sent_ns = owner && owner->syn_sent_ns ? owner->syn_sent_ns
                                                  : first_syn_sent_ns(args->skaddr, rec.timestamp_ns);
    struct network_settings *cfg = settings();
    /* Ended by the application before any SYN retransmit and sooner than the setting: a cancelled
     * attempt (a happy-eyeballs loser, a close() while connecting), not a timeout. */
    if (rec.sk_error == 0 && rec.syn_retransmits == 0 && cfg &&
        (!rec.syn_sent_ns || rec.timestamp_ns - rec.syn_sent_ns < cfg->abandoned_min_ns)) {
        count(COUNT_ABANDONED);
    } else {
        rec.family = args->family;
        copy_addr(rec.dst_addr, args->family, args->daddr, args->daddr_v6);
        rec.netns = socket_netns(args->skaddr);
        struct flow_key key = {};
        __builtin_memcpy(key.addr, rec.dst_addr, 16);
        key.port = args->dport;
        key.family = args->family;
        key.kind = rec.kind;
        key.netns = rec.netns;
        if (rec.kind == KIND_CONNECT_REFUSED && folded_into_storm(&key, 1)) {
            /* counted into the destination's storm */
        } else if (limit_allows(cfg, &key, rec.timestamp_ns, &rec.suppressed)) {
            rec.sock_cookie = owner && owner->sock_cookie ? owner->sock_cookie : socket_cookie(args->skaddr);
            if (owner) {
                rec.task = owner->task;
                rec.owner_known = 1;
                rec.in_task_context = (bpf_get_current_pid_tgid() >> 32) == owner->task.pid;
            }
            rec.protocol = args->protocol;
            rec.src_port = args->sport;
            rec.dst_port = args->dport;
            rec.old_state = args->oldstate;
            rec.new_state = args->newstate;
            copy_addr(rec.src_addr, args->family, args->saddr, args->saddr_v6);
            syn_dropped(&rec);
            tapio_submit(&rec, sizeof(rec));
        }
    }
    if (owner)
        owner_forget(sk);
    return 0;
}

/* Owners of sockets this observer did not see connect (accepted ones, older ones): a send or a read
 * runs in the owner's process context. Only a socket without a known owner pays more than a lookup. */
static __always_inline void remember_owner(void *sk_ptr)
{
    u64 sk = (u64)sk_ptr;
    if (socket_state(sk_ptr) == TCP_CLOSE)
        return;  /* a read after the reset or close: nothing left to attribute */
    if (!owner_record_current(sk, 0))
        return;
    /* Closed meanwhile (by a softirq on another CPU, whose CLOSE found nothing to forget)? Then
     * forget it here, or a later socket at this address would inherit this owner. */
    if (socket_state(sk_ptr) == TCP_CLOSE)
        owner_forget(sk);
}

#ifdef TAPIO_OWNER_FROM_SENDS
TRACEPOINT_PROBE(sock, sock_send_length)  /* Linux 6.3 and later */
{
    if (args->protocol == PROTO_TCP && !owner_of((u64)args->sk))
        remember_owner(args->sk);
    return 0;
}
#endif

#if defined(TAPIO_OWNER_FROM_READS) && defined(TAPIO_RCV_SPACE_SOCK) && defined(TAPIO_SK_LOCK_OWNED_OFFSET)
/* Every TCP read that copies data calls tcp_rcv_space_adjust(sk) (on every kernel; sock_recv_length,
 * which would say so once per recvmsg, exists only from 6.3). A reader holds the socket's lock
 * (lock_sock: sk_lock.owned set) and is its owner; the kernel's own readers that run it from softirq
 * (kTLS and sockmap parsers, iSCSI) hold only the spinlock, and their current task is whoever the CPU
 * interrupted: those are skipped. */
RAW_TRACEPOINT_PROBE(tcp_rcv_space_adjust)
{
    void *sk = (void *)ctx->args[0];
    if (owner_of((u64)sk))
        return 0;
    int owned = 0;
    TAPIO_READ_AT(owned, sk, TAPIO_SK_LOCK_OWNED_OFFSET);
    if (owned)
        remember_owner(sk);
    return 0;
}
#endif

/* What a destination's connection failures of `kind` held back in their rate limit: from now the
 * storm's, taken into its first record. */
static __always_inline u32 take_limited(struct flow_key *storm, u32 kind)
{
    struct flow_key key = *storm;
    key.kind = kind;
    struct tapio_limit *limit = record_limits.lookup(&key);
    return limit && limit->suppressed ? tapio_take(&limit->suppressed) : 0;
}

static __always_inline void storm_destination(struct network_record *rec, struct flow_key *key)
{
    rec->scope = SCOPE_DESTINATION;
    rec->netns = key->netns;
    rec->family = key->family;
    rec->protocol = PROTO_TCP;
    rec->dst_port = key->port;
    __builtin_memcpy(rec->dst_addr, key->addr, 16);
}

static __always_inline void rst_storm(struct network_settings *cfg, struct flow_key *key, u32 threshold,
                                      u8 scope, u64 now)
{
    struct window_result res = {};
    int ticked = scope == SCOPE_DESTINATION && cfg->storm_clock;
    if (!window_event(key, now, cfg->rst_slot_ns, threshold, cfg->rst_cooldown_ns, 0, ticked, &res))
        return;
    struct network_record rec = {};
    rec.timestamp_ns = now;
    rec.kind = KIND_RST_STORM;
    rec.scope = scope;
    rec.count = res.count;
    rec.suppressed = res.suppressed;
    rec.window_ms = cfg->rst_window_ms;
    if (scope == SCOPE_DESTINATION) {
        storm_destination(&rec, key);
        if (ticked) {
            struct window_state *w = windows.lookup(key);
            rec.episode_open = w && w->ticked;
            rec.refused = take_limited(key, KIND_CONNECT_REFUSED);
            rec.reset = take_limited(key, KIND_CONNECTION_RESET);
        }
    }
    tapio_submit(&rec, sizeof(rec));
}

#ifdef TAPIO_LISTEN_OVERFLOWS
/* Each watched listener (a quarter of the table a tick: each is read every 4 s) that dropped connections
 * since its last record, once its cool-down passed:
 * one record with how many, its accept-queue limit and how full it is now. */
static __always_inline void listeners_tick(struct network_settings *cfg, u64 now)
{
    int zero = 0;
    u32 *cursor = listener_cursor.lookup(&zero);
    if (!cursor)
        return;
    u32 start = *cursor;
    *cursor = (start + LISTENERS_PER_TICK) & (LISTENERS - 1);
    for (u32 i = 0; i < LISTENERS_PER_TICK; i++) {
        u32 index = (start + i) & (LISTENERS - 1);
        struct listener *l = listeners.lookup(&index);
        if (!l)
            continue;
        u64 sk = l->sk;
        if (sk <= OWNER_WRITING)
            continue;
        u32 drops = listener_drops(sk);
        if (drops == l->reported_drops || (l->last_record_ns && now - l->last_record_ns < cfg->listen_cooldown_ns))
            continue;
        listener_report(l, sk, drops, now);
    }
}
#endif

/* Once a second, from the agent's cpu-clock perf event on one CPU: ends the destination storms that
 * calmed down (a new RST now would not count as still going), each with one record of what it folded. */
int network_tick(struct bpf_perf_event_data *ctx)
{
    struct network_settings *cfg = settings();
    if (!cfg || !cfg->rst_slot_ns)
        return 0;
    u64 now = bpf_ktime_get_ns();
    u64 slot_now = now / cfg->rst_slot_ns;
    for (u32 i = 0; i < OPEN_STORMS; i++) {
        u32 index = i;
        struct open_storm *slot = open_storms.lookup(&index);
        if (!slot || slot->state != STORM_READY)
            continue;
        struct flow_key key = slot->key;
        struct window_state *w = windows.lookup(&key);
        if (!w || !w->active) {  /* evicted (its counts with it), or ended otherwise */
            if (!w)
                count(COUNT_UNTRACKED);
            slot->state = STORM_FREE;
            continue;
        }
        if (!window_calm_at(w, slot_now, cfg->rst_threshold) || !tapio_cas(&w->active, 1, 0))
            continue;
        struct network_record rec = {};
        rec.timestamp_ns = now;
        rec.kind = KIND_RST_STORM_END;
        storm_destination(&rec, &key);
        rec.window_ms = cfg->rst_window_ms;
        rec.started_ns = w->last_record_ns;
        rec.count = w->suppressed ? tapio_take(&w->suppressed) : 0;
        rec.refused = w->folded_refused ? tapio_take(&w->folded_refused) : 0;
        rec.reset = w->folded_reset ? tapio_take(&w->folded_reset) : 0;
        tapio_submit(&rec, sizeof(rec));
        slot->state = STORM_FREE;
    }
#ifdef TAPIO_LISTEN_OVERFLOWS
    listeners_tick(cfg, now);
#endif
    return 0;
}

TRACEPOINT_PROBE(tcp, tcp_receive_reset)
{
    u64 sk = (u64)args->skaddr;
    u64 now = bpf_ktime_get_ns();
    u8 state = socket_state(args->skaddr);
    int connecting = 0;
    struct socket_owner *owner = owner_of(sk);
    if (owner) {
#ifdef TAPIO_SKC_STATE_OFFSET
        connecting = state == TCP_SYN_SENT;
#else
        connecting = owner->connecting;
#endif
        if (connecting) {  /* refused: the state change that follows reports it */
            owner->reset_received = 1;
            owner->sock_cookie = args->sock_cookie;
            if (owner->syn_retransmits == 0 && owner->syn_sent_ns == 0)
                owner->syn_sent_ns = syn_skb_sent_ns(args->skaddr);
        }
    }
    struct network_settings *cfg = settings();
    u16 family = socket_family(args->skaddr);
    struct flow_key key = {};
    copy_addr(key.addr, family, args->daddr, args->daddr_v6);
    key.port = args->dport;
    key.family = family;
    key.netns = socket_netns(args->skaddr);
    if (cfg) {
        key.kind = KIND_RST_STORM;
        rst_storm(cfg, &key, cfg->rst_threshold, SCOPE_DESTINATION, now);
        struct flow_key node = {};
        node.kind = KIND_RST_STORM;
        rst_storm(cfg, &node, cfg->rst_node_threshold, SCOPE_NODE, now);
    }
    if (connecting || state == TCP_SYN_SENT)
        return 0;
    struct network_record rec = {};
    rec.kind = KIND_CONNECTION_RESET;
    key.kind = KIND_CONNECTION_RESET;
    if (folded_into_storm(&key, 0) || !limit_allows(cfg, &key, now, &rec.suppressed))
        return 0;
    rec.timestamp_ns = now;
    rec.sock_cookie = args->sock_cookie;
    rec.netns = key.netns;
    rec.family = family;
    rec.protocol = PROTO_TCP;
    rec.src_port = args->sport;
    rec.dst_port = args->dport;
    rec.old_state = state;
    rec.new_state = TCP_CLOSE;
    __builtin_memcpy(rec.dst_addr, key.addr, 16);
    copy_addr(rec.src_addr, family, args->saddr, args->saddr_v6);
    set_owner(&rec, sk);
    tapio_submit(&rec, sizeof(rec));
    return 0;
}

/* Whether the kernel reported this retransmit attempt failed: the tracepoint's err, which older
 * kernels' tracepoint lacks (bcc then has no such member, so it may not even be named). */
#ifdef TAPIO_RETRANSMIT_HAS_ERR
#define retransmit_failed(args) ((args)->err != 0)
#else
#define retransmit_failed(args) 0
#endif

TRACEPOINT_PROBE(tcp, tcp_retransmit_skb)
{
    u64 sk = (u64)args->skaddr;
    if (args->state == TCP_SYN_SENT) {  /* a connect problem, counted on the attempt, not a spike */
        struct socket_owner *owner = owner_of(sk);
        if (owner && owner->syn_retransmits < 255)
            owner->syn_retransmits++;
        return 0;
    }
    struct network_settings *cfg = settings();
    if (!cfg)
        return 0;
    u64 now = bpf_ktime_get_ns();
    u16 family = socket_family(args->skaddr);
    struct flow_key key = {};
    copy_addr(key.addr, family, args->daddr, args->daddr_v6);
    key.port = args->dport;
    key.family = family;
    key.kind = KIND_RETRANSMIT_SPIKE;
    key.netns = socket_netns(args->skaddr);
    struct window_result res = {};
    if (!window_event(&key, now, cfg->retransmit_slot_ns, cfg->retransmit_threshold,
                      cfg->retransmit_cooldown_ns, retransmit_failed(args), 0, &res))
        return 0;
    struct network_record rec = {};
    rec.timestamp_ns = now;
    rec.kind = KIND_RETRANSMIT_SPIKE;
    rec.sock_cookie = socket_cookie(args->skaddr);
    rec.netns = key.netns;
    rec.family = family;
    rec.protocol = PROTO_TCP;
    rec.src_port = args->sport;
    rec.dst_port = args->dport;
    rec.old_state = args->state;
    rec.count = res.count;
    rec.failed = res.failed;
    rec.suppressed = res.suppressed;
    rec.window_ms = cfg->retransmit_window_ms;
#ifdef TAPIO_RETRANSMIT_HAS_ERR
    rec.failed_known = 1;
#endif
    __builtin_memcpy(rec.dst_addr, key.addr, 16);
    copy_addr(rec.src_addr, family, args->saddr, args->saddr_v6);
#ifdef TAPIO_TCP_TOTAL_RETRANS_OFFSET
    TAPIO_READ_AT(rec.total_retrans, args->skaddr, TAPIO_TCP_TOTAL_RETRANS_OFFSET);
#endif
#ifdef TAPIO_TCP_SND_CWND_OFFSET
    TAPIO_READ_AT(rec.snd_cwnd, args->skaddr, TAPIO_TCP_SND_CWND_OFFSET);
#endif
    set_owner(&rec, sk);
    tapio_submit(&rec, sizeof(rec));
    return 0;
}

/* One learning step: a plain mean over the first 8 samples, then an EWMA with gain 1/8. */
static __always_inline void rtt_learn(struct rtt_state *st, u32 srtt_us, u64 now)
{
    u64 target = (u64)srtt_us << 4;
    u64 base = st->baseline_x16;
    u64 n = st->samples + 1;
    u64 divisor = n < 8 ? n : 8;
    if (target >= base)
        base += (target - base) / divisor;
    else
        base -= (base - target) / divisor;
    st->baseline_x16 = base;
    st->samples = n;
    st->last_learn_ns = now;
}

/* RTT samples come from the raw tcp_probe tracepoint, whose first argument is the socket: the tracefs
 * event carries the socket's address only on newer kernels (6.12, not 6.1), and the owner and network
 * namespace are found by it. Everything else is read from the socket at BTF offsets, as the event
 * would copy it. */
#if defined(TAPIO_PROBE_SOCK) && defined(TAPIO_TCP_SRTT_OFFSET) && defined(TAPIO_TCP_SND_UNA_OFFSET) && \
    defined(TAPIO_TCP_SND_NXT_OFFSET) && defined(TAPIO_SKC_DADDR_OFFSET) && defined(TAPIO_SKC_RCV_SADDR_OFFSET) && \
    defined(TAPIO_SKC_V6_DADDR_OFFSET) && defined(TAPIO_SKC_V6_RCV_SADDR_OFFSET) && \
    defined(TAPIO_SKC_DPORT_OFFSET) && defined(TAPIO_SKC_NUM_OFFSET)
/* The socket's own address (local) or its peer's, as the tracepoints copy them: 4 bytes for IPv4. */
static __always_inline void socket_addr(u8 *dst, const void *sk, u16 family, int peer)
{
    if (family == FAMILY_INET)
        bpf_probe_read_kernel(dst, 4, (const char *)sk + (peer ? TAPIO_SKC_DADDR_OFFSET : TAPIO_SKC_RCV_SADDR_OFFSET));
    else
        bpf_probe_read_kernel(dst, 16, (const char *)sk + (peer ? TAPIO_SKC_V6_DADDR_OFFSET
                                                                : TAPIO_SKC_V6_RCV_SADDR_OFFSET));
}

RAW_TRACEPOINT_PROBE(tcp_probe)
{
    /* This fires for every segment an established socket receives: keep the common case cheap (each
     * read from the socket is a helper call). Only a socket with data in flight measures RTT (one
     * without has an unchanged srtt), and one sample per socket per jiffy is plenty. */
    const void *skp = (const void *)ctx->args[0];
    u32 snd_una = 0, snd_nxt = 0, srtt = 0;
    TAPIO_READ_AT(snd_una, skp, TAPIO_TCP_SND_UNA_OFFSET);
    TAPIO_READ_AT(snd_nxt, skp, TAPIO_TCP_SND_NXT_OFFSET);
    if (snd_una == snd_nxt)
        return 0;
    int zero = 0;
    struct probe_gate *gate = probe_gates.lookup(&zero);
    if (!gate)
        return 0;
    u64 sk = (u64)skp, jiffies = bpf_jiffies64();
    if (gate->sk == sk && gate->jiffies == jiffies)
        return 0;
    gate->sk = sk;
    gate->jiffies = jiffies;
    TAPIO_READ_AT(srtt, skp, TAPIO_TCP_SRTT_OFFSET);
    srtt >>= 3;  /* tp->srtt_us is kept times 8: microseconds, as the tracepoint reports it */
    if (srtt == 0)
        return 0;
    struct network_settings *cfg = settings();
    if (!cfg)
        return 0;
    /* RTT is a property of the path: one baseline per destination host, whatever the port. */
    u16 family = socket_family(skp);
    struct flow_key key = {};
    key.family = family;
    key.kind = KIND_RTT_DEGRADATION;
    key.netns = socket_netns(skp);
    socket_addr(key.addr, skp, family, 1);
    u64 now = bpf_ktime_get_ns();
    struct rtt_state *st = rtts.lookup(&key);
    if (!st) {
        struct rtt_state fresh = {};
        fresh.baseline_x16 = (u64)srtt << 4;
        fresh.samples = 1;
        fresh.last_learn_ns = now;
        rtts.update(&key, &fresh);
        return 0;
    }
    u64 baseline_us = st->baseline_x16 >> 4;
    int degraded = st->samples >= cfg->rtt_min_samples && srtt >= cfg->rtt_floor_us &&
                   (u64)srtt * 16 >= (u64)cfg->rtt_factor_x16 * baseline_us;
    if (!degraded) {
        if (st->degraded)
            tapio_cas(&st->degraded, 1, 0);  /* recovered */
        if (now - st->last_learn_ns >= cfg->rtt_learn_interval_ns)
            rtt_learn(st, srtt, now);
        return 0;
    }
    u64 last = st->last_record_ns;
    if (st->degraded) {
        /* Still degraded: reported again only once the cool-down has passed. */
        if (now - last < cfg->rtt_cooldown_ns)
            return 0;
        if (!tapio_cas(&st->last_record_ns, last, now))
            return 0;
    } else {
        if (!tapio_cas(&st->degraded, 0, 1))
            return 0;
        if (last && now - last < cfg->rtt_cooldown_ns) {
            hold_back(&st->suppressed);
            return 0;
        }
        st->last_record_ns = now;
    }
    struct network_record rec = {};
    rec.timestamp_ns = now;
    rec.kind = KIND_RTT_DEGRADATION;
    rec.sock_cookie = socket_cookie(skp);
    rec.netns = key.netns;
    rec.family = family;
    rec.protocol = PROTO_TCP;
    u16 dport_be = 0;
    TAPIO_READ_AT(rec.src_port, skp, TAPIO_SKC_NUM_OFFSET);  /* the local port, in host order */
    TAPIO_READ_AT(dport_be, skp, TAPIO_SKC_DPORT_OFFSET);
    rec.dst_port = bpf_ntohs(dport_be);
    rec.srtt_us = srtt;
    rec.baseline_srtt_us = baseline_us;
    rec.samples = st->samples;
#ifdef TAPIO_TCP_SND_CWND_OFFSET
    TAPIO_READ_AT(rec.snd_cwnd, skp, TAPIO_TCP_SND_CWND_OFFSET);
#endif
    rec.suppressed = st->suppressed ? tapio_take(&st->suppressed) : 0;
    __builtin_memcpy(rec.dst_addr, key.addr, 16);
    socket_addr(rec.src_addr, skp, family, 0);
    set_owner(&rec, sk);
    tapio_submit(&rec, sizeof(rec));
    return 0;
}
#endif

#ifdef TAPIO_PACKET_DROPS
/* The dropped packet's addresses, ports (host order), IP protocol and TCP flags, from its headers;
 * 0 when it has no IP header yet (or not one this reads). */
struct dropped_packet {
    u8 saddr[16];
    u8 daddr[16];
    u16 sport;
    u16 dport;
    u16 family;
    u8 l4;
    u8 tcp_flags;
};

static __always_inline int dropped_packet(const void *skb, struct dropped_packet *p)
{
    u16 proto_be = 0, network = 0;
    const u8 *head = 0;
    TAPIO_READ_AT(proto_be, skb, TAPIO_SKB_PROTOCOL_OFFSET);
    u16 proto = bpf_ntohs(proto_be);
    if (proto != TAPIO_ETH_P_IP && proto != TAPIO_ETH_P_IPV6)
        return 0;  /* not IP (AF_UNIX and netlink free their skbs here too) */
    TAPIO_READ_AT(head, skb, TAPIO_SKB_HEAD_OFFSET);
    TAPIO_READ_AT(network, skb, TAPIO_SKB_NETWORK_HEADER_OFFSET);
    if (!head || network == 0xffff)
        return 0;
    u8 ip[40] = {};
    if (bpf_probe_read_kernel(ip, sizeof(ip), head + network) != 0)
        return 0;
    u32 l4_offset;
    if (proto == TAPIO_ETH_P_IP) {
        if ((ip[0] >> 4) != 4)
            return 0;
        p->family = FAMILY_INET;
        p->l4 = ip[9];
        __builtin_memcpy(p->saddr, ip + 12, 4);
        __builtin_memcpy(p->daddr, ip + 16, 4);
        l4_offset = (ip[0] & 0xf) * 4;
        if ((ip[6] & 0x1f) || ip[7])
            return 1;  /* a fragment after the first: no ports */
    } else {
        if ((ip[0] >> 4) != 6)
            return 0;
        p->family = FAMILY_INET6;
        p->l4 = ip[6];  /* extension headers are not followed: no ports then */
        __builtin_memcpy(p->saddr, ip + 8, 16);
        __builtin_memcpy(p->daddr, ip + 24, 16);
        l4_offset = 40;
    }
    if (p->l4 != PROTO_TCP && p->l4 != PROTO_UDP)
        return 1;
    u8 l4[14] = {};
    if (bpf_probe_read_kernel(l4, sizeof(l4), head + network + (l4_offset & 0x3f)) != 0)
        return 1;
    p->sport = ((u16)l4[0] << 8) | l4[1];
    p->dport = ((u16)l4[2] << 8) | l4[3];
    if (p->l4 == PROTO_TCP)
        p->tcp_flags = l4[13];
    return 1;
}

/* The drop's network namespace: its device's, else its socket's; 0 when neither says. */
static __always_inline u32 packet_netns(const void *skb)
{
    u32 inum = 0;
#if defined(TAPIO_SKB_DEV_OFFSET) && defined(TAPIO_DEV_NET_OFFSET) && defined(TAPIO_NET_NS_INUM_OFFSET)
    const char *dev = 0, *net = 0;
    TAPIO_READ_AT(dev, skb, TAPIO_SKB_DEV_OFFSET);
    if (dev) {
        TAPIO_READ_AT(net, dev, TAPIO_DEV_NET_OFFSET);
        if (net)
            TAPIO_READ_AT(inum, net, TAPIO_NET_NS_INUM_OFFSET);
    }
#endif
#ifdef TAPIO_SKB_SK_OFFSET
    if (!inum) {
        const void *sk = 0;
        TAPIO_READ_AT(sk, skb, TAPIO_SKB_SK_OFFSET);
        if (sk)
            inum = socket_netns(sk);
    }
#endif
    return inum;
}

/* A dropped SYN or SYN-ACK, remembered by its connection's addresses as the connecting side sees them. */
static __always_inline void remember_syn_drop(struct dropped_packet *p, u32 reason, u64 location, u64 now)
{
    struct connection_tuple tuple = {};
    if (p->tcp_flags & TCP_FLAG_ACK) {  /* SYN-ACK: from the peer */
        __builtin_memcpy(tuple.saddr, p->daddr, 16);
        __builtin_memcpy(tuple.daddr, p->saddr, 16);
        tuple.sport = p->dport;
        tuple.dport = p->sport;
    } else {
        __builtin_memcpy(tuple.saddr, p->saddr, 16);
        __builtin_memcpy(tuple.daddr, p->daddr, 16);
        tuple.sport = p->sport;
        tuple.dport = p->dport;
    }
    struct syn_drop *known = syn_drops.lookup(&tuple);
    if (known) {
        known->timestamp_ns = now;
        known->reason = reason;
        known->location = location;
        __sync_fetch_and_add(&known->count, 1);
        return;
    }
    struct syn_drop fresh = {};
    fresh.timestamp_ns = now;
    fresh.location = location;
    fresh.reason = reason;
    fresh.count = 1;
    syn_drops.update(&tuple, &fresh);
}

/* Every packet the kernel frees as dropped passes here: the reason is judged first, from the
 * tracepoint's own argument, so routine drops cost a bitmap test. */
RAW_TRACEPOINT_PROBE(kfree_skb)
{
    u32 reason = (u32)ctx->args[2];
    struct network_settings *cfg = settings();
    if (!cfg || (reason < 256 && (cfg->ignored_drops[(reason >> 6) & 3] >> (reason & 63)) & 1))
        return 0;
    const void *skb = (const void *)ctx->args[0];
    struct dropped_packet p = {};
    if (!dropped_packet(skb, &p))
        return 0;
    u64 now = bpf_ktime_get_ns();
    u64 location = (u64)ctx->args[1];
    if (p.l4 == PROTO_TCP && (p.tcp_flags & TCP_FLAG_SYN))
        remember_syn_drop(&p, reason, location, now);
    struct flow_key key = {};
    __builtin_memcpy(key.addr, p.daddr, 16);
    key.port = p.dport;
    key.family = p.family;
    key.kind = KIND_PACKET_DROP | (reason << 8);
    key.netns = packet_netns(skb);
    struct network_record rec = {};
    if (!bucket_allows(&key, now, cfg->drop_cost_ns, cfg->drop_burst_ns, &rec.suppressed))
        return 0;
    rec.timestamp_ns = now;
    rec.kind = KIND_PACKET_DROP;
    rec.drop_reason = reason;
    rec.drop_location = location;
    rec.netns = key.netns;
    rec.family = p.family;
    rec.protocol = p.l4;
    rec.src_port = p.sport;
    rec.dst_port = p.dport;
    rec.tcp_flags = p.tcp_flags;
    __builtin_memcpy(rec.src_addr, p.saddr, 16);
    __builtin_memcpy(rec.dst_addr, p.daddr, 16);
    tapio_submit(&rec, sizeof(rec));
    return 0;
}
#endif
