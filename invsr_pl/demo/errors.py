"""What a demo visitor is told when a request cannot be served: one line, no server path, no traceback."""

from __future__ import annotations

import re

__all__ = ["RequestError", "visitor_message"]

# an absolute POSIX or Windows path (what Pillow, the image reader and Python put in their messages)
_PATH = re.compile(r"""(?<![\w.])(?:[A-Za-z]:\\|/)[^\s'"]+""")


class RequestError(ValueError):
    """A request the demo cannot serve (bad settings, unreadable or too large image, over budget, stopped);
    the message is one line for the visitor."""


def visitor_message(text: str) -> str:
    """``text`` as one line for a visitor: its first line, with every absolute path cut to its file name.

    The server's upload and work folders (``/tmp/gradio/<hash>/photo.png``) tell a visitor nothing and an
    attacker where things are; the file name is what the visitor uploaded.
    """
    first = text.strip().splitlines()[0] if text.strip() else ""
    return _PATH.sub(lambda m: m.group(0).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1], first)
