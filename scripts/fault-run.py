#!/usr/bin/env python3
"""A fault run: what callers see while workers die under them.

Starts `ember serve` (as root: jailed workers) on a scratch state directory, registers two
functions (each boots its template once), then invokes them from CLIENTS threads for DURATION
seconds while a random function's worker is SIGKILLed every KILL_EVERY seconds and, once halfway
through, the daemon itself is SIGKILLed and started again. Prints how every invocation was
answered (HTTP status, or "conn" for a lost connection) per phase, and the availability: the share
of invocations answered 200.

    scripts/fault-run.py [--ember target/release/ember] [--duration 120] [--clients 4]
                         [--kill-every 10] [--state /tmp/ember-fault]
"""
import argparse, collections, http.client, json, os, random, shutil, signal, socket, subprocess
import sys, threading, time

class UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path, timeout=120):
        super().__init__("ember", timeout=timeout)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)

def request(sock, method, path, body=None, timeout=120):
    c = UnixHTTP(sock, timeout)
    try:
        c.request(method, path, body=json.dumps(body) if body is not None else None,
                  headers={"content-type": "application/json"})
        r = c.getresponse()
        data = r.read()
        return r.status, data, dict(r.getheaders())
    finally:
        c.close()

def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = argparse.ArgumentParser()
    p.add_argument("--ember", default=os.path.join(root, "target/release/ember"))
    p.add_argument("--duration", type=float, default=120)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--kill-every", type=float, default=10)
    p.add_argument("--state", default="/tmp/ember-fault")
    a = p.parse_args()
    shutil.rmtree(a.state, ignore_errors=True)
    os.makedirs(a.state)
    sock = os.path.join(a.state, "api.sock")
    images = os.path.join(root, "images")

    def start():
        d = subprocess.Popen([a.ember, "serve", "--socket", sock, "--state-dir", os.path.join(a.state, "state"),
                              "--images", images], stderr=open(os.path.join(a.state, "daemon.log"), "a"))
        for _ in range(300):
            if os.path.exists(sock):
                try:
                    request(sock, "GET", "/functions", timeout=5)
                    return d
                except OSError:
                    pass
            time.sleep(0.1)
        sys.exit("the daemon did not start")

    def ready(name, n=1, timeout=600):
        end = time.time() + timeout
        while time.time() < end:
            try:
                s, b, _ = request(sock, "GET", "/functions/" + name, timeout=10)
                v = json.loads(b)
                if v.get("state") == "failed":
                    sys.exit(f"{name} failed: {v}")
                if v.get("state") == "ready" and v.get("ready", 0) >= n:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        sys.exit(f"{name} never became ready")

    daemon = start()
    spec = {"kernel": "vmlinux", "initramfs": "initramfs.cpio", "pool": {"min_ready": 2, "max": 8}}
    names = ["fa", "fb"]
    for n in names:
        s, b, _ = request(sock, "PUT", "/functions/" + n, spec)
        assert s == 202, b
    for n in names:
        ready(n, 2)
    print(f"fault run: {a.clients} clients, {a.duration:.0f} s, a worker SIGKILLed every {a.kill_every:.0f} s, "
          f"the daemon SIGKILLed once at {a.duration / 2:.0f} s", flush=True)

    counts = collections.Counter()
    retry_after = collections.Counter()
    lock = threading.Lock()
    stop = time.time() + a.duration

    def client(k):
        rnd = random.Random(k)
        while time.time() < stop:
            n = rnd.choice(names)
            try:
                s, _, h = request(sock, "POST", f"/functions/{n}/invoke",
                                  {"function": "echo", "payload": "x", "timeout_s": 30}, timeout=60)
                key = str(s)
                if s == 503 and "retry-after" in {x.lower() for x in h}:
                    with lock:
                        retry_after[n] += 1
            except (OSError, http.client.HTTPException):
                key = "conn"
                time.sleep(0.05)
            with lock:
                counts[key] += 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(a.clients)]
    for t in threads:
        t.start()
    kills, restarted = 0, False
    next_kill = time.time() + a.kill_every
    while time.time() < stop:
        time.sleep(0.2)
        if not restarted and time.time() > stop - a.duration / 2:
            daemon.send_signal(signal.SIGKILL)
            daemon.wait()
            daemon = start()
            restarted = True
            print("  the daemon was SIGKILLed and started again", flush=True)
        if time.time() >= next_kill:
            next_kill += a.kill_every
            n = random.choice(names)
            try:
                _, b, _ = request(sock, "GET", "/functions/" + n, timeout=10)
                pid = json.loads(b).get("worker", {}).get("pid")
                if pid:
                    os.kill(pid, signal.SIGKILL)
                    kills += 1
            except (OSError, ValueError, http.client.HTTPException):
                pass
    for t in threads:
        t.join()
    # After the load: each function answers 200 again (within 30 s), and how long that took.
    after = {}
    for n in names:
        t0, first = time.time(), None
        while True:
            try:
                s, _, _ = request(sock, "POST", f"/functions/{n}/invoke", {"function": "echo", "payload": "y"})
            except OSError:
                s = "conn"
            first = first or s
            if s == 200 or time.time() - t0 > 30:
                break
            time.sleep(0.2)
        after[n] = f"{first} first, {s} after {time.time() - t0:.1f} s"
    daemon.send_signal(signal.SIGTERM)
    daemon.wait()
    total = sum(counts.values())
    print(f"  {kills} workers killed; {total} invocations:", flush=True)
    for k, v in sorted(counts.items()):
        print(f"    {k}: {v} ({100.0 * v / total:.2f}%)")
    print(f"  503s with Retry-After: {sum(retry_after.values())}")
    print(f"  availability (200s): {100.0 * counts['200'] / total:.2f}%")
    print(f"  after the load, each function until it answers 200: {after}")
    return 0 if all(" 200 after" in s for s in after.values()) else 1

if __name__ == "__main__":
    sys.exit(main())
