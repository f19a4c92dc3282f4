-- KEYS[1] one Cluster slot's copy of the incarnation (bm:<region>:inc:{<tag>}).
-- ARGV[1] the incarnation. Sets it when missing or older; answers 1 when it did.
local cur = redis.call('GET', KEYS[1])
if cur ~= false and tonumber(cur) >= tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
return 1
