"""The package version, in a module of its own so code below the package's face (the trainer's checkpoints)
can read it without importing `detector/__init__.py` upward. pyproject.toml reads it from here
(`dynamic = ["version"]`)."""

__version__ = "0.1.0"
