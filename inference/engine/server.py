"""Start and stop a real `tritonserver` that serves the development model repository.

The binary is the one inside the `nvidia-pytriton` wheel: full Triton 2.51 with
the Python backend, which runs on a CPU-only machine. We start it directly
(not through PyTriton's proxy) so the model repository, the `ensemble`
platform, decoupled streaming, HTTP, gRPC and metrics are Triton's own.

Two traps decide the environment of the server process (NOTES.md):
1. The Python-backend stub links the system `libpython3.11`; a venv built on
   another 3.11 build fails to load models. Its LIBDIR goes first in
   LD_LIBRARY_PATH so the stub finds the matching library.
2. The stub imports numpy from the first `python3` on PATH, and numpy 2 breaks
   BYTES tensors: this interpreter's bin (the project venv, numpy<2) goes first.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from secrets import token_hex

from inference.engine import STREAM_TOKEN_INTERVAL_ENV

logger = logging.getLogger(__name__)

ENGINE_DIR = Path(__file__).resolve().parent
MODEL_REPOSITORY = ENGINE_DIR / "model_repository"
REPO_ROOT = ENGINE_DIR.parent.parent
PUBLIC_MODEL = "ensemble"

_PR_SET_PDEATHSIG = 1


class TritonServerError(RuntimeError):
    """The server did not start, or stopped; the message carries its log."""


def _pytriton_dir() -> Path:
    # find_spec, not import: importing pytriton pulls in its whole runtime.
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonServerError("nvidia-pytriton is not installed; run `make install`.")
    return Path(next(iter(spec.submodule_search_locations)))


def _free_ports(host: str, count: int) -> list[int]:
    """`count` ports free on `host`, all different: each is bound while the next is
    picked. Picked one at a time, each socket closed before the next bind, the system
    could hand the same port out twice (a server then refused to listen for gRPC and
    metrics on one port, and a test failed at its setup)."""
    with contextlib.ExitStack() as stack:
        socks = [
            stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            for _ in range(count)
        ]
        for sock in socks:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in socks]


def _die_with_parent() -> None:
    """Runs in the child before exec: if the test run or command dies, so does Triton.

    Linux sends the signal when the thread that started the child exits, so
    start the server from a thread that lives as long as it should.
    """
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class TritonDevServer:
    """A `tritonserver` subprocess serving the development engine; a context manager.

    Ports left at 0 are picked free on `host`. `start()` returns once the
    server and the public `ensemble` model answer ready; `stop()` sends SIGTERM
    (Triton ignores SIGINT when it is not in the foreground), waits, and
    removes the shared-memory regions the Python backend leaves in /dev/shm.

    `graceful=False` makes `stop()` kill the server and its Python-backend stubs at
    once (SIGKILL to its process group). For a throwaway server (the test suite's):
    Triton's own shutdown lets in-flight requests finish, then unloads each model and
    checks once a second whether they are gone, about 3 s here even when idle, which
    a server nobody will ask anything again does not need.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        http_port: int = 0,
        grpc_port: int = 0,
        metrics_port: int = 0,
        model_repository: Path = MODEL_REPOSITORY,
        log_path: Path | None = None,
        inherit_output: bool = False,
        log_verbose: int = 0,
        ready_timeout: float = 60.0,
        stop_timeout: float = 10.0,
        stream_token_interval_ms: float = 0,
        graceful: bool = True,
    ):
        self.host = host
        self._requested_ports = (http_port, grpc_port, metrics_port)
        self.http_port, self.grpc_port, self.metrics_port = self._requested_ports
        self.model_repository = Path(model_repository)
        self.log_path = log_path
        self.inherit_output = inherit_output
        self.log_verbose = log_verbose
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self.graceful = graceful
        # Milliseconds the engine waits after each streamed token (model.py).
        # Set here, never inherited from this process's environment: a
        # developer's pace for demos must not slow the tests or the bench.
        if not stream_token_interval_ms >= 0:
            raise ValueError(
                f"stream_token_interval_ms must be 0 or more, not {stream_token_interval_ms!r}"
            )
        self.stream_token_interval_ms = stream_token_interval_ms
        self.ready_seconds: float | None = None
        self.process: subprocess.Popen | None = None
        self._workdir: Path | None = None
        # Our own prefix, so cleanup removes this server's regions and never
        # those of a server someone else is running on the machine.
        self.shm_prefix = f"triton_python_backend_gym_{os.getpid()}_{token_hex(4)}_"

    # -- addresses, in the forms the clients take -----------------------------

    @property
    def http_url(self) -> str:
        """`host:port` for tritonclient.http."""
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        """`host:port` for tritonclient.grpc."""
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_base(self) -> str:
        return f"http://{self.http_url}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    # -- lifecycle -------------------------------------------------------------

    def __enter__(self) -> TritonDevServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> TritonDevServer:
        if self.process is not None:
            raise TritonServerError("this server is already started")
        self._workdir = Path(tempfile.mkdtemp(prefix="gym-triton-"))
        # A script that dies on an exception still runs atexit: no orphan server.
        atexit.register(self.stop)
        if self.log_path is None and not self.inherit_output:
            self.log_path = self._workdir / "tritonserver.log"
        backends = self._backend_directory(self._workdir)
        # A free port found now may be taken before Triton binds it; only
        # ports we picked ourselves are worth picking again.
        attempts = 3 if 0 in self._requested_ports else 1
        for attempt in range(1, attempts + 1):
            self._pick_ports()
            started = time.monotonic()
            self._spawn(backends)
            try:
                self._wait_ready()
            except TritonServerError as exc:
                self._terminate()
                if attempt < attempts and self._lost_port_race(str(exc)):
                    logger.warning("tritonserver lost a port race; retrying with new ports")
                    continue
                self.stop()
                raise
            self.ready_seconds = time.monotonic() - started
            logger.info(
                "tritonserver ready in %.2f s: http %s, grpc %s, metrics %s",
                self.ready_seconds, self.http_url, self.grpc_url, self.metrics_url,
            )  # fmt: skip
            return self
        raise AssertionError("unreachable")

    def stop(self) -> None:
        atexit.unregister(self.stop)
        self._terminate()
        self._cleanup()

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, limit: int = 6000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(server output went to the terminal)"
        return self.log_path.read_text(errors="replace")[-limit:]

    # -- internals --------------------------------------------------------------

    @staticmethod
    def _backend_directory(workdir: Path) -> Path:
        """A backend directory whose Python backend has the stub for this interpreter.

        The wheel ships one stub per Python version beside the backend instead
        of inside it; the backend looks for `triton_python_backend_stub` next
        to `libtriton_python.so`, so we assemble that layout with links.
        """
        triton = _pytriton_dir() / "tritonserver"
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = triton / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not stub.exists():
            raise TritonServerError(f"no Python-backend stub for Python {version} in {stub.parent}")
        python = workdir / "backends" / "python"
        python.mkdir(parents=True)
        for source in (*sorted((triton / "backends" / "python").iterdir()), stub):
            (python / source.name).symlink_to(source)
        return python.parent

    def _lost_port_race(self, message: str) -> bool:
        """Whether a port we picked (not one the caller chose) was taken meanwhile."""
        picked = [
            port
            for requested, port in zip(
                self._requested_ports,
                (self.http_port, self.grpc_port, self.metrics_port),
                strict=True,
            )
            if requested == 0
        ]
        return "already in use" in message and any(f":{port}'" in message for port in picked)

    def _pick_ports(self) -> None:
        requested = self._requested_ports
        free = iter(
            port
            for port in _free_ports(self.host, 2 * len(requested))
            if port not in requested  # nor one the caller chose for another
        )
        picked = [port or next(free) for port in requested]
        self.http_port, self.grpc_port, self.metrics_port = picked

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        libs = _pytriton_dir().parent / "nvidia_pytriton.libs"
        library_path = [str(libs)]
        # Trap 1: a non-system interpreter (pyenv, a source build) ships its
        # own shared libpython; the stub must load that one, not the system's.
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        soname = sysconfig.get_config_var("INSTSONAME") or ""
        system_dir = libdir.startswith(("/usr/lib", "/lib"))
        if libdir and soname and not system_dir and (Path(libdir) / soname).exists():
            library_path.insert(0, libdir)
        if env.get("LD_LIBRARY_PATH"):
            library_path.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = os.pathsep.join(library_path)
        # sys.executable, unresolved, is the venv's python: its bin first (trap 2).
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        # model.py imports `inference.engine` from this checkout.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        env[STREAM_TOKEN_INTERVAL_ENV] = f"{self.stream_token_interval_ms:g}"
        return env

    def _spawn(self, backends: Path) -> None:
        binary = _pytriton_dir() / "tritonserver" / "bin" / "tritonserver"
        command = [
            str(binary),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={backends}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            "--allow-metrics=true",
            "--allow-gpu-metrics=false",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            f"--log-verbose={self.log_verbose}",
            # Config files are the contract; nothing is filled in behind them.
            "--disable-auto-complete-config",
            "--strict-readiness=true",
            "--exit-on-error=true",
            # In-flight requests get this long after SIGTERM.
            "--exit-timeout-secs=5",
        ]
        # The child keeps its own copy of the descriptor; ours is closed below.
        output = None if self.inherit_output else open(self.log_path, "ab")  # noqa: SIM115
        try:
            self.process = subprocess.Popen(
                command,
                env=self._environment(),
                cwd=self._workdir,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT if output else None,
                # Its own session: Ctrl-C reaches us, and we stop it with SIGTERM.
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        finally:
            if output is not None:
                output.close()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        checks = [
            f"{self.http_base}/v2/health/ready",
            f"{self.http_base}/v2/models/{PUBLIC_MODEL}/ready",
        ]
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise TritonServerError(
                    f"tritonserver exited with code {self.process.returncode} before it was "
                    f"ready. {self._log_name()}:\n{self.log_tail()}"
                )
            if all(self._answers_ok(url) for url in checks):
                return
            time.sleep(0.05)
        raise TritonServerError(
            f"tritonserver was not ready within {self.ready_timeout:.0f} s. "
            f"{self._log_name()}:\n{self.log_tail()}"
        )

    def _log_name(self) -> str:
        temporary = (
            self._workdir is not None
            and self.log_path is not None
            and self.log_path.is_relative_to(self._workdir)
        )
        return (
            "End of its log (removed on stop)" if temporary else f"End of its log ({self.log_path})"
        )

    @staticmethod
    def _answers_ok(url: str) -> bool:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def _terminate(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None and not self.graceful:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        elif process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                logger.warning(
                    "tritonserver ignored SIGTERM for %.0f s; killing it", self.stop_timeout
                )
                process.kill()
                process.wait()
        # The Python-backend stubs are children in the server's own session and
        # process group. A server that died (SIGKILLed by a fault test, or
        # crashed) leaves them behind, orphaned and polling, each burning CPU
        # until reboot: end whatever of the group is left.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)

    def _cleanup(self) -> None:
        for region in Path("/dev/shm").glob(f"{self.shm_prefix}*"):
            region.unlink(missing_ok=True)
        if self._workdir is not None:
            # Keep a log the caller did not ask for only while it explains a failure.
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
            if self.log_path is not None and not self.log_path.exists():
                self.log_path = None
