local function fmt(x) return string.format('%d', x) end
local function fdiv(a, b)
  local q = math.floor(a / b)
  local r = a - q * b
  if r < 0 then q = q - 1 elseif r >= b then q = q + 1 end
  return q
end
local function cdiv(a, b) return -fdiv(-a, b) end
local function smod(a, b) return a - fdiv(a, b) * b end
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
local function nums(text)
  local out = {}
  for x in string.gmatch(text, '[^,]+') do out[#out + 1] = tonumber(x) end
  return out
end
local function joined(list)
  local out = {}
  for j = 1, #list do out[j] = fmt(list[j]) end
  return table.concat(out, ',')
end
-- A replica's records (bucket.py, "History"): used u, anchor a (nil) with au, marks k
-- (flat list point, before, ...); every time relative to the bucket's epoch.
local function rep_of(b, rid)
  local rep = b.reps[rid]
  if rep == nil then
    rep = {u = 0, au = 0, as = 0, k = {}}
    b.reps[rid] = rep
  end
  return rep
end
local SCALARS = {es = 1, en = 1, c = 1, i = 1, l = 1, bt = 1, t = 1, bu = 1}
local function load(key)
  local flat = redis.call('HGETALL', key)
  if #flat == 0 then return nil end
  local b = {reps = {}, bu = 0}
  for j = 1, #flat - 1, 2 do
    local f, x = flat[j], flat[j + 1]
    local kind = string.sub(f, 1, 2)
    if kind == 'u:' then
      rep_of(b, string.sub(f, 3)).u = tonumber(x)
    elseif kind == 'a:' then
      local triple = nums(x)
      local rep = rep_of(b, string.sub(f, 3))
      rep.a, rep.au, rep.as = triple[1], triple[2], triple[3]
    elseif kind == 'k:' then
      rep_of(b, string.sub(f, 3)).k = nums(x)
    elseif kind == 'f:' then
      local wf = nums(x)
      if b.folds == nil then b.folds = {} end
      b.folds[string.sub(f, 3)] = {wf[1], wf[2]}
    elseif SCALARS[f] then
      b[f] = tonumber(x)
    else
      b[f] = x
    end
  end
  if b.es == nil then return nil end
  return b
end
-- load(key) where the bucket may hold only `me`'s records (the usual bucket of a
-- region that is alone, or whose peers have not spent on it): its known fields in one
-- HMGET, read as load reads them; if the hash holds any other field (another
-- replica's, a fold record), load(key)
local function load_own(key, me)
  local v = redis.call('HMGET', key, 'es', 'en', 'c', 'i', 'l', 'm', 'vh', 'vo', 'bh', 'bo',
    'bt', 'bu', 't', 'r', 's', 'u:' .. me, 'a:' .. me, 'k:' .. me)
  if not v[1] then return nil end -- no epoch: no bucket, as load finds (its last check)
  local found = 0
  for j = 1, 18 do if v[j] then found = found + 1 end end
  if redis.call('HLEN', key) ~= found then return load(key) end
  local b = {es = tonumber(v[1]), en = tonumber(v[2]), c = tonumber(v[3]), i = tonumber(v[4]),
    l = tonumber(v[5]), m = v[6] or nil, vh = v[7] or nil, vo = v[8] or nil, bh = v[9] or nil,
    bo = v[10] or nil, bt = tonumber(v[11]) or nil, bu = tonumber(v[12]) or 0,
    t = tonumber(v[13]) or nil, r = v[14] or nil, s = v[15] or nil, reps = {}}
  if v[16] or v[17] or v[18] then
    local rep = rep_of(b, me)
    if v[16] then rep.u = tonumber(v[16]) end
    if v[17] then
      local triple = nums(v[17])
      rep.a, rep.au, rep.as = triple[1], triple[2], triple[3]
    end
    if v[18] then rep.k = nums(v[18]) end
  end
  return b
end
local function rel(b, now_s, now_n) return (now_s - b.es) * 1000000000 + (now_n - b.en) end
local function slice(b)
  local span = fdiv(b.c * b.i, 8)
  if span > 10000000 then return span end
  return 10000000
end
-- marks a ∪ b: the smaller count per point, the oldest and the newest 63 kept
local function join_marks(a, extra)
  local pairs_ = {}
  local points = {}
  local function put(p, x)
    local known = pairs_[p]
    if known == nil then points[#points + 1] = p end
    if known == nil or x < known then pairs_[p] = x end
  end
  for j = 1, #a - 1, 2 do put(a[j], a[j + 1]) end
  for j = 1, #extra - 1, 2 do put(extra[j], extra[j + 1]) end
  table.sort(points)
  local out = {}
  local first = 1
  if #points > 64 then
    out[1] = points[1]; out[2] = pairs_[points[1]]
    first = #points - 64 + 2
  end
  for j = first, #points do
    out[#out + 1] = points[j]; out[#out + 1] = pairs_[points[j]]
  end
  return out
end
local function same_list(a, b)
  if #a ~= #b then return false end
  for j = 1, #a do if a[j] ~= b[j] then return false end end
  return true
end
local function records(rep, floor, s)
  local out = {}
  local function put(p, x)
    if p >= floor then
      local known = out[p]
      if known == nil or x < known then out[p] = x end
    end
  end
  for j = 1, #rep.k - 1, 2 do put(rep.k[j], rep.k[j + 1]) end
  if rep.a ~= nil and rep.a >= floor then
    put(rep.a, rep.au)
    put(rep.a - smod(rep.a, s), rep.as)
  end
  return out
end
-- the merged TAT (bucket.py, Bucket._recompute), relative to the epoch. Cached as
-- bucket.py caches it: g (terms this replica's grants still raise, minus T·Σused)
-- and unc (terms they no longer raise); a grant that writes no record keeps both.
local function cached_tat(b)
  local tat = b.tg + b.t * b.i
  if b.tu ~= nil and b.tu > tat then tat = b.tu end
  return tat
end
local function tat_of(b, me)
  if b.tc then return cached_tat(b) end
  local s = slice(b)
  local floor = b.bt
  if floor ~= 0 then floor = floor + 1 end
  local g = b.bt - b.bu * b.i
  local own = b.reps[me]
  local mine = {}
  if own ~= nil then mine = records(own, floor, s) end
  local peers = false
  for rid, _ in pairs(b.reps) do if rid ~= me then peers = true end end
  if not peers then
    for p, x in pairs(mine) do
      local term = p - x * b.i
      if term > g then g = term end
    end
    b.tg, b.tu, b.tc = g, nil, true
    return cached_tat(b)
  end
  local last = nil
  local ev = {}
  local cur = {}
  cur[1] = 0
  if own ~= nil then cur[1] = own.u end
  for p, x in pairs(mine) do
    if last == nil or p > last then last = p end
    ev[#ev + 1] = {p, 1, x}
  end
  local index = 1
  for rid, rep in pairs(b.reps) do
    if rid ~= me then
      index = index + 1
      cur[index] = rep.u
      for p, x in pairs(records(rep, floor, s)) do ev[#ev + 1] = {p, index, x} end
    end
  end
  table.sort(ev, function(x, y) return x[1] > y[1] end)
  local spent = b.t
  local unc = nil
  local k = 1
  while k <= #ev do
    local p = ev[k][1]
    while k <= #ev and ev[k][1] == p do
      local q = ev[k][2]
      spent = spent + ev[k][3] - cur[q]
      cur[q] = ev[k][3]
      k = k + 1
    end
    if last ~= nil and p <= last then
      local term = p - spent * b.i
      if term > g then g = term end
    else
      local term = p + (b.t - spent) * b.i
      if unc == nil or term > unc then unc = term end
    end
  end
  b.tg, b.tu, b.tc = g, unc, true
  return cached_tat(b)
end
-- the end of the slice of this replica's newest record (0: none): a grant at or
-- past it opens a slice (bucket.py, Bucket._derive_edge)
local function edge_of(b, me)
  local own = b.reps[me]
  if own == nil then return nil end
  local newest = own.a
  if #own.k > 0 and (newest == nil or own.k[#own.k - 1] > newest) then
    newest = own.k[#own.k - 1]
  end
  if newest == nil then return nil end
  local s = slice(b)
  return newest - smod(newest, s) + s
end
-- a grant that re-bases (the bucket was full) or opens a slice (bucket.py, _note)
local function note(b, me, now_rel, rebase)
  b.tc = nil
  local s = slice(b)
  local own = rep_of(b, me)
  local start = now_rel - smod(now_rel, s)
  if rebase then
    local begun_with = own.u
    if own.a ~= nil then
      local begun = own.a - smod(own.a, s)
      if begun == start then
        begun_with = own.as
      else
        local found = false
        for j = 1, #own.k - 1, 2 do
          if own.k[j] >= begun and own.k[j] < begun + s then found = true end
        end
        if not found then own.k = join_marks(own.k, {begun, own.as}) end
      end
    end
    own.a = now_rel
    own.au = own.u
    own.as = begun_with
  else
    own.k = join_marks(own.k, {now_rel, own.u})
  end
end
-- Redis drops the bucket one second after it has been full for its ttl.
local function expire(key, b, now_rel, me)
  local left = tat_of(b, me) + b.l - now_rel
  local ms = cdiv(math.max(left, 0), 1000000) + 1000
  redis.call('PEXPIRE', key, fmt(ms))
end
local function save_rep(key, rid, rep)
  redis.call('HSET', key, 'u:' .. rid, fmt(rep.u))
  if rep.a ~= nil then
    redis.call('HSET', key, 'a:' .. rid, fmt(rep.a) .. ',' .. fmt(rep.au) .. ',' .. fmt(rep.as))
  end
  if #rep.k > 0 then redis.call('HSET', key, 'k:' .. rid, joined(rep.k)) end
end
-- Retired incarnations (bucket.py, Bucket.fold): f:<region/node> = "W,F" folds that
-- node's incarnations below W into F tokens (in t, without records).
local function below(rid, node, w)
  local n, num = string.match(rid, '^(.*)/(%d+)$')
  return n == node and tonumber(num) < w
end
local function folded(b, rid)
  if b.folds == nil then return false end
  local n, num = string.match(rid, '^(.*)/(%d+)$')
  if n == nil then return false end
  local fold = b.folds[n]
  return fold ~= nil and tonumber(num) < fold[1]
end
-- fold records that would cover `me` (the store's own, live incarnation) are ignored
local function own_safe(folds, me)
  local out = {}
  local n, num = string.match(me, '^(.*)/(%d+)$')
  for node, wf in pairs(folds) do
    if not (n == node and tonumber(num) < wf[1]) then out[node] = wf end
  end
  return out
end
local function save_folds(key, b)
  if b.folds == nil then return end
  for node, wf in pairs(b.folds) do
    redis.call('HSET', key, 'f:' .. node, fmt(wf[1]) .. ',' .. fmt(wf[2]))
  end
end
-- join fold records into stored bucket b (Bucket.fold, line for line): a newer record
-- drops the entries it covers and puts F in their place in t; if any of them held
-- records, the base is first re-based at the TAT as it stood (a step up the register)
local function fold_in(key, b, folds, me)
  local changed, recorded = false, false
  local tat_before, total_before = 0, 0
  for node, wf in pairs(own_safe(folds, me)) do
    local w, f = wf[1], wf[2]
    local known = nil
    if b.folds ~= nil then known = b.folds[node] end
    if known == nil or w > known[1] or (w == known[1] and f > known[2]) then
      if not changed then tat_before, total_before = tat_of(b, me), b.t end
      local dropped = 0
      for rid, rep in pairs(b.reps) do
        if below(rid, node, w) then
          dropped = dropped + rep.u
          if rep.a ~= nil or #rep.k > 0 then recorded = true end
          b.reps[rid] = nil
          redis.call('HDEL', key, 'u:' .. rid, 'a:' .. rid, 'k:' .. rid)
        end
      end
      if b.folds == nil then b.folds = {} end
      b.folds[node] = {w, f}
      local known_f = 0
      if known ~= nil then known_f = known[2] end
      b.t = b.t + f - known_f - dropped
      redis.call('HSET', key, 'f:' .. node, fmt(w) .. ',' .. fmt(f))
      changed = true
    end
  end
  if recorded then
    local gx, gb = tat_before - total_before * b.i, b.bt - b.bu * b.i
    if gx > gb or (gx == gb and tat_before > b.bt) then
      b.bt, b.bu = tat_before, total_before
      redis.call('HSET', key, 'bt', fmt(b.bt), 'bu', fmt(b.bu))
    end
  end
  if changed then
    b.tc = nil
    redis.call('HSET', key, 't', fmt(b.t))
  end
  return changed
end
-- the shadow mark rides in the config register: '1' stored as s, anything else none
local function save_shadow(key, b)
  if b.s == '1' then redis.call('HSET', key, 's', '1') else redis.call('HDEL', key, 's') end
end
local function save_all(key, b)
  redis.call('HSET', key, 'es', fmt(b.es), 'en', fmt(b.en), 'c', fmt(b.c), 'i', fmt(b.i),
    'l', fmt(b.l), 'm', b.m, 'vh', b.vh, 'vo', b.vo, 'bh', b.bh, 'bo', b.bo,
    'bt', fmt(b.bt), 'bu', fmt(b.bu), 't', fmt(b.t), 'r', b.r)
  save_shadow(key, b)
  save_folds(key, b)
end
