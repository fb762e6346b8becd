"""The pmc observer's ring-buffer record, as ``struct pmc_record`` in pmc.bpf.c lays it out."""

from tapio_core import record_dtype

#: The counters in record order: index into ``counter``/``enabled``/``running``
#: and bit in ``valid`` (PMC_CYCLES, PMC_INSTRUCTIONS, PMC_STALL_CYCLES in C).
COUNTERS = ("cycles", "instructions", "stall_cycles")
CYCLES, INSTRUCTIONS, STALL_CYCLES = range(len(COUNTERS))

PMC_RECORD = record_dtype([
    ("timestamp_ns", "<u8"),
    ("counter", "<u8", (3,)),  # cumulative since the counter was opened
    ("enabled", "<u8", (3,)),  # ns enabled / running: running < enabled means multiplexed
    ("running", "<u8", (3,)),
    ("cpu", "<u4"),
    ("valid", "<u4"),          # bit i: counter i was read
])
