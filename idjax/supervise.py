"""A parent for the other processes of a multi-process command: when process 0 dies, they end with one line.

Process 0 hosts JAX's coordination service. When it dies, jaxlib ends every other process at once from its
own thread, with a fatal log and an abort (SIGABRT): no Python exception, no exit code of ours. jaxlib's
hook for that moment (the client's missed_heartbeat_callback) aborts with std::bad_cast in this release.
So the CLI of a process other than 0 runs its command in a child process (the same arguments, with
IDJAX_SUPERVISED=1) and this parent passes the child's output through. If the child ends on a signal while
the coordinator's port takes no more connections, the parent leaves out jaxlib's fatal report and prints
one line instead, exit code 1; any other end of the child is passed through unchanged (its exit code,
every line). Finished store chunks are on disk either way: a re-run resumes.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys

ENV = "IDJAX_SUPERVISED"
# jaxlib's report of a lost coordination service starts with glog lines like these; from the first one the
# parent holds its lines back until it knows whether the coordinator died.
_REPORT = re.compile(r"coordination[ _]service|Terminating process because the JAX distributed service")


def coordinator_of(args) -> tuple[str, int, str] | None:
    """(host, port, "process I of N") of process 0's coordinator when this process is another one of an
    explicit multi-process run (the CLI's --coordinator / --process-id / --num-processes, or the IDJAX_*
    variables); None otherwise, and in the supervised child itself."""
    if os.environ.get(ENV):
        return None

    def option(name: str, variable: str):
        value = getattr(args, name, None)
        return value if value is not None else os.environ.get(variable)

    address, index = option("coordinator", "IDJAX_COORDINATOR"), option("process_id", "IDJAX_PROCESS_ID")
    host, _, port = (address or "").rpartition(":")
    if not host or not port.isdigit() or not str(index or 0).isdigit() or int(index or 0) == 0:
        return None  # one process, process 0 itself, "auto" (no address known here), or a bad value (main reports it)
    return host, int(port), f"process {int(index)} of {option('num_processes', 'IDJAX_NUM_PROCESSES')}"


def reachable(host: str, port: int, timeout_s: float = 3.0) -> bool:
    """Whether the coordinator's port still takes a connection."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _die_with_parent(parent: int):
    """For Popen's preexec_fn: the child is killed when this parent dies, even by SIGKILL (Linux's
    PR_SET_PDEATHSIG), so a killed process never leaves its work running, heartbeating, behind it."""
    if not sys.platform.startswith("linux"):
        return None

    def arm():
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the call
            os._exit(1)

    return arm


def run(argv: list[str], host: str, port: int, who: str) -> int:
    """Run `idjax argv` as a child and return its exit code, or 1 with one line on stderr when it was ended
    by jaxlib because process 0 (its coordinator at host:port) is gone. who: "process I of N"."""
    child = subprocess.Popen([sys.executable, "-m", "idjax.cli", *argv], env={**os.environ, ENV: "1"},
                             stderr=subprocess.PIPE, text=True, errors="replace", bufsize=1,
                             preexec_fn=_die_with_parent(os.getpid()))
    for sig in (signal.SIGTERM, signal.SIGHUP):  # a scheduler's stop reaches the work
        signal.signal(sig, lambda s, _frame: child.send_signal(s))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C reaches the child itself
    held: list[str] = []
    for line in child.stderr:
        if held or _REPORT.search(line):
            held.append(line)
        else:
            sys.stderr.write(line)
    code = child.wait()
    if code < 0 and not reachable(host, port):
        print(f"idjax: error: {who}: lost process 0, which ran the coordination service at {host}:{port} (it "
              "died or was stopped); finished work is kept on disk: re-run the same command to resume",
              file=sys.stderr)
        return 1
    sys.stderr.writelines(held)
    return code if code >= 0 else 128 - code
