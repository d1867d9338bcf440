"""The PySide6 chat window: the only package that imports Qt (see the desktop issue)."""
