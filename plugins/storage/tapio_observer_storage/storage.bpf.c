/* Tapio storage observer: block requests that failed or took too long.
 *
 * Issue and completion are matched by the request pointer (raw tracepoints
 * give it), so every latency is exact: a completion whose issue we did not see
 * is counted, never reported. Who issued the request is remembered at issue,
 * because completion runs in interrupt context. Normal requests are judged
 * here and dropped here: only failures and requests slower than the device's
 * warning threshold reach the ring buffer. Those also feed nothing into the
 * per-device, per-operation baseline, which learns what normal looks like.
 */
#include <tapio.h>  /* the agent puts events, tapio_lost and tapio_submit() before this */

#ifndef STORAGE_MAX_INFLIGHT
#define STORAGE_MAX_INFLIGHT 16384
#endif
#define STORAGE_MAX_DEVICES 4096
#define DISK_NAME_LEN 32
#define MINORBITS 20  /* the kernel's dev_t: major << 20 | minor */

/* Without these members there is no device to judge: say so instead of guessing. */
#if !defined(STORAGE_RQ_QUEUE_OFFSET) || !defined(STORAGE_QUEUE_DISK_OFFSET) || \
    !defined(STORAGE_DISK_MAJOR_OFFSET) || !defined(STORAGE_DISK_FIRST_MINOR_OFFSET) || \
    !defined(STORAGE_RQ_CMD_FLAGS_OFFSET) || !defined(STORAGE_RQ_DATA_LEN_OFFSET)
#error "storage observer: this kernel's BTF lacks request/gendisk members it needs (see the warnings above)"
#endif

/* storage_settings slots, written by tapio_observer_started (settings.py). */
#define SETTING_SCREEN_NS 0  /* warning threshold for devices not in device_warning_ns */
#define SETTING_OP_MASK   1  /* REQ_OP_MASK of this kernel, from BTF */
/* storage_counts slots. */
#define COUNT_UNMATCHED 0
#define COUNT_OVERFLOW  1

/* Mirrors STORAGE_RECORD in tapio_observer_storage/records.py. */
struct storage_record {
    u64 timestamp_ns;           /* completion */
    u64 latency_ns;             /* issue -> completion */
    u64 sector;
    u64 baseline_ns;            /* normal latency on this device and operation before this request */
    u64 baseline_deviation_ns;
    u64 baseline_samples;
    u64 unmatched_completions;  /* counters when this record was sent */
    u64 inflight_overflows;
    struct tapio_task task;     /* who issued the request */
    u32 dev_major;
    u32 dev_minor;
    u32 bytes;                  /* the request's data length when it completed */
    u32 completed_bytes;
    u32 cmd_flags;
    u8 status;                  /* blk_status_t */
    u8 partial;                 /* the request goes on after this completion */
    u8 pad[2];
    char disk_name[DISK_NAME_LEN];
};

struct inflight_request {
    u64 issue_ns;
    struct tapio_task task;
};

struct baseline_key {
    u32 dev;
    u32 op;
};

/* EWMAs in the style of TCP's srtt/rttvar: gains 1/8 and 1/4. */
struct baseline {
    u64 mean_ns;
    u64 deviation_ns;
    u64 samples;
};

BPF_HASH(inflight, u64, struct inflight_request, STORAGE_MAX_INFLIGHT);
BPF_HASH(device_warning_ns, u32, u64, STORAGE_MAX_DEVICES);
BPF_TABLE("lru_hash", struct baseline_key, struct baseline, baselines, STORAGE_MAX_DEVICES);
BPF_ARRAY(storage_settings, u64, 2);
BPF_ARRAY(storage_counts, u64, 2);

static __always_inline void count(int slot)
{
    u64 *value = storage_counts.lookup(&slot);
    if (value)
        lock_xadd(value, 1);
}

static __always_inline u64 counted(int slot)
{
    u64 *value = storage_counts.lookup(&slot);
    return value ? *value : 0;
}

static __always_inline u64 setting(int slot)
{
    u64 *value = storage_settings.lookup(&slot);
    return value ? *value : 0;
}

RAW_TRACEPOINT_PROBE(block_rq_issue)
{
    u64 rq = ctx->args[0];
    struct inflight_request request = {};
    request.issue_ns = bpf_ktime_get_ns();
    tapio_current_task(&request.task);
    /* A requeued request is issued again: the newer issue replaces the older. */
    if (inflight.update(&rq, &request) != 0)
        count(COUNT_OVERFLOW);
    return 0;
}

static __always_inline void learn(struct baseline_key *key, struct baseline *seen, u64 latency_ns)
{
    if (!seen) {
        struct baseline first = {latency_ns, latency_ns / 2, 1};
        baselines.update(key, &first);
        return;
    }
    /* Racing CPUs may lose an update here; a baseline can afford that, a lock it cannot. */
    u64 mean = seen->mean_ns, deviation = seen->deviation_ns;
    u64 error = latency_ns > mean ? latency_ns - mean : mean - latency_ns;
    seen->mean_ns = latency_ns > mean ? mean + (error >> 3) : mean - (error >> 3);
    seen->deviation_ns = error > deviation ? deviation + ((error - deviation) >> 2)
                                           : deviation - ((deviation - error) >> 2);
    seen->samples++;
}

RAW_TRACEPOINT_PROBE(block_rq_complete)
{
    u64 rq = ctx->args[0];
    u8 status = (u8)ctx->args[1];
    u32 completed_bytes = (u32)ctx->args[2];
    struct inflight_request *issued = inflight.lookup(&rq);
    if (!issued) {
        /* Issued before we attached, or never issued (flush sequences): no latency to judge. */
        count(COUNT_UNMATCHED);
        return 0;
    }
    u64 now = bpf_ktime_get_ns();
    u64 latency_ns = now - issued->issue_ns;

    u32 bytes = 0, cmd_flags = 0, major = 0, minor = 0;
    void *queue = NULL, *disk = NULL;
    TAPIO_READ_AT(bytes, rq, STORAGE_RQ_DATA_LEN_OFFSET);
    TAPIO_READ_AT(cmd_flags, rq, STORAGE_RQ_CMD_FLAGS_OFFSET);
    TAPIO_READ_AT(queue, rq, STORAGE_RQ_QUEUE_OFFSET);
    if (queue)
        TAPIO_READ_AT(disk, queue, STORAGE_QUEUE_DISK_OFFSET);
    if (disk) {
        TAPIO_READ_AT(major, disk, STORAGE_DISK_MAJOR_OFFSET);
        TAPIO_READ_AT(minor, disk, STORAGE_DISK_FIRST_MINOR_OFFSET);
    }
    u32 dev = major << MINORBITS | minor;
    /* A partial completion (fewer bytes than remain) leaves the request in flight. */
    u8 partial = completed_bytes < bytes;

    u64 warning_ns = setting(SETTING_SCREEN_NS);
    u64 *device_warning = device_warning_ns.lookup(&dev);
    if (device_warning)
        warning_ns = *device_warning;
    u64 op_mask = setting(SETTING_OP_MASK);
    struct baseline_key key = {dev, cmd_flags & (u32)op_mask};
    struct baseline *seen = op_mask ? baselines.lookup(&key) : NULL;
    /* Not configured yet (warning 0): judge no latency, but never miss an error. */
    u8 slow = warning_ns && latency_ns >= warning_ns;

    if (status == 0 && !slow) {
        if (op_mask)
            learn(&key, seen, latency_ns);
        if (!partial)
            inflight.delete(&rq);
        return 0;
    }

    struct storage_record rec = {};
    rec.timestamp_ns = now;
    rec.latency_ns = latency_ns;
    rec.task = issued->task;
    if (seen) {
        rec.baseline_ns = seen->mean_ns;
        rec.baseline_deviation_ns = seen->deviation_ns;
        rec.baseline_samples = seen->samples;
    }
    if (!partial)
        inflight.delete(&rq);  /* `issued` is not ours to read after this */
#ifdef STORAGE_RQ_SECTOR_OFFSET
    TAPIO_READ_AT(rec.sector, rq, STORAGE_RQ_SECTOR_OFFSET);
#endif
    rec.unmatched_completions = counted(COUNT_UNMATCHED);
    rec.inflight_overflows = counted(COUNT_OVERFLOW);
    rec.dev_major = major;
    rec.dev_minor = minor;
    rec.bytes = bytes;
    rec.completed_bytes = completed_bytes;
    rec.cmd_flags = cmd_flags;
    rec.status = status;
    rec.partial = partial;
#ifdef STORAGE_DISK_NAME_OFFSET
    if (disk)
        bpf_probe_read_kernel_str(rec.disk_name, sizeof(rec.disk_name),
                                  (const char *)disk + STORAGE_DISK_NAME_OFFSET);
#endif
    tapio_submit(&rec, sizeof(rec));
    return 0;
}
