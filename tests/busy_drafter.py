"""A drafter that believes its verifier is busy, for tests/test_hand_back.py: `crossdraft serve drafter`
whose Verify streams report a load under which every draft is cut to nothing (`BUSY`: 8 sequences a pass,
every candidate a row of real work), whatever the verifier's verdicts say. Everything else is the real
drafter, so its sessions relay the target's own steps and, where the caller allows it, hand themselves
back (drafter_service/server.py). Run as `python tests/busy_drafter.py serve-drafter-args...`.

Test-only code: it patches the real link in this process and then runs the real CLI. It stands in for the
load of many sessions, which a test cannot make reproducibly on a shared CPU.
"""
from __future__ import annotations

import sys

from crossdraft.load import LoadHint
from drafter_service.link import RemoteVerifier

BUSY = LoadHint(sequences=8.0, fixed_s=0.016, token_s=0.002)


def main() -> int:
    RemoteVerifier.load = lambda self: BUSY
    from crossdraft.cli import main as cli

    return cli(["serve", "drafter", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
