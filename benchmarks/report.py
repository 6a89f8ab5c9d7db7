"""Print the README's benchmark tables (markdown) from benchmarks/results/*.json.

    python benchmarks/report.py
"""
import json
import os

RES = os.environ.get("WAGRAD_BENCH_OUT") or os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "results")


def load(name):
  with open(os.path.join(RES, name + ".json")) as f:
    return json.load(f)


def overhead_tables(data):
  """benchmarks/overhead.py: wagrad / hand-written, paired medians [q25, q75], per size,
  backend and tau; parameter-sized copies in the compiled step (wagrad / hand)."""
  out = []
  runs = data["runs"]
  algos = list(dict.fromkeys(r["variant"].split()[1] for run in runs for r in run["rows"]
                             if r["variant"].startswith("wagrad ")))
  out.append("| size | backend | tau | " + " | ".join(algos) + " |")
  out.append("| --- | --- | ---: |" + " ---: |" * len(algos))
  for run in runs:
    rows = {r["variant"]: r for r in run["rows"]}
    taus = list(dict.fromkeys(v.split("tau=")[1] for v in rows if "tau=" in v))
    for tau in taus:
      cells = []
      for a in algos:
        r = rows.get(f"wagrad {a} tau={tau}")
        if r is None:
          cells.append("")
          continue
        q = r["x_hand_q25_q50_q75"]
        cells.append(f"{q[1]:.3f} [{q[0]:.2f}, {q[2]:.2f}]")
      out.append(f"| {run['size']} | {run['backend']} | {tau} | " + " | ".join(cells) + " |")
  out.append("")
  out.append("| size | backend | local SGD ms/step | optax.sgd / local | parameter-sized "
             "copies, wagrad / hand (per algorithm, tau = " + ", ".join(taus) + ") |")
  out.append("| --- | --- | ---: | ---: | --- |")
  for run in runs:
    rows = {r["variant"]: r for r in run["rows"]}
    cp = "; ".join(
        f"{a} " + " ".join(f"{rows[f'wagrad {a} tau={t}']['param_copies']}/"
                           f"{rows[f'wagrad {a} tau={t}']['hand_param_copies']}" for t in taus
                           if f"wagrad {a} tau={t}" in rows) for a in algos)
    ox = rows.get("optax local")
    out.append(f"| {run['size']} ({run['params']:,}) | {run['backend']} | "
               f"{rows['local']['median_ms']:.1f} | "
               f"{'' if ox is None else format(ox['x_local'], '.3f')} | {cp} |")
  return "\n".join(out)


def api_floor_tables(data):
  """benchmarks/api_floor.py: the update API's shape against the parameter-returning
  hand-written step, and wagrad against that shape; paired medians [q25, q75]; the
  compiled temp arena and the memory faulted in per step (hand / api / wagrad)."""
  out = ["| size | backend | algo | tau | api / hand | wagrad / api | wagrad / hand | "
         "temp MiB | faulted MiB/step |", "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
  cell = lambda q: f"{q[1]:.3f} [{q[0]:.2f}, {q[2]:.2f}]"  # noqa: E731
  three = lambda d: " / ".join(f"{d[k]:.0f}" for k in ("hand", "api", "wagrad"))  # noqa: E731
  for run in data["runs"]:
    for r in run["rows"]:
      out.append(f"| {run['size']} | {run['backend']} | {r['algo']} | {r['tau']} | "
                 f"{cell(r['api_over_hand'])} | {cell(r['wagrad_over_api'])} | "
                 f"{cell(r['wagrad_over_hand'])} | {three(r['temp_mib'])} | "
                 f"{three(r['page_faults_mib_per_step'])} |")
  out += ["", "Model averaging, wagrad's guard against non-finite workers replaced (diagnostic "
          "builds; temp MiB and faulted MiB/step: wagrad / no guard / test only):", "",
          "| size | backend | tau | wagrad / api | no guard / api | test only / api | temp MiB "
          "| faulted MiB/step |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
  kinds = ("wagrad", "no guard", "test only")
  for run in data["runs"]:
    for r in run["rows"]:
      if "no_guard_over_api" in r:
        out.append(f"| {run['size']} | {run['backend']} | {r['tau']} | "
                   f"{cell(r['wagrad_over_api'])} | {cell(r['no_guard_over_api'])} | "
                   f"{cell(r['test_only_over_api'])} | "
                   + " / ".join(f"{r['temp_mib'][k]:.0f}" for k in kinds) + " | "
                   + " / ".join(f"{r['page_faults_mib_per_step'][k]:.0f}" for k in kinds)
                   + " |")
  return "\n".join(out)


def scaling_text(data):
  v = ", ".join(f"K={r['workers']}: {r['median_ms']:.2f} ms ({r['program_bytes'] / 1e6:.1f} MB)"
                for r in data["vmap"])
  s = ", ".join(f"D={r['devices']}: {r['median_ms']:.2f} ms" for r in data["shard_map"])
  return f"vmap on one device {v}; shard_map with 8 workers over D devices {s}."


def main():
  import glob
  for path in sorted(glob.glob(os.path.join(RES, "overhead_*.json"))):
    name = os.path.basename(path)[:-5]
    print(f"{name}:\n")
    print(overhead_tables(load(name)))
    print()
  for path in sorted(glob.glob(os.path.join(RES, "api_floor_*.json"))):
    name = os.path.basename(path)[:-5]
    print(f"{name}:\n")
    print(api_floor_tables(load(name)))
    print()
  print(scaling_text(load("scaling")))


if __name__ == "__main__":
  main()
