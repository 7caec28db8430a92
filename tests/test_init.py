"""The package's import surface: the core needs only jax, optax, chex and numpy."""
import subprocess
import sys
import textwrap

import jaxopt_llm

# Importing any of these from the core would make `pip install jaxopt_llm` (no extras) fail.
TRAIN_ONLY = ("flax", "orbax", "tqdm", "matplotlib", "torch")
CORE = ("jaxopt_llm", "jaxopt_llm.losses", "jaxopt_llm.optim", "jaxopt_llm.optim.hessian",
        "jaxopt_llm.schedules", "jaxopt_llm.parallel", "jaxopt_llm.from_torch")


def test_core_imports_without_train_extras():
  # A fresh interpreter in which the train-only packages cannot be imported at all: an
  # import of one of them anywhere in the core raises ModuleNotFoundError and fails here.
  code = textwrap.dedent(f"""
      import importlib, sys
      class Block:
        def find_spec(self, name, path=None, target=None):
          if name.split(".")[0] in {TRAIN_ONLY!r}:
            raise ModuleNotFoundError(f"blocked: {{name}}")
          return None
      sys.meta_path.insert(0, Block())
      for mod in {CORE!r}:
        importlib.import_module(mod)
      loaded = sorted(m for m in sys.modules if m.split(".")[0] in {TRAIN_ONLY!r})
      assert not loaded, loaded
      print("ok")
  """)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == "ok"


def test_version_and_subpackages():
  assert isinstance(jaxopt_llm.__version__, str)
  for name in ("losses", "optim", "schedules"):
    assert hasattr(jaxopt_llm, name)


def test_no_module_imports_another_modules_private_names():
  # Shared helpers live under public names (a leading-underscore *module* such as
  # `_validation.py` is fine); `from jaxopt_llm.x import _helper` is not.
  import ast
  import importlib.util
  import pathlib
  root = pathlib.Path(jaxopt_llm.__file__).parent
  bad = []
  for path in sorted(root.rglob("*.py")):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jaxopt_llm"):
        for alias in node.names:
          name = alias.name
          if name.startswith("_") and not name.startswith("__") and importlib.util.find_spec(
              f"{node.module}.{name}") is None:
            bad.append(f"{path.relative_to(root)}:{node.lineno}: {node.module}.{name}")
      elif (isinstance(node, ast.Attribute) and node.attr.startswith("_")
            and not node.attr.startswith("__") and isinstance(node.value, ast.Name)
            and node.value.id in {"losses", "optim", "schedules", "parallel", "train",
                                  "transforms", "aliases", "fused", "hessian", "numerics",
                                  "cross_entropy", "step", "loop", "config", "model"}):
        bad.append(f"{path.relative_to(root)}:{node.lineno}: {node.value.id}.{node.attr}")
  assert not bad, "\n".join(bad)
