"""Network-namespace plumbing: `ip`/`nft` calls, entering a namespace from this process, and
removing namespaces left behind by a lab whose process died.

Every namespace the lab creates is named ``mhl<pid>x<seq>-<role>``: the pid of the test process
that created it and a per-process lab counter. A later run deletes namespaces whose pid is no
longer alive (and ends processes still running inside them: they were started by that dead lab),
and never touches any other namespace.
"""

import contextlib
import ctypes
import os
import re
import signal
import subprocess
import threading

CLONE_NEWNET = 0x40000000
NAME_RE = re.compile(r"^mhl(\d+)x(\d+)-")
CMD_TIMEOUT = 20

_libc = None
_setns_lock = threading.Lock()


class NetlabError(RuntimeError):
    """A lab command failed; the message carries the command and its stderr."""


def run(args, *, input=None, check=True, timeout=CMD_TIMEOUT):
    """Run a command in this namespace, capturing text output; raise NetlabError on failure."""
    proc = subprocess.run(args, input=input, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise NetlabError(f"{' '.join(args)} exited {proc.returncode}: "
                          f"{(proc.stderr or proc.stdout).strip()}")
    return proc


def ip(ns, *lines):
    """Run `ip` commands in namespace `ns` (None: this namespace); several lines go in one batch."""
    base = ["ip"] if ns is None else ["ip", "-n", ns]
    if len(lines) == 1:
        return run(base + lines[0].split())
    return run(base + ["-batch", "-"], input="".join(line + "\n" for line in lines))


def nft(ns, script):
    """Load an nft script (`nft -f -`) in namespace `ns`."""
    return run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=script)


def _setns(fd):
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def entered(ns):
    """Run the block with this thread inside network namespace `ns`.

    Sockets created inside stay in that namespace after the block (the kernel binds a socket to
    the namespace it was created in); /proc/sys/net written inside is that namespace's.
    """
    with _setns_lock:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                _setns(target)
            finally:
                os.close(target)
            try:
                yield
            finally:
                try:
                    _setns(home)
                except OSError as exc:  # the thread would keep running in the lab: never go on
                    os.write(2, f"netlab: cannot leave namespace {ns}: {exc}\n".encode())
                    os._exit(70)
        finally:
            os.close(home)


def write_sysctls(ns, values):
    """Write net sysctls (`{"net.ipv4.ip_forward": 1}`) inside namespace `ns`."""
    with entered(ns):
        for key, value in values.items():
            with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
                f.write(str(value))


def read_sysctl(ns, key):
    with entered(ns):
        with open("/proc/sys/" + key.replace(".", "/")) as f:
            return f.read().strip()


def list_namespaces():
    proc = run(["ip", "netns", "list"])
    return [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]


def pids_in(ns):
    proc = run(["ip", "netns", "pids", ns], check=False)
    return [int(p) for p in proc.stdout.split() if p.isdigit()]


def delete_namespace(ns):
    """End what still runs inside `ns` (the lab started it) and delete `ns`; an error or None."""
    for pid in pids_in(ns):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc = run(["ip", "netns", "del", ns], check=False)
    if proc.returncode != 0 and ns in list_namespaces():
        return f"ip netns del {ns}: {proc.stderr.strip()}"
    return None


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep(only_pid=None):
    """Delete lab namespaces whose creating process is gone (or, with only_pid, that pid's)."""
    removed = []
    for ns in list_namespaces():
        m = NAME_RE.match(ns)
        if not m:
            continue
        pid = int(m.group(1))
        if (only_pid is not None and pid == only_pid) or (only_pid is None and not _alive(pid)):
            if delete_namespace(ns) is None:
                removed.append(ns)
    return removed
