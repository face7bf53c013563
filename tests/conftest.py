import os

# Tiny models on a 2-core box: intra-op threads only add contention (measured 50x slower steps
# with two test processes each spinning 2 threads). Launched ranks inherit the variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)
