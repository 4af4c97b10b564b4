"""specserve: lossless speculative decoding, Ray-free core.

Nothing in this package imports Ray; the actors in ``actors/`` and the Serve
application in ``deployments/`` wrap it.
"""

__version__ = "0.1.0"
