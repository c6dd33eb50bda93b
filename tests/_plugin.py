"""A stand-in third-party backend, loaded through the `bpcore.backends` entry point."""

from bpcore import backends
from bpcore.backends import Backend


def make() -> Backend:
    be = backends.get("numpy")
    return Backend(name="plugged", xp=be.xp, device="cpu", is_native=be.is_native,
                   from_host=be.from_host, native_to_device=be.native_to_device,
                   to_numpy=be.to_numpy)
