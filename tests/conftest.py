"""Test set-up: 8 forced CPU devices before JAX initialises."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
  os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()

import chex  # noqa: E402
import jax  # noqa: E402

chex.set_n_cpu_devices(8)
jax.config.update("jax_threefry_partitionable", True)

assert jax.device_count() == 8, jax.devices()
