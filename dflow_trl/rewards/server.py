"""``dflow-trl reward-server``: host reward functions over HTTP (the standard library's http.server).

Routes: ``GET /health`` (no token needed; lists the rewards) and ``POST /score/<reward>`` (``POST /score``
when one reward is served) taking the JSON body of :mod:`dflow_trl.rewards.wire`.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import hmac
import io
import ipaddress
import json
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from PIL import Image

from .combine import validate_rewards
from .remote import TOKEN_ENV
from .wire import DEFAULT_MAX_IMAGE_PIXELS, PayloadError, decode_request

DEFAULT_MAX_REQUEST_BYTES = 256 * 1024 * 1024
DEFAULT_TIMEOUT = 300.0
DEFAULT_MAX_PIXELS_PER_REQUEST = 64 * 1024 * 1024
DEFAULT_HEADER_TIMEOUT = 30.0
DEFAULT_MAX_CONNECTIONS = 64
# How often a request waiting for its reward's worker checks that its client is still connected.
_DISCONNECT_POLL_S = 0.1


class _Expired(Exception):
    """A batch whose deadline passed before its reward's worker reached it."""


def _run_before(deadline: float, func: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
    # The handler cancels expired work when it wakes; this also covers the worker getting there first.
    if time.monotonic() >= deadline:
        raise _Expired
    return func(**kwargs)


def _image_sizes(body: bytes) -> list[tuple[int, int]]:
    """Width and height of each image completion, read from its header; no pixel is decoded."""
    try:
        completions = json.loads(body).get("completions")
    except (ValueError, AttributeError, RecursionError):
        return []  # decode_request reports the malformed body
    sizes = []
    for item in completions if isinstance(completions, list) else []:
        data = item.get("image") if isinstance(item, dict) else None
        if not isinstance(data, str):
            continue
        try:
            # Image.open parses the header only; the pixels are decoded by load(), which is never called.
            with Image.open(io.BytesIO(base64.b64decode(data, validate=True))) as image:
                sizes.append(image.size)
        except Exception:
            continue  # decode_request rejects images it cannot read, before decoding them
    return sizes


class RewardServer(ThreadingHTTPServer):
    daemon_threads = True
    # The listen backlog; socketserver's 5 makes a burst of clients (one per training rank) wait out SYN
    # retransmissions of a second or more.
    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        rewards: dict[str, Callable[..., Any]],
        *,
        token: str | None = None,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        timeout: float = DEFAULT_TIMEOUT,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        max_pixels_per_request: int = DEFAULT_MAX_PIXELS_PER_REQUEST,
        header_timeout: float = DEFAULT_HEADER_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        quiet: bool = False,
    ) -> None:
        if not rewards:
            raise ValueError("the reward server needs at least one reward")
        if max_connections < 1 or header_timeout <= 0 or max_pixels_per_request < 1:
            raise ValueError("max_connections, header_timeout and max_pixels_per_request must be positive")
        super().__init__(address, _Handler)
        self.rewards = rewards
        self.token = token
        self.max_request_bytes = max_request_bytes
        self.request_timeout = timeout
        self.max_image_pixels = max_image_pixels
        self.max_pixels_per_request = max_pixels_per_request
        self.header_timeout = header_timeout
        self.max_connections = max_connections
        self.quiet = quiet
        self._slots = threading.BoundedSemaphore(max_connections)
        # One worker per reward: models are not assumed thread-safe, and batches of one reward run in order.
        self.executors = {
            name: concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"reward-{name}")
            for name in rewards
        }

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def process_request(self, request: Any, client_address: Any) -> None:
        # Each connection holds a thread; past the limit, new ones get a 503 (which clients retry) at once.
        if not self._slots.acquire(blocking=False):
            self._refuse_connection(request, client_address)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()  # the thread that would release it never started
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def _refuse_connection(self, request: socket.socket, client_address: Any) -> None:
        body = json.dumps(
            {
                "error": f"the reward server already has {self.max_connections} connections open "
                "(--max-connections); retry later"
            }
        ).encode("utf-8")
        head = (
            "HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
        )
        # This runs on the accepting thread, so nothing here may block.
        request.setblocking(False)
        try:
            request.send(head.encode("ascii") + body)
            while request.recv(1 << 16):  # what already arrived; unread data would make the close a reset
                pass
        except OSError:
            pass
        if not self.quiet:
            sys.stderr.write(f"refused a connection from {client_address[0]}: {self.max_connections} open\n")
        self.shutdown_request(request)

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

    def setup(self) -> None:
        # The socket timeout for the request line and headers: a client that connects and sends nothing, or
        # half a header, is dropped after it instead of holding a thread (and a connection slot) forever.
        self.timeout = self.server.header_timeout
        super().setup()

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

    def _refuse(self, status: int, message: str, unread: int) -> None:
        """Answer before the body is read, then read (never keep) up to ``unread`` bytes of it."""
        self.close_connection = True  # the unread body must not be parsed as a next request
        self._reply(status, {"error": message})
        self._discard(unread)

    def do_GET(self) -> None:
        if self.path.rstrip("/") == "/health":
            self._reply(200, {"status": "ok", "rewards": sorted(self.server.rewards)})
        else:
            self._reply(404, {"error": f"no route {self.path}; use GET /health or POST /score/<reward>"})

    def do_POST(self) -> None:
        server = self.server
        length = self.headers.get("Content-Length")
        size = int(length) if length is not None and length.isdigit() else None
        # Refusals before the body is read drain it, up to the size limit for a client that may not be
        # trusted, since a client still sending its batch would otherwise see a reset instead of the reply.
        drain = min(size or 0, server.max_request_bytes)
        if server.token:
            given = self.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {server.token}".encode()):
                self._refuse(401, "missing or wrong bearer token (Authorization: Bearer <token>)", drain)
                return
        name = self._reward_name()
        if name is None:
            rewards = sorted(server.rewards)
            self._refuse(404, f"no reward at {self.path}; served: {[f'/score/{n}' for n in rewards]}", drain)
            return
        if size is None:
            self.close_connection = True
            self._reply(411, {"error": "a Content-Length header is required"})
            return
        if size > server.max_request_bytes:
            message = (
                f"request of {size} bytes exceeds the limit of {server.max_request_bytes}; "
                "send smaller batches or raise --max-request-bytes"
            )
            self._refuse(413, message, size)
            return
        self.connection.settimeout(server.request_timeout)
        try:
            body = self.rfile.read(size)
        except TimeoutError:
            self._reply(408, {"error": "timed out reading the request body"})
            return
        sizes = _image_sizes(body)
        pixels = sum(width * height for width, height in sizes)
        if pixels > server.max_pixels_per_request:
            largest = max(sizes, key=lambda wh: wh[0] * wh[1])
            self._reply(
                413,
                {
                    "error": f"the request's {len(sizes)} images have {pixels} pixels in all (largest "
                    f"{largest[0]}x{largest[1]}), over the server's limit of {server.max_pixels_per_request} "
                    "per request; send fewer or smaller images per batch, or raise --max-pixels-per-request"
                },
            )
            return
        try:
            kwargs = decode_request(body, server.max_image_pixels)
        except PayloadError as error:
            self._reply(400, {"error": str(error)})
            return
        except RecursionError:
            self._reply(400, {"error": "request body is nested too deeply"})
            return
        del body  # the raw batch need not stay in memory while it waits for the reward's worker
        self._score(name, kwargs)

    def _score(self, name: str, kwargs: dict[str, Any]) -> None:
        server = self.server
        timeout = server.request_timeout
        # The deadline counts the wait behind earlier batches: work that nobody will read is never started,
        # so a backlog of abandoned (or retried) batches drains instead of growing.
        deadline = time.monotonic() + timeout
        future = server.executors[name].submit(_run_before, deadline, server.rewards[name], kwargs)
        while not future.done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            concurrent.futures.wait([future], timeout=min(remaining, _DISCONNECT_POLL_S))
            if not future.done() and self._client_gone() and future.cancel():
                self.close_connection = True
                self.log_message("dropped a queued %r batch: its client closed the connection", name)
                return
        if not future.done() and not future.cancel():
            # A running reward cannot be interrupted; it finishes in the background and its result is dropped.
            self._reply(
                504,
                {
                    "error": f"reward {name!r} did not finish within {timeout:g}s (--timeout); the batch is "
                    "still running and its result will be dropped; send smaller batches or raise --timeout"
                },
            )
            return
        if future.cancelled() or isinstance(future.exception(), _Expired):
            self._reply(
                504,
                {
                    "error": f"reward {name!r} did not start within {timeout:g}s (--timeout): the batch "
                    "waited behind earlier ones and was dropped without running; send fewer concurrent "
                    "batches or raise --timeout"
                },
            )
            return
        try:
            rewards = validate_rewards(future.result(), len(kwargs["completions"]), name)
        except Exception as error:
            self._reply(500, {"error": f"reward {name!r} failed: {type(error).__name__}: {error}"})
            return
        self._reply(200, {"rewards": rewards})

    def _client_gone(self) -> bool:
        # A closed connection reads as readable with nothing to read; a reset raises.
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and not self.connection.recv(1, socket.MSG_PEEK)
        except (OSError, ValueError):
            return True

    def _discard(self, length: int) -> None:
        # Closing with unread data makes the peer's kernel reset the connection, and a client still sending
        # would then see a broken pipe instead of the reply. Read (never keep) the body, within the timeout.
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
        help="seconds allowed for reading a request body, and for scoring it counting the wait behind "
        "earlier batches of the same reward (a batch not started by then is dropped)",
    )
    parser.add_argument(
        "--max-pixels-per-request",
        type=int,
        default=DEFAULT_MAX_PIXELS_PER_REQUEST,
        help="most image pixels one request may carry, all images together; checked from the PNG headers "
        "before any image is decoded (default: 64 Mi)",
    )
    parser.add_argument(
        "--header-timeout",
        type=float,
        default=DEFAULT_HEADER_TIMEOUT,
        help="seconds a client may stay silent while sending its request line and headers",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=DEFAULT_MAX_CONNECTIONS,
        help="most connections served at once; more get HTTP 503",
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
    limits = [args.max_request_bytes, args.timeout, args.max_pixels_per_request, args.header_timeout]
    if min(limits) <= 0 or args.max_connections < 1:
        print(
            "--max-request-bytes, --timeout, --max-pixels-per-request, --header-timeout and "
            "--max-connections must be positive",
            file=sys.stderr,
        )
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
            max_pixels_per_request=args.max_pixels_per_request,
            header_timeout=args.header_timeout,
            max_connections=args.max_connections,
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
