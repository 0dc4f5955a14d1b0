"""The ``medaudit`` command.

medaudit-client alone gives the service commands: ``predict``, ``audit FILE`` and ``compare``
(:mod:`medaudit.clients.service_cmd`). The full ``medaudit`` distribution registers its whole
command set (demo, train, build, the offline audit, the flag worker, reviews...) under the
``medaudit.cli`` entry-point group, and :func:`main` runs that one when it is installed, so one
``medaudit`` command serves both installs without either importing the other's dependencies.
"""

from __future__ import annotations

from importlib.metadata import entry_points

import typer

from medaudit.clients import service_cmd

#: The entry-point group a fuller command set registers under (its entry named ``app``).
ENTRY_POINT_GROUP = "medaudit.cli"

app = typer.Typer(
    help="medaudit: audit medical image classifiers for shortcut learning (service commands).",
    no_args_is_help=True,
)
app.command("predict")(service_cmd.predict)
app.command("audit")(service_cmd.audit)
app.command("compare")(service_cmd.compare)


def command_app() -> typer.Typer:
    """The command set to run: the one registered under :data:`ENTRY_POINT_GROUP`, else :data:`app`."""
    for ep in entry_points(group=ENTRY_POINT_GROUP, name="app"):
        loaded = ep.load()
        if not isinstance(loaded, typer.Typer):
            raise TypeError(f"entry point {ep.value} in {ENTRY_POINT_GROUP} is not a typer.Typer")
        return loaded
    return app


def main() -> None:
    """The ``medaudit`` console script."""
    command_app()()


if __name__ == "__main__":
    main()
