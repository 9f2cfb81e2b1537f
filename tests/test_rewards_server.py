"""Reward server and RemoteReward client on loopback: round trips, auth, limits, timeouts, down and
garbage servers."""

from __future__ import annotations

import base64
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


def test_slow_reward_times_out_and_is_retried(server):
    remote = RemoteReward(server.url, TOKEN, reward="slow", retries=1, backoff=0.01)
    start = time.monotonic()
    with pytest.raises(
        RemoteRewardError, match=r"gave no answer after 2 attempts \(HTTP 504: reward 'slow' took longer"
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
