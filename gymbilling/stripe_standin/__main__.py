"""`python -m gymbilling.stripe_standin`: run the Stripe stand-in (development only)."""

from __future__ import annotations

import argparse
from pathlib import Path

from gymbilling.stripe_standin.server import run


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m gymbilling.stripe_standin", description=__doc__
    )
    # Loopback only by default: the stand-in has no real authentication.
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8420)
    parser.add_argument("--data-dir", type=Path, default=Path("var/stripe-standin"))
    parser.add_argument("--fresh", action="store_true", help="ignore state saved in --data-dir")
    parser.add_argument("--webhook-url")
    parser.add_argument("--webhook-secret")
    args = parser.parse_args()
    run(
        host=args.host,
        port=args.port,
        data_dir=args.data_dir,
        fresh=args.fresh,
        webhook_url=args.webhook_url,
        webhook_secret=args.webhook_secret,
    )


if __name__ == "__main__":
    main()
