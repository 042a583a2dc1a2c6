"""Reaching a Ray cluster: the optional extra imported, an address checked within seconds
(ray.init alone retries an address where nothing answers for a quarter of an hour), the
connection made, and the nodes that can take a run of the requested CPUs and GPUs."""

from __future__ import annotations

import math
import os
import socket

from pipeline import config

MISSING = "--executor ray needs the optional 'ray' extra: pip install -e '.[ray]'"
NAMESPACE = "style-pipeline"
# For a cluster's address to answer before ray.init is called: ray.init itself retries an
# address where nothing answers for a quarter of an hour (20 tries of ~40 s), with no timeout.
CONNECT_SECONDS = 5  # a TCP connection (refused at once where nothing listens)
GRPC_SECONDS = 10  # then an HTTP/2 (gRPC) connection, which a Ray cluster's GCS accepts


def import_ray():
    """The ray module, or the one-line ConfigError (exit 2) that names the extra."""
    try:
        import ray
    except ImportError:
        raise config.ConfigError(MISSING) from None
    return ray


def connect(ray, address: str | None) -> None:
    """ray.init on `address` (None: a new local instance on this machine), or ConfigError."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # nothing leaves the machine
    if ray.is_initialized():  # a second batch in one process keeps its connection
        return
    if address:
        check_address(address)
    # "local" starts a new instance even where RAY_ADDRESS or a `ray start` says otherwise;
    # it listens on the loopback interface alone: nothing but this machine needs it.
    options = ({"address": address} if address else
               {"address": "local", "include_dashboard": False, "_node_ip_address": "127.0.0.1"})
    try:
        ray.init(namespace=NAMESPACE, log_to_driver=True, **options)
    except (ConnectionError, ValueError, RuntimeError) as e:
        hint = ("" if os.environ.get("RAY_AUTH_MODE") else
                "; a cluster with token authentication needs RAY_AUTH_MODE=token here")
        if not address:
            raise config.ConfigError(f"could not start a local Ray instance "
                                     f"({first_line(e)})") from None
        raise config.ConfigError(f"--address {address}: no Ray cluster to connect to "
                                 f"({first_line(e)}){hint}") from None


def usable_nodes(ray, cpus: float, gpus: float) -> list[dict]:
    """The live nodes that hold at least one run of `cpus` and `gpus`, or ConfigError."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    usable = [n for n in nodes if fits(n["Resources"], cpus, gpus)]
    if not usable:
        have = "; ".join(f"{n['NodeManagerAddress']}: {n['Resources'].get('CPU', 0):g} CPU, "
                         f"{n['Resources'].get('GPU', 0):g} GPU" for n in nodes)
        raise config.ConfigError(
            f"no node of the Ray cluster has {cpus:g} CPU(s) and {gpus:g} GPU(s) for a run "
            f"(--cpus-per-run, --gpus-per-run); it has {have}")
    return usable


def has_gpus(ray) -> bool:
    return any(n["Resources"].get("GPU") for n in ray.nodes() if n.get("Alive"))


def fits(resources: dict, cpus: float, gpus: float) -> int:
    """How many runs of `cpus` and `gpus` a node of these resources holds at once."""
    counts = [math.floor(resources.get("CPU", 0) / cpus + 1e-9)]
    if gpus:
        counts.append(math.floor(resources.get("GPU", 0) / gpus + 1e-9))
    return max(0, min(counts))


def check_address(address: str) -> None:
    """Raise ConfigError (exit 2) unless a Ray cluster answers at `address` within seconds:
    a wrong address, or `auto` reading the session file a Ray that has died left behind,
    would otherwise keep ray.init waiting for a quarter of an hour."""
    where = _bootstrap_address(address)
    host, _, port = where.rpartition(":")
    host = host.strip("[]")  # an IPv6 address: [::1]:6379
    try:
        with socket.create_connection((host, int(port)), timeout=CONNECT_SECONDS):
            pass
    except (OSError, ValueError) as e:
        raise config.ConfigError(_unreachable(address, where, _connect_error(e))) from None
    if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        return  # a TLS cluster: the plain HTTP/2 check below cannot speak to it
    try:
        import grpc
    except ImportError:
        return
    channel = grpc.insecure_channel(where)
    try:
        grpc.channel_ready_future(channel).result(timeout=GRPC_SECONDS)
    except grpc.FutureTimeoutError:
        raise config.ConfigError(_unreachable(
            address, where, f"something listens there, but no Ray cluster: no gRPC answer in "
                            f"{GRPC_SECONDS} s; the head's `ray start` prints the GCS address "
                            f"to use, not the dashboard's")) from None
    finally:
        channel.close()


def _bootstrap_address(address: str) -> str:
    """HOST:PORT that ray.init would connect to for `address`, by Ray's own rules: `auto`
    reads RAY_ADDRESS or the session file the last `ray start` wrote on this machine."""
    if address.startswith("ray://"):  # Ray Client: its server's own address
        return address.removeprefix("ray://").partition("/")[0]
    try:
        from ray._private.services import canonicalize_bootstrap_address
    except ImportError:  # moved in another Ray version: check the address as given
        return address
    try:
        return canonicalize_bootstrap_address(address) or address
    except ConnectionError:  # `auto` with nothing found
        raise config.ConfigError(
            f"--address {address}: no Ray cluster was started on this machine; "
            f"{_HOW_TO_START}") from None
    except ValueError as e:
        raise config.ConfigError(f"--address {address}: {first_line(e)}") from None


_HOW_TO_START = ("start one with `ray start --head` (and `ray start --address=HEAD:PORT` on each "
                 "other machine), or leave out --address for a new local instance")


def _unreachable(address: str, where: str, reason: str) -> str:
    if address == "auto":  # resolved from RAY_ADDRESS or a session file
        return (f"--address auto: no Ray cluster answers at {where}, the address it found on "
                f"this machine ({reason}): a stale session of a Ray that has stopped? "
                f"`ray stop` clears it; then {_HOW_TO_START}")
    there = "there" if where == address else f"at {where}"  # Ray's own for 127.0.0.1
    return f"--address {address}: no Ray cluster answers {there} ({reason}); {_HOW_TO_START}"


def _connect_error(e: Exception) -> str:
    if isinstance(e, socket.timeout):
        return f"no answer in {CONNECT_SECONDS} s"
    if isinstance(e, socket.gaierror):
        return f"unknown host: {e.strerror or e}"
    if isinstance(e, ValueError):
        return "expected HOST:PORT"
    return (e.strerror or str(e)).lower()


def first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[0] if lines else type(error).__name__)[:300]
