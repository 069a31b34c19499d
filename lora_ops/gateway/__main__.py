"""``python -m lora_ops.gateway --replica URL [--replica URL ...]``: a gateway to try by hand.

Every model goes to every given replica (a :class:`StaticRouter`); the model list is what
the replicas serve at start. The fleet's admin token comes from ``LORA_OPS_ADMIN_TOKEN``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import httpx
import uvicorn

from lora_ops.gateway.app import create_gateway
from lora_ops.gateway.load import Load
from lora_ops.gateway.routing import ANY_MODEL, StaticRouter
from lora_ops.serving.access import load_api_keys
from lora_ops.settings import get_settings

log = logging.getLogger("lora_ops.gateway")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m lora_ops.gateway", description="One URL for a fleet of replicas."
    )
    parser.add_argument("--replica", action="append", required=True, help="A replica's URL.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--api-keys", type=Path, help='JSON file {"<key>": {"customer": ID}}.')
    parser.add_argument("--timeout-s", type=float, default=120.0)
    parser.add_argument("--cooldown-s", type=float, default=10.0)
    return parser.parse_args(argv)


def served_models(urls: list[str], admin_token: str | None) -> list[str]:
    """Every model the replicas serve now; a replica that does not answer is left out."""
    headers = {"Authorization": f"Bearer {admin_token}"} if admin_token else {}
    models: dict[str, None] = {}  # ordered, without repeats
    for url in urls:
        try:
            reply = httpx.get(f"{url}/v1/models", headers=headers, timeout=10)
            reply.raise_for_status()
            models.update((card["id"], None) for card in reply.json()["data"])
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            log.warning("could not list the models of %s: %s", url, exc)
    return list(models)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per forwarded request
    args = parse_args(argv)
    secret = get_settings().admin_token
    token = secret.get_secret_value() if secret is not None else None
    urls = [url.rstrip("/") for url in args.replica]
    # Named models fill the model list; ANY_MODEL routes those loaded after start too.
    placement = dict.fromkeys(served_models(urls, token), urls) | {ANY_MODEL: urls}
    load = Load()
    router = StaticRouter(placement, cooldown_s=args.cooldown_s, load=load)
    keys = load_api_keys(args.api_keys) if args.api_keys else None
    app = create_gateway(router, token, keys, args.timeout_s, load=load)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
