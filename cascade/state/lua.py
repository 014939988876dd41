"""Server-side scripts: each runs atomically in Redis, so concurrent workers cannot interleave."""

# Budget take / charge over fixed windows for a batch of requests, in order.
# ARGV: key prefix, mode ('take' | 'charge'), W, then W x (name, seconds, limit, metric),
#       then T tenant names, then the requests as one string
#       "tenant_index,calls,tokens,money;..." (tenant_index is 1-based into the tenant names).
# Returns one string "denied,remaining_1,...,remaining_W;..." per request in order, where
# denied is 0 or the 1-based index of the exhausted window. (One packed string in, one out:
# with hundreds of tiny arguments and replies, redis-py's packing and parsing cost more than
# the script itself.)
# Windows come from the server's clock, so every worker agrees on where a window ends.
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
  wins[w] = {limit = tonumber(ARGV[i + 2]), metric = ARGV[i + 3],
             suffix = ':' .. ARGV[i] .. ':' .. string.format('%d', wid),
             expire_at = string.format('%d', (wid + 1) * seconds + 1)}
  i = i + 4
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
    if mode == 'take' and denied == 0 and (used[w] >= win.limit or used[w] + a > win.limit) then
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
"""

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
ROLLBACK = """
if not redis.call('ZSCORE', KEYS[2], ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('PUBLISH', ARGV[3], cjson.encode({name = ARGV[1], version = tonumber(ARGV[2])}))
return 1
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
