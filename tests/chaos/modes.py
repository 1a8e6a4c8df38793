"""Short form (CI) or long form (`ARCHFARM_CHAOS=long`, by hand) of the chaos suite, and its brokers."""

from __future__ import annotations

import os

LONG = os.environ.get("ARCHFARM_CHAOS", "short") == "long"
BROKERS = tuple(os.environ.get("ARCHFARM_CHAOS_BROKERS", "redis,redis-aof,rabbitmq" if LONG else "redis").split(","))
"""Every scenario runs on each: `redis` (no persistence), `redis-aof` (appendonly, fsync every second),
`rabbitmq` (quorum queues). The short form runs on Redis, and RabbitMQ's own outage besides."""
