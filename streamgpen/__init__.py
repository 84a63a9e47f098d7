"""streamgpen: GPEN face enhancement for photos, video files, streams and cameras."""

__version__ = "0.1.0"
