"""Reward server and RemoteReward client on loopback: round trips, auth, limits, timeouts, dropped work,
slow and surplus connections, down and garbage servers."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import pathlib
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from PIL import Image

from dflow_trl.rewards import get_reward_function
from dflow_trl.rewards import server as server_module
from dflow_trl.rewards.remote import RemoteReward, RemoteRewardError
from dflow_trl.rewards.server import main, make_server, parse_reward_spec

TOKEN = "s3cret"


def redness(prompts, completions, completion_ids=None, **kwargs):
    """Mean red minus mean blue of each image, in [-1, 1]; None for images whose prompt says 'skip'."""
    out = []
    for prompt, image in zip(prompts, completions):
        r, _, b = (sum(band.getdata()) / (image.width * image.height * 255) for band in image.split())
        out.append(None if prompt == "skip" else r - b)
    return out


def slow(prompts, completions, **kwargs):
    time.sleep(1.0)
    return [0.0] * len(completions)


def broken(prompts, completions, **kwargs):
    raise ZeroDivisionError("division by zero in the reward")


def nan_reward(prompts, completions, **kwargs):
    return [float("nan")] * len(completions)


def serve(rewards, **options):
    server = make_server(rewards, "127.0.0.1", 0, quiet=True, **options)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread


@pytest.fixture
def server():
    srv, thread = serve(
        [redness, get_reward_function("mc_letter"), slow, broken, nan_reward],
        token=TOKEN, timeout=0.3, max_request_bytes=200_000,
    )  # fmt: skip
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_image_and_text_round_trips(server):
    images = [
        Image.new("RGB", (16, 16), "red"),
        Image.new("RGB", (16, 16), "blue"),
        Image.new("RGB", (4, 4), "red"),
    ]
    remote = RemoteReward(server.url, TOKEN, reward="redness")
    assert remote.__name__ == "remote_redness"
    out = remote(["a", "b", "skip"], images, None, trainer_state=object(), log_metric=print)
    assert out == [1.0, -1.0, None]  # PNG is lossless, None survives as null
    mc = RemoteReward(server.url, TOKEN, reward="mc_letter", name="mc_remote")
    scores = mc(
        ["q", "q"], ["The answer is (B).", "A"], [[1, 2], [3]], answer=[1, 1], choices=[["x", "y"]] * 2
    )
    assert scores == [1.0, 0.0]
    with urllib.request.urlopen(f"{server.url}/health", timeout=5) as response:
        assert json.loads(response.read())["rewards"] == sorted(
            ["redness", "mc_letter", "slow", "broken", "nan_reward"]
        )


def test_auth_size_limit_and_errors_fail_fast(server):
    image = Image.new("RGB", (16, 16), "red")
    with pytest.raises(RemoteRewardError, match="HTTP 401: missing or wrong bearer token"):
        RemoteReward(server.url, "wrong", reward="redness")(["a"], [image])
    noisy = Image.frombytes("RGB", (400, 400), os.urandom(400 * 400 * 3))  # incompressible PNG
    with pytest.raises(RemoteRewardError, match=r"HTTP 413: request of .* exceeds the limit of 200000"):
        RemoteReward(server.url, TOKEN, reward="redness")(["a"], [noisy])
    start = time.monotonic()
    with pytest.raises(RemoteRewardError, match="HTTP 500: reward 'broken' failed: ZeroDivisionError"):
        RemoteReward(server.url, TOKEN, reward="broken", retries=3, backoff=1.0)(["a"], [image])
    assert time.monotonic() - start < 1.0  # a failing reward is not retried
    with pytest.raises(RemoteRewardError, match="returned nan for sample 0"):
        RemoteReward(server.url, TOKEN, reward="nan_reward")(["a"], [image])
    with pytest.raises(RemoteRewardError, match="HTTP 404: no reward at /score/nope"):
        RemoteReward(server.url, TOKEN, reward="nope")(["a"], [image])
    with pytest.raises(TypeError, match="column 'obj' cannot be sent"):
        RemoteReward(server.url, TOKEN, reward="redness")(["a"], [image], obj=[object()])


def post(url, body, token=TOKEN):
    request = urllib.request.Request(
        url, data=body, headers={"Authorization": f"Bearer {token}"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_server_rejects_malformed_payloads(server):
    url = f"{server.url}/score/redness"
    assert post(url, b"not json")[0] == 400
    status, body = post(url, json.dumps({"prompts": ["a"], "completions": []}).encode())
    assert status == 400 and "1 prompts for 0 completions" in body["error"]
    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8)).save(jpeg, format="JPEG")
    payload = {"prompts": ["a"], "completions": [{"image": base64.b64encode(jpeg.getvalue()).decode()}]}
    status, body = post(url, json.dumps(payload).encode())
    assert status == 400 and "must be PNG" in body["error"]
    payload = {"prompts": ["a"], "completions": [{"pickle": "gASV"}]}
    assert post(url, json.dumps(payload).encode())[0] == 400


def test_slow_reward_times_out_and_is_retried_when_asked(server):
    remote = RemoteReward(server.url, TOKEN, reward="slow", retries=1, backoff=0.01, retry_timeouts=True)
    start = time.monotonic()
    with pytest.raises(
        RemoteRewardError,
        # The retry waits behind the first attempt, still running, and is dropped unrun at its deadline.
        match=r"gave no answer after 2 attempts \(HTTP 504: reward 'slow' did not start .*dropped without",
    ):
        remote(["a"], [Image.new("RGB", (4, 4))])
    assert time.monotonic() - start < 3


def test_client_timeout_on_a_server_that_hangs():
    server, thread = serve([slow], timeout=10)
    try:
        remote = RemoteReward(server.url, timeout=0.2, retries=1, backoff=0.01)  # one reward: POST /score
        with pytest.raises(RemoteRewardError, match=r"gave no answer after 2 attempts .*timed out"):
            remote(["a"], [Image.new("RGB", (4, 4))])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_server_that_is_down():
    remote = RemoteReward(f"http://127.0.0.1:{free_port()}", retries=2, backoff=0.01)
    start = time.monotonic()
    with pytest.raises(
        RemoteRewardError, match=r"gave no answer after 3 attempts .*Connection.*is running there"
    ):
        remote(["a"], ["text completion"])
    assert time.monotonic() - start < 2


class GarbageHandler(BaseHTTPRequestHandler):
    replies: list[bytes] = []

    def log_message(self, *args):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        body = self.replies.pop(0)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_server_returning_garbage():
    server = HTTPServer(("127.0.0.1", 0), GarbageHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    GarbageHandler.replies = [
        b"<html>oops</html>",
        b'{"scores": [1, 2]}',
        b'{"rewards": [1.0]}',
        b'{"rewards": ["x", 1]}',
    ]
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        remote = RemoteReward(url)
        for message in ("not JSON", "without a 'rewards' list", "returned 1 rewards for 2", "returned 'x'"):
            with pytest.raises(RemoteRewardError, match=message):
                remote(["a", "b"], ["x", "y"])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_parse_reward_spec():
    assert parse_reward_spec("pickscore") == ("pickscore", {})
    assert parse_reward_spec('geneval={"mode": "strict", "batch_size": 4}') == (
        "geneval",
        {"mode": "strict", "batch_size": 4},
    )
    assert parse_reward_spec("clip_score=scale=100,device=cuda") == (
        "clip_score",
        {"scale": 100, "device": "cuda"},
    )
    assert parse_reward_spec("my.mod:fn") == ("my.mod:fn", {})
    with pytest.raises(ValueError, match="not key=value"):
        parse_reward_spec("clip_score=scale")
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_reward_spec("clip_score={bad")


def test_main_refuses_unsafe_or_broken_configurations(capsys):
    assert main(["--reward", "mc_letter", "--host", "0.0.0.0"]) == 2
    assert "without a token" in capsys.readouterr().err
    assert main(["--reward", "no_such_reward", "--port", "0"]) == 2
    assert "unknown reward 'no_such_reward'" in capsys.readouterr().err


def test_main_serves_in_a_separate_process():
    # The parent package is stubbed so the child does not pay for importing the trainer.
    code = (
        "import sys, types; pkg = types.ModuleType('dflow_trl'); "
        f"pkg.__path__ = [{str(pathlib.Path(__file__).resolve().parents[1] / 'dflow_trl')!r}]; "
        "sys.modules['dflow_trl'] = pkg; from dflow_trl.rewards.server import main; "
        "raise SystemExit(main(sys.argv[1:]))"
    )
    args = ["--reward", "mc_letter", "--reward", "format=pattern=B", "--port", "0", "--quiet"]
    process = subprocess.Popen(
        [sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={"DFLOW_TRL_REWARD_TOKEN": TOKEN, "HF_HUB_OFFLINE": "1", "PATH": ""},
    )  # fmt: skip
    try:
        line = process.stdout.readline()
        assert "['format', 'mc_letter']" in line, (
            process.stderr.read() if process.poll() is not None else line
        )
        url = line.strip().rsplit(" ", 1)[-1]
        assert RemoteReward(url, TOKEN, reward="format")(["q", "q"], ["B", "C"]) == [1.0, 0.0]
        with pytest.raises(RemoteRewardError, match="HTTP 401"):
            RemoteReward(url, "other", reward="format")(["q"], ["B"])
    finally:
        process.terminate()
        assert process.wait(timeout=10) == 0


def length(prompts, completions, **kwargs):
    return [float(len(c)) for c in completions]


@contextlib.contextmanager
def running(rewards, **options):
    srv, thread = serve(rewards, **options)
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)


def test_refusals_of_a_large_batch_reach_the_client(monkeypatch):
    # A reply sent before the body is read used to be followed by a close with the body unread, which the
    # client, still sending, saw as a broken pipe.
    monkeypatch.delenv("DFLOW_TRL_REWARD_TOKEN", raising=False)
    big = ["x" * (16 << 20)]
    with running([length], token=TOKEN, max_request_bytes=64 << 20) as srv:
        for token, sent in (("wrong", "a token that the server does not accept"), (None, "no token")):
            with pytest.raises(
                RemoteRewardError, match=rf"refused the token: HTTP 401: missing .*sent {sent}"
            ):
                RemoteReward(srv.url, token, retries=0)(["a"], big)
        with pytest.raises(RemoteRewardError, match="HTTP 404: no reward at /score/nope"):
            RemoteReward(srv.url, TOKEN, reward="nope", retries=0)(["a"], big)
        assert RemoteReward(srv.url, TOKEN)(["a"], big) == [float(16 << 20)]


def png_b64(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_pixel_budget_is_checked_from_png_headers_before_decoding(monkeypatch):
    decoded = []
    real_decode = server_module.decode_request

    def spy(body, max_pixels):
        decoded.append(len(body))
        return real_decode(body, max_pixels)

    monkeypatch.setattr(server_module, "decode_request", spy)
    huge = {"image": png_b64(Image.new("1", (8192, 8192)))}  # a few KB of PNG, 192 MiB once decoded as RGB
    payload = json.dumps({"prompts": ["a"] * 4, "completions": [huge] * 4}).encode()
    assert len(payload) < 100_000
    with running([redness]) as srv:  # the default budget, 64 Mi pixels
        start = time.monotonic()
        status, body = post(f"{srv.url}/score", payload)
        assert time.monotonic() - start < 1.0
        assert status == 413 and decoded == []
        assert "4 images have 268435456 pixels in all (largest 8192x8192)" in body["error"]
        assert "send fewer or smaller images per batch, or raise --max-pixels-per-request" in body["error"]
    with running([redness], max_pixels_per_request=1000) as srv:
        images = [Image.new("RGB", (16, 16), "red")] * 4
        with pytest.raises(RemoteRewardError, match=r"HTTP 413: the request's 4 images have 1024 pixels"):
            RemoteReward(srv.url)(["a"] * 4, images)
        assert RemoteReward(srv.url)(["a"] * 3, images[:3]) == [1.0] * 3
        assert len(decoded) == 1


def test_timed_out_batch_is_not_retried_by_default(server):
    remote = RemoteReward(server.url, TOKEN, reward="slow", retries=3, backoff=0.01)
    start = time.monotonic()
    with pytest.raises(
        RemoteRewardError,
        match=r"timed out on the batch: HTTP 504: reward 'slow' did not finish within 0.3s .*retry_timeouts",
    ):
        remote(["a"], ["x"])
    assert time.monotonic() - start < 0.9  # one attempt, not four


def wait_for(condition, timeout=3.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def busy_reward(calls):
    def busy(prompts, completions, **kwargs):
        calls.append(prompts[0])
        time.sleep(0.6)
        return [0.0] * len(completions)

    return busy


def test_queued_batches_past_their_deadline_never_run():
    calls, errors = [], {}

    def call(tag):
        try:
            RemoteReward(srv.url, retries=0)([tag], ["x"])
        except RemoteRewardError as error:
            errors[tag] = str(error)

    with running({"busy": busy_reward(calls)}, timeout=0.3) as srv:
        threads = [threading.Thread(target=call, args=(tag,)) for tag in "abc"]
        threads[0].start()
        wait_for(lambda: calls)
        for thread in threads[1:]:
            thread.start()
        for thread in threads:
            thread.join(timeout=5)
        time.sleep(0.5)  # "a" finished by now and, before the fix, "b" and "c" started after it
        assert calls == ["a"]
    assert "did not finish within 0.3s" in errors["a"] and "result will be dropped" in errors["a"]
    for tag in "bc":
        assert "did not start within 0.3s" in errors[tag] and "dropped without running" in errors[tag]


def test_queued_batch_of_a_client_that_went_away_never_runs():
    calls, results = [], []
    with running({"busy": busy_reward(calls)}, timeout=5) as srv:
        first = threading.Thread(target=lambda: results.append(RemoteReward(srv.url)(["a"], ["x"])))
        first.start()
        wait_for(lambda: calls)
        body = b'{"prompts": ["b"], "completions": [{"text": "x"}]}'
        with socket.create_connection(srv.server_address[:2]) as sock:
            sock.sendall(b"POST /score HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        first.join(timeout=5)
        time.sleep(0.3)
        assert results == [[0.0]] and calls == ["a"]


def test_silent_and_half_sent_connections_are_closed_after_the_header_timeout():
    with running([length], header_timeout=0.3) as srv:
        sockets = [socket.create_connection(srv.server_address[:2]) for _ in range(20)]
        try:
            for sock in sockets[::2]:
                sock.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Le")
            start = time.monotonic()
            for sock in sockets:
                sock.settimeout(3)
                assert sock.recv(1) == b""  # closed by the server
            assert time.monotonic() - start < 2
            assert RemoteReward(srv.url)(["a"], ["xyz"]) == [3.0]
        finally:
            for sock in sockets:
                sock.close()


def test_connections_past_the_limit_get_503_until_a_slot_frees():
    with running([length], max_connections=3, header_timeout=5) as srv:
        address = srv.server_address[:2]
        idle = [socket.create_connection(address) for _ in range(3)]
        try:
            with socket.create_connection(address, timeout=3) as extra:
                reply = b"".join(iter(lambda: extra.recv(4096), b""))
            assert reply.startswith(b"HTTP/1.0 503")
            assert b"already has 3 connections open (--max-connections)" in reply
        finally:
            for sock in idle:
                sock.close()
        assert RemoteReward(srv.url, retries=5, backoff=0.05)(["a"], ["xyz"]) == [3.0]


def test_main_refuses_non_positive_limits(capsys):
    for option in ("--max-connections", "--header-timeout", "--max-pixels-per-request"):
        assert main(["--reward", "mc_letter", "--port", "0", option, "0"]) == 2
        assert "must be positive" in capsys.readouterr().err
