if redis.call('GET', KEYS[1]) ~= ARGV[4] then return {-1} end
local now_s, now_n = tonumber(ARGV[1]), tonumber(ARGV[2])
local me = ARGV[3]
local nrules = tonumber(ARGV[5])
local rules = {}
for k = 1, nrules do
  local o = 5 + (k - 1) * 11
  rules[k] = {name = ARGV[o + 1], c = tonumber(ARGV[o + 2]), i = tonumber(ARGV[o + 3]),
              l = tonumber(ARGV[o + 4]), m = ARGV[o + 5], vh = ARGV[o + 6], vo = ARGV[o + 7],
              es = tonumber(ARGV[o + 8]), en = tonumber(ARGV[o + 9]), s = ARGV[o + 10],
              x = ARGV[o + 11]}
end
-- one item per run of decisions asking the same: every decision of the run is
-- its own ask (position j), sharing the run's table
local asks = {}
local pattern = '(%d+),(%d+),(%d+),(%d+),(%d+),(%d+);'
for ki, ri, tok, g, q, n in string.gmatch(ARGV[6 + nrules * 11], pattern) do
  local a = {tonumber(ki) + 1, rules[tonumber(ri)], tonumber(tok), tonumber(g), tonumber(q)}
  for _ = 1, tonumber(n) do asks[#asks + 1] = a end
end
-- strict shares (x = 1): KEYS[k + nb] is the share hash of bucket KEYS[k] (the region's
-- rights ledger: the share config its writer set, storage/redis_backend.py)
local nb = tonumber(ARGV[7 + nrules * 11]) or (#KEYS - 1)
local cache, dirty, fresh, shown = {}, {}, {}, {}
local function bucket(k, rule)
  local b = cache[k]
  if b == nil then
    b = load_own(KEYS[k], me)
    if not b then b = false end
    cache[k] = b
  end
  if not b then
    -- a full bucket under the rule's config, stored only when something is taken
    local fresh_b = {es = rule.es, en = rule.en, c = rule.c, i = rule.i, l = rule.l, m = rule.m,
            vh = rule.vh, vo = rule.vo, s = rule.s, bh = rule.vh, bo = rule.vo, bt = 0, bu = 0,
            t = 0,
            r = rule.name, reps = {}, new = true}
    if rule.x == '1' then
      -- strict shares: the share the region's writer set (its rights now), not the
      -- node's view; full only on the rights it did not receive (they came without
      -- tokens: the giver's bucket may have been empty)
      local sh = redis.call('HMGET', KEYS[k + nb], 'c', 'i', 'vh', 'vo', 'w')
      if sh[1] then
        fresh_b.c, fresh_b.i = tonumber(sh[1]), tonumber(sh[2])
        fresh_b.vh, fresh_b.vo, fresh_b.bh, fresh_b.bo = sh[3], sh[4], sh[3], sh[4]
        local w = tonumber(sh[5]) or 0
        if w > fresh_b.c then w = fresh_b.c end
        if w > 0 then fresh_b.bt = rel(fresh_b, now_s, now_n) + w * fresh_b.i end
      elseif KEYS[2 * nb + 2] and redis.call('GET', KEYS[2 * nb + 2]) ~= ARGV[4] then
        -- no share hash, and the writer has not rewritten every share hash since Redis
        -- lost its data (share_ready_key): the region may hold less than 1/R, so
        -- nothing to spend until it has (an ask is refused, never charged)
        fresh_b.c = 0
      end
    end
    return fresh_b
  end
  return b
end
-- the bucket's config is older than the rule's: it must adopt the rule's first (a
-- strict share's config is its region's writer's to set: never)
local function stale(b, rule)
  return rule.x ~= '1' and not b.new and b.r == rule.name
    and vcmp(rule.vh, rule.vo, b.vh, b.vo) > 0
end
-- now relative to b's epoch, worked out once per bucket (the epoch never changes here)
local function now_of(b)
  local now_rel = b.nr
  if now_rel == nil then
    now_rel = rel(b, now_s, now_n)
    b.nr = now_rel
  end
  return now_rel
end
-- stale(b, rule), worked out once per bucket and rule: b's config only changes when
-- it is saved, and a fresh bucket, once taken from, holds the rule's own config
local function stale_once(b, rule)
  if b.sr ~= rule then
    b.sr = rule
    b.sv = stale(b, rule)
  end
  return b.sv
end
-- the outcome of taking `tokens` at now from b, without changing it
local function judge(b, tokens, now_rel)
  local backlog = tat_of(b, me) - now_rel
  local pos = backlog
  if pos < 0 then pos = 0 end
  return pos + tokens * b.i <= b.c * b.i, backlog, pos
end
local function level(b, backlog)
  if backlog > 0 then return b.c - cdiv(backlog, b.i) end
  return b.c
end
-- answers are by position: a group is settled when the loop reaches its first item
local out = {}
local function answer(j, k, status, b, lvl, retry, reset)
  local n = 4 * (j - 1)
  out[n + 1] = status; out[n + 2] = lvl; out[n + 3] = retry; out[n + 4] = reset
  shown[k] = b
end
-- take `tokens` (known to fit) and answer ALLOWED; `backlog`: judge's, if known
local function take(j, k, b, tokens, backlog)
  local now_rel = now_of(b)
  if backlog == nil then
    local _
    _, backlog = judge(b, tokens, now_rel)
  end
  if tokens > 0 then
    -- the edge (edge_of) kept on b until a grant writes a record (eg: false = none)
    local edge = b.eg
    if edge == nil then
      edge = edge_of(b, me) or false
      b.eg = edge
    end
    if backlog < 0 or not edge or now_rel >= edge then
      note(b, me, now_rel, backlog < 0)
      b.eg = nil
      b.noted = true
    end
    local own = b.reps[me] or rep_of(b, me)
    own.u = own.u + tokens
    b.t = b.t + tokens
    if backlog < 0 then backlog = 0 end
    backlog = backlog + tokens * b.i
    if b.new then
      b.new = nil
      cache[k] = b
      fresh[k] = true
    end
    dirty[k] = now_rel
  end
  -- answer(j, k, 1, b, level(b, backlog), 0, reset), inlined: the usual decision
  local n = 4 * (j - 1)
  out[n + 1] = 1
  if backlog > 0 then out[n + 2] = b.c - cdiv(backlog, b.i) else out[n + 2] = b.c end
  out[n + 3] = 0
  if backlog > 0 then out[n + 4] = backlog else out[n + 4] = 0 end
  shown[k] = b
end
-- answer without taking: status 3 when tokens exceed the capacity, else `status`;
-- `want` (if any) is what the caller needed from this bucket, for retry_after
local function peek(j, k, b, tokens, status, want)
  local _, backlog, pos = judge(b, 0, rel(b, now_s, now_n))
  local retry = 0
  if tokens > b.c then
    status = 3
    retry = pos + tokens * b.i - b.c * b.i
  elseif want then
    retry = pos + math.min(want, b.c) * b.i - b.c * b.i
    if retry < 0 then retry = 0 end
  end
  answer(j, k, status, b, level(b, backlog), retry, pos)
end
local members, reqs = {}, {}
for j, a in ipairs(asks) do
  if a[4] > 0 then members[a[4]] = members[a[4]] or {}; table.insert(members[a[4]], j) end
  if a[5] > 0 then reqs[a[5]] = reqs[a[5]] or {}; table.insert(reqs[a[5]], j) end
end
-- A request (a batch) with an item asking more than its bucket holds is refused
-- whole (400), so none of its items may be charged: checked before any is.
local void = {}
for q, js in pairs(reqs) do
  for _, j in ipairs(js) do
    local a = asks[j]
    local b = bucket(a[1], a[2])
    local cap = b.c
    if stale(b, a[2]) then cap = a[2].c end
    if a[3] > cap then void[q] = true end
  end
end
local settled = {}
local granted = 0 -- the last decision the usual path granted (tokens > 0)
for j, a in ipairs(asks) do
  if not settled[j] then
    local k, rule, tokens, g, q = a[1], a[2], a[3], a[4], a[5]
    if q > 0 and void[q] then
      -- charged nothing: the items that fit are peeks
      peek(j, k, bucket(k, rule), tokens, 0, nil)
    elseif g > 0 then
      -- an all-or-nothing group, judged and settled whole here, against the
      -- state as the items before it left it
      local js = members[g]
      local redo = false
      for _, i in ipairs(js) do
        if stale(bucket(asks[i][1], asks[i][2]), asks[i][2]) then redo = true end
      end
      if redo then
        -- adopting the newer config changes what the group may take: redo it whole
        for _, i in ipairs(js) do
          answer(i, asks[i][1], 2, bucket(asks[i][1], asks[i][2]), 0, 0, 0)
        end
      else
        local want, order = {}, {}
        for _, i in ipairs(js) do
          local x = asks[i]
          if want[x[1]] == nil then want[x[1]] = 0; order[#order + 1] = i end
          want[x[1]] = want[x[1]] + x[3]
        end
        local short = false
        for _, i in ipairs(order) do
          local x = asks[i]
          local b = bucket(x[1], x[2])
          local ok = judge(b, want[x[1]], rel(b, now_s, now_n))
          if want[x[1]] > b.c or not ok then short = true end
        end
        for _, i in ipairs(js) do
          local x = asks[i]
          if short then
            local b = bucket(x[1], x[2])
            local w = want[x[1]]
            local ok = judge(b, w, rel(b, now_s, now_n))
            if w <= b.c and ok then w = nil end
            peek(i, x[1], b, 0, 0, w)
          else
            take(i, x[1], bucket(x[1], x[2]), x[3])
          end
        end
      end
      for _, i in ipairs(js) do settled[i] = true end
    else
      local b = cache[k] or bucket(k, rule)
      -- the next decision of a run whose last one was a grant (the same bucket and
      -- rule, so not stale): while its TAT is cached, now is before the slice edge
      -- and the bucket is not full (no record to write), take's steps in short
      local tat, after = nil, nil
      if granted == j - 1 and a == asks[j - 1] and b.tc and b.eg and b.nr < b.eg then
        tat = b.tg + b.t * b.i
        if b.tu ~= nil and b.tu > tat then tat = b.tu end
        after = tat - b.nr + tokens * b.i
        if tat < b.nr or after > b.c * b.i then after = nil end
      end
      if after ~= nil then
        local own = b.reps[me]
        own.u = own.u + tokens
        b.t = b.t + tokens
        local n = 4 * (j - 1)
        out[n + 1] = 1
        out[n + 2] = b.c - cdiv(after, b.i)
        out[n + 3] = 0
        out[n + 4] = after
        granted = j
      elseif stale_once(b, rule) then
        answer(j, k, 2, b, 0, 0, 0)
      else
        -- judge(b, tokens, now_of(b)), inlined: the usual decision
        if b.tc then
          tat = b.tg + b.t * b.i
          if b.tu ~= nil and b.tu > tat then tat = b.tu end
        else
          tat = tat_of(b, me)
        end
        local backlog = tat - (b.nr or now_of(b))
        local pos = backlog
        if pos < 0 then pos = 0 end
        local ok = pos + tokens * b.i <= b.c * b.i
        if ok then
          take(j, k, b, tokens, backlog)
          if tokens > 0 then granted = j end
        else
          local status = 0
          if tokens > b.c then status = 3 end
          answer(j, k, status, b, level(b, backlog), pos + tokens * b.i - b.c * b.i, pos)
        end
      end
    end
  end
end
for k, now_rel in pairs(dirty) do
  local b = cache[k]
  local rep = b.reps[me]
  if fresh[k] then
    save_all(KEYS[k], b)
    save_rep(KEYS[k], me, rep)
  else
    -- one write: the total, this replica's count, and its records if a grant of
    -- this call wrote one (else they are as loaded)
    local f = {'t', fmt(b.t), 'u:' .. me, fmt(rep.u)}
    if b.noted then
      if rep.a ~= nil then
        f[5] = 'a:' .. me
        f[6] = fmt(rep.a) .. ',' .. fmt(rep.au) .. ',' .. fmt(rep.as)
      end
      if #rep.k > 0 then
        f[#f + 1] = 'k:' .. me
        f[#f + 1] = joined(rep.k)
      end
    end
    redis.call('HSET', KEYS[k], unpack(f))
  end
  expire(KEYS[k], b, now_rel, me)
end
for k = 2, nb + 1 do
  local b = shown[k]
  local n = #out
  if b then
    out[n + 1] = b.c; out[n + 2] = b.i; out[n + 3] = b.m; out[n + 4] = b.r
    if b.s == '1' then out[n + 5] = 1 else out[n + 5] = 0 end
  else
    out[n + 1] = 0; out[n + 2] = 1; out[n + 3] = ''; out[n + 4] = ''; out[n + 5] = 0
  end
end
return out
