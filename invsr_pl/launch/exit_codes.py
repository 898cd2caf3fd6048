"""Exit code 2 for a command line that Hydra cannot compose into a config (README.md#faults-and-bad-input).

Hydra reports an unknown key (``model.gan_weigth=0.1``), an override it cannot parse or a config option that
does not exist with its own short message, and then exits with code 1, which ``train.py`` and
``evaluate.py`` document for unexpected errors. Both entry points therefore mark their task function with
:func:`task` and call it through :func:`run`: an exit before the task function started is a setup error
(code 2, Hydra's message kept as it is); everything after it keeps its code. In a multirun the mark is set by
the first job, so a job whose overrides fail to compose after other jobs ran leaves Hydra's code 1 (some
jobs ran).

Nothing here imports more than the standard library, so ``--help`` and ``--cfg job`` stay fast.
"""

from __future__ import annotations

import functools
import sys
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["EXIT_ERROR", "EXIT_NONFINITE", "EXIT_SETUP", "EXIT_SIGTERM", "run", "task"]

EXIT_ERROR, EXIT_SETUP, EXIT_NONFINITE, EXIT_SIGTERM = 1, 2, 3, 143

F = TypeVar("F", bound=Callable[..., Any])


class _State:
    task_started = False


def task(function: F) -> F:
    """Decorator, placed under ``@hydra.main``: records that Hydra composed a config and called the task.

    Hydra unwraps decorated task functions (``__wrapped__``) to find the calling file, so ``config_path``
    stays relative to the entry point.
    """

    @functools.wraps(function)
    def started(*args: Any, **kwargs: Any) -> Any:
        _State.task_started = True
        return function(*args, **kwargs)

    return started  # type: ignore[return-value]


def run(main: Callable[[], Any]) -> None:
    """``if __name__ == "__main__": run(main)`` for a ``@hydra.main`` function decorated with :func:`task`.

    Exits 2 when Hydra stops before the task function started (its message printed, or with
    ``HYDRA_FULL_ERROR=1`` the traceback); any other exit code, and any exception after the start, passes.
    """
    try:
        main()
    except SystemExit as stop:
        if stop.code == EXIT_ERROR and not _State.task_started:
            raise SystemExit(EXIT_SETUP) from None
        raise
    except Exception:  # HYDRA_FULL_ERROR=1: Hydra re-raises instead of printing its message
        if _State.task_started:
            raise
        traceback.print_exc()
        sys.stderr.flush()
        raise SystemExit(EXIT_SETUP) from None
