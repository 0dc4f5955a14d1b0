"""The online side (BentoML service, flags, metrics). Imports ``models``, never the reverse."""
