"""Limit state in Redis, shared by every gateway replica.

Why a Lua script and not a library: a reservation checks and takes from two token buckets and a
concurrency set in one atomic step (and a release refunds and frees in one), which no well-kept
rate-limit library does with reserve-and-refund semantics. Redis runs a script atomically, so
concurrent replicas can never both take the last token. Time comes from Redis (``TIME``), so
replica clocks do not matter. Running requests live in a sorted set scored by a lease expiry, so
a replica that dies mid-request cannot hold a concurrency slot for ever.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from llmserve.auth.principal import Principal
from llmserve.limits.buckets import Decision
from llmserve.quota import QuotaSnapshot

_LEVEL = """
local function level(key, cap, now)
  if cap <= 0 then return -1 end
  local v = redis.call('HMGET', key, 'level', 'ts')
  local lvl, ts = tonumber(v[1]), tonumber(v[2])
  if lvl == nil or ts == nil then return cap end
  return math.min(cap, lvl + math.max(now - ts, 0) * cap / 60)
end
local function save(key, cap, lvl, now)
  if cap > 0 then
    redis.call('HSET', key, 'level', tostring(lvl), 'ts', tostring(now))
    redis.call('PEXPIRE', key, 120000)
  end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
"""

# KEYS: requests bucket, tokens bucket, running set.
# ARGV: rpm, tpm, max_concurrent (0 = none), cost, request id, lease seconds.
_RESERVE = (
    _LEVEL
    + """
local rpm, tpm, conc = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local cost = tonumber(ARGV[4])
local rl, tl = level(KEYS[1], rpm, now), level(KEYS[2], tpm, now)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
local active = 0
if conc > 0 then active = redis.call('ZCARD', KEYS[3]) end
local reason, wait = '', 0
if rpm > 0 and rl < 1 then reason = 'requests'; wait = (1 - rl) * 60 / rpm end
if tpm > 0 and tl < cost then
  if reason == '' then reason = 'tokens' end
  wait = math.max(wait, (cost - tl) * 60 / tpm)
end
if conc > 0 and active >= conc then
  if reason == '' then reason = 'concurrency' end
  wait = math.max(wait, 1)
end
if reason == '' then
  if rpm > 0 then rl = rl - 1 end
  if tpm > 0 then tl = tl - cost end
  -- Every reservation is recorded (counted against conc only when the key has a limit), so a
  -- release can tell a real reservation from one that never happened.
  redis.call('ZADD', KEYS[3], now + tonumber(ARGV[6]), ARGV[5])
  redis.call('PEXPIRE', KEYS[3], math.floor(tonumber(ARGV[6]) * 1000) + 60000)
end
save(KEYS[1], rpm, rl, now)
save(KEYS[2], tpm, tl, now)
return {reason, tostring(wait), tostring(rl), tostring(tl)}
"""
)

# KEYS: tokens bucket, running set. ARGV: tpm (0 = none), refund, request id.
# Only a reservation still in the running set is freed and refunded: releasing twice, or
# releasing one that never happened, changes nothing.
_RELEASE = (
    _LEVEL
    + """
if redis.call('ZREM', KEYS[2], ARGV[3]) == 0 then return 0 end
local tpm, refund = tonumber(ARGV[1]), tonumber(ARGV[2])
if tpm > 0 and refund > 0 then
  save(KEYS[1], tpm, math.min(tpm, level(KEYS[1], tpm, now) + refund), now)
end
return 1
"""
)


class RedisStore:
    def __init__(self, url: str, prefix: str, lease_s: float, timeout_s: float) -> None:
        self._redis: Any = aioredis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        self._prefix = prefix
        self._lease_s = lease_s
        self._reserve = self._redis.register_script(_RESERVE)
        self._release = self._redis.register_script(_RELEASE)

    def _keys(self, name: str) -> tuple[str, str, str]:
        # The hash tag {name} keeps one key's state on one Redis Cluster slot.
        base = f"{self._prefix}:{{{name}}}"
        return f"{base}:requests", f"{base}:tokens", f"{base}:running"

    async def reserve(self, principal: Principal, cost: int, request_id: str) -> Decision:
        args: list[str | int | float] = [
            principal.rpm or 0,
            principal.tpm or 0,
            principal.max_concurrent or 0,
            cost,
            request_id,
            self._lease_s,
        ]
        reason, wait, rl, tl = await self._reserve(keys=self._keys(principal.name), args=args)
        requests_left, tokens_left = float(rl), float(tl)
        snapshot = QuotaSnapshot(
            principal.rpm,
            int(requests_left) if principal.rpm else None,
            (principal.rpm - requests_left) * 60 / principal.rpm if principal.rpm else None,
            principal.tpm,
            int(tokens_left) if principal.tpm else None,
            (principal.tpm - tokens_left) * 60 / principal.tpm if principal.tpm else None,
        )
        reason = reason.decode() if isinstance(reason, bytes) else str(reason)
        return Decision(not reason, reason, float(wait), snapshot)

    async def release(self, principal: Principal, request_id: str, refund: int) -> None:
        keys = self._keys(principal.name)
        await self._release(keys=[keys[1], keys[2]], args=[principal.tpm or 0, refund, request_id])

    async def close(self) -> None:
        await self._redis.aclose()
