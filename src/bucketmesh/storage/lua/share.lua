-- KEYS[1] a strict key's share hash in one region (bm:<region>:sh:{<key>}). ARGV: the
-- sequence number its writer read, then field/value pairs (the share config new
-- buckets take, the committed ledger). Written, with the sequence number + 1, only
-- when nobody wrote since it was read (two nodes that both think they hold the
-- writer's lease cannot both commit a transfer from one reading). Answers the new
-- sequence number, or -1 when the hash was written since.
local seq = tonumber(redis.call('HGET', KEYS[1], 'q') or '0')
if seq ~= tonumber(ARGV[1]) then return -1 end
for j = 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[j], ARGV[j + 1]) end
redis.call('HSET', KEYS[1], 'q', seq + 1)
return seq + 1
