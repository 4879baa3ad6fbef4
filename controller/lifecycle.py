"""The controller's conversation with systemd: status line, health checks, and what SIGHUP applies live.

Built by ``controller.app`` on ``selfheal.service.Service`` (readiness,
watchdog, SIGHUP). A reload applies live:

- **rulebooks** — the files in ``controller.rulebooks`` (or the built-in
  default) are re-read and validated on every reload, changed or not, since
  operators edit the YAML and send SIGHUP. The engine and its reconciler take
  the new rulebook between two ticks; thresholds follow. Anomaly watches are
  rebuilt only when their specs changed; the streams of the watches whose
  spec did not change carry over, the others start learning afresh.
- **notification routes** (``controller.notify``) — ``Routes`` stops the
  running router (its unsent changes get their last message, as at shutdown)
  and starts one over the new destinations; grouping starts afresh.
- **node keys** — the files in ``security.key_dir`` are re-read (``controller.keyring``; the
  ring also reloads by itself when the directory changes), so a key added or rotated applies
  without a restart.
- ``log`` (by ``Service`` itself).

Everything else (broker, listen address, state dir, timeouts, budget, the key_dir path,
PromQL sources) is wired into running parts and named as needing a restart.
Nothing is swapped until everything new has been built and validated, so a
bad rulebook or destination keeps the running config whole.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from controller.notify import Delivery, Notification
from controller.notify.router import Router
from rules.loader import load_rulebooks
from selfheal.config import Config, NotifyConfig
from selfheal.service import Service

if TYPE_CHECKING:
    from controller.app import Controller
    from controller.engine import Engine


class Routes:
    """The chat routes as one notifier whose router a reload can replace while the controller runs."""

    def __init__(self, router: Router | None) -> None:
        self.router = router
        self._replaced = asyncio.Event()

    async def notify(self, notification: Notification) -> list[Delivery]:
        return await self.router.notify(notification) if self.router is not None else []

    def replace(self, router: Router | None) -> None:
        """New notifications go to ``router`` at once; the old one drains in ``run``."""
        self.router = router
        self._replaced.set()

    async def run(self, *, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self._replaced.clear()
            router, router_stop = self.router, asyncio.Event()
            async with asyncio.TaskGroup() as tg:
                if router is not None:
                    tg.create_task(router.run(stop=router_stop), name="notify-router")
                waiters = [tg.create_task(stop.wait(), name="notify-stop"),
                           tg.create_task(self._replaced.wait(), name="notify-replaced")]
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                for waiter in waiters:
                    waiter.cancel()
                router_stop.set()


def controller_service(controller: Controller, engine: Engine, *, source: Path | None,
                       build_router: Callable[[Sequence[NotifyConfig]], Router | None], routes: Routes,
                       tasks: Mapping[str, asyncio.Task[None]]) -> Service:
    """``tasks``: the controller's named long-lived tasks (filled once they are created); one that ended is a
    problem the watchdog acts on."""
    host, port = controller.config.mqtt.host_port()
    broker = "the embedded broker" if controller.config.mqtt.url == "embedded" else f"the broker at {host}:{port}"

    def describe() -> str:
        counts = controller.index.counts(controller.clock.wall())
        link = "online" if controller.link.connected.is_set() else f"waiting for {broker}"
        api = f"http://{controller.api_address}/" if controller.api_port is not None else "starting"
        return (f"{link}: {counts.nodes - counts.offline}/{counts.nodes} nodes online, {engine.open_count()} open "
                f"incidents, API {api}")

    def tasks_run() -> str | None:
        ended = [name for name, task in tasks.items() if task.done()]
        return f"task(s) ended early: {', '.join(ended)}" if ended else None

    async def apply(new: Config, changed: Sequence[str]) -> list[str]:
        rulebook = await asyncio.to_thread(load_rulebooks, new.controller.rulebooks)  # RulebookError: keep all
        attempts = await engine.attempts_for(rulebook)  # ConfigError (the store unreadable): keep all
        from controller.app import build_watch  # noqa: PLC0415 - app imports this module

        rebuild_watch = (rulebook.anomalies, rulebook.host_models) != (controller.rulebook.anomalies,
                                                                       controller.rulebook.host_models)
        watch = build_watch(rulebook, controller.metrics) if rebuild_watch else controller.anomalies
        new_routes = any(key.startswith("controller.notify") for key in changed)
        router = build_router(new.controller.notify) if new_routes else None
        # Everything is built: swap.
        controller.rulebook = rulebook
        if rebuild_watch:
            if watch is not None and controller.anomalies is not None:  # unchanged watches keep their streams
                watch.adopt_streams(controller.anomalies)
            controller.anomalies = watch
        engine.reload(rulebook, controller.settings(), watch, attempts)
        await asyncio.to_thread(controller.keys.load, controller.clock.wall())  # key files added or rotated
        applied = ["controller.rulebooks", "node keys"]
        if new_routes:
            routes.replace(router)
            applied.append("controller.notify")
        engine.log.info("engine.rulebook_reloaded", rules=[r.name for r in rulebook.rules],
                        anomaly_watches_rebuilt=rebuild_watch)
        return applied

    return Service("selfheal-controller", controller.config, role="controller", source=source,
                   describe=describe, checks=[tasks_run], apply=apply)
