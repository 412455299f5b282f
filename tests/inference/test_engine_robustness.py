"""One request cannot break the engine for the others: bad values are refused up front, a request that still fails
fails alone, the engine thread survives any exception and reports its health, priorities reach the scheduler."""

from __future__ import annotations

import asyncio
import math
import threading

import pytest
from infer_helpers import tiny_transformer

from glassbox.errors import GlassboxError
from glassbox.inference.async_engine import AsyncEngine
from glassbox.inference.engine import EngineConfig, LLMEngine, RequestOutput
from glassbox.inference.llm import LLM
from glassbox.inference.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=6)
WAIT_S = 20


@pytest.fixture(scope="module")
def model():
    return tiny_transformer()


async def _final(queue: asyncio.Queue) -> RequestOutput | Exception:
    """The first error or finished output on `queue`."""
    while True:
        item = await asyncio.wait_for(queue.get(), WAIT_S)
        if isinstance(item, Exception) or item.finished:
            return item


def _run_all(engine: LLMEngine) -> dict[str, RequestOutput]:
    outs = {}
    while engine.has_unfinished():
        for out in engine.step(unfinished_outputs=False):
            outs[out.request_id] = out
    return outs


# Sampling values ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [dict(seed=2**64), dict(seed=2**63), dict(seed=2**63 - 1, n=2), dict(seed=-1),
                                    dict(seed=1.5), dict(seed=True)])
def test_seed_outside_int64_is_refused(kwargs):
    with pytest.raises(GlassboxError, match="seed") as err:
        SamplingParams(temperature=1.0, **kwargs)
    assert isinstance(err.value, ValueError) and err.value.param == "seed"


def test_seed_at_the_int64_edge_is_served(model):
    params = SamplingParams(temperature=1.0, seed=2**63 - 3, n=3, max_tokens=4)
    out = LLM(engine=LLMEngine(model)).generate([[1, 2, 3]], params)[0]
    assert [o.finish_reason for o in out.outputs] == ["length"] * 3


@pytest.mark.parametrize("kwargs, field", [
    (dict(top_p=1e-50), "top_p"), (dict(top_p=1e-40), "top_p"), (dict(top_p=math.nan), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=10**30), "top_k"), (dict(top_k=2**31), "top_k"), (dict(top_k=1e30), "top_k"),
    (dict(top_k=2.0), "top_k"), (dict(top_k=-2), "top_k"),
    (dict(repetition_penalty=1e-40), "repetition_penalty"), (dict(repetition_penalty=1e-3), "repetition_penalty"),
    (dict(repetition_penalty=1e3), "repetition_penalty"), (dict(repetition_penalty=math.inf), "repetition_penalty"),
    (dict(repetition_penalty=math.nan), "repetition_penalty"),
    (dict(temperature=math.nan), "temperature"), (dict(temperature=math.inf), "temperature"),
    (dict(temperature="1"), "temperature"),
    (dict(presence_penalty=math.nan), "presence_penalty"), (dict(frequency_penalty=math.inf), "frequency_penalty"),
    (dict(stop=""), "stop"), (dict(stop=["end", ""]), "stop"), (dict(stop=[3]), "stop"),
    (dict(stop_token_ids=["a"]), "stop_token_ids"), (dict(stop_token_ids=[True]), "stop_token_ids"),
    (dict(n=2.0), "n"), (dict(n=0), "n"), (dict(max_tokens=1.5), "max_tokens"), (dict(logprobs=-1), "logprobs"),
    (dict(logprobs=1.0), "logprobs"), (dict(ignore_eos=1), "ignore_eos"),
])
def test_sampling_values_that_would_break_the_sampler_are_refused(kwargs, field):
    with pytest.raises(GlassboxError, match=rf"\b{field}\b") as err:
        SamplingParams(**kwargs)
    assert isinstance(err.value, ValueError) and err.value.param == field


def test_sampling_values_at_the_edges_are_served(model):
    edges = [dict(top_p=2.0**-126), dict(top_k=-1), dict(top_k=0), dict(top_k=2**31 - 1),
             dict(repetition_penalty=0.01), dict(repetition_penalty=100.0), dict(temperature=0.0),
             dict(temperature=1e6), dict(presence_penalty=-2, frequency_penalty=2)]
    params = [SamplingParams(temperature=kw.pop("temperature", 1.0), max_tokens=4, **kw) for kw in edges]
    outs = LLM(engine=LLMEngine(model)).generate([list(range(1, 30))] * len(params), params)
    assert all(o.outputs[0].finish_reason == "length" for o in outs)


# One failing request among others --------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [("top_p", 1e-50), ("repetition_penalty", 1e-40), ("top_k", 10**30)])
def test_a_request_that_fails_to_sample_fails_alone(model, field, value):
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=5, max_tokens=8, n=2)
    alone = LLM(engine=LLMEngine(model)).generate([[5, 6, 7], [1, 2, 3, 4]], [seeded, GREEDY])
    engine = LLMEngine(model)
    bad = SamplingParams(temperature=1.0, max_tokens=8)
    engine.add_request("good", [5, 6, 7], seeded)
    engine.add_request("bad", list(range(40)), bad)
    setattr(bad, field, value)        # past validation, as any value the checks missed would be
    engine.add_request("greedy", [1, 2, 3, 4], GREEDY)
    outs = _run_all(engine)
    assert isinstance(outs["bad"].error, Exception) and outs["bad"].finished
    assert [o.finish_reason for o in outs["bad"].outputs] == ["error"]
    assert [o.token_ids for o in outs["good"].outputs] == [o.token_ids for o in alone[0].outputs]
    assert outs["greedy"].outputs[0].token_ids == alone[1].outputs[0].token_ids
    assert outs["good"].error is None and outs["greedy"].error is None
    assert engine.stats()["num_failed_requests"] == 1 and engine.blocks.num_used_blocks == 0


def test_async_engine_fails_only_the_failing_request_and_counts_it(model):
    engine = LLMEngine(model)
    add_request = engine.add_request

    def add(request_id, prompt_ids, params, **kwargs):
        add_request(request_id, prompt_ids, params, **kwargs)
        if request_id == "bad":
            params.top_p = 1e-50      # past validation, as any value the checks missed would be

    engine.add_request = add

    async def main() -> tuple[object, object, str, dict]:
        ae = AsyncEngine(engine)
        ae.start()
        try:
            bad_q = ae.submit("bad", list(range(40)), SamplingParams(temperature=1.0, max_tokens=50, ignore_eos=True))
            good_q = ae.submit("good", [1, 2, 3], SamplingParams(temperature=0.8, max_tokens=50, ignore_eos=True))
            return await _final(bad_q), await _final(good_q), ae.metrics.render(), ae.health()
        finally:
            ae.shutdown()

    bad, good, metrics, health = asyncio.run(main())
    assert isinstance(bad, Exception)
    assert isinstance(good, RequestOutput) and good.outputs[0].finish_reason == "length"
    assert 'glassbox_requests_total{finish_reason="error"} 1' in metrics
    assert health["num_failed_requests"] == 1 and "probability" in health["last_error"]
    assert engine.blocks.num_used_blocks == 0


def _one_after_another(engine: LLMEngine) -> tuple[RequestOutput | Exception, RequestOutput | Exception, dict]:
    """Serve two requests, the second after the first has ended; their final items and the health after."""
    async def main() -> tuple[RequestOutput | Exception, RequestOutput | Exception, dict]:
        ae = AsyncEngine(engine)
        ae.start()
        try:
            first = await _final(ae.submit("first", [1, 2, 3], GREEDY))
            second = await _final(ae.submit("second", [1, 2, 3], GREEDY))
            return first, second, ae.health()
        finally:
            ae.shutdown()

    return asyncio.run(main())


def test_engine_thread_survives_any_exception_in_one_request(model):
    engine = LLMEngine(model)
    add_request = engine.add_request

    def add(request_id, *args, **kwargs):
        if request_id == "first":
            raise OverflowError("Overflow when unpacking long long")
        return add_request(request_id, *args, **kwargs)

    engine.add_request = add
    first, second, health = _one_after_another(engine)
    assert isinstance(first, OverflowError)
    assert isinstance(second, RequestOutput) and second.outputs[0].finish_reason == "length"
    assert health["alive"] and health["status"] == "ok" and "OverflowError" in health["last_error"]
    assert engine.stats()["num_failed_requests"] == 1


def test_a_failing_step_fails_its_requests_and_the_engine_serves_on(model):
    engine = LLMEngine(model)
    step = engine.step
    calls = []

    def failing_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("CUDA error: an illegal memory access")
        return step(*args, **kwargs)

    engine.step = failing_once
    first, second, health = _one_after_another(engine)
    assert isinstance(first, RuntimeError) and isinstance(second, RequestOutput)
    assert health["alive"] and "illegal memory access" in health["last_error"]
    assert engine.stats()["num_failed_requests"] == 1 and engine.blocks.num_used_blocks == 0


def test_health_reports_a_stalled_and_a_dead_engine(model):
    engine = LLMEngine(model)
    step = engine.step
    release = threading.Event()

    def slow_step(*args, **kwargs):
        release.wait(WAIT_S)
        return step(*args, **kwargs)

    async def main() -> None:
        ae = AsyncEngine(engine)
        ae.start()
        try:
            health = ae.health()
            assert health["status"] == "ok" and health["alive"] and health["last_error"] is None
            engine.step = slow_step
            queue = ae.submit("slow", [1, 2, 3], GREEDY)
            await asyncio.sleep(1.0)
            health = ae.health(stall_after_s=0.3)
            assert health["status"] == "stalled" and health["alive"] and health["last_step_age_s"] >= 0.3
            assert health["num_unfinished"] == 1
            release.set()
            assert isinstance(await _final(queue), RequestOutput)
            assert ae.health(stall_after_s=5)["status"] == "ok"
            # A request in flight when the engine thread ends gets an error instead of waiting forever.
            queue = ae.submit("long", [1, 2, 3], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))
            await asyncio.wait_for(queue.get(), WAIT_S)
        finally:
            ae.shutdown()
        left = await _final(queue)
        assert isinstance(left, Exception) and "engine" in str(left)
        health = ae.health()
        assert health["status"] == "dead" and not health["alive"]
        with pytest.raises(RuntimeError, match="engine"):
            ae.submit("late", [1, 2, 3], GREEDY)

    asyncio.run(main())


def test_submit_refuses_a_request_id_in_flight(model):
    async def main() -> None:
        ae = AsyncEngine(LLMEngine(model))
        ae.submit("same", [1, 2, 3], GREEDY)
        with pytest.raises(GlassboxError, match="same"):
            ae.submit("same", [4, 5, 6], GREEDY)

    asyncio.run(main())


# Priority -------------------------------------------------------------------------------------------------------

def test_priority_reaches_the_scheduler(model):
    engine = LLMEngine(model, config=EngineConfig(policy="priority", max_num_seqs=1))

    async def main() -> list[str]:
        ae = AsyncEngine(engine)
        queue: asyncio.Queue = asyncio.Queue()
        for rid, priority in (("c", 3), ("a", -1), ("b", 2.5)):
            ae.submit(rid, [1, 2, 3], GREEDY, queue, priority=priority)
        ae.start()
        order = []
        try:
            while len(order) < 3:
                item = await asyncio.wait_for(queue.get(), WAIT_S)
                assert isinstance(item, RequestOutput)
                if item.finished:
                    order.append(item.request_id)
        finally:
            ae.shutdown()
        with pytest.raises(GlassboxError, match="priority"):
            ae.submit("nan", [1, 2, 3], GREEDY, priority=math.nan)
        return order

    assert asyncio.run(main()) == ["a", "b", "c"]
    with pytest.raises(GlassboxError, match="priority"):
        engine.add_request("inf", [1, 2, 3], GREEDY, priority=math.inf)


# Engine settings ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, field", [
    (dict(block_size=0), "block_size"), (dict(block_size=1.5), "block_size"), (dict(num_kv_blocks=0), "num_kv_blocks"),
    (dict(gpu_memory_utilization=0), "gpu_memory_utilization"),
    (dict(gpu_memory_utilization=1.5), "gpu_memory_utilization"), (dict(cpu_kv_cache_gb=0), "cpu_kv_cache_gb"),
    (dict(cpu_kv_cache_gb=math.nan), "cpu_kv_cache_gb"), (dict(max_num_seqs=0), "max_num_seqs"),
    (dict(max_num_batched_tokens=0), "max_num_batched_tokens"), (dict(max_model_len=0), "max_model_len"),
    (dict(enable_prefix_caching="no"), "enable_prefix_caching"),
    (dict(enable_chunked_prefill=None), "enable_chunked_prefill"), (dict(policy="nope"), "policy"),
    (dict(proposer="nope"), "proposer"), (dict(num_spec_tokens=-1), "num_spec_tokens"),
    (dict(device="nowhere"), "device"), (dict(dtype="int8"), "dtype"), (dict(cuda_graphs=1), "cuda_graphs"),
    (dict(compile="yes"), "compile"), (dict(seed=-1), "seed"), (dict(seed=2**64), "seed"), (dict(max_n=0), "max_n"),
])
def test_engine_config_is_validated(kwargs, field):
    with pytest.raises(GlassboxError, match=rf"\b{field}\b"):
        EngineConfig(**kwargs)


def test_engine_validates_its_config_when_built(model):
    config = EngineConfig()
    config.block_size = 0
    with pytest.raises(GlassboxError, match="block_size"):
        LLMEngine(model, config=config)
    # Without chunked prefill, a prompt longer than the step budget could never be scheduled.
    with pytest.raises(GlassboxError, match="max_num_batched_tokens"):
        LLMEngine(model, config=EngineConfig(enable_chunked_prefill=False, max_num_batched_tokens=64))
    LLMEngine(model, config=EngineConfig(enable_chunked_prefill=False, max_num_batched_tokens=64, max_model_len=64))


def test_n_and_logprobs_are_capped_by_the_engine(model):
    engine = LLMEngine(model, config=EngineConfig(max_n=4))
    engine.add_request("ok", [1, 2], SamplingParams(n=4))
    with pytest.raises(GlassboxError, match="max_n"):
        engine.add_request("many", [1, 2], SamplingParams(n=5))
    with pytest.raises(GlassboxError, match="max_n"):
        LLMEngine(model).add_request("many", [1, 2], SamplingParams(n=65))
    with pytest.raises(GlassboxError, match="logprobs"):
        engine.add_request("lp", [1, 2], SamplingParams(logprobs=201))

    async def main() -> None:
        with pytest.raises(GlassboxError, match="max_n"):
            AsyncEngine(engine).submit("many", [1, 2], SamplingParams(n=5))

    asyncio.run(main())
