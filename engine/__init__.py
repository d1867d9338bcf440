"""The engine: the base model, rewards, steering and decoding, and the app's services (no Qt, no torch).

Importing it applies engine.privacy's switches first, before any dependency can initialize.
"""

from engine.privacy import apply_offline_environment

apply_offline_environment()
