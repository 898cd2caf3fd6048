"""Stopping a running demo job: its caller went away, or it ran past the wall-clock limit.

PyTorch cannot interrupt a thread, so the job stops itself: :class:`NetworkStops` puts a forward pre-hook on
every module of the loaded networks, and each hook asks the *current thread's* :class:`StopSwitch` whether to
go on. A job therefore stops at the next module call after it was cancelled or its time ran out (a fraction of
a second on the demo's networks), through the same exception path as any refused request, and nothing of it is
written. Threads without a switch (anything outside a demo job) pass the hooks untouched.

Modules compiled in place (``--compile``, ``invsr_pl.utils.compile``) and their submodules get no hook: a
Python callback inside a ``fullgraph`` graph would break it. There the job stops between network calls.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

from torch import nn

from invsr_pl.demo.errors import RequestError

__all__ = ["JobCancelled", "JobStopped", "JobTimeout", "NetworkStops", "StopSwitch"]


class JobStopped(RequestError):
    """A running job was stopped before it finished; nothing of it was written."""


class JobCancelled(JobStopped):
    """The caller disconnected or cancelled the job."""


class JobTimeout(JobStopped):
    """The job ran past the demo's wall-clock limit (``--max-job-seconds``)."""


class StopSwitch:
    """One job's stop conditions: a cancel flag any thread may set, and an optional deadline.

    Args:
        max_seconds: wall-clock limit counted from construction; None: no limit.
    """

    def __init__(self, max_seconds: float | None = None) -> None:
        self.max_seconds = max_seconds
        self.started = time.monotonic()
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Ask the job to stop at its next network call (thread-safe)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def check(self) -> None:
        """Raise :class:`JobCancelled` or :class:`JobTimeout` when the job must stop; else return."""
        if self._cancelled.is_set():
            raise JobCancelled("the job was cancelled (its caller disconnected)")
        if self.max_seconds is not None and self.elapsed() > self.max_seconds:
            raise JobTimeout(
                f"stopped after {self.elapsed():.0f} s: this demo runs a job for at most "
                f"{self.max_seconds:g} s; use fewer steps, a smaller image or a larger chopping size, "
                "or run invsr-sr"
            )


class NetworkStops:
    """Forward pre-hooks on ``modules`` that check the current thread's :class:`StopSwitch`.

    Args:
        modules: the loaded networks (backbone, noise predictor); every uncompiled submodule is hooked.
    """

    def __init__(self, *modules: nn.Module | None) -> None:
        self._local = threading.local()
        self._handles = []
        seen: set[int] = set()
        for root in modules:
            if root is None:
                continue
            # a module compiled in place (nn.Module.compile sets _compiled_call_impl) and all inside it
            compiled = {
                id(m)
                for c in root.modules()
                if getattr(c, "_compiled_call_impl", None) is not None
                for m in c.modules()
            }
            for module in root.modules():
                if id(module) in seen or id(module) in compiled:
                    continue
                seen.add(id(module))
                self._handles.append(module.register_forward_pre_hook(self._hook))

    def _hook(self, module: nn.Module, args: object) -> None:
        switch = getattr(self._local, "switch", None)
        if switch is not None:
            switch.check()

    @contextlib.contextmanager
    def watching(self, switch: StopSwitch | None) -> Iterator[None]:
        """Within the block, network calls on this thread obey ``switch`` (checked once on entry too)."""
        previous = getattr(self._local, "switch", None)
        self._local.switch = switch
        try:
            if switch is not None:
                switch.check()
            yield
        finally:
            self._local.switch = previous

    def close(self) -> None:
        """Remove every hook."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
