"""Loading a model for a service: the tokenizer and a warmed runner, and how the service names them.

Never: imports grpc.
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger("crossdraft.services")



def load_warm(model: str, device=None, fast: bool = True, dtype=None, max_length=None, kv_dtype=None) -> tuple:
    """(Vocab, Runner) of a model, warmed up by one short forward: what a service loads before SERVING.
    `dtype`: a torch dtype (`--dtype`, `options.model_dtype`); None: the device's default. `max_length`:
    the context a session may use (--max-model-len; default: the model's own). `kv_dtype`: what its KV
    caches hold (--kv-dtype; None: the model's dtype)."""
    from crossdraft.errors import InvalidArgument
    from crossdraft.runner import load_model, make_runner
    from crossdraft.vocab import Vocab

    vocab = Vocab.load(model)
    loaded = load_model(model, device, dtype)
    own = getattr(loaded.config, "max_position_embeddings", None)
    if max_length is not None and (max_length < 2 or (own and max_length > own)):
        raise InvalidArgument(f"--max-model-len must be in [2, {own}] for {model}, got {max_length}")
    runner = make_runner(loaded, max_length, fast=fast, kv_dtype=kv_dtype)
    runner.forward([0], last_only=True)
    runner.reset()
    log.info("loaded %s: %s on %s, KV caches %s, %s, context %d", model_id(model), dtype_name(runner), runner.device,
             dtype_name(runner, "kv_dtype"), type(runner).__name__, runner.max_length)
    return vocab, runner


def model_id(name_or_path: str) -> str:
    """A directory's name, or the Hub id as given."""
    p = os.path.expanduser(name_or_path)
    return os.path.basename(os.path.normpath(p)) if os.path.isdir(p) else name_or_path


def dtype_name(runner, what: str = "dtype") -> str:
    return str(getattr(runner, what, "")).replace("torch.", "")
