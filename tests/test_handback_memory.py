"""gateway/handback.py: a new session starts on the verifier directly only while sessions of its kind
were handed back recently and that verifier's recent load is at or above where they said drafting would
pay again; anything else (another kind, a fixed draft length, a lighter or stale load) starts on its
drafter."""
from __future__ import annotations

import gateway.handback as hb
from gateway.handback import HandBacks


def req(**kw):
    base = {"verifier_address": "v:1", "drafter": "spm", "algorithm": "slem", "params": {"temperature": 0.0},
            "draft_tokens": 0}
    base.update(kw)
    return base


def test_start_direct_only_for_the_kind_handed_back_at_a_load_above_its_threshold(monkeypatch):
    m = HandBacks()
    assert m.start_direct(req()) is None  # nothing learned
    m.handed_back(req(), 3.25)
    assert m.start_direct(req()) is None  # no load seen yet
    m.load("v:1", 7.5)
    assert m.start_direct(req()) == 3.25
    for other in (req(algorithm="auto"), req(drafter="bpe"), req(params={"temperature": 1.0}),
                  req(verifier_address="v:2"), req(draft_tokens=4)):
        assert m.start_direct(other) is None
    m.load("v:1", 3.0)  # the load fell below where drafting pays
    assert m.start_direct(req()) is None
    m.load("v:1", 8.0)
    now = hb.time.monotonic()
    monkeypatch.setattr(hb.time, "monotonic", lambda: now + hb.FRESH_LOAD_S + 1)
    assert m.start_direct(req()) is None  # the load is stale
