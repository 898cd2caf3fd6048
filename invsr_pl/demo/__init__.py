"""The web demo behind ``invsr-demo``: an :class:`Upscaler` (models loaded once, files in, PNG files out, no
web framework) and :func:`build_app` (the Gradio page and the ``/upscale`` API endpoint around it).

``build_app`` is imported lazily so that the engine works where Gradio is not installed.
"""

from invsr_pl.demo.engine import BatchResult, RequestError, Result, Settings, Upscaler

__all__ = ["BatchResult", "RequestError", "Result", "Settings", "Upscaler", "build_app"]


def __getattr__(name: str):
    if name == "build_app":
        from invsr_pl.demo.app import build_app

        return build_app
    raise AttributeError(name)
