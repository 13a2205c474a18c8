"""repairy-gateway: a credential-injecting gateway for the Repairy Partner API.

Package map (read in this order): ``settings`` → ``app`` (wiring) → ``token`` (the token
side, a subpackage) → ``inbound`` → ``proxy`` → ``upstream``; ``access``, ``headers``, ``errors``,
``metrics``, ``redact`` and friends beside them. ``sandbox`` is a runnable stand-in for the
Repairy API.
"""

__version__ = "0.1.0"
