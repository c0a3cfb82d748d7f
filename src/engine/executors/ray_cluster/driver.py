"""The engine's Ray driver: a process of its own that holds the cluster connection.

    python -m engine.executors.ray_cluster.driver FD ADDRESS NAMESPACE

Ray's driver (its core worker: a few dozen threads, sockets, log files, and
now and then a descriptor it never closes) lives here, not in the engine: the
engine starts this process when a session first needs the cluster and ends
it when none has for `idle_disconnect_secs`, so everything Ray opened goes
with it. It creates the sessions' actors (one per node and session), passes
the engine's calls on in the order they came, and sends back each call's
items as they arrive:

    engine → ("start", call, actor, cls, params, accepts, options, process_timeout)
                                        create it, stream its start()
             ("stream", call, actor, method, args)  a streaming-generator method
             ("value", call, actor, method, args)   a plain method
             ("watch", call, actor, every, timeout)  answers only when the actor dies
                                        (or its heartbeat stops for `timeout`)
             ("kill", call, actor)      answers once Ray reports it dead
             ("shortfall", call, resources)
             ("echo", call, value)      answers `value` (the hop alone, for the bench)
             ("exit",)
    driver → ("ready",) | ("error", message)        once, after connecting
             ("item", call, value) ... then ("done", call) | ("fail", call, cause, message)

If the engine goes away (its socket closes) the driver kills every actor it
made and exits; if the driver dies, Ray ends its actors (it owns them) and
the engine fails the sessions that used them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sys
from typing import Any

from . import wire

#: seconds a kill waits for Ray to report the actor dead
_KILL_WAIT_SECS = 5.0


def probe(address: str) -> None:
    """OSError when `address` ("H:P" or "ray://H:P") takes no TCP connection: Ray itself
    would retry for minutes. "auto" and the like are left to Ray (it fails fast)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if host and port.isdigit():
        with socket.create_connection((host, int(port)), timeout=5):
            pass


def shortfall(resources: dict[str, Any]) -> str:
    """Which of `resources` no live node of the cluster has ("" = one has them all)."""
    import ray

    want = {"CPU": resources.get("num_cpus", 0), "GPU": resources.get("num_gpus", 0),
            "memory": resources.get("memory", 0), **resources.get("resources", {})}
    want = {k: v for k, v in want.items() if v}
    best: dict[str, float] = {}
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        have = node.get("Resources", {})
        if all(have.get(k, 0) >= v for k, v in want.items()):
            return ""
        for k in want:
            best[k] = max(best.get(k, 0), have.get(k, 0))
    missing = [k for k, v in want.items() if best.get(k, 0) < v]
    if not missing:  # each exists somewhere, never all on one node
        return "all of " + ", ".join(f"{k} {_amount(k, v)}" for k, v in want.items()) + " on one node"
    return ", ".join(f"{k} {_amount(k, want[k])} (the most any node has: {_amount(k, best.get(k, 0))})"
                     for k in missing)


def _amount(resource: str, value: float) -> str:
    return f"{value / 1024**3:.1f} GB" if resource == "memory" else f"{value:g}"


class ActorGone(Exception):
    """An actor that stopped answering before Ray said it died."""


class Driver:
    def __init__(self, link: wire.Link) -> None:
        self.link = link
        self.actors: dict[str, Any] = {}
        self.dead: dict[str, asyncio.Event] = {}  # actor → set once its watch ended (it is dead)
        self.tasks: set[asyncio.Task] = set()

    def send(self, message: Any) -> None:
        with contextlib.suppress(ConnectionError):  # the engine is gone: serve() ends
            self.link.send(message)

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _answer(self, call: int, work: Any) -> None:
        import ray

        try:
            await work
            self.send(("done", call))
        except (ray.exceptions.RayActorError, ActorGone) as exc:
            self.send(("fail", call, "actor_died", _first_line(exc)))
        except ray.exceptions.RayError as exc:
            self.send(("fail", call, "ray", f"{type(exc).__name__}: {_first_line(exc)}"))
        except Exception as exc:  # noqa: BLE001 - reported to the engine, which fails the node
            self.send(("fail", call, "driver", f"{type(exc).__name__}: {exc}"))

    async def _stream(self, call: int, gen: Any) -> None:
        async for ref in gen:
            self.send(("item", call, await ref))
            await self.link.drain()

    async def _value(self, call: int, ref: Any) -> None:
        self.send(("item", call, await ref))

    async def _kill(self, actor: str) -> None:
        import ray

        handle, dead = self.actors.pop(actor, None), self.dead.pop(actor, None)
        if handle is None:
            return
        ray.kill(handle, no_restart=True)
        if dead is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(dead.wait(), _KILL_WAIT_SECS)

    async def _watch(self, actor: str, every: float, silence: float) -> None:
        """The actor's heartbeat: an item every `every` seconds from a streaming call.
        It fails at once when Ray knows the actor is dead, and when no item came for
        `silence` seconds (its worker or its machine gone, which Ray itself confirms only
        after its own health checks, seconds later)."""
        dead = self.dead.setdefault(actor, asyncio.Event())
        beats = self.actors[actor].heartbeat.remote(every)
        try:
            while True:
                try:
                    async with asyncio.timeout(silence):
                        await (await beats.__anext__())
                except TimeoutError:
                    raise ActorGone(f"no heartbeat for {silence:g} s: its worker or its machine is gone") from None
        finally:
            dead.set()

    def handle(self, message: tuple) -> bool:
        import ray

        from .actor import NodeActor

        op = message[0]
        if op == "start":
            _, call, actor, cls, params, accepts, options, timeout = message
            handle = ray.remote(NodeActor).options(max_restarts=0, max_task_retries=0, **options).remote(
                actor.rpartition("/")[2], cls, params, accepts, timeout)
            self.actors[actor] = handle
            self.spawn(self._answer(call, self._stream(call, handle.start.remote())))
        elif op == "stream":
            _, call, actor, method, args = message
            gen = getattr(self.actors[actor], method).remote(*args)  # submitted now, in order
            self.spawn(self._answer(call, self._stream(call, gen)))
        elif op == "value":
            _, call, actor, method, args = message
            self.spawn(self._answer(call, self._value(call, getattr(self.actors[actor], method).remote(*args))))
        elif op == "watch":
            _, call, actor, every, timeout = message
            self.spawn(self._answer(call, self._watch(actor, every, timeout)))
        elif op == "kill":
            _, call, actor = message
            self.spawn(self._answer(call, self._kill(actor)))
        elif op == "shortfall":
            _, call, resources = message
            self.spawn(self._answer(call, self._reply(call, shortfall, resources)))
        elif op == "echo":  # the engine ↔ driver hop alone (the bench measures it)
            _, call, value = message
            self.send(("item", call, value))
            self.send(("done", call))
        elif op == "exit":
            return False
        return True

    async def _reply(self, call: int, fn: Any, *args: Any) -> None:
        self.send(("item", call, await asyncio.to_thread(fn, *args)))

    async def serve(self) -> None:
        while True:
            try:
                message = await self.link.read()
            except ConnectionError:
                break  # the engine is gone
            try:
                if not self.handle(message):
                    break
            except Exception as exc:  # noqa: BLE001 - e.g. a call to an actor already killed
                if len(message) > 1 and isinstance(message[1], int):
                    self.send(("fail", message[1], "driver", f"{type(exc).__name__}: {exc}"))
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*(self._kill(a) for a in list(self.actors)), return_exceptions=True)


async def _await(ref: Any) -> Any:
    return await ref


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


async def main(fd: int, address: str, namespace: str) -> int:
    link = wire.Link(socket.socket(fileno=fd))
    driver = Driver(link)
    try:
        import ray

        probe(address)
        ray.init(address=address, namespace=namespace, log_to_driver=False, logging_level=logging.WARNING)
    except Exception as exc:  # noqa: BLE001 - the engine reports it as the node's error
        driver.send(("error", f"{type(exc).__name__}: {_first_line(exc)}"))
        await link.flush()
        await link.close()
        return 2
    driver.send(("ready",))
    try:
        await driver.serve()
    finally:
        await link.flush()
        ray.shutdown()
        await link.close()
    return 0


if __name__ == "__main__":
    try:
        from setproctitle import setproctitle

        setproctitle(f"rme-ray-driver {sys.argv[2]}")
    except ImportError:
        pass
    sys.exit(asyncio.run(main(int(sys.argv[1]), sys.argv[2], sys.argv[3])))
