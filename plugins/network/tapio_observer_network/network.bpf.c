/* Tapio network observer: one record per failed TCP connect.
 *
 * A connection attempt lives from CLOSE->SYN_SENT to its next state change.
 * We key it by socket address while it lives (the entry is removed at its end,
 * so a later connect reusing the address starts afresh) and remember who
 * connected, because the end is often reported from a timer or softirq where
 * the current task is someone else. An RST received in SYN_SENT marks the
 * attempt refused and carries the socket cookie that names the connection.
 */
#include <tapio.h>  /* the agent puts events, tapio_lost and tapio_submit() before this */

#define TCP_ESTABLISHED 1
#define TCP_SYN_SENT    2
#define TCP_CLOSE       7
#define PROTO_TCP       6
#define FAMILY_INET     2

#define KIND_CONNECT_REFUSED 1
#define KIND_CONNECT_TIMEOUT 2

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
};

struct connect_attempt {
    struct tapio_task task;
    u64 syn_sent_ns;
    u64 sock_cookie;
    u8 reset_received;
    u8 syn_retransmits;
};

BPF_HASH(connect_attempts, u64, struct connect_attempt, 65536);

static __always_inline u64 socket_cookie(const void *sk)
{
    u64 cookie = 0;
#ifdef TAPIO_SKC_COOKIE_OFFSET
    /* Zero until something asked the kernel for it; set once it has. */
    TAPIO_READ_AT(cookie, sk, TAPIO_SKC_COOKIE_OFFSET);
#endif
    return cookie;
}

TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
    if (args->protocol != PROTO_TCP)
        return 0;
    u64 sk = (u64)args->skaddr;
    if (args->newstate == TCP_SYN_SENT) {
        struct connect_attempt attempt = {};
        tapio_current_task(&attempt.task);
        attempt.syn_sent_ns = bpf_ktime_get_ns();
        connect_attempts.update(&sk, &attempt);
        return 0;
    }
    if (args->oldstate != TCP_SYN_SENT)
        return 0;
    struct connect_attempt *attempt = connect_attempts.lookup(&sk);
    if (!attempt)
        return 0;
    if (args->newstate == TCP_CLOSE) {
        struct network_record rec = {};
        rec.timestamp_ns = bpf_ktime_get_ns();
        rec.syn_sent_ns = attempt->syn_sent_ns;
        rec.sock_cookie = attempt->sock_cookie ? attempt->sock_cookie : socket_cookie(args->skaddr);
        rec.task = attempt->task;
        rec.kind = attempt->reset_received ? KIND_CONNECT_REFUSED : KIND_CONNECT_TIMEOUT;
        rec.family = args->family;
        rec.protocol = args->protocol;
        rec.src_port = args->sport;
        rec.dst_port = args->dport;
        rec.old_state = args->oldstate;
        rec.new_state = args->newstate;
        rec.syn_retransmits = attempt->syn_retransmits;
        rec.in_task_context = (bpf_get_current_pid_tgid() >> 32) == attempt->task.pid;
        if (args->family == FAMILY_INET) {
            __builtin_memcpy(rec.src_addr, args->saddr, 4);
            __builtin_memcpy(rec.dst_addr, args->daddr, 4);
        } else {
            __builtin_memcpy(rec.src_addr, args->saddr_v6, 16);
            __builtin_memcpy(rec.dst_addr, args->daddr_v6, 16);
        }
        tapio_submit(&rec, sizeof(rec));
    }
    connect_attempts.delete(&sk);
    return 0;
}

TRACEPOINT_PROBE(tcp, tcp_receive_reset)
{
    u64 sk = (u64)args->skaddr;
    struct connect_attempt *attempt = connect_attempts.lookup(&sk);
    if (attempt) {  /* only attempts in SYN_SENT are in the map */
        attempt->reset_received = 1;
        attempt->sock_cookie = args->sock_cookie;
    }
    return 0;
}

TRACEPOINT_PROBE(tcp, tcp_retransmit_skb)
{
    if (args->state != TCP_SYN_SENT)
        return 0;
    u64 sk = (u64)args->skaddr;
    struct connect_attempt *attempt = connect_attempts.lookup(&sk);
    if (attempt && attempt->syn_retransmits < 255)
        attempt->syn_retransmits++;
    return 0;
}
