local now_s, now_n, me = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local o = 3
local changed = 0
-- ARGV per delta: es en c i l m vh vo bh bo bt bu r expired s, n (rid used) pairs,
-- n (rid anchor-point anchor-used slice-start-used) quadruples, n (rid "point,before,...") pairs,
-- n (region/node watermark folded-tokens) triples
local function incoming()
  local x = {es = tonumber(ARGV[o + 1]), en = tonumber(ARGV[o + 2]), c = tonumber(ARGV[o + 3]),
             i = tonumber(ARGV[o + 4]), l = tonumber(ARGV[o + 5]), m = ARGV[o + 6],
             vh = ARGV[o + 7], vo = ARGV[o + 8], bh = ARGV[o + 9], bo = ARGV[o + 10],
             bt = tonumber(ARGV[o + 11]), bu = tonumber(ARGV[o + 12]), r = ARGV[o + 13],
             t = 0, reps = {}}
  local expired = ARGV[o + 14] == '1'
  x.s = ARGV[o + 15]
  o = o + 15
  local n = tonumber(ARGV[o + 1]); o = o + 1
  for _ = 1, n do
    local rep = rep_of(x, ARGV[o + 1])
    rep.u = tonumber(ARGV[o + 2])
    x.t = x.t + rep.u
    o = o + 2
  end
  n = tonumber(ARGV[o + 1]); o = o + 1
  for _ = 1, n do
    local rep = rep_of(x, ARGV[o + 1])
    rep.a, rep.au, rep.as = tonumber(ARGV[o + 2]), tonumber(ARGV[o + 3]), tonumber(ARGV[o + 4])
    o = o + 4
  end
  n = tonumber(ARGV[o + 1]); o = o + 1
  for _ = 1, n do
    rep_of(x, ARGV[o + 1]).k = nums(ARGV[o + 2])
    o = o + 2
  end
  n = tonumber(ARGV[o + 1]); o = o + 1
  if n > 0 then x.folds = {} end
  for _ = 1, n do
    x.folds[ARGV[o + 1]] = {tonumber(ARGV[o + 2]), tonumber(ARGV[o + 3])}
    o = o + 3
  end
  return x, expired
end
local function replace(key, x)
  -- a state that arrives whole keeps its own-safe fold records, not the entries they
  -- cover, and counts their F (Bucket._replace)
  if x.folds ~= nil then
    x.folds = own_safe(x.folds, me)
    for rid, rep in pairs(x.reps) do
      if folded(x, rid) then
        x.t = x.t - rep.u
        x.reps[rid] = nil
      end
    end
    for _, wf in pairs(x.folds) do x.t = x.t + wf[2] end
  end
  redis.call('DEL', key)
  for rid, rep in pairs(x.reps) do
    if #rep.k > 0 then rep.k = join_marks({}, rep.k) end
    save_rep(key, rid, rep)
  end
  save_all(key, x)
end
for d = 1, #KEYS do
  local key = KEYS[d]
  local x, expired = incoming()
  local b = load(key)
  if not b then
    if not expired then
      replace(key, x)
      expire(key, x, rel(x, now_s, now_n), me)
      changed = changed + 1
    end
  elseif x.es > b.es or (x.es == b.es and x.en > b.en) then
    -- a later generation: carry our share of this one's TAT beyond its start
    local carried = 0
    local own = b.reps[me]
    if own ~= nil and own.u > 0 then
      local since = (x.es - b.es) * 1000000000 + (x.en - b.en)
      local backlog = tat_of(b, me) - since
      if backlog > 0 then carried = cdiv(cdiv(backlog, b.i) * own.u, b.t) end
    end
    replace(key, x)
    if carried > 0 then
      local mine = rep_of(x, me)
      mine.k = join_marks(mine.k, {1, mine.u})
      mine.u = mine.u + carried
      x.t = x.t + carried
      save_rep(key, me, mine)
      redis.call('HSET', key, 't', fmt(x.t))
    end
    expire(key, x, rel(x, now_s, now_n), me)
    changed = changed + 1
  elseif x.es == b.es and x.en == b.en then
    local moved = false
    if x.folds ~= nil and fold_in(key, b, x.folds, me) then moved = true end
    if vcmp(x.vh, x.vo, b.vh, b.vo) > 0 then
      b.c, b.i, b.l, b.m, b.vh, b.vo, b.s = x.c, x.i, x.l, x.m, x.vh, x.vo, x.s
      redis.call('HSET', key, 'c', fmt(b.c), 'i', fmt(b.i), 'l', fmt(b.l), 'm', b.m,
        'vh', b.vh, 'vo', b.vo)
      save_shadow(key, b)
      moved = true
    end
    -- base: a max-register ordered by (version, time − used·T, time)
    local bc = vcmp(x.bh, x.bo, b.bh, b.bo)
    if bc == 0 then
      local gx, gb = x.bt - x.bu * b.i, b.bt - b.bu * b.i
      if gx > gb then bc = 1 elseif gx < gb then bc = -1
      elseif x.bt > b.bt then bc = 1 end
    end
    if bc > 0 then
      b.bh, b.bo, b.bt, b.bu = x.bh, x.bo, x.bt, x.bu
      redis.call('HSET', key, 'bh', b.bh, 'bo', b.bo, 'bt', fmt(b.bt), 'bu', fmt(b.bu))
      moved = true
    end
    for rid, got in pairs(x.reps) do
      local rep = b.reps[rid]
      local fresh = rep == nil
      if folded(b, rid) then
        -- an entry folded away here: a late message brings it back for nothing
      elseif fresh and rid ~= me and got.u <= 0 and got.a == nil and #got.k == 0 then
        -- nothing to hold
      else
        rep = rep_of(b, rid)
        local dirty = fresh and rid ~= me
        if got.u > rep.u then
          b.t = b.t + got.u - rep.u
          rep.u = got.u
          dirty = true
        end
        if got.a ~= nil and (rep.a == nil or got.a > rep.a) then
          rep.a, rep.au, rep.as = got.a, got.au, got.as
          dirty = true
        end
        if #got.k > 0 then
          local k = join_marks(rep.k, got.k)
          if not same_list(k, rep.k) then
            rep.k = k
            dirty = true
          end
        end
        if dirty then
          save_rep(key, rid, rep)
          moved = true
        end
      end
    end
    if b.r == '' and x.r ~= '' then redis.call('HSET', key, 'r', x.r) end
    if moved then
      redis.call('HSET', key, 't', fmt(b.t))
      expire(key, b, rel(b, now_s, now_n), me)
      changed = changed + 1
    end
  end
end
return changed
