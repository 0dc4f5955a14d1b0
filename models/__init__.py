"""medaudit's ML side: data, architectures, training, XAI core, corrections, evaluation.

Nothing in this package imports a transport (bentoml, redis, prometheus_client, starlette);
``tests/unit/test_layering.py`` asserts it.
"""
