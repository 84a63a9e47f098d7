"""The live preview page: ``server.PreviewServer`` serves it; the pipeline never imports this."""
