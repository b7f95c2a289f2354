"""Abandoning a step for an arrival that outranks it (EngineCore.step(poll)): which arrivals may abandon a
step under each policy, that the redo serves the arrival and runs to the end, that outputs do not change,
and that the prefix cache never serves the K/V an abandoned step left half-written.

The fake runner asks interrupt() once per step and, when told to stop, poisons every K/V slot the step
would have written: any later read of one before it is recomputed fails its content check."""

from __future__ import annotations

import pytest
from fake_runner import FakeRunner

from tokenmill.engine.core import EngineCore
from tokenmill.engine.policy import DeadlinePolicy, FairPolicy, PriorityPolicy, SchedulingPolicy
from tokenmill.engine.request import Request
from tokenmill.sampling_params import SamplingParams
from tokenmill.server.engine_loop import EngineLoop
from tokenmill.server.protocol import AbortRequests, AddRequest, Shutdown


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make_engine(policy: SchedulingPolicy, *, max_seqs=4, budget=16, num_blocks=256,
                interruptible=True) -> tuple[EngineCore, FakeRunner]:
    runner = FakeRunner(num_blocks, 4, 256)
    eng = EngineCore(runner, 50, [0], max_num_batched_tokens=budget, max_num_seqs=max_seqs, policy=policy,
                     clock=Clock(), interruptible_steps=interruptible)
    return eng, runner


def params(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


class Arrivals:
    """A poll() for EngineCore.step: adds its requests the first time the running step asks."""

    def __init__(self, eng: EngineCore, *adds: dict):
        self.eng = eng
        self.adds = list(adds)
        self.calls = 0

    def __call__(self) -> bool:
        self.calls += 1
        adds, self.adds = self.adds, []
        for a in adds:
            self.eng.add_request(**a)
        return bool(adds)


def drain(eng: EngineCore, outputs: dict[str, list[int]]) -> None:
    for _ in range(5000):
        if not eng.has_unfinished():
            break
        for u in eng.step():
            outputs.setdefault(u.request_id, []).extend(u.new_token_ids)
    assert not eng.has_unfinished()
    assert eng.kv.pool.num_free_blocks == eng.kv.pool.num_blocks and not eng.kv.req_blocks


def flood_with_a_light_tenant_behind(eng: EngineCore) -> None:
    """The heavy tenant holds every slot with more queued; the light tenant ran one long request beside it
    (served below the fair pace, so it keeps credit when it goes idle)."""
    for i in range(12):
        eng.add_request([1, 2, 3, 4 + i, 5, 6], params(30), request_id=f"H{i}", tenant="heavy")
    eng.step()
    eng.add_request([7] * 6, params(20), request_id="L0", tenant="light")
    while "L0" in eng.scheduler.requests:
        eng.step()
    for _ in range(3):
        eng.step()


LIGHT = {"prompt_token_ids": [8] * 6, "params": params(3), "request_id": "L1", "tenant": "light"}


def test_a_light_tenant_arriving_mid_step_abandons_the_floods_step():
    eng, runner = make_engine(FairPolicy())
    flood_with_a_light_tenant_behind(eng)
    done = len(runner.steps)
    eng.step(Arrivals(eng, LIGHT))
    assert eng.num_interrupted_steps == 1 and len(runner.steps) == done  # abandoned, nothing emitted
    assert {s.request_id for s in runner.interrupted[-1]} <= {f"H{i}" for i in range(12)}
    redo = Arrivals(eng, dict(LIGHT, request_id="L2"))
    eng.step(redo)
    assert redo.calls == 0  # the redo is not offered to stop
    light = [s for s in runner.steps[-1] if s.request_id == "L1"]
    assert light and light[0].start_pos == 0 and len(light[0].token_ids) == 6  # its whole prompt, at once
    assert eng.num_interrupted_steps == 1


def test_abandoning_changes_no_output():
    """The same workload with and without abandoned steps: every request's tokens are identical (the fake
    runner's tokens depend only on the sequence, and it checks every K/V slot it reads)."""
    results = []
    for interruptible in (True, False):
        eng, runner = make_engine(FairPolicy(), interruptible=interruptible)
        flood_with_a_light_tenant_behind(eng)
        outputs: dict[str, list[int]] = {}
        for k in range(4):
            arrival = Arrivals(eng, dict(LIGHT, request_id=f"L{k + 1}"))
            for u in eng.step(arrival):
                outputs.setdefault(u.request_id, []).extend(u.new_token_ids)
            arrival()  # not polled (steps not interruptible): it arrives as the step ends
            for _ in range(4):
                for u in eng.step():
                    outputs.setdefault(u.request_id, []).extend(u.new_token_ids)
        drain(eng, outputs)
        results.append((outputs, eng.num_interrupted_steps))
    (with_, n_with), (without, n_without) = results
    assert n_with >= 1 and n_without == 0
    assert with_.keys() == without.keys()
    for rid, toks in without.items():
        assert with_[rid] == toks, rid


def test_a_tenant_new_beside_the_flood_abandons_its_step():
    """A tenant never seen before joins level with the flood (the VTC lift) and runs nothing: the next step
    would take it first, so the flood's step in flight is abandoned for it, as soon as the flood starts."""
    eng, runner = make_engine(FairPolicy())
    for i in range(12):
        eng.add_request([1, 2, 3, 4 + i, 5, 6], params(30), request_id=f"H{i}", tenant="heavy")
    eng.step()
    eng.step(Arrivals(eng, dict(LIGHT, tenant="new")))
    assert eng.num_interrupted_steps == 1
    eng.step()
    assert "L1" in {s.request_id for s in runner.steps[-1]}


def test_backlogged_tenants_do_not_abandon_each_others_steps():
    """An arrival of tenant b, which has requests queued already, gains b nothing, however far behind a it
    is; the same arrival from a tenant with nothing queued outranks a's requests."""
    p = FairPolicy()
    reqs = {}
    for rid, tenant in [("A0", "a"), ("A1", "a"), ("B0", "b"), ("B1", "b"), ("C0", "c")]:
        reqs[rid] = Request(rid, [1, 2, 3], params(4), 64, tenant=tenant)
        p.add(reqs[rid], 0.0)
    p.counters.update(a=500.0, b=0.0, c=0.0)
    assert not p.outranks(reqs["B1"], reqs["A0"])
    assert p.outranks(reqs["C0"], reqs["A0"])


def test_tenants_at_the_same_pace_do_not_abandon_each_others_steps():
    eng, runner = make_engine(FairPolicy())
    eng.add_request([1] * 6, params(4), request_id="A", tenant="a")
    eng.step(Arrivals(eng, {"prompt_token_ids": [2] * 6, "params": params(4), "request_id": "B", "tenant": "b"}))
    assert eng.num_interrupted_steps == 0 and [s.request_id for s in runner.steps[-1]] == ["A"]


def test_a_tenant_with_credit_does_not_abandon_a_step_of_a_tenant_that_is_not_backlogged():
    """The light tenant keeps credit from its time beside the flood, so its counter is well behind a newcomer's;
    but the newcomer has nothing queued (it takes no more than it asked for): its step is not abandoned."""
    p = FairPolicy()
    eng, runner = make_engine(p)
    flood_with_a_light_tenant_behind(eng)
    for i in range(12):
        eng.abort_request(f"H{i}")
    drain(eng, {})
    eng.add_request([5] * 6, params(4), request_id="A", tenant="a")
    eng.step(Arrivals(eng, LIGHT))
    assert p.counters["light"] < p.counters["a"]  # it would go first, but "a" takes no more than it asked
    assert eng.num_interrupted_steps == 0


@pytest.mark.parametrize("policy, running, arrival, abandons", [
    (SchedulingPolicy(), {"priority": 0}, {"priority": 0}, False),  # fcfs: a later arrival waits its turn
    (SchedulingPolicy(), {"priority": 1}, {"priority": 0}, True),  # ... unless of a better level
    (PriorityPolicy(), {"priority": 1}, {"priority": 0}, True),
    (PriorityPolicy(), {"priority": 0}, {"priority": 1}, False),
    (DeadlinePolicy(), {"ttft_target": 5.0}, {"ttft_target": 0.5}, True),
    (DeadlinePolicy(), {"ttft_target": 0.5}, {"ttft_target": 5.0}, False),
])
def test_which_arrivals_abandon_a_step(policy, running, arrival, abandons):
    eng, runner = make_engine(policy, max_seqs=4)
    eng.add_request([1] * 10, params(4), request_id="R", **running)
    eng.step(Arrivals(eng, {"prompt_token_ids": [2] * 6, "params": params(4), "request_id": "N", **arrival}))
    assert eng.num_interrupted_steps == int(abandons)
    drain(eng, {})


@pytest.mark.parametrize("prompt_priority, abandons", [(0, False), (1, True)])
def test_a_step_full_of_prompts_the_arrival_does_not_outrank_is_not_abandoned(prompt_priority, abandons):
    """The arrival outranks the step's decode, but decodes always go: only the prefill chunks it outranks
    (and budget the step left) make room for it. A step whose budget is a prompt of its own level has none:
    redone, it could not hold the arrival's prompt, so it runs on. A prompt of a worse level makes room."""
    eng, runner = make_engine(PriorityPolicy(), max_seqs=4, budget=16)
    eng.add_request([1] * 4, params(8), request_id="D", priority=1)
    eng.step()
    eng.add_request([3] * 40, params(2), request_id="P", priority=prompt_priority)
    eng.step(Arrivals(eng, {"prompt_token_ids": [2] * 6, "params": params(4), "request_id": "N", "priority": 0}))
    assert eng.num_interrupted_steps == int(abandons)
    drain(eng, {})


@pytest.mark.parametrize("budget, abandons", [(4, False), (16, True)])
def test_a_step_is_abandoned_only_if_its_redo_can_hold_the_arrivals_prompt(budget, abandons):
    """Four decodes the arrival outranks: with a budget of 4 they fill the step, and decodes always go, so
    the redo would have no room for the arrival's prompt; with 16 it has."""
    eng, runner = make_engine(PriorityPolicy(), max_seqs=5, budget=budget)
    for k in range(4):
        eng.add_request([k + 1], params(8), request_id=f"D{k}", priority=1)
    eng.step()
    eng.step(Arrivals(eng, {"prompt_token_ids": [2] * 6, "params": params(4), "request_id": "N", "priority": 0}))
    assert eng.num_interrupted_steps == int(abandons)
    drain(eng, {})


def _light_prompt_beside_the_flood(eng: EngineCore, heavy_prompt: int) -> None:
    """Three slots: the flood runs two or three requests with more queued; 6-token prompts are decoding
    after three steps, 40-token ones still prefilling in chunks. Then a light tenant's prompt P arrives."""
    for i in range(12):
        eng.add_request([1, 2, 3, 4 + i] + [5] * (heavy_prompt - 4), params(30), request_id=f"H{i}", tenant="heavy")
    for _ in range(3):
        eng.step()
    eng.add_request([7] * 6, params(4), request_id="P", tenant="light")


OTHER = {"prompt_token_ids": [8] * 6, "params": params(4), "request_id": "N", "tenant": "other"}


@pytest.mark.parametrize("heavy_prompt, abandons", [(6, False), (40, True)])
def test_a_step_starting_a_light_prompt_is_abandoned_only_to_drop_the_floods_chunks(heavy_prompt, abandons):
    """Another light tenant arrives during the step in which P starts. Beside the flood's decodes only,
    the redo would be the same step plus its prompt: P would lose the time spent and then wait out a
    longer step, so the step runs on and the arrival goes next. Beside a chunk of the flood's prompt, the
    redo drops that chunk for it."""
    eng, runner = make_engine(FairPolicy(), max_seqs=3, budget=16)
    _light_prompt_beside_the_flood(eng, heavy_prompt)
    eng.step(Arrivals(eng, OTHER))
    planned = runner.interrupted[-1] if abandons else runner.steps[-1]
    assert "P" in {s.request_id for s in planned}
    assert any(s.request_id.startswith("H") and len(s.token_ids) > 1 for s in planned) == abandons
    assert eng.num_interrupted_steps == int(abandons)
    eng.step()
    assert "N" in {s.request_id for s in runner.steps[-1]}


def test_an_abandoned_step_takes_back_its_fair_charges():
    """The step that admits P is abandoned (here by hand) for a tenant that arrived while it ran: P's prompt
    charge is taken back, the arrival was lifted level with the counters the step was planned with, and
    the redo seats both. Left charged, P ranked behind the arrival and lost the last free slot."""
    p = FairPolicy()
    eng, runner = make_engine(p, max_seqs=3, budget=16)
    _light_prompt_beside_the_flood(eng, 6)
    before = dict(p.counters)
    out = eng.scheduler.schedule()
    assert [r.request_id for r in out.admitted] == ["P"] and p.counters["light"] > before["light"]
    eng.add_request(**OTHER)
    eng.scheduler.unschedule(out)
    assert p.counters == before | {"other": before["heavy"]}
    eng.step()
    assert {"P", "N"} <= {s.request_id for s in runner.steps[-1]}


def test_no_free_slot_and_no_preemption_means_no_abandoning():
    """fcfs does not preempt to admit: with every slot taken a better-level arrival could not join the redo."""
    eng, runner = make_engine(SchedulingPolicy(), max_seqs=1)
    eng.add_request([1] * 10, params(4), request_id="R", priority=1)
    eng.step()
    eng.step(Arrivals(eng, {"prompt_token_ids": [2] * 6, "params": params(4), "request_id": "N", "priority": 0}))
    assert eng.num_interrupted_steps == 0


def test_interruptible_steps_off_never_polls():
    eng, runner = make_engine(PriorityPolicy(), interruptible=False)
    eng.add_request([1] * 10, params(4), request_id="R", priority=1)
    poll = Arrivals(eng, {"prompt_token_ids": [2] * 6, "params": params(4), "request_id": "N", "priority": 0})
    eng.step(poll)
    assert poll.calls == 0 and eng.num_interrupted_steps == 0


def test_blocks_of_an_abandoned_step_leave_the_prefix_cache():
    """A's prompt is admitted (its full blocks registered in the prefix cache as the step is planned), then
    the step is abandoned for B, which shares A's first 12 tokens. A goes back to waiting; B must compute
    those tokens itself, not find A's half-written blocks. A then reuses B's."""
    eng, runner = make_engine(PriorityPolicy(), max_seqs=2, budget=16)
    shared = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]
    eng.add_request(shared + [9], params(3), request_id="A", priority=1)
    eng.step(Arrivals(eng, {"prompt_token_ids": shared + [7], "params": params(3), "request_id": "B",
                            "priority": 0}))
    assert eng.num_interrupted_steps == 1
    a = eng.scheduler.requests["A"]
    assert a in eng.scheduler.waiting and a.num_computed_tokens == 0 and eng.kv.block_ids(a) == [[]]
    assert a.first_scheduled_time is None  # still queueing, as far as its metrics go
    eng.step()
    first = {s.request_id: s for s in runner.steps[-1]}
    assert first["B"].start_pos == 0  # no prefix hit on A's abandoned blocks
    outputs: dict[str, list[int]] = {}
    drain(eng, outputs)
    assert eng.scheduler.requests == {} and eng.kv.prefix_cache_hits >= 3  # A found B's computed blocks


def test_engine_loop_adds_arrivals_mid_step_and_defers_the_rest():
    """EngineLoop's poll: an AddRequest taken while a step runs joins at once (and abandons the step); an
    abort taken with it is applied once the step has returned, not under the step's feet."""
    eng, runner = make_engine(PriorityPolicy())
    script = [
        [AddRequest("R", [1] * 10, params(6), priority=1)],
        [AbortRequests(["R"]), AddRequest("N", [2] * 6, params(2), priority=0)],  # asked mid-step
    ]
    sent = []

    def recv(timeout: float):
        if script:
            return script.pop(0)
        return [] if eng.has_unfinished() else [Shutdown()]

    EngineLoop(eng, sent.append).run(recv)
    assert eng.num_interrupted_steps == 1
    finished = {u.request_id: u.finish_reason for m in sent for u in getattr(m, "updates", []) if u.finish_reason}
    assert finished == {"R": "abort", "N": "length"}
    assert eng.kv.pool.num_free_blocks == eng.kv.pool.num_blocks
