"""The gateway: one URL for the whole fleet, forwarding OpenAI's API to replicas a router picks.

``create_gateway(router, admin_token, api_keys, timeout_s)`` builds the app; a router is any
object with the three methods of :class:`Router`; :class:`StaticRouter` is a fixed
placement; :class:`Load` holds the in-flight counts a router may order by.
"""

from lora_ops.gateway.app import create_gateway
from lora_ops.gateway.load import Load
from lora_ops.gateway.routing import ANY_MODEL, Router, StaticRouter

__all__ = ["ANY_MODEL", "Load", "Router", "StaticRouter", "create_gateway"]
