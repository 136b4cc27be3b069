"""evcharge: book EV charging across companies."""

__version__ = "0.1.0"
