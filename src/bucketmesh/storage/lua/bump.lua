-- KEYS[1] the region's incarnation key. ARGV: the incarnation this node ran under,
-- a new one. Takes the new one when the stored one is that old one or missing (one
-- Cluster slot lost its data: every node that sees it asks, the first one wins).
local cur = redis.call('GET', KEYS[1])
if cur == false or cur == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2])
  return 1
end
return 0
