"""Quiet by default: drop the dependency chatter that says nothing about the run (README "Speed").

What is dropped (each a log record matched by logger and text; everything else on those loggers stays, and
warnings that matter, such as missing weights, random weights or fallbacks, come from our own code):

- bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" (logged while diffusers or
  pyiqa import it, on CPUs with AVX512-BF16; we never quantise to 4 bit), and the ``kernels`` library's
  "Skipping publisher trust check for 'kernels-community/...'" that the same lookup logs offline (kernels
  0.19);
- Lightning's "💡 Tip: ... litlogger / litmodels" advertisements, and its note that it skips its default
  model summary (conf/callbacks/model_summary.yaml configures one);
- the Python warnings of :data:`_WARNINGS`, each with its reason there; among them two about the
  libraries' own versions, once per call site: Hydra 1.4's "instantiate()
  resolved _target_=... with no _execution_whitelist_" (every config target here is this project's own
  code; it becomes an error in Hydra 1.5, where call sites must pass a whitelist) and Lightning's
  "isinstance(treespec, LeafSpec) is deprecated" (Lightning against a newer torch);
- pyiqa's "Network [X] is created." on every metric, and (:func:`library_prints`) its printed "Loading
  pretrained model X from <file>" lines;
- the FLOPs column and "Total Flops" line of Lightning's ``ModelSummary`` when nothing was counted (always,
  unless a module sets ``example_input_array``): a column of zeros;
- the second copy of every Lightning line under Hydra: ``import lightning`` gives the ``lightning`` logger its
  own console handler, and Lightning's records also propagate to the root logger, where Hydra's job logging
  prints (and files) them again. Once the root logger has a console handler, Lightning's is removed (done
  whether or not verbose: it is a copy, not detail).

``INVSR_VERBOSE=1`` (any command) brings all of it back; a command with a ``-v/--verbose`` flag passes it
as ``quiet_dependencies(verbose=True)``. The package's ``__init__`` installs the filters, so they are in
place before any submodule imports diffusers (the bitsandbytes line is logged during that import);
``train.py`` and ``evaluate.py`` call :func:`quiet_dependencies` again once Lightning is imported. This
module imports nothing but the standard library (cheap, and no cycles).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import warnings
from collections.abc import Iterator

VERBOSE_ENV = "INVSR_VERBOSE"
_FALSE = ("", "0", "false", "no", "off")

_DEFAULT_SUMMARY = "Skipping setting a default `ModelSummary` callback"
# message regexes of the Python warnings ignored (warnings.filterwarnings matches from the start)
_WARNINGS = (
    r"hydra\.utils\.instantiate\(\) resolved _target_=.* with no\s+_execution_whitelist_",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # the validation x-axis (InvSRLitModule.validation_step): the same iteration on every rank, so it is
    # logged unsynced on purpose; a synced one adds a collective whose order at epoch end can differ per rank
    r"It is recommended to use `self\.log\('step', \.\.\., sync_dist=True\)`",
)
# logger name -> substrings of the messages dropped from it
_DROPPED: dict[str, tuple[str, ...]] = {
    "bitsandbytes.backends.cpu.ops": ("kernels-community",),
    "kernels._internals.hf_hub": ("Skipping publisher trust check for 'kernels-community/",),
    # rank_zero_info logs on whichever of these lightning set last (lightning_utilities' module logger)
    "lightning.pytorch.utilities.rank_zero": ("💡 Tip", _DEFAULT_SUMMARY),
    "lightning.fabric.utilities.rank_zero": ("💡 Tip", _DEFAULT_SUMMARY),
    "lightning_utilities.core.rank_zero": ("💡 Tip", _DEFAULT_SUMMARY),
    "pyiqa": ("] is created.",),
}
_SUMMARY_LOGGER = "lightning.pytorch.callbacks.model_summary"


def env_verbose() -> bool:
    """Whether ``INVSR_VERBOSE`` asks for the full output: any value but unset, ``0``, ``false``, ``no``,
    ``off``."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in _FALSE


class _DropMessages(logging.Filter):
    """Drops records whose formatted message contains one of ``needles``."""

    def __init__(self, needles: tuple[str, ...]) -> None:
        super().__init__("invsr_pl.quiet")
        self.needles = needles

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(needle in message for needle in self.needles)


class _DropZeroFlops(logging.Filter):
    """Removes the FLOPs column and the "Total Flops" line from ``ModelSummary``'s table when the total is 0.

    The table is Lightning's fixed text layout (columns joined by `` | ``, a ``-`` divider, then one
    ``<value padded to 10><label>`` line per total); anything that does not look like it passes untouched.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        lines = message.split("\n")
        totals = [i for i, line in enumerate(lines) if line.rstrip().endswith("Total Flops")]
        header = next((i for i, line in enumerate(lines) if " | FLOPs" in line), None)
        if len(totals) != 1 or lines[totals[0]].split()[0] != "0" or header is None:
            return True
        column = [cell.strip() for cell in lines[header].split(" | ")].index("FLOPs")
        width = len(lines[header].split(" | ")[column]) + 3  # the cell and one " | " separator
        out = []
        for i, line in enumerate(lines):
            cells = line.split(" | ")
            if i == totals[0]:
                continue
            if len(cells) > column and i >= header and " | " in line:
                del cells[column]
                out.append(" | ".join(cells))
            elif set(line) == {"-"}:
                out.append("-" * max(1, len(line) - width))
            else:
                out.append(line)
        record.msg, record.args = "\n".join(out), None
        return True


_FILTERS: list[tuple[logging.Logger, logging.Filter]] = []


def quiet_dependencies(verbose: bool | None = None) -> bool:
    """Install (or, when verbose, remove) the filters above; idempotent. Call it early in every command,
    and once more after Lightning is imported under Hydra's logging (drops Lightning's second console).

    Args:
        verbose: ``True`` keeps every dependency line; ``None`` or ``False``: quiet unless ``INVSR_VERBOSE``
            is set (:func:`env_verbose`).

    Returns:
        Whether the output is verbose (the filters are off).
    """
    verbose = bool(verbose) or env_verbose()
    _drop_duplicate_lightning_console()
    for logger, filt in _FILTERS:
        logger.removeFilter(filt)
    _FILTERS.clear()
    _set_warning_filters(not verbose)
    if verbose:
        return True
    # getLogger before the library imports: the library's own getLogger(__name__) returns this same object
    for name, needles in _DROPPED.items():
        _FILTERS.append((logging.getLogger(name), _DropMessages(needles)))
    _FILTERS.append((logging.getLogger(_SUMMARY_LOGGER), _DropZeroFlops()))
    for logger, filt in _FILTERS:
        logger.addFilter(filt)
    return False


def _set_warning_filters(on: bool) -> None:
    """Add (``on``) or remove the ``ignore`` entries of :data:`_WARNINGS` in ``warnings.filters``."""
    ours = [f for f in warnings.filters if f[0] == "ignore" and getattr(f[1], "pattern", None) in _WARNINGS]
    for entry in ours:
        warnings.filters.remove(entry)
    # invalidates the per-module "already warned" caches (private; absent on some versions: then skipped)
    mutated = getattr(warnings, "_filters_mutated", None)
    if ours and mutated is not None:
        mutated()
    for pattern in _WARNINGS if on else ():
        warnings.filterwarnings("ignore", message=pattern, category=UserWarning)


def _drop_duplicate_lightning_console() -> None:
    """Remove the console handler ``lightning/__init__.py`` adds (its ``_console``) when the root logger
    prints to the terminal too (Hydra's job logging): otherwise every Lightning record prints twice."""
    lightning = sys.modules.get("lightning")
    console = getattr(lightning, "_console", None)
    if not isinstance(console, logging.Handler):
        return
    terminals = (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)
    root = logging.getLogger().handlers
    if any(type(h) is logging.StreamHandler and h.stream in terminals for h in root):
        logging.getLogger("lightning").removeHandler(console)


def is_quiet() -> bool:
    """Whether the filters are installed (:func:`quiet_dependencies` last ran without verbose)."""
    return bool(_FILTERS)


@contextlib.contextmanager
def library_prints() -> Iterator[None]:
    """Swallow what a library ``print``s to stdout inside the block when quiet (e.g. pyiqa's "Loading
    pretrained model ..." while a metric is built); a no-op when verbose. Logging and stderr pass."""
    if not is_quiet():
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield
