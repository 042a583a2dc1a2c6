"""Runs as tasks of a Ray cluster (`--executor ray`): the same runs and the same folders, on
as many machines as the cluster has. Each run is one Ray task that calls batch.run_one on the
run's folder in the shared output_dir. This process, the driver, keeps what it keeps with the
local executors: the experiment lock, plan.json, runs.csv, experiment.log, the summary and the
exit codes. `ray` is imported here alone, and only for `--executor ray`: an optional extra.

Who owns a run. The driver alone hands runs out, each to one task; Ray starts a task again
only after the worker or node under it has died (max_retries), and the new attempt resumes
from the run's last checkpoint. flock, which guards runs on one machine, is not to be trusted
on the network file systems clusters share (NFS mounted `nolock` or `local_lock` grants it to
every client; a lock server restart can drop it), so it is not what keeps two processes off
one run here: the driver's submissions are, and a second driver for the same experiment is
refused by a named actor in the cluster, whatever the file system. Tasks still take the run's
flock as a second guard where the file system honours it, and go on without it where it
refuses flock outright (ENOLCK). The start-up probe finds out which, node by node.

Stopping. Ctrl-C or SIGTERM on the driver sets a flag in a small actor that every task
watches; the run stops at its next evaluation and saves, as on one machine. Tasks are never
killed or cancelled by the driver (ray.cancel interrupts a task wherever it is, a save
included); runs not handed out yet are not started.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import hashlib
import logging
import math
import os
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from pipeline import batch, config, runs, scales, workers

log = logging.getLogger("pipeline")

MISSING = "--executor ray needs the optional 'ray' extra: pip install -e '.[ray]'"
NAMESPACE = "style-pipeline"
TASK_RETRIES = 3  # Ray's re-executions of a run whose worker or node died
POLL_SECONDS = 0.5  # how often the driver looks at its tasks and at the stop signal
PROBE_SECONDS = 120  # for every node to answer the storage probe (a node may start workers)
# For a cluster's address to answer before ray.init is called: ray.init itself retries an
# address where nothing answers for a quarter of an hour (20 tries of ~40 s), with no timeout.
CONNECT_SECONDS = 5  # a TCP connection (refused at once where nothing listens)
GRPC_SECONDS = 10  # then an HTTP/2 (gRPC) connection, which a Ray cluster's GCS accepts
# What a task's process must see as the driver does, whatever its node was started with.
FORWARDED = ("KERAS_BACKEND", "PIPELINE_OFFLINE", "TF_CPP_MIN_LOG_LEVEL")


def import_ray():
    """The ray module, or the one-line ConfigError (exit 2) that names the extra."""
    try:
        import ray
    except ImportError:
        raise config.ConfigError(MISSING) from None
    return ray


class RayExecutor:
    """`executor(jobs, stop)` for batch.run_batch: yields each run's Outcome as its task ends.
    `start()` first: it connects, checks the resources and the shared storage."""

    def __init__(self, address: str | None, gpus_per_run: float | None, cpus_per_run: float):
        self.ray = import_ray()
        self.address, self.gpus, self.cpus = address, gpus_per_run, cpus_per_run
        self.capacity = 1  # runs that fit in the cluster at once (status's time left)
        self.lock_runs = True
        self.flag = None

    def start(self, exp: Path, jobs: list[batch.Planned]) -> str:
        """Connect to the cluster (no address: a new local instance), claim the experiment
        in it, and probe every node that can take a run. Returns a line for the log.
        Raises ConfigError (exit 2) for a cluster that cannot run these jobs, runs.Locked
        (exit 3) when another driver holds the experiment."""
        ray = self.ray
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # nothing leaves the machine
        # "local" starts a new instance even where RAY_ADDRESS or a `ray start` says otherwise;
        # it listens on the loopback interface alone: nothing but this machine needs it.
        options = ({"address": self.address} if self.address else
                   {"address": "local", "include_dashboard": False,
                    "_node_ip_address": "127.0.0.1"})
        connected = ray.is_initialized()  # a second batch in one process keeps its connection
        if self.address and not connected:
            check_address(self.address)
        try:
            if not connected:
                ray.init(namespace=NAMESPACE, log_to_driver=True, **options)
        except (ConnectionError, ValueError, RuntimeError) as e:
            hint = ("" if os.environ.get("RAY_AUTH_MODE") else
                    "; a cluster with token authentication needs RAY_AUTH_MODE=token here")
            if not self.address:
                raise config.ConfigError(f"could not start a local Ray instance "
                                         f"({_first_line(e)})") from None
            raise config.ConfigError(f"--address {self.address}: no Ray cluster to connect to "
                                     f"({_first_line(e)}){hint}") from None
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        if self.gpus is None:  # one GPU per run where there are GPUs, none on a CPU cluster
            self.gpus = 1.0 if any(n["Resources"].get("GPU") for n in nodes) else 0.0
        usable = [n for n in nodes if _fits(n["Resources"], self.cpus, self.gpus)]
        if not usable:
            have = "; ".join(f"{n['NodeManagerAddress']}: {n['Resources'].get('CPU', 0):g} CPU, "
                             f"{n['Resources'].get('GPU', 0):g} GPU" for n in nodes)
            raise config.ConfigError(
                f"no node of the Ray cluster has {self.cpus:g} CPU(s) and {self.gpus:g} GPU(s) "
                f"for a run (--cpus-per-run, --gpus-per-run); it has {have}")
        self.capacity = sum(_fits(n["Resources"], self.cpus, self.gpus) for n in usable)
        self.flag = self._claim(exp)
        self._probe(exp, jobs, usable)
        where = self.address or "a new local instance"
        return (f"Ray cluster at {where}: {len(usable)} node(s) for runs of {self.cpus:g} CPU "
                f"and {self.gpus:g} GPU each, up to {self.capacity} at once")

    def close(self) -> None:
        """Give up the experiment's claim on the cluster (the driver's exit does it too)."""
        if self.flag is not None:
            self.ray.kill(self.flag)
            self.flag = None

    def _claim(self, exp: Path):
        """The experiment's stop flag, a named actor on the driver's node: its name is taken
        while this driver lives, so a second driver on the same cluster is refused."""
        ray = self.ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        name = "experiment-" + hashlib.sha256(str(exp).encode()).hexdigest()[:24]
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        try:
            flag = ray.remote(StopFlag).options(name=name, num_cpus=0,
                                                scheduling_strategy=here).remote()
            ray.get(flag.is_set.remote())
        except ValueError:  # the name is taken
            raise runs.Locked(f"experiment {exp} is in use by another driver on the Ray "
                              f"cluster at {self.address or 'this machine'}") from None
        return flag

    def _probe(self, exp: Path, jobs, nodes) -> None:
        """A task on each node writes a file into the experiment folder and reads the input
        images; the driver reads the file back. Any node that cannot is refused, by name."""
        ray = self.ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        token = uuid.uuid4().hex[:12]
        inputs = sorted({path for job in jobs for path in _inputs(job.cfg)})
        probe = ray.remote(probe_node)
        # Named as temporaries, so that a driver killed mid-probe leaves nothing for long:
        # the next command clears `.*.tmp` files away when it takes the experiment.
        held = exp / f".probe-{token}.tmp"
        problems, answers = [], []
        with runs.Lock(held, "storage probe"):  # each node tries to take it too
            refs = [probe.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
                n["NodeID"], soft=False)).remote(str(exp), token, inputs) for n in nodes]
            try:
                answers = ray.get(refs, timeout=PROBE_SECONDS)
            except ray.exceptions.GetTimeoutError:
                raise config.ConfigError(f"the storage probe did not come back from every node "
                                         f"of the Ray cluster in {PROBE_SECONDS} s") from None
        held.unlink(missing_ok=True)
        for answer in answers:
            where = f"node {answer['host']}"
            written = exp / answer["file"]
            if answer["missing"]:
                problems.append(f"{where} cannot read {answer['missing'][0]}")
            elif answer["error"]:
                problems.append(f"{where} cannot write into {exp} ({answer['error']})")
            elif not _appears(written, answer["text"]):
                problems.append(f"a file that {where} wrote into {exp} does not appear here on "
                                f"{socket.gethostname()}")
            written.unlink(missing_ok=True)
        if problems:
            raise config.ConfigError(
                f"output_dir {exp.parent} and the input files (images, masks, weights) must be "
                f"shared by every node of the Ray cluster (the same paths, e.g. one NFS mount): "
                f"{'; '.join(problems)}")
        no_flock = [a["host"] for a in answers if a["flock"] == "unsupported"]
        weak = [a["host"] for a in answers if a["flock"] == "not exclusive"]
        if no_flock:
            self.lock_runs = False
            log.warning("no flock on %s (%s): runs are guarded by this driver alone",
                        exp, ", ".join(no_flock))
        if weak:
            log.warning("flock on %s does not exclude other nodes from %s: runs are guarded "
                        "by this driver alone", exp, ", ".join(weak))

    def __call__(self, jobs: list[batch.Planned], stop) -> Iterator[batch.Outcome]:
        """Hand each job to a task, in order, and yield outcomes as they end. `stop` (set by
        a signal handler) is passed on to the tasks through the flag actor."""
        ray = self.ray
        env = {**workers.thread_caps(max(1, int(self.cpus)), os.environ),
               **{k: os.environ[k] for k in FORWARDED if k in os.environ}}
        if 0 < self.gpus < 1:  # runs share a GPU: neither framework may take all of it
            env.update(TF_FORCE_GPU_ALLOW_GROWTH="true", XLA_PYTHON_CLIENT_PREALLOCATE="false")
        task = ray.remote(run_task).options(
            num_cpus=self.cpus, num_gpus=self.gpus, max_retries=TASK_RETRIES,
            retry_exceptions=False,  # run_one records a run's own errors; only deaths retry
            runtime_env={"env_vars": env})
        # No more in flight than the cluster has room for: runs start in the plan's order
        # (Ray's queue keeps none), and after a stop no queued task is left to drain.
        queue, pending, told = list(jobs), {}, False
        while queue or pending:
            if stop.is_set() and not told:
                self.flag.set.remote()
                queue, told = [], True  # not started: the same command runs them
            while queue and len(pending) < self.capacity:
                job = queue.pop(0)
                pending[task.remote(job, self.flag, self.lock_runs)] = job
            if not pending:
                break
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_SECONDS)
            for ref in ready:
                job = pending.pop(ref)
                try:
                    outcome = ray.get(ref)
                except ray.exceptions.RayError as e:
                    outcome = self._lost(job, e)
                if outcome is not None:
                    yield outcome

    def _lost(self, job: batch.Planned, error: Exception) -> batch.Outcome:
        """A task that came back without an outcome: its worker died more often than Ray
        retries (the out-of-memory killer, most likely), or it could not start."""
        ray = self.ray
        folder = batch.folder_of(job)
        metrics = folder.read_metrics() or {}
        if isinstance(error, ray.exceptions.OutOfMemoryError | ray.exceptions.WorkerCrashedError):
            message = batch.describe_error(MemoryError(
                f"its Ray worker died {TASK_RETRIES + 1} times ({type(error).__name__}), "
                f"most likely killed for memory"), job.cfg)
        else:
            message = f"Ray could not run it: {_first_line(error)}"
        if metrics:
            folder.write_metrics({**metrics, "status": "failed", "error": message})
        return batch.Outcome(job.run_id, "failed", folder, message)


class StopFlag:
    """The driver's word to its tasks (an async Ray actor): set once; `wait` answers when it
    is. Tasks never block on it in ray.get: Ray lends a blocked task's CPU to another task,
    so that more runs would share a node than it has room for."""

    def __init__(self):
        self.event = asyncio.Event()

    async def set(self) -> None:
        self.event.set()

    async def is_set(self) -> bool:
        return self.event.is_set()

    async def wait(self) -> bool:
        await self.event.wait()
        return True


def run_task(job: batch.Planned, flag, lock: bool) -> batch.Outcome | None:
    """One run in a Ray worker. Returns None when the driver said stop before it began."""

    from pipeline.progress import Progress

    if not log.handlers:  # a Ray worker: log lines go to its stderr, which Ray forwards
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    # Futures, not ray.get: see StopFlag. The answer to `wait` comes when the driver says
    # stop, or as an error when the driver is gone: either way the run stops and saves.
    if flag.is_set.remote().future().result(timeout=60):
        return None
    stopped = flag.wait.remote().future()
    folder = batch.folder_of(job)
    if not folder.path.parent.is_dir():  # a node that joined after the probe
        return batch.Outcome(job.run_id, "failed", folder, f"{folder.path.parent} is not "
                             f"visible on node {socket.gethostname()}: output_dir must be shared")
    # Iterations are numbered across the stages of coarse to fine (scales.py): the total is
    # theirs, as in the local executors' progress.
    progress = Progress(job.run_id, scales.total_iterations(job.cfg), job.cfg.log_every,
                        bar=False)
    return batch.run_one(job, progress, stopped.done, lock=lock)


def probe_node(exp: str, token: str, inputs: list[str]) -> dict:
    """On one node: can it read the inputs, write into the experiment folder, and does flock
    there exclude the driver (which holds `.probe-TOKEN.tmp`)?"""
    import ray

    node = ray.get_runtime_context().get_node_id()
    answer = {"host": socket.gethostname(), "file": f".probe-{token}-{node[:16]}.tmp",
              "text": f"{token} {node}\n", "error": "", "flock": "exclusive",
              "missing": [path for path in inputs if not os.access(path, os.R_OK)]}
    try:
        (Path(exp) / answer["file"]).write_text(answer["text"])
    except OSError as e:
        answer["error"] = f"{type(e).__name__}: {e.strerror or e}"
    try:
        fd = os.open(Path(exp) / f".probe-{token}.tmp", os.O_RDWR)
    except OSError:
        return answer  # not shared: the written file will not appear either
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        answer["flock"] = "not exclusive"  # granted while the driver holds it
    except BlockingIOError:
        pass
    except OSError as e:
        answer["flock"] = "unsupported" if e.errno == errno.ENOLCK else str(e)
    finally:
        os.close(fd)
    return answer


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
        raise config.ConfigError(f"--address {address}: {_first_line(e)}") from None


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


def _fits(resources: dict, cpus: float, gpus: float) -> int:
    """How many runs of `cpus` and `gpus` a node of these resources holds at once."""
    counts = [math.floor(resources.get("CPU", 0) / cpus + 1e-9)]
    if gpus:
        counts.append(math.floor(resources.get("GPU", 0) / gpus + 1e-9))
    return max(0, min(counts))


def _inputs(cfg: config.Config) -> list[str]:
    """The files a run reads, which every node must see at the same path: the images, the
    masks, an init image and a weights file."""
    paths = [cfg.content, *cfg.style, *(m for m in cfg.style_masks or [] if m is not None)]
    if cfg.content_mask is not None:
        paths.append(cfg.content_mask)
    if cfg.init not in config.INIT_KINDS:
        paths.append(cfg.init)
    if cfg.model.weights not in config.WEIGHT_KINDS:
        paths.append(cfg.model.weights)
    return paths


def _appears(path: Path, text: str, wait: float = 5.0) -> bool:
    """Whether `path` holds `text`, allowing a network file system a moment to show it."""
    deadline = time.monotonic() + wait
    while True:
        try:
            if path.read_text() == text:
                return True
        except FileNotFoundError:
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[0] if lines else type(error).__name__)[:300]
