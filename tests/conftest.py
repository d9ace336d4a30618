import os

import torch

# Tests run on a 2-core machine, often beside other processes: one intra-op thread per process
# keeps multi-process tests from oversubscribing and keeps timings stable.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")
