"""The Lua scripts RedisStore runs: each one is a single atomic step on the server, timed by the server's clock.

Integers above 1e14 lose digits in Lua's tostring, so numbers are written with string.format('%.0f').
The key scripts build a key name from a prefix passed in KEYS (the record named by an index): fine on
one Redis server or a primary with replicas, not on Redis Cluster, which these scripts do not support.
"""

from __future__ import annotations

NOW_US = """
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now_ms = math.floor(now_us / 1000)
"""

# KEYS bucket hashes; ARGV (limit, window_us, cost, force) per key -> {fits, level} per key, flattened
# (router/store/gcra.py gcra_all, line for line: all hits are written, or none when an unforced one is refused)
HIT_ALL = (
    NOW_US
    + """
local levels, fits, all_fit = {}, {}, true
for i = 1, #KEYS do
  local limit, window, cost, force = tonumber(ARGV[4*i-3]), tonumber(ARGV[4*i-2]), tonumber(ARGV[4*i-1]), ARGV[4*i]
  local stored = redis.call('HMGET', KEYS[i], 'level', 'last')
  local level, last = tonumber(stored[1] or '0'), tonumber(stored[2] or '0')
  local elapsed = math.min(math.max(now_us - last, 0), window)
  level = math.max(level - elapsed * limit, 0)
  local fit = force == '1' or (cost <= limit and level + cost * window <= limit * window)
  levels[i], fits[i] = level, fit
  all_fit = all_fit and fit
end
local out = {}
for i = 1, #KEYS do
  local limit, window, cost = tonumber(ARGV[4*i-3]), tonumber(ARGV[4*i-2]), tonumber(ARGV[4*i-1])
  local level = levels[i]
  if all_fit then
    level = math.min(level + cost * window, 2 * limit * window)
    redis.call('HSET', KEYS[i], 'level', string.format('%.0f', level), 'last', string.format('%.0f', now_us))
    redis.call('PEXPIRE', KEYS[i], math.floor(level / limit / 1000) + 1)
  end
  out[2*i-1] = fits[i] and 1 or 0
  out[2*i] = string.format('%.0f', level)
end
return out
"""
)

# KEYS[1] record, KEYS[2] hash index, KEYS[3] id index, KEYS[4] prefix of hash index keys;
# ARGV json, id, created_at
PUT_KEY = """
local old = redis.call('GET', KEYS[1])
if old then
  local old_hash = cjson.decode(old)['key_hash']
  local old_index = KEYS[4] .. old_hash
  if old_index ~= KEYS[2] then redis.call('DEL', old_index) end
end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[2])
return 1
"""

# KEYS[1] hash index, KEYS[2] prefix of record keys -> the record (authentication: one round trip)
FIND_KEY = """
local key_id = redis.call('GET', KEYS[1])
if not key_id then return false end
return redis.call('GET', KEYS[2] .. key_id)
"""

# KEYS[1] record, KEYS[2] id index, KEYS[3] prefix of hash index keys; ARGV id
DELETE_KEY = """
local old = redis.call('GET', KEYS[1])
if not old then return 0 end
redis.call('DEL', KEYS[3] .. cjson.decode(old)['key_hash'])
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""

# Drops the lapsed holds of one window (hash KEYS[b], zset KEYS[z]); used by RESERVE and SPEND.
PURGE = """
local function purge(budget, holds, now_ms)
  local lapsed = redis.call('ZRANGEBYSCORE', holds, '-inf', now_ms)
  for _, rid in ipairs(lapsed) do
    local amount = redis.call('HGET', budget, 'h:' .. rid)
    if amount then
      redis.call('HINCRBY', budget, 'held', '-' .. amount)
      redis.call('HDEL', budget, 'h:' .. rid)
    end
  end
  if #lapsed > 0 then redis.call('ZREMRANGEBYSCORE', holds, '-inf', now_ms) end
end
"""

# KEYS: marker, then (budget hash, holds zset) per window; ARGV amount, ttl_ms, id, n, then (limit, kept_until_ms)
# per window -> {1} or {0, index of the refusing window, spent, held}
RESERVE = (
    NOW_US
    + PURGE
    + """
local amount, ttl, rid, n = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
for i = 1, n do
  local budget, holds = KEYS[2 * i], KEYS[2 * i + 1]
  purge(budget, holds, now_ms)
  local spent = tonumber(redis.call('HGET', budget, 'spent') or '0')
  local held = tonumber(redis.call('HGET', budget, 'held') or '0')
  if spent + held + amount > tonumber(ARGV[3 + 2 * i]) then
    return {0, i, string.format('%.0f', spent), string.format('%.0f', held)}
  end
end
for i = 1, n do
  local budget, holds, kept = KEYS[2 * i], KEYS[2 * i + 1], ARGV[4 + 2 * i]
  redis.call('HINCRBY', budget, 'held', ARGV[1])
  redis.call('HSET', budget, 'h:' .. rid, ARGV[1])
  redis.call('ZADD', holds, now_ms + ttl, rid)
  redis.call('PEXPIREAT', budget, kept)
  redis.call('PEXPIREAT', holds, kept)
end
redis.call('SET', KEYS[1], 'open', 'PX', ttl + tonumber(ARGV[5 + 2 * n]))
return {1}
"""
)

# KEYS: marker, then (budget hash, holds zset) per window; ARGV id, actual (nano-USD, 0 for a release), n,
# marker_ttl_ms, then kept_until_ms per window -> 1 when this call closed the reservation
SETTLE = """
if redis.call('GET', KEYS[1]) == 'closed' then return 0 end
local rid, actual, n = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
for i = 1, n do
  local budget, holds = KEYS[2 * i], KEYS[2 * i + 1]
  local amount = redis.call('HGET', budget, 'h:' .. rid)
  if amount then
    redis.call('HINCRBY', budget, 'held', '-' .. amount)
    redis.call('HDEL', budget, 'h:' .. rid)
    redis.call('ZREM', holds, rid)
  end
  if actual > 0 then
    redis.call('HINCRBY', budget, 'spent', ARGV[2])
    redis.call('PEXPIREAT', budget, ARGV[4 + i])
  end
end
redis.call('SET', KEYS[1], 'closed', 'PX', ARGV[4])
return 1
"""

# KEYS budget hash, holds zset -> {spent, held}
SPEND = (
    NOW_US
    + PURGE
    + """
purge(KEYS[1], KEYS[2], now_ms)
local spent = redis.call('HGET', KEYS[1], 'spent') or '0'
local held = redis.call('HGET', KEYS[1], 'held') or '0'
return {spent, held}
"""
)

# KEYS[1] lease zset; ARGV limit, ttl_ms, id -> 1 acquired, 0 full
ACQUIRE = (
    NOW_US
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
local until_ms = now_ms + tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], until_ms, ARGV[3])
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) then redis.call('PEXPIREAT', KEYS[1], until_ms) end
return 1
"""
)

# KEYS[1] lease zset; ARGV ttl_ms, id -> 1 renewed, 0 lapsed or released
RENEW = (
    NOW_US
    + """
local score = redis.call('ZSCORE', KEYS[1], ARGV[2])
if not score or tonumber(score) <= now_ms then return 0 end
local until_ms = now_ms + tonumber(ARGV[1])
redis.call('ZADD', KEYS[1], until_ms, ARGV[2])
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then redis.call('PEXPIREAT', KEYS[1], until_ms) end
return 1
"""
)

# KEYS counter, record; ARGV digest, base, text, source, trigger, at -> the record's counter (unchanged when the
# record holds this digest already: replicas that read the same new file publish it once)
PUBLISH_POLICY = """
local held = redis.call('HMGET', KEYS[2], 'digest', 'counter')
if held[1] == ARGV[1] then
  return tonumber(held[2])
end
local counter = redis.call('INCR', KEYS[1])
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], 'counter', counter, 'digest', ARGV[1], 'base', ARGV[2], 'text', ARGV[3],
  'source', ARGV[4], 'trigger', ARGV[5], 'at', ARGV[6])
return counter
"""

# KEYS members (sorted set: member -> append sequence), sequence counter, the member's log, prefix of log keys;
# ARGV member, item, cap, members. Appends, trims, and drops the least recently appended members with their logs.
FAMILY_APPEND = """
redis.call('RPUSH', KEYS[3], ARGV[2])
redis.call('LTRIM', KEYS[3], -tonumber(ARGV[3]), -1)
redis.call('ZADD', KEYS[1], redis.call('INCR', KEYS[2]), ARGV[1])
local over = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[4])
if over > 0 then
  for _, member in ipairs(redis.call('ZRANGE', KEYS[1], 0, over - 1)) do
    redis.call('DEL', KEYS[4] .. member)
  end
  redis.call('ZREMRANGEBYRANK', KEYS[1], 0, over - 1)
end
return 1
"""
