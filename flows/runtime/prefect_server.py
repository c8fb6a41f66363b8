"""The temporary Prefect API of a command-line run dies with the process that started it.

With no ``PREFECT_API_URL``, Prefect 3 starts a temporary API server (a ``uvicorn`` child,
``prefect.server.api.server.SubprocessASGIServer``) on first use and stops it from ``atexit``.
A process killed by SIGKILL (or by SIGTERM, which skips ``atexit``) never gets there, and the
server lived on as an orphan holding its port. Here the server is started by a subclass whose
child asks the kernel for SIGKILL when its parent dies (``prctl(PR_SET_PDEATHSIG)``), and it is
registered as Prefect's one default instance, the same hook Prefect's own test harness uses, so
every Prefect client of the process finds it running instead of starting another.

The parent-death signal fires when the *thread* that started the child ends, so the server is
started eagerly from the main thread (``ensure_supervised_api``), before any Prefect client
(some of which run in worker threads) would start one.

Other processes of the run (the Dask workers of ``--workers N``) must use this one server too:
a process without an API URL starts a temporary server of its own, out of reach of the run's
protection (it would outlive a killed run). Code that starts such processes gives them this
server's URL as their ``PREFECT_API_URL`` (``api_url_for_children``). This process itself keeps
Prefect's ephemeral mode (no links to a UI that goes away with the run).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
import threading
from typing import Any

__all__ = ["ensure_supervised_api", "die_with_parent", "api_url_for_children"]

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """In a freshly forked child (``preexec_fn``): get ``sig`` when the parent thread dies.

    Linux only; elsewhere a no-op (the ``atexit`` stop is all there is).
    """
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), sig)


def _supervised_server_class() -> type:
    import prefect.server.api.server as server_module

    class SupervisedASGIServer(server_module.SubprocessASGIServer):  # type: ignore[misc, valid-type]
        def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
            # Prefect builds the command and environment; only the child's set-up is added.
            real_popen = subprocess.Popen

            def popen(*args: Any, **kwargs: Any) -> subprocess.Popen[Any]:
                kwargs.setdefault("preexec_fn", die_with_parent)
                return real_popen(*args, **kwargs)

            original = server_module.subprocess
            server_module.subprocess = _SubprocessWithPopen(original, popen)  # type: ignore[assignment]
            try:
                return super()._run_uvicorn_command()
            finally:
                server_module.subprocess = original  # type: ignore[assignment]

    return SupervisedASGIServer


class _SubprocessWithPopen:
    """The ``subprocess`` module as Prefect's server module sees it, with one Popen replaced."""

    def __init__(self, module: Any, popen: Any) -> None:
        self._module, self.Popen = module, popen

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


def ensure_supervised_api() -> str | None:
    """Start the temporary Prefect API now, as a child that dies with this process.

    Returns its URL, or None where nothing is to be done: a ``PREFECT_API_URL`` is set (the
    user's own server), ephemeral mode is off, or a default server is already registered.
    """
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return None
    if threading.current_thread() is not threading.main_thread():
        return None  # see the module docstring: a worker thread's exit would kill the server
    from prefect.server.api.server import SubprocessASGIServer

    if SubprocessASGIServer._instances.get(None) is not None:
        return None
    server = _supervised_server_class()()  # registers itself as the default instance
    server.start()
    return server.api_url


def api_url_for_children() -> str | None:
    """The Prefect API that processes started by this one should use: the configured
    ``PREFECT_API_URL``, else the temporary server this process runs, else None (none yet)."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if url:
        return str(url)
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer._instances.get(None)
    return server.api_url if server is not None and server.running else None
