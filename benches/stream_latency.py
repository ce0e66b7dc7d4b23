"""Time to first streamed byte and the gaps between chunks at the shim; with
`spoken`, how long after a sentence's text its audio arrives.

Started by benches/stream_latency.sh, which runs redis-server, api-shim, a
worker and this file's platform fixture. Prints JSON.
"""

import http.server
import json
import sys
import threading
import time
import urllib.request


class Platform(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _json(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path.startswith("/v1/instances/") and "/messages" in self.path:
            self._json(200, {"data": [
                {"role": "assistant", "medium": "text", "content": "Great! You?"},
                {"role": "user", "medium": "text", "content": "How are you doing?"},
            ], "next_cursor": None})
        elif self.path.startswith("/v1/instances/"):
            self._json(200, {"id": "inst-1", "snapshot_title": "Luna",
                             "snapshot_description": "{{char}} is a cheerful barista.",
                             "snapshot_personality": "warm", "snapshot_scenario": "Evening chat."})
        elif self.path.startswith("/v1/personas"):
            self._json(200, {"data": [{"name": "Sam", "gender": "female", "is_default": True}]})
        else:
            self._json(404, {"error": "not found"})

    def do_POST(self):
        length = int(self.headers.get("content-length", 0))
        self.rfile.read(length)
        self._json(201, {"id": "m"})


def serve_platform(port):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Platform)
    threading.Thread(target=server.serve_forever, daemon=True).start()


def measure(shim, key, runs):
    ttfb, gaps, chunks, totals = [], [], [], []
    for i in range(runs):
        req = urllib.request.Request(
            f"{shim}/v1/instances/inst-1/chat/stream",
            data=json.dumps({"content": f"What are you doing tonight? ({i})"}).encode(),
            headers={"authorization": f"Bearer {key}", "content-type": "application/json"},
        )
        start = time.perf_counter()
        last = None
        n = 0
        with urllib.request.urlopen(req) as resp:
            while True:
                chunk = resp.read1(65536)
                if not chunk:
                    break
                now = time.perf_counter()
                if last is None:
                    ttfb.append(now - start)
                else:
                    gaps.append(now - last)
                last = now
                n += 1
        totals.append(time.perf_counter() - start)
        chunks.append(n)
    gaps.sort()
    return {
        "runs": runs,
        "ttfb_ms_mean": 1000 * sum(ttfb) / len(ttfb),
        "gap_ms_median": 1000 * gaps[len(gaps) // 2] if gaps else None,
        "gap_ms_p90": 1000 * gaps[int(len(gaps) * 0.9)] if gaps else None,
        "chunks_mean": sum(chunks) / len(chunks),
        "seconds_per_reply": sum(totals) / len(totals),
    }


def measure_spoken(shim, key, runs):
    """Streamed replies with `generate_audio` as Server-Sent Events: for each
    audio chunk, the time from the `output` event that completed its text to
    the `audio` event (the speech's own latency at the client), and the time
    from the request to the first audio."""
    first_audio, first_text, after_text, first_after_text, seconds = [], [], [], [], []
    first_seconds = []
    for i in range(runs):
        req = urllib.request.Request(
            f"{shim}/v1/instances/inst-1/chat/stream",
            data=json.dumps({"content": f"Tell me about your evening. ({i})",
                             "generate_audio": True}).encode(),
            headers={"authorization": f"Bearer {key}", "content-type": "application/json",
                     "accept": "text/event-stream"},
        )
        start = time.perf_counter()
        text, spoken = "", ""
        # (length of the text so far, when it arrived)
        text_at = []
        first = True
        with urllib.request.urlopen(req) as resp:
            event = None
            for raw in resp:
                line = raw.decode().rstrip("\n")
                now = time.perf_counter()
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: ") and event == "output":
                    if not text:
                        first_text.append(now - start)
                    text += json.loads(line[6:])["text"]
                    text_at.append((len(text), now))
                elif line.startswith("data: ") and event == "audio":
                    chunk = json.loads(line[6:])
                    spoken += chunk["text"]
                    # When the text this chunk completes had arrived.
                    ready = next(t for n, t in text_at if n >= len(spoken))
                    after_text.append(now - ready)
                    seconds.append(chunk["seconds"])
                    if first:
                        first_seconds.append(chunk["seconds"])
                        first_audio.append(now - start)
                        first_after_text.append(now - ready)
                        first = False
                elif line.startswith("data: ") and event == "completed":
                    break
    first_unsorted = list(first_after_text)
    after_text.sort()
    first_after_text.sort()
    ms = lambda xs, q: 1000 * xs[min(len(xs) - 1, int(len(xs) * q))]
    return {
        "runs": runs,
        "chunks": len(after_text),
        "first_text_ms_mean": 1000 * sum(first_text) / len(first_text),
        "first_audio_ms_mean": 1000 * sum(first_audio) / len(first_audio),
        "first_audio_after_text_ms_median": ms(first_after_text, 0.5),
        "first_audio_after_text_ms_max": 1000 * first_after_text[-1],
        "audio_after_text_ms_median": ms(after_text, 0.5),
        "audio_after_text_ms_p90": ms(after_text, 0.9),
        "chunk_seconds_mean": sum(seconds) / len(seconds),
        "first_chunk_seconds_mean": sum(first_seconds) / len(first_seconds),
        # Each reply's first chunk: seconds of speech, ms after its text.
        "first_chunks": [[round(s, 2), round(1000 * t)] for s, t in zip(first_seconds, first_unsorted)],
    }


if __name__ == "__main__":
    if sys.argv[1] == "platform":
        serve_platform(int(sys.argv[2]))
        while True:
            time.sleep(3600)
    elif sys.argv[1] == "spoken":
        print(json.dumps(measure_spoken(sys.argv[2], sys.argv[3], int(sys.argv[4]))))
    else:
        print(json.dumps(measure(sys.argv[2], sys.argv[3], int(sys.argv[4]))))
