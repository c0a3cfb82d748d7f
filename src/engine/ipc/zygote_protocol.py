"""Messages between the engine and its zygote, one pickled dataclass per
SOCK_SEQPACKET message.

  engine → zygote  Spawn (+ the child's control fd as ancillary data)
                   Ping: answered with Pong once the zygote has preloaded and forks
  zygote → engine  Spawned: the standby (with its inbox when made) or a fresh fork
                   Refused: a request the zygote could not read
                   Exited: a child the zygote reaped (its wait status)
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass

from .endpoints import ProcessArgs


@dataclass(frozen=True, slots=True)
class Spawn:
    req: int
    args: ProcessArgs


@dataclass(frozen=True, slots=True)
class Spawned:
    req: int
    pid: int
    #: the name of the child's inbox if a standby made it already, else None
    inbox: str | None


@dataclass(frozen=True, slots=True)
class Refused:
    req: int | None
    message: str


@dataclass(frozen=True, slots=True)
class Exited:
    pid: int
    #: as os.waitpid returns it
    status: int


@dataclass(frozen=True, slots=True)
class Ping:
    req: int


@dataclass(frozen=True, slots=True)
class Pong:
    req: int


ZygoteMessage = Spawn | Spawned | Refused | Exited | Ping | Pong


def dumps(msg: ZygoteMessage) -> bytes:
    return pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)


def loads(data: bytes) -> ZygoteMessage:
    msg = pickle.loads(data)
    if not isinstance(msg, Spawn | Spawned | Refused | Exited | Ping | Pong):
        raise TypeError(f"not a zygote message: {type(msg).__name__}")
    return msg
