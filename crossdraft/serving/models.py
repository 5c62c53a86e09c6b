"""Loading a model for a service: the tokenizer and a warmed runner, and how the service names them.

Never: imports grpc.
"""
from __future__ import annotations

import os


def load_warm(model: str, device=None, fast: bool = True) -> tuple:
    """(Vocab, Runner) of a model, warmed up by one short forward: what a service loads before SERVING."""
    from crossdraft.runner import load_model, make_runner
    from crossdraft.vocab import Vocab

    vocab = Vocab.load(model)
    runner = make_runner(load_model(model, device), fast=fast)
    runner.forward([0], last_only=True)
    runner.reset()
    return vocab, runner


def model_id(name_or_path: str) -> str:
    """A directory's name, or the Hub id as given."""
    p = os.path.expanduser(name_or_path)
    return os.path.basename(os.path.normpath(p)) if os.path.isdir(p) else name_or_path


def dtype_name(runner) -> str:
    return str(getattr(runner, "dtype", "")).replace("torch.", "")
