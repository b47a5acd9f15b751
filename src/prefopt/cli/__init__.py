"""The ``prefopt`` command: ``main`` parses, builds the config and calls the library (``recipes``,
``evaluation``, ``demo``). ``args`` holds the flags shared by the commands, ``reward`` the
``prefopt reward`` subcommands."""

from prefopt.cli.main import main

__all__ = ["main"]
