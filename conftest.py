"""Settings for the whole test session that must come before the first ``import torch``."""

import os

# OpenMP threads that busy-wait make the CPU tests several times slower whenever other
# processes share the cores (see README, "Reference model"); passive waiting avoids that.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
