"""The app's services, on top of the runtime: the model folder and the default model, the SQLite store, the chat
facade the window uses, the style survey and its preference model, the speed benchmark.

They may import engine.runtime, sqlite_utils, platformdirs and psutil; never the trainer (rewards_onnx, torch) or
the desktop (PySide6), which sit above them.
"""
