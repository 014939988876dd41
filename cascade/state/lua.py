"""Server-side scripts: each runs atomically in Redis, so concurrent workers cannot interleave."""

from cascade.state.records import PACE_BURST_SHARE

# Budget take / charge over fixed windows for a batch of requests, in order.
# ARGV: key prefix, mode ('take' | 'charge'), W, then W x (name, seconds, limit, metric, paced),
#       then T tenant names, then the requests as one string
#       "tenant_index,calls,tokens,money;..." (tenant_index is 1-based into the tenant names).
# Returns one string "denied,remaining_1,...,remaining_W;..." per request in order, where
# denied is 0 or the 1-based index of the exhausted window. (One packed string in, one out:
# with hundreds of tiny arguments and replies, redis-py's packing and parsing cost more than
# the script itself.)
# Windows come from the server's clock, so every worker agrees on where a window ends. A paced
# window refuses a take above its cap at this point of the window (BudgetLimit.paced_cap's twin).
BUDGET = """
pcall(redis.replicate_commands)
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local prefix, mode, W = ARGV[1], ARGV[2], tonumber(ARGV[3])
local wins = {}
local i = 4
for w = 1, W do
  local seconds = tonumber(ARGV[i + 1])
  local wid = math.floor(now / seconds)
  local limit, metric = tonumber(ARGV[i + 2]), ARGV[i + 3]
  local cap = limit
  if ARGV[i + 4] == '1' then
    local burst = PACE_BURST_SHARE * limit
    if metric == 'calls' then burst = math.max(burst, 1) end
    cap = math.min(limit, limit * (now - wid * seconds) / seconds + burst)
  end
  wins[w] = {limit = limit, cap = cap, metric = metric,
             suffix = ':' .. ARGV[i] .. ':' .. string.format('%d', wid),
             expire_at = string.format('%d', (wid + 1) * seconds + 1)}
  i = i + 5
end
local tenants = {}
for j = i, #ARGV - 1 do tenants[#tenants + 1] = ARGV[j] end
local slot = {calls = 1, tokens = 2, money = 3}
local out = {}
for ti, calls, tokens, money in string.gmatch(ARGV[#ARGV], '(%d+),([^,;]+),([^,;]+),([^,;]+)') do
  local tenant = tenants[tonumber(ti)]
  local amount = {calls, tokens, money}
  local keys, used, fresh = {}, {}, {}
  local denied = 0
  for w = 1, W do
    local win = wins[w]
    local k = prefix .. tenant .. win.suffix
    local raw = redis.call('GET', k)
    keys[w] = k
    fresh[w] = not raw
    used[w] = tonumber(raw or '0')
    local a = tonumber(amount[slot[win.metric]])
    if mode == 'take' and denied == 0 and (used[w] >= win.limit or used[w] + a > win.cap) then
      denied = w
    end
  end
  if denied == 0 then
    for w = 1, W do
      local win = wins[w]
      local a = amount[slot[win.metric]]
      if tonumber(a) ~= 0 then
        if win.metric == 'money' then
          used[w] = tonumber(redis.call('INCRBYFLOAT', keys[w], a))
        else
          used[w] = redis.call('INCRBY', keys[w], a)
        end
        -- A window's key dies with its window; set once, when the key is created.
        if fresh[w] then redis.call('EXPIREAT', keys[w], win.expire_at) end
      end
    end
  end
  local rec = {denied}
  for w = 1, W do rec[w + 1] = string.format('%.17g', wins[w].limit - used[w]) end
  out[#out + 1] = table.concat(rec, ',')
end
return table.concat(out, ';')
""".replace("PACE_BURST_SHARE", repr(PACE_BURST_SHARE))

# Publish a snapshot: store it, make it current, keep the newest K (never the current one), notify.
# KEYS: current hash, versions zset, meta hash. ARGV: name, version, blob, meta json, keep,
#       blob key prefix, channel.
PUBLISH = """
local name, version = ARGV[1], ARGV[2]
redis.call('SET', ARGV[6] .. version, ARGV[3])
redis.call('ZADD', KEYS[2], version, version)
redis.call('HSET', KEYS[3], version, ARGV[4])
redis.call('HSET', KEYS[1], name, version)
local keep = tonumber(ARGV[5])
local n = redis.call('ZCARD', KEYS[2])
if n > keep then
  for _, v in ipairs(redis.call('ZRANGE', KEYS[2], 0, n - keep - 1)) do
    if v ~= version then
      redis.call('ZREM', KEYS[2], v)
      redis.call('DEL', ARGV[6] .. v)
      redis.call('HDEL', KEYS[3], v)
    end
  end
end
redis.call('PUBLISH', ARGV[7], cjson.encode({name = name, version = tonumber(version)}))
return 1
"""

# Make a kept version current again. KEYS: current hash, versions zset. ARGV: name, version, channel.
# An operator's step down: the epoch grows, so watchers accept the lower version.
ROLLBACK = """
if not redis.call('ZSCORE', KEYS[2], ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HINCRBY', KEYS[1], '@epoch', 1)
redis.call('PUBLISH', ARGV[3], cjson.encode({name = ARGV[1], version = tonumber(ARGV[2])}))
return 1
"""

# The registry's sets. The current hash holds, besides name -> current version, two fields that
# no model name can take ('@' is not a registry name's first character): '@epoch' (grows with
# every rollback) and '@set' (the current set's version). One HGETALL gives a watcher both.

# Publish a set: every model of one learner publish under one new version, its learner step
# with it, all or nothing. Refused (nothing written) unless the current set and epoch are the
# ones the publisher is based on, so a stale or restarted-from-scratch publisher never
# overwrites a newer set. The version comes from a counter that only grows, lifted above
# min_version and every current version (those published before the counter existed, or
# seen by a publisher before Redis lost its data).
# KEYS: current hash, version counter, sets hash.
# ARGV: base epoch, base set version, min version, keep, channel, set body (JSON without the
#       version), key prefix of the registry ('<prefix>reg:'), n, then n x (name, blob, meta JSON
#       without the version).
# Returns {1, epoch, version} or, refused, {0, current epoch, current set version}.
PUBLISH_SET = """
local cur, counter, sets = KEYS[1], KEYS[2], KEYS[3]
local epoch = tonumber(redis.call('HGET', cur, '@epoch') or '0')
local head = tonumber(redis.call('HGET', cur, '@set') or '0')
if epoch ~= tonumber(ARGV[1]) or head ~= tonumber(ARGV[2]) then return {0, epoch, head} end
local floor = tonumber(ARGV[3])
local flat = redis.call('HGETALL', cur)
for i = 1, #flat, 2 do
  if string.sub(flat[i], 1, 1) ~= '@' then floor = math.max(floor, tonumber(flat[i + 1]) + 1) end
end
local v = redis.call('INCR', counter)
if v < floor then
  v = floor
  redis.call('SET', counter, string.format('%d', v))
end
local vs = string.format('%d', v)
local keep, pfx, channel = tonumber(ARGV[4]), ARGV[7], ARGV[5]
local function trim(zkey, on_drop)
  local n = redis.call('ZCARD', zkey)
  if n > keep then
    for _, old in ipairs(redis.call('ZRANGE', zkey, 0, n - keep - 1)) do
      if old ~= vs then
        redis.call('ZREM', zkey, old)
        on_drop(old)
      end
    end
  end
end
local names = {}
for m = 0, tonumber(ARGV[8]) - 1 do
  local name, blob, meta = ARGV[9 + 3 * m], ARGV[10 + 3 * m], ARGV[11 + 3 * m]
  local zkey, mkey, bpfx = pfx .. name .. ':versions', pfx .. name .. ':meta', pfx .. name .. ':blob:'
  redis.call('SET', bpfx .. vs, blob)
  redis.call('ZADD', zkey, v, vs)
  redis.call('HSET', mkey, vs, meta)
  redis.call('HSET', cur, name, vs)
  trim(zkey, function(old) redis.call('DEL', bpfx .. old); redis.call('HDEL', mkey, old) end)
  names[#names + 1] = name
end
redis.call('HSET', sets, vs, ARGV[6])
redis.call('ZADD', sets .. ':order', v, vs)
trim(sets .. ':order', function(old) redis.call('HDEL', sets, old) end)
redis.call('HSET', cur, '@set', vs)
for _, name in ipairs(names) do
  redis.call('PUBLISH', channel, cjson.encode({name = name, version = v}))
end
return {1, epoch, v}
"""

# Make a kept set current again (ARGV[1] = '': the newest kept set before the current one) and
# bump the epoch: the operator's explicit step down, which watchers accept and which makes
# every publisher based on the old epoch fail as stale.
# KEYS: current hash, sets hash. ARGV: version or '', channel, key prefix of the registry.
# Returns {1, new epoch, version, set body} or {0, reason}.
ROLLBACK_SET = """
local cur, sets = KEYS[1], KEYS[2]
local head = tonumber(redis.call('HGET', cur, '@set') or '0')
local target = ARGV[1]
if target == '' then
  local best = nil
  for _, k in ipairs(redis.call('HKEYS', sets)) do
    local x = tonumber(k)
    if x < head and (best == nil or x > best) then best = x end
  end
  if best == nil then return {0, 'no kept set before the current one'} end
  target = string.format('%d', best)
end
local body = redis.call('HGET', sets, target)
if not body then return {0, 'set ' .. target .. ' is not kept'} end
local names = cjson.decode(body)['names']
for _, name in ipairs(names) do
  if not redis.call('ZSCORE', ARGV[3] .. name .. ':versions', target) then
    return {0, name .. ' version ' .. target .. ' is not kept'}
  end
end
for _, name in ipairs(names) do redis.call('HSET', cur, name, target) end
redis.call('HSET', cur, '@set', target)
local epoch = redis.call('HINCRBY', cur, '@epoch', 1)
for _, name in ipairs(names) do
  redis.call('PUBLISH', ARGV[2], cjson.encode({name = name, version = tonumber(target)}))
end
return {1, epoch, target, body}
"""

# The current epoch, set and the current snapshots of some models, read at one instant.
# KEYS: current hash, sets hash. ARGV: key prefix of the registry, then the names.
# Returns {epoch, set version, set body or nil, then per name: version or nil, blob or nil}.
LOAD_SET = """
local cur, sets = KEYS[1], KEYS[2]
local epoch = redis.call('HGET', cur, '@epoch') or '0'
local head = redis.call('HGET', cur, '@set') or '0'
local body = false
if head ~= '0' then body = redis.call('HGET', sets, head) end
local out = {epoch, head, body}
for i = 2, #ARGV do
  local name = ARGV[i]
  local v = redis.call('HGET', cur, name)
  local blob = false
  if v then blob = redis.call('GET', ARGV[1] .. name .. ':blob:' .. v) end
  out[#out + 1] = v
  out[#out + 1] = blob
end
return out
"""

# (version, bytes) of a version, the current one when ARGV[2] is ''; read together so a
# concurrent publish cannot trim the blob between reading the version and the bytes.
# KEYS: current hash. ARGV: name, version or '', blob key prefix.
FETCH = """
local v = ARGV[2]
if v == '' then
  v = redis.call('HGET', KEYS[1], ARGV[1])
  if not v then return nil end
end
local blob = redis.call('GET', ARGV[3] .. v)
if not blob then return nil end
return {v, blob}
"""

# Claim event ids: SET NX with an expiry for each key, in one command. KEYS: the event keys.
# ARGV: the expiry in ms, then what to record per key (its text mark). Returns 1 per key claimed now, 0 per key claimed before. (A pipeline
# of SETs costs redis-py a command's packing and parsing per event, more than the tier's model.)
CLAIM = """
local out = {}
for i, key in ipairs(KEYS) do
  out[i] = redis.call('SET', key, ARGV[i + 1] or '1', 'NX', 'PX', ARGV[1]) and 1 or 0
end
return out
"""
