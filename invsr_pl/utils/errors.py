"""The one setup error of every command (exit code 2): a run that cannot work, refused before any work.

Torch-free, so that commands can raise and catch it before their heavy imports.
"""

from __future__ import annotations


class SetupError(ValueError):
    """Arguments, config values, files or models that make the whole run impossible (exit code 2)."""
