"""Webhook delivery: records from the store, batched per webhook and POSTed with auth,
signing and retries.

Each webhook is a Route (`route`) with its own task, cursor and in-flight limit, so one
failing receiver never slows another. A batch is persisted (with its webhook-id) before
the first attempt; it leaves the batches table only when the receiver accepted it or it
was dead-lettered, so after a crash every unfinished batch is sent again with the same
id. `conditions` are the `when` filters, `sources` what a route reads, `formats` the
pure encoders of the wire formats, `signing` their signatures, `sender` one POST and
the retry policy, `engine` the routes together.
"""

from __future__ import annotations

from gateway.delivery.engine import run
from gateway.delivery.sender import Outcome, Sender, client_session, new_webhook_id

__all__ = ["Outcome", "Sender", "client_session", "new_webhook_id", "run"]
