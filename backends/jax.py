"""JAX on its default device (GPU/TPU when present, else CPU).

JAX arrays are immutable and dispatch asynchronously: the core's functional path is used
as is, ``jit`` is ``jax.jit``, and ``synchronize`` blocks on queued work.
"""

from __future__ import annotations

from ._base import Backend, unavailable


def make() -> Backend:
    try:
        import jax
        import jax.numpy as jnp
    except ImportError as e:
        raise unavailable("jax", f"JAX is not installed ({e})",
                          'Install it with: pip install "bpcore[jax]"') from None
    import numpy as np

    device = jax.local_devices()[0]  # this process's first (jax.devices()[0] after
    #                                  jax.distributed.initialize() may be another host's)
    dl = (1, 0) if device.platform == "cpu" else (2, int(device.id))

    def from_host(a):
        return jax.device_put(a, device)

    def native_to_device(x):
        devs = x.devices() if hasattr(x, "devices") else {device}
        if devs == {device}:
            return x
        if all(d.platform == "cpu" for d in devs) or device.platform == "cpu":
            return jax.device_put(x, device)
        from bpcore.errors import DeviceMismatchError
        raise DeviceMismatchError(
            f"asarray: the jax array is on {sorted(map(str, devs))}, but the jax backend is "
            f"on {device}; move it with jax.device_put(x, jax.devices()[0]) first."
        )

    def synchronize(*arrays):
        if arrays:
            jax.block_until_ready(arrays)
        else:  # a barrier: effects and every computation dispatched so far
            jax.effects_barrier()
            (jnp.zeros((), device=device) + 0).block_until_ready()

    def to_numpy(x):
        if not x.is_fully_addressable and x.is_fully_replicated:
            x = x.addressable_data(0)  # a replicated array spanning processes: our copy
        return np.asarray(x)

    def place_like(x, like):
        sharding = getattr(like, "sharding", None)
        if sharding is None or len(sharding.device_set) <= 1 or \
                getattr(x, "sharding", None) == sharding:
            return x
        if sharding.is_fully_addressable:
            return jax.device_put(x, sharding)
        host = np.asarray(x)  # across processes: each supplies its devices' pieces
        return jax.make_array_from_callback(host.shape, sharding, lambda i: host[i])

    def x64_error():
        if jax.config.jax_enable_x64:
            return None
        return (
            "dtype='float64' on the jax backend needs 64-bit mode, which is off: JAX would "
            "silently compute in float32. Enable it before creating any array, with "
            "jax.config.update('jax_enable_x64', True) or the environment variable "
            "JAX_ENABLE_X64=1, or use dtype='float32'."
        )

    return Backend(
        name="jax",
        xp=jnp,
        device=device,
        is_native=lambda x: isinstance(x, jax.Array),
        from_host=from_host,
        native_to_device=native_to_device,
        to_numpy=to_numpy,
        place_like=place_like,
        dlpack_device=dl,
        from_dlpack=lambda x: jax.device_put(jnp.from_dlpack(x), device),
        synchronize=synchronize,
        jit=jax.jit,
        compiles=True,
        asynchronous=True,
        float64_error=x64_error,
        enable_float64=lambda: jax.config.update("jax_enable_x64", True),
        version=jax.__version__,
    )
