"""adl: a command-line lab for advanced deep learning."""

__version__ = "0.1.0"
