-- wrk sends what loadgen sends (perf/run-http.sh passes the arguments):
-- the same JSON body and the same key shapes.
--
--   wrk -t2 -c64 -d10s -s perf/wrk-orders.lua http://127.0.0.1:3000/orders \
--     -- KEYS BODY_BYTES RUN KEY_SPACE
--
-- KEYS: unique (a fresh key per request), repeat (64 keys per thread,
-- cycled: replays after the first round), preloaded (keys pre-0 ..
-- pre-{KEY_SPACE - 1}, at random: what `bench-server --preload` recorded),
-- none (no key). RUN tells one run's keys from another's.
local next_id = 0
function setup(thread)
  thread:set("id", next_id)
  next_id = next_id + 1
end
function init(args)
  mode, run, space = args[1], args[3], tonumber(args[4])
  local head, tail = '{"item":"book","qty":1,"pad":"', '"}'
  wrk.method = "POST"
  wrk.body = head .. string.rep("x", math.max(0, tonumber(args[2]) - #head - #tail)) .. tail
  wrk.headers["Content-Type"] = "application/json"
  seq = 0
  math.randomseed(os.time() + id)
end
function request()
  seq = seq + 1
  if mode == "unique" then
    wrk.headers["Idempotency-Key"] = "u-" .. run .. "-" .. id .. "-" .. seq
  elseif mode == "repeat" then
    wrk.headers["Idempotency-Key"] = "r-" .. run .. "-" .. id .. "-" .. (seq % 64)
  elseif mode == "preloaded" then
    wrk.headers["Idempotency-Key"] = "pre-" .. math.random(0, space - 1)
  end
  return wrk.format()
end
