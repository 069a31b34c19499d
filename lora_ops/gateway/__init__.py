"""The gateway: one URL for the whole fleet, forwarding OpenAI's API to replicas a router picks.

``create_gateway(router, admin_token, api_keys, timeout_s)`` builds the app; a router is any
object with the three methods of :class:`Router`; :class:`StaticRouter` is a fixed
placement; :class:`Load` holds the in-flight counts a router may order by; :class:`Traffic`
the requests per model a controller reads (``gateway_of(app).traffic``) to find hot
customers.
"""

from lora_ops.gateway.app import create_gateway
from lora_ops.gateway.load import Load
from lora_ops.gateway.routes import gateway_of
from lora_ops.gateway.routing import ANY_MODEL, Router, StaticRouter
from lora_ops.gateway.traffic import Traffic

__all__ = ["ANY_MODEL", "Load", "Router", "StaticRouter", "Traffic", "create_gateway", "gateway_of"]
