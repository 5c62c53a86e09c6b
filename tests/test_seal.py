"""Verdict seals (crossdraft/seal.py): what they bind, the key file, the CLI. The end-to-end check, a
hostile drafter process behind a gateway, is tests/test_hostile_drafter.py."""
from __future__ import annotations

import os
import stat

import pytest

from crossdraft.cli import main
from crossdraft.errors import InvalidArgument
from crossdraft.seal import MIN_KEY_BYTES, Sealer, new_key_file

DELTA = dict(session_id="s1", offset=7, ids=[5, 9, 300], text=b"abc", finished=False, finish_reason="")


def test_a_seal_checks_only_for_the_same_delta_and_key():
    s = Sealer(b"k" * 32)
    seal = s.seal(**DELTA)
    assert len(seal) == 32 and s.check(seal, **DELTA)
    changed = [dict(DELTA, session_id="s2"), dict(DELTA, offset=8), dict(DELTA, ids=[5, 9, 301]),
               dict(DELTA, ids=[5, 9]), dict(DELTA, text=b"abd"), dict(DELTA, text=b"abc "),
               dict(DELTA, finished=True, finish_reason="eos"), dict(DELTA, finish_reason="length")]
    for d in changed:
        assert not s.check(seal, **d), d
    assert not Sealer(b"x" * 32).check(seal, **DELTA)
    assert not s.check(b"", **DELTA) and not s.check(seal[:-1], **DELTA)
    # the fields are length-prefixed: moving bytes between ids and text, or session id and text, changes it
    assert s.seal("s1", 0, [], b"ab", False, "") != s.seal("s1a", 0, [], b"b", False, "")


def test_key_file(tmp_path):
    path = new_key_file(str(tmp_path / "k"))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    a, b = Sealer.from_file(path), Sealer.from_file(path)
    assert a.seal(**DELTA) == b.seal(**DELTA)
    assert Sealer.from_file(new_key_file(str(tmp_path / "k2"))).seal(**DELTA) != a.seal(**DELTA)
    (tmp_path / "short").write_text("x" * (MIN_KEY_BYTES - 1) + "\n")
    with pytest.raises(InvalidArgument, match="at least"):
        Sealer.from_file(str(tmp_path / "short"))
    with pytest.raises(InvalidArgument, match="cannot read"):
        Sealer.from_file(str(tmp_path / "missing"))


def test_cli_new_verdict_key_and_a_bad_key_file(tmp_path, capsys):
    path = tmp_path / "verdict.key"
    assert main(["new-verdict-key", str(path)]) == 0 and len(path.read_text().strip()) == 64
    assert main(["new-verdict-key", str(path)]) == 2  # never overwrites a key in use
    assert "exists" in capsys.readouterr().err
    rc = main(["serve", "gateway", "--port", "0", "--drafters", "127.0.0.1:1", "--verifiers", "127.0.0.1:2",
               "--verdict-key-file", str(tmp_path / "missing")])
    assert rc == 2 and "cannot read the verdict key file" in capsys.readouterr().err
