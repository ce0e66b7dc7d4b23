"""Celery and RQ doing the no-op of benches/pipeline_overhead.sh on the same
redis-server: a task returning its argument, submitted and awaited back to
back by 1 and 64 client threads. Prints rows of the script's table.

    python pipeline_overhead_peers.py REDIS_URL WORKERS SECONDS
"""

import os
import subprocess
import sys
import tempfile
import threading
import time

REDIS, WORKERS, SECONDS = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
BIN = os.path.dirname(sys.executable)

TASKS = f'''
from celery import Celery
app = Celery("t", broker="{REDIS}/1", backend="{REDIS}/1")
app.conf.update(task_acks_late=False, worker_prefetch_multiplier=4, result_expires=600)

@app.task
def noop(x):
    return x

def rq_noop(x):
    return x
'''


def redis_cpu():
    """Seconds of CPU the redis-server has used (user + system)."""
    from redis import Redis

    info = Redis.from_url(REDIS).info("cpu")
    return info["used_cpu_user"] + info["used_cpu_sys"]


def measure(call, clients):
    lat, lock, stop = [], threading.Lock(), time.perf_counter() + SECONDS
    cpu0 = redis_cpu()

    def client(c):
        n, mine = 0, []
        while time.perf_counter() < stop:
            t = time.perf_counter()
            out = call({"client": c, "n": n})
            assert out == {"client": c, "n": n}, out
            mine.append((time.perf_counter() - t) * 1000)
            n += 1
        with lock:
            lat.extend(mine)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    cpu_us = (redis_cpu() - cpu0) * 1e6 / len(lat)
    lat.sort()
    pct = lambda p: lat[round((len(lat) - 1) * p)]
    return len(lat) / elapsed, pct(0.5), pct(0.99), cpu_us


def row(name, clients, r):
    print(f"| {name} | {clients} | {r[0]:.0f} | {r[1]:.2f} | {r[2]:.2f} | {r[3]:.0f} | n/a |", flush=True)


def main():
    d = tempfile.mkdtemp()
    with open(os.path.join(d, "overhead_tasks.py"), "w") as f:
        f.write(TASKS)
    sys.path.insert(0, d)
    env = {**os.environ, "PYTHONPATH": d}
    import overhead_tasks

    celery = subprocess.Popen(
        [os.path.join(BIN, "celery"), "-A", "overhead_tasks", "worker", "-P", "prefork",
         "-c", str(WORKERS), "--without-heartbeat", "--without-gossip", "--without-mingle",
         "--loglevel", "warning"],
        cwd=d, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        overhead_tasks.noop.delay({"client": -1, "n": 0}).get(timeout=60)  # up
        for clients in (1, 64):
            r = measure(lambda x: overhead_tasks.noop.delay(x).get(timeout=30), clients)
            row(f"Celery (redis broker + backend, {WORKERS} prefork)", clients, r)
    finally:
        celery.terminate()
        celery.wait()

    from redis import Redis
    from rq import Queue

    conn = Redis.from_url(f"{REDIS}/2")
    q = Queue("overhead", connection=conn)
    workers = [
        subprocess.Popen(
            [os.path.join(BIN, "rq"), "worker", "--url", f"{REDIS}/2", "--worker-class",
             "rq.worker.SimpleWorker", "--quiet", "overhead"],
            cwd=d, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(WORKERS)
    ]

    def rq_call(x):
        job = q.enqueue(overhead_tasks.rq_noop, x)
        res = job.latest_result(timeout=30)
        assert res is not None and res.type == res.Type.SUCCESSFUL, res
        return res.return_value

    try:
        rq_call({"client": -1, "n": 0})
        for clients in (1, 64):
            row(f"RQ (SimpleWorker ×{WORKERS})", clients, measure(rq_call, clients))
    finally:
        for w in workers:
            w.terminate()
            w.wait()


if __name__ == "__main__":
    main()
