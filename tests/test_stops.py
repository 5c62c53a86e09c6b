"""Stop strings: the matcher over the committed byte stream (crossdraft/stops.py) and the in-process
engine's use of it (`Engine.generate(stop=...)`, `crossdraft generate --stop`).

The output up to a stop string must be exactly the target's output cut right before the earliest stop
string, however the bytes are split into deltas; nothing of a stop string may go out first."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_services import save_model

from crossdraft.engine import Engine
from crossdraft.errors import InvalidArgument
from crossdraft.sampling import SamplingParams
from crossdraft.stops import MAX_STOP_BYTES, MAX_STOPS, StopCut, check_stops

PROMPT = "class Parser:\n    def get_value(self"


def run(stops, pieces) -> tuple:
    """Feed pieces (bytes) in order, as deltas; -> (what went out, each delta's output, the cut)."""
    cut = StopCut(stops)
    outs = [cut.feed(p) for p in pieces]
    tail = cut.flush()
    return b"".join(outs) + tail, outs, cut


def expected(stops, text: bytes) -> bytes:
    found = [i for i in (text.find(s.encode()) for s in stops) if i >= 0]
    return text[: min(found)] if found else text


def test_a_stop_string_split_across_two_deltas_is_caught_and_never_sent():
    out, outs, cut = run(["\n\n"], [b"x = 1\n", b"\ny = 2"])
    assert out == b"x = 1" and cut.hit and cut.cut == 5
    assert outs == [b"x = 1", b""]  # the first delta's "\n" was held back: it could begin the stop string
    out, outs, cut = run(["END"], [b"abcE", b"N", b"D and more"])
    assert out == b"abc" and outs == [b"abc", b"", b""] and cut.cut == 3


def test_held_back_bytes_go_out_when_they_turn_out_not_to_be_a_stop_string():
    out, outs, cut = run(["\n\n"], [b"a\n", b"b\n"])
    assert outs == [b"a", b"\nb"] and out == b"a\nb\n" and not cut.hit  # the last "\n" at the end (flush)


def test_the_earliest_stop_string_wins_and_nothing_after_a_hit_goes_out():
    out, _, cut = run(["world", "lo w"], [b"hello world", b"again"])
    assert out == b"hel" and cut.cut == 3
    assert cut.feed(b"more") == b"" and cut.flush() == b""


def test_a_multibyte_stop_string_matches_only_whole_characters():
    out, _, cut = run(["é"], [b"caf", "é".encode()[:1], "é".encode()[1:] + b"!"])
    assert out == b"caf" and cut.hit


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet="ab\n é", max_size=40), stops=st.lists(st.text(alphabet="ab\n é", min_size=1, max_size=4),
       min_size=1, max_size=3), cuts=st.lists(st.integers(0, 60), max_size=8))
def test_any_split_gives_the_text_up_to_the_earliest_stop(text, stops, cuts):
    data = text.encode()
    at = sorted({min(c, len(data)) for c in cuts})
    pieces = [data[a:b] for a, b in zip([0] + at, at + [len(data)])]
    out, outs, cut = run(stops, pieces)
    assert out == expected(stops, data)
    assert cut.hit == any(s.encode() in data for s in stops)
    sent = b""
    for o in outs:  # what went out is always a prefix of the final output
        sent += o
        assert out.startswith(sent)


@pytest.mark.parametrize("stops,message", [
    ([""], "non-empty"), ([1], "non-empty"), ("x" * (MAX_STOP_BYTES + 1), "at most"),
    ([f"s{i}" for i in range(MAX_STOPS + 1)], f"at most {MAX_STOPS}"), ({"a": 1}, "a string or a list"),
    (["\ud800"], "valid Unicode")])
def test_bad_stop_strings_are_refused(stops, message):
    with pytest.raises(InvalidArgument, match=message):
        check_stops(stops)


def test_check_stops_accepts_a_string_and_drops_duplicates():
    assert check_stops("a") == ["a"] and check_stops(["a", "b", "a"]) == ["a", "b"] and check_stops(None) == []


@pytest.fixture(scope="module")
def engine(trained_models, tmp_path_factory):
    d = tmp_path_factory.mktemp("stops")
    return Engine.load(str(save_model(trained_models["bpe"], "bpe", d / "target")),
                       str(save_model(trained_models["spm"], "spm", d / "spm")), device="cpu")


@pytest.mark.parametrize("algorithm,params", [("slem", SamplingParams()), ("tli", SamplingParams(temperature=1.0, seed=7)),
                                              ("none", SamplingParams())])
def test_engine_output_is_the_targets_up_to_the_stop_string(engine, algorithm, params):
    full = engine.generate(PROMPT, 40, params, algorithm)
    text = full.text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert len(stop) == 3 and stop.strip(), text
    res = engine.generate(PROMPT, 40, params, algorithm, stop=[stop, "never in it \x00"])
    assert res.text == text[: text.index(stop)] and res.finish_reason == "stop"
    assert res.ids == full.ids[: len(res.ids)] and len(res.ids) <= len(full.ids)
    assert engine.generate(PROMPT, 40, params, algorithm, stop=["never in it \x00"]).text == text


def test_cli_generate_stop(engine, trained_models, tmp_path, capsys):
    from crossdraft.cli import main

    d = save_model(trained_models["bpe"], "bpe", tmp_path / "target")
    text = engine.generate(PROMPT, 24, SamplingParams(), "none").text
    stop = text[5:8]
    assert main(["generate", PROMPT, "--target", str(d), "--algorithm", "none", "--max-new-tokens", "24",
                 "--stop", stop, "--json", "--threads", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["text"] == text[: text.index(stop)] and out["finish_reason"] == "stop"
    assert main(["generate", PROMPT, "--target", str(d), "--algorithm", "none", "--stop", ""]) == 2
    assert "non-empty" in capsys.readouterr().err


def test_a_stop_string_found_waits_for_a_longer_one_that_starts_earlier():
    """'a a' starts before ' ': once ' ' is seen, 'a a' may still complete and end the output earlier."""
    out, outs, cut = run([" ", "a a"], [b"a ", b"a"])
    assert out == b"" and cut.hit and cut.cut == 0 and outs == [b"", b""]
    out, outs, cut = run([" ", "a a"], [b"a ", b"b"])  # it does not: the output ends at ' '
    assert out == b"a" and cut.hit and cut.cut == 1
    out, _, cut = run([" ", "a a"], [b"a "])  # the generation ends first: flush settles it at ' '
    assert out == b"a" and cut.hit and cut.cut == 1
