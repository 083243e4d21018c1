"""`python manage.py triton_dev`: the CPU development engine on a real tritonserver.

Runs in the foreground until Ctrl-C. The default ports sit one above Triton's
usual 8000/8001/8002 because `runserver` already takes 8000.
"""

from __future__ import annotations

import os
import signal
import time

from django.core.management.base import BaseCommand, CommandError

from inference.engine import STREAM_TOKEN_INTERVAL_ENV
from inference.engine.server import PUBLIC_MODEL, TritonDevServer, TritonServerError


class Command(BaseCommand):
    help = "Serve the CPU development engine (TensorRT-LLM ensemble interface) on tritonserver."
    # Nothing here touches the database or the Django app registry's checks.
    requires_system_checks = []

    def add_arguments(self, parser):
        parser.add_argument(
            "--host", default="127.0.0.1", help="Address to bind (default 127.0.0.1)."
        )
        parser.add_argument("--http-port", type=int, default=8001)
        parser.add_argument("--grpc-port", type=int, default=8002)
        parser.add_argument("--metrics-port", type=int, default=8003)
        parser.add_argument(
            "--log-verbose", type=int, default=0, help="Triton's --log-verbose level."
        )
        parser.add_argument(
            "--ready-timeout", type=float, default=60.0, help="Seconds to wait for ready."
        )
        parser.add_argument(
            "--stream-token-interval-ms",
            type=float,
            default=float(os.environ.get(STREAM_TOKEN_INTERVAL_ENV) or 0),
            help="Milliseconds between two streamed tokens (default: "
            "GYM_ENGINE_STREAM_TOKEN_INTERVAL_MS, else 0: as fast as the CPU goes); 20 looks "
            "like one GPU engine stream's pace (the engine runs 4 streams at once).",
        )

    def handle(self, *args, **options):
        server = TritonDevServer(
            host=options["host"],
            http_port=options["http_port"],
            grpc_port=options["grpc_port"],
            metrics_port=options["metrics_port"],
            log_verbose=options["log_verbose"],
            ready_timeout=options["ready_timeout"],
            stream_token_interval_ms=options["stream_token_interval_ms"],
            # The server's own log goes to this terminal, as `tritonserver` would.
            inherit_output=True,
        )
        # `kill <pid>` should stop Triton too, not orphan it: treat it as Ctrl-C.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            server.start()
        except TritonServerError as exc:
            raise CommandError(str(exc)) from exc
        try:
            self.stdout.write(
                self.style.SUCCESS(
                    f"Triton ready in {server.ready_seconds:.1f} s, model '{PUBLIC_MODEL}'"
                )
            )
            self.stdout.write(
                f"  gRPC     {server.grpc_url}  (streaming and non-streaming requests)"
            )
            self.stdout.write(
                f"  HTTP     {server.http_base}  (/v2/models/{PUBLIC_MODEL}/generate)"
            )
            self.stdout.write(f"  metrics  {server.metrics_url}")
            self.stdout.write("Ctrl-C to stop.")
            while server.is_running():
                time.sleep(0.5)
            raise CommandError(
                f"tritonserver exited on its own (code {server.process.returncode})."
            )
        except KeyboardInterrupt:
            self.stdout.write("Stopping tritonserver...")
        finally:
            server.stop()
