//! Every state change of a job is one Lua script, so a record is never
//! half-written. Times come from Redis `TIME` (one clock for the fleet), and
//! every key is passed in by the caller ([`super::keys`]).
//!
//! Key order shared by the scripts that can end a job:
//! `KEYS[1]` record, `KEYS[2]` counts, `KEYS[3]` callbacks due, `KEYS[4]`
//! the job's callback hash, `KEYS[5]` the job's token stream; `ARGV[1]` the
//! job id, `ARGV[2]` the events channel.

use redis::Script;

/// Shared helpers: the Redis clock and the move to a terminal state (counts,
/// finish time, expiry, callback, the token stream's end event when the job
/// streamed, the event:
/// `id`, or `id\n` and the record's HGETALL as a JSON array when its
/// fields and values are at most `EVENT_RECORD_MAX` bytes in all).
const LUA_PRELUDE: &str = r#"
local EVENT_RECORD_MAX = 8192
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- `known`: what the caller already read, {webhook, run, output length}
-- (nil: read here).
local function terminal(from, to, ttl, extra, known)
  local now = now_ms()
  redis.call('HINCRBY', KEYS[2], from, -1)
  redis.call('HINCRBY', KEYS[2], to, 1)
  -- `extra`: field pairs written with the state (a result, an error).
  redis.call('HSET', KEYS[1], 'state', to, 'finished_ms', now, unpack(extra or {}))
  if ttl > 0 then redis.call('PEXPIRE', KEYS[1], ttl) end
  local f = known or redis.call('HMGET', KEYS[1], 'webhook', 'run')
  local hook = f[1]
  if hook then
    -- A new terminal state means a new delivery: any older one is dropped,
    -- and its webhook id no longer matches (see the callback scripts).
    redis.call('DEL', KEYS[4])
    -- The end time and the run: unique to this terminal state even when
    -- two fall in one millisecond (a retried job that expires again).
    local run = f[2] or '0'
    redis.call('HSET', KEYS[4], 'url', hook, 'webhook_id', 'msg_' .. ARGV[1] .. '_' .. now .. '_' .. run, 'attempts', 0)
    redis.call('ZADD', KEYS[3], now, ARGV[1])
  end
  -- The token stream's end, when the job has one: a reader of a job that
  -- streamed nothing finds the end in the record (a stream per job would
  -- double the keys a busy Redis holds).
  if redis.call('EXISTS', KEYS[5]) == 1 then
    redis.call('XADD', KEYS[5], '*', 'end', to)
    redis.call('EXPIRE', KEYS[5], 3600)
  end
  -- The event: the job id, and the record as it ends when it is small
  -- (a waiting /runsync answers from it without reading it back).
  -- The input and the output are the fields that can be large (an audio
  -- message, a spoken reply): measured first, so a large record is never
  -- copied into the script.
  local size = redis.call('HSTRLEN', KEYS[1], 'input') + ((known and known[3]) or redis.call('HSTRLEN', KEYS[1], 'output'))
  local rec = nil
  if size <= EVENT_RECORD_MAX then
    rec = redis.call('HGETALL', KEYS[1])
    size = 0
    for i = 1, #rec do size = size + #rec[i] end
  end
  if rec and size <= EVENT_RECORD_MAX then
    redis.call('PUBLISH', ARGV[2], ARGV[1] .. '\n' .. cjson.encode(rec))
  else
    redis.call('PUBLISH', ARGV[2], ARGV[1])
  end
end
"#;

/// KEYS[6] lane. ARGV: id, events, ttl_ms, consumer group, then field
/// pairs. Creates the record (created and expiry times from the Redis
/// clock) and queues it, the lane and its consumer group first when the
/// lane does not exist yet (a fresh or restarted Redis: workers read with
/// the group). Returns {1, {created_ms, expires_ms}} for a new record (the
/// caller knows the rest of what it stored), {0, the record's HGETALL} for
/// an existing one (left unchanged), so no second round trip is needed.
const LUA_ENQUEUE: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then return {0, redis.call('HGETALL', KEYS[1])} end
local now = now_ms()
local ttl = tonumber(ARGV[3])
redis.call('HSET', KEYS[1], 'created_ms', now, 'expires_ms', now + ttl, unpack(ARGV, 5))
redis.call('HINCRBY', KEYS[2], 'IN_QUEUE', 1)
if redis.call('EXISTS', KEYS[6]) == 0 then
  redis.call('XGROUP', 'CREATE', KEYS[6], ARGV[4], '0', 'MKSTREAM')
end
redis.call('XADD', KEYS[6], '*', 'job', ARGV[1])
return {1, {now, now + ttl}}
"#;

/// ARGV: id, events, worker, result ttl. Returns {verdict, attempt, run}
/// and, for a run, the record as it stands after the claim:
/// a run's lease token is the record's `run`, bumped here and never reset, so
/// a worker that lost its lease can be told apart from the holder.
const LUA_CLAIM: &str = r#"
local f = redis.call('HMGET', KEYS[1], 'state', 'expires_ms', 'max_attempts', 'attempts', 'run')
local st = f[1]
if not st then return {'gone', 0, 0} end
if st ~= 'IN_QUEUE' and st ~= 'IN_PROGRESS' then return {'skip', 0, 0} end
local now = now_ms()
local ttl = tonumber(ARGV[4])
local expires = tonumber(f[2] or '0')
if st == 'IN_QUEUE' and expires > 0 and now > expires then
  terminal(st, 'TIMED_OUT', ttl, {'error', 'the job waited longer than its policy.ttl before a worker was free'})
  return {'expired', 0, 0}
end
local attempt = tonumber(f[4] or '0') + 1
local run = tonumber(f[5] or '0') + 1
local max = tonumber(f[3] or '1')
if attempt > max then
  redis.call('HSET', KEYS[1], 'attempts', attempt, 'run', run)
  terminal(st, 'FAILED', ttl, {'error', 'the worker running this job stopped (crash, kill or lost heartbeat) on each of its ' .. max .. ' attempts'})
  return {'exhausted', attempt, run}
end
if st == 'IN_QUEUE' then
  redis.call('HINCRBY', KEYS[2], 'IN_QUEUE', -1)
  redis.call('HINCRBY', KEYS[2], 'IN_PROGRESS', 1)
end
redis.call('HSET', KEYS[1], 'attempts', attempt, 'run', run, 'state', 'IN_PROGRESS', 'worker', ARGV[3], 'started_ms', now)
return {'run', attempt, run, redis.call('HGETALL', KEYS[1])}
"#;

/// KEYS[6] lane, KEYS[7] the fleet's run totals. ARGV: id, events, ttl,
/// to_state, field, payload, run, group, entry, then (total, amount) pairs
/// added to the run totals before the result is written (so a client that
/// reads the result finds the run already counted). Returns 1 written, 0
/// already settled (cancelled), -1 the lease was lost (nothing touched).
const LUA_FINISH: &str = r#"
local f = redis.call('HMGET', KEYS[1], 'run', 'state', 'webhook')
if f[1] ~= ARGV[7] then return -1 end
for i = 10, #ARGV, 2 do
  redis.call('HINCRBY', KEYS[7], ARGV[i], ARGV[i + 1])
end
redis.call('XACK', KEYS[6], ARGV[8], ARGV[9])
redis.call('XDEL', KEYS[6], ARGV[9])
local st = f[2]
if st ~= 'IN_PROGRESS' then return 0 end
-- The output's length is the payload's when the payload is the output
-- (a retried job's old output was deleted with it).
local out_len = nil
if ARGV[5] == 'output' then out_len = #ARGV[6] end
terminal(st, ARGV[4], tonumber(ARGV[3]), {ARGV[5], ARGV[6]}, {f[3], f[1], out_len})
return 1
"#;

/// ARGV: id, events, ttl, only_if_queued, reason. Returns the state after.
const LUA_CANCEL: &str = r#"
local st = redis.call('HGET', KEYS[1], 'state')
if not st then return false end
if st == 'IN_QUEUE' or (st == 'IN_PROGRESS' and ARGV[4] == '0') then
  if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'error', ARGV[5]) end
  terminal(st, 'CANCELLED', tonumber(ARGV[3]))
  return 'CANCELLED'
end
return st
"#;

/// KEYS[6] lane, KEYS[7] poll cursor. ARGV: id. Puts a FAILED or TIMED_OUT
/// job back with fresh attempts, a clean token stream and no callback state,
/// so nothing of the old run reaches the new one.
const LUA_RETRY: &str = r#"
local st = redis.call('HGET', KEYS[1], 'state')
if st ~= 'FAILED' and st ~= 'TIMED_OUT' then return 0 end
local policy = cjson.decode(redis.call('HGET', KEYS[1], 'policy'))
redis.call('HDEL', KEYS[1], 'error', 'output', 'started_ms', 'finished_ms', 'worker', 'stop_requested', 'progress', 'audio_next')
redis.call('HSET', KEYS[1], 'state', 'IN_QUEUE', 'attempts', 0, 'expires_ms', now_ms() + policy['ttl'])
redis.call('PERSIST', KEYS[1])
redis.call('HINCRBY', KEYS[2], st, -1)
redis.call('HINCRBY', KEYS[2], 'IN_QUEUE', 1)
redis.call('HINCRBY', KEYS[2], 'retried', 1)
redis.call('DEL', KEYS[4], KEYS[5], KEYS[7])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('XADD', KEYS[6], '*', 'job', ARGV[1])
return 1
"#;

/// KEYS[1] record, KEYS[2] counts, KEYS[3] lane. ARGV: id, run, group,
/// entry. A draining worker hands its job back: the attempt it spent is
/// returned, the job is queued again at once (no queue expiry: it already
/// waited its turn). Returns 1, or 0 when the lease was lost.
const LUA_RELEASE: &str = r#"
if redis.call('HGET', KEYS[1], 'run') ~= ARGV[2] then return 0 end
redis.call('XACK', KEYS[3], ARGV[3], ARGV[4])
redis.call('XDEL', KEYS[3], ARGV[4])
if redis.call('HGET', KEYS[1], 'state') ~= 'IN_PROGRESS' then return 1 end
redis.call('HINCRBY', KEYS[1], 'attempts', -1)
redis.call('HSET', KEYS[1], 'state', 'IN_QUEUE', 'expires_ms', 0)
redis.call('HDEL', KEYS[1], 'worker', 'started_ms')
redis.call('HINCRBY', KEYS[2], 'IN_PROGRESS', -1)
redis.call('HINCRBY', KEYS[2], 'IN_QUEUE', 1)
redis.call('XADD', KEYS[3], '*', 'job', ARGV[1])
return 1
"#;

/// KEYS[1] lane, KEYS[2] record. ARGV: group, entry, consumer, run (0: not
/// claimed yet). Keeps an entry this consumer still holds (resets its idle
/// time); 0 when another consumer took it over or the job's run moved on.
const LUA_HEARTBEAT: &str = r#"
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if #p == 0 or p[1][2] ~= ARGV[3] then return 0 end
if ARGV[4] ~= '0' and redis.call('HGET', KEYS[2], 'run') ~= ARGV[4] then return 0 end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, ARGV[2], 'JUSTID')
return 1
"#;

/// KEYS[1] record, KEYS[2] token stream. ARGV: run, batch number, then
/// (option, text) pairs. Appends deltas only for the current run of a
/// running job, and each batch once: a batch re-sent because its reply was
/// lost (Redis went away after running the script) is not written again.
const LUA_TOKENS: &str = r#"
if redis.call('HGET', KEYS[1], 'state') ~= 'IN_PROGRESS' or redis.call('HGET', KEYS[1], 'run') ~= ARGV[1] then
  return 0
end
local batch = tonumber(ARGV[2])
if redis.call('HGET', KEYS[1], 'tokens_run') == ARGV[1] and tonumber(redis.call('HGET', KEYS[1], 'tokens_batch') or '0') >= batch then
  return 1
end
for i = 3, #ARGV, 2 do
  redis.call('XADD', KEYS[2], '*', 'o', ARGV[i], 't', ARGV[i + 1])
end
redis.call('HSET', KEYS[1], 'tokens_run', ARGV[1], 'tokens_batch', batch)
redis.call('EXPIRE', KEYS[2], 3600)
return 1
"#;

/// KEYS[1] record, KEYS[2] token stream. ARGV: run, progress JSON. The
/// running job's progress, kept on the record and sent on its stream, only
/// while that run holds the job.
const LUA_PROGRESS: &str = r#"
if redis.call('HGET', KEYS[1], 'state') ~= 'IN_PROGRESS' or redis.call('HGET', KEYS[1], 'run') ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'progress', ARGV[2])
redis.call('XADD', KEYS[2], '*', 'p', ARGV[2])
redis.call('EXPIRE', KEYS[2], 3600)
return 1
"#;

/// KEYS[1] record, KEYS[2] token stream. ARGV: run, chunk index, text,
/// format, seconds, audio bytes. One spoken chunk of the reply, only while
/// that run holds the job, and each index once across runs: a run after a
/// crash speaks the same sentences again (same text, same seed) and skips
/// the chunks the earlier run already sent. Returns 1 (written or already
/// there), 0 refused.
const LUA_AUDIO: &str = r#"
if redis.call('HGET', KEYS[1], 'state') ~= 'IN_PROGRESS' or redis.call('HGET', KEYS[1], 'run') ~= ARGV[1] then
  return 0
end
local index = tonumber(ARGV[2])
if index < tonumber(redis.call('HGET', KEYS[1], 'audio_next') or '0') then
  return 1
end
redis.call('XADD', KEYS[2], '*', 'ai', ARGV[2], 'at', ARGV[3], 'af', ARGV[4], 'as', ARGV[5], 'a', ARGV[6])
redis.call('HSET', KEYS[1], 'audio_next', index + 1)
redis.call('EXPIRE', KEYS[2], 3600)
return 1
"#;

/// KEYS: a kind's lanes, highest first. ARGV: group, consumer. One new
/// entry for this consumer from the highest lane that has one, as {lane,
/// entry id, fields, more}, or nil; NOGROUP comes back as the error it is.
/// `more` is 1 when the lanes may hold further new entries: the lane read
/// has entries after this one, or a lower lane is not empty (its entries
/// may all be delivered already: 1 errs on the side of another look).
const LUA_TAKE: &str = r#"
for i = 1, #KEYS do
  local r = redis.pcall('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', 1, 'STREAMS', KEYS[i], '>')
  if type(r) == 'table' and r.err then return r end
  if r then
    local e = r[1][2][1]
    local last = redis.call('XREVRANGE', KEYS[i], '+', '-', 'COUNT', 1)
    local more = 0
    if last[1] and last[1][1] ~= e[1] then more = 1 end
    for j = i + 1, #KEYS do
      if more == 0 and redis.call('XLEN', KEYS[j]) > 0 then more = 1 end
    end
    return {KEYS[i], e[1], e[2], more}
  end
end
return false
"#;

/// KEYS[1] record. ARGV: run. 1 while that run holds the job.
const LUA_HOLDS: &str = r#"
if redis.call('HGET', KEYS[1], 'state') == 'IN_PROGRESS' and redis.call('HGET', KEYS[1], 'run') == ARGV[1] then
  return 1
end
return 0
"#;

pub(crate) struct Scripts {
    pub enqueue: Script,
    pub claim: Script,
    pub finish: Script,
    pub cancel: Script,
    pub retry: Script,
    pub release: Script,
    pub heartbeat: Script,
    pub tokens: Script,
    pub progress: Script,
    pub audio: Script,
    pub take: Script,
    pub holds: Script,
}

impl Scripts {
    pub fn new() -> Self {
        let with_prelude = |body: &str| Script::new(&format!("{LUA_PRELUDE}\n{body}"));
        Self {
            enqueue: with_prelude(LUA_ENQUEUE),
            claim: with_prelude(LUA_CLAIM),
            finish: with_prelude(LUA_FINISH),
            cancel: with_prelude(LUA_CANCEL),
            retry: with_prelude(LUA_RETRY),
            release: Script::new(LUA_RELEASE),
            heartbeat: Script::new(LUA_HEARTBEAT),
            tokens: Script::new(LUA_TOKENS),
            progress: Script::new(LUA_PROGRESS),
            audio: Script::new(LUA_AUDIO),
            take: Script::new(LUA_TAKE),
            holds: Script::new(LUA_HOLDS),
        }
    }
}
