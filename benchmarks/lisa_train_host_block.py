"""`python -m lisa_dist.train` with another host-block threshold than its backend's, for the side-by-side rows
of benchmarks/load_memory.py: LISA_BENCH_HOST_BLOCK=<bytes> for every backend, or `glibc` to leave glibc's
adaptive threshold (what lisa-train did before it called memory.map_large_host_blocks)."""
import os
import sys

import lisa_dist.recipe.train as train

value = os.environ["LISA_BENCH_HOST_BLOCK"]
if value == "glibc":
    train.map_large_host_blocks = lambda threshold: None
else:
    for backend in train.BACKENDS.values():
        backend.host_block = int(value)

if __name__ == "__main__":
    sys.exit(train.main())
