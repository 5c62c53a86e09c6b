"""pyproject.toml's dependency ranges admit only releases the code runs on.

For each torch feature the code calls, the first torch release that has it: the floor of the torch range
must not be below it, or `pip install crossdraft` can pick a torch that fails at the first forward pass."""
from __future__ import annotations

from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("crossdraft", "drafter_service", "verifier_service", "gateway")
# what the code writes -> the torch release that introduced it
TORCH_FEATURES = {
    "dtype.itemsize": "2.1",  # torch.dtype.itemsize (the KV budget's bytes per position, runner.py)
}


def requirement(name: str) -> Requirement:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (req,) = [r for r in map(Requirement, deps) if r.name == name]
    return req


def floor(req: Requirement) -> Version:
    bounds = [Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=")]
    assert bounds, f"{req} has no lower bound"
    return max(bounds)


def sources():
    for pkg in PACKAGES:
        yield from (ROOT / pkg).rglob("*.py")


def test_torch_floor_has_every_feature_the_code_calls():
    torch_floor = floor(requirement("torch"))
    for feature, since in TORCH_FEATURES.items():
        users = sorted(str(p.relative_to(ROOT)) for p in sources() if feature in p.read_text())
        if users:
            assert torch_floor >= Version(since), \
                f"{', '.join(users)} call {feature}, new in torch {since}, but pyproject.toml allows torch {torch_floor}"


def test_the_feature_table_is_not_stale():
    """Every feature listed is still called somewhere (so the table stays the list of reasons for the floor)."""
    text = "".join(p.read_text() for p in sources())
    assert all(feature in text for feature in TORCH_FEATURES)
