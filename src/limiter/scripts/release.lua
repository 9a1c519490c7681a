-- A burst proof ended without proving anything (its request was abandoned, or refused for
-- another reason than the burst): the next replica's proof may go (sluice:
-- src/limiter/store.rs; admit.lua claims the proof). KEYS[1]: the bucket's hash.
redis.call('HDEL', KEYS[1], 'pc')
return 1
