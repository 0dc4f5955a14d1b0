"""``python -m medaudit.cli``: the whole ``medaudit`` command set."""

from medaudit.cli.commands import app

app()
