"""`vla bench serve`: latency and throughput of `vla serve` on loopback, with the demo-size policy (random weights,
point2d, chunk 8, one 64-px camera).

A server runs as its own process (`vla serve ... port=0`), the clients are asyncio websocket clients in this process:
1, 4 and 16 concurrent clients each send a fixed number of `mode=chunk` requests back to back (client-side latency:
pack, send, server, receive, unpack), then 16 clients against a second server with `max_batch=1` (no batching).

Overhead = p50 remote latency of one client minus p50 of in-process `EnvPolicy.select_action` computing a new chunk
(the same normalization and forward pass, as `vla eval policy=checkpoint:DIR` runs it), the two measured interleaved so
that a noisy neighbour hits both alike; `transport_ms_p50` is the p50 of client latency minus the server's own time
for the request (`server_timing.server_ms`): serialization and the loopback round trip alone.

Targets on the project's CPU: overhead <= 2 ms p50; 16 clients with batching >= 3x the requests/s without.
"""

from __future__ import annotations

import asyncio
import os
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks._util import print_table, setup
from benchmarks.policy import DEMO_BACKBONE, _policy
from envs.normalize import Normalizer

CHUNK, IMAGE, PROMPT = 8, 64, "go to the red square"
STATS = {"action": {"q01": [-1.0, -1.0], "q99": [1.0, 1.0]}, "observation.state": {"q01": [0.0, 0.0], "q99": [1.0, 1.0]}}


def _checkpoint(directory: Path):
    policy = _policy("test", DEMO_BACKBONE, CHUNK, torch.float32)
    policy.normalizer_stats = {"point2d": Normalizer.from_stats(STATS, {k: "quantile" for k in STATS}, name="bench").to_dict()}
    policy.save(directory)
    return policy


def _observation(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"observation.images.top": rng.integers(0, 256, (IMAGE, IMAGE, 3), dtype=np.uint8),
            "observation.state": rng.uniform(0, 1, 2).astype(np.float32), "prompt": PROMPT, "embodiment": "point2d"}


class _Server:
    """`vla serve` in a subprocess on a free loopback port."""

    def __init__(self, checkpoint: Path, max_batch: int, log: Path, threads: int = 0, timeout_s: float = 180.0):
        self.log = open(log, "w")
        command = [sys.executable, "-m", "vla.cli", "serve", f"policy=checkpoint:{checkpoint}", "host=127.0.0.1",
                   "port=0", "device=cpu", f"max_batch={max_batch}", f"threads={threads}"]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                        env=os.environ | {"HF_HUB_OFFLINE": "1"})
        deadline = time.monotonic() + timeout_s
        self.url = None
        while self.url is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.process.poll() is not None:
                self.stop()
                raise RuntimeError(f"vla serve did not start (see {log})")
            ready, _, _ = select.select([self.process.stdout], [], [], remaining)
            line = self.process.stdout.readline() if ready else ""
            if " on ws://" in line:
                self.url = line.split(" on ")[1].split()[0]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.log.close()


async def _connect(url: str):
    from websockets.asyncio.client import connect

    from vla.serve import unpackb

    ws = await connect(url, compression=None, max_size=None, proxy=None, open_timeout=30)
    unpackb(await ws.recv())  # metadata
    return ws


async def _request(ws, observation: dict) -> tuple[float, dict]:
    from vla.serve import packb, unpackb

    start = time.perf_counter()
    await ws.send(packb(observation))
    reply = await asyncio.wait_for(ws.recv(), 60)
    if isinstance(reply, str):
        raise RuntimeError(f"server error: {reply}")
    reply = unpackb(reply)
    return time.perf_counter() - start, reply


async def _concurrent(url: str, clients: int, requests: int) -> dict:
    """`clients` connections, each `requests` requests back to back, started together after one warm-up each."""
    sockets = [await _connect(url) for _ in range(clients)]
    observations = [_observation(i) for i in range(clients)]
    await asyncio.gather(*[_request(ws, obs) for ws, obs in zip(sockets, observations)])
    latencies: list[float] = []
    batch_sizes: list[int] = []

    async def one(ws, obs) -> None:
        for _ in range(requests):
            seconds, reply = await _request(ws, obs)
            latencies.append(seconds)
            batch_sizes.append(int(reply["server_timing"]["batch_size"]))

    start = time.perf_counter()
    await asyncio.gather(*[one(ws, obs) for ws, obs in zip(sockets, observations)])
    wall = time.perf_counter() - start
    for ws in sockets:
        await ws.close()
    return {"ms": [t * 1e3 for t in latencies], "rps": len(latencies) / wall, "batch": batch_sizes}


async def _overhead(url: str, env_policy, requests: int) -> dict:
    """One client: remote requests interleaved with in-process select_action calls (a new chunk each); the
    overhead is the median of the paired differences, so a burst of load that hits one side only does not count."""
    ws = await _connect(url)
    obs = _observation(0)
    local_obs = {"pixels": {"top": obs["observation.images.top"][None]}, "agent_pos": obs["observation.state"][None],
                 "task": [PROMPT]}

    def in_process() -> float:
        start = time.perf_counter()
        env_policy.reset()
        env_policy.select_action(local_obs)
        return time.perf_counter() - start

    for _ in range(3):  # warm-up
        in_process()
        await _request(ws, obs)
    local, remote, transport = [], [], []
    for _ in range(requests):
        local.append(in_process() * 1e3)
        seconds, reply = await _request(ws, obs)
        remote.append(seconds * 1e3)
        transport.append(seconds * 1e3 - reply["server_timing"]["server_ms"])
    await ws.close()
    return {"local_p50": float(np.median(local)), "remote_p50": float(np.median(remote)),
            "overhead_p50": float(np.median(np.array(remote) - np.array(local))), "transport_p50": float(np.median(transport))}


def run(cfg) -> dict:
    from vla.policy.env_policy import EnvPolicy

    setup(cfg)
    load_before = os.getloadavg()[0]
    requests, rounds = (8, 1) if cfg.quick else (20, 3)
    settings = [("batching", 1), ("batching", 4), ("batching", 16), ("no batching", 16)]
    with tempfile.TemporaryDirectory(prefix="vla-bench-serve-") as tmp:
        checkpoint = Path(tmp) / "policy"
        env_policy = EnvPolicy(_checkpoint(checkpoint).eval(), "point2d")
        servers = {}
        try:
            for label, max_batch in (("batching", 16), ("no batching", 1)):
                servers[label] = _Server(checkpoint, max_batch, Path(tmp) / f"server-{max_batch}.log",
                                         int(cfg.get("threads", 0) or 0))
            overhead = asyncio.run(_overhead(servers["batching"].url, env_policy, 60 if cfg.quick else 200))
            runs: dict[tuple, list[dict]] = {s: [] for s in settings}
            for _ in range(rounds):  # the settings take turns, so that a noisy neighbour hits each alike
                for label, clients in settings:
                    runs[(label, clients)].append(asyncio.run(_concurrent(servers[label].url, clients, requests)))
        finally:
            for server in servers.values():
                server.stop()
    stats, rows = {}, []
    for (label, clients), parts in runs.items():
        ms = np.concatenate([p["ms"] for p in parts])
        s = {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)),
             "rps": float(np.median([p["rps"] for p in parts])), "batch": float(np.mean([b for p in parts for b in p["batch"]]))}
        stats[(label, clients)] = s
        rows.append([label, clients, requests * rounds, s["p50"], s["p99"], s["rps"], s["batch"]])
    print(f"vla serve on 127.0.0.1, demo-size policy (chunk {CHUNK} x 2, one {IMAGE}-px camera), mode=chunk, "
          f"{torch.get_num_threads()} torch threads in each process (threads=N sets both); clients are asyncio websockets in this process; "
          f"{rounds} round(s), requests/s = median over rounds")
    print_table(["server", "clients", "requests each", "p50 ms", "p99 ms", "requests/s", "mean batch"], rows)
    o = overhead
    print()
    print_table(["one client, interleaved", "p50 ms"],
                [["in-process EnvPolicy.select_action (new chunk)", o["local_p50"]], ["through the server", o["remote_p50"]],
                 ["overhead (median of paired differences)", o["overhead_p50"]],
                 ["transport (client latency - server time)", o["transport_p50"]]])
    b16, n16 = stats[("batching", 16)], stats[("no batching", 16)]
    speedup = b16["rps"] / n16["rps"]
    print(f"\ntargets: overhead <= 2 ms p50: {o['overhead_p50']:.2f} ms ({'met' if o['overhead_p50'] <= 2 else 'MISSED'}); "
          f"16 clients with batching >= 3x without: {speedup:.2f}x ({'met' if speedup >= 3 else 'MISSED'})")
    load = (round(load_before, 2), round(os.getloadavg()[0], 2))
    print(f"1-minute load average before / after: {load[0]} / {load[1]} (other processes share the CPU when > 0)")
    result: dict = {"bench": "serve", "requests_per_client": requests * rounds, "threads": torch.get_num_threads(),
                    "load_average": list(load)}
    for clients in (1, 4, 16):
        s = stats[("batching", clients)]
        result |= {f"p50_ms_{clients}": round(s["p50"], 2), f"p99_ms_{clients}": round(s["p99"], 2),
                   f"rps_{clients}": round(s["rps"], 1), f"mean_batch_{clients}": round(s["batch"], 2)}
    result |= {"p50_ms_16_no_batching": round(n16["p50"], 2), "rps_16_no_batching": round(n16["rps"], 1),
               "batching_speedup_16": round(speedup, 2), "in_process_p50_ms": round(o["local_p50"], 2),
               "remote_p50_ms_1": round(o["remote_p50"], 2), "overhead_ms_p50": round(o["overhead_p50"], 2),
               "transport_ms_p50": round(o["transport_p50"], 2)}
    return result
