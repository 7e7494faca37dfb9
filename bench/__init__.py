"""jobworker's benchmark: `python -m bench` measures the figures of issues 2, 3 and 4.

Every figure is set against a baseline measured in the same run on the same machine, so the
ratios hold on a shared, noisy host where the raw figures do not.
"""

import os

# Before anything imports grpc: the baseline spawns processes from this process (DESIGN.md).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
