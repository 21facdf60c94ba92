"""The `lowrank` command line: options, the app, and the rendering of reports."""

from lowrank_cli.cli.app import app, main

__all__ = ["app", "main"]
