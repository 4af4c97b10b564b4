"""Local Ray clusters on one machine, bound to 127.0.0.1 only.

Used by ``specserve serve`` and the tests. ``LocalCluster`` simulates several nodes with
different custom resources (e.g. a ``draft_node`` and a ``target_node``) so placement can
be checked without a real cluster.
"""

from __future__ import annotations

import os

LOOPBACK = "127.0.0.1"


def loopback_env() -> dict[str, str]:
    """Environment of a local Ray: every Ray and Serve socket on loopback, token auth off, workers not niced."""
    return {
        # Makes Ray bind its services to the loopback address instead of the primary interface.
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
        "RAY_USAGE_STATS_ENABLED": "0",
        # Token ids and small blocks pass directly between actors, not through the object store.
        "RAY_max_direct_call_object_size": "1000000",
        "TOKENIZERS_PARALLELISM": "false",
        "SPECSERVE_LOOPBACK_ONLY": "1",
        # Ray nices its workers to 15 by default, and a vLLM engine inherits that from the replica that
        # starts it: its CPU worker then yields its core to Ray's own nice-0 processes (measured on 2
        # cores: served tok/s 9.6 at nice 15, 10.3 at nice 0, `vllm serve` 11.3).
        "RAY_worker_niceness": "0",
    }


def use_loopback() -> None:
    """Set the loopback environment in this process; call before Ray is imported and started."""
    for key, value in loopback_env().items():
        os.environ.setdefault(key, value)


#: Least time a stopping replica of a local served app stays open (Serve's default, for load balancers: 30 s).
LOCAL_DRAIN_S = 1.0


def serve_throughput_mode() -> None:
    """Ray Serve's throughput-optimized mode for a served app (``specserve serve``, bench-serve's servers of ours):
    user code on the replica's main loop, gRPC from the proxy to the replica, buffered request logs. Set before
    Ray starts, so that Serve's proxy, controller and replicas all read it; ``RAY_SERVE_THROUGHPUT_OPTIMIZED=0``
    in the caller's environment opts out. On 2 cores it took the proxy's and the replica's CPU per token down
    ~11-15% and our app with drafter ``none`` from 0.84-0.89x to 0.88-1.08x of ``vllm serve`` plain at 1 to 64
    streams (docs/benchmarks.md section 4). Not for the tests' own clusters: it turns synchronous deployment
    handles off.

    That mode also has each ingress replica answer HTTP on a port of its own (direct ingress) and hold itself
    open for 30 s when it stops, so that a load balancer in front can deregister it. On one machine nothing
    sits in front of it: a stopping replica waits only for its requests in flight (at least
    ``LOCAL_DRAIN_S``), and Ctrl-C on ``make serve`` returns in seconds instead of ~35."""
    os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", str(LOCAL_DRAIN_S))


def pin_serve_grpc_to_loopback() -> None:
    """On a loopback-only local cluster, bind Serve replicas' inter-deployment gRPC server to 127.0.0.1.

    Ray Serve binds that server to all interfaces unconditionally; on a laptop or CI box the
    project promises to listen on loopback only. Cluster deployments never set
    SPECSERVE_LOOPBACK_ONLY, so pods keep talking to each other across the network.
    """
    if os.environ.get("SPECSERVE_LOOPBACK_ONLY") != "1":
        return
    from ray.serve._private import replica

    original = replica.add_port_to_grpc_server
    if getattr(original, "_specserve_loopback", False):
        return

    def loopback(server, address: str):
        return original(server, address.replace("[::]", LOOPBACK, 1))

    loopback._specserve_loopback = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = loopback


def init_local_ray(num_cpus: float | None = None, resources: dict[str, float] | None = None,
                   metrics_export_port: int | None = None, **kwargs):
    """Start a single-node Ray on 127.0.0.1 (dashboard optional; Prometheus metrics on
    ``metrics_export_port`` when given)."""
    use_loopback()
    import ray

    if ray.is_initialized():
        return ray
    ray.init(
        # A new Ray of our own, even when another one runs on this machine (ray.init would join it).
        address="local",
        _node_ip_address=LOOPBACK,
        num_cpus=num_cpus,
        resources=resources,
        include_dashboard=kwargs.pop("include_dashboard", False),
        dashboard_host=LOOPBACK,
        runtime_env={"env_vars": loopback_env()},
        _metrics_export_port=metrics_export_port,
        **kwargs,
    )
    return ray


class LocalCluster:
    """Several simulated Ray nodes in one machine (``ray.cluster_utils.Cluster``) on 127.0.0.1."""

    def __init__(self, nodes: list[dict]):
        """``nodes``: one dict per node, e.g. ``{"num_cpus": 1, "resources": {"draft_node": 1}}``;
        the first is the head."""
        use_loopback()
        from ray.cluster_utils import Cluster

        head, *workers = nodes
        self.cluster = Cluster(
            initialize_head=True,
            head_node_args={"node_ip_address": LOOPBACK, **head},
        )
        self.nodes = [self.cluster.head_node]
        for spec in workers:
            self.nodes.append(self.cluster.add_node(node_ip_address=LOOPBACK, **spec))
        self.cluster.wait_for_nodes()

    @property
    def address(self) -> str:
        """GCS address to pass to ``ray.init``."""
        return self.cluster.address

    def connect(self):
        """``ray.init`` against this cluster."""
        import ray

        ray.init(address=self.address, runtime_env={"env_vars": loopback_env()})
        return ray

    def node_ids(self) -> list[str]:
        """Ray node ids, head first."""
        return [n.node_id for n in self.nodes]

    def shutdown(self) -> None:
        """Stop Ray and every simulated node."""
        import ray

        ray.shutdown()
        self.cluster.shutdown()
