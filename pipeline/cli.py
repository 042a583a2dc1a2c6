"""The command line: `python -m pipeline run|validate|status|report ...`.

Turns errors into one-line messages and exit codes: 0 every run completed (or already had),
1 some run failed, 2 the config or command line is wrong (nothing was started), 3 the
experiment is in use by another process (nothing was started), 130 interrupted (SIGINT or
SIGTERM; the same command again resumes).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections import Counter
from pathlib import Path

from pipeline import batch, config, estimate, framework, jobs, runs, weights
from pipeline.progress import Progress

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_LOCKED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
log = logging.getLogger("pipeline")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse exits 2 too, but prints the whole usage first
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def with_config(name, help_text):
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("config", help="YAML config file")
        sub.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="override a config key, e.g. --set loss.style_weight=1e4")
        return sub

    run = with_config("run", "run every run a config describes (resuming, skipping done ones)")
    run.add_argument("--dry-run", action="store_true", help="list the runs, run nothing")
    run.add_argument("--workers", type=_workers, default=1, metavar="N",
                     help="run N runs at once in separate processes (one GPU each if several);"
                          " auto: a count from the cores, GPUs and memory")
    run.add_argument("--retries", type=int, default=0, metavar="N",
                     help="re-attempt failed runs up to N times")
    run.add_argument("--executor", choices=("local", "ray"), default="local",
                     help="local: this machine (--workers); ray: each run a task of a Ray cluster")
    run.add_argument("--address", metavar="HOST:PORT",
                     help="the Ray cluster to use ('auto': the one started here with ray start); "
                          "default: a new local instance")
    run.add_argument("--gpus-per-run", type=float, metavar="X",
                     help="GPUs each Ray task holds; fractions share a GPU (default: 1 where the "
                          "cluster has GPUs, else 0)")
    run.add_argument("--cpus-per-run", type=float, metavar="N",
                     help="CPUs each Ray task holds, and its thread count (default: 1)")
    with_config("validate", "check a config and print it resolved, without running")
    est = with_config("estimate", "each run's peak memory and time on this machine "
                      "(calibrates once per machine)")
    est.add_argument("--workers", type=int, default=1, metavar="N",
                     help="as for run: N runs share the machine's memory")
    commands.add_parser("doctor", help="what this machine runs on, and what is wrong with it",
                        description="backend, devices, GPUs, versions, BLAS and CPU threads, "
                                    "weights; exit 1 when something is wrong")
    for name, help_text in (("status", "counts, each run's status and the time left"),
                            ("report", "write report.html, a contact sheet and loss curves")):
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("experiment", type=Path, help="an experiment folder: <output_dir>/<name>")
    return parser


def _workers(text: str):
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or auto, not {text!r}") from None


def main(argv=None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # `status ... | head`: the reader left; that is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


def _main(argv) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    framework.quiet_logs()  # for this process and the ones it starts (workers, calibration)
    if args.command == "doctor":
        from pipeline import doctor

        return doctor.main()
    try:
        if args.command in ("status", "report"):
            if not args.experiment.is_dir():
                raise config.ConfigError(f"{args.experiment}: no such experiment folder")
            return _status(args.experiment) if args.command == "status" else _report(args)
        workers = getattr(args, "workers", 1)  # "auto" is chosen once the runs are known
        if (workers != "auto" and workers < 1) or getattr(args, "retries", 0) < 0:
            raise config.ConfigError("--workers must be at least 1 and --retries at least 0")
        if args.command == "run":
            _check_executor(args)
        cfg = config.load(args.config, args.set)
        if args.command == "validate":
            return _validate(cfg)
        if args.command == "estimate":
            return _estimate(cfg, args.workers)
        return _run(cfg, args)
    except (config.ConfigError, weights.WeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except runs.Locked as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_LOCKED
    except estimate.EstimateError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED


def _validate(cfg: config.Config) -> int:
    planned = jobs.plan(cfg)
    for job in planned:
        data = config.to_dict(job.cfg)
        data.pop("sweep")
        print(f"# run {job.run_id}")
        print(config.to_yaml(data))
    print(f"# {len(planned)} run(s): config is valid", file=sys.stderr)
    return EXIT_OK


def _estimate(cfg: config.Config, workers: int) -> int:
    planned = jobs.plan(cfg)
    unreadable = {}
    estimates = estimate.for_jobs(planned, workers, log=log.info,
                                  on_skip=lambda job, why: unreadable.update({job.run_id: why}))
    for job in planned:
        if job.run_id in unreadable:
            print(f"{job.run_id}  no estimate: {unreadable[job.run_id]}")
            continue
        one = estimates[job.run_id]
        largest = one.largest_tiled if one.tile else one.largest_size
        fits = ("fits" if one.fits else f"does NOT fit: largest size {largest}" if largest
                else "does NOT fit at any size")
        print(f"{job.run_id}  {one.line().removeprefix('estimate: ')}  {fits}")
        compared = one.comparison()  # whole against tile by tile, where a tile cuts it
        if compared:
            print(f"{' ' * len(job.run_id)}  {compared}")
    return EXIT_OK


def _estimates(planned, workers: int) -> dict:
    """Each run's estimate, its line logged when the run starts. Completed runs need none
    (a batch that is all done calibrates nothing); a run whose images cannot be read gets
    none and fails by itself when it runs. A single run that cannot fit in memory is a usage
    error (exit 2, nothing started); in a batch, see _refuse."""
    if estimate.skipped():
        return {}
    todo = [job for job in planned
            if (jobs.folder_of(job).read_metrics() or {}).get("status") != "completed"]
    try:
        estimates = estimate.for_jobs(todo, workers, log=log.info)
    except estimate.EstimateError as e:  # no estimate is no reason to keep a batch from running
        log.warning("estimate unavailable, running without the memory check: %s", e)
        return {}
    for job in todo:
        if job.run_id in estimates:
            job.estimate = estimates[job.run_id].line()
            if job.cfg.tile == "auto" and estimates[job.run_id].tile:
                # auto's choice, made here once: the run computes with it, and its config.yaml
                # says so (`tile` is not part of the run id).
                job.cfg.tile = estimates[job.run_id].tile
    one = estimates.get(planned[0].run_id) if len(planned) == 1 else None
    if one and not one.fits:
        raise config.ConfigError(one.refusal())
    return estimates


def _refuse(planned, estimates) -> list[jobs.Outcome]:
    """In a batch, the runs that fit run; those that cannot are marked failed, their error
    naming the largest size that fits (so the command exits 1)."""
    return [jobs.refuse(job, estimates[job.run_id].refusal()) for job in planned
            if job.run_id in estimates and not estimates[job.run_id].fits]


def _run(cfg: config.Config, args) -> int:
    planned = jobs.plan(cfg)
    exp = runs.experiment_dir(cfg)
    if args.workers == "auto":
        from pipeline import hardware

        cores = hardware.usable_cores()
        args.workers, why = hardware.choose_workers(
            cores, hardware.free_cores(cores, hardware.load_average()),
            len(hardware.driver_gpus()), len(planned), hardware.memory_bytes(available=True),
            on_device=bool(planned) and all(j.cfg.optimizer.method != "scipy" for j in planned))
        log.info("--workers auto: %d (%s)", args.workers, why)
    if args.dry_run:
        for job in planned:
            swept = " ".join(f"{k}={v}" for k, v in job.label.items())
            print(f"{job.run_id}  {swept}".rstrip())
        holder = runs.holder_of(exp / ".lock")
        busy = f"; in use by {holder}" if holder else ""
        print(f"# {len(planned)} run(s) in {exp}{busy}", file=sys.stderr)
        return EXIT_OK
    _check_weights(planned)
    # Calibrated on this machine: it says nothing of a Ray cluster's nodes.
    estimates = _estimates(planned, args.workers) if args.executor == "local" else {}
    with runs.experiment_lock(exp):
        runs.remove_stale_temporaries(exp)
        log_file = exp / "experiment.log"
        handler = logging.FileHandler(log_file)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        log.addHandler(handler)
        executor = None
        if args.executor == "ray":  # before the stop handlers: ray.init sets its own SIGTERM's
            from pipeline import cluster

            executor = cluster.RayExecutor(args.address, args.gpus_per_run, args.cpus_per_run or 1)
            log.info("%s: %d run(s), %s", exp, len(planned), executor.start(exp, planned))
        else:
            log.info("%s: %d run(s), %d worker(s)", exp, len(planned), args.workers)
        runs.write_plan(exp, [{"run_id": j.run_id, "label": j.label,
                               "iterations": jobs.total_iterations(j),
                               **({"frames": j.clip.count} if j.clip else {})} for j in planned],
                        executor.capacity if executor else args.workers)
        runs.write_table(exp)
        refused = _refuse(planned, estimates)
        stop = _install_stop_handlers()

        def finished(outcome):
            _say(outcome)
            runs.write_table(exp)  # kept current as runs finish

        for outcome in refused:
            finished(outcome)
        skip = {o.run_id for o in refused}
        outcomes = refused + batch.run_batch(
            [job for job in planned if job.run_id not in skip], args.workers, args.retries, stop,
            progress=lambda job: Progress(job.run_id, jobs.total_iterations(job),
                                          job.cfg.log_every),
            on_outcome=finished, log_file=str(log_file), executor=executor)
        counts = Counter(o.status for o in outcomes)
        not_started = len(planned) - len(outcomes)
        log.info("summary: %d run(s): %d completed, %d failed, %d interrupted, %d skipped%s",
                 len(planned), counts["completed"], counts["failed"], counts["interrupted"],
                 counts["skipped"], f", {not_started} not started" if not_started else "")
        for outcome in outcomes:
            if outcome.status == "failed":
                log.info("  failed: %s: %s", outcome.run_id, outcome.message)
        log.info("table: %s", exp / "runs.csv")
        log.removeHandler(handler)
    if counts["failed"]:
        return EXIT_FAILED
    if counts["interrupted"] or not_started or stop.is_set():
        return EXIT_INTERRUPTED
    return EXIT_OK


def _check_weights(planned) -> None:
    """Fetch or find each network's ImageNet file once, before anything is created: without
    it every run would fail alike, each in a folder of its own. Completed runs need nothing."""
    networks = {job.cfg.model.network for job in planned if job.cfg.model.weights == "imagenet"
                and (jobs.folder_of(job).read_metrics() or {}).get("status") != "completed"}
    for network in sorted(networks):
        weights.imagenet_file(network)


def _check_executor(args) -> None:
    """The executor's options make sense together, and Ray is installed if it is asked for."""
    ray_options = {"--address": args.address, "--gpus-per-run": args.gpus_per_run,
                   "--cpus-per-run": args.cpus_per_run}
    if args.executor != "ray":
        given = [name for name, value in ray_options.items() if value is not None]
        if given:
            raise config.ConfigError(f"{', '.join(given)}: only with --executor ray")
        return
    if args.workers != 1:
        raise config.ConfigError("--workers is for --executor local; on Ray, --cpus-per-run and "
                                 "--gpus-per-run decide how many runs share a node")
    gpus = args.gpus_per_run
    if gpus is not None and (gpus < 0 or gpus > 1 and gpus != int(gpus)):
        raise config.ConfigError("--gpus-per-run: a fraction up to 1 or a whole number of GPUs")
    if args.cpus_per_run is not None and args.cpus_per_run <= 0:
        raise config.ConfigError("--cpus-per-run: must be more than 0")
    from pipeline import cluster

    cluster.import_ray()  # a missing extra is named now, before anything starts


def _say(outcome) -> None:
    if outcome.status == "skipped":
        log.info("%s: already completed, nothing to do (%s)", outcome.run_id, outcome.folder.path)
    elif outcome.status == "completed":
        folder = outcome.folder
        log.info("%s: completed -> %s", outcome.run_id,
                 folder.video if folder.video.exists() else folder.result)
    elif outcome.status == "interrupted":
        log.info("%s: interrupted; best image so far in %s; run the same command to resume",
                 outcome.run_id, outcome.folder.result)
    else:
        log.error("%s: failed: %s", outcome.run_id, outcome.message)


def _install_stop_handlers() -> threading.Event:
    """SIGINT and SIGTERM ask the runs to stop at their next evaluation and save what they
    have; a second Ctrl-C aborts at once."""
    stop = threading.Event()

    def handler(signum, frame):
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.set()
        log.warning("%s: stopping at the next evaluation and saving (Ctrl-C again aborts)",
                    signal.Signals(signum).name)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return stop


def _status(exp: Path) -> int:
    rows = runs.experiment_rows(exp)
    if not rows:
        raise config.ConfigError(f"{exp}: no runs here (is it <output_dir>/<name>?)")
    holder = runs.holder_of(exp / ".lock")
    counts = Counter(row["status"] for row in rows)
    print(f"{exp}: {len(rows)} run(s), " + (f"running: {holder}" if holder else "not running"))
    print("  " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    width = max(len(row["run_id"]) for row in rows)
    for row in rows:
        done, planned = runs.progress_of(row), row["planned_iterations"]
        loss = f"loss {row['total']:<9.4g}" if row["total"] is not None else ""
        swept = " ".join(f"{k}={v}" for k, v in row["swept"].items())
        steps = f"{done}/{planned or '?'}"
        if row["frames_total"]:  # a clip: its frames; the time left counts iterations
            steps = f"{row['frames_done']}/{row['frames_total']} frames"
        line = f"  {row['status']:<11} {row['run_id']:<{width}} {steps:>11}  {loss:<14}"
        print(f"{line}  {swept}".rstrip() + (f"  ({row['error']})" if row["error"] else ""))
    eta = _time_left(rows, runs.read_plan(exp).get("workers", 1))
    print(f"  time left: {eta}")
    if counts["killed"]:
        print("  (killed: its process died mid-run; the same run command resumes it from its "
              "last checkpoint)")
    older = runs.unplanned_runs(exp)
    if older:
        print(f"  ({len(older)} older run folder(s) here are not in the current plan: "
              f"{', '.join(older[:3])}{', ...' if len(older) > 3 else ''})")
    return EXIT_OK


def _time_left(rows, workers: int) -> str:
    """Remaining iterations times the seconds per iteration seen so far, over the workers."""
    spent = sum(r["seconds"] or 0 for r in rows if r["iterations"])
    done = sum(r["iterations"] for r in rows if r["seconds"])
    remaining = sum(max(0, (r["planned_iterations"] or 0) - runs.progress_of(r))
                    for r in rows if r["status"] != "completed")
    if remaining == 0:
        return "none"
    if not done:
        return "unknown until a run has made progress"
    seconds = remaining * spent / done / max(1, workers)
    hours, rest = divmod(int(seconds), 3600)
    return f"about {hours}h{rest // 60:02d}m" if hours else f"about {rest // 60}m{rest % 60:02d}s"


def _report(args) -> int:
    from pipeline import report

    for path in report.write_report(args.experiment):
        print(path)
    return EXIT_OK
