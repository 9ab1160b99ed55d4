"""Notifications: a JSON event POSTed when a job ends (and, when asked, at milestones),
signed with HMAC-SHA256 of the body.

Nothing is lost: an event is written to the state file's outbox in the same commit as
the transition that caused it, and ``Notifier`` delivers what the outbox holds, at
least once, across crashes and restarts (a receiver tells repeats apart by the event's
``id``). The secret is never stored; without it nothing is sent and the events wait.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import random
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import anyio
import structlog

from orchestrator.retry import RetryPolicy
from orchestrator.states import JobRecord, State, iso_time

if TYPE_CHECKING:  # the store imports this module; aiohttp loads only to deliver
    from orchestrator.sessions import HttpSession

SIGNATURE_HEADER = "X-Orchestrator-Signature"
EVENT_HEADER = "X-Orchestrator-Event"
MILESTONES = frozenset({State.VALIDATING, State.TRAINING})
DELIVERY = RetryPolicy(initial=1.0, coefficient=2.0, maximum=300.0, max_attempts=20)
PARKED = 1e300  # next_at of an event given up on: never due, still shown as undelivered

log = structlog.get_logger("notify")


@dataclass(frozen=True)
class OutboxEvent:
    """An event on its way: where it goes and the exact bytes that are signed."""

    url: str
    body: str
    id: int = 0  # the outbox row, once stored
    attempts: int = 0
    created_at: float = 0.0


def events_for(
    record: JobRecord, old: State | None, urls: Sequence[str], milestones: bool
) -> list[OutboxEvent]:
    """The events a transition of ``record`` (from ``old``) owes each URL."""
    new = record.state
    if not urls or new is old or not (new.terminal or (milestones and new in MILESTONES)):
        return []
    body = json.dumps(
        {
            "id": str(uuid.uuid4()),
            "event": f"job.{new.value}",
            "at": iso_time(record.updated_at),
            "job": record.name,
            "state": new.value,
            "manifest": record.manifest,
            "provider": record.provider,
            "model": record.model,
            "finetune_id": record.finetune_id,
            "fine_tuned_model": record.fine_tuned_model,
            "error": record.error,
        },
        sort_keys=True,
    )
    return [OutboxEvent(url, body) for url in urls]


def signature(body: bytes, secret: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


class OutboxStore(Protocol):
    """What ``Notifier`` needs of the store (``CheckpointStore`` has it)."""

    async def due_events(self, now: float, limit: int, since: float = 0.0) -> list[OutboxEvent]: ...

    async def claim_events(self, limit: int) -> list[OutboxEvent]: ...

    async def event_delivered(self, event_id: int) -> None: ...

    async def event_failed(self, event_id: int, next_at: float) -> None: ...


class Notifier:
    """Delivers the outbox. ``serve`` forever (the daemon), or ``drain`` before a batch
    exits; several at once on one store (workers sharing a database) each take their own
    events."""

    POLL = 0.5  # seconds between looks at the outbox

    def __init__(
        self,
        store: OutboxStore,
        session: HttpSession,
        secret: bytes,
        *,
        policy: RetryPolicy = DELIVERY,
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.session = session
        self.secret = secret
        self.policy = policy
        self.rng = rng or random.Random()
        self._one_pass = anyio.Lock()  # serve and drain never deliver the same event at once

    async def serve(self) -> None:
        while True:
            await self.deliver_due()
            await anyio.sleep(self.POLL)

    async def drain(self, timeout: float, since: float) -> bool:
        """Deliver until no event made since ``since`` waits (or ``timeout``): a batch's
        own events, not older ones a receiver keeps refusing. True when none waits."""
        with anyio.move_on_after(timeout):
            while True:
                await self.deliver_due()
                soon = await self.store.due_events(time.time() + self.policy.maximum, 1, since)
                if not soon:
                    return True
                await anyio.sleep(self.POLL)  # a failed one is due again after backoff
        return False

    async def deliver_due(self) -> None:
        """One pass over the events due now."""
        async with self._one_pass:
            due = await self.store.claim_events(100)
            async with anyio.create_task_group() as tg:
                for event in due:
                    tg.start_soon(self._deliver, event)

    async def _deliver(self, event: OutboxEvent) -> None:
        from orchestrator.sessions import NoAnswer

        body = event.body.encode()
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: signature(body, self.secret),
            EVENT_HEADER: json.loads(event.body)["event"],
        }
        try:
            reply = await self.session.send("POST", event.url, body, headers)
            ok = 200 <= reply.status < 300
            problem = f"HTTP {reply.status}"
        except NoAnswer as exc:
            ok, problem = False, str(exc)
        if ok:
            await self.store.event_delivered(event.id)
            return
        if event.attempts + 1 >= self.policy.max_attempts:
            log.error("notification given up on", url=event.url, error=problem)
            await self.store.event_failed(event.id, PARKED)
            return
        delay = self.policy.backoff(event.attempts + 1, self.rng)
        log.warning("notification not delivered; will retry", url=event.url, error=problem)
        await self.store.event_failed(event.id, time.time() + max(delay, 0.5))
