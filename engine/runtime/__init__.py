"""The runtime: a GGUF base model through llama.cpp, ONNX rewards through onnxruntime, steering and the one
decode loop, with the user-facing errors and file helpers they share.

It may import numpy, onnx and onnxruntime, and of this project only engine.runtime: nothing of the app services,
the front ends or the trainer, so it can be used, tested and upgraded on its own. llama.cpp is reached only
through llama_adapter.py, the one module that imports llama_cpp.
"""
