"""The ``streamgpen`` command line: the app and ``main()`` are in :mod:`streamgpen.cli.app`."""
