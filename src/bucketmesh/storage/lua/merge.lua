local now_s, now_n = tonumber(ARGV[1]), tonumber(ARGV[2])
local o = 2
local changed = 0
for d = 1, #KEYS do
  local key = KEYS[d]
  local x = {es = tonumber(ARGV[o + 1]), en = tonumber(ARGV[o + 2]), c = tonumber(ARGV[o + 3]),
             i = tonumber(ARGV[o + 4]), l = tonumber(ARGV[o + 5]), m = ARGV[o + 6],
             vh = ARGV[o + 7], vo = ARGV[o + 8], bh = ARGV[o + 9], bo = ARGV[o + 10],
             bt = tonumber(ARGV[o + 11]), r = ARGV[o + 12]}
  local expired = ARGV[o + 13] == '1'
  local nused = tonumber(ARGV[o + 14])
  local used = {}
  for k = 1, nused do
    used[k] = {ARGV[o + 14 + 2 * k - 1], tonumber(ARGV[o + 14 + 2 * k])}
  end
  o = o + 14 + 2 * nused
  local b = load(key)
  local replace = false
  if not b then
    replace = not expired
  elseif x.es > b.es or (x.es == b.es and x.en > b.en) then
    replace = true
  end
  if replace then
    redis.call('DEL', key)
    x.t = 0
    for k = 1, nused do
      redis.call('HSET', key, 'u:' .. used[k][1], fmt(used[k][2]))
      x.t = x.t + used[k][2]
    end
    save_all(key, x)
    expire(key, x, rel(x, now_s, now_n))
    changed = changed + 1
  elseif b and x.es == b.es and x.en == b.en then
    local moved = false
    if vcmp(x.vh, x.vo, b.vh, b.vo) > 0 then
      b.c, b.i, b.l, b.m, b.vh, b.vo = x.c, x.i, x.l, x.m, x.vh, x.vo
      redis.call('HSET', key, 'c', fmt(b.c), 'i', fmt(b.i), 'l', fmt(b.l), 'm', b.m,
        'vh', b.vh, 'vo', b.vo)
      moved = true
    end
    local bc = vcmp(x.bh, x.bo, b.bh, b.bo)
    if bc > 0 or (bc == 0 and x.bt > b.bt) then
      b.bh, b.bo, b.bt = x.bh, x.bo, x.bt
      redis.call('HSET', key, 'bh', b.bh, 'bo', b.bo, 'bt', fmt(b.bt))
      moved = true
    end
    for k = 1, nused do
      local f = 'u:' .. used[k][1]
      local cur = tonumber(redis.call('HGET', key, f) or '0')
      if used[k][2] > cur then
        redis.call('HSET', key, f, fmt(used[k][2]))
        b.t = b.t + used[k][2] - cur
        moved = true
      end
    end
    if b.r == '' and x.r ~= '' then redis.call('HSET', key, 'r', x.r) end
    if moved then
      redis.call('HSET', key, 't', fmt(b.t))
      expire(key, b, rel(b, now_s, now_n))
      changed = changed + 1
    end
  end
end
return changed
