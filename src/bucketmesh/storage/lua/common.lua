local function fmt(x) return string.format('%d', x) end
local function fdiv(a, b)
  local q = math.floor(a / b)
  local r = a - q * b
  if r < 0 then q = q - 1 elseif r >= b then q = q + 1 end
  return q
end
local function cdiv(a, b) return -fdiv(-a, b) end
local function scmp(a, b)
  if a == b then return 0 end
  local n = math.min(#a, #b)
  for k = 1, n do
    local x, y = string.byte(a, k), string.byte(b, k)
    if x ~= y then if x < y then return -1 else return 1 end end
  end
  if #a < #b then return -1 else return 1 end
end
local function vcmp(h1, o1, h2, o2)
  if #h1 ~= #h2 then if #h1 < #h2 then return -1 else return 1 end end
  local c = scmp(h1, h2)
  if c ~= 0 then return c end
  return scmp(o1, o2)
end
local FIELDS = {'es', 'en', 'c', 'i', 'l', 'm', 'vh', 'vo', 'bh', 'bo', 'bt', 't', 'r'}
local function load(key)
  local v = redis.call('HMGET', key, unpack(FIELDS))
  if not v[1] then return nil end
  return {es = tonumber(v[1]), en = tonumber(v[2]), c = tonumber(v[3]), i = tonumber(v[4]),
          l = tonumber(v[5]), m = v[6], vh = v[7], vo = v[8], bh = v[9], bo = v[10],
          bt = tonumber(v[11]), t = tonumber(v[12]), r = v[13]}
end
local function rel(b, now_s, now_n) return (now_s - b.es) * 1000000000 + (now_n - b.en) end
-- Redis drops the bucket one second after it has been full for its ttl.
local function expire(key, b, now_rel)
  local left = b.bt + b.t * b.i + b.l - now_rel
  local ms = cdiv(math.max(left, 0), 1000000) + 1000
  redis.call('PEXPIRE', key, fmt(ms))
end
local function save_all(key, b)
  redis.call('HSET', key, 'es', fmt(b.es), 'en', fmt(b.en), 'c', fmt(b.c), 'i', fmt(b.i),
    'l', fmt(b.l), 'm', b.m, 'vh', b.vh, 'vo', b.vo, 'bh', b.bh, 'bo', b.bo,
    'bt', fmt(b.bt), 't', fmt(b.t), 'r', b.r)
end
