"""Whether a new request may join the waiting queue: a global limit, and a fair share per client."""

from __future__ import annotations

from typing import Mapping

from .protocol import APIError

RETRY_AFTER_SECONDS = 1


def check_admission(waiting_by_client: Mapping[str, int], client: str, max_queue: int) -> None:
    """Raise a 429 when `client` holds its share of the queue (max_queue split among the clients with
    waiting requests, itself counted) while others wait too, or a 503 when the queue is full."""
    waiting = {c: count for c, count in waiting_by_client.items() if count > 0}
    clients = len(waiting.keys() | {client})
    share = max(1, max_queue // clients)
    retry = {"Retry-After": str(RETRY_AFTER_SECONDS)}
    if clients > 1 and waiting.get(client, 0) >= share:
        raise APIError(
            429, f"you already have {waiting[client]} requests waiting, your share of the queue "
            f"({share} while {clients} clients wait); retry when some have started",
            type="rate_limit_error", code="rate_limit_exceeded", headers=retry,
        )
    total = sum(waiting.values())
    if total >= max_queue:
        raise APIError(
            503, f"the queue is full ({total} requests waiting, at most {max_queue}); retry later",
            type="server_error", code="queue_full", headers=retry,
        )
