import os
import sys

# OpenMP threads that wait for work by spinning hold their core: when the CPU is shared (other
# jobs, a dashboard, a data thread), a spinning thread delays the one doing the work, and a
# two-thread training step on a busy 2-core machine took 5-9x longer (1.4-2.3 s against
# 0.18-0.26 s with PASSIVE; docs/performance.md). Read once, before torch starts OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from experiments.cli import main  # noqa: E402  (after the environment it reads)

sys.exit(main())
