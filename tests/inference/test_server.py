"""The OpenAI-compatible server, live on 127.0.0.1, exercised with the real `openai` client and raw HTTP."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time

import httpx
import openai
import pytest

from glassbox.inference.engine import EngineConfig, LLMEngine
from glassbox.inference.llm import LLM
from glassbox.inference.sampling_params import SamplingParams
from glassbox.inference.server import running_server

KEY = "test-key"
MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def server(llama_dir):
    engine = LLMEngine.from_model_dir(llama_dir, EngineConfig(num_kv_blocks=600, max_num_seqs=64))
    with running_server(engine, MODEL, api_key=KEY) as base:
        yield base


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def offline(llama_dir):
    return LLM(llama_dir)


def _metric(base: str, name: str) -> float:
    text = httpx.get(f"{base}/metrics").text
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, f"{name} missing from /metrics"
    return float(m.group(1))


def _wait_idle(base: str, timeout: float = 20) -> None:
    deadline = time.time() + timeout
    while _metric(base, "glassbox_kv_cache_blocks_used") != 0 or _metric(base, "glassbox_num_requests_running"):
        assert time.time() < deadline, "KV blocks were not freed"
        time.sleep(0.05)


def test_health_models_metrics(server, client):
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    text = httpx.get(f"{server}/metrics").text
    for name in ("glassbox_requests_total", "glassbox_time_to_first_token_seconds_bucket",
                 "glassbox_time_per_output_token_seconds_count", "glassbox_num_requests_waiting",
                 "glassbox_kv_cache_blocks_used", "glassbox_kv_cache_blocks_total"):
        assert name in text


def test_completion_matches_offline_greedy(client, offline, prompts):
    resp = client.completions.create(model=MODEL, prompt=prompts[0], max_tokens=12, temperature=0)
    ref = offline.generate(prompts[0], SamplingParams(temperature=0, max_tokens=12))[0]
    assert resp.choices[0].text == ref.outputs[0].text
    assert resp.choices[0].finish_reason == ref.outputs[0].finish_reason
    assert resp.usage.prompt_tokens == len(offline.tokenizer.encode(prompts[0]))
    assert resp.usage.completion_tokens == len(ref.outputs[0].token_ids)


def test_penalties_reach_the_engine(client, offline, prompts):
    # OpenAI's penalties, and the repetition penalty as an extra field, reach the engine unchanged.
    kw = dict(presence_penalty=0.5, frequency_penalty=1.5)
    resp = client.completions.create(model=MODEL, prompt=prompts[5], max_tokens=16, temperature=0,
                                     extra_body={"repetition_penalty": 1.3}, **kw)
    ref = offline.generate(prompts[5], SamplingParams(temperature=0, max_tokens=16, repetition_penalty=1.3, **kw))
    plain = offline.generate(prompts[5], SamplingParams(temperature=0, max_tokens=16))
    assert resp.choices[0].text == ref[0].outputs[0].text != plain[0].outputs[0].text


def test_batch_of_prompts_and_token_prompts(client, offline, prompts):
    ids = offline.tokenizer.encode(prompts[2])
    resp = client.completions.create(model=MODEL, prompt=[prompts[1], prompts[2]], max_tokens=6, temperature=0)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    assert [c.index for c in resp.choices] == [0, 1]
    assert resp.choices[1].text == by_ids.choices[0].text


def test_chat_uses_template(client, offline):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "def f():"}]
    resp = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    rendered = offline.tokenizer.apply_chat_template(messages)
    assert rendered == "system: be brief\nuser: def f():\nassistant:"
    ref = offline.generate(rendered, SamplingParams(temperature=0, max_tokens=10))[0].outputs[0]
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == ref.text
    assert resp.usage.prompt_tokens == len(offline.tokenizer.encode(rendered))


def test_streaming_completion_equals_whole(client, prompts):
    whole = client.completions.create(model=MODEL, prompt=prompts[3], max_tokens=20, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt=prompts[3], max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_streaming_chat(client):
    messages = [{"role": "user", "content": "import os"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=15, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=15, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_n_samples_with_seed_reproduce(client, prompts):
    kw = dict(model=MODEL, prompt=prompts[4], max_tokens=10, temperature=1.0, top_p=0.95, n=3, seed=7)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    texts = [c.text for c in sorted(a.choices, key=lambda c: c.index)]
    assert texts == [c.text for c in sorted(b.choices, key=lambda c: c.index)]
    assert len(set(texts)) > 1, "three samples at temperature 1 should not all agree"
    streamed = list(client.completions.create(**kw, stream=True))
    joined = {i: "".join(c.choices[0].text for c in streamed if c.choices and c.choices[0].index == i)
              for i in range(3)}
    assert [joined[i] for i in range(3)] == texts


def test_logprobs(client, prompts):
    resp = client.completions.create(model=MODEL, prompt=prompts[5], max_tokens=5, temperature=0, logprobs=3)
    lp = resp.choices[0].logprobs
    assert len(lp.token_logprobs) == resp.usage.completion_tokens
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and chosen <= 0
        assert chosen == pytest.approx(max(top.values()))     # greedy picks the most likely token
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and len(content[0].top_logprobs) == 2


def test_stop_string(client, prompts):
    full = client.completions.create(model=MODEL, prompt=prompts[6], max_tokens=24, temperature=0,
                                     extra_body={"ignore_eos": True})
    text = full.choices[0].text
    stop = text[6:9]
    assert len(stop) == 3
    resp = client.completions.create(model=MODEL, prompt=prompts[6], max_tokens=24, temperature=0, stop=[stop],
                                     extra_body={"ignore_eos": True})
    assert resp.choices[0].text == text[:text.find(stop)]
    assert resp.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(model=MODEL, prompt=prompts[6], max_tokens=24, temperature=0,
                                              stop=stop, stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in streamed) == resp.choices[0].text


@pytest.mark.parametrize("body, status, fragment", [
    ("{not json", 400, "not valid JSON"),
    (json.dumps({"model": MODEL, "prompt": "x", "max_tokens": "many"}), 400, "max_tokens"),
    (json.dumps({"model": MODEL, "prompt": 5}), 400, "prompt"),
    (json.dumps({"model": MODEL, "prompt": ""}), 400, "empty"),
    (json.dumps({"model": MODEL, "prompt": []}), 400, "empty"),
    (json.dumps({"model": MODEL, "prompt": [1, 2, 99999]}), 400, "vocabulary"),
    (json.dumps({"model": MODEL, "prompt": "x" * 3000}), 400, "context"),
    (json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 100000}), 400, "max_tokens"),
    (json.dumps({"model": MODEL, "prompt": "x", "temperature": -1}), 400, "temperature"),
    (json.dumps({"model": MODEL, "prompt": "x", "frequency_penalty": 2.5}), 400, "frequency_penalty"),
    (json.dumps({"model": MODEL, "prompt": "x", "best_of": 3}), 400, "best_of"),
    (json.dumps({"model": MODEL, "prompt": "x", "echo": True}), 400, "echo"),
    (json.dumps({"model": "gpt-4", "prompt": "x"}), 404, "does not exist"),
    (json.dumps({"prompt": "x"}), 400, "model"),
])
def test_bad_input_gets_openai_error(server, client, body, status, fragment):
    r = httpx.post(f"{server}/v1/completions", content=body,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert fragment in err["message"] and err["type"]
    # The server keeps serving.
    assert client.completions.create(model=MODEL, prompt="ok", max_tokens=2).choices[0].finish_reason


def test_bad_chat_input(server, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[], max_tokens=3)
    assert "messages" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])


def test_api_key_required(server):
    for key in ("wrong", None):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        r = httpx.post(f"{server}/v1/completions", json={"model": MODEL, "prompt": "x"}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    bad = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_64_concurrent_streams_free_all_blocks(server, prompts):
    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[str, str]:
        stream = await client.completions.create(model=MODEL, prompt=prompts[i % len(prompts)], max_tokens=16,
                                                 temperature=0.8, seed=i, stream=True)
        text, reason = "", None
        async for chunk in stream:
            text += chunk.choices[0].text
            reason = chunk.choices[0].finish_reason or reason
        return text, reason

    async def main() -> list[tuple[str, str]]:
        client = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)
        try:
            return await asyncio.gather(*(one(client, i) for i in range(64)))
        finally:
            await client.close()

    def completed() -> float:
        text = httpx.get(f"{server}/metrics").text
        pattern = r'^glassbox_requests_total\{finish_reason="(?:stop|length)"\} (\S+)$'
        return sum(float(v) for v in re.findall(pattern, text, re.M))

    before = completed()
    results = asyncio.run(main())
    assert len(results) == 64 and all(reason in ("stop", "length") for _, reason in results)
    _wait_idle(server)
    assert completed() - before == 64


def test_disconnect_aborts_and_frees_blocks(server, prompts):
    body = {"model": MODEL, "prompt": prompts[7], "max_tokens": 200, "ignore_eos": True, "stream": True}
    aborted = r'^glassbox_requests_total\{finish_reason="abort"\} (\S+)$'
    before = re.search(aborted, httpx.get(f"{server}/metrics").text, re.M)
    with httpx.stream("POST", f"{server}/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(3)]
        assert any(line.startswith("data: ") for line in got)
        assert _metric(server, "glassbox_kv_cache_blocks_used") > 0
    _wait_idle(server)
    after = re.search(aborted, httpx.get(f"{server}/metrics").text, re.M)
    assert after and float(after.group(1)) == (float(before.group(1)) if before else 0) + 1


def test_non_streaming_disconnect_aborts_and_frees_blocks(server, prompts):
    # 64 sequences of 200 tokens: over a second of work on the CPU. The client sends the request on a raw socket,
    # waits until the engine is running it, and hangs up without reading a byte.
    body = json.dumps({"model": MODEL, "prompt": prompts[4:8], "max_tokens": 200, "ignore_eos": True, "n": 16,
                       "temperature": 1}).encode()
    host, port = server.removeprefix("http://").split(":")
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    aborted = r'^glassbox_requests_total\{finish_reason="abort"\} (\S+)$'
    before = re.search(aborted, httpx.get(f"{server}/metrics").text, re.M)
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(head + body)
        deadline = time.time() + 10
        while not _metric(server, "glassbox_num_requests_running"):
            assert time.time() < deadline, "the request never started"
            time.sleep(0.01)
    _wait_idle(server)
    after = re.search(aborted, httpx.get(f"{server}/metrics").text, re.M)
    assert after and float(after.group(1)) == (float(before.group(1)) if before else 0) + 64
