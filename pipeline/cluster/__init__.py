"""Runs as tasks of a Ray cluster (`--executor ray`): the same runs and the same folders, on
as many machines as the cluster has. Each run is one Ray task that calls jobs.run_one on the
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

The parts, in the order a batch meets them: connect.py (reach the cluster, or exit 2 within
seconds; which nodes can take a run), claim.py (the experiment's named stop flag: a second
driver is refused, and Ctrl-C reaches every task through it), probe.py (every node must see
the experiment folder and the inputs), executor.py (RayExecutor: start, dispatch, what a
lost task means) and tasks.py (what runs on a node).
"""

from pipeline.cluster.connect import MISSING, NAMESPACE, check_address, import_ray
from pipeline.cluster.executor import RayExecutor
