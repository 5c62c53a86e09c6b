"""Tests that need something from outside the repository (grpcurl, the model zoo: tests/needs.py) fail
under CI when it is missing, and skip elsewhere, so that a broken install step cannot hide behind a skip."""
from __future__ import annotations

import os
import subprocess
import sys

import needs
import pytest
from test_services import ROOT


def test_grpcurl_missing_fails_under_ci_and_skips_elsewhere(monkeypatch):
    monkeypatch.setattr(needs.shutil, "which", lambda *a, **kw: None)  # as on a machine without it
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="grpcurl not found.*CI must provide it"):
        needs.grpcurl()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="grpcurl not found"):
        needs.grpcurl()


def test_grpcurl_comes_with_the_test_extra():
    out = subprocess.run([needs.grpcurl(), "-version"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "grpcurl" in out.stdout + out.stderr


@pytest.mark.parametrize("ci", [True, False], ids=["CI", "local"])
def test_zoo_tests_fail_under_ci_without_the_zoo(tmp_path, ci):
    """The zoo's tests themselves, run where no zoo is: under CI they fail, elsewhere they skip."""
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env.update(CROSSDRAFT_ZOO=str(tmp_path / "no-zoo"), **({"CI": "true"} if ci else {}))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", "tests/test_zoo.py",
           "tests/test_services.py::test_zoo_slem_greedy_identical"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    text = out.stdout + out.stderr
    assert f"model zoo not found at {tmp_path / 'no-zoo'}" in text, text[-3000:]
    if ci:
        assert out.returncode == 1 and " passed" not in text and "skipped" not in text, text[-3000:]
    else:
        assert out.returncode == 0 and "failed" not in text and "error" not in text, text[-3000:]


def test_the_zoo_is_found_from_a_worktree_too(monkeypatch):
    """Without $CROSSDRAFT_ZOO, the nearest shared/zoo above the repository: ../shared/zoo in the main
    checkout and on CI machines, further up from a worktree."""
    monkeypatch.delenv("CROSSDRAFT_ZOO", raising=False)
    path = needs.zoo_path()
    assert path.parts[-2:] == ("shared", "zoo") and path.parent.parent in ROOT.parents
