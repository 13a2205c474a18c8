"""A runnable stand-in for the Repairy Partner API (``repairy-gateway sandbox``).

Faithful to what Repairy documents (token rules included) and observable through a control
API under ``/__sandbox/``. Use it from code as ``async with Sandbox(SandboxConfig()) as sb``.
"""

from gateway.sandbox.handlers import pattern_bytes
from gateway.sandbox.server import Sandbox, create_app
from gateway.sandbox.state import SandboxConfig

__all__ = ["Sandbox", "SandboxConfig", "create_app", "pattern_bytes"]
