"""torchrun for run.sh, without its dumps for the ends train.py already explained.

    python launch.py [torchrun flags] train.py [key=value ...]     # what run.sh runs

- A worker that exits 2 printed our one `error: ...` line: exit 2, without torchrun's ChildFailedError
  traceback and log lines (train.py --preflight catches nearly all of these before the workers start).
- Ctrl-C or SIGTERM: the workers get SIGTERM (a terminal's Ctrl-C reaches them directly as well),
  finish the step, save and exit 0; then exit 3, which run.sh turns into its note and exit 0.
  (torchrun's own handler would raise SignalException here and print its traceback.)
- A crash (any other failure) keeps torchrun's report: the worker's traceback, then which rank failed.
"""
import logging
import os
import signal
import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run

STOPPED = 3  # for run.sh only: stopped by a signal after a clean save


def children():
    """Our child processes (the workers), from /proc."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[1] == str(os.getpid()):  # field 4: the parent's pid
                    yield int(pid)
        except (OSError, IndexError):  # gone meanwhile
            pass


def main(argv):
    if "LOGLEVEL" not in os.environ:  # torchrun's loggers each have their own level, set at import
        for name in list(logging.root.manager.loggerDict):
            if name.startswith("torch.distributed"):
                logging.getLogger(name).setLevel(logging.CRITICAL)
    signals = []

    def forward(signum, frame):
        signals.append(signum)
        for pid in children():
            os.kill(pid, signal.SIGTERM)  # SIGTERM, not a second SIGINT: train.py takes that as "stop now"
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    # torchrun must not install its handlers for these two over ours
    argv = ["--signals_to_handle=SIGHUP,SIGQUIT", *argv]
    args = parse_args(argv)
    if str(args.nproc_per_node) != "1":  # what torchrun sets for several workers, without its warning
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        run(args)
    except ChildFailedError as e:
        if 2 in {f.exitcode for f in e.failures.values()}:
            sys.exit(2)
        if signals:  # a second Ctrl-C: the workers stopped at once
            sys.exit(128 + signals[0])
        raise
    sys.exit(STOPPED if signals else 0)


if __name__ == "__main__":
    main(sys.argv[1:])
