"""API keys and per-key limits of the gateway.

Owns:
- the keys file (`--api-keys FILE`): one key per line, `NAME:SHA256HEX` or `SHA256HEX` (named
  `key-` + its first 8 hex digits), `#` comments and blank lines ignored. Only hashes are stored; a key is
  hashed with `hash_key` (`crossdraft hash-key`). A client sends `authorization: Bearer KEY` metadata;
  the gateway hashes it and looks the hash up: the caller is the key's name.
- per-key limits: requests per minute (`--key-requests-per-minute`; a counter per key and minute, INCR +
  EXPIRE at `crossdraft:ratelimit:{NAME}:MINUTE` in Redis when sessions are there, so that every replica
  counts together; in memory otherwise) and concurrent sessions (`--key-max-sessions`; the key's
  sessions in a sorted set `crossdraft:keysessions:{NAME}` in Redis, in memory otherwise; an entry whose
  session has ended, or is gone, is dropped when counted, so a crashed replica leaks no slot).

Never: logs or stores a key (only its name).
"""
from __future__ import annotations

import hashlib
import re
import threading
import time
from typing import Optional

from crossdraft.errors import InvalidArgument, ResourceExhausted, Unauthenticated

_HEX = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
WINDOW_S = 60
PENDING_S = 60.0  # a slot taken this recently counts even before its session is in the store


def hash_key(key: str) -> str:
    """The SHA-256 hex digest of an API key: what a keys file holds."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def load_keys(path: str) -> dict:
    """A keys file -> {sha256 hex: name}."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise InvalidArgument(f"--api-keys {path}: cannot be read: {e.strerror}") from None
    out, names = {}, set()
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, digest = line.rpartition(":")
        digest = digest.strip().lower()
        name = name.strip() or f"key-{digest[:8]}"
        if not _HEX.match(digest):
            raise InvalidArgument(f"--api-keys {path}:{n}: expected NAME:SHA256HEX (64 hex digits; "
                                  f"`crossdraft hash-key` makes one), not a raw key")
        if not _NAME.match(name):
            raise InvalidArgument(f"--api-keys {path}:{n}: a name is 1-64 characters of A-Z a-z 0-9 _ . @ -")
        if digest in out or name in names:
            raise InvalidArgument(f"--api-keys {path}:{n}: key or name {name!r} given twice")
        out[digest] = name
        names.add(name)
    if not out:
        raise InvalidArgument(f"--api-keys {path}: no keys")
    return out


class ApiKeys:
    """Who is calling: the name of the key in a call's `authorization: Bearer KEY` metadata."""

    def __init__(self, hashes: dict):
        self.hashes = dict(hashes)

    def caller(self, metadata) -> str:
        value = ""
        for k, v in metadata or ():
            if k == "authorization":
                value = v if isinstance(v, str) else v.decode("latin-1")
                break
        scheme, _, key = value.strip().partition(" ")
        if not value or scheme.lower() != "bearer" or not key.strip():
            raise Unauthenticated("missing API key: send metadata `authorization: Bearer KEY`")
        name = self.hashes.get(hash_key(key.strip()))
        if name is None:
            raise Unauthenticated("invalid API key")
        return name


class KeyLimits:
    """Requests per minute and concurrent sessions per key name; 0 is no limit. `redis`: a redis-py client
    (shared state under `prefix`), or None (this process's memory)."""

    def __init__(self, store, requests_per_minute: int = 0, max_sessions: int = 0, redis=None,
                 prefix: str = "crossdraft:", clock=time.time):
        self.store, self.rpm, self.max_sessions = store, requests_per_minute, max_sessions
        self.redis, self.prefix, self.clock = redis, prefix, clock
        self._lock = threading.Lock()
        self._counts: dict = {}  # (name, minute) -> requests
        self._sessions: dict = {}  # name -> {session id: start time}

    @classmethod
    def for_store(cls, store, requests_per_minute: int = 0, max_sessions: int = 0) -> "KeyLimits":
        return cls(store, requests_per_minute, max_sessions, redis=getattr(store, "_r", None),
                   prefix=getattr(store, "prefix", "crossdraft:"))

    def _redis(self, fn, *args):
        return self.store._call(fn, *args)  # RedisStore: a connection failure is UNAVAILABLE with one line

    # --- requests per minute ------------------------------------------------------------------------
    def request(self, name: str) -> None:
        """Count one request of `name`; RESOURCE_EXHAUSTED past the limit of this minute."""
        if not self.rpm:
            return
        minute = int(self.clock() // WINDOW_S)
        if self.redis is not None:
            key = f"{self.prefix}ratelimit:{{{name}}}:{minute}"

            def incr():
                p = self.redis.pipeline(transaction=True)
                p.incr(key)
                p.expire(key, 2 * WINDOW_S)
                return p.execute()[0]
            n = self._redis(incr)
        else:
            with self._lock:
                for k in [k for k in self._counts if k[1] < minute]:
                    del self._counts[k]
                n = self._counts[(name, minute)] = self._counts.get((name, minute), 0) + 1
        if n > self.rpm:
            left = WINDOW_S - int(self.clock()) % WINDOW_S
            raise ResourceExhausted(f"API key {name!r} made more than {self.rpm} requests this minute; "
                                    f"retry in {left} s")

    # --- concurrent sessions ------------------------------------------------------------------------
    def _live(self, sid: str, taken: float) -> bool:
        try:
            s = self.store.get(sid, include_output=False)
        except InvalidArgument:
            return False
        if s is None:  # not created yet (being placed by another request), or gone
            return self.clock() - taken < PENDING_S
        return not s.terminal

    def acquire(self, name: str, sid: str) -> None:
        """Take a session slot of `name` for `sid` (before the session is created); RESOURCE_EXHAUSTED
        when the key already runs max_sessions sessions."""
        if not self.max_sessions:
            return
        if self.redis is not None:
            key = f"{self.prefix}keysessions:{{{name}}}"
            members = self._redis(self.redis.zrange, key, 0, -1, False, True)
            dead = [m.decode() for m, t in members if m.decode() != sid and not self._live(m.decode(), t)]
            if dead:
                self._redis(self.redis.zrem, key, *dead)
            self._redis(self.redis.zadd, key, {sid: self.clock()})
            n = self._redis(self.redis.zcard, key)
            if n > self.max_sessions:
                self._redis(self.redis.zrem, key, sid)
                self._full(name)
            self._redis(self.redis.expire, key, 7 * 24 * 3600)
            return
        with self._lock:
            mine = self._sessions.setdefault(name, {})
            for m in [m for m, t in mine.items() if not self._live(m, t)]:
                del mine[m]
            if len(mine) >= self.max_sessions:
                self._full(name)
            mine[sid] = self.clock()

    def release(self, name: str, sid: str) -> None:
        """Give back the slot taken for a session that was not created (a refusal before it)."""
        if not self.max_sessions:
            return
        if self.redis is not None:
            self._redis(self.redis.zrem, f"{self.prefix}keysessions:{{{name}}}", sid)
            return
        with self._lock:
            self._sessions.get(name, {}).pop(sid, None)

    def _full(self, name: str) -> None:
        raise ResourceExhausted(f"API key {name!r} runs at most {self.max_sessions} sessions at once")


def caller_of(keys: Optional[ApiKeys], context) -> str:
    """The calling key's name ('' when the gateway has no keys)."""
    if keys is None:
        return ""
    return keys.caller(context.invocation_metadata())
