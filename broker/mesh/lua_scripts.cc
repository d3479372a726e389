#include "broker/mesh/lua_scripts.h"

namespace keymesh::broker::mesh {

// The lease script: membership, cleaning, and every key's grant in one
// atomic call. Guarantees, per key and dimension with limit > 0 and
// cap = limit * (1 - headroom) (the smallest limit any live host has for
// the key): this host's grant <= cap - (sum of the
// other live hosts' recorded grants), so the sum over live hosts never
// exceeds cap. A host's record is max(grant, min(has, its record)): a
// grant below what the host holds counts only once the host reported it
// (its next request), as its reply may be lost. A revoked/disabled key grants 0; a mismatched
// fingerprint grants 0 and records nothing; while learning (the epoch was
// just recreated) a host gets at most min(has, wants), a newcomer 0.
// Requests are split max-min fair over the live wants; when several hosts
// are capped at one fractional level and their ceilings could pass the
// limit in one wall-clock second, all of them but one (in turn, ten leases
// each) get the level's whole part and that one the rest.
const LuaScript kLeaseScript = {"lease", R"lua(
local p = ARGV[1]
local host = ARGV[2]
local lease = tonumber(ARGV[4])
local headroom = tonumber(ARGV[5])
local n = tonumber(ARGV[7])
local t = redis.call('TIME')
local now
if ARGV[6] ~= '' then now = tonumber(ARGV[6]) else now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) end
if now == nil or lease == nil or lease <= 0 or headroom == nil or headroom < 0 or headroom >= 1 or n == nil then
  return redis.error_reply('ERR lease: bad arguments')
end
-- A request Redis runs after the host gave up on it (it waited in a frozen
-- Redis, or in the network, past the host's timeout) is refused unrecorded:
-- the host never sees its grant and keeps pacing at what it holds, which a
-- record of a smaller grant would let the others take too.
local deadline = tonumber(ARGV[10 + n * 11]) or 0
if deadline > 0 and now > deadline then return {'stale', now} end
local function fmt(x) return string.format('%.17g', x) end
local function num(s)
  local v = tonumber(s)
  if v == nil or v ~= v or v < 0 or v == math.huge then return nil end
  return v
end
local ttl = math.floor(lease * 2 + 60000)
-- A small number from a key's name, the same on every host.
local function spread(s)
  local h = 0
  for k = 1, #s do h = (h * 31 + string.byte(s, k)) % 65521 end
  return h
end

local ek = p .. 'epoch'
local epoch = redis.call('HGET', ek, 'id')
local learning_until
-- Learning ends early for a mesh that is new rather than lost: when no host
-- reported holding a share within `quiet` ms of the epoch's start (every
-- connected host refreshes within that), nobody holds anything to be
-- granted twice. A host that reports a share marks the epoch claimed, and
-- then learning lasts the whole lease.
local quiet = num(ARGV[8 + n * 11]) or 0
local holds = false
for i = 1, n do
  local o = 7 + (i - 1) * 11
  if (num(ARGV[o + 6]) or 0) > 0 or (num(ARGV[o + 10]) or 0) > 0 then holds = true end
end
if not epoch then
  epoch = t[1] .. '.' .. t[2]
  learning_until = now + lease
  redis.call('HSET', ek, 'id', epoch, 'learning_until', string.format('%.0f', learning_until),
    'started', string.format('%.0f', now), 'claimed', holds and '1' or '0')
else
  learning_until = num(redis.call('HGET', ek, 'learning_until')) or 0
end
local learning = now < learning_until
if learning then
  if holds then
    redis.call('HSET', ek, 'claimed', '1')
  elseif quiet > 0 and redis.call('HGET', ek, 'claimed') ~= '1' and
      now >= (num(redis.call('HGET', ek, 'started')) or now) + quiet then
    learning_until = now
    redis.call('HSET', ek, 'learning_until', string.format('%.0f', now))
    learning = false
  end
end

local hk = p .. 'hosts'
redis.call('ZREMRANGEBYSCORE', hk, '-inf', fmt(now))
redis.call('ZADD', hk, fmt(now + lease), host)
redis.call('PEXPIRE', hk, ttl)
local members = redis.call('ZRANGE', hk, 0, -1)
table.sort(members)

local function parse(s)
  local f = {}
  for w in string.gmatch(s, '%S+') do
    local v = num(w)
    if v == nil then return nil end
    f[#f + 1] = v
  end
  -- has: what the host may pace at (Redis counts it); grant: what it was
  -- last granted (a record written before there was a grant field: has).
  if #f == 10 then f[11], f[12] = f[1], f[2] end
  if #f ~= 12 then return nil end
  return {has = {f[1], f[2]}, wants = {f[3], f[4]}, expiry = f[5], lim = {f[9], f[10]}, grant = {f[11], f[12]}}
end

local out = {}
-- Whether some key's grant fell short of this host's fair part, by more
-- than 5 % of the key's limit, because other hosts were granted it (lent
-- while nobody wanted it, or wanted before): they give it back at their
-- next refresh, which the rebalance event below makes come at once. A
-- smaller shortfall (a steady host's use wandering past its 4 % margin)
-- waits for the others' own refreshes rather than costing every host two
-- calls to Redis; so does one that is only what the others gave back but
-- have not yet reported having (their next request reports it).
local short_of = 0.05
local short = false
for i = 1, n do
  local o = 7 + (i - 1) * 11
  local id = ARGV[o + 1]
  local fp = ARGV[o + 2]
  local burst = num(ARGV[o + 3]) or 1
  local lim = {num(ARGV[o + 4]) or 0, num(ARGV[o + 8]) or 0}
  local wants = {num(ARGV[o + 5]) or 0, num(ARGV[o + 9]) or 0}
  local has = {num(ARGV[o + 6]) or 0, num(ARGV[o + 10]) or 0}
  local used = {ARGV[o + 7], ARGV[o + 11]}
  local lk = p .. 'lease:' .. id

  -- The other hosts' live leases; expired or unreadable ones go. The
  -- field ' fp' (no host name holds a space) is the registered fingerprint.
  local others = {}
  local reg = false
  -- This host's own live record: what the others were granted around.
  local own = nil
  local all = redis.call('HGETALL', lk)
  if #all == 0 then redis.call('SADD', p .. 'keys', id) end
  for j = 1, #all, 2 do
    if all[j] == ' fp' then
      reg = all[j + 1]
    elseif all[j] == host then
      local e = parse(all[j + 1])
      if e ~= nil and e.expiry > now then own = e end
    else
      local e = parse(all[j + 1])
      if e == nil or e.expiry <= now then
        redis.call('HDEL', lk, all[j])
      else
        e.name = all[j]
        others[#others + 1] = e
      end
    end
  end

  local st = redis.call('HMGET', p .. 'state:' .. id, 'cool_until', 'open_until', 'revoked', 'disabled')
  local cool = math.max(num(st[1]) or 0, num(st[2]) or 0)
  if cool <= now then cool = 0 end
  -- A revoked or disabled key gets nothing. A cooling key keeps its
  -- shares: the cooldown itself (returned below and merged into every
  -- segment) keeps it out of rotation, and a share zeroed for it would
  -- cost every host up to a refresh of the key after the cooldown ended.
  local blocked = st[3] == '1' or st[4] == '1'

  -- The first fingerprint registered wins while any lease of it lives.
  local mismatch = reg and reg ~= fp and #others > 0

  local g = {0, 0}
  local b = 0
  if mismatch then
    redis.call('HDEL', lk, host)
  else
    if not blocked then
      for d = 1, 2 do
        if lim[d] > 0 then
          -- Hosts configured with different limits (a reload reaching one
          -- host first) share the smallest.
          local limit = lim[d]
          local others_has = 0
          local others_grant = 0
          for _, e in ipairs(others) do
            others_has = others_has + e.has[d]
            others_grant = others_grant + e.grant[d]
            if e.lim[d] > 0 and e.lim[d] < limit then limit = e.lim[d] end
          end
          local cap = limit * (1 - headroom)
          local x, due
          if learning then
            x = math.min(has[d], wants[d])
          else
            -- Max-min fair share (water-filling) of cap over the live wants;
            -- what is left when every want is met is lent to all live
            -- holders alike, so that a host that turns busy starts from its
            -- part of the idle capacity rather than from its small wants
            -- (a lender gives it back at its own next refresh, once others
            -- want it).
            local ws = {{w = wants[d], me = true, name = host}}
            for _, e in ipairs(others) do ws[#ws + 1] = {w = e.wants[d], me = false, name = e.name} end
            table.sort(ws, function(a, c) return a.w < c.w end)
            local left = cap
            local mine = 0
            local capped, level, whole = {}, 0, 0
            for k, e in ipairs(ws) do
              level = left / (#ws - k + 1)
              local a = e.w
              if a > level then
                a = level
                capped[#capped + 1] = e.name
              end
              if e.me then mine = a end
              -- What a host pacing at a (one request per 1/a s) can send
              -- in one wall-clock second: ceil(a).
              whole = whole + math.ceil(a - 1e-9)
              left = left - a
            end
            -- Whole requests a second. Hosts capped at the same fractional
            -- level, all pacing as fast as their share lets them, each send
            -- ceil(level) in the seconds where their sends fall that way;
            -- when that can add up past the limit (three hosts at 3.2 of a
            -- 10/s key: 4 + 4 + 4), a provider that counts per second
            -- refuses. So every capped host but one is granted the whole
            -- part of the level, and that one the rest: none sends more
            -- than its whole part in any second, and the one more than its
            -- share's ceiling. The rest moves on in name order every ten
            -- leases (a move costs its last holder a report to Redis), from
            -- a start that differs key by key, so that a host's keys do not
            -- all give it the rest at once.
            local q = math.floor(level + 1e-9)
            if d == 1 and #capped >= 2 and q >= 1 and level - q > 1e-9 and whole > math.floor(limit + 1e-9) then
              table.sort(capped)
              local rest = capped[(math.floor(now / (10 * lease)) + spread(id)) % #capped + 1]
              -- The one holding the rest is short only of the whole part:
              -- the rest moves to it at a turn, once its last holder has
              -- reported giving it back, which no rebalance would hasten.
              for _, name in ipairs(capped) do
                if name == host then mine, due = (name == rest) and (level + (#capped - 1) * (level - q)) or q, q end
              end
            end
            x = mine + math.max(left, 0) / #ws
            due = math.min(due or x, x)
          end
          if not learning and due - (cap - others_grant) > limit * short_of then short = true end
          x = math.min(x, cap - others_has)
          if not (x > 0) then x = 0 end
          g[d] = x
        end
      end
      if lim[1] > 0 then
        if g[1] > 0 then b = math.max(1, burst * g[1] / lim[1]) end
      elseif lim[2] > 0 then
        if g[2] > 0 then b = math.max(1, burst * g[2] / lim[2]) end
      else
        b = burst
      end
    end
    -- What is recorded as this host's is what it may be pacing at: a grant
    -- smaller than what it holds now counts as what it holds (no more than
    -- its live record, around which the others were granted) until its next
    -- request reports the smaller one, since the reply may never reach it (a
    -- timeout, a reset) and it would then pace at its old share until its
    -- lease ends while the others took the difference.
    local rec = {g[1], g[2]}
    if own ~= nil then
      for d = 1, 2 do rec[d] = math.max(g[d], math.min(has[d], own.has[d])) end
    end
    redis.call('HSET', lk, host, table.concat({fmt(rec[1]), fmt(rec[2]), fmt(wants[1]), fmt(wants[2]),
      string.format('%.0f', now + lease), ARGV[3], used[1], used[2], fmt(lim[1]), fmt(lim[2]), fmt(g[1]), fmt(g[2])}, ' '),
      ' fp', fp)
    redis.call('PEXPIRE', lk, ttl)
  end
  local holders = #others
  if not mismatch then holders = holders + 1 end
  out[i] = {fmt(g[1]), fmt(g[2]), fmt(b), mismatch and 1 or 0, cool, holders}
end
-- At most one rebalance event per namespace per 200 ms, however many hosts
-- are short: every other host refreshes on it (kind 7; no key's state).
if short and #members > 1 and redis.call('SET', p .. 'rebalance', host, 'NX', 'PX', 200) then
  redis.call('XADD', p .. 'events', 'MAXLEN', '~', ARGV[9 + n * 11], '*', 'pool', '', 'key', '', 'kind', '7',
    'until', '0', 'version', '0', 'origin', host, 'mono', '0', 'seq', tostring(redis.call('INCR', p .. 'seq')))
end
return {now, now + lease, learning and 1 or 0, epoch, #members, members, out, short and 1 or 0}
)lua"};

// Max-merge of one change into the key's state; XADD only on a change.
const LuaScript kPublishScript = {"publish", R"lua(
local p, id, pool, key = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local kind, untilv, ev_version = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local origin, mono, maxlen = ARGV[8], ARGV[9], ARGV[10]
if kind == nil or untilv == nil or ev_version == nil then return redis.error_reply('ERR publish: bad arguments') end
local sk = p .. 'state:' .. id
local cur = redis.call('HMGET', sk, 'cool_until', 'open_until', 'revoked', 'disabled', 'version')
local cool, open = tonumber(cur[1]) or 0, tonumber(cur[2]) or 0
local revoked, disabled = cur[3] == '1', cur[4] == '1'
local version = tonumber(cur[5]) or 0
local changed = false
local merged = 0
if kind == 0 then
  if untilv > cool then cool = untilv; changed = true end
  merged = cool
elseif kind == 1 then
  if untilv > open then open = untilv; changed = true end
  merged = open
elseif kind == 2 then
  if open ~= 0 and (ev_version == 0 or ev_version == version) then open = 0; changed = true end
elseif kind == 3 then
  if not revoked then revoked = true; changed = true end
elseif kind == 4 then
  if not disabled then disabled = true; changed = true end
elseif kind == 5 then
  if disabled then disabled = false; changed = true end
elseif kind == 6 then
  version = version + 1; cool = 0; open = 0; revoked = false; changed = true
else
  return redis.error_reply('ERR publish: bad kind')
end
local sid = ''
if changed then
  redis.call('HSET', sk, 'cool_until', string.format('%.0f', cool), 'open_until', string.format('%.0f', open),
    'revoked', revoked and '1' or '0', 'disabled', disabled and '1' or '0', 'version', string.format('%.0f', version),
    'origin', origin, 'mono', mono)
  redis.call('SADD', p .. 'keys', id)
  sid = redis.call('XADD', p .. 'events', 'MAXLEN', '~', maxlen, '*', 'pool', pool, 'key', key,
    'kind', tostring(kind), 'until', string.format('%.0f', merged), 'version', string.format('%.0f', version),
    'origin', origin, 'mono', mono, 'seq', tostring(redis.call('INCR', p .. 'seq')))
end
return {sid, merged, version}
)lua"};

// Where a reader starts reading after `after` (a reader that knows this
// from its last read or a snapshot skips it): whether it missed events
// (the stream was trimmed past `after`: its entry is gone while entries
// were removed; or recreated: its last id is below `after`), and the
// sequence number of `after`'s entry ('$': the newest's; '0': 0), which
// every entry of ours carries one above the one before it, so that the
// reads that follow see a gap as a jump. Conservative: a trimmed `after`
// whose successor survived still counts as a gap (a resync is harmless:
// the merge is idempotent).
const LuaScript kReadMetaScript = {"read_meta", R"lua(
local p, after = ARGV[1], ARGV[2]
local function seq_of(entries)
  if #entries == 0 then return 0 end
  local f = entries[1][2]
  for i = 1, #f, 2 do
    if f[i] == 'seq' then return tonumber(f[i + 1]) or 0 end
  end
  return 0
end
local epoch = redis.call('HGET', p .. 'epoch', 'id') or ''
local sk = p .. 'events'
local function id_lt(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  if am == nil or bm == nil then return false end
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am < bm or (am == bm and as < bs)
end
local from_start = after == '0' or after == '0-0'
local gap = 0
local last = '0-0'
local seq = 0
if redis.call('EXISTS', sk) == 1 then
  local info = redis.call('XINFO', 'STREAM', sk)
  local f = {}
  for i = 1, #info, 2 do f[info[i]] = info[i + 1] end
  last = f['last-generated-id'] or '0-0'
  local trimmed = (tonumber(f['entries-added']) or 0) > (tonumber(f['length']) or 0)
  if after ~= '$' then
    if from_start then
      if trimmed then gap = 1 end
    elseif id_lt(last, after) then
      gap = 1
    else
      local at = redis.call('XRANGE', sk, after, after)
      if trimmed and #at == 0 then gap = 1 end
      seq = seq_of(at)
    end
  else
    seq = tonumber(redis.call('GET', p .. 'seq')) or 0
  end
elseif after ~= '$' and not from_start then
  gap = 1
end
return {epoch, gap, last, seq}
)lua"};

// Every key's live shared state (deadlines still ahead, revocations,
// disables; first a kReset record carrying the version of a key reset at
// least once) and the stream id to read on from.
const LuaScript kSnapshotScript = {"snapshot", R"lua(
local p = ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local epoch = redis.call('HGET', p .. 'epoch', 'id') or ''
local last = '0-0'
if redis.call('EXISTS', p .. 'events') == 1 then
  local info = redis.call('XINFO', 'STREAM', p .. 'events')
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then last = info[i + 1] end
  end
end
local seq = tonumber(redis.call('GET', p .. 'seq')) or 0
local out = {}
for _, id in ipairs(redis.call('SMEMBERS', p .. 'keys')) do
  local s = redis.call('HMGET', p .. 'state:' .. id, 'cool_until', 'open_until', 'revoked', 'disabled', 'version',
    'origin', 'mono')
  local version = s[5] or '0'
  local origin = s[6] or ''
  local mono = s[7] or '0'
  local cool, open = tonumber(s[1]) or 0, tonumber(s[2]) or 0
  if (tonumber(version) or 0) > 0 then out[#out + 1] = {id, '6', '0', version, origin, mono} end
  if cool > now then out[#out + 1] = {id, '0', s[1], version, origin, mono} end
  if open > now then out[#out + 1] = {id, '1', s[2], version, origin, mono} end
  if s[3] == '1' then out[#out + 1] = {id, '3', '0', version, origin, mono} end
  if s[4] == '1' then out[#out + 1] = {id, '4', '0', version, origin, mono} end
end
return {epoch, last, out, seq}
)lua"};

const LuaScript kClaimProbeScript = {"claim_probe", R"lua(
local k = ARGV[1] .. 'probe:' .. ARGV[2]
if redis.call('SET', k, ARGV[3], 'NX', 'PX', ARGV[4]) then return 1 end
if redis.call('GET', k) == ARGV[3] then return 1 end
return 0
)lua"};

const LuaScript kLeaveScript = {"leave", R"lua(
local p, host = ARGV[1], ARGV[2]
redis.call('ZREM', p .. 'hosts', host)
local ids = redis.call('SMEMBERS', p .. 'keys')
for _, id in ipairs(ids) do redis.call('HDEL', p .. 'lease:' .. id, host) end
return #ids
)lua"};

}  // namespace keymesh::broker::mesh
