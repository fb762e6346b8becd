/* Tapio storage observer: block requests that failed or took too long.
 *
 * Issue and completion are matched by the request pointer (raw tracepoints
 * give it), so every latency is exact: a completion whose issue we did not see
 * is counted, never reported. Who submitted the request is remembered before
 * it reaches the driver, because completion runs in interrupt context, and a
 * request an I/O scheduler or the software queues held may be dispatched by a
 * kblockd worker: block_rq_insert fires in the submitter's context, so an
 * inserted request carries who inserted it; one issued directly, who issued it.
 * Normal requests are judged here and dropped here: only failures and requests
 * slower than the device's warning threshold reach the ring buffer, at most a
 * burst and then a steady rate of each per device (a token bucket); the rest are
 * counted, and the next record sent carries how many were held back. Normal
 * requests also teach the per-device, per-operation baseline what normal looks
 * like.
 *
 * Every block request passes through here twice, so the hot path avoids hash
 * map updates and deletes (their bucket locks cost more than the rest put
 * together): in-flight requests live in a fixed table of slots claimed with
 * compare-and-swap, and the one hash lookup per completion finds the device's
 * threshold and baselines together. Only inserted requests pay for a hash
 * update (at insert) and delete (at issue).
 *
 * Kernels differ in two places, each declared in __init__.py so the agent and
 * `tapio doctor` agree: the disk is request_queue.disk (6.1 has it) or
 * request.rq_disk (5.10), and block_rq_complete hands over a blk_status_t
 * (6.1) or blk_status_to_errno()'s errno (5.10).
 */
#include <tapio.h>  /* the agent puts events, tapio_lost and tapio_submit() before this */

/* Slots for requests in flight; a power of two. A request probes INFLIGHT_PROBES of them. */
#ifndef STORAGE_MAX_INFLIGHT
#define STORAGE_MAX_INFLIGHT 16384
#endif
#if STORAGE_MAX_INFLIGHT < 4 || (STORAGE_MAX_INFLIGHT & (STORAGE_MAX_INFLIGHT - 1)) != 0
#error "STORAGE_MAX_INFLIGHT must be a power of two, at least 4"
#endif
#define INFLIGHT_PROBES 4
/* Requests inserted into I/O schedulers and software queues, not yet issued: their submitters. */
#ifndef STORAGE_MAX_QUEUED
#define STORAGE_MAX_QUEUED 16384
#endif
#define STORAGE_MAX_DEVICES 4096
/* Baselines for operation codes 0-3: read, write, flush, discard on every kernel since 4.10. */
#define BASELINE_OPS 4
#define DISK_NAME_LEN 32
#define MINORBITS 20  /* the kernel's dev_t: major << 20 | minor */

/* storage_settings slots, written by tapio_observer_started. */
#define SETTING_SCREEN_NS 0  /* warning threshold for devices userspace has not matched yet */
#define SETTING_OP_MASK   1  /* REQ_OP_MASK of this kernel, from BTF */
#define SETTING_RECORD_COST_NS  2  /* per device and kind: the token bucket's price of one record ... */
#define SETTING_RECORD_BURST_NS 3  /* ... and its size */
#define SETTINGS 4
/* storage_counts slots (BpfCounters in __init__.py: the agent shows them in `tapio status`). */
#define COUNT_UNMATCHED 0
#define COUNT_OVERFLOW  1
#define COUNT_SUPPRESSED 2
#define COUNTS 3
/* device_state.limits: one token bucket per device for each kind of record. */
#define LIMIT_IO_ERROR 0
#define LIMIT_LATENCY  1

/* Mirrors STORAGE_RECORD in tapio_observer_storage/records.py. */
struct storage_record {
    u64 timestamp_ns;           /* completion */
    u64 latency_ns;             /* issue -> completion */
    u64 sector;
    u64 baseline_ns;            /* normal latency on this device and operation before this request */
    u64 baseline_deviation_ns;
    u64 baseline_samples;
    u64 queue;                  /* the request queue: the device's key in the devices map */
    struct tapio_task task;     /* who issued the request */
    u32 dev_major;
    u32 dev_minor;
    u32 bytes;                  /* the request's data length when it completed */
    u32 completed_bytes;
    u32 cmd_flags;
    u32 suppressed;             /* records of this device and kind held back since its previous one */
    u8 status;                  /* blk_status_t, or an errno where status_is_errno */
    u8 partial;                 /* the request goes on after this completion */
    u8 device_matched;          /* the warning threshold was the device's own, not the screen */
    u8 status_is_errno;         /* status is the errno blk_status_to_errno() gave (e.g. on 5.10) */
    char disk_name[DISK_NAME_LEN];
};

/* rq == 0: free. Claimed by the issue with compare-and-swap, freed by the completion. */
struct inflight_slot {
    u64 rq;
    u64 issue_ns;
    struct tapio_task task;
};

/* EWMAs in the style of TCP's srtt/rttvar: gains 1/8 and 1/4. */
struct baseline {
    u64 mean_ns;
    u64 deviation_ns;
    u64 samples;
};

/* Keyed by request queue pointer: one per disk, and found with no further reads. */
struct device_state {
    u64 warning_ns;  /* the device's own threshold, written by userspace; 0: not matched yet */
    u32 dev;         /* major << 20 | minor, read when the queue was first seen */
    u32 pad;
    struct baseline ops[BASELINE_OPS];
    struct tapio_limit limits[2];  /* LIMIT_IO_ERROR, LIMIT_LATENCY: a failing disk sends a few, counts the rest */
};

BPF_ARRAY(inflight, struct inflight_slot, STORAGE_MAX_INFLIGHT);
/* request -> who inserted it; an LRU, so an entry the kernel never issues cannot pile up. */
BPF_TABLE("lru_hash", u64, struct tapio_task, submitters, STORAGE_MAX_QUEUED);
BPF_TABLE("lru_hash", u64, struct device_state, devices, STORAGE_MAX_DEVICES);
BPF_ARRAY(storage_settings, u64, SETTINGS);
BPF_PERCPU_ARRAY(storage_counts, u64, COUNTS);

static __always_inline void count(int slot)
{
    tapio_count(storage_counts.lookup(&slot));
}

static __always_inline u64 setting(int slot)
{
    u64 *value = storage_settings.lookup(&slot);
    return value ? *value : 0;
}

static __always_inline u32 first_slot(u64 rq)
{
    return tapio_pointer_slot(rq, __builtin_ctzll(STORAGE_MAX_INFLIGHT));
}

/* Fires in the submitter's context. A requeued request is inserted again by a kblockd worker: its new
 * issue keeps the first issue's submitter. */
RAW_TRACEPOINT_PROBE(block_rq_insert)
{
    u64 rq = ctx->args[0];
    struct tapio_task task = {};
    tapio_current_task(&task);
    submitters.update(&rq, &task);
    return 0;
}

/* A request merged into another is freed without an issue: forget its submitter. */
RAW_TRACEPOINT_PROBE(block_rq_merge)
{
    u64 rq = ctx->args[0];
    submitters.delete(&rq);
    return 0;
}

RAW_TRACEPOINT_PROBE(block_rq_issue)
{
    u64 rq = ctx->args[0];
    struct tapio_task *inserted_by = submitters.lookup(&rq);
    u32 first = first_slot(rq);
    int tracked = 0;
#pragma unroll
    for (u32 probe = 0; probe < INFLIGHT_PROBES; probe++) {
        u32 index = (first + probe) & (STORAGE_MAX_INFLIGHT - 1);
        struct inflight_slot *slot = inflight.lookup(&index);
        if (!slot)
            break;
        int claimed = tapio_cas(&slot->rq, 0, rq);
        /* Ours when free, or already ours: a requeued request is issued again, the newer issue
         * counts and its submitter stays. */
        if (claimed || slot->rq == rq) {
            slot->issue_ns = bpf_ktime_get_ns();
            if (claimed && inserted_by)
                slot->task = *inserted_by;
            else if (claimed)
                tapio_current_task(&slot->task);
            tracked = 1;
            break;
        }
    }
    if (inserted_by)
        submitters.delete(&rq);
    if (!tracked)
        count(COUNT_OVERFLOW);
    return 0;
}

/* Frees a slot the completion found holding rq: only that completion changes a held slot. */
static __always_inline void release(struct inflight_slot *slot, u64 rq)
{
#ifdef TAPIO_BPF_ATOMICS
    tapio_cas(&slot->rq, rq, 0);  /* a full barrier: our copies of the slot are done */
#else
    /* The emulated compare-and-swap fails while another CPU holds the word's lock (an issue trying
     * this slot), which would leak the slot; an atomic add cannot fail, and rq - rq is free. */
    __sync_fetch_and_add(&slot->rq, -rq);
#endif
}

static __always_inline void learn(struct baseline *seen, u64 latency_ns)
{
    /* Racing CPUs may lose an update here; a baseline can afford that, a lock it cannot. */
    u64 mean = seen->mean_ns, deviation = seen->deviation_ns;
    if (seen->samples == 0) {
        mean = latency_ns;
        deviation = latency_ns / 2;
    }
    u64 error = latency_ns > mean ? latency_ns - mean : mean - latency_ns;
    seen->mean_ns = latency_ns > mean ? mean + (error >> 3) : mean - (error >> 3);
    seen->deviation_ns = error > deviation ? deviation + ((error - deviation) >> 2)
                                           : deviation - ((deviation - error) >> 2);
    seen->samples++;
}

/* The request's disk, read only when its queue is first seen and for records. */
static __always_inline void *disk_of(void *rq, void *queue, u32 *major, u32 *minor)
{
    void *disk = NULL;
#ifdef STORAGE_QUEUE_DISK_OFFSET
    TAPIO_READ_AT(disk, queue, STORAGE_QUEUE_DISK_OFFSET);
#else
    TAPIO_READ_AT(disk, rq, STORAGE_RQ_DISK_OFFSET);  /* the agent compiles us only with one of the two */
#endif
    if (disk) {
        TAPIO_READ_AT(*major, disk, STORAGE_DISK_MAJOR_OFFSET);
        TAPIO_READ_AT(*minor, disk, STORAGE_DISK_FIRST_MINOR_OFFSET);
    }
    return disk;
}

static __always_inline struct device_state *device_state_of(u64 rq, u64 queue)
{
    struct device_state *state = devices.lookup(&queue);
    if (state || !queue)
        return state;
    struct device_state fresh = {};
    u32 major = 0, minor = 0;
    disk_of((void *)rq, (void *)queue, &major, &minor);
    fresh.dev = major << MINORBITS | minor;
    devices.insert(&queue, &fresh);  /* once per device; if userspace raced us, its entry stays */
    return devices.lookup(&queue);
}

RAW_TRACEPOINT_PROBE(block_rq_complete)
{
    u64 rq = ctx->args[0];
#ifdef STORAGE_STATUS_IS_ERRNO
    int error = (int)ctx->args[1];
    u8 status = (u8)(error < 0 ? -error : error);
#else
    u8 status = (u8)ctx->args[1];
#endif
    u32 completed_bytes = (u32)ctx->args[2];
    u32 first = first_slot(rq);
    struct inflight_slot *slot = NULL, *stale = NULL;
#pragma unroll
    for (u32 probe = 0; probe < INFLIGHT_PROBES; probe++) {
        u32 index = (first + probe) & (STORAGE_MAX_INFLIGHT - 1);
        struct inflight_slot *candidate = inflight.lookup(&index);
        if (candidate && candidate->rq == rq) {
            if (!slot)
                slot = candidate;
            else
                stale = candidate;  /* a requeued request issued again found another slot first */
        }
    }
    if (!slot) {
        /* Issued before we attached, not tracked (table full), or never issued (flush sequences, or
         * inserted and then ended by a dying queue: forget its submitter). */
        count(COUNT_UNMATCHED);
        submitters.delete(&rq);
        return 0;
    }
    u64 now = bpf_ktime_get_ns();
    /* Of two issues, the newer's latency counts and the first's submitter. */
    struct inflight_slot *newest = stale && stale->issue_ns > slot->issue_ns ? stale : slot;
    struct inflight_slot *oldest = newest == slot && stale ? stale : slot;
    u64 latency_ns = now - newest->issue_ns;
    struct tapio_task task = oldest->task;

    u32 bytes = 0, cmd_flags = 0;
    u64 queue = 0;
    TAPIO_READ_AT(bytes, (void *)rq, STORAGE_RQ_DATA_LEN_OFFSET);
    /* A partial completion (fewer bytes than remain) leaves the request in flight. */
    u8 partial = completed_bytes < bytes;
    if (!partial) {
        release(slot, rq);
        if (stale)
            release(stale, rq);
    }
    TAPIO_READ_AT(cmd_flags, (void *)rq, STORAGE_RQ_CMD_FLAGS_OFFSET);
    TAPIO_READ_AT(queue, (void *)rq, STORAGE_RQ_QUEUE_OFFSET);

    struct device_state *state = device_state_of(rq, queue);
    u64 warning_ns = state && state->warning_ns ? state->warning_ns : setting(SETTING_SCREEN_NS);
    u64 op_mask = setting(SETTING_OP_MASK);
    u32 op = cmd_flags & (u32)op_mask;
    struct baseline *seen = state && op_mask && op < BASELINE_OPS ? &state->ops[op] : NULL;
    /* Not configured yet (screen 0): judge no latency, but never miss an error. */
    u8 slow = warning_ns && latency_ns >= warning_ns;

    if (status == 0 && !slow) {
        if (seen)
            learn(seen, latency_ns);
        return 0;
    }

    u32 suppressed = 0;
    if (state && !tapio_limit_allows(&state->limits[status ? LIMIT_IO_ERROR : LIMIT_LATENCY], now,
                                     setting(SETTING_RECORD_COST_NS), setting(SETTING_RECORD_BURST_NS),
                                     &suppressed)) {
        count(COUNT_SUPPRESSED);
        return 0;
    }

    struct storage_record rec = {};
    rec.timestamp_ns = now;
    rec.suppressed = suppressed;
    rec.latency_ns = latency_ns;
    rec.task = task;
    if (seen) {
        rec.baseline_ns = seen->mean_ns;
        rec.baseline_deviation_ns = seen->deviation_ns;
        rec.baseline_samples = seen->samples;
    }
#ifdef STORAGE_RQ_SECTOR_OFFSET
    TAPIO_READ_AT(rec.sector, (void *)rq, STORAGE_RQ_SECTOR_OFFSET);
#endif
    rec.queue = queue;
    u32 major = 0, minor = 0;
    void *disk = queue ? disk_of((void *)rq, (void *)queue, &major, &minor) : NULL;
    rec.dev_major = major;
    rec.dev_minor = minor;
    rec.bytes = bytes;
    rec.completed_bytes = completed_bytes;
    rec.cmd_flags = cmd_flags;
    rec.status = status;
#ifdef STORAGE_STATUS_IS_ERRNO
    rec.status_is_errno = 1;
#endif
    rec.partial = partial;
    rec.device_matched = state && state->warning_ns;
#ifdef STORAGE_DISK_NAME_OFFSET
    if (disk)
        bpf_probe_read_kernel_str(rec.disk_name, sizeof(rec.disk_name),
                                  (const char *)disk + STORAGE_DISK_NAME_OFFSET);
#endif
    tapio_submit(&rec, sizeof(rec));
    return 0;
}
