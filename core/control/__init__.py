"""Rank side of the control plane: wire format (`messages`) and the per-rank client (`client`)."""

from dinodist.core.control.client import ControlClient
from dinodist.core.control.messages import MAX_FRAME_BYTES, PROTOCOL_VERSION

__all__ = ["ControlClient", "MAX_FRAME_BYTES", "PROTOCOL_VERSION"]
