"""The HTTP hot path (issue 19, P2): header lines a handler encodes once
(``Response.head``) are written as they are on a keep-alive HTTP/1.1 answer and
read back as pairs everywhere else; the decision renderer's encoded headers say
exactly what its header pairs say."""

from __future__ import annotations

import json

from test_http11 import Client, get, serving

from bucketmesh.core.bucket import Decision
from bucketmesh.http.render import DecisionRenderer
from bucketmesh.http.server import Request, Response

HEAD = b"X-Trace: t1\r\nContent-Type: application/json\r\n"
BODY = b'{"a":1}'


def encoded(request: Request) -> Response:
    return Response(200, BODY, "application/json", None, HEAD)


def test_an_encoded_head_is_written_as_given_on_every_kind_of_answer() -> None:
    with serving(encoded) as running:
        client = Client(running.port)
        client.send(get("/a") + get("/b"))  # pipelined, keep-alive: the hot path
        for _ in range(2):
            status, headers, body = client.response()
            assert status == "HTTP/1.1 200 OK"
            assert headers["x-trace"] == "t1"
            assert headers["content-type"] == "application/json"
            assert headers["content-length"] == str(len(BODY))
            assert "date" in headers and headers["server"] == "bucketmesh"
            assert "connection" not in headers
            assert body == BODY
        client.send(b"HEAD /c HTTP/1.1\r\nHost: x\r\n\r\n")  # HEAD: no body, same head
        status, headers, body = client.response(head_only=True)
        assert (headers["x-trace"], headers["content-length"], body) == ("t1", "7", b"")
        client.send(b"GET /d HTTP/1.0\r\nHost: x\r\n\r\n")  # HTTP/1.0: closes after it
        status, headers, body = client.response()
        assert headers["x-trace"] == "t1" and headers["content-type"] == "application/json"
        assert headers["connection"] == "close" and body == BODY
        assert client.at_eof()
        client.close()
        assert not running.errors


def test_an_encoded_head_reads_back_as_pairs_without_the_content_type() -> None:
    response = Response(200, BODY, "application/json", None, HEAD)
    assert response.headers == [("X-Trace", "t1")]
    assert response.head is None  # read as pairs: the pairs are what is written now
    response = Response(200, BODY, "application/json", None, HEAD)
    response.headers = [("X-Other", "2")]  # setting pairs replaces the encoded lines
    assert response.head is None and response.headers == [("X-Other", "2")]


def test_a_header_added_to_the_pairs_of_an_encoded_head_is_written() -> None:
    def handler(request: Request) -> Response:
        response = Response(200, BODY, "application/json", None, HEAD)
        headers = response.headers
        assert headers is not None
        headers.append(("X-Added", "yes"))  # as an audit or replay hook might
        return response

    with serving(handler) as running:
        client = Client(running.port)
        client.send(get("/a"))
        status, headers, body = client.response()
        assert status == "HTTP/1.1 200 OK"
        assert (headers["x-trace"], headers["x-added"]) == ("t1", "yes")
        assert headers["content-type"] == "application/json" and body == BODY
        client.close()
        assert not running.errors


def _decision(allowed: bool, rule: str = "per-key") -> Decision:
    return Decision(
        allowed=allowed,
        key="k",
        tokens_remaining=4 if allowed else -2,
        capacity=10,
        refill_rate=0.5,
        retry_after=0.0 if allowed else 2.2,
        reset_after=12.0,
        mode="shared",
        rule=rule,
    )


def test_the_renderers_encoded_head_says_what_its_header_pairs_say() -> None:
    renderer = DecisionRenderer("eu")
    for _ in range(2):  # the second time from the one-entry cache
        for allowed in (True, False):
            decision = _decision(allowed)
            response = renderer.response(decision)
            assert response.head is not None
            assert response.head.endswith(b"Content-Type: %s\r\n" % response.content_type.encode())
            assert response.headers == renderer.headers(decision)
            body = json.loads(response.body)
            assert body["region"] == "eu" and body["allowed"] is allowed
    assert renderer.response(_decision(False)).headers == [
        ("RateLimit-Policy", '"per-key";q=10;w=20'),
        ("RateLimit", '"per-key";r=0;t=3'),
        ("Retry-After", "3"),
    ]
    # a rule name a header cannot carry as it is: pairs, which the server refuses as before
    odd = _decision(True, rule="caf\u00e9")
    response = renderer.response(odd)
    assert response.head is None and response.headers == renderer.headers(odd)
