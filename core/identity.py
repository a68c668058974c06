"""Who a device is: a Keybase username and device name, as Keybase's metadata says."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DeviceId:
    username: str
    device: str

    def __str__(self) -> str:
        return f"{self.username}/{self.device}"
