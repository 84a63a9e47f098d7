"""The live preview page: ``PreviewState`` (what it shows), ``preview_app`` (it as an ASGI app),
``server.PreviewServer`` (both served for ``enhance --preview``); the pipeline never imports this.
"""

from streamgpen.preview.app import preview_app
from streamgpen.preview.state import PreviewState

__all__ = ["PreviewState", "preview_app"]
