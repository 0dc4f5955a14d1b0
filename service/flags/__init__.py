"""The flag pipeline: flagged audits go to a Redis stream, workers turn them into review
records, reviewers resolve them, and resolved flags refine the concept banks.

::

    HTTP /audit ──submit()──▶ FlagPublisher ──XADD (Lua, idempotent)──▶ <prefix>:flags
                    │ (bounded queue, background thread)        │
                    └──▶ local spool (JSONL, fsync) when Redis  ▼ XREADGROUP / XAUTOCLAIM
                         is down or the queue is full       Worker ──▶ <prefix>:review:<flag id>
                                                              │            + <prefix>:reviews:open
                                                              └──▶ <prefix>:flags:dlq (poison)
    reviewer ──▶ review.resolve() / GET,POST /reviews ──▶ refine.refine_bank() (medaudit refine-cav)

Modules (import the one you need; this package imports nothing, so :mod:`medaudit.service.config` can read
:mod:`medaudit.service.flags.settings` without pulling in redis):

* :mod:`~service.flags.policy`: when an audit result becomes a flag (pure).
* :mod:`~service.flags.events`: the versioned stream entry and the Redis key layout.
* :mod:`~service.flags.settings`: ``MEDAUDIT_FLAG_*`` variables.
* :mod:`~service.flags.redis_conn`: clients, and an embedded Redis for demos.
* :mod:`~service.flags.spool`: the durable local spool behind the publisher.
* :mod:`~service.flags.producer`: :class:`~service.flags.producer.FlagPublisher`.
* :mod:`~service.flags.worker`: the consumer-group worker and ``queue_stats``.
* :mod:`~service.flags.review`: list, show and resolve flags; a mountable Starlette app.
* :mod:`~service.flags.refine`: reviewed flags as CAV training samples.

Only Redis ≥ 6.2 features are used (``XAUTOCLAIM``, ``XPENDING … IDLE``).
"""
