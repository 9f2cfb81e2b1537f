"""``dflow-trl reward-server``: host reward functions over HTTP (standard library only).

Routes: ``GET /health`` (no token needed; lists the rewards) and ``POST /score/<reward>`` (``POST /score``
when one reward is served) taking the JSON body of :mod:`dflow_trl.rewards.wire`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hmac
import ipaddress
import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .combine import validate_rewards
from .remote import TOKEN_ENV
from .wire import DEFAULT_MAX_IMAGE_PIXELS, PayloadError, decode_request

DEFAULT_MAX_REQUEST_BYTES = 256 * 1024 * 1024
DEFAULT_TIMEOUT = 300.0


class RewardServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        rewards: dict[str, Callable[..., Any]],
        *,
        token: str | None = None,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        timeout: float = DEFAULT_TIMEOUT,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        quiet: bool = False,
    ) -> None:
        if not rewards:
            raise ValueError("the reward server needs at least one reward")
        super().__init__(address, _Handler)
        self.rewards = rewards
        self.token = token
        self.max_request_bytes = max_request_bytes
        self.request_timeout = timeout
        self.max_image_pixels = max_image_pixels
        self.quiet = quiet
        # One worker per reward: models are not assumed thread-safe, and batches of one reward run in order.
        self.executors = {
            name: concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"reward-{name}")
            for name in rewards
        }

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that gave up (its own timeout) closes the socket before the reply; that is not a
        # server fault.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)

    def server_close(self) -> None:
        super().server_close()
        for executor in self.executors.values():
            executor.shutdown(wait=False, cancel_futures=True)


class _Handler(BaseHTTPRequestHandler):
    server: RewardServer
    server_version = "dflow-trl-reward-server"

    def log_message(self, format: str, *args: Any) -> None:
        if not self.server.quiet:
            super().log_message(format, *args)

    def _reply(self, status: int, payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path.rstrip("/") == "/health":
            self._reply(200, {"status": "ok", "rewards": sorted(self.server.rewards)})
        else:
            self._reply(404, {"error": f"no route {self.path}; use GET /health or POST /score/<reward>"})

    def do_POST(self) -> None:
        server = self.server
        if server.token:
            given = self.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {server.token}".encode()):
                self._reply(401, {"error": "missing or wrong bearer token (Authorization: Bearer <token>)"})
                return
        name = self._reward_name()
        if name is None:
            return
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self._reply(411, {"error": "a Content-Length header is required"})
            return
        if int(length) > server.max_request_bytes:
            self.close_connection = True  # the unread body must not be parsed as a next request
            self._reply(
                413,
                {
                    "error": f"request of {length} bytes exceeds the limit of {server.max_request_bytes}; "
                    "send smaller batches or raise --max-request-bytes"
                },
            )
            self._discard(int(length))
            return
        self.connection.settimeout(server.request_timeout)
        try:
            body = self.rfile.read(int(length))
            kwargs = decode_request(body, server.max_image_pixels)
        except TimeoutError:
            self._reply(408, {"error": "timed out reading the request body"})
            return
        except PayloadError as error:
            self._reply(400, {"error": str(error)})
            return
        future = server.executors[name].submit(server.rewards[name], **kwargs)
        try:
            values = future.result(timeout=server.request_timeout)
            rewards = validate_rewards(values, len(kwargs["completions"]), name)
        except concurrent.futures.TimeoutError:
            # The computation cannot be interrupted; it finishes in the background and its result is dropped.
            self._reply(504, {"error": f"reward {name!r} took longer than {server.request_timeout:g}s"})
            return
        except Exception as error:
            self._reply(500, {"error": f"reward {name!r} failed: {type(error).__name__}: {error}"})
            return
        self._reply(200, {"rewards": rewards})

    def _discard(self, length: int) -> None:
        # Closing with unread data makes the peer's kernel reset the connection, and a client still sending
        # would then see a broken pipe instead of the 413. Read (never keep) the body, within the timeout.
        self.connection.settimeout(self.server.request_timeout)
        try:
            while length > 0:
                chunk = self.rfile.read(min(length, 1 << 16))
                if not chunk:
                    break
                length -= len(chunk)
        except OSError:
            pass

    def _reward_name(self) -> str | None:
        parts = [p for p in self.path.split("?")[0].split("/") if p]
        rewards = self.server.rewards
        if parts == ["score"] and len(rewards) == 1:
            return next(iter(rewards))
        if len(parts) == 2 and parts[0] == "score" and parts[1] in rewards:
            return parts[1]
        self._reply(
            404, {"error": f"no reward at {self.path}; served: {[f'/score/{n}' for n in sorted(rewards)]}"}
        )
        return None


def make_server(
    rewards: dict[str, Callable[..., Any]] | list[Callable[..., Any]],
    host: str = "127.0.0.1",
    port: int = 0,
    **options: Any,
) -> RewardServer:
    """A bound (not yet serving) reward server; a list of rewards is keyed by each one's ``__name__``."""
    if isinstance(rewards, list):
        keyed: dict[str, Callable[..., Any]] = {}
        for func in rewards:
            name = getattr(func, "__name__", type(func).__name__)
            if name in keyed:
                raise ValueError(f"two served rewards are both named {name!r}; give one a different name")
            keyed[name] = func
        rewards = keyed
    return RewardServer((host, port), rewards, **options)


def parse_reward_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``NAME``, ``NAME={"json": "kwargs"}`` or ``NAME=key=value,key=value`` (values parsed as JSON when
    they can be)."""
    name, _, rest = spec.partition("=")
    if not name:
        raise ValueError(f"reward spec {spec!r} has no name; use NAME or NAME=key=value,...")
    if not rest:
        return name, {}
    if rest.lstrip().startswith("{"):
        try:
            kwargs = json.loads(rest)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"reward spec {spec!r}: keyword arguments are not valid JSON: {error}"
            ) from error
        return name, kwargs
    kwargs = {}
    for item in rest.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"reward spec {spec!r}: {item!r} is not key=value")
        try:
            kwargs[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key.strip()] = value
    return name, kwargs


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dflow-trl reward-server",
        description="Serve dflow-trl reward functions over HTTP (JSON, base64 PNG images).",
    )
    parser.add_argument(
        "--reward",
        action="append",
        required=True,
        metavar="SPEC",
        help="registry name or module:function, optionally NAME=key=value,... or NAME={json}; repeatable",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (0 picks a free one; default: 8000)")
    parser.add_argument(
        "--token",
        default=os.environ.get(TOKEN_ENV),
        help=f"bearer token clients must send (default: ${TOKEN_ENV})",
    )
    parser.add_argument(
        "--max-request-bytes",
        type=int,
        default=DEFAULT_MAX_REQUEST_BYTES,
        help="largest accepted request body",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help="seconds allowed for reading a request and for scoring it",
    )
    parser.add_argument("--quiet", action="store_true", help="do not log each request")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.token and not _is_loopback(args.host):
        print(
            f"refusing to serve on {args.host} without a token: pass --token or set ${TOKEN_ENV}",
            file=sys.stderr,
        )
        return 2
    if args.max_request_bytes < 1 or args.timeout <= 0:
        print("--max-request-bytes and --timeout must be positive", file=sys.stderr)
        return 2
    from . import get_reward_function

    rewards = []
    for spec in args.reward:
        try:
            name, kwargs = parse_reward_spec(spec)
            rewards.append(get_reward_function(name, **kwargs))
        except (ValueError, ImportError, TypeError) as error:
            print(f"cannot build reward {spec!r}: {error}", file=sys.stderr)
            return 2
    try:
        server = make_server(
            rewards,
            args.host,
            args.port,
            token=args.token,
            max_request_bytes=args.max_request_bytes,
            timeout=args.timeout,
            quiet=args.quiet,
        )
    except (OSError, ValueError) as error:
        print(f"cannot start the reward server: {error}", file=sys.stderr)
        return 2

    def stop(signum: int, frame: Any) -> None:
        # shutdown() waits for serve_forever to return, so it must run off the serving thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    print(f"dflow-trl reward server: {sorted(server.rewards)} on {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
