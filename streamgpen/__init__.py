"""streamgpen: GPEN face enhancement for photos, video files, streams and cameras."""

__version__ = "0.1.0"

__all__ = ["Enhancer", "__version__"]


def __getattr__(name: str):
    # Importing torch and the models costs seconds; `streamgpen --version` should not pay it.
    if name == "Enhancer":
        from streamgpen.enhancer import Enhancer

        return Enhancer
    raise AttributeError(f"module 'streamgpen' has no attribute {name!r}")
