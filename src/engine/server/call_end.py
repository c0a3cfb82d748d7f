"""Why gRPC cancelled a call's handler, in words for its one log line.

grpc.aio cancels a handler's task when the client cancels the call, when
the client goes away, when the call's deadline passes and when the server
stops; none of these is an error of the engine (no traceback), but an
operator wants to know which it was. (A stream's requests may also just
end first: to the handler a cancel can look like the client half-closing.)
Only the deadline leaves a trace: the
time the call had, noted as it starts. The client's clock runs out a
moment before the server's (it counts from when it sent the call), so its
cancel can come in just ahead of the server's own deadline: a cancel
within `DEADLINE_SLACK_S` of the deadline is the deadline's.
"""

from __future__ import annotations

import time
from typing import Any

#: how close to its deadline a cancelled call counts as timed out (see above)
DEADLINE_SLACK_S = 0.25
DEADLINE_PASSED = "the client's deadline passed"


class CallEnd:
    """Made as a call starts; `why()`, asked as its handler is cancelled, says what ended it."""

    def __init__(self, context: Any, engine: Any) -> None:
        self._engine = engine
        remaining = context.time_remaining()
        self.deadline = None if remaining is None else time.monotonic() + remaining

    def deadline_passed(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline - DEADLINE_SLACK_S

    def why(self) -> str:
        if not self._engine.accepting:
            return "the server is stopping"
        if self.deadline_passed():
            return DEADLINE_PASSED
        return "the client cancelled the call (or went away)"


__all__ = ["DEADLINE_PASSED", "DEADLINE_SLACK_S", "CallEnd"]
