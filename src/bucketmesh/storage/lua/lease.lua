-- KEYS[1] the region's strict-shares writer lease. ARGV: this node's id, the lease in
-- ms. Taken when free, renewed when ours; answers 1 when this node holds it.
local cur = redis.call('GET', KEYS[1])
if cur == false or cur == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
