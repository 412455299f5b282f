"""Reasoning programs over HTTP with the real openai client: the extension field `program` on
/v1/dynasor/{completions,chat/completions}, its outcome under `dynasor`, and clear 400s for bad programs."""

from __future__ import annotations

import openai
import pytest
from dynasor_helpers import PROBE_INTERVAL, PROMPTS, scripted_engine, scripted_model

from glassbox.inference.server import running_server

MODEL = "scripted"


@pytest.fixture(scope="module")
def client(tokenizer_json):
    model, model_dir = scripted_model(tokenizer_json)
    engine = scripted_engine(model, model_dir, max_n=8)
    with running_server(engine, MODEL) as url:
        yield openai.OpenAI(base_url=f"{url}/v1/dynasor", api_key="none", max_retries=0), \
            openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0), engine


def test_self_consistency_through_the_openai_client(client):
    dynasor, _, engine = client
    resp = dynasor.completions.create(model=MODEL, prompt=PROMPTS["sure"], n=6, max_tokens=64, temperature=0.5,
                                      seed=7, extra_body={"program": {"type": "self_consistency"}})
    out = resp.model_extra["dynasor"]
    assert (out["answer"], out["finish_reason"], out["num_samples"]) == ("42", "certain", 2)
    assert len(resp.choices) == 2 and all(c.text.endswith("\\boxed{42}") for c in resp.choices)
    assert resp.usage.completion_tokens == out["output_tokens"]
    assert engine.blocks.num_used_blocks == 0


def test_chain_of_thought_with_probes_through_the_openai_client(client):
    dynasor, _, _ = client
    program = {"type": "cot", "probe_interval": PROBE_INTERVAL, "probe_temperature": 0.0}
    resp = dynasor.completions.create(model=MODEL, prompt=PROMPTS["sure"], max_tokens=64,
                                      extra_body={"program": program})
    out = resp.model_extra["dynasor"]
    assert (out["answer"], out["finish_reason"], out["num_probes"]) == ("42", "probes_agree", 2)
    assert resp.usage.completion_tokens == out["output_tokens"] + out["probe_tokens"]


def test_chat_endpoint_runs_a_program(client):
    dynasor, _, _ = client
    resp = dynasor.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                           extra_body={"program": {"type": "cot", "probes": False}})
    out = resp.model_extra["dynasor"]
    assert out["program"] == "cot" and out["finish_reason"] == "completed" and out["num_probes"] == 0
    assert resp.choices[0].message.role == "assistant"


@pytest.mark.parametrize("kwargs,param,words", [
    ({"n": 9, "extra_body": {"program": {"type": "self_consistency"}}}, "n", "max_samples"),
    ({"extra_body": {"program": {"type": "self_consistency", "max_samples": 20}}}, "program.max_samples", "[1, 8]"),
    ({"extra_body": {"program": {"type": "tree_search"}}}, "program.type", "unknown program type"),
    ({"extra_body": {"program": {"type": "cot", "probe_windw": 2}}}, "program.probe_windw", "Extra inputs"),
    ({"extra_body": {"program": {"type": "cot", "probe_window": 0}}}, "program.probe_window", "probe_window"),
    ({"extra_body": {"program": {"type": "cot"}}, "stream": True}, "stream", "streaming is not supported"),
    ({"extra_body": {}}, "program", "required"),
])
def test_bad_programs_get_a_400_naming_the_field(client, kwargs, param, words):
    dynasor, _, engine = client
    with pytest.raises(openai.BadRequestError) as e:
        dynasor.completions.create(model=MODEL, prompt=PROMPTS["sure"], max_tokens=8, **kwargs)
    assert e.value.status_code == 400
    assert e.value.body["param"] == param, e.value.body
    assert words in e.value.body["message"]
    assert not engine.requests


def test_plain_requests_beside_the_programs_are_served_as_before(client):
    _, plain, _ = client
    resp = plain.completions.create(model=MODEL, prompt=PROMPTS["alt"], max_tokens=64, temperature=0)
    assert resp.choices[0].text.endswith("\\boxed{7}")
    assert "dynasor" not in (resp.model_extra or {})
