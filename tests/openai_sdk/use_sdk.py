"""The official `openai` package against the shim's OpenAI-compatible
routes: prints one JSON object with what each call returned, for
tests/tests/openai_sdk.rs.

    OPENAI_BASE_URL=http://HOST/openai/v1 OPENAI_API_KEY=KEY use_sdk.py
"""

import json

import openai

client = openai.OpenAI(max_retries=0)
out = {}

out["models"] = [m.id for m in client.models.list().data]

messages = [
    {"role": "system", "content": "Answer in one short sentence."},
    {"role": "user", "content": "Hi! What are you doing tonight?"},
]
r = client.chat.completions.create(model="companion-chat", messages=messages, n=3, max_tokens=12, seed=7)
out["n3"] = {
    "id": r.id,
    "object": r.object,
    "choices": [{"index": c.index, "content": c.message.content, "role": c.message.role, "finish_reason": c.finish_reason} for c in r.choices],
    "usage": r.usage.model_dump(),
}
again = client.chat.completions.create(model="companion-chat", messages=messages, n=3, max_tokens=12, seed=7)
out["n3_again"] = [c.message.content for c in again.choices]

chunks = client.chat.completions.create(
    model="companion-chat", messages=messages, max_tokens=12, seed=7, stream=True,
    stream_options={"include_usage": True},
)
streamed = {"deltas": [], "finish": None, "usage": None, "roles": []}
for ch in chunks:
    if ch.usage:
        streamed["usage"] = ch.usage.model_dump()
    for c in ch.choices:
        if c.delta.role:
            streamed["roles"].append(c.delta.role)
        if c.delta.content:
            streamed["deltas"].append(c.delta.content)
        if c.finish_reason:
            streamed["finish"] = c.finish_reason
out["stream"] = streamed
single = client.chat.completions.create(model="companion-chat", messages=messages, max_tokens=12, seed=7)
out["single"] = single.choices[0].message.content

try:
    client.chat.completions.create(model="companion-chat", messages=messages, n=9)
    out["bad_n"] = None
except openai.BadRequestError as e:
    out["bad_n"] = {"status": e.status_code, "body": e.body}
try:
    client.chat.completions.create(model="companion-chat", messages=[{"role": "assistant", "content": "hello"}])
    out["bad_last"] = None
except openai.BadRequestError as e:
    out["bad_last"] = {"status": e.status_code, "body": e.body}
try:
    openai.OpenAI(api_key="wrong", max_retries=0).chat.completions.create(model="companion-chat", messages=messages)
    out["bad_key"] = None
except openai.AuthenticationError as e:
    out["bad_key"] = {"status": e.status_code, "body": e.body}

print(json.dumps(out))
