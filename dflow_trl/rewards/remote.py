"""Client reward function for a reward hosted by ``dflow-trl reward-server`` in another process or machine."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from typing import Any

from .combine import validate_rewards
from .wire import encode_request

TOKEN_ENV = "DFLOW_TRL_REWARD_TOKEN"

# Worth another try: the server is busy, restarting, or a proxy in front of it is. A 504 is not: the server
# (or a proxy) gave up on this very batch, and sending it again only queues the same work once more.
_RETRY_STATUSES = frozenset({502, 503})


class RemoteRewardError(RuntimeError):
    """The reward server could not be reached or gave no usable answer."""


class RemoteReward:
    """POST each batch to ``{url}/score/{reward}`` and return the server's rewards.

    Connection failures, client-side timeouts and 502/503 answers are retried ``retries`` times with
    exponential backoff; a 504 (the server's ``--timeout`` ran out on the batch) only with
    ``retry_timeouts=True``. Other errors (bad token, request too large, the reward raising) fail at once
    with the server's message.
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        timeout: float = 120.0,
        retries: int = 2,
        *,
        reward: str | None = None,
        name: str | None = None,
        columns: list[str] | None = None,
        backoff: float = 0.5,
        retry_timeouts: bool = False,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"reward server url must start with http:// or https://, got {url!r}")
        if retries < 0 or timeout <= 0:
            raise ValueError(
                f"retries must be >= 0 and timeout > 0, got retries={retries}, timeout={timeout}"
            )
        self.endpoint = url.rstrip("/") + ("/score" if reward is None else f"/score/{reward}")
        self.token = token if token is not None else os.environ.get(TOKEN_ENV)
        self.timeout = timeout
        self.retries = retries
        self.columns = columns
        self.backoff = backoff
        self.retry_timeouts = retry_timeouts
        self.__name__ = name or (f"remote_{reward}" if reward else "remote")

    def _post(self, body: bytes) -> bytes:
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        attempts = self.retries + 1
        last_error = ""
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(self.endpoint, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return response.read()
            except urllib.error.HTTPError as error:
                message = _server_message(error)
                if error.code in _RETRY_STATUSES or (error.code == 504 and self.retry_timeouts):
                    last_error = f"HTTP {error.code}: {message}"
                    continue
                raise RemoteRewardError(self._refusal(error.code, message)) from error
            except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
                reason = getattr(error, "reason", error)
                last_error = f"{type(reason).__name__}: {reason}"
        raise RemoteRewardError(
            f"reward server {self.endpoint} gave no answer after {attempts} attempts ({last_error}); "
            "check that `dflow-trl reward-server` is running there and reachable, or raise timeout/retries"
        )

    def _refusal(self, code: int, message: str) -> str:
        if code == 401:
            sent = "a token that the server does not accept" if self.token else "no token"
            return (
                f"reward server {self.endpoint} refused the token: HTTP 401: {message}; this client sent "
                f"{sent}. Pass token= (or set ${TOKEN_ENV}) to the value of the server's --token"
            )
        if code == 504:
            return (
                f"reward server {self.endpoint} timed out on the batch: HTTP 504: {message}. Not retried, "
                "since a retry queues the same work again; raise the server's --timeout, send smaller "
                "batches, or pass retry_timeouts=True"
            )
        return f"reward server {self.endpoint} refused the batch: HTTP {code}: {message}"

    def __call__(
        self, prompts: list, completions: list, completion_ids: Any = None, **kwargs: Any
    ) -> list[float | None]:
        if self.columns is not None:
            missing = [c for c in self.columns if c not in kwargs]
            if missing:
                raise KeyError(f"{self.__name__}: columns {missing} are not in the batch")
            kwargs = {c: kwargs[c] for c in self.columns}
        body = encode_request(prompts, completions, completion_ids, kwargs)
        raw = self._post(body)
        try:
            answer = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise RemoteRewardError(
                f"reward server {self.endpoint} answered with something that is not JSON: {raw[:120]!r}"
            ) from error
        if not isinstance(answer, dict) or "rewards" not in answer:
            raise RemoteRewardError(
                f"reward server {self.endpoint} answered without a 'rewards' list: {str(answer)[:200]}"
            )
        try:
            return validate_rewards(answer["rewards"], len(completions), self.__name__)
        except (TypeError, ValueError) as error:
            raise RemoteRewardError(
                f"reward server {self.endpoint} sent unusable rewards: {error}"
            ) from error


def _server_message(error: urllib.error.HTTPError) -> str:
    try:
        body = error.read()
        return str(json.loads(body).get("error", body[:200]))
    except Exception:
        return str(error.reason)


def remote(url: str, **kwargs: Any) -> RemoteReward:
    """Factory for the registry; see :class:`RemoteReward` for arguments."""
    return RemoteReward(url, **kwargs)
