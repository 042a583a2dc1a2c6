"""The storage probe: before any run starts, a task on every node that can take a run
writes a file into the experiment folder and reads every input file; the driver reads the
file back. A node that cannot see the shared folder or an input is named (exit 2), and
whether flock there excludes other nodes is found out."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import time
import uuid
from pathlib import Path

from pipeline import config, runs

log = logging.getLogger("pipeline")

PROBE_SECONDS = 120  # for every node to answer the storage probe (a node may start workers)


def probe(ray, exp: Path, jobs, nodes) -> bool:
    """A task on each node writes a file into the experiment folder and reads the input
    files; the driver reads the file back. Any node that cannot is refused, by name
    (ConfigError). Returns whether tasks should take the runs' flock too (False where a
    node's file system refuses flock outright)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = uuid.uuid4().hex[:12]
    inputs = sorted({path for job in jobs for path in input_files(job.cfg)})
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
        elif not appears(written, answer["text"]):
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
        log.warning("no flock on %s (%s): runs are guarded by this driver alone",
                    exp, ", ".join(no_flock))
    if weak:
        log.warning("flock on %s does not exclude other nodes from %s: runs are guarded "
                    "by this driver alone", exp, ", ".join(weak))
    return not no_flock


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


def input_files(cfg: config.Config) -> list[str]:
    """The files a run reads, which every node must see at the same path: the images, the
    masks, an init image and a weights file."""
    # A clip of frame files: each frame it takes (a video file is one file, as an image is).
    contents = config.clip_files(cfg) or [cfg.content]
    paths = [*contents, *cfg.style, *(m for m in cfg.style_masks or [] if m is not None)]
    if cfg.content_mask is not None:
        paths.append(cfg.content_mask)
    if cfg.init not in config.INIT_KINDS:
        paths.append(cfg.init)
    if cfg.model.weights not in config.WEIGHT_KINDS:
        paths.append(cfg.model.weights)
    return paths


def appears(path: Path, text: str, wait: float = 5.0) -> bool:
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
