"""``parallel.mesh``: the ``("data", "model")`` mesh and its argument checks."""
import jax
import pytest

from jaxopt_llm import parallel

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs the 8 virtual CPU devices set up in conftest.py")


def test_make_mesh_shapes():
  mesh = parallel.make_mesh()
  assert mesh.axis_names == ("data", "model") and dict(mesh.shape) == {"data": 8, "model": 1}
  mesh = parallel.make_mesh(data=4, model=2)
  assert dict(mesh.shape) == {"data": 4, "model": 2}
  mesh = parallel.make_mesh(4)
  assert dict(mesh.shape) == {"data": 4, "model": 1} and mesh.devices.size == 4
  mesh = parallel.make_mesh(jax.devices()[2:4])
  assert set(mesh.devices.flat) == set(jax.devices()[2:4])


@pytest.mark.parametrize("kwargs,match", [
    (dict(devices=9), "devices"),
    (dict(devices=0), "devices"),
    (dict(data=16), "16 devices requested"),
    (dict(data=4, model=4), "requested"),
    (dict(devices=8, data=3), "must equal the number of devices"),
    (dict(model=3), "model"),
    (dict(model=0), "model"),
    (dict(devices=[jax.devices()[0]] * 2), "twice"),
])
def test_make_mesh_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    parallel.make_mesh(**kwargs)
