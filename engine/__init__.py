"""The engine, in two layers: engine.runtime (model, rewards, steering, decoding) and engine.app (store, chat,
models, style survey), plus ``prt``'s own commands; no Qt, no torch.

Importing it applies engine.privacy's switches first, before any dependency can initialize.
"""

from engine.privacy import apply_offline_environment

apply_offline_environment()
