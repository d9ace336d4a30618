"""Control-plane wire format: message schemas, framing, size cap and HMAC authentication.

A message travels as one msgpack map (frame 1), optionally followed by a 32-byte HMAC-SHA256 of
that frame (frame 2) when a shared secret is configured. Every map carries `v` (protocol version)
and `kind`; the receiver checks, in this order and without trusting anything earlier, the frame
size, the MAC, the msgpack structure, the version, the pydantic schema, then freshness and replay.
A failed check raises `Rejected` with a short reason category that receivers count.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
import time
from collections import OrderedDict
from typing import Annotated, Any, Literal

import msgpack
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from dinodist.core.errors import DinodistError

PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 64 * 1024
MAC_BYTES = 32
MAX_LOSS_TERMS = 64
MAX_RECENT_STEPS = 256
MAX_TEXT = 4096
COMMANDS = ("checkpoint", "stop", "preempt")

# Structural limits handed to msgpack so a hostile frame cannot make the unpacker allocate more
# than the frame itself suggests; they sit well above what any valid message uses.
_UNPACK_LIMITS = dict(
    max_str_len=MAX_FRAME_BYTES,
    max_bin_len=0,
    max_array_len=MAX_RECENT_STEPS,
    max_map_len=MAX_LOSS_TERMS + 32,
    max_ext_len=0,
)

GroupName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.+-]{1,64}$")]
Session = Annotated[str, Field(pattern=r"^[0-9a-f]{8,64}$")]
Nonce = Annotated[str, Field(pattern=r"^[0-9a-f]{8,64}$")]
NonNegFloat = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
NonNegInt = Annotated[int, Field(ge=0)]
Command = Literal["checkpoint", "stop", "preempt"]


class _Message(BaseModel):
    # strict: a rank sending "3" for an int is a bug to surface, not a value to coerce.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    v: Literal[1]
    ts: float = Field(allow_inf_nan=False)
    nonce: Nonce

    @field_validator("v", mode="before")
    @classmethod
    def _exact_int_version(cls, value: Any) -> Any:
        # Literal[1] would also accept True (True == 1); a version is an int, nothing else.
        if type(value) is not int:
            raise ValueError("v must be an int")
        return value


class _FromRank(_Message):
    rank: NonNegInt
    group: GroupName
    # One random id per client instance: a restarted rank gets a new one, so stale messages from
    # its previous incarnation cannot update the new one's state or counters.
    session: Session
    seq: NonNegInt


class _Totals(BaseModel):
    """Cumulative totals of one rank since it started; repeats and reordering are harmless."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    iteration: Annotated[int, Field(ge=-1)]
    # Durations of the most recent iterations, the last one being `iteration`.
    step_seconds: Annotated[list[NonNegFloat], Field(max_length=MAX_RECENT_STEPS)]
    step_seconds_total: NonNegFloat
    wait_seconds_total: NonNegFloat
    images_total: NonNegInt
    teacher_forwards_total: NonNegInt
    target_bytes_sent_total: NonNegInt
    losses: Annotated[dict[Annotated[str, Field(max_length=64)], float], Field(max_length=MAX_LOSS_TERMS)]
    gpu_utilization_ratio: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    gpu_memory_used_bytes: NonNegInt | None = None


class Register(_FromRank):
    kind: Literal["register"]
    role: Literal["teacher", "student"]
    pid: NonNegInt
    hostname: Annotated[str, Field(max_length=255)]
    world_size: Annotated[int, Field(ge=1)] | None = None
    group_rank: NonNegInt | None = None
    group_size: Annotated[int, Field(ge=1)] | None = None


class Heartbeat(_FromRank, _Totals):
    kind: Literal["heartbeat"]


class Done(_FromRank, _Totals):
    kind: Literal["done"]


class Error(_FromRank):
    kind: Literal["error"]
    message: Annotated[str, Field(max_length=MAX_TEXT)]


class CommandMsg(_Message):
    """Server to rank: an instruction the rank acknowledges with an `ack`."""

    kind: Literal["command"]
    command: Command
    command_id: NonNegInt


class Ack(_Message):
    """Both directions: a rank acks a command; the server acks register, done and error."""

    kind: Literal["ack"]
    rank: NonNegInt
    group: GroupName
    session: Session
    acked: Literal["command", "register", "done", "error"]
    ref: NonNegInt  # command_id for commands, the acked message's seq otherwise


Message = Annotated[
    Register | Heartbeat | Done | Error | CommandMsg | Ack, Field(discriminator="kind")
]
_ADAPTER: TypeAdapter[Any] = TypeAdapter(Message)


class Rejected(Exception):
    """A frame that failed a check; `reason` is a short category for counters."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class ReplayGuard:
    """Remembers recent nonces so an authenticated frame captured on the wire cannot be re-sent."""

    def __init__(self, max_skew_s: float = 60.0, capacity: int = 200_000) -> None:
        self.max_skew_s = max_skew_s
        self.capacity = capacity
        self._seen: OrderedDict[str, float] = OrderedDict()

    def check(self, nonce: str, ts: float, now: float | None = None) -> None:
        now = time.time() if now is None else now
        if abs(now - ts) > self.max_skew_s:
            raise Rejected("stale", f"timestamp {now - ts:+.1f} s off, limit {self.max_skew_s:g} s")
        # Entries older than the skew window can go: their timestamps would be rejected anyway.
        while self._seen and (next(iter(self._seen.values())) < now - 2 * self.max_skew_s
                              or len(self._seen) >= self.capacity):
            self._seen.popitem(last=False)
        if nonce in self._seen:
            raise Rejected("replay", f"nonce {nonce} already seen")
        self._seen[nonce] = now


def new_nonce() -> str:
    return secrets.token_hex(12)


def new_session() -> str:
    return secrets.token_hex(8)


def stamp() -> dict[str, Any]:
    """The envelope fields every message carries."""
    return {"v": PROTOCOL_VERSION, "ts": time.time(), "nonce": new_nonce()}


def mac(secret: bytes, payload: bytes) -> bytes:
    return hmac.new(secret, payload, hashlib.sha256).digest()


def encode(msg: BaseModel, secret: bytes | None = None) -> list[bytes]:
    """Frames for one message: payload, plus its MAC when a secret is set."""
    payload = msgpack.packb(msg.model_dump(mode="python"), use_bin_type=True)
    if len(payload) > MAX_FRAME_BYTES:
        raise DinodistError(f"control message {msg.__class__.__name__}: {len(payload)} bytes exceeds "
                            f"the {MAX_FRAME_BYTES}-byte cap")
    return [payload, mac(secret, payload)] if secret else [payload]


def decode(frames: list[bytes], secret: bytes | None = None, replay: ReplayGuard | None = None) -> Any:
    """Validate received frames into a message model, or raise `Rejected`."""
    if not frames or len(frames) > 2:
        raise Rejected("malformed", f"{len(frames)} frames, expected 1 or 2")
    payload = frames[0]
    if len(payload) > MAX_FRAME_BYTES:
        # Checked before anything else touches the bytes: oversize frames are never unpacked.
        raise Rejected("oversize", f"{len(payload)} bytes > {MAX_FRAME_BYTES}")
    if secret:
        if len(frames) != 2:
            raise Rejected("mac", "missing MAC")
        if not hmac.compare_digest(frames[1], mac(secret, payload)):
            raise Rejected("mac", "bad MAC")
    elif len(frames) != 1:
        raise Rejected("malformed", "unexpected MAC frame on an unauthenticated channel")
    try:
        data = msgpack.unpackb(payload, raw=False, strict_map_key=True, **_UNPACK_LIMITS)
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise Rejected("malformed", f"msgpack: {type(exc).__name__}: {exc}") from None
    if not isinstance(data, dict):
        raise Rejected("malformed", f"payload is a {type(data).__name__}, not a map")
    version = data.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise Rejected("version", f"unsupported protocol version {version!r}, expected {PROTOCOL_VERSION}")
    try:
        msg = _ADAPTER.validate_python(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise Rejected("invalid", f"{data.get('kind')!r} {where}: {first['msg']}") from None
    if replay is not None:
        replay.check(msg.nonce, msg.ts)
    return msg


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the socket on this machine (names other than localhost do not)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def secret_from_env(var: str, field: str = "control.secret_env") -> bytes:
    """The shared secret held in environment variable `var`; it never appears in configs."""
    value = os.environ.get(var, "")
    if not value:
        raise DinodistError(f"{field}: environment variable {var} is unset or empty")
    if len(value) < 16:
        raise DinodistError(f"{field}: secret in {var} is shorter than 16 characters")
    return value.encode()

