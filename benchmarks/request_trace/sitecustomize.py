"""Put this directory on PYTHONPATH, with TM_TRACE=PREFIX, and every Python process started below it writes
PREFIX.<pid>: one JSON line per request the frontend hands to the engine (`submit`), per request the engine
takes in (`add`) and per engine step (`step`: its requests and token counts, whether it was abandoned, which
requests got their first token in it, the fair counters as it was planned). `analyze.py` splits the light
tenants' TTFT into its parts, and `slowest.py` prints the steps each of the slowest light requests beside
the flood lived through: how the session 7 and 8 figures in BENCHMARKS.md (fair e2e section) were found.

    TM_TRACE=/tmp/tr PYTHONPATH=benchmarks/request_trace .venv/bin/python benchmarks/fair_flood.py --rounds 4
    .venv/bin/python benchmarks/request_trace/analyze.py /tmp/tr
    .venv/bin/python benchmarks/request_trace/slowest.py /tmp/tr 8

It wraps EngineCore.step, Scheduler.add_request and Frontend.submit, so every process it runs in imports
those modules (the load generator too: fine for a diagnosis, not for a benchmark's own figures)."""

import json
import os
import time

_PREFIX = os.environ.get("TM_TRACE")

if _PREFIX:
    from tokenmill.engine.core import EngineCore
    from tokenmill.engine.scheduler import Scheduler
    from tokenmill.server.frontend import Frontend

    _out = open(f"{_PREFIX}.{os.getpid()}", "a", buffering=1)  # noqa: SIM115 (open for the process's life)

    def _write(rec: dict) -> None:
        _out.write(json.dumps(rec) + "\n")

    _add, _schedule, _step, _submit = Scheduler.add_request, Scheduler.schedule, EngineCore.step, Frontend.submit

    def add_request(self, req):
        _write({"ev": "add", "t": time.monotonic(), "rid": req.request_id, "tenant": req.tenant,
                "arr": req.arrival_time})
        return _add(self, req)

    def schedule(self):
        # Fair's counters as the step is planned, before its charges (other policies have none).
        self.last_counters = {k.removeprefix("user:"): round(v) for k, v in getattr(self.policy, "counters", {}).items()}
        self.last_out = _schedule(self)
        return self.last_out

    def step(self, poll=None):
        t0, n0 = time.monotonic(), self.num_interrupted_steps
        self.scheduler.last_out = None
        updates = _step(self, poll)
        out = self.scheduler.last_out
        _write({"ev": "step", "t0": t0, "t1": time.monotonic(), "intr": self.num_interrupted_steps - n0,
                "sched": [(r.request_id, n, r.tenant) for r, n in out.scheduled] if out else [],
                "counters": getattr(self.scheduler, "last_counters", {}),
                "first": [u.request_id for u in updates
                          if u.new_token_ids and u.first_token_time is not None and u.first_token_time >= t0]})
        return updates

    def submit(self, request_id, prompts, params, **kw):
        handle = _submit(self, request_id, prompts, params, **kw)
        _write({"ev": "submit", "t": time.monotonic(), "rids": [s.request_id for s in handle.seqs]})
        return handle

    Scheduler.add_request, Scheduler.schedule, EngineCore.step, Frontend.submit = add_request, schedule, step, submit
