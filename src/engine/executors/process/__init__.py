"""Process executor: each node in its own process, frames over iceoryx2.

- `manager`       one per engine: zygote, iceoryx2 space and inbox, capacity, pool
- `zygote_client` the engine's side of engine.zygote (typed messages in ipc.zygote_protocol)
- `inbox`         the engine's one event inbox and its slot table
- `supervised`    one node process: launch, handshake, pidfd liveness, stop escalation
- `pool`          prewarmed processes (generic, or with their node initialized)
- `prewarm_nodes` which nodes runtime.toml keeps initialized ahead, resolved as a session would
- `runner`        a node's session-side life in its process
- `memory`        PSS/RSS sampling and the session memory limit

The child's side is engine.worker; what both sides share is in engine.ipc.
"""

from .manager import ProcessManager
from .runner import ProcessRunner
from .supervised import describe_status
from .zygote_client import THREAD_VARS

__all__ = ["THREAD_VARS", "ProcessManager", "ProcessRunner", "describe_status"]
