"""The pipeline's command line (``medaudit demo``, ``train``, ``build``, ``audit``, ``worker``,
``review``...), the load harness and the offline audit's HTML report. Registered into the
``medaudit`` command of medaudit-client through the ``medaudit.cli`` entry-point group."""
