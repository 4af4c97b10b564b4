"""Serve's request routing for model replicas: traffic goes to replicas that serve, not to ones still starting.

A model replica answers HTTP at once and starts its engine in the background (a minute or more),
so Serve would route requests to a new replica (scaled up, or replacing a failed one) that can
only answer 503 until its engine is up. Each replica reports ``{"ready": bool}`` as its routing
statistics (``SpecServer.record_routing_stats``); this router chooses among the ready replicas
whenever there is one, and among all of them only when none is ready (then the starting
replica's 503 JSON says what is starting).
"""

from __future__ import annotations

import random

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter

#: Routing statistics key a replica sets to True once it serves requests.
READY_KEY = "ready"
#: Seconds between the routing statistics each replica reports.
STATS_PERIOD_S = 2.0


class ReadyFirstRouter(PowerOfTwoChoicesRequestRouter):
    """Power of two choices (Serve's default: two random replicas, the shorter queue wins), drawn from the
    ready replicas whenever one exists."""

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        ready = [r for r in candidate_replicas if r.routing_stats.get(READY_KEY)]
        pool = ready or list(candidate_replicas)
        return [random.sample(pool, min(2, len(pool)))] if pool else []
