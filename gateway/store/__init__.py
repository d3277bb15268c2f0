"""The SQLite store (see gateway.store.writer)."""

from gateway.store.writer import *  # noqa: F403
