"""DreamSketch: a text-to-image and image-to-image studio on Hugging Face diffusers."""

import logging

__version__ = "0.1.0"


class _KnownNoise(logging.Filter):
    """Drops two library warnings that say nothing to act on, before diffusers or transformers is imported:
    transformers' fallback to its PIL image processors (we never process images with it, so torchvision is not
    needed), and diffusers 0.42's "modules that should be kept in float32: []" on every `.to(dtype)` (its check
    tests an empty list for `is not None`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("requires torchvision (not installed)" in message or "kept in float32: []" in message)


logging.getLogger("transformers.utils.import_utils").addFilter(_KnownNoise())
logging.getLogger("diffusers.models.modeling_utils").addFilter(_KnownNoise())
