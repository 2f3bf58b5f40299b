"""Scale-out on Ray Serve, the parts that need no running Ray: the proxy's error middleware (plain
ASGI), the ``serve --replicas`` flag checks (all before Ray starts or a model loads), the missing
extra, and ``build_app``'s checks. The deployment itself is tested in test_ray_serve.py and the
command in test_ray_cli.py."""
from __future__ import annotations

import asyncio
import importlib.util
import json
import socket
import sys

import pytest

from specexec_rt.serving import cli
from specexec_rt.serving.error_map import UsageError
from specexec_rt.serving.ray_proxy import CALLBACK, CALLBACK_ENV, MAX_CONNECTIONS_ENV, ProxyErrors, middlewares, proxy_env


# ------------------------------------------------------------------------ the proxy middleware
def run_asgi(middleware, scope=None) -> list:
    """The messages ``middleware`` sends for one request."""
    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    asyncio.run(middleware(scope or {"type": "http", "path": "/v1/completions"}, receive, send))
    return sent


def start(status: int, content_type: bytes, extra: tuple = ()) -> dict:
    return {"type": "http.response.start", "status": status, "headers": [(b"content-type", content_type), *extra]}


def body(data: bytes, more: bool = False) -> dict:
    return {"type": "http.response.body", "body": data, "more_body": more}


def json_answer(sent: list) -> tuple:
    """(status, headers dict, parsed body) of a one-piece answer."""
    assert sent[0]["type"] == "http.response.start" and sent[-1]["more_body"] is False
    headers = {k.decode(): v.decode() for k, v in sent[0]["headers"]}
    assert headers["content-type"] == "application/json"
    return sent[0]["status"], headers, json.loads(b"".join(m.get("body", b"") for m in sent[1:]))


def test_a_request_left_without_answer_gets_json_503():
    """What the proxy does when the replica died before answering: nothing (uvicorn would send a
    text 500). The client gets the OpenAI error, retryable."""
    async def dies(scope, receive, send):
        return None

    status, headers, err = json_answer(run_asgi(ProxyErrors(dies)))
    assert status == 503 and headers["retry-after"] == "1"
    assert err["error"]["code"] == "replica_unavailable" and err["error"]["type"] == "server_error"
    assert "retry" in err["error"]["message"]


def test_a_cut_stream_ends_with_an_in_band_error_event():
    async def dies_mid_stream(scope, receive, send):
        await send(start(200, b"text/event-stream"))
        await send(body(b'data: {"choices": []}\n\n', more=True))

    sent = run_asgi(ProxyErrors(dies_mid_stream))
    assert [m.get("more_body") for m in sent[1:]] == [True, False]
    last = sent[-1]["body"].decode()
    assert last.startswith("data: ") and last.endswith("\n\n") and "[DONE]" not in last
    assert json.loads(last[len("data: "):])["error"]["code"] == "replica_unavailable"


def test_a_cut_json_body_stays_cut():
    """Completing a truncated JSON body would hand the client a broken answer as a whole one."""
    async def dies_mid_body(scope, receive, send):
        await send(start(200, b"application/json"))
        await send(body(b'{"id": ', more=True))

    sent = run_asgi(ProxyErrors(dies_mid_body))
    assert len(sent) == 2 and sent[-1]["more_body"] is True


@pytest.mark.parametrize("status,code", [(429, "queue_full"), (503, "service_unavailable"), (408, "request_timeout")])
def test_ray_text_errors_become_json_with_their_status_and_retry_after(status, code):
    async def rays_text_error(scope, receive, send):
        await send(start(status, b"text/plain; charset=utf-8", ((b"retry-after", b"3"),)))
        await send(body(b"Request dropped due to backpressure"))

    got, headers, err = json_answer(run_asgi(ProxyErrors(rays_text_error)))
    assert got == status and headers["retry-after"] == "3"
    assert err["error"]["code"] == code and err["error"]["message"] == "Request dropped due to backpressure"


def test_answers_that_are_already_right_pass_unchanged():
    messages = [start(200, b"text/event-stream"), body(b"data: [DONE]\n\n")]

    async def streams(scope, receive, send):
        for m in messages:
            await send(m)

    async def json_error(scope, receive, send):
        await send(start(429, b"application/json", ((b"retry-after", b"1"),)))
        await send(body(b'{"error": {"code": "queue_full"}}'))

    assert run_asgi(ProxyErrors(streams)) == messages
    sent = run_asgi(ProxyErrors(json_error))
    assert sent[0]["status"] == 429 and json.loads(sent[1]["body"])["error"]["code"] == "queue_full"


def test_max_connections_answers_json_503_beyond_the_limit():
    async def scenario():
        release, inside = asyncio.Event(), asyncio.Event()

        async def holds(scope, receive, send):
            inside.set()
            await release.wait()
            await send(start(200, b"application/json"))
            await send(body(b"{}"))

        guard = ProxyErrors(holds, max_connections=1)
        first, second = [], []

        async def collect(into):
            async def send(m):
                into.append(m)
            await guard({"type": "http", "path": "/v1/models"}, None, send)

        task = asyncio.ensure_future(collect(first))
        await inside.wait()
        await collect(second)           # answered at once, while the first is held
        release.set()
        await task
        return first, second

    first, second = asyncio.run(scenario())
    assert first[0]["status"] == 200
    status, headers, err = json_answer(second)
    assert status == 503 and err["error"]["code"] == "too_many_connections" and headers["retry-after"] == "1"


def test_proxy_env_names_the_callback_and_the_limit(monkeypatch):
    assert proxy_env(7) == {CALLBACK_ENV: CALLBACK, MAX_CONNECTIONS_ENV: "7"}
    monkeypatch.setenv(MAX_CONNECTIONS_ENV, "7")
    [mw] = middlewares()        # what Ray's proxy calls, from the import path in CALLBACK
    assert mw.cls is ProxyErrors and mw.kwargs == {"max_connections": 7}
    module, _, name = CALLBACK.partition(":")
    assert getattr(importlib.import_module(module), name) is middlewares


# ------------------------------------------------------------------------ the command's checks
def serve(capsys, *flags) -> tuple:
    code = cli.main(["serve", "--model", "smollm2-135m", *flags])
    return code, capsys.readouterr().err


def test_ray_address_needs_replicas(capsys):
    code, err = serve(capsys, "--ray-address", "auto")
    assert code == 2 and "--ray-address needs --replicas" in err


@pytest.mark.parametrize("bad", ["0", "-1", "two"])
def test_replicas_must_be_a_positive_integer(capsys, bad):
    with pytest.raises(SystemExit) as e:
        cli.main(["serve", "--replicas", bad])
    assert e.value.code == 2 and "--replicas" in capsys.readouterr().err


def test_missing_ray_names_the_extra(capsys, monkeypatch):
    import specexec_rt.serving

    monkeypatch.setitem(sys.modules, "ray", None)          # import ray -> ImportError
    monkeypatch.delitem(sys.modules, "specexec_rt.serving.ray_serve", raising=False)
    monkeypatch.delattr(specexec_rt.serving, "ray_serve", raising=False)     # imported by an earlier test
    code, err = serve(capsys, "--replicas", "2")
    assert code == 2
    assert "pip install 'specexec-rt[ray]'" in err and "Traceback" not in err


ray_installed = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                                   reason="the 'ray' extra is not installed (scripts/setup.sh installs it)")


@ray_installed
def test_device_with_an_index_is_refused_before_ray_starts(capsys):
    code, err = serve(capsys, "--replicas", "2", "--device", "cuda:1", "--method", "autoregressive")
    assert code == 2 and "--device" in err


@ray_installed
def test_a_port_in_use_fails_before_ray_starts(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        code, err = serve(capsys, "--replicas", "2", "--device", "cpu", "--port", str(taken.getsockname()[1]))
    assert code == 2 and "cannot listen there" in err


# ------------------------------------------------------------------------ build_app
@ray_installed
def test_build_app_checks_its_arguments_like_the_flags():
    from specexec_rt.serving.ray_serve import build_app

    with pytest.raises(UsageError, match="--max-len: must be a positive integer"):
        build_app(max_len=0)
    with pytest.raises(UsageError, match="needs a draft model"):
        build_app(method="specexec")
    with pytest.raises(UsageError, match="replicas must be a positive integer"):
        build_app(replicas=0)
    with pytest.raises(UsageError, match="not both"):
        build_app(replicas=2, autoscaling_config={"max_replicas": 2})
    with pytest.raises(UsageError, match="api_key is empty"):
        build_app(api_key=" ")
    with pytest.raises(UsageError, match="autoscaling"):
        build_app(autoscaling_config={"min_replicas": "some"})
    with pytest.raises(TypeError, match="max_lenght"):
        build_app(max_lenght=256)


@ray_installed
def test_build_app_sizes_the_replicas():
    from specexec_rt.serving.ray_serve import CONTROL_HEADROOM, app, build_app

    deployment = build_app(replicas=2, max_batch=4, max_queue=3, device="cpu")._bound_deployment
    assert deployment.num_replicas == 2 and deployment.ray_actor_options == {"num_cpus": 1}
    assert deployment.max_ongoing_requests == 4 + 3 + CONTROL_HEADROOM   # the replica answers its own 429s
    [settings] = build_app(device="cpu", served_model_name="m", max_len=256)._bound_deployment.init_args
    assert settings.model_name == "m" and not settings.gpu and settings.engine_args["max_len"] == 256

    # `serve run specexec_rt.serving.ray_serve:app key=value ...`: strings, read as the flags are
    scaled = app({"model": "smollm2-135m", "max-len": "256", "device": "cpu",
                  "autoscaling_config": '{"min_replicas": 1, "max_replicas": 3}'})._bound_deployment
    assert scaled._deployment_config.autoscaling_config.max_replicas == 3
    with pytest.raises(UsageError, match="replicas: must be a positive integer"):
        app({"replicas": "none"})
