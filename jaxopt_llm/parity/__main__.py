"""``python -m jaxopt_llm.parity``: every optimizer vs PyTorch, 200 steps, as a table."""
import argparse
import sys


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m jaxopt_llm.parity", description=__doc__)
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--tol", type=float, default=1e-5)
  args = parser.parse_args(argv)
  if args.steps < 1:
    parser.error("--steps must be >= 1")
  try:
    import torch  # noqa: F401
  except ImportError:
    parser.exit(2, "parity needs PyTorch: pip install 'jaxopt_llm[torch]'\n")
  from jaxopt_llm.parity import optimizers as po
  worst = 0.0
  print(f"{'optimizer':34s} {'rel. error':>11s}  (after {args.steps} steps, fp32)")
  for name, case in po.cases().items():
    err = po.run_case(case, steps=args.steps)
    worst = max(worst, err)
    print(f"{name:34s} {err:11.2e}  {'ok' if err <= args.tol else 'FAIL'}")
  print(f"worst {worst:.2e} (tolerance {args.tol:.0e})")
  return 0 if worst <= args.tol else 1


if __name__ == "__main__":
  sys.exit(main())
