"""The routing decision's pieces, pure: phase policies, availability, filters, scorers, pickers, prefixes."""

from __future__ import annotations

import asyncio
import itertools
import random
from dataclasses import asdict

import pytest

from pdctl.control_plane.types import ExecutionInstanceType as Phase
from pdctl.control_plane.types import PDSeparationConfig
from pdctl.errors import UnknownPolicy
from pdctl.httpserver import HttpError
from pdctl.router import requests
from pdctl.router.admission import Admission, DeadlineExceeded
from pdctl.router.proxy import Router, RouterSettings
from pdctl.router.tokens import TokenCounter, utf8_length
from pdctl.routing.phase import (
    AdaptivePolicy,
    ConditionalPolicy,
    PhaseDecision,
    PhasePolicy,
    PoolLoad,
    RequestFeatures,
    ThresholdPolicy,
    make_phase_policy,
    pool_load,
    with_availability,
)
from pdctl.routing.pieces import (
    BestScore,
    CacheAware,
    Composition,
    OutstandingTokens,
    RoutingRequest,
    Strategy,
    make_strategy,
)
from pdctl.routing.pool import Instance, Pool
from pdctl.routing.prefix import PrefixTable, block_ends, block_hashes, covered
from pdctl.types import PDSeparationConfig as PlainPDConfig

CONFIG = PDSeparationConfig(prefilling_threshold_input_tokens=800, prefilling_threshold_ratio=4.0)


def decide(policy, tokens, output, cached=0, load=None):
    return policy.decide(RequestFeatures(tokens, output, cached), load or PoolLoad())


def test_threshold_splits_long_prompts_with_short_outputs():
    policy = ThresholdPolicy(CONFIG)
    assert decide(policy, 2000, 100).phase is Phase.PREFILLING
    assert decide(policy, 799, 10).phase is Phase.DECODING  # below the token threshold
    short_ratio = decide(policy, 2000, 1000)
    assert short_ratio.phase is Phase.DECODING and short_ratio.reason == "ratio 2.00 < 4"
    assert decide(policy, 800, 200).phase is Phase.PREFILLING  # both bounds are inclusive


def test_adaptive_counts_only_what_the_decode_instance_must_compute():
    policy = AdaptivePolicy(CONFIG)
    assert decide(policy, 2000, 100).phase is Phase.PREFILLING
    cached = decide(policy, 2000, 100, cached=1600)
    assert cached.phase is Phase.DECODING
    assert cached.reason == "400 uncached tokens (1600 cached on the decode instance) < cut-off 800"


def test_adaptive_moves_the_cutoff_with_load():
    policy = AdaptivePolicy(CONFIG)
    backed_up = decide(policy, 1000, 10, load=PoolLoad(prefill_backlog_s=1.0, ttft_slo_s=1.0))
    assert backed_up.phase is Phase.DECODING and backed_up.figures["cutoff"] == 1600
    busy_decode = decide(
        policy, 500, 10, load=PoolLoad(decode_running=100, decode_max_seqs=100, decode_prefill_tokens_per_s=1e9)
    )
    assert busy_decode.phase is Phase.PREFILLING and busy_decode.figures["cutoff"] == 400


def test_adaptive_protects_running_streams_from_a_long_stall():
    policy = AdaptivePolicy(CONFIG)
    load = PoolLoad(decode_running=4, decode_max_seqs=200, decode_prefill_tokens_per_s=1000, tpot_target_s=0.05)
    stall = decide(policy, 300, 1000, load=load)  # 300 tokens at 1000 tok/s stalls 300 ms > 50 ms
    assert stall.phase is Phase.PREFILLING and "stall" in stall.reason
    idle = decide(policy, 300, 1000, load=PoolLoad(decode_running=0))
    assert idle.phase is Phase.DECODING


def test_conditional_prefills_on_the_decode_instance_while_the_prefill_queue_is_longer():
    policy = ConditionalPolicy(CONFIG)
    busy = PoolLoad(prefill_queue_tokens=4000, prefill_tokens_per_s=20000, decode_running=3, tpot_target_s=0.2)
    sent = decide(policy, 2000, 100, load=busy)  # 100 ms of prefill on the decode instance
    assert sent.phase is Phase.DECODING
    assert sent.reason == "prefill queue 4000 tokens > the decode instance's own 0: it prefills this one"
    assert sent.figures["decode_stall_s"] == 0.1
    # Its own queue as long as the prefill instance's: split, as the threshold rule says.
    even = PoolLoad(prefill_queue_tokens=4000, decode_queue_tokens=4000, prefill_tokens_per_s=20000)
    assert decide(policy, 2000, 100, load=even).phase is Phase.PREFILLING
    # An idle prefill instance: split.
    assert decide(policy, 2000, 100, load=PoolLoad(prefill_tokens_per_s=20000)).phase is Phase.PREFILLING
    # What the threshold rule sends straight to decode stays there.
    assert decide(policy, 500, 100, load=busy).phase is Phase.DECODING


def test_conditional_keeps_a_prompt_that_would_stall_running_streams_past_the_tpot_target_on_prefill():
    policy = ConditionalPolicy(CONFIG)
    slow = PoolLoad(prefill_queue_tokens=4000, decode_queue_tokens=1000, prefill_tokens_per_s=10000, tpot_target_s=0.2)
    stalled = decide(policy, 2000, 100, load=PoolLoad(**{**asdict(slow), "decode_running": 2}))
    assert stalled.phase is Phase.PREFILLING and stalled.reason.endswith("would stall its streams 300 ms")
    # With no stream running there, nothing stalls.
    assert decide(policy, 2000, 100, load=slow).phase is Phase.DECODING


def test_pool_load_reads_the_least_backed_up_prefill_instance_and_the_decode_instances_own_queue():
    prefills = [
        Instance("p0", Phase.PREFILLING, "http://p0", in_flight_prompt_tokens=3000, prefill_tokens_per_s=10000),
        Instance("p1", Phase.PREFILLING, "http://p1", in_flight_prompt_tokens=4000, prefill_tokens_per_s=20000),
    ]
    decode = instance("d", in_flight=3, in_flight_prompt_tokens=2600, prefilling_tokens=600)
    load = pool_load(decode, prefills, default_speed=1000, ttft_slo_s=1, tpot_target_s=0.05)
    assert (load.prefill_backlog_s, load.prefill_queue_tokens, load.prefill_tokens_per_s) == (0.2, 4000, 20000)
    assert (load.decode_queue_tokens, load.decode_running, load.decode_prefill_tokens_per_s) == (600, 3, 1000)


def test_the_prefill_speed_is_the_busy_periods_not_one_prompts():
    """Four prompts that arrive together and are answered 25 ms apart: the instance prefills 1000 tokens in 25 ms
    (40,000 tokens/s), though the last prompt waited 100 ms for its first token."""
    prefill = Instance("p", Phase.PREFILLING, "http://p")
    for _ in range(4):
        prefill.prefill_queued(1000, now=10.0)
    for answered in (10.025, 10.05, 10.075, 10.1):
        prefill.prefill_answered(1000, timed_at=answered)
    assert prefill.prefilling_tokens == 0 and round(prefill.prefill_tokens_per_s) == 40000
    prefill.prefill_queued(1000, now=20.0)  # a new busy period, after an idle one
    prefill.prefill_answered(1000)  # failed, untimed: out of the queue, no sample
    assert prefill.prefilling_tokens == 0 and round(prefill.prefill_tokens_per_s) == 40000


def test_always_never_and_unknown():
    assert (
        decide(make_phase_policy(CONFIG.model_copy(update={"routing_policy": "always"})), 1, 1).phase
        is Phase.PREFILLING
    )
    assert (
        decide(make_phase_policy(CONFIG.model_copy(update={"routing_policy": "never"})), 10**6, 1).phase
        is Phase.DECODING
    )
    # The bottom layer's config knows no policy names: the router refuses the unknown one when it builds it.
    typo = PlainPDConfig(routing_policy="adaptve")
    known = (
        r"unknown routing policy 'adaptve' \(did you mean 'adaptive'\?\); "
        r"known: threshold, adaptive, conditional, always, never$"
    )
    with pytest.raises(UnknownPolicy, match=known):
        make_phase_policy(typo)
    with pytest.raises(UnknownPolicy, match=known):
        Router(RouterSettings("m", typo), Pool([instance("a")]), TokenCounter(utf8_length))


def test_availability_falls_back_the_same_for_every_policy():
    split = decide(ThresholdPolicy(CONFIG), 5000, 10)
    assert with_availability(split, True, {Phase.PREFILLING, Phase.DECODING}).phase is Phase.PREFILLING
    no_prefill = with_availability(split, True, {Phase.DECODING})
    assert no_prefill.phase is Phase.DECODING and no_prefill.reason.startswith("no healthy prefill instance")
    assert with_availability(split, True, {Phase.HYBRID}).phase is Phase.HYBRID
    assert with_availability(split, False, {Phase.PREFILLING, Phase.DECODING}).phase is Phase.HYBRID


def instance(name: str, **figures) -> Instance:
    return Instance(name, Phase.DECODING, f"http://{name}", **{"max_num_seqs": 10, "healthy": True, **figures})


def test_filters_drop_unhealthy_draining_and_open_circuits():
    strategy = make_strategy("load_balanced", lambda _: PrefixTable())
    down = instance("down", healthy=False)
    draining = instance("draining", draining=True)
    tripped = instance("tripped", circuit_open_until=10.0)
    ok = instance("ok")
    assert strategy.candidates([down, draining, tripped, ok], RoutingRequest(10, now=5.0)) == [ok]
    assert strategy.select([down], RoutingRequest(10)) is None


def test_load_balanced_prefers_the_least_loaded():
    strategy = make_strategy("load_balanced", lambda _: PrefixTable(), random.Random(0))
    busy = instance("busy", in_flight=8, in_flight_prompt_tokens=8000, kv_usage=0.9)
    idle = instance("idle")
    selection = strategy.select([busy, idle], RoutingRequest(100))
    assert selection.instance is idle and selection.scores["idle"] > selection.scores["busy"]


def test_ties_are_broken_at_random_so_load_spreads():
    strategy = make_strategy("load_balanced", lambda _: PrefixTable(), random.Random(1))
    pool = [instance(f"i{n}") for n in range(3)]
    chosen = {strategy.select(pool, RoutingRequest(1)).instance.id for _ in range(60)}
    assert chosen == {"i0", "i1", "i2"}


def test_round_robin_cycles():
    strategy = make_strategy("round_robin", lambda _: PrefixTable())
    pool = [instance("a"), instance("b")]
    assert [strategy.select(pool, RoutingRequest(1)).instance.id for _ in range(4)] == ["a", "b", "a", "b"]


def test_cache_aware_follows_the_prefix():
    tables: dict[str, PrefixTable] = {"a": PrefixTable(), "b": PrefixTable()}
    strategy = make_strategy("cache_aware", tables.__getitem__, random.Random(0))
    prompt = "system: you are a helpful assistant. " * 20
    tables["b"].record(block_hashes(prompt))
    asked = prompt + "question one"
    request = RoutingRequest(200, prefix_blocks=block_hashes(asked), prefix_length=len(asked))
    assert strategy.select([instance("a"), instance("b")], request).instance.id == "b"


def test_only_strategies_with_a_prefix_scorer_hash_prefixes():
    reading = [name for name in Strategy.registry if make_strategy(name, lambda _: PrefixTable()).uses_prefixes]
    assert reading == ["cache_aware"]
    assert make_strategy(Composition(scorers={"prefix_affinity": 1.0}), lambda _: PrefixTable()).uses_prefixes


def route_a_busy_pool(choice: str | Composition) -> list[tuple[str, dict[str, float]]]:
    """Sixty requests over four instances whose load, KV use and cached prefixes change as they go: each choice
    and every candidate's score."""
    tables = {name: PrefixTable() for name in "abcd"}
    strategy = make_strategy(choice, tables.__getitem__, random.Random(7))
    pool = [instance(name) for name in "abcd"]
    shape = random.Random(3)
    chosen = []
    for n, target in zip(range(60), itertools.cycle(pool), strict=False):
        target.in_flight_prompt_tokens = shape.randrange(4000)
        target.kv_usage = shape.random()
        target.running = float(shape.randrange(10))
        prompt = f"group {n % 3} " * 40 + f"question {n}"
        blocks = block_hashes(prompt)
        selection = strategy.select(pool, RoutingRequest(200, prefix_blocks=blocks, prefix_length=len(prompt)))
        tables[selection.instance.id].record(blocks)
        chosen.append((selection.instance.id, selection.scores))
    return chosen


@pytest.mark.parametrize("preset", ["load_balanced", "round_robin", "cache_aware"])
def test_a_composition_routes_as_the_preset_it_equals(preset):
    written = Strategy.registry[preset].composition
    reordered = Composition(scorers=dict(reversed(written.scorers.items())), picker=written.picker)
    assert route_a_busy_pool(reordered) == route_a_busy_pool(preset)


def test_the_busy_pool_tells_strategies_apart_so_routing_alike_means_something():
    only_load = Composition(scorers={"outstanding_tokens": 1.0})
    routes = {tuple(i for i, _ in route_a_busy_pool(c)) for c in ("load_balanced", "cache_aware", only_load)}
    assert len(routes) == 3


def test_a_composition_is_shown_written_out():
    heavier = Composition(scorers={**CacheAware.composition.scorers, "prefix_affinity": 8.0})
    assert make_strategy(heavier, lambda _: PrefixTable()).label == (
        "prefix_affinity 8 + outstanding_tokens 1 + running_sequences 1 + kv_cache_usage 0.5, best_score"
    )
    assert make_strategy("cache_aware", lambda _: PrefixTable()).label == "cache_aware"


def test_a_strategy_is_one_class():
    class FewestTokens(Strategy, name="fewest_tokens"):
        def make_scorers(self, tables):
            return [OutstandingTokens()]

    try:
        strategy = make_strategy("fewest_tokens", lambda _: PrefixTable(), random.Random(0))
        assert isinstance(strategy, FewestTokens) and isinstance(strategy.picker, BestScore)
        busy, idle = instance("busy"), instance("idle")
        busy.in_flight_prompt_tokens = 500
        assert strategy.select([busy, idle], RoutingRequest(1)).instance.id == "idle"
    finally:
        del Strategy.registry["fewest_tokens"]
    with pytest.raises(UnknownPolicy, match="fewest_tokens"):
        make_strategy("fewest_tokens", lambda _: PrefixTable())


def test_a_phase_policy_is_one_class():
    class HeldPrefix(PhasePolicy, name="held_prefix"):
        """Split a prompt unless the decode instance holds at least half of it."""

        uses_prefixes = True

        def decide(self, features: RequestFeatures, load: PoolLoad) -> PhaseDecision:
            held = 2 * features.decode_cached_tokens >= features.input_tokens
            return PhaseDecision(Phase.DECODING if held else Phase.PREFILLING, f"{features.decode_cached_tokens} held")

    prompt = "a shared system prompt. " * 40
    parsed = requests.parse({"model": "m", "prompt": prompt}, {}, chat=False, served_model="m")
    pool = Pool([instance("d"), Instance("p", Phase.PREFILLING, "http://p", max_num_seqs=10, healthy=True)])
    try:
        config = PDSeparationConfig(routing_policy="held_prefix")  # the public config takes the new name
        router = Router(RouterSettings("m", config), pool, TokenCounter(utf8_length))
        first = router.plan(parsed)
        assert first.routing.prefix_blocks, "load_balanced reads no prefix, the policy does: they are hashed"
        assert (first.decision.phase, first.decision.reason) == (Phase.PREFILLING, "0 held")
        router.tables["d"].record(first.routing.prefix_blocks)
        again = router.plan(parsed)
        held = int(again.decision.reason.removesuffix(" held"))
        assert again.decision.phase is Phase.DECODING and len(prompt) / 2 <= held < len(prompt)  # whole blocks
    finally:
        del PhasePolicy.registry["held_prefix"]
    with pytest.raises(UnknownPolicy, match="held_prefix"):
        make_phase_policy(config)
    threshold = Router(
        RouterSettings("m", PDSeparationConfig(routing_policy="threshold")), pool, TokenCounter(utf8_length)
    )
    assert threshold.plan(parsed).routing.prefix_blocks == []  # neither load_balanced nor threshold reads them


def test_prefix_table_lru_and_lfu_eviction():
    hot, cold = block_hashes("h" * 128), block_hashes("c" * 128)
    lfu = PrefixTable(capacity_blocks=10, eviction="lfu")
    for _ in range(5):
        lfu.record(hot)
    for n in range(12):
        lfu.record(block_hashes(str(n) * 128))
    assert lfu.match(hot) == 1  # used often: kept by LFU
    lru = PrefixTable(capacity_blocks=10, eviction="lru")
    lru.record(cold)
    for n in range(12):
        lru.record(block_hashes(str(n) * 128))
    assert lru.match(cold) == 0 and len(lru) <= 10


def test_block_hashes_chain_the_prefix():
    a, b = block_hashes("x" * 256 + "tail"), block_hashes("y" * 128 + "x" * 128)
    assert len(a) == 2 and a[1] != b[1]  # the same second block after a different first one differs


def test_blocks_grow_with_the_prefix_and_the_match_says_how_much_is_held():
    ends = block_ends(128)
    assert ends[:3] == (128, 256, 384) and ends[15:18] == (2048, 2304, 2560) and ends[23:25] == (4096, 4608)
    assert len(ends) == 64 and ends[-1] == 128 * 1024
    assert len(block_hashes("a" * 18_500)) == 41  # 16 + 8 + 8 + 8 + 1, not 144 blocks of 128
    shared = "s" * 5000
    table = PrefixTable()
    table.record(block_hashes(shared + "x" * 5000))
    prompt = shared + "y" * 5000
    matched = table.match(block_hashes(prompt))
    assert ends[matched - 1] == 4608  # the last block end inside the 5000 shared characters
    assert covered(matched, ends, len(prompt)) == 4608 / 10_000
    assert covered(0, ends, len(prompt)) == 0.0


def test_lru_evicts_a_prefix_from_its_tail():
    table = PrefixTable(capacity_blocks=20, eviction="lru")
    long_prompt = block_hashes("L" * 128 * 16)
    table.record(long_prompt)
    table.record(block_hashes("o" * 128 * 4))  # 20 blocks: 10 % more evicts down to 18
    table.record(block_hashes("p" * 128))
    assert table.match(long_prompt) == 13  # the head survives; an evicted head would leave nothing usable


def test_token_estimate_learns_the_engines_ratio():
    counter = TokenCounter()
    assert counter.count("a" * 400) == 100
    for _ in range(60):
        counter.observe(400, 400)
    assert counter.count("a" * 400) in range(395, 406)


def test_admission_orders_by_priority_then_deadline():
    async def scenario():
        admission = Admission(slo_aware=True)
        order: list[str] = []

        async def waiter(name, priority, deadline):
            await admission.wait(priority, deadline)
            order.append(name)

        loop = asyncio.get_running_loop()
        far = loop.time() + 100
        tasks = [asyncio.create_task(waiter("low", 3, None)), asyncio.create_task(waiter("high-late", 1, far + 50))]
        tasks.append(asyncio.create_task(waiter("high-soon", 1, far)))
        await asyncio.sleep(0.01)
        for _ in range(3):
            admission.release()
            await asyncio.sleep(0.01)
        await asyncio.gather(*tasks)
        return order

    assert asyncio.run(scenario()) == ["high-soon", "high-late", "low"]


def test_admission_refuses_when_the_deadline_passes():
    async def scenario():
        admission = Admission(slo_aware=True)
        import time

        with pytest.raises(DeadlineExceeded):
            await admission.wait(0, time.monotonic() + 0.05)

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([1, 2], "must be a JSON object"),
        ({"model": "m"}, "'prompt' must be"),
        ({"model": "m", "prompt": "x", "max_tokens": 0}, "'max_tokens' must be an integer >= 1"),
        ({"model": "m", "prompt": "x", "max_tokens": "5"}, "'max_tokens' must be an integer >= 1"),
        ({"model": "m", "prompt": "x", "stream": "yes"}, "'stream' must be true or false"),
        ({"model": "m", "prompt": "x", "priority": "urgent"}, "priority must be an integer or one of"),
        ({"model": "m", "prompt": "x", "slo_deadline_ms": -1}, "slo_deadline_ms must be positive"),
    ],
)
def test_bad_requests_are_400s(body, message):
    with pytest.raises(HttpError) as caught:
        requests.parse(body, {}, chat=False, served_model="m")
    assert caught.value.status == 400 and message in caught.value.message


def test_unknown_model_is_404_and_chat_text_is_counted():
    with pytest.raises(HttpError) as caught:
        requests.parse({"model": "other", "prompt": "x"}, {}, chat=False, served_model="m")
    assert caught.value.status == 404
    parsed = requests.parse(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "there"}]},
        {"x-pdctl-priority": "high"},
        chat=True,
        served_model="m",
    )
    assert parsed.text == "hi\nthere" and parsed.priority == 1


def test_the_builtin_model_is_counted_exactly(tmp_path):
    (tmp_path / "pdctl-model.json").write_text("{}")
    counter = TokenCounter.for_model(str(tmp_path))
    assert counter.exact and counter.count("héllo") == 6
    assert not TokenCounter.for_model(str(tmp_path / "elsewhere")).exact


def test_the_router_builds_a_composed_strategy_and_shows_it_written_out():
    settings = RouterSettings(
        "m", PDSeparationConfig(enabled=False), routing_strategy=Composition(scorers={"prefix_affinity": 1.0})
    )
    router = Router(settings, Pool([instance("a")]), TokenCounter(utf8_length))
    assert router.strategy.uses_prefixes
    assert router.stats().routing_strategy == "prefix_affinity 1, best_score"
