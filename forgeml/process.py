"""Facts about the process captured when forgeml is first imported (the package imports this module)."""

import os

#: The CPUs this process could run on when forgeml was imported, before any TVM thread pool could pin it
#: to core 0: benchmark workers are started with this mask (forgeml.bench.worker).
START_AFFINITY: list[int] | None = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
