"""Test-session settings shared by every suite."""

import os

# Many small kernels on a 2-core (often shared) machine run faster and far more predictably
# single-threaded; set before numpy/torch start their thread pools.
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, "1")

import torch  # noqa: E402

torch.set_num_threads(1)
