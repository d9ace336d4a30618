"""Control-plane wire format (protocol 2): framing, per-rank authentication, message schemas.

A message travels as three frames:

1. header: ASCII `dinodist/<version> <rank> <group>`, naming the rank whose key signs the message
   (the sender's for rank -> server, the addressee's for server -> rank);
2. payload: one msgpack map;
3. MAC: HMAC-SHA256, under that rank's key, of the header (length-prefixed) and the payload.

Every rank has its own key, `rank_key(job_secret, rank, group)`. The supervisor holds the job secret
and can derive any rank's key; a rank needs only its own, so a rank (or whoever learned its key)
cannot speak for another one. There is no unauthenticated mode: a loopback job gets a secret the
supervisor generates. The receiver checks, in this order and trusting nothing it has not checked:
frame count and sizes, the header's version, that the claimed rank has a key, the MAC, the
msgpack structure, the payload's version, the schema, that the payload's rank and group are the
header's, then freshness and replay. A failed check raises `Rejected` with a short reason
category that receivers count.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import os
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Annotated, Any, Literal

import msgpack
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from dinodist.core.errors import DinodistError

PROTOCOL_VERSION = 2
MAX_FRAME_BYTES = 64 * 1024
MAX_HEADER_BYTES = 96
MAC_BYTES = 32
KEY_BYTES = 32
MIN_SECRET_BYTES = 16
MAX_LOSS_TERMS = 64
MAX_RECENT_STEPS = 256
MAX_TEXT = 4096
MAX_DEVICE_BYTES = 1 << 50  # 1 PiB: far above any accelerator, low enough to catch garbage
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
_HEADER = re.compile(rb"dinodist/([0-9]{1,4}) ([0-9]{1,9}) ([A-Za-z0-9_.+-]{1,64})")
# First bytes of a msgpack map: what a protocol-1 peer sent as its first (and only) frame.
_MSGPACK_MAP_MARKERS = frozenset([*range(0x80, 0x90), 0xDE, 0xDF])

GroupName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.+-]{1,64}$")]
Session = Annotated[str, Field(pattern=r"^[0-9a-f]{8,64}$")]
Nonce = Annotated[str, Field(pattern=r"^[0-9a-f]{8,64}$")]
NonNegFloat = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
NonNegInt = Annotated[int, Field(ge=0)]
DeviceBytes = Annotated[int, Field(ge=0, le=MAX_DEVICE_BYTES)]
EventCount = Annotated[int, Field(ge=0, lt=1 << 63)]
Command = Literal["checkpoint", "stop", "preempt"]

# (rank, group) -> that rank's key, or None when the receiver does not accept that identity
KeyLookup = Callable[[int, str], "bytes | None"]


class _Message(BaseModel):
    # strict: a rank sending "3" for an int is a bug to surface, not a value to coerce.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    v: Literal[2]
    ts: float = Field(allow_inf_nan=False)
    nonce: Nonce

    @field_validator("v", mode="before")
    @classmethod
    def _exact_int_version(cls, value: Any) -> Any:
        # Literal[2] would also accept 2.0; a version is an int, nothing else.
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


class Telemetry(BaseModel):
    """Optional device gauges of one rank; a field left out was not measured (exported as absent,
    never as zero). NVML's readings of the rank's GPU, and torch's peak allocation."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    gpu_utilization_ratio: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    gpu_memory_used_bytes: DeviceBytes | None = None
    gpu_memory_total_bytes: DeviceBytes | None = None
    gpu_power_watts: Annotated[float, Field(ge=0.0, le=100_000.0, allow_inf_nan=False)] | None = None
    gpu_temperature_celsius: Annotated[float, Field(ge=-100.0, le=300.0, allow_inf_nan=False)] | None = None
    # NVML's clocks-event (throttle) reason bitmask; core/control/telemetry.py names the bits
    gpu_throttle_reasons: Annotated[int, Field(ge=0, lt=1 << 64)] | None = None
    # volatile ECC counts: since the driver loaded
    gpu_ecc_corrected_total: EventCount | None = None
    gpu_ecc_uncorrected_total: EventCount | None = None
    # critical Xid events seen since this rank's sampler started, and the last Xid code
    gpu_xid_errors_total: EventCount | None = None
    gpu_last_xid: Annotated[int, Field(ge=0, lt=1 << 32)] | None = None
    torch_peak_allocated_bytes: DeviceBytes | None = None


TELEMETRY_KEYS = tuple(Telemetry.model_fields)
INTEGER_TELEMETRY = frozenset({
    "gpu_memory_used_bytes", "gpu_memory_total_bytes", "gpu_throttle_reasons", "gpu_ecc_corrected_total",
    "gpu_ecc_uncorrected_total", "gpu_xid_errors_total", "gpu_last_xid", "torch_peak_allocated_bytes",
})


Ratio = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]


class Quality(BaseModel):
    """A student group's latest quality measures (docs/distill.md, "Quality in the loop"): group-level
    values, the same on every rank of the group but k-NN, which group rank 0 alone reports. The
    teacher reports its k-NN once, at its end. A field left out was not measured."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    teacher_agreement_ratio: Ratio | None = None
    teacher_cosine: Annotated[float, Field(ge=-1.0001, le=1.0001, allow_inf_nan=False)] | None = None
    knn_top1_ratio: Ratio | None = None


QUALITY_KEYS = tuple(Quality.model_fields)


class _Totals(Telemetry, Quality):
    """Cumulative totals of one rank since it started; repeats and reordering are harmless."""

    iteration: Annotated[int, Field(ge=-1)]
    # Durations of the most recent iterations, the last one being `iteration`.
    step_seconds: Annotated[list[NonNegFloat], Field(max_length=MAX_RECENT_STEPS)]
    step_seconds_total: NonNegFloat
    wait_seconds_total: NonNegFloat
    images_total: NonNegInt
    teacher_forwards_total: NonNegInt
    target_bytes_sent_total: NonNegInt
    losses: Annotated[dict[Annotated[str, Field(max_length=64)], float], Field(max_length=MAX_LOSS_TERMS)]


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
    """Remembers recent nonces so an authenticated frame captured on the wire cannot be re-sent.

    Memory is bounded by `capacity`. A nonce is forgotten once its message's timestamp would fail the
    skew check anyway; when capacity forces one out earlier, no message stamped at or before it is
    accepted any more (`stale`), so a frame is never accepted twice: under a flood, old-stamped
    messages are refused rather than risked."""

    def __init__(self, max_skew_s: float = 60.0, capacity: int = 200_000) -> None:
        self.max_skew_s = max_skew_s
        self.capacity = capacity
        self._seen: OrderedDict[str, tuple[float, float]] = OrderedDict()  # nonce -> (received, stamped)
        self._floor = -math.inf  # timestamps at or below this may belong to forgotten nonces

    def check(self, nonce: str, ts: float, now: float | None = None) -> None:
        now = time.time() if now is None else now
        if abs(now - ts) > self.max_skew_s:
            raise Rejected("stale", f"timestamp {now - ts:+.1f} s off, limit {self.max_skew_s:g} s")
        while self._seen:
            received, stamped = next(iter(self._seen.values()))
            if received < now - 2 * self.max_skew_s:
                # stamped at most max_skew_s after it arrived: that timestamp fails the skew check now
                self._seen.popitem(last=False)
            elif len(self._seen) >= self.capacity:
                self._seen.popitem(last=False)
                self._floor = max(self._floor, stamped)
            else:
                break
        if ts <= self._floor:
            raise Rejected("stale", f"timestamp not after {self._floor:.3f}, the newest of the nonces "
                                    f"forgotten to stay within {self.capacity} remembered")
        if nonce in self._seen:
            raise Rejected("replay", f"nonce {nonce} already seen")
        self._seen[nonce] = (now, ts)


def new_nonce() -> str:
    return secrets.token_hex(12)


def new_session() -> str:
    return secrets.token_hex(8)


def new_job_secret() -> bytes:
    """A random job secret, for a supervisor that was given none (it never leaves that process)."""
    return secrets.token_bytes(KEY_BYTES)


def check_secret(secret: bytes | str, field: str = "control secret") -> bytes:
    """The job secret as bytes, refusing one too short to resist guessing."""
    raw = secret.encode() if isinstance(secret, str) else bytes(secret)
    if len(raw) < MIN_SECRET_BYTES:
        raise DinodistError(f"{field}: shorter than {MIN_SECRET_BYTES} bytes")
    return raw


def rank_key(secret: bytes, rank: int, group: str) -> bytes:
    """The key rank `rank` of `group` signs with: HMAC-SHA256(job secret, "rank:<r>:group:<g>").

    Group names cannot contain ':', so no two (rank, group) pairs share a label. The prefix keeps
    these keys apart from any other use of the same secret."""
    label = f"dinodist-control-key rank:{int(rank)}:group:{group}".encode()
    return hmac.new(check_secret(secret), label, hashlib.sha256).digest()


def parse_key(text: str, field: str) -> bytes:
    """A rank key written as hex (how the launcher passes it in the environment)."""
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        raise DinodistError(f"{field}: not a hex string") from None
    if len(key) != KEY_BYTES:
        raise DinodistError(f"{field}: {len(key)} bytes, expected {KEY_BYTES} ({2 * KEY_BYTES} hex digits)")
    return key


def stamp() -> dict[str, Any]:
    """The envelope fields every message carries."""
    return {"v": PROTOCOL_VERSION, "ts": time.time(), "nonce": new_nonce()}


def header(rank: int, group: str) -> bytes:
    return f"dinodist/{PROTOCOL_VERSION} {int(rank)} {group}".encode()


def sign(key: bytes, head: bytes, payload: bytes) -> bytes:
    """The MAC frame: the header is length-prefixed so no header/payload split can be shifted."""
    mac = hmac.new(key, len(head).to_bytes(2, "big"), hashlib.sha256)
    mac.update(head)
    mac.update(payload)
    return mac.digest()


def encode(msg: BaseModel, key: bytes, rank: int, group: str) -> list[bytes]:
    """Frames for one message signed with the key of `rank` (of `group`): header, payload, MAC."""
    payload = msgpack.packb(msg.model_dump(mode="python", exclude_none=True), use_bin_type=True)
    if len(payload) > MAX_FRAME_BYTES:
        raise DinodistError(f"control message {msg.__class__.__name__}: {len(payload)} bytes exceeds "
                            f"the {MAX_FRAME_BYTES}-byte cap")
    head = header(rank, group)
    return [head, payload, sign(key, head, payload)]


def _identity(frames: list[bytes]) -> tuple[int, str]:
    if len(frames) != 3:
        if 1 <= len(frames) <= 2 and frames[0][:1] and frames[0][0] in _MSGPACK_MAP_MARKERS:
            raise Rejected("version", "a bare msgpack frame without a header (a protocol-1 peer?); "
                                      f"this end speaks protocol {PROTOCOL_VERSION}")
        raise Rejected("malformed", f"{len(frames)} frames, expected 3 (header, payload, MAC)")
    head, payload = frames[0], frames[1]
    if len(payload) > MAX_FRAME_BYTES:
        # Checked before anything else touches the bytes: oversize frames are never unpacked.
        raise Rejected("oversize", f"{len(payload)} bytes > {MAX_FRAME_BYTES}")
    if len(head) > MAX_HEADER_BYTES or not head.startswith(b"dinodist/"):
        raise Rejected("malformed", f"header {head[:24]!r} is not 'dinodist/<version> <rank> <group>'")
    version = head[len(b"dinodist/"):].split(b" ", 1)[0]
    if version != str(PROTOCOL_VERSION).encode():
        raise Rejected("version", f"unsupported protocol version {version[:8]!r}, "
                                  f"expected {PROTOCOL_VERSION}")
    match = _HEADER.fullmatch(head)
    if match is None:
        raise Rejected("malformed", f"header {head[:24]!r} is not 'dinodist/<version> <rank> <group>'")
    return int(match.group(2)), match.group(3).decode()


def decode(frames: list[bytes], keys: KeyLookup, replay: ReplayGuard | None) -> Any:
    """Validate received frames into a message model, or raise `Rejected`.

    `keys(rank, group)` gives the key of the identity the header claims, None when this receiver
    does not accept it (`unexpected`). `replay`: the receiver's nonce memory (always pass one
    outside tests)."""
    rank, group = _identity(frames)
    key = keys(rank, group)
    if key is None:
        raise Rejected("unexpected", f"rank {rank} (group {group}) is not a rank this end talks to")
    head, payload, tag = frames
    if len(tag) != MAC_BYTES or not hmac.compare_digest(tag, sign(key, head, payload)):
        raise Rejected("mac", f"bad MAC for rank {rank} (group {group})")
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
    claimed = (getattr(msg, "rank", rank), getattr(msg, "group", group))
    if claimed != (rank, group):
        # signed by one rank, speaking for another: the MAC alone does not catch this
        raise Rejected("identity", f"{msg.kind} signed by rank {rank} (group {group}) claims rank "
                                   f"{claimed[0]} (group {claimed[1]})")
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
    """The job secret held in environment variable `var`; it never appears in configs."""
    value = os.environ.get(var, "")
    if not value:
        raise DinodistError(f"{field}: environment variable {var} is unset or empty")
    if len(value) < MIN_SECRET_BYTES:
        raise DinodistError(f"{field}: secret in {var} is shorter than {MIN_SECRET_BYTES} characters")
    return value.encode()
