"""medaudit-client: the typed HTTP client of the medaudit service (:mod:`medaudit.clients.client`)
and the ``medaudit predict|audit|compare`` commands. Needs httpx, typer and rich alone."""
