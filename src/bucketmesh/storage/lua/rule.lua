local name = ARGV[1]
local v = redis.call('HMGET', KEYS[1], 'v:' .. name, 'o:' .. name)
if v[1] and vcmp(ARGV[2], ARGV[3], v[1], v[2]) <= 0 then return 0 end
redis.call('HSET', KEYS[1], 'v:' .. name, ARGV[2], 'o:' .. name, ARGV[3], 'c:' .. name, ARGV[4])
return 1
