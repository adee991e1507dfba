"""The console's web application: ``create_app(app)`` builds it from the process's ``App``.

Every page needs an identity (session cookie from the login form, bearer token, HTTP Basic or
trusted proxy headers); replay, purge and requeue need the operator role; every POST carries
the session's CSRF token. Handlers run the blocking work (Postgres, the broker) in Starlette's
thread pool, each statement in a short transaction of its own.
"""

from __future__ import annotations

import json
import re
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jinja2
from prometheus_client.core import Metric
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.app import App
from service.console import queries
from service.console.auth import (
    Authenticator,
    Identity,
    LookupBudget,
    build_authenticator,
    fingerprint,
    mask_email,
    new_csrf_token,
)
from service.console.summary import replay_plan, still_due
from service.db import Conn
from service.deadletters import UNDECODABLE
from service.dlq.operations import DeadLetter, Filters, dead_letters, parse_duration, purge, replay
from service.emails.rules import EmailType
from service.flags import Flags
from service.logs import get_logger, redact_text
from service.observability.collectors import RabbitQueues, RedisQueues
from service.outbox import store

log = get_logger(__name__)
HERE = Path(__file__).parent
MAX_PAGE_SIZE = 200
MAX_SELECTION = 200
MAX_DEPTH = 10_000
REASONS = ("retries_exhausted", "permanent_failure", "invalid_payload", "unrecorded")
_QUEUE_NAME = re.compile(r"^[A-Za-z0-9._-]{1,100}$")
_MESSAGE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,200}$")
_EMAIL = re.compile(r"^[^@\s]{1,200}@[^@\s]{1,200}$")
CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-store"),
]


class SecurityHeaders:
    """CSP, nosniff, no referrer, no framing, no caching on every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, with_headers)


class AccessLog:
    """One line per request: method, path (never the query string), status, duration."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status = {"code": 500}

        async def capture(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            log.info(
                "console request",
                method=scope["method"],
                path=scope["path"],
                status=status["code"],
                ms=round((time.monotonic() - started) * 1000, 1),
            )


class NotAuthenticated(Exception):
    def __init__(self, message: str = "") -> None:
        self.message = message


def bad_request(detail: str) -> HTTPException:
    return HTTPException(400, detail)


def parse_uuid(text: str, what: str) -> uuid.UUID:
    try:
        return uuid.UUID(text.strip())
    except ValueError:
        raise bad_request(f"{what} is not a valid UUID") from None


def parse_int(value: str | None, name: str, default: int, low: int, high: int) -> int:
    if value is None or value == "":
        return default
    if not value.isdigit():
        raise bad_request(f"{name} must be a whole number")
    number = int(value)
    if not low <= number <= high:
        raise bad_request(f"{name} must be between {low} and {high}")
    return number


def parse_filters(params: dict[str, str]) -> tuple[Filters, int, int]:
    """Dead-letter filters, page and page size from the query string; 400 for anything bad."""
    queue = params.get("queue") or None
    if queue is not None and not _QUEUE_NAME.match(queue):
        raise bad_request("queue: letters, digits, '.', '_' and '-' only")
    email_type = params.get("type") or None
    if email_type is not None and email_type not in {t.value for t in EmailType}:
        raise bad_request(f"type must be one of {', '.join(t.value for t in EmailType)}")
    reason = params.get("reason") or None
    if reason is not None and reason not in REASONS:
        raise bad_request(f"reason must be one of {', '.join(REASONS)}")
    ages: dict[str, timedelta | None] = {}
    for name in ("older_than", "newer_than"):
        text = params.get(name) or None
        try:
            ages[name] = parse_duration(text) if text else None
        except ValueError as error:
            raise bad_request(f"{name}: {error}") from None
    size = parse_int(params.get("size"), "size", 50, 1, MAX_PAGE_SIZE)
    page = parse_int(params.get("page"), "page", 1, 1, MAX_DEPTH)
    if page * size > MAX_DEPTH:
        raise bad_request(f"page too deep: at most {MAX_DEPTH} letters; narrow the filters")
    filters = Filters(
        queue=queue,
        email_type=email_type,
        reason=reason,
        older_than=ages["older_than"],
        newer_than=ages["newer_than"],
        include_handled=params.get("all") in ("1", "on", "true"),
        limit=page * size + 1,
    )
    return filters, page, size


def selected_ids(form: FormData) -> list[str]:
    ids = [str(v) for v in form.getlist("ids")]
    if not ids:
        raise bad_request("select at least one dead letter")
    if len(ids) > MAX_SELECTION:
        raise bad_request(f"at most {MAX_SELECTION} dead letters at once")
    for message_id in ids:
        if not _MESSAGE_ID.match(message_id):
            raise bad_request("a selected id is not a message id")
    return list(dict.fromkeys(ids))


def booking_of(letter: DeadLetter) -> str | None:
    kwargs = letter.message.get("kwargs")
    value = kwargs.get("booking_id") if isinstance(kwargs, dict) else None
    return value if isinstance(value, str) else None


def request_of(letter: DeadLetter) -> tuple[uuid.UUID, str, int | None] | None:
    """The email request a dead letter is for: (booking, type, revision); None when its body
    names no valid booking id or type."""
    booking_id = booking_of(letter)
    if booking_id is None or not letter.email_type:
        return None
    try:
        return uuid.UUID(booking_id), letter.email_type, revision_of(letter)
    except ValueError:
        return None


def revision_of(letter: DeadLetter) -> int | None:
    """The booking revision the message asked for; ``None`` (a message without one) means
    the booking's current revision."""
    kwargs = letter.message.get("kwargs")
    value = kwargs.get("revision") if isinstance(kwargs, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def letter_view(letter: DeadLetter) -> dict[str, Any]:
    source = letter.copy.message if letter.copy is not None else letter.message
    options = dict(source.get("options") or {})
    traceback = options.pop("traceback", None)
    body = {k: v for k, v in source.items() if k != "options"}
    return {
        "message_id": letter.message_id,
        "queue": letter.queue,
        "actor": letter.actor,
        "email_type": letter.email_type,
        "reason": letter.reason,
        "error": redact_text(letter.error) if letter.error else None,
        "failed_at": letter.failed_at,
        "location": letter.location,
        "state": "open" if letter.open else ("replayed" if letter.replayed_at else "purged"),
        "replayed_at": letter.replayed_at,
        "purged_at": letter.purged_at,
        "booking_id": booking_of(letter),
        "message": redact_text(json.dumps({**body, "options": options}, indent=2, default=str)),
        "traceback": redact_text(str(traceback)) if traceback else None,
    }


def queue_depths(families: Sequence[Metric]) -> dict[str, dict[str, float]]:
    depths: dict[str, dict[str, float]] = {}
    for family in families:
        for sample in family.samples:
            queue = sample.labels.get("queue")
            if queue is None:
                continue
            row = depths.setdefault(queue, {})
            if "state" in sample.labels:
                row[sample.labels["state"]] = sample.value
            else:
                row["oldest_age_seconds"] = sample.value
    return depths


def when(value: Any) -> str:
    """A timestamp as ``2026-12-02 18:33:12 UTC``; ``-`` for none."""
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return str(value)


Handler = Callable[[Request], Awaitable[Response]]


class Console:
    """The handlers, over one App, one authenticator and one lookup budget."""

    def __init__(
        self, app: App, auth: Authenticator, budget: LookupBudget, session_key: str
    ) -> None:
        self.app = app
        self.auth = auth
        self.budget = budget
        self.session_key = session_key
        env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )
        env.filters["when"] = when
        self.templates = Jinja2Templates(env=env)

    # -- identity, roles, CSRF, audit ---------------------------------------------------------

    def identity(self, request: Request) -> Identity | None:
        found = self.auth.from_headers(
            request.headers, request.client.host if request.client else None
        )
        if found is not None:
            return found
        user, role = request.session.get("user"), request.session.get("role")
        bound = request.session.get("cred")
        if not (
            isinstance(user, str) and role in ("viewer", "operator") and isinstance(bound, str)
        ):
            return None
        who = Identity(user, str(role))
        current = self.auth.credential(who)
        if current is None or not secrets.compare_digest(
            bound, fingerprint(self.session_key, current)
        ):
            request.session.clear()  # the credential was rotated or removed: sign in again
            return None
        return who

    @staticmethod
    def csrf(request: Request) -> str:
        token = request.session.get("csrf")
        if not isinstance(token, str):
            token = request.session["csrf"] = new_csrf_token()
        return token

    async def check_csrf(self, request: Request) -> FormData:
        form = await request.form()
        given = form.get("csrf_token")
        expected = request.session.get("csrf")
        if not (
            isinstance(given, str)
            and isinstance(expected, str)
            and secrets.compare_digest(given.encode(), expected.encode())
        ):
            raise HTTPException(403, "missing or invalid CSRF token: reload the page and retry")
        return form

    def page(
        self, handler: Callable[[Request, Identity], Awaitable[Response]], *, operator: bool = False
    ) -> Handler:
        async def endpoint(request: Request) -> Response:
            who = self.identity(request)
            if who is None:
                raise NotAuthenticated()
            if operator and not who.operator:
                raise HTTPException(403, "this needs the operator role")
            request.state.identity = who
            return await handler(request, who)

        return endpoint

    def lookup_allowed(self, who: Identity) -> None:
        wait = self.budget.take(who.name)
        if wait:
            raise HTTPException(
                429, "too many lookups: wait and retry", headers={"Retry-After": str(int(wait))}
            )

    def audit(
        self,
        request: Request,
        who: Identity,
        action: str,
        items: Sequence[str],
        outcome: str,
        detail: str | None = None,
    ) -> None:
        with self.app.db.transaction() as conn:
            self.record(conn, request, who, action, items, outcome, detail)

    @staticmethod
    def record(
        conn: Conn,
        request: Request,
        who: Identity,
        action: str,
        items: Sequence[str],
        outcome: str,
        detail: str | None = None,
    ) -> None:
        queries.record_audit(
            conn,
            actor=who.name,
            role=who.role,
            action=action,
            items=items,
            outcome=outcome,
            detail=detail,
            client_addr=request.client.host if request.client else None,
        )
        log.info("console action", actor=who.name, action=action, outcome=outcome, items=len(items))

    def render(
        self,
        request: Request,
        name: str,
        status: int = 200,
        headers: dict[str, str] | None = None,
        **context: Any,
    ) -> Response:
        who = getattr(request.state, "identity", None)
        context.setdefault("identity", who)
        context["csrf_token"] = self.csrf(request)
        context["show_email"] = lambda address: (
            address if who is not None and who.operator else mask_email(str(address))
        )
        return self.templates.TemplateResponse(
            request, name, context, status_code=status, headers=headers
        )

    # -- login ---------------------------------------------------------------------------------

    async def login_form(self, request: Request) -> Response:
        if self.identity(request) is not None:
            return RedirectResponse("/", 303)
        return self.login_page(request, 200)

    def login_page(self, request: Request, status: int, message: str = "") -> Response:
        headers = {}
        if status == 401:
            wants_html = "text/html" in request.headers.get("accept", "")
            if self.auth.mode == "token":
                headers["WWW-Authenticate"] = 'Bearer realm="booking console"'
            elif self.auth.mode == "basic" and not wants_html:
                headers["WWW-Authenticate"] = 'Basic realm="booking console"'
        return self.render(
            request,
            "login.html",
            status,
            headers,
            identity=None,
            mode=self.auth.mode,
            fields=self.auth.login_fields,
            message=message,
        )

    async def login(self, request: Request) -> Response:
        if not self.auth.login_fields:
            raise HTTPException(404, "this console signs in through its proxy")
        form = await self.check_csrf(request)
        peer = request.client.host if request.client else "unknown"
        wait = self.budget.take(f"login:{peer}")
        if wait:
            raise HTTPException(
                429,
                "too many sign-in attempts: wait and retry",
                headers={"Retry-After": str(int(wait))},
            )
        values = {k: str(form.get(k) or "") for k in self.auth.login_fields}
        who = await run_in_threadpool(self.auth.from_form, values)
        attempted = Identity(values.get("username") or "unknown", "none")
        if who is None:
            await run_in_threadpool(self.audit, request, attempted, "login", [], "refused")
            return self.login_page(request, 401, "Those credentials were not accepted.")
        request.session.clear()
        credential = self.auth.credential(who) or ""
        request.session.update(
            {
                "user": who.name,
                "role": who.role,
                "csrf": new_csrf_token(),
                "cred": fingerprint(self.session_key, credential),
            }
        )
        await run_in_threadpool(self.audit, request, who, "login", [], "ok")
        return RedirectResponse("/", 303)

    async def logout(self, request: Request, who: Identity) -> Response:
        await self.check_csrf(request)
        request.session.clear()
        return RedirectResponse("/login", 303)

    # -- pages ---------------------------------------------------------------------------------

    async def home(self, request: Request, who: Identity) -> Response:
        return self.render(request, "home.html")

    async def booking_redirect(self, request: Request, who: Identity) -> Response:
        booking_id = parse_uuid(request.query_params.get("id", ""), "booking id")
        return RedirectResponse(f"/bookings/{booking_id}", 303)

    async def booking(self, request: Request, who: Identity) -> Response:
        booking_id = parse_uuid(request.path_params["booking_id"], "booking id")
        self.lookup_allowed(who)

        def load() -> tuple[Any, list[Any], list[Any]]:
            with self.app.db.transaction() as conn:
                return (
                    queries.booking(conn, booking_id),
                    queries.deliveries(conn, booking_id),
                    queries.booking_dead_letters(conn, booking_id),
                )

        found, rows, letters = await run_in_threadpool(load)
        if found is None and not rows and not letters:
            raise HTTPException(404, f"no booking {booking_id}, and no email or dead letter for it")
        due = still_due(found["status"] if found else None, rows)
        for row in rows:
            row["last_error"] = redact_text(row["last_error"]) if row.get("last_error") else None
        for letter in letters:
            letter["error"] = redact_text(letter["error"]) if letter.get("error") else None
        return self.render(
            request,
            "booking.html",
            booking=found,
            booking_id=booking_id,
            rows=rows,
            letters=letters,
            due=due,
        )

    async def search(self, request: Request, who: Identity) -> Response:
        form = await self.check_csrf(request)
        address = str(form.get("email") or "").strip()
        if not _EMAIL.match(address):
            raise bad_request("email: not an email address")
        self.lookup_allowed(who)

        def load() -> list[Any]:
            # The search and its audit row in one transaction: no search goes unrecorded.
            with self.app.db.transaction() as conn:
                found = queries.bookings_by_email(conn, address, 50)
                ids = [str(b["id"]) for b in found]
                self.record(conn, request, who, "lookup_by_email", ids, f"{len(ids)} found")
                return found

        found = await run_in_threadpool(load)
        return self.render(request, "search.html", bookings=found)

    async def letters(self, request: Request, who: Identity) -> Response:
        params = dict(request.query_params)
        filters, page, size = parse_filters(params)

        def load() -> list[DeadLetter]:
            with dead_letters(self.app.db, self.app.broker, self.app.settings, filters) as (
                found,
                _,
            ):
                return found

        found = await run_in_threadpool(load)
        start = (page - 1) * size
        shown = found[start : start + size]
        more = len(found) > start + size
        base = {k: v for k, v in params.items() if k != "page" and v}

        def link(number: int) -> str:
            return "/dead-letters?" + urlencode({**base, "page": number})

        return self.render(
            request,
            "dead_letters.html",
            letters=[letter_view(x) for x in shown],
            params=params,
            page=page,
            size=size,
            prev_link=link(page - 1) if page > 1 else None,
            next_link=link(page + 1) if more else None,
            reasons=REASONS,
            types=[t.value for t in EmailType],
        )

    async def letter(self, request: Request, who: Identity) -> Response:
        message_id = request.path_params["message_id"]
        if not _MESSAGE_ID.match(message_id):
            raise bad_request("not a message id")
        selection = Filters(ids=(message_id,), include_handled=True, limit=1)

        def load() -> list[DeadLetter]:
            with dead_letters(self.app.db, self.app.broker, self.app.settings, selection) as (
                found,
                _,
            ):
                return found

        found = await run_in_threadpool(load)
        if not found:
            raise HTTPException(404, f"no dead letter {message_id}")
        return self.render(request, "dead_letter.html", letter=letter_view(found[0]))

    def _plan(self, action: str, ids: list[str]) -> list[dict[str, Any]]:
        selection = Filters(ids=tuple(ids), include_handled=True, limit=len(ids))
        with dead_letters(self.app.db, self.app.broker, self.app.settings, selection) as (found, _):
            by_id = {x.message_id: x for x in found}
        requests = [r for r in map(request_of, found) if r is not None]
        with self.app.db.transaction() as conn:
            states = queries.delivery_states(conn, requests)
        plan = []
        for message_id in ids:
            x = by_id.get(message_id)
            key = request_of(x) if x else None
            ok, text = replay_plan(
                found=x is not None,
                open_=bool(x and x.open),
                undecodable=bool(x and x.message.get(UNDECODABLE)),
                action=action,
                source="broker" if x and x.copy is not None else "db",
                actor=x.actor if x else "",
                delivery_state=states.get(key) if key else None,
            )
            plan.append({"message_id": message_id, "ok": ok, "plan": text, "letter": x})
        return plan

    async def preview(self, request: Request, who: Identity) -> Response:
        form = await self.check_csrf(request)
        action = str(form.get("action") or "")
        if action not in ("replay", "purge"):
            raise bad_request("action must be replay or purge")
        ids = selected_ids(form)
        plan = await run_in_threadpool(self._plan, action, ids)
        return self.render(request, "preview.html", action=action, plan=plan)

    async def execute(self, request: Request, who: Identity) -> Response:
        action = request.path_params["action"]
        if action not in ("replay", "purge"):
            raise HTTPException(404, "no such action")
        form = await self.check_csrf(request)
        ids = selected_ids(form)

        def run() -> tuple[list[tuple[str, str]], list[tuple[str, str]], list[str]]:
            # Only open letters: a letter replayed meanwhile (another operator) is left alone.
            selection = Filters(ids=tuple(ids), limit=len(ids))
            with dead_letters(self.app.db, self.app.broker, self.app.settings, selection) as (
                found,
                queues,
            ):
                if action == "replay":
                    outcome = replay(self.app.db, self.app.broker, found, queues)
                else:
                    outcome = purge(self.app.db, found, queues)
            done = [(x.message_id, result) for x, result in outcome.done]
            failed = [(x.message_id, redact_text(error)) for x, error in outcome.failed]
            handled = {x.message_id for x in found}
            return done, failed, [i for i in ids if i not in handled]

        done, failed, skipped = await run_in_threadpool(run)
        outcome = f"{len(done)} done, {len(failed)} failed, {len(skipped)} skipped"
        await run_in_threadpool(
            self.audit,
            request,
            who,
            action,
            ids,
            "ok" if not failed else "partial",
            outcome,
        )
        return self.render(
            request,
            "result.html",
            action=action,
            done=done,
            failed=failed,
            skipped=skipped,
            outcome=outcome,
        )

    def _queues(self) -> tuple[dict[str, dict[str, float]], str | None]:
        settings = self.app.settings
        declared = {
            q for q in self.app.broker.get_declared_queues() if not q.endswith((".DQ", ".XQ"))
        }
        with self.app.db.transaction() as conn:
            names = sorted(declared | set(queries.dead_letter_queues(conn)))
        url = settings.secret("broker_url")
        try:
            if settings.broker_kind == "rabbitmq":
                families = RabbitQueues(url, settings.health_file, lambda: names).collect()
            else:
                source = RedisQueues(url, lambda: names)
                try:
                    families = source.collect()
                finally:
                    source.client.close()
        except Exception as error:
            return {}, f"the broker did not answer ({type(error).__name__})"
        return queue_depths(families), None

    def _flags(self) -> list[dict[str, Any]]:
        flags: Flags = self.app.flags
        rows, _ = flags.status(wait=0)
        return [
            {
                "name": r.flag.name,
                "value": r.value,
                "source": str(r.source),
                "default": r.default,
                "env": r.flag.env_var,
            }
            for r in rows
        ]

    async def queues(self, request: Request, who: Identity) -> Response:
        def load() -> dict[str, Any]:
            depths, problem = self._queues()
            with self.app.db.transaction() as conn:
                outbox = store.stats(conn)
                dead = store.list_events(conn, status="dead", limit=50)
                oldest = conn.execute(
                    "SELECT id, event_type, created_at FROM outbox_events WHERE status = 'pending'"
                    " ORDER BY created_at LIMIT 1"
                ).fetchone()
            return {
                "depths": depths,
                "problem": problem,
                "outbox": outbox,
                "dead_events": dead,
                "oldest": oldest,
                "flags": self._flags(),
            }

        data = await run_in_threadpool(load)
        for event in data["dead_events"]:
            event["last_error"] = (
                redact_text(event["last_error"]) if event.get("last_error") else None
            )
        return self.render(request, "queues.html", **data)

    async def requeue(self, request: Request, who: Identity) -> Response:
        await self.check_csrf(request)
        event_id = parse_uuid(request.path_params["event_id"], "event id")

        def run() -> bool:
            with self.app.db.transaction() as conn:
                return store.requeue(conn, event_id)

        done = await run_in_threadpool(run)
        await run_in_threadpool(
            self.audit,
            request,
            who,
            "requeue_outbox_event",
            [str(event_id)],
            "ok" if done else "not_found",
        )
        if not done:
            raise HTTPException(404, f"no dead outbox event {event_id}")
        return RedirectResponse("/queues?requeued=1", 303)

    async def audit_log(self, request: Request, who: Identity) -> Response:
        size = parse_int(request.query_params.get("size"), "size", 50, 1, MAX_PAGE_SIZE)
        page = parse_int(request.query_params.get("page"), "page", 1, 1, MAX_DEPTH)

        def load() -> list[Any]:
            with self.app.db.transaction() as conn:
                return queries.audit_entries(conn, limit=size + 1, offset=(page - 1) * size)

        entries = await run_in_threadpool(load)
        return self.render(
            request,
            "audit.html",
            entries=entries[:size],
            page=page,
            prev_link=f"/audit?page={page - 1}&size={size}" if page > 1 else None,
            next_link=f"/audit?page={page + 1}&size={size}" if len(entries) > size else None,
        )

    # -- errors --------------------------------------------------------------------------------

    async def http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        titles = {
            400: "Bad request",
            403: "Forbidden",
            404: "Not found",
            405: "Method not allowed",
            429: "Slow down",
        }
        return self.render(
            request,
            "error.html",
            exc.status_code,
            dict(exc.headers or {}),
            title=titles.get(exc.status_code, "Error"),
            detail=exc.detail,
            code=exc.status_code,
        )

    async def unauthenticated(self, request: Request, exc: Exception) -> Response:
        if not self.auth.login_fields:
            return self.render(
                request,
                "error.html",
                401,
                identity=None,
                title="Not signed in",
                detail="this console is reached through its authenticating proxy",
                code=401,
            )
        return self.login_page(request, 401)


async def healthz(request: Request) -> Response:
    return PlainTextResponse("ok")


def create_app(app: App, *, session_secret: str | None = None) -> Starlette:
    """The console over ``app`` (whose actors are bound: replay sends through them)."""
    settings = app.settings
    auth = build_authenticator(settings)
    secret = session_secret or (
        settings.console_session_secret.get_secret_value()
        if settings.console_session_secret
        else secrets.token_urlsafe(32)
    )
    budget = LookupBudget(settings.console_lookups_per_minute, settings.console_lookup_burst)
    console = Console(app, auth, budget, secret)
    page = console.page
    routes = [
        Route("/healthz", healthz),
        Route("/login", console.login_form, methods=["GET"]),
        Route("/login", console.login, methods=["POST"]),
        Route("/logout", page(console.logout), methods=["POST"]),
        Route("/", page(console.home)),
        Route("/bookings", page(console.booking_redirect)),
        Route("/bookings/search", page(console.search, operator=True), methods=["POST"]),
        Route("/bookings/{booking_id}", page(console.booking)),
        Route("/dead-letters", page(console.letters)),
        Route("/dead-letters/preview", page(console.preview, operator=True), methods=["POST"]),
        Route(
            "/dead-letters/{action:str}",
            page(console.execute, operator=True),
            methods=["POST"],
        ),
        Route("/dead-letters/{message_id:str}", page(console.letter)),
        Route("/queues", page(console.queues)),
        Route("/outbox/{event_id}/requeue", page(console.requeue, operator=True), methods=["POST"]),
        Route("/audit", page(console.audit_log)),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    return Starlette(
        routes=routes,
        middleware=[
            Middleware(AccessLog),
            Middleware(SecurityHeaders),
            Middleware(
                SessionMiddleware,
                secret_key=secret,
                session_cookie="console_session",
                max_age=settings.console_session_max_age_seconds,
                same_site="strict",
                https_only=settings.console_secure_cookies,
            ),
        ],
        exception_handlers={
            HTTPException: console.http_error,
            NotAuthenticated: console.unauthenticated,
        },
    )
