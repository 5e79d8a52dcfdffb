"""How every part of filterd reaches Redis: the daemon, the admin CLIs and the API.

One factory (:func:`connect`) turns ``[redis] url`` into a client, so ``filterd
allow``, ``filterd records``, ``filterd stats``, the allowlist API and the running
daemon find the same data whatever the topology:

=====================================================  ==========================================
URL                                                    topology
=====================================================  ==========================================
``redis://[:PASSWORD@]HOST:PORT/DB``                   one Redis (``rediss://`` for TLS)
``unix:///path/redis.sock?db=0``                       one Redis on a unix socket
``redis+sentinel://[:PW@]H:P[,H:P...]/MASTER[/DB]``    Sentinel: the master named MASTER is
                                                       asked of the sentinels before every new
                                                       connection, so a failover is followed
                                                       without a restart
``redis+cluster://[:PW@]H:P[,H:P...]``                 Redis Cluster: the listed nodes are only
                                                       the start; the slot map comes from them
=====================================================  ==========================================

The engines are redis-py's own (``redis.sentinel.Sentinel.master_for`` and
``redis.cluster.RedisCluster``); only the URL parsing is ours, because redis-py has
no URL form for either.

Timeouts stay inside the daemon's budgets: every socket operation is bounded by
``[redis] socket_timeout`` (sentinel queries by a quarter of it), and a failed
command is retried once, at once. During a Sentinel failover the old master refuses
connections and the sentinels still name it until they have promoted a replica, so
a lookup fails within about one timeout, the check that needed it reports a failure
and the policy answers ``451 4.7.1`` (fail-closed); the next message after the
promotion connects to the new master. A check can therefore never hang past
Postfix's milter timeout, and no lookup is answered from a stale replica: reads and
writes always go to the current master (or to the primary owning the slot).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias
from urllib.parse import unquote

import redis
from redis._parsers.commands import CommandPolicies, RequestPolicy, ResponsePolicy
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.commands.policies import BasePolicyResolver, PolicyResolver, StaticPolicyResolver
from redis.exceptions import RedisClusterException
from redis.retry import Retry
from redis.sentinel import Sentinel

from filterd.errors import DependencyError
from filterd.services import addresses
from filterd.settings import Settings

#: What :func:`connect` returns. Both speak the same command API; code that needs to
#: know the difference asks :func:`is_cluster`.
RedisClient: TypeAlias = "redis.Redis | RedisCluster"

Mode = Literal["single", "sentinel", "cluster"]

SENTINEL_SCHEME = "redis+sentinel"
CLUSTER_SCHEME = "redis+cluster"
DEFAULT_SENTINEL_PORT = 26379
DEFAULT_REDIS_PORT = 6379


class RedisNotConfigured(DependencyError):
    """No Redis URL is configured and no daemon-private Redis is running."""


class RedisUrlError(ValueError):
    """A ``[redis] url`` that cannot be used; the message says which part is wrong."""


@dataclass(frozen=True)
class Endpoint:
    """What a URL names: the topology, its seed nodes, and for Sentinel the master's name."""

    mode: Mode
    url: str
    nodes: tuple[tuple[str, int], ...] = ()
    master: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = None


def redacted_url(url: str) -> str:
    """``url`` with its password replaced by ``***``, for logs and ``filterd check``."""
    scheme, sep, rest = url.partition("://")
    authority = rest.partition("/")[0]
    if not sep or "@" not in authority:
        return url
    userinfo, _, hosts = authority.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    shown = f"{user}:***" if colon else "***"
    return f"{scheme}://{shown}@{hosts}{rest[len(authority) :]}"


def _host_port(text: str, default_port: int, url: str) -> tuple[str, int]:
    """``HOST:PORT``, ``HOST`` or ``[V6]:PORT``."""
    if not text:
        raise RedisUrlError(f"{url}: an empty host in the node list")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise RedisUrlError(f"{url}: unbalanced '[' in {text!r}")
        port_text = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise RedisUrlError(f"{url}: junk after ']' in {text!r}")
    else:
        host, _, port_text = text.rpartition(":") if ":" in text else (text, "", "")
    if not host:
        raise RedisUrlError(f"{url}: no host in {text!r}")
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise RedisUrlError(f"{url}: {text!r} is not HOST:PORT") from None
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise RedisUrlError(f"{url}: bad port in {text!r}")
    return host, int(port_text)


def parse_url(url: str) -> Endpoint:
    """Read a ``[redis] url``; raises :class:`RedisUrlError` naming what is wrong.

    ``redis://``, ``rediss://`` and ``unix://`` are left to redis-py's own parser
    (only the scheme is checked here); the two multi-node forms are parsed here.
    """
    shown = redacted_url(url)
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise RedisUrlError(f"{shown!r}: not a URL (expected e.g. redis://127.0.0.1:6379/0)")
    scheme = scheme.lower()
    if scheme in ("redis", "rediss", "unix"):
        return Endpoint("single", url)
    if scheme not in (SENTINEL_SCHEME, CLUSTER_SCHEME):
        raise RedisUrlError(
            f"{shown!r}: unknown scheme {scheme!r} (redis, rediss, unix, "
            f"{SENTINEL_SCHEME}, {CLUSTER_SCHEME})"
        )
    # urlsplit cannot read a comma-separated host list with ports; split by hand.
    authority, _, path = rest.partition("/")
    path, _, _query = path.partition("?")
    username = password = None
    if "@" in authority:
        userinfo, _, authority = authority.rpartition("@")
        user, colon, pw = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if colon else None
    default = DEFAULT_SENTINEL_PORT if scheme == SENTINEL_SCHEME else DEFAULT_REDIS_PORT
    nodes = tuple(_host_port(part.strip(), default, shown) for part in authority.split(","))
    parts = [p for p in path.split("/") if p]
    if scheme == CLUSTER_SCHEME:
        if parts:
            raise RedisUrlError(f"{shown}: a cluster URL has no path (Redis Cluster has only db 0)")
        return Endpoint("cluster", url, nodes, username=username, password=password)
    if not parts or len(parts) > 2:
        raise RedisUrlError(f"{shown}: expected {SENTINEL_SCHEME}://HOST:PORT[,...]/MASTER[/DB]")
    db = 0
    if len(parts) == 2:
        if not parts[1].isdigit():
            raise RedisUrlError(f"{shown}: the database must be a number, not {parts[1]!r}")
        db = int(parts[1])
    return Endpoint(
        "sentinel", url, nodes, master=unquote(parts[0]), db=db, username=username,
        password=password,
    )  # fmt: skip


class _ScriptsAreKeyed(BasePolicyResolver):
    """Tells redis-py's cluster pipeline that EVAL/EVALSHA route by their KEYS.

    Without it, redis-py 8 asks a node ``COMMAND GETKEYS`` for every EVAL queued in
    a cluster pipeline (a synchronous extra round trip per script; measured: one
    per index set and counter of a records write). With the policy the pipeline
    takes the slot from the script's first key, as redis-py already does outside
    pipelines.
    """

    def __init__(self, fallback: PolicyResolver | None = None) -> None:
        keyed = CommandPolicies(
            request_policy=RequestPolicy.DEFAULT_KEYED,
            response_policy=ResponsePolicy.DEFAULT_KEYED,
        )
        super().__init__({"core": {"eval": keyed, "evalsha": keyed}}, fallback)

    def with_fallback(self, fallback: PolicyResolver) -> PolicyResolver:
        return _ScriptsAreKeyed(fallback)


class _SentinelMaster(redis.Redis):
    """The master client of one Sentinel set-up; closing it closes its sentinels too.

    Each configuration load (SIGHUP) builds a new client and closes the old one;
    without this the old client's connections to the sentinels would stay open
    until garbage collection.
    """

    def close(self) -> None:
        super().close()
        pool = self.connection_pool
        pool.disconnect()
        manager = getattr(pool, "sentinel_manager", None)
        if manager is not None:
            manager.close()


class _Cluster(RedisCluster):
    """RedisCluster whose pipelines use the client's policy resolver.

    redis-py 8.1's ``RedisCluster.pipeline()`` builds its ClusterPipeline without
    passing ``policy_resolver`` on, so :class:`_ScriptsAreKeyed` would not reach
    the pipelines where it matters. Guarded by a test that counts ``COMMAND
    GETKEYS`` calls on a real cluster (tests/test_redis_topologies.py).
    """

    def pipeline(self, transaction: Any = None, shard_hint: Any = None) -> Any:
        base: Any = super().pipeline  # untyped in redis-py
        pipe = base(transaction=transaction, shard_hint=shard_hint)
        pipe._policy_resolver = self._policy_resolver
        return pipe


def connect(settings: Settings, url: str) -> RedisClient:
    """The client for ``url`` with the daemon's timeouts (see the module docstring)."""
    endpoint = parse_url(url)
    timeout = settings.redis.socket_timeout
    common: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        # One quick retry: redis-py's default backoff spends ~4 s on a dead
        # server, half the RCPT budget, before a check can tempfail.
        "retry": Retry(NoBackoff(), 1),
    }
    if endpoint.mode == "single":
        return redis.Redis.from_url(url, health_check_interval=30, **common)
    auth: dict[str, Any] = {"username": endpoint.username, "password": endpoint.password}
    # redis-py leaves Sentinel and ClusterNode untyped; called through Any for mypy.
    sentinel_cls: Any = Sentinel
    node_cls: Any = ClusterNode
    if endpoint.mode == "sentinel":
        assert endpoint.master is not None
        quick = max(0.05, timeout / 4)
        sentinel = sentinel_cls(
            list(endpoint.nodes),
            # Sentinels are asked in turn; a dead one must not eat the budget.
            sentinel_kwargs={"socket_timeout": quick, "socket_connect_timeout": quick},
        )
        client: redis.Redis = sentinel.master_for(
            endpoint.master,
            redis_class=_SentinelMaster,
            db=endpoint.db,
            health_check_interval=30,
            **auth,
            **common,
        )
        return client
    try:
        # Unlike the other clients, RedisCluster reads the slot map at construction.
        return _Cluster(
            startup_nodes=[node_cls(host, port) for host, port in endpoint.nodes],
            require_full_coverage=True,
            policy_resolver=StaticPolicyResolver(fallback=_ScriptsAreKeyed()),
            **auth,
            **common,
        )
    except RedisClusterException as exc:
        # A RedisError like every other connection failure, so callers need one except.
        raise redis.ConnectionError(f"{redacted_url(url)}: {exc}") from None


def connect_for_tools(settings: Settings, url: str | None = None) -> RedisClient:
    """The Redis an admin command should use: --redis-url, [redis] url, or the
    running daemon's private instance."""
    url = url or settings.redis.url
    if not url:
        sock = addresses.redis_socket(settings)
        if not sock.exists():
            raise RedisNotConfigured(
                "no Redis configured: set [redis] url (FILTERD_REDIS_URL) or --redis-url, "
                f"or run `filterd serve` with its private Redis ({sock} does not exist)"
            )
        url = addresses.redis_unix_url(sock)
    try:
        return connect(settings, url)
    except RedisUrlError as exc:
        raise RedisNotConfigured(str(exc)) from None
    except redis.ConnectionError as exc:  # a cluster that cannot be reached at all
        raise RedisNotConfigured(str(exc)) from None


def is_cluster(client: Any) -> bool:
    """True for a Redis Cluster client (and its pipelines)."""
    return isinstance(client, RedisCluster)


def pipeline(client: RedisClient, *, atomic: bool) -> Any:
    """A pipeline that is one MULTI/EXEC where the topology allows it.

    On one Redis (direct or through Sentinel) ``atomic=True`` gives a transaction.
    On Cluster a transaction must stay inside one hash slot, and the keys of a
    records batch or an erase cannot share one (an index is found by mailbox, a
    counter by day), so there the pipeline is split by redis-py across the
    primaries that own the keys. Callers send only single-key commands that are
    atomic on their own (SET ... EX, or one script per key), so each key is
    always complete; only the all-or-nothing across keys is lost, and every such
    caller is written to be safe when repeated.
    """
    return client.pipeline(transaction=atomic and not is_cluster(client))


def _address(pool: Any) -> str | None:
    kwargs = getattr(pool, "connection_kwargs", {})
    if "path" in kwargs:
        return f"unix:{kwargs['path']}"
    if "host" in kwargs:
        return f"{kwargs['host']}:{kwargs.get('port', DEFAULT_REDIS_PORT)}"
    return None


def describe_topology(client: RedisClient) -> dict[str, Any]:
    """What ``filterd check`` prints: the mode, the master, the number of shards.

    It talks to the servers (it answers "which master is it now", not "what was
    configured"), so it raises redis errors when they cannot be reached.
    ``shards`` counts primaries that own slots (1 for single and Sentinel).
    """
    if is_cluster(client):
        assert isinstance(client, RedisCluster)
        cluster: Any = client
        primaries = cluster.get_primaries()
        slots_info = client.cluster_info(target_nodes=RedisCluster.RANDOM)
        state = slots_info.get("cluster_state") if isinstance(slots_info, dict) else None
        return {
            "mode": "cluster",
            "master": None,
            "masters": sorted(f"{n.host}:{n.port}" for n in primaries),
            "shards": len(primaries),
            "replicas": len(cluster.get_replicas()),
            "state": state,
        }
    assert isinstance(client, redis.Redis)
    pool = client.connection_pool
    service = getattr(pool, "service_name", None)
    if service is not None:
        host, port = pool.get_master_address()  # type: ignore[attr-defined]
        info = client.info("replication")
        return {
            "mode": "sentinel",
            "service": service,
            "master": f"{host}:{port}",
            "shards": 1,
            "replicas": int(info.get("connected_slaves", 0)),
            "sentinels": [
                f"{s.connection_pool.connection_kwargs.get('host')}:"
                f"{s.connection_pool.connection_kwargs.get('port')}"
                for s in pool.sentinel_manager.sentinels  # type: ignore[attr-defined]
            ],
        }
    info = client.info("replication")
    return {
        "mode": "single",
        "master": _address(pool),
        "shards": 1,
        "role": info.get("role"),
        "replicas": int(info.get("connected_slaves", 0)),
    }


__all__ = [
    "Endpoint",
    "RedisClient",
    "RedisNotConfigured",
    "RedisUrlError",
    "connect",
    "connect_for_tools",
    "describe_topology",
    "is_cluster",
    "parse_url",
    "pipeline",
    "redacted_url",
]
