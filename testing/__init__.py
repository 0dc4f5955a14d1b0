"""Support for tests and benchmarks, shipped like ``numpy.testing``: random-weight served versions
(:mod:`medaudit.testing.versions`) that exercise every code path of a real one without training."""
