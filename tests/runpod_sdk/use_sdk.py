"""Drives the shim with RunPod's own Python SDK, unchanged.

Run by tests/tests/runpod_sdk.rs with RUNPOD_ENDPOINT_BASE_URL pointing at
the shim's /v2 and RUNPOD_API_KEY set; prints what the SDK returned as JSON.
"""

import json
import os
import sys

import runpod

runpod.api_key = os.environ["RUNPOD_API_KEY"]
endpoint = runpod.Endpoint("chat")
with open(sys.argv[1], encoding="utf-8") as f:
    request = json.load(f)

sync_output = endpoint.run_sync(request, timeout=180)
job = endpoint.run(request)
first_status = job.status()
async_output = job.output(timeout=180)
final_status = job.status()
streamed_job = endpoint.run(request)
streamed = "".join(streamed_job.stream())
streamed_output = streamed_job.output(timeout=180)
health = endpoint.health()
purged = endpoint.purge_queue()

print(json.dumps({
    "base_url": runpod.endpoint_url_base,
    "sync_output": sync_output,
    "first_status": first_status,
    "async_output": async_output,
    "final_status": final_status,
    "streamed": streamed,
    "streamed_output": streamed_output,
    "health": health,
    "purged": purged,
}))
