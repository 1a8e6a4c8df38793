"""What every route of the REST API needs from its request: the farm, the caller's right to change a job, and
the link to a next page."""

from __future__ import annotations

from fastapi import Request, Response

from producer.client import Farm
from shared.db.tokens import Caller
from shared.errors import ConfigError, Forbidden


def farm(request: Request) -> Farm:
    """The app's one `Farm` (its database, broker and storages), made when the app starts."""
    found: Farm = request.app.state.farm
    return found


def queueing_farm(request: Request) -> Farm:
    """The farm, for a route that queues work: the API never renders in its own process."""
    client = farm(request)
    if client.settings.broker_url is None:
        raise ConfigError("no broker configured: the API only queues work for workers")
    return client


def owned(request: Request, job_id: str) -> None:
    """Refuse a change to another owner's job: an admin token may change any, any token its own, and
    without a token (the API not requiring one) there is no owner to tell apart."""
    caller: Caller | None = request.state.caller
    if caller is None or caller.admin:
        return
    owner = farm(request).status(job_id).owner
    if owner != caller.name:
        holder = repr(owner) if owner else "the farm's operator"
        raise Forbidden(f"job {job_id} belongs to {holder}, not to {caller.name!r}")


def link_next(request: Request, response: Response, cursor: str) -> None:
    """The next page's URL in a `Link` header (RFC 8288): this request's, with `cursor` set."""
    next_page = request.url.include_query_params(cursor=cursor)
    response.headers["Link"] = f'<{next_page.path}?{next_page.query}>; rel="next"'
