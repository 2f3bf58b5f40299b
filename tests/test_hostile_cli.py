"""Hostile input at the ``specexec-rt`` command line: never a traceback, every bad argument named
before any model loads, the right exit code (2 known error, 1 unexpected, 130 Ctrl-C), a draft
with a shorter context usable, and a normal run afterwards printing what a fresh engine gives.

Covered: seeds; ``--draft`` loaded with the target's ``max_len``; tracebacks and errors after
loading; sampling values the API refuses (stop strings and prompts with undecodable bytes too);
empty ``--model``/``--draft``; ``serve``'s own flags.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import transformers

from hf_models import make_hf_model
from specexec_rt import load_model
from specexec_rt.serving import cli
from specexec_rt.speculative.engine import Engine
from tiny_tokenizer import tiny_tokenizer

PROMPT = "w5 w6 w7"


def _save_tokenizer_and_context(directory, context: int) -> None:
    tiny_tokenizer(96).save_pretrained(str(directory))
    cfg = json.loads((directory / "config.json").read_text())
    cfg["max_position_embeddings"] = context
    (directory / "config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """target (context 256), a draft with a shorter context (64), a draft with another vocabulary."""
    root = tmp_path_factory.mktemp("cli")
    target, short, other = root / "target", root / "short_draft", root / "other_vocab"
    make_hf_model("llama", target, seed=0)
    _save_tokenizer_and_context(target, 256)
    make_hf_model("llama", short, seed=1)
    _save_tokenizer_and_context(short, 64)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(str(other))
    tiny_tokenizer(64).save_pretrained(str(other))
    return {"target": str(target), "short": str(short), "other": str(other)}


@pytest.fixture
def no_loading(monkeypatch):
    """Records any model load: the pre-load checks must fail before one."""
    from specexec_rt import loading

    calls = []
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: calls.append(a) or pytest.fail("a model loaded"))
    return calls


def run_main(argv, capsys) -> tuple[int, str, str]:
    try:
        rc = cli.main(argv)
    except SystemExit as e:         # argparse's own errors: a usage line, exit 2
        rc = e.code
    out = capsys.readouterr()
    assert "Traceback" not in out.err, out.err
    return rc, out.out, out.err


def greedy_words(directory, n: int, prompt=PROMPT) -> str:
    engine = Engine(load_model(directory, device="cpu"), None, method="autoregressive", tokenizer=tiny_tokenizer(96))
    return engine.generate(prompt, max_new_tokens=n).text


GEN = ["generate", "--model", "TARGET", "--prompt", PROMPT, "--raw"]

BEFORE_LOADING = [
    # (extra flags, text the error must contain)
    (["--device", "tpu"], "--device"),
    (["--device", "banana:3"], "--device"),
    (["--device", "cuda:99"], "--device"),
    (["--method", "specexec"], "--draft"),
    (["--method", "chain", "--k", "3"], "--draft"),
    (["--method", "autoregressive", "--draft", "default"], "--draft"),
    (["--draft", "default", "--method", "chain", "--budget", "auto"], "--budget auto"),
    (["--budget", "8"], "--budget"),
    (["--draft", "default", "--k", "4"], "--k"),
    (["--draft", "default", "--method", "chain", "--max-depth", "4"], "--max-depth"),
    (["--temperature", "inf"], "--temperature"),
    (["--temperature", "nan"], "--temperature"),
    (["--temperature", "-0.5"], "--temperature"),
    (["--temperature", "1e-9"], "--temperature"),
    (["--top-p", "0"], "--top-p"),
    (["--top-p", "1.5"], "--top-p"),
    (["--top-k", "-1"], "--top-k"),
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2**64)], "--seed"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--stop", ""], "--stop"),
    (["--stop", "w9 \udcff"], "--stop"),          # undecodable bytes on a command line arrive as surrogates
    (["--prompt", "w5 \udcff"], "--prompt"),
    (["--model", ""], "--model is empty"),       # not the current directory
    (["--model", "  "], "--model is empty"),
    (["--draft", ""], "--draft is empty"),
    (["--prompt", ""], "--prompt"),
    (["--draft", "/nonexistent/draft"], "not found"),       # the draft source fails before the target loads
    (["--draft", "int4:33"], "--draft"),                      # a built-in draft's group size, checked first
    (["--draft", "int4:sixty"], "--draft"),
    (["--draft", "ngram", "--method", "chain"], "--method specexec"),   # the lookup grows SpecExec trees
    (["--ngram"], "--draft ngram"),                                     # lookup candidates need a draft's trees
    (["--draft", "default", "--method", "chain", "--ngram"], "--ngram"),
]


@pytest.mark.parametrize("extra,named", BEFORE_LOADING, ids=[" ".join(e) for e, _ in BEFORE_LOADING])
def test_bad_arguments_fail_before_loading(dirs, no_loading, capsys, extra, named):
    argv = [a.replace("TARGET", dirs["target"]) for a in GEN] + extra
    rc, out, err = run_main(argv, capsys)
    assert rc == 2, err
    assert err.startswith("specexec-rt: error:") and len(err.strip().splitlines()) == 1, err
    assert named in err
    assert not no_loading


ARGPARSE_ERRORS = [
    (["--max-len", "0"], "--max-len"),
    (["--max-len", "-5"], "--max-len"),
    (["--max-len", "64.5"], "--max-len"),
    (["--seed", "1.5"], "--seed"),
    (["--budget", "0"], "--budget"),
    (["--k", "0"], "--k"),
    (["--gpu-memory-gb", "nan"], "--gpu-memory-gb"),
    (["--temperature", "hot"], "--temperature"),
    (["--kv-dtype", "fp8"], "--kv-dtype"),
    (["--kv-dtype", ""], "--kv-dtype"),
]


@pytest.mark.parametrize("extra,named", ARGPARSE_ERRORS, ids=[" ".join(e) for e, _ in ARGPARSE_ERRORS])
def test_malformed_flag_values(dirs, no_loading, capsys, extra, named):
    rc, out, err = run_main([a.replace("TARGET", dirs["target"]) for a in GEN] + extra, capsys)
    assert rc == 2 and named in err and "usage:" in err
    assert not no_loading


@pytest.mark.parametrize("extra,named", [(["--port", "70000"], "--port"), (["--port", "-1"], "--port"),
                                         (["--max-queue", "-1"], "--max-queue"), (["--api-key", " "], "--api-key"),
                                         (["--device", "cuda:99"], "--device"), (["--model", ""], "--model"),
                                         (["--host", ""], "--host"), (["--served-model-name", " "], "--served-model"),
                                         (["--max-client-connections", "-1"], "--max-client-connections")])
def test_bad_serve_arguments(dirs, no_loading, capsys, extra, named):
    rc, out, err = run_main(["serve", "--model", dirs["target"], "--port", "0"] + extra, capsys)
    assert rc == 2 and named in err
    assert not no_loading


def test_port_in_use_fails_before_loading(dirs, no_loading, capsys):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        port = busy.getsockname()[1]
        rc, out, err = run_main(["serve", "--model", dirs["target"], "--port", str(port)], capsys)
    finally:
        busy.close()
    assert rc == 2 and f"--port {port}" in err and "in use" in err
    assert not no_loading


def test_max_len_beyond_the_context_is_named(dirs, capsys):
    rc, out, err = run_main([a.replace("TARGET", dirs["target"]) for a in GEN] + ["--max-len", "100000"], capsys)
    assert rc == 2 and "--max-len" in err and "256" in err


def test_kv_dtype_and_offload_kv_flags_keep_the_targets_text(dirs, capsys):
    """--kv-dtype int8 with the target's KV streamed from host memory (--offload-kv) and a draft:
    the text is the greedy text of a target with that cache."""
    base = [a.replace("TARGET", dirs["target"]) for a in GEN] + ["--max-new-tokens", "10", "--device", "cpu"]
    rc, out, err = run_main(base + ["--kv-dtype", "int8", "--offload-kv", "--draft", "default", "--budget", "4"], capsys)
    assert rc == 0, err
    engine = Engine(load_model(dirs["target"], device="cpu", kv_dtype="int8"), None, method="autoregressive",
                    tokenizer=tiny_tokenizer(96))
    assert out.strip() == engine.generate(PROMPT, max_new_tokens=10).text.strip()


def test_draft_with_a_shorter_context(dirs, capsys):
    """The draft (context 64) loads next to a target with max_len 200: its cache gets its own 64
    slots, the output is the target's, and a request the draft cannot hold is a named error."""
    base = [a.replace("TARGET", dirs["target"]) for a in GEN] + ["--draft", dirs["short"], "--max-len", "200",
                                                                 "--budget", "4", "--device", "cpu"]
    rc, out, err = run_main(base + ["--max-new-tokens", "12"], capsys)
    assert rc == 0, err
    assert out.strip() == greedy_words(dirs["target"], 12)
    rc, out, err = run_main(base + ["--max-new-tokens", "70"], capsys)
    assert rc == 2 and "draft's KV cache (max_len=64)" in err


def test_draft_with_another_vocabulary(dirs, capsys):
    rc, out, err = run_main([a.replace("TARGET", dirs["target"]) for a in GEN]
                            + ["--draft", dirs["other"], "--device", "cpu"], capsys)
    assert rc == 2 and "vocabulary" in err and "64" in err and "96" in err


def test_unexpected_errors_and_interrupts(dirs, capsys, monkeypatch):
    def boom(args):
        raise RuntimeError("kaput")

    monkeypatch.setattr(cli, "build_engine", boom)
    argv = [a.replace("TARGET", dirs["target"]) for a in GEN] + ["--device", "cpu"]
    rc, out, err = run_main(argv, capsys)
    assert rc == 1 and "internal error: RuntimeError: kaput" in err and "SPECEXEC_DEBUG=1" in err
    monkeypatch.setenv("SPECEXEC_DEBUG", "1")
    assert cli.main(argv) == 1
    assert "Traceback" in capsys.readouterr().err        # asked for: shown
    monkeypatch.delenv("SPECEXEC_DEBUG")

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_engine", interrupted)
    rc, out, err = run_main(argv, capsys)
    assert rc == 130 and "interrupted" in err


def test_normal_run_after_bad_ones(dirs, capsys):
    """After all of the above in this process, a normal run prints the target's greedy text."""
    for extra in (["--seed", "-1"], ["--temperature", "inf"], ["--device", "tpu"]):
        run_main([a.replace("TARGET", dirs["target"]) for a in GEN] + extra, capsys)
    rc, out, err = run_main([a.replace("TARGET", dirs["target"]) for a in GEN]
                            + ["--device", "cpu", "--max-new-tokens", "9", "--draft", "default", "--budget", "4"],
                            capsys)
    assert rc == 0, err
    assert out.strip() == greedy_words(dirs["target"], 9)
    # A named int4 draft at another group size serves the same exact text.
    rc, out, err = run_main([a.replace("TARGET", dirs["target"]) for a in GEN]
                            + ["--device", "cpu", "--max-new-tokens", "9", "--draft", "int4:32", "--method", "chain",
                               "--k", "3"], capsys)
    assert rc == 0, err
    assert "draft int4:32" in err and out.strip() == greedy_words(dirs["target"], 9)
    # Prompt lookup alone, and merged into the default draft's trees: the same exact text.
    for extra in (["--draft", "ngram"], ["--draft", "default", "--ngram", "--budget", "8"]):
        rc, out, err = run_main([a.replace("TARGET", dirs["target"]) for a in GEN]
                                + ["--device", "cpu", "--max-new-tokens", "9", *extra], capsys)
        assert rc == 0, err
        assert "method=specexec" in err and out.strip() == greedy_words(dirs["target"], 9)


# ------------------------------------------------------------------ whole processes
def _cli(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "specexec_rt.serving.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_process_exit_codes(dirs):
    """As a process: a known error exits 2 with one line, no traceback, before loading."""
    p = _cli("generate", "--model", dirs["target"], "--prompt", "x", "--device", "cuda:7")
    out, err = p.communicate(timeout=300)
    assert p.returncode == 2 and "Traceback" not in err and "--device" in err and "loaded" not in err


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 0)])
def test_serve_stops_on_signals(dirs, sig, code):
    """Ctrl-C exits 130 and SIGTERM 0, each after a graceful stop, without a traceback."""
    p = _cli("serve", "--model", dirs["target"], "--port", "0", "--device", "cpu")
    try:
        deadline = time.monotonic() + 300
        line = ""
        while "serving" not in line:
            assert time.monotonic() < deadline
            line = p.stderr.readline()
            assert line, "the server exited before serving"
        p.send_signal(sig)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == code, err
    assert "Traceback" not in err and "stopped" in err


def test_closed_stdout_pipe(dirs):
    """`specexec-rt generate ... | head -c1`: no BrokenPipeError traceback."""
    r, w = os.pipe()
    p = subprocess.Popen([sys.executable, "-m", "specexec_rt.serving.cli", "generate", "--model", dirs["target"],
                          "--prompt", PROMPT, "--raw", "--device", "cpu", "--max-new-tokens", "200"],
                         stdout=w, stderr=subprocess.PIPE, text=True)
    os.close(w)
    os.read(r, 1)
    os.close(r)                 # the reader leaves after one byte
    err = p.communicate(timeout=300)[1]
    assert "Traceback" not in err and p.returncode in (0, 141), err


def test_serve_connection_flags():
    """``--max-client-connections`` sets both per-address caps; 0 turns them off (a reverse proxy
    in front applies its own)."""
    from specexec_rt.serving import cli_checks
    from specexec_rt.serving.client_limits import DEFAULT_MAX_CLIENT_PENDING_HEADS

    def limits(*flags):
        return cli_checks.check_serve_args(cli.build_parser().parse_args(["serve", *flags]))

    default = limits()
    assert default["max_connections"] is None          # the server's default, fitted to ulimit -n
    assert default["max_client_pending_heads"] == DEFAULT_MAX_CLIENT_PENDING_HEADS
    assert limits("--max-client-connections", "8") == {"max_connections": None, "max_client_connections": 8,
                                                       "max_client_pending_heads": 8}
    assert limits("--max-client-connections", "0", "--max-connections", "5") == {
        "max_connections": 5, "max_client_connections": None, "max_client_pending_heads": None}
