"""User-facing errors: one line that says what is wrong and what to do.

Everything the user can cause (a bad file, an empty prompt, a reward for another
vocabulary) raises a subclass of PrtError; the CLI prints its message and exits
non-zero, the desktop app shows it in a dialog. Anything else is a bug and keeps
its traceback.
"""


class PrtError(Exception):
    """Base of all errors whose message is meant for the user."""


class ModelFileError(PrtError):
    """A GGUF file is missing, unreadable, truncated or not a model llama.cpp can load."""


class ModelFetchError(PrtError):
    """The default model could not be downloaded or did not verify."""


class RewardFileError(PrtError):
    """A reward's ONNX file or card is missing, corrupt or breaks the runtime contract."""


class VocabularyMismatchError(RewardFileError):
    """A reward was trained for a base model with a different vocabulary."""


class RewardRuntimeError(PrtError):
    """A reward model failed while scoring candidates during generation."""


class PromptError(PrtError):
    """The prompt is empty or otherwise unusable."""


class ContextOverflowError(PrtError):
    """The prompt does not fit in the model's context window."""


class DiskFullError(PrtError):
    """A file could not be written because the disk is full; nothing at its path was changed."""


class StoreError(PrtError):
    """The chat database or an export file is unreadable, damaged, too new, or a request names a missing row."""
