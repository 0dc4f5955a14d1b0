"""The terminal output every pipeline command shares: one rich console and progress bars."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console()


@contextmanager
def progress_bars() -> Iterator[Callable[[str, int], Callable[[int], None]]]:
    """Yield ``start(description, total) -> advance(n)``; one rich bar per long step."""
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    ) as prog:

        def start(desc: str, total: int) -> Callable[[int], None]:
            task = prog.add_task(desc, total=total)

            def advance(n: int = 1) -> None:
                prog.advance(task, n)

            return advance

        yield start
