"""Loading the deep-learning framework once per process, without TensorFlow's start-up chatter.

Every process that runs the network (the command line running runs in-process, each worker,
each Ray task, the calibration's measuring processes, `doctor`) calls `load()` before its first
`import keras`. TensorFlow 2.21 prints INFO lines as it loads ("oneDNN custom operations are
on ...", "Could not find cuda drivers on your machine ...", "This TensorFlow binary is
optimized to use available CPU instructions ..."), each process its own. TF_CPP_MIN_LOG_LEVEL=1
hides INFO and keeps warnings and errors, but only for TensorFlow's own logger: the first two
lines come from Abseil's logger before anything has initialised it, which writes every message
to stderr whatever the level (measured: levels 0 to 3 all print them). So the import runs with
stderr passed through a filter that drops Abseil-format lines below the level, and the
"before absl::InitializeLog()" notice that comes with them. TensorFlow's first look for
devices is made inside the filter too: on a machine without NVIDIA's driver it logs an ERROR,
"failed call to cuInit: ... UNKNOWN ERROR (303)", which says only that there is no GPU there;
that one line is dropped where the kernel has no NVIDIA driver (/proc/driver/nvidia). Where it
has one, the line means a broken CUDA set-up and stays, beside the tool's own warning.

A user's TF_CPP_MIN_LOG_LEVEL wins: 0 brings every line back (and turns the filter off). Light
on purpose: nothing here imports a framework until load() is called.
"""

from __future__ import annotations

import os
import re
import sys
import threading

LEVEL_VARIABLE = "TF_CPP_MIN_LOG_LEVEL"
DEFAULT_LEVEL = "1"  # 0 INFO, 1 WARNING, 2 ERROR, 3 FATAL: what is shown from there up
# Abseil's (and glog's) line prefix: severity letter, month and day, as in "I0000 00:00:...".
_PREFIX = re.compile(r"^([IWEF])\d{4} ")
_SEVERITY = {"I": 0, "W": 1, "E": 2, "F": 3}
_NOTICE = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
_NO_DRIVER = "failed call to cuInit"


def quiet_logs(environ=os.environ) -> None:
    """Set TensorFlow's log level for this process and the processes it starts, unless the
    user set one. Read by TensorFlow when it loads: call before."""
    environ.setdefault(LEVEL_VARIABLE, DEFAULT_LEVEL)


def level(environ=os.environ) -> int:
    try:
        return int(environ.get(LEVEL_VARIABLE, DEFAULT_LEVEL))
    except ValueError:
        return 0  # TensorFlow reads a value it cannot parse as 0 as well


def nvidia_driver() -> bool:
    """The kernel has NVIDIA's driver loaded (Linux); elsewhere CUDA cannot start anyway."""
    return os.path.exists("/proc/driver/nvidia")


def hidden(line: str, minimum: int, driver: bool = True) -> bool:
    """Whether a line TensorFlow's libraries print while loading is not to be shown: below the
    level, or CUDA's failure to start on a machine without NVIDIA's driver."""
    if minimum <= 0:
        return False
    if line.rstrip("\r\n") == _NOTICE:
        return True
    found = _PREFIX.match(line)
    if not found:
        return False  # anything else (a Python warning, a traceback) is shown as it is
    return _SEVERITY[found[1]] < minimum or (not driver and _NO_DRIVER in line)


def load():
    """Import Keras (and with it the backend) once, TensorFlow's start-up lines filtered by
    the level; returns the keras module."""
    quiet_logs()
    if "keras" in sys.modules:
        return sys.modules["keras"]
    minimum = level()
    if minimum <= 0:
        import keras

        return keras
    with _filtered_stderr(minimum, nvidia_driver()):
        import keras

        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            tf.config.list_physical_devices()  # CUDA starts (or fails to) here, not later
    return keras


class _filtered_stderr:
    """File descriptor 2 through a pipe while the block runs (the libraries write to the
    descriptor, not to sys.stderr); a thread passes on, line by line as they come, the lines
    that are not hidden, so that a crash inside the block still shows what came before it."""

    def __init__(self, minimum: int, driver: bool):
        self.minimum, self.driver = minimum, driver

    def __enter__(self):
        sys.stderr.flush()
        self.saved = os.dup(2)
        read, write = os.pipe()
        os.dup2(write, 2)
        os.close(write)
        self.thread = threading.Thread(target=self._pass_on, args=(read,), daemon=True)
        self.thread.start()
        return self

    def _pass_on(self, read: int) -> None:
        with os.fdopen(read, "rb") as source:
            for raw in source:
                line = raw.decode(errors="replace")
                if not hidden(line, self.minimum, self.driver):
                    os.write(self.saved, raw)

    def __exit__(self, *exc):
        sys.stderr.flush()
        os.dup2(self.saved, 2)  # closes the pipe's last write end: the thread reads its end
        self.thread.join(timeout=10)  # a library that kept a copy of the descriptor: go on
        os.close(self.saved)
