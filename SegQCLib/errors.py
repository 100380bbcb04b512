"""Errors SegQC raises for bad input.

Every problem a user can cause (a corrupt file, mismatched grids, an unknown label, ...) is raised as
:class:`InputError`, whose message names the file and the problem on one line. The CLI prints that
line and exits with code 2; the Slicer module shows it in a message box.
"""
from __future__ import annotations

from os import PathLike


class SegQCError(Exception):
    """Base class of SegQC's own errors."""


class InputError(SegQCError, ValueError):
    """Bad user input: ``str(err)`` is ``"<source>: <problem>"`` on one line."""

    def __init__(self, source: str | PathLike | None, problem: str):
        self.source = "" if source is None else str(source)
        self.problem = " ".join(str(problem).split())
        super().__init__(f"{self.source}: {self.problem}" if self.source else self.problem)


class DataSourceMissing(SegQCError):
    """A sample data source of DATA.md is not installed; the message says which command installs it."""
