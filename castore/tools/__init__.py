"""Tools built on the public API: the ``castore`` command line, export, the demo."""
