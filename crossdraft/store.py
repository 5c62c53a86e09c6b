"""Session store: the state of a generation that outlives one process (gateway, drafter, verifier).

Owns: per session the request (as JSON), status, owner, committed target token ids, committed text
(bytes), counters, timestamps, finish reason, error message, the result the final commit records
(JSON: for the gateway, the resolved algorithm, why, and the drafter's statistics, so any replica can
report them), a TTL on all of it, and an append-only
stream of output events a client can re-attach to from any offset. Two implementations with the same
semantics: `MemoryStore` (in-process, thread-safe: the embedded single-process mode) and `RedisStore`.

The commit is the one write that matters: one atomic step (a Lua script in Redis, a lock in memory)
that checks the committed length equals `expected_len`, appends ids and text, bumps counters, appends
an event, sets the status and refreshes the TTL. A retried commit (the same arguments as the last one
applied) returns the same new length without applying twice; any other commit at a stale length raises
`Conflict`. So a retried or duplicated commit can neither lose nor repeat tokens.

Redis layout (prefix `crossdraft:` by default; `{id}` is a literal hash tag, so all of a session's
keys live in one Redis Cluster slot and the scripts may touch them together):
    crossdraft:session:{id}          hash: request (JSON), owner, status, counters, timestamps,
                                     finish_reason, error, result (JSON), resume (JSON), event_seq,
                                     last_expected, last_digest
    crossdraft:session:{id}:ids      string: committed target ids, little-endian int32, APPENDed
    crossdraft:session:{id}:text     string: committed text bytes, APPENDed
    crossdraft:session:{id}:events   stream: one entry per output event, entry id `{offset}-{seq}`
Every key gets the same TTL (PEXPIRE), refreshed by every write.

Never: imports redis at module level (RedisStore imports it when constructed, so the core works
without it), imports grpc, or knows about models and algorithms.
"""
from __future__ import annotations

import hashlib
import json
import struct
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Optional

from .errors import (  # noqa: F401 - AlreadyExists and Unavailable are part of this module's API
    Aborted, AlreadyExists, CrossdraftError, FailedPrecondition, InvalidArgument, NotFound, Unavailable)

STATUSES = ("queued", "running", "done", "cancelled", "failed")
TERMINAL = frozenset({"done", "cancelled", "failed"})
COUNTERS = ("rounds", "draft_tokens", "accepted_tokens", "drafted")
DEFAULT_TTL_S = 24 * 3600.0
MAX_RESULT_BYTES = 16 << 10  # the final commit's result (algorithm, why, statistics), as JSON
MAX_RESUME_BYTES = 1 << 10  # what a commit records to resume the session from (e.g. the draft length)
_MAX_ID_LEN = 200
_MAX_TOKEN_ID = 2**31 - 1  # ids are stored as int32


class Conflict(Aborted):
    """A commit at a stale length that is not a replay of the last commit: another writer got there
    first, or the caller's view is out of date. Re-read the session before going on."""

    def __init__(self, message: str, expected: int = -1, actual: int = -1):
        super().__init__(message)
        self.expected, self.actual = expected, actual


class SessionClosed(FailedPrecondition):
    """A write to a session that is already done, cancelled or failed."""

    def __init__(self, message: str, status: str = ""):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Event:
    """One output event. `offset` is the committed length after it; `ids` the target ids it added
    (positions `offset - len(ids)` .. `offset - 1`), `text` the bytes it added; the final event of a
    session has `final` set and a `finish_reason` ("eos", "length", "cancelled", "error", ...)."""

    offset: int
    ids: tuple
    text: bytes
    final: bool = False
    finish_reason: str = ""

    @property
    def start(self) -> int:
        return self.offset - len(self.ids)


@dataclass
class Session:
    id: str
    request: dict
    owner: str
    status: str
    length: int  # committed target ids
    ids: list = field(default_factory=list)  # empty when read with include_output=False
    text: bytes = b""  # idem
    counters: dict = field(default_factory=dict)  # COUNTERS -> int
    created: float = 0.0  # unix seconds
    updated: float = 0.0
    finished: Optional[float] = None
    finish_reason: str = ""
    error: str = ""
    result: dict = field(default_factory=dict)  # what the final commit recorded (e.g. algorithm, why, stats)
    resume: dict = field(default_factory=dict)  # what the last commit recorded to resume from (e.g. draft length)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


def _keep(ev: Event, after_offset: int) -> bool:
    """Events a client holding `after_offset` committed ids has not seen: those that end beyond it, and
    the final event when it ends exactly there (so a re-attach to a finished session learns so)."""
    return ev.offset > after_offset or (ev.final and ev.offset == after_offset)


class SessionStore(ABC):
    """The interface. All methods are thread-safe; session ids are 1-200 printable ASCII characters
    without whitespace or braces.

    create(id, request, owner) -> Session      AlreadyExists if it exists; nothing written on failure
    get(id, include_output=True) -> Session | None
    commit(id, expected_len, ids, text, counters, finished, finish_reason) -> new length
        applies iff the committed length is expected_len; counters are increments of COUNTERS; status
        becomes running, or done with finish_reason when finished. A replay (all arguments equal to
        the last commit applied, even after the session closed) returns that commit's length and
        changes nothing; so two identical empty commits in a row count once. Raises NotFound,
        Conflict (stale length, incl. a replay of an older commit), SessionClosed.
    set_status(id, status, error="", finish_reason="") -> Session status after the call
        a terminal status appends a final event; setting a terminal session's own status again is a
        no-op, any other change of a terminal session raises SessionClosed.
    cancel(id) -> bool                         True if this call cancelled it; False if already terminal
    cancelled(id) -> bool                      NotFound if missing
    read_events(id, after_offset=0, block_ms=0) -> list[Event]
        events not yet seen by a client holding `after_offset` ids, in order: those with
        offset > after_offset (one that starts before it comes whole: skip `after_offset - start`
        ids) and the final event if it ends at after_offset. When there are none, waits up to
        block_ms for one. NotFound if the session does not exist.
    delete(id) -> bool                         whether it existed
    ping() -> bool                             Unavailable if the store cannot be reached
    Any method of RedisStore raises Unavailable when Redis cannot be reached or times out.
    """

    ttl_s: float

    @abstractmethod
    def create(self, session_id: str, request: dict, owner: str = "") -> Session: ...

    @abstractmethod
    def get(self, session_id: str, include_output: bool = True) -> Optional[Session]: ...

    @abstractmethod
    def commit(self, session_id: str, expected_len: int, ids: list, text: bytes = b"",
               counters: Optional[dict] = None, finished: bool = False, finish_reason: str = "",
               result: Optional[dict] = None, resume: Optional[dict] = None) -> int: ...

    def set_status(self, session_id: str, status: str, error: str = "", finish_reason: str = "") -> str:
        return self._set_status(session_id, status, error, finish_reason)[1]

    def cancel(self, session_id: str) -> bool:
        return self._set_status(session_id, "cancelled", "", "cancelled", cancel=True)[0]

    def cancelled(self, session_id: str) -> bool:
        s = self.get(session_id, include_output=False)
        if s is None:
            raise NotFound(f"session {session_id!r} not found")
        return s.status == "cancelled"

    @abstractmethod
    def claim(self, session_id: str, owner: str, stale_s: float) -> bool:
        """Take over a session whose owner stopped writing: if it is queued or running and was last
        written more than `stale_s` seconds ago, make `owner` its owner (and touch it) and return True;
        else change nothing and return False. Atomic: of replicas claiming at once, one wins."""

    def touch(self, session_id: str) -> None:
        """The owner is alive (between commits, e.g. while failing over): refresh `updated`."""
        self._set_status(session_id, "running", "", "")

    @abstractmethod
    def read_events(self, session_id: str, after_offset: int = 0, block_ms: int = 0) -> list: ...

    @abstractmethod
    def delete(self, session_id: str) -> bool: ...

    @abstractmethod
    def ping(self) -> bool: ...

    def close(self) -> None:
        pass

    @abstractmethod
    def _set_status(self, session_id: str, status: str, error: str, finish_reason: str,
                    cancel: bool = False) -> tuple:
        """-> (whether this call changed the status, the status after it)"""

    # -- shared validation --------------------------------------------------------------------------

    @staticmethod
    def _check_id(session_id) -> None:
        if (not isinstance(session_id, str) or not 0 < len(session_id) <= _MAX_ID_LEN
                or any(not (33 <= ord(c) <= 126) or c in "{}" for c in session_id)):
            raise InvalidArgument(f"session id must be 1-{_MAX_ID_LEN} printable ASCII characters without "
                                  f"spaces or braces, got {session_id!r:.60}")

    @staticmethod
    def _request_json(request, owner) -> str:
        if not isinstance(request, dict):
            raise InvalidArgument(f"request must be a dict, got {type(request).__name__}")
        if not isinstance(owner, str):
            raise InvalidArgument(f"owner must be a string, got {type(owner).__name__}")
        try:
            return json.dumps(request, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise InvalidArgument(f"request is not JSON-serializable: {e}") from None

    @staticmethod
    def _check_read(after_offset, block_ms) -> None:
        for name, v in (("after_offset", after_offset), ("block_ms", block_ms)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise InvalidArgument(f"{name} must be an int >= 0, got {v!r}")

    @staticmethod
    def _check_status(status: str, error: str, finish_reason: str) -> str:
        if not isinstance(error, str) or not isinstance(finish_reason, str):
            raise InvalidArgument("error and finish_reason must be strings")
        if status not in STATUSES:
            raise InvalidArgument(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
        if status in TERMINAL and not finish_reason:
            finish_reason = {"cancelled": "cancelled", "failed": "error", "done": "stop"}[status]
        return finish_reason

    @staticmethod
    def _pack_commit(expected_len, ids, text, counters, finished, finish_reason, result=None, resume=None):
        """Validate a commit; return (ids as int32 LE bytes, text, counter increments, finished,
        finish_reason, result as JSON or "", resume as JSON or "", digest)."""
        if isinstance(expected_len, bool) or not isinstance(expected_len, int) or expected_len < 0:
            raise InvalidArgument(f"expected_len must be an int >= 0, got {expected_len!r}")
        ids = list(ids)
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t <= _MAX_TOKEN_ID:
                raise InvalidArgument(f"token ids must be ints in [0, 2^31), got {t!r}")
        if isinstance(text, str):
            text = text.encode("utf-8")
        if not isinstance(text, (bytes, bytearray)):
            raise InvalidArgument(f"text must be bytes, got {type(text).__name__}")
        text = bytes(text)
        inc = [0] * len(COUNTERS)
        for k, v in (counters or {}).items():
            if k not in COUNTERS:
                raise InvalidArgument(f"unknown counter {k!r}; counters are {', '.join(COUNTERS)}")
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise InvalidArgument(f"counter {k} must be an int >= 0, got {v!r}")
            inc[COUNTERS.index(k)] = v
        if not isinstance(finish_reason, str):
            raise InvalidArgument("finish_reason must be a string")
        finished = bool(finished)
        if finished and not finish_reason:
            finish_reason = "stop"
        result_json = ""
        if result:
            if not finished:
                raise InvalidArgument("a result is recorded by the final commit only")
            try:
                result_json = json.dumps(result, sort_keys=True, separators=(",", ":"))
            except (TypeError, ValueError) as e:
                raise InvalidArgument(f"the result must be JSON-serialisable: {e}") from None
            if len(result_json) > MAX_RESULT_BYTES:
                raise InvalidArgument(f"the result is {len(result_json)} bytes of JSON, at most {MAX_RESULT_BYTES}")
        resume_json = ""
        if resume:
            try:
                resume_json = json.dumps(resume, sort_keys=True, separators=(",", ":"))
            except (TypeError, ValueError) as e:
                raise InvalidArgument(f"the resume state must be JSON-serialisable: {e}") from None
            if len(resume_json) > MAX_RESUME_BYTES:
                raise InvalidArgument(f"the resume state is {len(resume_json)} bytes of JSON, at most {MAX_RESUME_BYTES}")
        blob = struct.pack(f"<{len(ids)}i", *ids)
        h = hashlib.sha1()
        for part in (str(expected_len).encode(), blob, text, ",".join(map(str, inc)).encode(),
                     b"1" if finished else b"0", finish_reason.encode(), result_json.encode(), resume_json.encode()):
            h.update(len(part).to_bytes(8, "little"))
            h.update(part)
        return blob, text, inc, finished, finish_reason, result_json, resume_json, h.hexdigest()


# ------------------------------------------------------------------------------------------------------
class _Rec:
    __slots__ = ("request", "owner", "status", "ids", "text", "counters", "created", "updated",
                 "finished", "finish_reason", "error", "result", "resume", "events", "last", "expires")

    def __init__(self, request_json, owner, now, expires):
        self.request, self.owner, self.status = request_json, owner, "queued"
        self.ids, self.text = [], bytearray()
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.created = self.updated = now
        self.finished, self.finish_reason, self.error, self.result, self.resume = None, "", "", "", ""
        self.events: list = []
        self.last = None  # (expected_len, digest) of the last commit applied
        self.expires = expires


class MemoryStore(SessionStore):
    """In-process store: one lock and one condition for all sessions. Expiry is lazy (a session past
    its TTL reads as missing and is dropped when touched or on the next create)."""

    def __init__(self, ttl_s: float = DEFAULT_TTL_S):
        if not ttl_s > 0:
            raise InvalidArgument(f"ttl_s must be > 0, got {ttl_s!r}")
        self.ttl_s = float(ttl_s)
        self._sessions: dict = {}
        self._cond = threading.Condition(threading.Lock())

    def _live(self, sid) -> Optional[_Rec]:
        rec = self._sessions.get(sid)
        if rec is not None and time.monotonic() >= rec.expires:
            del self._sessions[sid]
            return None
        return rec

    def _touch(self, rec: _Rec, now: float) -> None:
        rec.updated = now
        rec.expires = time.monotonic() + self.ttl_s

    def create(self, session_id, request, owner=""):
        self._check_id(session_id)
        req = self._request_json(request, owner)
        now = time.time()
        with self._cond:
            mono = time.monotonic()
            for k in [k for k, r in self._sessions.items() if mono >= r.expires]:
                del self._sessions[k]
            if session_id in self._sessions:
                raise AlreadyExists(f"session {session_id!r} already exists")
            self._sessions[session_id] = rec = _Rec(req, owner, now, mono + self.ttl_s)
            return self._snapshot(session_id, rec, True)

    @staticmethod
    def _snapshot(sid, rec: _Rec, include_output: bool) -> Session:
        return Session(id=sid, request=json.loads(rec.request), owner=rec.owner, status=rec.status,
                       length=len(rec.ids), ids=list(rec.ids) if include_output else [],
                       text=bytes(rec.text) if include_output else b"", counters=dict(rec.counters),
                       created=rec.created, updated=rec.updated, finished=rec.finished,
                       finish_reason=rec.finish_reason, error=rec.error,
                       result=json.loads(rec.result) if rec.result else {},
                       resume=json.loads(rec.resume) if rec.resume else {})

    def get(self, session_id, include_output=True):
        self._check_id(session_id)
        with self._cond:
            rec = self._live(session_id)
            return None if rec is None else self._snapshot(session_id, rec, include_output)

    def commit(self, session_id, expected_len, ids, text=b"", counters=None, finished=False, finish_reason="",
               result=None, resume=None):
        self._check_id(session_id)
        blob, text, inc, finished, finish_reason, result_json, resume_json, digest = self._pack_commit(
            expected_len, ids, text, counters, finished, finish_reason, result, resume)
        ids = list(struct.unpack(f"<{len(blob) // 4}i", blob))
        now = time.time()
        with self._cond:
            rec = self._live(session_id)
            if rec is None:
                raise NotFound(f"session {session_id!r} not found")
            if rec.last == (expected_len, digest):
                return len(rec.ids)  # a replay of the last commit: already applied
            if rec.status in TERMINAL:
                raise SessionClosed(f"session {session_id!r} is {rec.status}", rec.status)
            if len(rec.ids) != expected_len:
                raise Conflict(f"session {session_id!r}: commit expected length {expected_len}, "
                               f"committed length is {len(rec.ids)}", expected_len, len(rec.ids))
            rec.ids.extend(ids)
            rec.text += text
            for k, v in zip(COUNTERS, inc):
                rec.counters[k] += v
            rec.status = "done" if finished else "running"
            if resume_json:
                rec.resume = resume_json
            if finished:
                rec.finished, rec.finish_reason, rec.result = now, finish_reason, result_json
            rec.last = (expected_len, digest)
            rec.events.append(Event(len(rec.ids), tuple(ids), text, finished, finish_reason if finished else ""))
            self._touch(rec, now)
            self._cond.notify_all()
            return len(rec.ids)

    def _set_status(self, session_id, status, error, finish_reason, cancel=False):
        self._check_id(session_id)
        finish_reason = self._check_status(status, error, finish_reason)
        now = time.time()
        with self._cond:
            rec = self._live(session_id)
            if rec is None:
                raise NotFound(f"session {session_id!r} not found")
            if rec.status in TERMINAL:
                if cancel or rec.status == status:
                    return False, rec.status
                raise SessionClosed(f"session {session_id!r} is {rec.status}", rec.status)
            rec.status = status
            if status in TERMINAL:
                rec.finished, rec.finish_reason, rec.error = now, finish_reason, error
                rec.events.append(Event(len(rec.ids), (), b"", True, finish_reason))
                self._cond.notify_all()
            self._touch(rec, now)
            return True, status

    def claim(self, session_id, owner, stale_s):
        self._check_id(session_id)
        now = time.time()
        with self._cond:
            rec = self._live(session_id)
            if rec is None:
                raise NotFound(f"session {session_id!r} not found")
            if rec.status in TERMINAL or now - rec.updated <= stale_s:
                return False
            rec.owner, rec.status = owner, "running"
            self._touch(rec, now)
            return True

    def read_events(self, session_id, after_offset=0, block_ms=0):
        self._check_id(session_id)
        self._check_read(after_offset, block_ms)
        deadline = time.monotonic() + block_ms / 1000
        with self._cond:
            rec = self._live(session_id)
            if rec is None:
                raise NotFound(f"session {session_id!r} not found")
            while True:
                out = [e for e in rec.events if _keep(e, after_offset)]
                left = deadline - time.monotonic()
                if out or left <= 0:
                    return out
                self._cond.wait(left)
                if self._live(session_id) is not rec:  # deleted or expired while waiting
                    return []

    def delete(self, session_id):
        self._check_id(session_id)
        with self._cond:
            existed = self._live(session_id) is not None
            self._sessions.pop(session_id, None)
            self._cond.notify_all()
            return existed

    def ping(self):
        return True


# ------------------------------------------------------------------------------------------------------
# KEYS: 1 hash, 2 ids, 3 text, 4 events (all scripts). Errors are returned as {tag, value}, not raised,
# so that the client maps them to typed errors; every branch that writes also refreshes every TTL.
_LUA_TTL = """
local function ttl(ms)
  for i = 1, 4 do redis.call('PEXPIRE', KEYS[i], ms) end
end
-- the key that does not hold the type this store writes there (someone else wrote it), or nil
local function corrupt()
  local want = {'hash', 'string', 'string', 'stream'}
  for i = 1, 4 do
    local t = redis.call('TYPE', KEYS[i])['ok']
    if t ~= want[i] and t ~= 'none' then return KEYS[i] end
  end
  return nil
end
"""

# ARGV: request, owner, now, ttl_ms
_LUA_CREATE = _LUA_TTL + """
if redis.call('EXISTS', KEYS[1]) == 1 then return {'exists', 0} end
local bad = corrupt()
if bad then return {'corrupt', bad} end
redis.call('HSET', KEYS[1], 'request', ARGV[1], 'owner', ARGV[2], 'status', 'queued',
  'rounds', 0, 'draft_tokens', 0, 'accepted_tokens', 0, 'drafted', 0,
  'created', ARGV[3], 'updated', ARGV[3], 'finished', '', 'finish_reason', '', 'error', '', 'result', '',
  'event_seq', 0, 'last_expected', '', 'last_digest', '')
redis.call('SET', KEYS[2], '')
redis.call('SET', KEYS[3], '')
ttl(ARGV[4])
return {'ok', 0}
"""

# ARGV: expected_len, ids (int32 LE), text, rounds, draft_tokens, accepted_tokens, drafted,
#       finished ('1'/'0'), finish_reason, digest, now, ttl_ms, result (JSON, final commit only),
#       resume (JSON or '': kept from the last commit that had one)
_LUA_COMMIT = _LUA_TTL + """
local h = KEYS[1]
if redis.call('EXISTS', h) == 0 then return {'missing', 0} end
local bad = corrupt()
if bad then return {'corrupt', bad} end
local st = redis.call('HMGET', h, 'status', 'last_expected', 'last_digest')
local len = redis.call('STRLEN', KEYS[2]) / 4
if st[2] == ARGV[1] and st[3] == ARGV[10] then return {'replay', len} end
if st[1] == 'done' or st[1] == 'cancelled' or st[1] == 'failed' then return {'closed', st[1]} end
if len ~= tonumber(ARGV[1]) then return {'conflict', len} end
local newlen = len + #ARGV[2] / 4
local seq = tonumber(redis.call('HGET', h, 'event_seq')) + 1
local reason = ''
if ARGV[8] == '1' then reason = ARGV[9] end
-- all checks are done: from here no call can fail (types checked, stream ids increase), so the
-- script applies everything or, having returned above, nothing
redis.call('XADD', KEYS[4], newlen .. '-' .. seq, 'ids', ARGV[2], 'text', ARGV[3], 'final', ARGV[8],
  'reason', reason)
if #ARGV[2] > 0 then redis.call('APPEND', KEYS[2], ARGV[2]) end
if #ARGV[3] > 0 then redis.call('APPEND', KEYS[3], ARGV[3]) end
redis.call('HINCRBY', h, 'rounds', ARGV[4])
redis.call('HINCRBY', h, 'draft_tokens', ARGV[5])
redis.call('HINCRBY', h, 'accepted_tokens', ARGV[6])
redis.call('HINCRBY', h, 'drafted', ARGV[7])
redis.call('HSET', h, 'event_seq', seq)
if ARGV[8] == '1' then
  redis.call('HSET', h, 'status', 'done', 'finished', ARGV[11], 'finish_reason', reason, 'result', ARGV[13])
else
  redis.call('HSET', h, 'status', 'running')
end
redis.call('HSET', h, 'updated', ARGV[11], 'last_expected', ARGV[1], 'last_digest', ARGV[10])
if #ARGV[14] > 0 then redis.call('HSET', h, 'resume', ARGV[14]) end
ttl(ARGV[12])
return {'ok', newlen}
"""

# ARGV: status, error, finish_reason, now, ttl_ms, cancel ('1'/'0')
_LUA_STATUS = _LUA_TTL + """
local h = KEYS[1]
if redis.call('EXISTS', h) == 0 then return {'missing', ''} end
local bad = corrupt()
if bad then return {'corrupt', bad} end
local cur = redis.call('HGET', h, 'status')
if cur == 'done' or cur == 'cancelled' or cur == 'failed' then
  if ARGV[6] == '1' or cur == ARGV[1] then return {'noop', cur} end
  return {'closed', cur}
end
if ARGV[1] == 'done' or ARGV[1] == 'cancelled' or ARGV[1] == 'failed' then
  local len = redis.call('STRLEN', KEYS[2]) / 4
  local seq = tonumber(redis.call('HGET', h, 'event_seq')) + 1
  redis.call('XADD', KEYS[4], len .. '-' .. seq, 'ids', '', 'text', '', 'final', '1', 'reason', ARGV[3])
  redis.call('HSET', h, 'event_seq', seq, 'finished', ARGV[4], 'finish_reason', ARGV[3], 'error', ARGV[2])
end
redis.call('HSET', h, 'status', ARGV[1], 'updated', ARGV[4])
ttl(ARGV[5])
return {'ok', ARGV[1]}
"""


# ARGV: owner, now, stale_s, ttl_ms
_LUA_CLAIM = _LUA_TTL + """
local h = KEYS[1]
if redis.call('EXISTS', h) == 0 then return {'missing', ''} end
local bad = corrupt()
if bad then return {'corrupt', bad} end
local st = redis.call('HMGET', h, 'status', 'updated')
if st[1] ~= 'queued' and st[1] ~= 'running' then return {'no', st[1]} end
if tonumber(ARGV[2]) - tonumber(st[2]) <= tonumber(ARGV[3]) then return {'no', st[1]} end
redis.call('HSET', h, 'owner', ARGV[1], 'status', 'running', 'updated', ARGV[2])
ttl(ARGV[4])
return {'ok', ''}
"""


class RedisStore(SessionStore):
    """Sessions in Redis (standalone, or Cluster: a session's keys share a hash tag). Any connection
    failure or timeout raises `Unavailable` with one line; the scripts make every write all-or-nothing,
    and a commit retried after a lost reply is recognised as a replay."""

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", ttl_s: float = DEFAULT_TTL_S,
                 prefix: str = "crossdraft:", connect_timeout_s: float = 2.0, socket_timeout_s: float = 10.0,
                 client=None):
        try:
            import redis  # the one place the core imports redis
        except ImportError:
            raise FailedPrecondition("RedisStore needs the redis package (pip install redis)") from None
        if not ttl_s > 0:
            raise InvalidArgument(f"ttl_s must be > 0, got {ttl_s!r}")
        if not prefix or any(c in prefix for c in "{} "):
            raise InvalidArgument(f"prefix must be non-empty without braces or spaces, got {prefix!r}")
        self.ttl_s, self.prefix = float(ttl_s), prefix
        self._ttl_ms = str(max(1, int(round(ttl_s * 1000))))
        self._exc = redis.exceptions
        if client is None:
            try:
                client = redis.Redis.from_url(url, socket_connect_timeout=connect_timeout_s,
                                              socket_timeout=socket_timeout_s, protocol=2)
            except ValueError as e:
                raise InvalidArgument(f"bad Redis URL: {e}") from None
        self._r = client
        kw = client.connection_pool.connection_kwargs
        self._where = kw.get("path") or f"{kw.get('host', '?')}:{kw.get('port', '?')}"  # never the password
        # XREAD BLOCK is cut into chunks that finish well within the socket timeout
        self._block_chunk_ms = max(1, int((socket_timeout_s or 10.0) * 500))
        self._create = client.register_script(_LUA_CREATE)
        self._commit = client.register_script(_LUA_COMMIT)
        self._status = client.register_script(_LUA_STATUS)
        self._claim = client.register_script(_LUA_CLAIM)

    def _keys(self, sid: str) -> list:
        base = f"{self.prefix}session:{{{sid}}}"
        return [base, base + ":ids", base + ":text", base + ":events"]

    def _call(self, fn, *args, **kw):
        try:
            return fn(*args, **kw)
        except (self._exc.ConnectionError, self._exc.TimeoutError) as e:
            msg = " ".join(str(e).split()) or type(e).__name__
            raise Unavailable(f"session store unavailable (redis at {self._where}): {msg}") from None
        except self._exc.RedisError as e:
            msg = " ".join(str(e).split()) or type(e).__name__
            raise CrossdraftError(f"session store error (redis at {self._where}): {msg:.300}") from None

    def _script(self, script, session_id, args) -> tuple:
        """Run a script on the session's keys -> (tag, value); a corrupted session raises."""
        tag, val = self._call(script, keys=self._keys(session_id), args=args)
        tag, val = tag.decode(), (val.decode() if isinstance(val, bytes) else val)
        if tag == "corrupt":
            raise CrossdraftError(f"session {session_id!r} is corrupted in redis at {self._where}: "
                                  f"key {val} holds a value of the wrong type")
        return tag, val

    def create(self, session_id, request, owner=""):
        self._check_id(session_id)
        req = self._request_json(request, owner)
        now = time.time()
        tag, _ = self._script(self._create, session_id, [req, owner, repr(now), self._ttl_ms])
        if tag == "exists":
            raise AlreadyExists(f"session {session_id!r} already exists")
        return Session(id=session_id, request=json.loads(req), owner=owner, status="queued", length=0,
                       counters=dict.fromkeys(COUNTERS, 0), created=now, updated=now)

    def get(self, session_id, include_output=True):
        self._check_id(session_id)
        h, kids, ktext, _ = self._keys(session_id)

        def snapshot():
            p = self._r.pipeline(transaction=True)
            p.hgetall(h)
            if include_output:
                p.get(kids)
                p.get(ktext)
            else:
                p.strlen(kids)
            return p.execute()

        res = self._call(snapshot)
        f = {k.decode(): v for k, v in res[0].items()}
        if not f:
            return None
        if include_output:
            blob, text = res[1] or b"", res[2] or b""
            ids, length = list(struct.unpack(f"<{len(blob) // 4}i", blob)), len(blob) // 4
        else:
            ids, text, length = [], b"", res[1] // 4
        def s(k):
            return f.get(k, b"").decode()

        return Session(id=session_id, request=json.loads(f["request"]), owner=s("owner"), status=s("status"),
                       length=length, ids=ids, text=bytes(text),
                       counters={k: int(f.get(k, 0)) for k in COUNTERS},
                       created=float(f["created"]), updated=float(f["updated"]),
                       finished=float(f["finished"]) if f.get("finished") else None,
                       finish_reason=s("finish_reason"), error=s("error"),
                       result=json.loads(f["result"]) if f.get("result") else {},
                       resume=json.loads(f["resume"]) if f.get("resume") else {})

    def commit(self, session_id, expected_len, ids, text=b"", counters=None, finished=False, finish_reason="",
               result=None, resume=None):
        self._check_id(session_id)
        blob, text, inc, finished, finish_reason, result_json, resume_json, digest = self._pack_commit(
            expected_len, ids, text, counters, finished, finish_reason, result, resume)
        args = [str(expected_len), blob, text, *map(str, inc), "1" if finished else "0", finish_reason,
                digest, repr(time.time()), self._ttl_ms, result_json, resume_json]
        tag, val = self._script(self._commit, session_id, args)
        if tag in ("ok", "replay"):
            return int(val)
        if tag == "missing":
            raise NotFound(f"session {session_id!r} not found")
        if tag == "closed":
            raise SessionClosed(f"session {session_id!r} is {val}", val)
        raise Conflict(f"session {session_id!r}: commit expected length {expected_len}, "
                       f"committed length is {val}", expected_len, int(val))

    def _set_status(self, session_id, status, error, finish_reason, cancel=False):
        self._check_id(session_id)
        finish_reason = self._check_status(status, error, finish_reason)
        tag, val = self._script(self._status, session_id, [status, error, finish_reason, repr(time.time()),
                                                           self._ttl_ms, "1" if cancel else "0"])
        if tag == "missing":
            raise NotFound(f"session {session_id!r} not found")
        if tag == "closed":
            raise SessionClosed(f"session {session_id!r} is {val}", val)
        return tag == "ok", val

    @staticmethod
    def _event(entry_id: bytes, fields: dict) -> Event:
        blob = fields.get(b"ids", b"")
        return Event(offset=int(entry_id.split(b"-")[0]), ids=struct.unpack(f"<{len(blob) // 4}i", blob),
                     text=fields.get(b"text", b""), final=fields.get(b"final") == b"1",
                     finish_reason=fields.get(b"reason", b"").decode())

    def claim(self, session_id, owner, stale_s):
        self._check_id(session_id)
        tag, _ = self._script(self._claim, session_id, [owner, repr(time.time()), repr(float(stale_s)), self._ttl_ms])
        if tag == "missing":
            raise NotFound(f"session {session_id!r} not found")
        return tag == "ok"

    def read_events(self, session_id, after_offset=0, block_ms=0):
        """One XREAD from the events at `after_offset` on (entry ids are {offset}-{seq}, seq from 1), waiting
        while there are none, in chunks (a socket timeout is not a wait's end); the session's existence is
        checked only when nothing came. A client following a live session costs one round trip an event."""
        self._check_id(session_id)
        self._check_read(after_offset, block_ms)
        h, _, _, kev = self._keys(session_id)
        deadline = time.monotonic() + block_ms / 1000
        cursor, out = f"{after_offset}-0", []
        while True:
            left = int((deadline - time.monotonic()) * 1000)
            block = min(left, self._block_chunk_ms) if left > 0 else None  # None: answer at once
            for _, got in self._call(self._r.xread, {kev: cursor}, block=block) or []:
                cursor = got[-1][0]
                out += [e for e in (self._event(i, f) for i, f in got) if _keep(e, after_offset)]
            if out or block is None:
                break
        if not out and not self._call(self._r.exists, h):
            raise NotFound(f"session {session_id!r} not found")
        return out

    def delete(self, session_id):
        self._check_id(session_id)
        return self._call(self._r.delete, *self._keys(session_id)) > 0

    def ping(self):
        return bool(self._call(self._r.ping))

    def close(self):
        self._r.close()
