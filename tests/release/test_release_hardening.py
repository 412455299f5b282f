"""`glassbox release build|push` against bad input and a Hub that cannot be reached or says no (issue 21).

No test here needs the network: the "no network" push points HF_ENDPOINT at a closed local port, and the HTTP
refusals come from a local server that answers every request with one status code.
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading

import pytest

from glassbox.cli import main

SECRET = "hf_glassboxTestTokenNeverPrinted0123456789"
REPO = "glassbox-test/tiny"


@pytest.mark.parametrize("option,value,message", [
    ("--repo-id", "../x", "The name cannot start or end with '-' or '.'"),
    ("--repo-id", "org/x..y", "Cannot have -- or .. in repo_id"),
    ("--repo-id", "org/../x", "Repo id must be in the form"),
    ("--repo-id", "x", "expected ORG/NAME"),
    ("--repo-id", "org/-x", "Repo id must use alphanumeric chars"),
    ("--repo-id", "org/a b", "Repo id must use alphanumeric chars"),
    ("--repo-id", "org/x.git", "cannot end by '.git'"),
    ("--repo-id", "org/" + "x" * 97, "the maximum length is 96"),
    ("--dataset-repo-id", "../data", "The name cannot start or end with '-' or '.'"),
    ("--dataset-repo-id", "data", "expected ORG/NAME"),
])
def test_build_refuses_a_repo_id_the_hub_would_refuse(tiny_run, tmp_path, capsys, option, value, message):
    out = tmp_path / "release"
    argv = ["release", "build", "--run", str(tiny_run), "--out", str(out), "--repo-id", REPO, option, value]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"glassbox: error: {option} {value!r}: ") and message in err, err
    assert len(err.splitlines()) == 1
    assert not out.exists()


def test_build_refuses_a_repo_id_too_long_for_its_default_dataset_repo(tiny_run, tmp_path, capsys):
    repo_id = "org/" + "x" * 92       # a valid name (96 characters at most); "-data" makes the dataset's 97
    assert main(["release", "build", "--run", str(tiny_run), "--out", str(tmp_path / "r"), "--repo-id", repo_id]) == 2
    err = capsys.readouterr().err
    assert f"--dataset-repo-id {repo_id + '-data'!r} (the default, from --repo-id)" in err
    assert "the maximum length is 96" in err


def test_build_names_the_run_directory_when_the_default_repo_id_is_invalid(tiny_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "my run"
    shutil.copytree(tiny_run, run, symlinks=True)
    assert main(["release", "build", "--run", str(run), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "--repo-id 'glassbox/my run' (the default, from the run directory's name)" in err


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_push_without_network_is_one_clear_line(built_release, tmp_path):
    port = _closed_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_TOKEN=SECRET, HF_HOME=str(tmp_path / "hf"))
    proc = subprocess.run([sys.executable, "-m", "glassbox.cli", "release", "push", "--release", str(built_release),
                           "--repo-id", REPO], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert SECRET not in proc.stdout + proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"glassbox: error: release push: create repo model {REPO} (operation 1 of 11) failed: "
                           f"cannot reach http://127.0.0.1:{port} "), last
    assert "check the network" in last and "HF_HUB_OFFLINE" not in last and "--dry-run" in last


class _Refusing(http.server.BaseHTTPRequestHandler):
    status = 500

    def _answer(self):
        body = json.dumps({"error": "refused by the test server"}).encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_HEAD = _answer

    def log_message(self, *args):
        pass


@pytest.fixture
def hub_answering(monkeypatch):
    """Start a local 'Hub' answering every request with the status code given; returns its endpoint."""
    import huggingface_hub.constants as constants

    servers = []

    def start(status: int) -> str:
        handler = type("Handler", (_Refusing,), {"status": status})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        return endpoint

    monkeypatch.setenv("HF_TOKEN", SECRET)
    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("status,hint", [
    (401, "the Hub rejected the token (HTTP 401): check HF_TOKEN or run `hf auth login`"),
    (403, "the token may not write to glassbox-test/tiny (HTTP 403): use a token with write access to "
          "glassbox-test"),
    (404, "not found (HTTP 404): check the repo id and that the token can see it"),
    (500, "the Hub answered HTTP 500"),
])
def test_push_refused_by_the_hub_is_one_clear_line(built_release, hub_answering, capsys, status, hint):
    endpoint = hub_answering(status)
    assert main(["release", "push", "--release", str(built_release), "--repo-id", REPO]) == 2
    captured = capsys.readouterr()
    assert SECRET not in captured.out + captured.err
    last = captured.err.strip().splitlines()[-1]
    assert last.startswith(f"glassbox: error: release push: create repo model {REPO} (operation 1 of 11) failed: "
                           f"{endpoint}: "), last
    assert hint in last, last


def test_push_in_offline_mode_says_so(built_release, monkeypatch, capsys):
    import huggingface_hub.constants as constants

    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert main(["release", "push", "--release", str(built_release), "--repo-id", REPO]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "(operation 1 of 11) failed: offline mode is on (HF_HUB_OFFLINE): unset HF_HUB_OFFLINE to push" in last


def test_push_refuses_an_invalid_repo_id_before_any_hub_call(built_release, capsys):
    assert main(["release", "push", "--release", str(built_release), "--repo-id", "../x", "--dry-run"]) == 2
    assert capsys.readouterr().err.startswith("glassbox: error: --repo-id '../x': Repo id must use alphanumeric")
