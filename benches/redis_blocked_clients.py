"""What each client blocked on a stream costs Redis per entry added to it.

Starts a redis-server on a free port, blocks 0, 100 and 1000 clients on one
stream (XREAD from an id no entry reaches, so none is ever served: Redis
only looks at each of them for every XADD), and prints Redis's own CPU time
(INFO cpu, user + system) per XADD of a redis-benchmark run.

    python3 benches/redis_blocked_clients.py

The queue's workers block in XREADGROUP on their lanes while idle; Redis
looks at every blocked client of a lane for each job added to it, which is
why a worker lets only QUEUE_BLOCKING_READS idle slots per kind wait there.
"""
import socket
import subprocess
import time


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


port = free_port()
server = subprocess.Popen(
    ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
    stdout=subprocess.DEVNULL,
)


def cli(*a):
    return subprocess.run(["redis-cli", "-p", str(port), *a], capture_output=True, text=True).stdout.strip()


while cli("ping") != "PONG":
    time.sleep(0.05)


def cpu():
    s = cli("info", "cpu")
    return sum(float(l.split(":")[1]) for l in s.splitlines() if l.startswith(("used_cpu_sys:", "used_cpu_user:")))


def blocked():
    return int(cli("info", "clients").split("blocked_clients:")[1].split()[0])


socks = []
cmd = ["XREAD", "BLOCK", "0", "STREAMS", "s", "99999999999999-0"]
wire = ("*%d\r\n" % len(cmd) + "".join("$%d\r\n%s\r\n" % (len(c), c) for c in cmd)).encode()
try:
    print("| clients blocked on the stream | Redis CPU per XADD, µs |")
    print("|---:|---:|")
    for n in [0, 100, 1000]:
        while len(socks) < n:
            so = socket.create_connection(("127.0.0.1", port))
            so.sendall(wire)
            socks.append(so)
        while blocked() < n:
            time.sleep(0.05)
        c0 = cpu()
        subprocess.run(
            ["redis-benchmark", "-p", str(port), "-n", "100000", "-c", "4", "-q",
             "xadd", "s", "MAXLEN", "1000", "*", "f", "v"],
            capture_output=True,
        )
        c1 = cpu()
        print(f"| {blocked()} | {(c1 - c0) / 100000 * 1e6:.2f} |")
finally:
    for so in socks:
        so.close()
    server.terminate()
    server.wait()
