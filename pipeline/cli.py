"""The command line: `python -m pipeline run|validate CONFIG [--set key=value ...]`.

Turns errors into one-line messages and exit codes: 0 every run completed (or was already),
1 some run failed, 2 the config or command line is wrong (nothing was started),
130 interrupted (SIGINT or SIGTERM; the same command again resumes).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from pipeline import config, runs

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
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
    with_config("validate", "check a config and print it resolved, without running")
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        cfg = config.load(args.config, args.set)
        if args.command == "validate":
            return _validate(cfg)
        return _run(cfg, args.dry_run)
    except config.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE


def _validate(cfg: config.Config) -> int:
    runs = config.expand(cfg)
    for label, one in runs:
        data = config.to_dict(one)
        data.pop("sweep")
        print(f"# run {config.run_id(one, label)}")
        print(config.to_yaml(data))
    print(f"# {len(runs)} run(s): config is valid", file=sys.stderr)
    return EXIT_OK


def _run(cfg: config.Config, dry_run: bool) -> int:
    # Quiet TensorFlow's start-up chatter before it is imported (through batch).
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from pipeline import batch

    jobs = batch.plan(cfg)
    if dry_run:
        for job in jobs:
            swept = " ".join(f"{k}={v}" for k, v in job.label.items())
            print(f"{job.run_id}  {swept}".rstrip())
        print(f"# {len(jobs)} run(s)", file=sys.stderr)
        return EXIT_OK

    stop = _install_stop_handlers()
    outcomes = []
    for job in jobs:
        if stop.is_set():
            break
        progress = Progress(job.run_id, job.cfg.optimizer.iterations, job.cfg.log_every)
        log.info("%s: %s", job.run_id, runs.RunFolder.for_config(job.cfg, job.run_id).path)
        try:
            outcome = batch.run_one(job, progress, stop.is_set)
        finally:
            progress.close()
        outcomes.append(outcome)
        _report(outcome)
    statuses = [o.status for o in outcomes]
    if "failed" in statuses:
        return EXIT_FAILED
    if "interrupted" in statuses or stop.is_set():
        return EXIT_INTERRUPTED
    return EXIT_OK


def _report(outcome) -> None:
    path = outcome.folder.path
    if outcome.status == "skipped":
        log.info("%s: already completed, nothing to do (%s)", outcome.run_id, path)
    elif outcome.status == "completed":
        log.info("%s: completed -> %s", outcome.run_id, outcome.folder.result)
    elif outcome.status == "interrupted":
        log.info("%s: interrupted; best image so far in %s; run the same command to resume",
                 outcome.run_id, outcome.folder.result)
    else:
        log.error("%s: failed: %s", outcome.run_id, outcome.message)


def _install_stop_handlers() -> threading.Event:
    """SIGINT and SIGTERM ask the run to stop at its next evaluation and save what it has;
    a second Ctrl-C aborts at once."""
    stop = threading.Event()

    def handler(signum, frame):
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.set()
        log.warning("\n%s: stopping at the next evaluation and saving (Ctrl-C again aborts)",
                    signal.Signals(signum).name)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return stop


class Progress:
    """A tqdm bar with the loss on a terminal; plain log lines every `every` iterations
    otherwise (a log file fills up with carriage returns)."""

    def __init__(self, run_id: str, iterations: int, every: int):
        self.run_id, self.iterations, self.every = run_id, iterations, every
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=iterations, desc=run_id, unit="it", dynamic_ncols=True,
                            leave=False)

    def __call__(self, step) -> None:
        if self.bar is not None:
            self.bar.update(step.iteration - self.bar.n)
            self.bar.set_postfix_str(f"loss {step.total:.4g}", refresh=False)
        elif step.iteration % self.every == 0 or step.iteration == self.iterations:
            terms = " ".join(f"{k} {v:.4g}" for k, v in step.terms.items())
            log.info("%s: iteration %d/%d  loss %.4g (%s)  %.1fs", self.run_id, step.iteration,
                     self.iterations, step.total, terms, step.seconds)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
