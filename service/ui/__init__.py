"""The reviewer workbench: a browser page served by the service at ``/ui/`` (docs/review-ui.md).

The open queue with filters and counts, a flag's heatmap and mask with a verdict in one key, the
concept retrieval view, and the refit; reviewer keys only, through a session cookie.
:func:`~medaudit.service.ui.app.ui_app` builds it; :mod:`medaudit.service.api` mounts it.
"""

from __future__ import annotations

#: Where the service mounts the workbench.
UI_MOUNT = "/ui"

from medaudit.service.ui.app import ui_app  # noqa: E402  (after UI_MOUNT: app.py reads nothing of it)

__all__ = ["UI_MOUNT", "ui_app"]
