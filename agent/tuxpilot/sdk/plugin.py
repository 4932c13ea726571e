"""The Python plugin SDK: declare event handlers and actions; the SDK serves them on NATS.

    plugin = Plugin.here(__file__)          # reads plugin.toml beside the file

    @plugin.on("memory.high")
    async def hungry(event, ctx):
        return [ctx.propose("top_processes", {"by": "memory"}, reason="memory high")]

    @plugin.action("top_processes")
    def top(params, ctx):                   # plain functions run in a worker thread
        return {"processes": [...]}          # -> {"status": "ok", "data": {...}}

Actions are NATS micro endpoints on the private `tuxpilot.exec.<host>.<plugin>.<action>`, which only
the agent's gate may publish to, in a queue group named after the plugin, so replicas share the load
and `nats micro ls` finds them. Everyone else calls the gate's public `tuxpilot.act.…` endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import importlib.util
import inspect
import json
import os
import pwd
import signal
import sys
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.errors import NoRespondersError as NatsNoResponders
from nats.errors import TimeoutError as NatsTimeout
from nats.micro import add_service
from nats.micro.request import ERROR_CODE_HEADER, ERROR_HEADER, Request
from nats.micro.service import EndpointStats, Service

from tuxpilot.bus import connect as bus
from tuxpilot.bus import streams
from tuxpilot.bus.consumer import Durable, redelivery_delay
from tuxpilot.bus.stored import Publisher
from tuxpilot.lifetime import cancel
from tuxpilot.protocol import launch, schemas
from tuxpilot.protocol.errors import (
    ConfigError,
    Conflict,
    Forbidden,
    PayloadTooLarge,
    TuxPilotError,
    error_doc,
)
from tuxpilot.protocol.manifest import Manifest
from tuxpilot.protocol.manifest import load as load_manifest
from tuxpilot.protocol.models import Event, Proposal, ProposedAction, Result, new_id
from tuxpilot.protocol.names import ACTION_ID_HEADER, EVENT_ID_HEADER, MSG_ID_HEADER, Subjects, proposal_id
from tuxpilot.protocol.registry import Announcement
from tuxpilot.sdk import command
from tuxpilot.sdk.settings import PluginProcessSettings, load_plugin_settings

MAX_PARAMS_BYTES = 256 * 1024
# Replies kept by action id, so a re-sent request is answered without running the action again.
REMEMBERED_REPLIES = 10_000
# After a handover the gate did not answer (none there, or not in time): proposals are stored for this long.
HANDOFF_PAUSE_S = 5.0


class ActionError(TuxPilotError):
    """Raised by an action handler: the caller gets an `error` document with this code and message."""


EventHandler = Callable[[Event, "Context"], Any]
ActionHandler = Callable[[dict[str, Any], "Context"], Any]
TaskHandler = Callable[["Context"], Any]


@dataclass
class Context:
    """What a handler gets besides its input: who it is, a bound logger, its settings, ways to talk back."""

    plugin: Plugin
    host: str
    log: Any
    config: dict[str, Any]
    event: Event | None = None
    action_id: str | None = None
    action: str | None = None  # the action being run, in an action handler

    def propose(
        self,
        action: str,
        params: dict[str, Any] | None = None,
        *,
        reason: str | None = None,
        resource: str | None = None,
    ) -> ProposedAction:
        """One of this plugin's own actions, proposed to the gate."""
        if action not in self.plugin.manifest.actions:
            raise ConfigError(f"{self.plugin.name}: proposes undeclared action {action!r}")
        if resource is None and self.event is not None:
            resource = self.event.resource
        return ProposedAction(
            plugin=self.plugin.name, action=action, params=params or {}, reason=reason, resource=resource
        )

    async def emit(self, event_type: str, **fields: Any) -> Event:
        """Publish an event of a category the manifest declares in `emits`."""
        return await self.plugin.emit(event_type, **fields)

    async def run_command(
        self,
        argv: list[str],
        *,
        timeout_s: float = command.TIMEOUT_S,
        max_output: int = command.MAX_OUTPUT,
        cwd: str | Path | None = None,
        env: dict[str, str] | None = None,
    ) -> command.CommandResult:
        """Run a program the manifest lists in `commands`: an argv list, never a shell string; only in an
        action whose permission is system_access. Killed (with its children) after `timeout_s`; each of
        stdout and stderr keeps `max_output` bytes. See agent/command.py."""
        return await command.run_for(self, argv, timeout_s=timeout_s, max_output=max_output, cwd=cwd, env=env)


def _user_name() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def _matches(pattern: str, event_type: str) -> bool:
    return fnmatch.fnmatchcase(event_type, pattern)


async def _call(fn: Callable[..., Any], *args: Any) -> Any:
    if inspect.iscoroutinefunction(fn):
        return await fn(*args)
    return await asyncio.to_thread(fn, *args)


def parse_params(raw: bytes, limit: int = MAX_PARAMS_BYTES) -> dict[str, Any]:
    """A request body as action params: empty means no params; anything else must be a JSON object."""
    return schemas.parse_params(raw, limit)


def with_defaults(schema: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """Fill the top-level defaults the params schema declares, as authors expect of a schema."""
    props = schema.get("properties") or {}
    missing = {k: v["default"] for k, v in props.items() if isinstance(v, dict) and "default" in v and k not in params}
    return {**missing, **params} if missing else params


def to_result(value: Any) -> Result:
    if isinstance(value, Result):
        return value
    return Result(status="ok", data=value)


class Plugin:
    """A plugin: its manifest, its handlers, and (once started) its NATS service."""

    def __init__(self, manifest: Manifest, folder: Path | None = None):
        self.manifest = manifest
        self.folder = folder
        self.name = manifest.name
        self._event_handlers: list[tuple[str, EventHandler]] = []
        self._actions: dict[str, ActionHandler] = {}
        self._tasks_every: list[tuple[float | str, TaskHandler]] = []
        self._on_start: list[TaskHandler] = []
        self._on_stop: list[TaskHandler] = []
        self._running: _Running | None = None

    @classmethod
    def here(cls, file: str | Path) -> Plugin:
        """The plugin whose plugin.toml sits beside `file` (pass `__file__`); in a container, the manifest
        the host loaded (`TUXPILOT_MANIFEST`) instead of the one the image carries."""
        folder = Path(file).resolve().parent
        return cls(given_manifest() or load_manifest(folder), folder)

    # -- declaring -------------------------------------------------------------------------------

    def on(self, pattern: str) -> Callable[[EventHandler], EventHandler]:
        """Handle events whose type matches `pattern` (`memory.high`, `disk.*`); must be subscribed."""
        if not any(_matches(sub, pattern) or sub == pattern for sub in self.manifest.subscribes):
            raise ConfigError(f"{self.name}: handler for {pattern!r}, which plugin.toml does not subscribe")

        def register(fn: EventHandler) -> EventHandler:
            self._event_handlers.append((pattern, fn))
            return fn

        return register

    def action(self, name: str) -> Callable[[ActionHandler], ActionHandler]:
        """Serve action `name`, declared in plugin.toml with its params schema."""
        if name not in self.manifest.actions:
            raise ConfigError(f"{self.name}: action {name!r} is not declared in plugin.toml")

        def register(fn: ActionHandler) -> ActionHandler:
            self._actions[name] = fn
            return fn

        return register

    def every(self, seconds: float | str) -> Callable[[TaskHandler], TaskHandler]:
        """Run `fn(ctx)` every `seconds` while the plugin runs (errors are logged, the loop goes on).

        `seconds` may name a key of the plugin's config (`plugin.toml` [config], host overrides).
        """

        def register(fn: TaskHandler) -> TaskHandler:
            self._tasks_every.append((seconds, fn))
            return fn

        return register

    def on_start(self, fn: TaskHandler) -> TaskHandler:
        self._on_start.append(fn)
        return fn

    def on_stop(self, fn: TaskHandler) -> TaskHandler:
        self._on_stop.append(fn)
        return fn

    # -- handling, without the bus (the running plugin and tuxpilot.testing share these) -----------

    def subscribed(self, event_type: str) -> bool:
        """Whether the manifest's `subscribes` lets events of `event_type` reach this plugin."""
        return any(_matches(pattern, event_type) for pattern in self.manifest.subscribes)

    async def run_action(self, action: str, raw: bytes, ctx: Context) -> Result:
        """One request's work: params parsed, validated and given their defaults, the handler run.
        Raises what went wrong (a TuxPilotError for the caller's mistakes)."""
        params = parse_params(raw)
        self.manifest.params_validator(action).check(params)
        params = with_defaults(self.manifest.actions[action].params, params)
        return to_result(await _call(self._actions[action], params, ctx))

    async def propose_for(self, event: Event, ctx: Context) -> Proposal | None:
        """Run the handlers matching `event`; their proposed actions as one proposal (None: nothing
        proposed). Its id derives from the event and plugin: the same on every redelivery."""
        actions: list[ProposedAction] = []
        for pattern, fn in self._event_handlers:
            if _matches(pattern, event.type):
                actions.extend(_as_actions(await _call(fn, event, ctx)))
        if not actions:
            return None
        return Proposal(
            id=proposal_id(event.id, self.name), event_id=event.id, plugin=self.name, event=event, actions=actions
        )

    # -- running ---------------------------------------------------------------------------------

    @property
    def running(self) -> _Running:
        if self._running is None:
            raise RuntimeError(f"plugin {self.name} is not started")
        return self._running

    async def start(self, nc: Client, config: PluginProcessSettings) -> None:
        """Announce the manifest, serve the actions, subscribe to the events."""
        settings = {**self.manifest.config, **config.plugin(self.name).config}
        run = _Running(self, nc, config, Subjects.of(config), settings)
        self._running = run
        await run.start()

    async def stop(self) -> None:
        if self._running is not None:
            await self._running.stop()
            self._running = None

    async def emit(self, event_type: str, **fields: Any) -> Event:
        run = self.running
        category = event_type.split(".", 1)[0]
        if category not in self.manifest.emits:
            raise Forbidden(f"{self.name} may not emit {category!r} events (plugin.toml `emits`)")
        event = Event.new(event_type, run.subjects.host, source=self.name, **fields)
        await bus.publish_event(run.nc, run.subjects, event)
        return event

    async def main(self, config: PluginProcessSettings) -> None:
        """Connect, serve until SIGINT/SIGTERM, then stop cleanly."""
        url = bus.local_url(config)
        if url is None:
            raise ConfigError("no NATS server: set TUXPILOT_NATS_URL or start `tuxpilot up`")
        nc = await bus.connect(config.nats, url, name=f"tuxpilot-plugin-{self.name}", on_reconnect=None)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await self.start(nc, config)
            await stop.wait()
        finally:
            await self.stop()
            with contextlib.suppress(Exception):
                await nc.drain()

    def run(self, config: PluginProcessSettings | None = None) -> None:
        """Blocking entry for `python plugin.py`."""
        from tuxpilot.log import setup

        config = config or load_plugin_settings()
        setup(config.log.level, config.log.format)
        asyncio.run(self.main(config))


@dataclass
class _Running:
    """One started plugin: its connection, service, subscriptions and tasks."""

    plugin: Plugin
    nc: Client
    config: PluginProcessSettings
    subjects: Subjects
    settings: dict[str, Any]
    instance: str = field(default_factory=new_id)
    service: Service | None = None
    log: Any = None
    slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(64))
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    consumer: Durable | None = None
    stored: Publisher | None = None  # stores the proposals, once events are consumed
    counts: dict[str, dict[str, float]] = field(default_factory=dict)
    # How long to wait for the gate to decide a proposal handed over by request (0: store every one), and
    # until when not to try (the gate did not answer lately).
    handoff_s: float = field(default_factory=lambda: _seconds(os.environ.get(launch.HANDOFF_TIMEOUT)))
    handoff_paused_until: float = 0.0
    # By action id: the action it ran, and its reply (or the run still under way).
    replies: OrderedDict[str, tuple[str, asyncio.Future[tuple[bytes, dict[str, str] | None]]]] = field(
        default_factory=OrderedDict
    )

    def context(self, event: Event | None = None, action_id: str | None = None, action: str | None = None) -> Context:
        log = self.log
        if event is not None:
            log = log.bind(event_id=event.id)
        if action is not None:
            log = log.bind(action=action)
        if action_id is not None:
            log = log.bind(action_id=action_id)
        return Context(self.plugin, self.subjects.host, log, self.settings, event, action_id, action)

    async def start(self) -> None:
        p = self.plugin
        self.log = structlog.get_logger("tuxpilot.plugin").bind(plugin=p.name, host=self.subjects.host)
        for fn in p._on_start:
            await _call(fn, self.context())
        # The announcement is this service's `$SRV.INFO` metadata; the registry bucket is the agent's
        # to write, from the manifests it loaded itself.
        self.service = await add_service(
            self.nc,
            name=p.name,
            version=p.manifest.version,
            description=p.manifest.description[:256],
            metadata=Announcement(
                host=self.subjects.host,
                plugin=p.name,
                version=p.manifest.version,
                instance=self.instance,
                api_version=p.manifest.api_version,
                # Who this instance really runs as, for `tuxpilot status` (root under a root agent: unconfined).
                user=_user_name(),
                pid=str(os.getpid()),
            ).to_metadata(),
            queue_group=p.name,
            stats_handler=self._stats,
        )
        for name in p.manifest.actions:
            if name not in p._actions:
                self.log.warning("plugin.action_without_handler", action=name)
                continue
            await self.service.add_endpoint(
                name=name, subject=self.subjects.exec(p.name, name), handler=self._endpoint(name)
            )
        if p.manifest.subscribes:
            # One durable consumer per plugin and host, shared by its replicas: each event is
            # handled once per plugin, acked only after the proposal is stored.
            js = self.nc.jetstream()
            self.stored = Publisher(self.nc)
            await self.stored.start()
            if not await streams.have_streams(js, self.subjects):  # no agent yet: create them
                await streams.ensure_streams(js, self.subjects, self.config.streams, update=False)
            self.consumer = streams.plugin_consumer(
                js, p.manifest, self.subjects, self.config.streams, self._on_event_msg
            )
            await self.consumer.start()

        for seconds, fn in p._tasks_every:
            self._spawn(self._every(seconds, fn))
        await self.nc.flush()
        self.log.info("plugin.started", version=p.manifest.version, actions=sorted(p._actions))

    async def stop(self) -> None:
        if self.consumer is not None:
            await self.consumer.stop()
        if self.stored is not None:
            await self.stored.stop()
        if self.service is not None:
            with contextlib.suppress(Exception):
                await self.service.stop()
        await cancel(*self.tasks)
        for fn in self.plugin._on_stop:
            with contextlib.suppress(Exception):
                await _call(fn, self.context())
        self.log.info("plugin.stopped")

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # -- events ----------------------------------------------------------------------------------

    async def _on_event_msg(self, msg: Msg) -> None:
        """Ack after the proposal is stored; a failing handler naks (redelivered with backoff)."""
        try:
            event = Event.model_validate_json(msg.data)
        except ValueError as exc:
            self.log.warning("plugin.bad_event", subject=msg.subject, error=str(exc)[:300])
            await msg.term()  # garbage never gets better by redelivery
            return
        try:
            await self.handle_event(event)
        except Exception as exc:
            delay = redelivery_delay(self.config.streams.backoff_s, msg.metadata.num_delivered)
            if isinstance(exc, NatsError):
                # The bus, not the handler: expected while the server restarts; one line, no traceback.
                self.log.warning("plugin.event_deferred", event_id=event.id, type=event.type, retry_in_s=delay,
                                 error=f"{type(exc).__name__}: {exc}"[:300])
            else:
                self.log.exception("plugin.event_failed", event_id=event.id, type=event.type, retry_in_s=delay)
            with contextlib.suppress(NatsError):  # unacked, it comes back after ack_wait anyway
                await msg.nak(delay=delay)
            return
        await msg.ack()

    async def handle_event(self, event: Event) -> Proposal | None:
        """Run the matching handlers and publish their proposed actions as one proposal.

        The proposal id derives from the event and plugin, and is the JetStream message id, so a
        redelivered event's proposal is deduplicated by the server. A failing handler raises.
        """
        ctx = self.context(event)
        proposal = await self.plugin.propose_for(event, ctx)
        if proposal is None:
            return None
        body, headers = proposal.to_json(), {MSG_ID_HEADER: proposal.id}
        handed = await self.hand_over(body, headers)
        if not handed:
            assert self.stored is not None  # made with the events consumer
            await self.stored.publish(self.subjects.proposal(self.plugin.name), body, headers=headers)
        ctx.log.debug("plugin.proposed", actions=[a.action for a in proposal.actions], proposal_id=proposal.id,
                      handed=handed)
        return proposal

    async def hand_over(self, body: bytes, headers: dict[str, str]) -> bool:
        """Hand a proposal to the gate by request: True once the gate answers that it is decided (its
        records stored). False when it cannot take it now (busy, the bus), does not answer in time or is
        not there: then the proposal is stored, and the gate takes it from the stream."""
        loop = asyncio.get_running_loop()
        if self.handoff_s <= 0 or loop.time() < self.handoff_paused_until:
            return False
        assert self.stored is not None  # made with the events consumer; its inbox takes the answers too
        try:
            reply = await self.stored.request(self.subjects.handoff(self.plugin.name), body, headers, self.handoff_s)
        except NatsNoResponders:  # no gate now (an agent restarting): stored, it is decided when it is back
            self.handoff_paused_until = loop.time() + HANDOFF_PAUSE_S
            return False
        except NatsTimeout:  # a slow decision, or a subject this plugin may not publish on
            self.handoff_paused_until = loop.time() + HANDOFF_PAUSE_S
            self.log.warning("plugin.handoff_unanswered", timeout_s=self.handoff_s, paused_s=HANDOFF_PAUSE_S)
            return False
        except NatsError:
            return False
        try:
            answer = json.loads(reply.data)
        except ValueError:
            return False
        return isinstance(answer, dict) and isinstance(answer.get("decided"), int)

    # -- actions ---------------------------------------------------------------------------------

    def _endpoint(self, action: str) -> Callable[[Request], Awaitable[None]]:
        async def handle(req: Request) -> None:
            # Handlers of one subscription run one at a time; answer in a task so a slow action
            # does not hold up the next request. The semaphore bounds how many run at once.
            await self.slots.acquire()
            self._spawn(self._answer(req, action))

        return handle

    async def _answer(self, req: Request, action: str) -> None:
        try:
            headers = req.headers or {}
            given = headers.get(ACTION_ID_HEADER)
            if given is None:  # only the gate reaches this endpoint, and it always names the action
                body, reply_headers = await self._run_action(req, action, new_id(), headers)
            else:
                # The gate re-sends a request whose reply a reconnect may have lost: the same action
                # id gets the first run's reply (or waits for it), never a second run.
                known = self.replies.get(given)
                if known is None:
                    # Run here, in this request's task, and leave the reply where a re-sent request
                    # finds it: a task of its own and a shield per action cost ~25 µs of its CPU.
                    reply: asyncio.Future[tuple[bytes, dict[str, str] | None]] = (
                        asyncio.get_running_loop().create_future()
                    )
                    self.replies[given] = (action, reply)
                    if len(self.replies) > REMEMBERED_REPLIES:
                        self.replies.popitem(last=False)
                    try:
                        body, reply_headers = await self._run_action(req, action, given, headers)
                    except BaseException:  # cancelled (the plugin stops): a re-sent request is not left waiting
                        reply.cancel()
                        raise
                    reply.set_result((body, reply_headers))
                elif known[0] != action:
                    # A replay answers the same action only: another action's reply is never handed out.
                    self.log.warning("action.id_reused", action=action, action_id=given, first_action=known[0])
                    body, reply_headers = _error_reply(Conflict(
                        f"action id {given} was used for {known[0]}; it cannot be reused for {action}"
                    ))
                else:
                    self.log.info("action.replayed", action=action, action_id=given)
                    body, reply_headers = await asyncio.shield(known[1])
            if len(body) > self.nc.max_payload - 1024:
                # A reply the server would refuse would leave the caller waiting for nothing.
                too_large = PayloadTooLarge(
                    f"{action}'s reply is {len(body)} bytes; the server takes at most {self.nc.max_payload}",
                )
                self.log.warning("action.reply_too_large", action=action, bytes=len(body))
                body, reply_headers = _error_reply(too_large)
            try:
                await req.respond(body, headers=reply_headers)
            except Exception as exc:
                self.log.warning("action.reply_failed", action=action, error=f"{type(exc).__name__}: {exc}")
        finally:
            self.slots.release()

    async def _run_action(
        self, req: Request, action: str, action_id: str, headers: dict[str, str]
    ) -> tuple[bytes, dict[str, str] | None]:
        """Validate, run, and build the reply: a `result` document, or an `error` one with micro headers."""
        started = time.perf_counter()
        ctx = self.context(action=action, action_id=action_id)
        if headers.get(EVENT_ID_HEADER):
            ctx.log = ctx.log.bind(event_id=headers[EVENT_ID_HEADER])
        stat = self.counts.setdefault(action, {"ok": 0, "error": 0, "ms_total": 0.0})
        try:
            result = await self.plugin.run_action(action, req.data, ctx)
            stat["ok"] += 1
            ctx.log.debug("action.done", status=result.status, ms=round((time.perf_counter() - started) * 1000, 2))
            return result.to_json(), None
        except Exception as exc:  # every failure becomes an `error` reply; the plugin lives on
            stat["error"] += 1
            doc = error_doc(exc)
            if isinstance(exc, TuxPilotError):
                ctx.log.info("action.refused", code=doc["code"], error=doc["message"])
            else:
                ctx.log.exception("action.failed")
            return _error_reply(exc)
        finally:
            stat["ms_total"] += (time.perf_counter() - started) * 1000

    def _stats(self, endpoint: EndpointStats) -> dict[str, Any]:
        # Requests are answered in tasks, so the framework's own error count misses handler failures.
        return {"instance": self.instance, **self.counts.get(endpoint.name, {})}

    async def _every(self, every: float | str, fn: TaskHandler) -> None:
        seconds = float(self.settings[every]) if isinstance(every, str) else every
        while True:
            try:
                await _call(fn, self.context())
            except Exception:
                self.log.exception("plugin.task_failed", task=getattr(fn, "__name__", "task"))
            await asyncio.sleep(seconds)


def _as_actions(value: Any) -> Iterable[ProposedAction]:
    if value is None:
        return []
    if isinstance(value, ProposedAction):
        return [value]
    return [a if isinstance(a, ProposedAction) else ProposedAction.model_validate(a) for a in value]


def _error_reply(exc: BaseException) -> tuple[bytes, dict[str, str]]:
    """An `error` document, with the NATS micro error headers carrying the same code and message."""
    doc = error_doc(exc)
    code = str(exc.status) if isinstance(exc, TuxPilotError) else "500"
    description = doc["message"][:1000].replace("\n", " ").replace("\r", " ")
    return json.dumps(doc).encode(), {ERROR_HEADER: description, ERROR_CODE_HEADER: code}


def sibling(file: str | Path, name: str) -> ModuleType:
    """Import `name`.py from the folder of `file` (pass `__file__`), for plugins of several files.

    A plugin is loaded by file path, not as a package, and a bare `import probes` would clash with
    another plugin's probes.py: the sibling is imported by path under a name of its own.
    """
    folder = Path(file).resolve().parent
    module_name = f"tuxpilot_plugin_{folder.name.replace('-', '_')}_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, folder / f"{name}.py")
    if spec is None or spec.loader is None:
        raise ConfigError(f"{folder}: cannot import {name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def given_manifest() -> Manifest | None:
    """The manifest the host handed over in the environment, if it did (a container plugin: the image's
    own plugin.toml only says which file to import, never what the plugin serves)."""
    doc = os.environ.get(launch.MANIFEST)
    if not doc:
        return None
    try:
        return Manifest.from_doc(json.loads(doc), source=launch.MANIFEST)
    except ValueError as exc:
        raise ConfigError(f"{launch.MANIFEST} is not JSON: {exc}") from None


def load_plugin(folder: Path) -> Plugin:
    """Import a Python plugin's entry point and return the Plugin it defines."""
    manifest = load_manifest(folder)
    if manifest.runtime != "python":
        raise ConfigError(f"{folder}: runtime {manifest.runtime!r} is not run by the Python SDK")
    entry = folder / manifest.entry_point
    spec = importlib.util.spec_from_file_location(f"tuxpilot_plugin_{manifest.name.replace('-', '_')}", entry)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{entry}: cannot import")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    found = [v for v in vars(module).values() if isinstance(v, Plugin)]
    if len(found) != 1:
        raise ConfigError(f"{entry}: defines {len(found)} Plugin objects; exactly one is needed")
    return found[0]


def _seconds(raw: str | None) -> float:
    """A number of seconds from the environment; anything else is 0."""
    try:
        return max(0.0, float(raw or 0))
    except ValueError:
        return 0.0
