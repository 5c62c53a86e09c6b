"""Test configuration: import path, one torch thread, shared fixtures (trained tiny models)."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the package need not be installed to run the tests
    sys.path.insert(0, str(ROOT))
TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

# Tiny models run fastest on one thread, and a second thread spinning against another busy process
# can make a step 10-50x slower on a 2-core machine. The zoo test raises it for the larger target.
torch.set_num_threads(1)
warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True to a scalar")


@pytest.fixture(scope="session")
def trained_models():
    """Tiny Llama models (float64) briefly trained on the synthetic corpus, one per tokenizer:
    {"bpe": target, "bpe_small": a smaller drafter with the target's tokenizer, "spm", "bpe_alt", "ascii"}.
    About 10 s in all on one core."""
    import helpers

    out = {}
    specs = [("bpe", "bpe", 64, 200, 0), ("bpe_small", "bpe", 32, 150, 5), ("spm", "spm", 48, 150, 1),
             ("bpe_alt", "bpe_alt", 48, 150, 2), ("ascii", "ascii", 48, 150, 3)]
    for key, tok_name, hidden, steps, seed in specs:
        hf = helpers.TOKENIZERS[tok_name]()
        model = helpers.tiny_llama(len(hf), seed=seed, hidden=hidden, eos=hf.eos_token_id)
        out[key], _ = helpers.train_tiny(model, hf, steps=steps, seed=seed)
    return out


# `redis_server`: a real redis-server for the session store and the services (tests/redis_fixture.py)
pytest_plugins = ["redis_fixture"]
