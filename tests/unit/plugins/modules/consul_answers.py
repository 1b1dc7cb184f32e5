"""Consul's answers to a module run, recorded from the Consul double and replayed without it.

A recording is ``tests/unit/fixtures/consul_answers/<scenario>.json``::

    {"description": "...", "exchanges": [{"request": {"method": "GET", "path": "/v1/kv/fireap/web/lock",
                                                      "query": "consistent=1"},
                                          "response": {"status": 200, "headers": {...}, "json": [...]}}]}

A request is matched on its method, path and query (never its body, which holds run IDs and
times) to the first exchange of the same request not answered yet, so a request sent twice
gets its answers in the recorded order. A request that was not recorded fails the test.
``tests/consul/test_record_consul_answers.py`` makes the recordings from the double; it says
how to make them again.
"""

from __future__ import annotations

import contextlib
import io
import json
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any
from unittest import mock

import requests
import urllib3
from requests.adapters import HTTPAdapter

from ansible_collections.fireap.consul.tests.unit.plugins.modules.module_run import ModuleRun, run_module

ANSWERS_DIR = Path(__file__).resolve().parents[2] / "fixtures" / "consul_answers"
#: Connection options of a replayed run: the answers come from the recording whatever they say.
REPLAY_CONNECTION = {"host": "127.0.0.1", "port": 8500, "token": "replayed-token", "retries": 0}

Exchange = dict[str, Any]


class UnrecordedRequest(AssertionError):
    """A module sent a request its recording holds no (further) answer to."""


def request_of(method: str, url: str) -> dict[str, str]:
    """What a recording matches a request on: method, path and the query with its pairs sorted."""
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.urlencode(sorted(urllib.parse.parse_qsl(parts.query, keep_blank_values=True)))
    return {"method": method.upper(), "path": parts.path, "query": query}


def answer_of(response: requests.Response) -> dict[str, Any]:
    """A recorded answer: status, Content-Type and Consul's own headers, the body (as JSON when it is)."""
    headers = {name: value for name, value in response.headers.items()
               if name.lower() == "content-type" or name.lower().startswith("x-consul-")}
    answer: dict[str, Any] = {"status": response.status_code, "headers": headers}
    try:
        answer["json"] = json.loads(response.content)
    except ValueError:
        answer["body"] = response.content.decode()
    return answer


def load(scenario: str) -> list[Exchange]:
    """The exchanges recorded for ``scenario``."""
    return json.loads((ANSWERS_DIR / f"{scenario}.json").read_text(encoding="utf-8"))["exchanges"]


def save(scenario: str, description: str, exchanges: list[Exchange]) -> Path:
    """Write ``scenario``'s recording; returns its path."""
    path = ANSWERS_DIR / f"{scenario}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    recording = {"description": description, "exchanges": exchanges}
    path.write_text(json.dumps(recording, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return path


class RecordingConsul(HTTPAdapter):
    """Sends every request to the agent and keeps each exchange, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.exchanges: list[Exchange] = []

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> requests.Response:
        response = super().send(request, *args, **kwargs)
        self.exchanges.append({"request": request_of(request.method or "", request.url or ""),
                               "response": answer_of(response)})
        return response


class ReplayedConsul(HTTPAdapter):
    """Answers every request from recorded exchanges and sends nothing anywhere.

    ``unrecorded`` lists the requests that had no answer, so that a test sees them even where
    the code under test turns the UnrecordedRequest raised into an error message of its own.
    """

    def __init__(self, scenario: str, exchanges: list[Exchange]) -> None:
        super().__init__()
        self.scenario = scenario
        self.pending = list(exchanges)
        self.unrecorded: list[str] = []

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> requests.Response:
        wanted = request_of(request.method or "", request.url or "")
        for position, exchange in enumerate(self.pending):
            if exchange["request"] == wanted:
                del self.pending[position]
                return self.build_response(request, _raw_response(exchange["response"]))
        shown = f"{wanted['method']} {request.path_url}"
        self.unrecorded.append(shown)
        raise UnrecordedRequest(f"{shown}: the recording {self.scenario!r} holds no answer to it; if the module's "
                                "requests changed on purpose, record the answers again "
                                "(tests/consul/test_record_consul_answers.py)")


def _raw_response(answer: dict[str, Any]) -> urllib3.HTTPResponse:
    body = json.dumps(answer["json"]) if "json" in answer else answer["body"]
    return urllib3.HTTPResponse(body=io.BytesIO(body.encode()), headers=answer["headers"], status=answer["status"],
                                preload_content=False)


@contextlib.contextmanager
def consul_transport(adapter: HTTPAdapter) -> Iterator[None]:
    """Every requests session sends through ``adapter`` within the block.

    A module builds its Consul client inside ``main()``, so there is no session to mount the
    adapter on beforehand; this is where every session picks its adapter.
    """
    with mock.patch.object(requests.Session, "get_adapter", lambda _session, url: adapter):
        yield


def run_on_answers(scenario: str, module: ModuleType, args: dict[str, Any], *, exchanges: list[Exchange] | None = None,
                   check_mode: bool = False, diff: bool = False) -> ModuleRun:
    """Run ``module`` with ``args`` (over REPLAY_CONNECTION) on the answers recorded for ``scenario``
    (or on ``exchanges``)."""
    consul = ReplayedConsul(scenario, load(scenario) if exchanges is None else exchanges)
    with consul_transport(consul):
        run = run_module(module, dict(REPLAY_CONNECTION, **args), check_mode=check_mode, diff=diff)
    if consul.unrecorded:
        raise UnrecordedRequest(f"{module.__name__} sent requests the recording {scenario!r} holds no answer to: "
                                f"{consul.unrecorded}")
    return run
