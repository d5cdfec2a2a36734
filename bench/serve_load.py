"""`dipnet serve` under many concurrent clients: failures, latency, throughput, memory.

    python bench/serve_load.py [--model tiny|smollm2|DIR] [--clients 64] [--requests 4] [--max-seconds 600]

Starts `dipnet serve MODEL` on 127.0.0.1 (a free port), then `--clients` threads each send
`--requests` streamed OpenAI-compatible completions (GSM8K-style prompts, greedy, `--max-tokens`).
Client 0 hangs up after its first streamed chunk on every request (a user closing the tab):
the other clients must not notice. Prints failed requests, p50/p99 time to first token and to the
last one, completion tokens/s and requests/s over the whole run, and the server's resident memory
(all its processes) before and at the end of the load (bounded: no growth per request).

The load only ever targets 127.0.0.1 and is bounded twice: each client sends at most
`--requests` requests and stops at `--max-seconds`; the server is stopped at the end.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HOST = "127.0.0.1"  # never anything else: this script sends load


def model_dir(name: str) -> Path:
    if name == "tiny":
        from dipnet.pipeline.base_model import tiny_base
        from dipnet.pipeline.recipe import TinyBaseSettings

        return tiny_base(TinyBaseSettings(), seed=0, progress=False)
    if name == "smollm2":
        from dipnet.pipeline.pretrained import pretrained_base

        return pretrained_base("smollm2-135m-instruct", progress=False)
    return Path(name)


def tree_rss_mb(pid: int) -> float:
    """Resident memory of `pid` and every process below it (dipnet serve starts the vLLM server in
    a session of its own, and the server its engine core), in MiB."""
    parent, rss = {}, {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            for line in open(f"/proc/{d}/status"):
                if line.startswith("PPid:"):
                    parent[int(d)] = int(line.split()[1])
                elif line.startswith("VmRSS:"):
                    rss[int(d)] = int(line.split()[1])
        except OSError:
            continue
    tree, grew = {pid}, True
    while grew:
        below = {p for p, pp in parent.items() if pp in tree} - tree
        tree |= below
        grew = bool(below)
    return sum(rss.get(p, 0) for p in tree) / 1024


def wait_ready(port: int, proc: subprocess.Popen, timeout_s: float) -> str:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"error: the server exited ({proc.returncode}) before it answered")
        try:
            c = http.client.HTTPConnection(HOST, port, timeout=2)
            c.request("GET", "/v1/models")
            r = c.getresponse()
            if r.status == 200:
                return json.loads(r.read())["data"][0]["id"]
        except OSError:
            pass
        time.sleep(1)
    sys.exit(f"error: the server did not answer within {timeout_s:.0f} s")


def one_request(port: int, model: str, prompt: str, max_tokens: int, hang_up: bool) -> dict:
    """One streamed completion; returns timings and token count, or the failure."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True, "stream_options": {"include_usage": True}})
    t0 = time.perf_counter()
    first, tokens = None, 0
    c = http.client.HTTPConnection(HOST, port, timeout=300)
    try:
        c.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        r = c.getresponse()
        if r.status != 200:
            return {"error": f"HTTP {r.status}: {r.read()[:200]!r}"}
        for raw in r:
            line = raw.decode(errors="replace").strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                break
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if first is None and chunk.get("choices"):
                first = time.perf_counter() - t0
                if hang_up:
                    return {"hung_up": True}
        if first is None:
            return {"error": "no token streamed"}
        return {"ttft": first, "latency": time.perf_counter() - t0, "tokens": tokens}
    except (OSError, http.client.HTTPException, ValueError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        c.close()


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", help="tiny, smollm2 or an exported model directory")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--requests", type=int, default=4, help="requests per client (a bound)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-seconds", type=float, default=600, help="every client stops by then (a bound)")
    args = ap.parse_args(argv)
    if not (1 <= args.clients <= 512 and 1 <= args.requests <= 100 and 0 < args.max_seconds <= 3600):
        sys.exit("error: --clients 1-512, --requests 1-100, --max-seconds up to 3600")
    from dipnet.launch.local import free_port

    d = model_dir(args.model)
    work = Path(tempfile.mkdtemp(prefix="dipnet-serve-load-"))
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "dipnet.pipeline.cli", "serve", str(d), "--host", HOST,
                             "--port", str(port), "--workdir", str(work / "serve")],
                            stdout=open(work / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        t_start = time.time()
        name = wait_ready(port, proc, 600)
        print(f"server up in {time.time() - t_start:.0f} s: {d} on {HOST}:{port} (log {work / 'server.log'})", flush=True)
        one_request(port, name, "Question: 1 + 1?\nAnswer:", 8, False)  # warm-up
        rss_before = tree_rss_mb(proc.pid)
        prompts = [f"Question: Ann has {i % 17 + 2} pens. She buys {i % 5 + 3} more. How many pens does Ann have?\nAnswer:"
                   for i in range(args.clients * args.requests)]
        results: list[list[dict]] = [[] for _ in range(args.clients)]
        deadline = time.time() + args.max_seconds

        def client(k: int):
            for j in range(args.requests):
                if time.time() > deadline:
                    break
                results[k].append(one_request(port, name, prompts[k * args.requests + j], args.max_tokens, hang_up=k == 0))

        threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(args.clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=max(1.0, deadline - time.time() + 330))
        wall = time.perf_counter() - t0
        rss_after = tree_rss_mb(proc.pid)
        alive = proc.poll() is None
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
    others = [r for rs in results[1:] for r in rs]
    ok = [r for r in others if "latency" in r]
    failed = [r for r in others if "error" in r]
    hung = sum(1 for r in results[0] if r.get("hung_up"))
    tokens = sum(r["tokens"] for r in ok)
    print(f"\n{args.model}: {args.clients} clients x {args.requests} requests, {args.max_tokens} new tokens, greedy, "
          f"streamed ({os.cpu_count()} CPU cores)")
    print(f"  requests: {len(ok)} completed, {len(failed)} failed, "
          f"{sum(len(rs) for rs in results[1:]) - len(ok) - len(failed)} other; client 0 hung up {hung} times mid-stream")
    for f in failed[:3]:
        print(f"    failure: {f['error'][:200]}")
    print(f"  time to first token  p50 {pct([r['ttft'] for r in ok], 0.5):6.2f} s   p99 {pct([r['ttft'] for r in ok], 0.99):6.2f} s")
    print(f"  time to last token   p50 {pct([r['latency'] for r in ok], 0.5):6.2f} s   p99 {pct([r['latency'] for r in ok], 0.99):6.2f} s")
    print(f"  throughput           {tokens / wall:8.1f} completion tokens/s, {len(ok) / wall:.2f} requests/s "
          f"(wall {wall:.1f} s)")
    if ok:
        print(f"  tokens per request   mean {statistics.mean(r['tokens'] for r in ok):.1f}")
    print(f"  server memory        {rss_before:.0f} MiB before the load, {rss_after:.0f} MiB after "
          f"({rss_after / max(rss_before, 1):.2f}x); server {'still up' if alive else 'DIED'}")


if __name__ == "__main__":
    main()
