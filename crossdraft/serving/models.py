"""Loading a model for a service: the tokenizer and a warmed runner, and how the service names them.

Never: imports grpc.
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger("crossdraft.services")


def load_warm(model: str, device=None, fast: bool = True, dtype=None) -> tuple:
    """(Vocab, Runner) of a model, warmed up by one short forward: what a service loads before SERVING.
    `dtype`: a torch dtype (`--dtype`, `options.model_dtype`); None: the device's default."""
    from crossdraft.runner import load_model, make_runner
    from crossdraft.vocab import Vocab

    vocab = Vocab.load(model)
    runner = make_runner(load_model(model, device, dtype), fast=fast)
    runner.forward([0], last_only=True)
    runner.reset()
    log.info("loaded %s: %s on %s, %s, context %d", model_id(model), dtype_name(runner), runner.device,
             type(runner).__name__, runner.max_length)
    return vocab, runner


def model_id(name_or_path: str) -> str:
    """A directory's name, or the Hub id as given."""
    p = os.path.expanduser(name_or_path)
    return os.path.basename(os.path.normpath(p)) if os.path.isdir(p) else name_or_path


def dtype_name(runner) -> str:
    return str(getattr(runner, "dtype", "")).replace("torch.", "")
