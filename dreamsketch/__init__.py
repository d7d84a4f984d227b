"""DreamSketch: a text-to-image and image-to-image studio on Hugging Face diffusers."""

__version__ = "0.1.0"
