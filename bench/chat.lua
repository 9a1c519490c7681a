-- wrk script: a ~1 KB chat completion request, as an SDK sends it.
local content = string.rep("The quick brown fox jumps over the lazy dog. ", 20)
wrk.method = "POST"
wrk.path = "/v1/chat/completions"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer sk-bench-0123456789abcdef"
wrk.body = '{"model":"gpt-4o-mini","max_tokens":16,"messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"' .. content .. '"}]}'
