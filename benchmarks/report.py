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
  out = []
  out.append("Paired ratios (within each repetition, quartiles over repetitions):\n")
  out.append("| model | variant | x hand-written (q25 / median / q75) | x hand-written as updates (median) | x local SGD (median) | target x local |")
  out.append("| --- | --- | ---: | ---: | ---: | ---: |")
  for name, m in data["models"].items():
    for r in m["rows"]:
      if "paired_ratio_to_hand_q25_q50_q75" not in r:
        continue
      q = r["paired_ratio_to_hand_q25_q50_q75"]
      loc = r.get("paired_ratio_to_local_sgd_q25_q50_q75")
      tgt = r.get("target_ratio_to_local_sgd")
      upd = r.get("paired_ratio_to_hand_as_updates_q25_q50_q75")
      out.append(f"| {name} | {r['variant']} | {q[0]:.3f} / {q[1]:.3f} / {q[2]:.3f} | "
                 f"{'' if upd is None else f'{upd[1]:.3f}'} | "
                 f"{'' if loc is None else f'{loc[1]:.3f}'} | {'' if tgt is None else f'{tgt:.3f}'} |")
  out.append("")
  for name, m in data["models"].items():
    out.append(f"*{name}*: {m['params']} parameters, batch {m['batch_per_worker']} per worker, "
               f"{m['reps']} interleaved repetitions of {m['steps_per_rep']} steps\n")
    out.append("| variant | ms/step (median) | min-max | x local SGD | x hand-written |")
    out.append("| --- | ---: | ---: | ---: | ---: |")
    for r in m["rows"]:
      hand = f"{r['ratio_to_hand']:.2f}" if "ratio_to_hand" in r else ""
      out.append(f"| {r['variant']} | {r['median_ms']:.2f} | {r['min_ms']:.2f}-{r['max_ms']:.2f} "
                 f"| {r['ratio_to_local_sgd']:.2f} | {hand} |")
    out.append("")
  return "\n".join(out)


def processes_table(data, wagrad_only=False):
  """--targets --processes N: median over processes of each process's median paired
  ratio, [range over processes]."""
  def cell(r, key):
    if key not in r:
      return ""
    v = r[key]
    return f"{v['median']:.3f} [{v['min']:.3f}, {v['max']:.3f}]"
  out = ["| model | variant | x hand-written | x hand-written as updates | x local SGD | target x local |",
         "| --- | --- | ---: | ---: | ---: | ---: |"]
  for name, m in data["models"].items():
    for r in m["rows"]:
      if wagrad_only and not r["variant"].startswith("wagrad"):
        continue
      if not any(k in r for k in ("x_hand", "x_local_sgd")):
        continue
      tgt = r.get("target_ratio_to_local_sgd")
      out.append(f"| {name} | {r['variant']} | {cell(r, 'x_hand')} | "
                 f"{cell(r, 'x_hand_as_updates')} | {cell(r, 'x_local_sgd')} | "
                 f"{'' if tgt is None else f'{tgt:.4f}'} |")
  reps = {m["reps"] for m in data["models"].values()}
  return (f"Medians over {data['processes']} fresh processes per algorithm family of each "
          f"process's median paired ratio ({'/'.join(map(str, sorted(reps)))} interleaved "
          f"repetitions), [lowest, highest process]:\n\n" + "\n".join(out))


def targets_table(data, wagrad_only=False):
  """#8's targets with 90% bootstrap intervals of the median paired ratio."""
  if "processes" in data:
    return processes_table(data, wagrad_only)
  def ci(r, key):
    if key not in r:
      return ""
    q = {"median_ratio_to_hand_90ci": "paired_ratio_to_hand_q25_q50_q75",
         "median_ratio_to_hand_as_updates_90ci": "paired_ratio_to_hand_as_updates_q25_q50_q75",
         "median_ratio_to_local_sgd_90ci": "paired_ratio_to_local_sgd_q25_q50_q75"}[key]
    lo, hi = r[key]
    return f"{r[q][1]:.3f} [{lo:.3f}, {hi:.3f}]"
  out = ["| model | variant | x hand-written | x hand-written as updates | x local SGD | target x local |",
         "| --- | --- | ---: | ---: | ---: | ---: |"]
  for name, m in data["models"].items():
    for r in m["rows"]:
      if not any(k.endswith("_90ci") for k in r):
        continue
      if wagrad_only and not r["variant"].startswith("wagrad"):
        continue
      tgt = r.get("target_ratio_to_local_sgd")
      out.append(f"| {name} | {r['variant']} | {ci(r, 'median_ratio_to_hand_90ci')} | "
                 f"{ci(r, 'median_ratio_to_hand_as_updates_90ci')} | "
                 f"{ci(r, 'median_ratio_to_local_sgd_90ci')} | "
                 f"{'' if tgt is None else f'{tgt:.4f}'} |")
  reps = {m["reps"] for m in data["models"].values()}
  return (f"Paired medians over {'/'.join(map(str, sorted(reps)))} interleaved repetitions, "
          f"[90% bootstrap interval]:\n\n" + "\n".join(out))


def comm_table(data):
  m = data["models"]["tiny"]
  out = ["| algorithm | all-reduce bytes every step | collective bytes in the exchange branch(es) |",
         "| --- | ---: | ---: |"]
  seen = set()
  for r in m["rows"]:
    v = r["variant"].replace("wagrad ", "").split(" tau=")[0]
    if v in seen or v.startswith("hand"):
      continue
    seen.add(v)
    cb = r["collective_bytes"]
    every = cb["every_step"].get("all-reduce", 0)
    br = ", ".join(f"{k} {b}" for k, b in sorted(cb["in_branches"].items())) or "0"
    out.append(f"| {v} | {every} | {br} |")
  return f"(tiny model: the parameters are {m['param_bytes']} bytes)\n\n" + "\n".join(out)


def scaling_text(data):
  v = ", ".join(f"K={r['workers']}: {r['median_ms']:.2f} ms ({r['program_bytes'] / 1e6:.1f} MB)"
                for r in data["vmap"])
  s = ", ".join(f"D={r['devices']}: {r['median_ms']:.2f} ms" for r in data["shard_map"])
  return f"vmap on one device {v}; shard_map with 8 workers over D devices {s}."


def main():
  for name in ("overhead_targets", "overhead_targets_nodonate"):
    if os.path.exists(os.path.join(RES, name + ".json")):
      print(f"{name}:")
      print(targets_table(load(name), wagrad_only=name != "overhead_targets"))
      print()
  print(overhead_tables(load("overhead")))
  print(comm_table(load("overhead")))
  print()
  print(scaling_text(load("scaling")))


if __name__ == "__main__":
  main()
