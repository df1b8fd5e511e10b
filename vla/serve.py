"""vla serve policy=checkpoint:DIR [host=127.0.0.1] [port=8000] [api_key=KEY] [batch_window_ms=2] [max_batch=16]

A websocket policy server speaking openpi's protocol, so a robot's computer can run openpi's `openpi-client`
(`WebsocketClientPolicy`, unmodified) or this module's `RemoteClient` against a policy on a GPU box.

Protocol
--------
Frames are msgpack; numpy arrays travel as openpi's `msgpack_numpy` writes them: a map
`{b"__ndarray__": True, b"data": raw bytes, b"dtype": "<f4", b"shape": [H, A]}` (numpy scalars as
`{b"__npgeneric__": True, b"data": value, b"dtype": ...}`). Nothing is ever unpickled; only bool, integer and float
dtypes are accepted.

- On connect the server sends one metadata map: `embodiments` (per robot: `cameras` (request keys), `action_dim`,
  `state_dim`, `chunk_len`, `fps`), `image_size`, `any_image_size`, `policy_config` (the checkpoint's
  VLAPolicyConfig), `max_frame_bytes`, `modes`.
- A request is a map: `observation.images.<camera>` (H, W, 3) uint8 per camera of the robot (the keys listed in the
  metadata), `observation.state` (state_dim,) float32 in the robot's raw units, `prompt` (the instruction),
  `embodiment` (optional when the policy serves one robot), and optionally `mode` and `reset` (below).
- The reply is `{"actions": (H, A) float32 in raw units, "server_timing": {"infer_ms", "server_ms", "batch_size"}}`.
  The server normalizes the state and unnormalizes the actions with the checkpoint's `normalizer_stats` (the same
  `EnvPolicy` code as `vla eval policy=checkpoint:DIR`).
- `mode="chunk"` (default, what openpi clients expect): `actions` is the whole predicted chunk (H = chunk_len); the
  client executes some of it (openpi's ActionChunkBroker) and asks again.
  `mode="step"`: the server keeps this connection's action queue / temporal ensemble (the checkpoint's
  `n_action_steps` / `temporal_ensemble_coeff`, as `VLAPolicy.select_action` does in process) and `actions` is the
  one action (1, A) for this step; a request with `reset=True` starts a new episode. Each connection has its own
  queue, so robots of different embodiments share one server.
- A bad request (missing key, wrong image shape or dtype, unknown embodiment, wrong state size, NaN, a frame that is
  not msgpack, a text frame, a frame over `max_frame_bytes`) is answered with a text frame `error: <what is wrong>`
  (openpi's client raises it as RuntimeError) and one log line; the connection and every other one keep working.
  Frames over 4x `max_frame_bytes` are not read: the websocket library closes that connection (code 1009).
- `GET /healthz` answers 200 (no key needed). With `api_key`, a connection without the header
  `Authorization: Api-Key <key>` is refused (HTTP 401) during the handshake, before any model work.

Batching: requests of concurrent connections are run as one forward pass. When the model is idle, the first request
waits at most `batch_window_ms` for the other active connections (those that asked for a forward pass in the last
second, or connected since) and goes as soon as each of them has a request in; requests that arrive while a forward
pass runs form the next batch. `max_batch=1` turns batching off. A batch whose forward pass fails is retried one
request at a time, so one odd request cannot fail the others.

`vla eval policy=remote:ws://HOST:PORT env=...` rolls the built-in envs out through a server (`RemotePolicy`: one
connection per env of the vector env, `mode="step"`), with the same results as `policy=checkpoint:DIR` in process.
Pass the key with `policy_options={api_key: KEY}` or the VLA_API_KEY environment variable.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import http
import logging
import math
import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import msgpack
import numpy as np

log = logging.getLogger("vla.serve")

ACTION, STATE = "action", "observation.state"
IMAGES = "observation.images."
MODES = ("chunk", "step")
ACTIVE_S = 1.0  # a connection counts as active (the batcher waits for it) this long after its last forward request
TEXT_CACHE_LIMIT = 10_000  # tokenized prompts the policy may keep cached
HARD_LIMIT_FACTOR = 4  # frames up to this x max_frame_bytes are read and refused; beyond, the library closes the link


# ---------------------------------------------------------------------------------------------------------------------
# wire format: msgpack with numpy arrays as openpi's msgpack_numpy encodes them
# ---------------------------------------------------------------------------------------------------------------------
class WireError(ValueError):
    """A frame that is not a valid msgpack message of this protocol."""


_KINDS = "biuf"  # bool, signed, unsigned, float: everything else (object, void, complex, str) is refused


def _encode(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in _KINDS:
            raise TypeError(f"cannot send arrays of dtype {obj.dtype}")
        return {b"__ndarray__": True, b"data": obj.tobytes(), b"dtype": obj.dtype.str, b"shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        if obj.dtype.kind not in _KINDS:
            raise TypeError(f"cannot send scalars of dtype {obj.dtype}")
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    if hasattr(obj, "detach") and hasattr(obj, "numpy"):  # a torch tensor
        return _encode(obj.detach().cpu().numpy())
    raise TypeError(f"cannot serialize {type(obj).__name__}")


def _dtype(value: Any) -> np.dtype:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if not isinstance(value, str) or not 1 <= len(value) <= 8:
        raise WireError(f"array dtype must be a short numpy dtype string like '<f4', got {value!r}")
    try:
        dtype = np.dtype(value)
    except TypeError:
        raise WireError(f"unknown array dtype {value!r}") from None
    if dtype.kind not in _KINDS:
        raise WireError(f"array dtype {value!r} is not allowed (only bool, integer and float arrays)")
    return dtype


def _decode(obj: dict) -> Any:
    if b"__ndarray__" in obj:
        dtype = _dtype(obj.get(b"dtype"))
        shape, data = obj.get(b"shape"), obj.get(b"data")
        if not isinstance(shape, (list, tuple)) or len(shape) > 8 or not all(
                isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
            raise WireError(f"array shape must be a list of at most 8 non-negative ints, got {shape!r}")
        if not isinstance(data, bytes):
            raise WireError("array data must be bytes")
        if len(data) != math.prod(shape) * dtype.itemsize:
            raise WireError(f"array of shape {list(shape)} and dtype {dtype} needs {math.prod(shape) * dtype.itemsize} "
                            f"bytes, got {len(data)}")
        array = np.frombuffer(data, dtype=dtype).reshape(shape)
        return array.astype(dtype.newbyteorder("=")) if not dtype.isnative else array.copy()
    if b"__npgeneric__" in obj:
        value = obj.get(b"data")
        if not isinstance(value, (bool, int, float)):
            raise WireError(f"numpy scalar data must be a number, got {type(value).__name__}")
        return _dtype(obj.get(b"dtype")).type(value)
    return obj


def packb(obj: Any) -> bytes:
    """msgpack bytes with numpy arrays (and torch tensors) encoded as openpi does."""
    return msgpack.packb(obj, default=_encode, use_bin_type=True)


def unpackb(data: bytes) -> Any:
    """Decode a frame; raises WireError for anything that is not a valid message (never unpickles)."""
    try:
        return msgpack.unpackb(data, object_hook=_decode, raw=False)
    except WireError:
        raise
    except Exception as error:  # noqa: BLE001 - msgpack raises several types for malformed input
        raise WireError(f"frame is not valid msgpack ({type(error).__name__}: {error})") from None


# ---------------------------------------------------------------------------------------------------------------------
# the server
# ---------------------------------------------------------------------------------------------------------------------
class RequestError(ValueError):
    """What is wrong with one request; the client gets the message, the connection stays open."""


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000  # 0 = any free port (PolicyServer.port after start)
    api_key: str | None = None
    batch_window_ms: float = 5.0
    max_batch: int = 16
    max_frame_bytes: int = 8 * 2**20
    image_size: int | None = None  # None = any (H, W, 3); the policy resizes frames to its vision tile
    max_prompt_chars: int = 2000

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.batch_window_ms < 0:
            raise ValueError(f"batch_window_ms must be >= 0, got {self.batch_window_ms}")
        if self.max_frame_bytes < 1024:
            raise ValueError(f"max_frame_bytes must be >= 1024, got {self.max_frame_bytes}")


@dataclass
class Request:
    embodiment: str
    frames: dict[str, np.ndarray]  # camera key -> (H, W, 3) uint8
    state: np.ndarray  # (state_dim,) float32, raw units
    prompt: str
    mode: str = "chunk"
    reset: bool = False

    @property
    def frame_shape(self) -> tuple[int, ...]:
        """Requests batch together only when their frames share one size (the policy stacks every camera)."""
        return next(iter(self.frames.values())).shape if self.frames else ()


class Session:
    """One connection's action selection in `mode="step"`: VLAPolicy.select_action's queue (n_action_steps of each
    chunk) or ACT temporal ensemble, kept per connection and in normalized units as the policy keeps them."""

    def __init__(self, config) -> None:
        self.config = config
        self.embodiment: str | None = None
        self.queue: deque = deque()
        self.ensemble: list[tuple[int, Any]] = []
        self.requests = 0
        self.errors = 0

    def begin(self, request: Request) -> None:
        if request.mode == "step" and (request.reset or request.embodiment != self.embodiment):
            self.queue.clear()
            self.ensemble.clear()
            self.embodiment = request.embodiment

    def needs_chunk(self, mode: str) -> bool:
        return mode == "chunk" or self.config.temporal_ensemble_coeff is not None or not self.queue

    def step(self, chunk, chunk_len: int):
        """The normalized (A,) action for this step; `chunk` (H, A) is a fresh prediction or None."""
        import torch

        coeff = self.config.temporal_ensemble_coeff
        if coeff is not None:
            self.ensemble = [(age + 1, c) for age, c in self.ensemble if age + 1 < c.shape[0]] + [(0, chunk)]
            preds = torch.stack([c[age] for age, c in self.ensemble])  # oldest first
            w = torch.exp(-coeff * torch.arange(len(preds), dtype=preds.dtype, device=preds.device))
            return (preds * w[:, None]).sum(0) / w.sum()
        if chunk is not None:
            self.queue = deque(chunk[: min(self.config.n_action_steps or chunk_len, chunk_len)])
        return self.queue.popleft()


@dataclass(eq=False)
class _Item:
    request: Request
    future: asyncio.Future


class PolicyServer:
    """Serves a VLAPolicy over websockets (see the module docstring). `await serve()` runs it on the current event
    loop until `stop()`; `ServerThread` runs it in a background thread."""

    def __init__(self, policy, options: ServeOptions | None = None, name: str = "") -> None:
        from vla.policy.env_policy import EnvPolicy

        self.policy = policy
        self.options = options or ServeOptions()
        self.name = name
        self.robots: dict[str, EnvPolicy] = {}  # per embodiment: the checkpoint's normalizer (EnvPolicy's code)
        for emb in policy.registry:
            try:
                self.robots[emb.name] = EnvPolicy(policy, emb.name)
            except KeyError as error:
                log.warning("not serving embodiment %s: %s", emb.name, error)
        if not self.robots:
            raise ValueError(f"{name or 'policy'}: no embodiment has normalizer stats in the checkpoint; nothing to serve")
        tile = policy.backbone.config.vision.image_size
        self.metadata = {
            "server": "dsvla",
            "checkpoint": name,
            "embodiments": {n: {"cameras": list(r.embodiment.cameras), "action_dim": r.embodiment.action_dim,
                                "state_dim": r.embodiment.state_dim, "chunk_len": r.embodiment.chunk_len,
                                "fps": r.embodiment.fps} for n, r in self.robots.items()},
            "image_size": int(self.options.image_size or tile),
            "any_image_size": self.options.image_size is None,
            "policy_config": dataclasses.asdict(policy.config),
            "max_frame_bytes": self.options.max_frame_bytes,
            "modes": list(MODES),
        }
        self.port: int | None = None
        self.errors = 0
        self.batches = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None

    # ----------------------------------------------------------------------------------------------- lifecycle
    async def serve(self, on_ready: Callable[[int], None] | None = None) -> None:
        from websockets.asyncio.server import serve

        self._loop = asyncio.get_running_loop()
        self._stop, self._arrived = asyncio.Event(), asyncio.Event()
        self._pending: deque[_Item] = deque()
        self._unresolved: set[_Item] = set()
        self._active: dict[int, float] = {}  # open connection -> time of its last forward request (or connect)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vla-serve-infer")
        batcher = asyncio.create_task(self._batcher())
        hard_limit = self.options.max_frame_bytes * HARD_LIMIT_FACTOR
        try:
            async with serve(self._handler, self.options.host, self.options.port, compression=None,
                             max_size=hard_limit, process_request=self._process_request) as server:
                self.port = server.sockets[0].getsockname()[1]
                if on_ready is not None:
                    on_ready(self.port)
                await self._stop.wait()
                batcher.cancel()
                for item in list(self._unresolved):  # handlers waiting on a forward pass end now
                    if not item.future.done():
                        item.future.set_exception(RequestError("the server is shutting down"))
        finally:
            batcher.cancel()
            self._executor.shutdown(wait=True)

    def stop(self) -> None:
        """Stop serving (thread-safe)."""
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)

    def _process_request(self, connection, request):
        if request.path.split("?")[0] == "/healthz":
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        if self.options.api_key:
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Api-Key {self.options.api_key}".encode()):
                self.errors += 1
                log.warning("refused %s: missing or wrong API key", _peer(connection))
                return connection.respond(http.HTTPStatus.UNAUTHORIZED,
                                          "missing or wrong API key (send the header 'Authorization: Api-Key <key>')\n")
        return None

    # ----------------------------------------------------------------------------------------------- connections
    async def _handler(self, ws) -> None:
        from websockets.exceptions import ConnectionClosed

        peer, session = _peer(ws), Session(self.policy.config)
        key = id(session)
        self._active[key] = self._loop.time()
        log.info("connection from %s opened", peer)
        try:
            await ws.send(packb(self.metadata))
            while True:
                try:
                    message = await ws.recv()
                except ConnectionClosed as closed:
                    if closed.sent is not None and closed.sent.code == 1009:
                        self.errors += 1
                        log.warning("closed %s: frame over the hard limit of %d bytes (%d x max_frame_bytes)", peer,
                                    self.options.max_frame_bytes * HARD_LIMIT_FACTOR, HARD_LIMIT_FACTOR)
                    break
                session.requests += 1
                try:
                    reply: bytes | str = await self._answer(message, session, key)
                except RequestError as error:
                    session.errors += 1
                    self.errors += 1
                    log.warning("bad request from %s: %s", peer, error)
                    reply = f"error: {error}"
                except Exception as error:  # noqa: BLE001 - a server bug must not end the connection either
                    session.errors += 1
                    self.errors += 1
                    log.error("request from %s failed: %s: %s", peer, type(error).__name__, error)
                    reply = f"error: internal server error ({type(error).__name__}: {error})"
                try:
                    await ws.send(reply)
                except ConnectionClosed:
                    break
        except ConnectionClosed:
            pass
        finally:
            self._active.pop(key, None)
            self._arrived.set()  # the batcher may be waiting for this connection
            log.info("connection from %s closed after %d requests (%d errors)", peer, session.requests, session.errors)

    async def _answer(self, message: bytes | str, session: Session, key: int) -> bytes:
        start = time.perf_counter()
        if isinstance(message, str):
            raise RequestError("expected a binary msgpack frame, got a text frame")
        if len(message) > self.options.max_frame_bytes:
            raise RequestError(f"frame of {len(message)} bytes exceeds max_frame_bytes={self.options.max_frame_bytes}")
        try:
            observation = unpackb(message)
        except WireError as error:
            raise RequestError(str(error)) from None
        request = self.parse(observation)
        session.begin(request)
        robot = self.robots[request.embodiment]
        chunk, infer_ms, batch_size = None, 0.0, 0
        if session.needs_chunk(request.mode):
            self._active[key] = self._loop.time()
            chunk, infer_ms, batch_size = await self._submit(request)
        actions = chunk if request.mode == "chunk" else session.step(chunk, robot.embodiment.chunk_len)[None]
        raw = robot.normalizer.unnormalize(ACTION, actions.double()).numpy().astype(np.float32)
        timing = {"infer_ms": infer_ms, "server_ms": (time.perf_counter() - start) * 1e3, "batch_size": batch_size}
        return packb({"actions": raw, "server_timing": timing})

    def parse(self, observation: Any) -> Request:
        """Validate one decoded request; RequestError names the first problem."""
        if not isinstance(observation, dict):
            raise RequestError(f"a request must be a map, got {type(observation).__name__}")
        name = observation.get("embodiment")
        if name is None:
            if len(self.robots) != 1:
                raise RequestError(f"missing key 'embodiment' (this server serves {sorted(self.robots)})")
            name = next(iter(self.robots))
        if not isinstance(name, str) or name not in self.robots:
            raise RequestError(f"unknown embodiment {name!r}; this server serves {sorted(self.robots)}")
        emb = self.robots[name].embodiment
        frames: dict[str, np.ndarray] = {}
        for camera in emb.cameras:
            if camera not in observation:
                raise RequestError(f"missing key {camera!r} (embodiment {name!r} needs cameras {list(emb.cameras)})")
            frame = observation[camera]
            if not isinstance(frame, np.ndarray):
                raise RequestError(f"{camera!r} must be a (H, W, 3) uint8 array, got {type(frame).__name__}")
            if frame.dtype != np.uint8:
                raise RequestError(f"{camera!r} must have dtype uint8, got {frame.dtype}")
            if frame.ndim != 3 or frame.shape[2] != 3 or min(frame.shape[:2]) < 1:
                raise RequestError(f"{camera!r} must have shape (H, W, 3), got {tuple(frame.shape)}")
            size = self.options.image_size
            if size and frame.shape[:2] != (size, size):
                raise RequestError(f"{camera!r} must be ({size}, {size}, 3) (the server's image_size), got {tuple(frame.shape)}")
            frames[camera] = frame
        if len({f.shape for f in frames.values()}) > 1:
            raise RequestError(f"all cameras must share one frame size, got { {k: tuple(f.shape) for k, f in frames.items()} }")
        if STATE not in observation:
            raise RequestError(f"missing key {STATE!r} ({emb.state_dim} values in the robot's raw units)")
        state = observation[STATE]
        if isinstance(state, (list, tuple)):
            try:
                state = np.asarray(state, dtype=np.float32)
            except (TypeError, ValueError):
                raise RequestError(f"{STATE!r} must be a list of numbers or a float array") from None
        if not isinstance(state, np.ndarray) or state.dtype.kind not in "iuf":
            raise RequestError(f"{STATE!r} must be a float32 array, got {getattr(state, 'dtype', type(state).__name__)}")
        if state.shape != (emb.state_dim,):
            raise RequestError(f"{STATE!r} must have shape ({emb.state_dim},) for embodiment {name!r}, got {tuple(state.shape)}")
        state = state.astype(np.float32)
        if not np.isfinite(state).all():
            raise RequestError(f"{STATE!r} has NaN or infinite values: {state.tolist()}")
        prompt = observation.get("prompt")
        if prompt is None:
            raise RequestError("missing key 'prompt' (the instruction; may be empty)")
        if not isinstance(prompt, str):
            raise RequestError(f"'prompt' must be a string, got {type(prompt).__name__}")
        if len(prompt) > self.options.max_prompt_chars:
            raise RequestError(f"'prompt' has {len(prompt)} characters; the limit is {self.options.max_prompt_chars}")
        mode = observation.get("mode", "chunk")
        if mode not in MODES:
            raise RequestError(f"'mode' must be one of {list(MODES)}, got {mode!r}")
        return Request(name, frames, state, prompt, mode, bool(observation.get("reset", False)))

    # ----------------------------------------------------------------------------------------------- batching
    async def _submit(self, request: Request):
        item = _Item(request, self._loop.create_future())
        self._pending.append(item)
        self._unresolved.add(item)
        self._arrived.set()
        try:
            return await item.future
        finally:
            self._unresolved.discard(item)

    def _batch_target(self) -> int:
        now = self._loop.time()
        active = sum(1 for t in self._active.values() if now - t <= ACTIVE_S)
        return max(1, min(self.options.max_batch, active))

    async def _batcher(self) -> None:
        window = self.options.batch_window_ms / 1e3
        while True:
            while not self._pending:
                self._arrived.clear()
                await self._arrived.wait()
            deadline = self._loop.time() + window
            while len(self._pending) < self._batch_target():
                remaining = deadline - self._loop.time()
                if remaining <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except TimeoutError:
                    break
            first = self._pending[0].request.frame_shape
            batch: list[_Item] = []
            rest: deque[_Item] = deque()
            for item in self._pending:
                (batch if len(batch) < self.options.max_batch and item.request.frame_shape == first else rest).append(item)
            self._pending = rest
            try:
                await self._run(batch)
            except Exception as error:  # noqa: BLE001 - the batcher must outlive any bug: fail this batch only
                log.error("batch of %d failed: %s: %s", len(batch), type(error).__name__, error)
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(RequestError(f"internal server error ({type(error).__name__})"))

    async def _run(self, items: list[_Item]) -> None:
        try:
            chunks, infer_ms = await self._loop.run_in_executor(self._executor, self._infer, [i.request for i in items])
        except Exception as error:  # noqa: BLE001
            if len(items) > 1:  # find the request that broke the batch; the others still get their actions
                for item in items:
                    await self._run([item])
                return
            if not items[0].future.done():
                items[0].future.set_exception(RequestError(f"inference failed ({type(error).__name__}: {error})"))
            return
        self.batches += 1
        for item, chunk in zip(items, chunks):
            if not item.future.done():
                item.future.set_result((chunk, infer_ms, len(items)))

    def _infer(self, requests: list[Request]):
        """One forward pass (worker thread): normalized (H, A) chunks per request, and the milliseconds it took."""
        start = time.perf_counter()
        cache = getattr(self.policy, "_text_cache", None)
        if cache is not None and len(cache) > TEXT_CACHE_LIMIT:  # the policy caches every prompt it tokenized;
            cache.clear()  # clients sending ever new prompts must not grow a long-running server without bound
        rank = {name: i for i, name in enumerate(self.robots)}
        order = sorted(range(len(requests)), key=lambda i: rank[requests[i].embodiment])  # each robot's requests together
        chunk = self.policy.predict_action_chunk(self.policy_batch([requests[i] for i in order])).cpu()
        ms = (time.perf_counter() - start) * 1e3
        chunks: list[Any] = [None] * len(requests)
        for row, i in enumerate(order):
            emb = self.robots[requests[i].embodiment].embodiment
            chunks[i] = chunk[row, : emb.chunk_len, : emb.action_dim]
        return chunks, ms

    def policy_batch(self, requests: list[Request]) -> dict[str, Any]:
        """The policy's batch for several requests: each run of one robot's requests goes through that robot's
        EnvPolicy.observation_batch (frames to [0, 1], state normalized with the checkpoint's stats) as one stacked
        batch, as `vla eval policy=checkpoint:DIR` does; for mixed robots the runs are concatenated, cameras a robot
        lacks are zeros and states are zero-padded to the widest robot, as the policy expects."""
        import itertools

        import torch
        import torch.nn.functional as F

        parts = []
        for name, run in itertools.groupby(requests, key=lambda r: r.embodiment):
            run = list(run)
            names = {key: key.removeprefix(IMAGES) for key in run[0].frames}
            part = self.robots[name].observation_batch({
                "pixels": {camera: np.stack([r.frames[key] for r in run]) for key, camera in names.items()},
                "agent_pos": np.stack([r.state for r in run]), "task": [r.prompt for r in run]})
            for key, camera in names.items():
                part[key] = part.pop(f"{IMAGES}{camera}")
            part["embodiment"] = [name] * len(run)
            parts.append(part)
        if len(parts) == 1:
            return parts[0]
        batch: dict[str, Any] = {"embodiment": [n for p in parts for n in p["embodiment"]],
                                 "task": [t for p in parts for t in p["task"]]}
        for key in dict.fromkeys(k for r in requests for k in r.frames):
            like = next(p[key] for p in parts if key in p)
            batch[key] = torch.cat([p[key] if key in p else like.new_zeros((len(p["task"]), *like.shape[1:]))
                                    for p in parts])
        width = max(p[STATE].shape[-1] for p in parts)
        batch[STATE] = torch.cat([F.pad(p[STATE], (0, width - p[STATE].shape[-1])) for p in parts])
        return batch


def _peer(connection) -> str:
    address = getattr(connection, "remote_address", None)
    return f"{address[0]}:{address[1]}" if address else "?"


class ServerThread:
    """A PolicyServer on its own event loop in a daemon thread: `with ServerThread(server) as t: t.url`."""

    def __init__(self, server: PolicyServer, timeout_s: float = 30.0) -> None:
        self.server, self.timeout_s = server, timeout_s
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="vla-serve", daemon=True)

    def _main(self) -> None:
        try:
            asyncio.run(self.server.serve(on_ready=lambda port: self._ready.set()))
        except BaseException as error:  # noqa: BLE001 - reported by start()
            self._error = error
            self._ready.set()

    def start(self) -> "ServerThread":
        self._thread.start()
        if not self._ready.wait(self.timeout_s) or self._error is not None:
            raise RuntimeError(f"the policy server did not start: {self._error!r}")
        return self

    def stop(self) -> None:
        self.server.stop()
        self._thread.join(self.timeout_s)

    @property
    def url(self) -> str:
        return f"ws://{self.server.options.host}:{self.server.port}"

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------------------------------------
# clients
# ---------------------------------------------------------------------------------------------------------------------
class RemoteError(RuntimeError):
    """The server answered a request with an error."""


class RemoteClient:
    """A blocking client of one connection: `metadata`, `infer(observation) -> {"actions", "server_timing"}`, or
    `send` / `receive` to keep requests on several connections in flight at once."""

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 60.0) -> None:
        from websockets.sync.client import connect

        headers = {"Authorization": f"Api-Key {api_key}"} if api_key else None
        self.timeout_s = timeout_s
        try:
            self.ws = connect(url, compression=None, max_size=None, additional_headers=headers, open_timeout=timeout_s,
                              proxy=None)
        except OSError as error:  # refused, unreachable, timed out (a server that answers but refuses: InvalidStatus)
            raise RemoteError(f"{url}: cannot connect ({error}); is `vla serve` running there?") from error
        self.metadata = unpackb(self.ws.recv(timeout=timeout_s))

    def send(self, observation: dict[str, Any]) -> None:
        self.ws.send(packb(observation))

    def receive(self) -> dict[str, Any]:
        reply = self.ws.recv(timeout=self.timeout_s)
        if isinstance(reply, str):
            raise RemoteError(reply.removeprefix("error: "))
        return unpackb(reply)

    def infer(self, observation: dict[str, Any]) -> dict[str, Any]:
        self.send(observation)
        return self.receive()

    def close(self) -> None:
        self.ws.close()


class RemotePolicy:
    """envs.rollout's policy protocol through a server: one connection per env of the vector env, `mode="step"`
    requests sent on all of them before any reply is read, so the server batches the envs into one forward pass."""

    def __init__(self, url: str, embodiment: str, num_envs: int, api_key: str | None = None, timeout_s: float = 60.0):
        self.embodiment = embodiment
        self.clients: list[RemoteClient] = []
        try:
            for _ in range(num_envs):
                self.clients.append(RemoteClient(url, api_key, timeout_s))
        except BaseException:
            self.close()
            raise
        served = self.clients[0].metadata.get("embodiments", {})
        if embodiment not in served:
            self.close()
            raise ValueError(f"server {url} does not serve embodiment {embodiment!r} (it serves {sorted(served)})")
        self.info = served[embodiment]
        self._reset = [True] * num_envs

    def reset(self) -> None:
        self._reset = [True] * len(self.clients)

    def select_action(self, observation: dict[str, Any]) -> np.ndarray:
        pixels = observation["pixels"]
        frames = ({f"{IMAGES}{camera}": np.asarray(v) for camera, v in pixels.items()} if isinstance(pixels, dict)
                  else {"observation.image": np.asarray(pixels)})
        states = np.asarray(observation["agent_pos"], dtype=np.float32)
        tasks = list(observation["task"])
        if len(tasks) > len(self.clients):
            raise ValueError(f"{len(tasks)} envs but {len(self.clients)} connections")
        for i, client in enumerate(self.clients[: len(tasks)]):
            request = {key: np.ascontiguousarray(v[i]) for key, v in frames.items()}
            request |= {STATE: states[i], "prompt": str(tasks[i]), "embodiment": self.embodiment, "mode": "step",
                        "reset": self._reset[i]}
            client.send(request)
            self._reset[i] = False
        return np.stack([client.receive()["actions"][0] for client in self.clients[: len(tasks)]])

    def close(self) -> None:
        for client in self.clients:
            try:
                client.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                pass
        self.clients = []

    def __del__(self) -> None:
        self.close()


def _remote_factory(argument: str, context) -> RemotePolicy:
    if not argument.startswith(("ws://", "wss://")):
        raise ValueError(f"policy=remote:URL needs a websocket URL like ws://127.0.0.1:8000, got {argument!r}")
    if context.embodiment is None:
        raise ValueError(f"env {context.env_id} has no known embodiment; the server cannot pick its action space")
    api_key = context.options.get("api_key") or os.environ.get("VLA_API_KEY")
    policy = RemotePolicy(argument, context.embodiment.name, context.num_envs, api_key,
                          float(context.options.get("timeout_s", 60.0)))
    if (policy.info["action_dim"],) != tuple(context.action_space.shape):
        policy.close()
        raise ValueError(f"{context.env_id}: the server's {context.embodiment.name} actions have size "
                         f"{policy.info['action_dim']}, the env expects {context.action_space.shape}")
    return policy



# ---------------------------------------------------------------------------------------------------------------------
# vla serve
# ---------------------------------------------------------------------------------------------------------------------
def checkpoint_dir(spec: str) -> str:
    """`checkpoint:DIR` (or a bare DIR) -> DIR."""
    prefix, sep, rest = str(spec).partition(":")
    if sep and prefix == "checkpoint":
        spec = rest
    elif sep and prefix in ("remote", "random", "expert", "prior"):
        raise ValueError(f"vla serve needs policy=checkpoint:DIR, got {spec!r}")
    if not spec or spec == "???":
        raise ValueError("vla serve needs policy=checkpoint:DIR")
    return spec


def main(cfg) -> int:
    import signal

    import torch
    from omegaconf import OmegaConf

    from vla.policy import VLAPolicy

    config = OmegaConf.to_container(cfg, resolve=True)
    path = checkpoint_dir(config["policy"])
    if int(config["threads"]) > 0:
        torch.set_num_threads(int(config["threads"]))
    device = config["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    options = ServeOptions(host=str(config["host"]), port=int(config["port"]), api_key=config["api_key"] or None,
                           batch_window_ms=float(config["batch_window_ms"]), max_batch=int(config["max_batch"]),
                           max_frame_bytes=int(float(config["max_frame_mb"]) * 2**20),
                           image_size=int(config["image_size"]) if config["image_size"] else None,
                           max_prompt_chars=int(config["max_prompt_chars"]))
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s vla serve %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    policy = VLAPolicy.load(path, device=device, merge_adapters=True)  # a LoRA checkpoint folded into its base
    if config["compile"] and policy.generates:
        sizes = tuple(sorted({1, min(2, options.max_batch), options.max_batch}))
        print(f"vla serve: compiling the decode passes for batches of {', '.join(map(str, sizes))} ...", flush=True)
        print(f"vla serve: compiled in {policy.compile_decoding(warm_batch_sizes=sizes):.0f} s", flush=True)
    elif config["compile"]:
        print("vla serve: compile=true: nothing to compile (this policy decodes a chunk in one pass)", flush=True)
    server = PolicyServer(policy, options, name=path)

    def ready(port: int) -> None:
        robots = ", ".join(f"{n} ({', '.join(e['cameras'])})" for n, e in server.metadata["embodiments"].items())
        where = f"{device}, {torch.get_num_threads()} threads" if device == "cpu" else device
        print(f"vla serve: {path} on ws://{options.host}:{port} ({where}; {robots}); GET /healthz; "
              f"batching {options.max_batch} requests / {options.batch_window_ms:g} ms"
              f"{'; API key required' if options.api_key else ''}", flush=True)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, server.stop)
        await server.serve(on_ready=ready)

    try:
        asyncio.run(run())
    except OSError as error:  # address in use, no permission: one line, not a traceback
        raise RuntimeError(f"cannot serve on {options.host}:{options.port}: {error}") from error
    print(f"vla serve: stopped ({server.batches} forward passes, {server.errors} errors)", flush=True)
    return 0
