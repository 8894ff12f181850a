"""What a benchmark run leaves behind: strict JSON, a Markdown table, PNG plots, and the comparison with
a saved run. Everything here reads the run's JSON form (a dict), so a saved run renders the same way."""
from __future__ import annotations

import json
import math
from pathlib import Path

SCHEMA = "autoglm-fast-bench/1"
BASELINES = ("eager", "compile", "sdpa")  # column order; e2e's own implementations follow in row order
CHECK = "max error vs eager"  # a metric of every kernel row: its own column, not a note
GRAPHED = ("captured", "off")  # CUDA-graph states that are not a fallback ("off": no CUDA, e.g. a CPU run)


def _clean(x):
    """NaN/inf -> None, recursively: the file must be JSON any parser reads, not Python's NaN extension."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_json(run: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")  # written whole, then renamed: a killed run leaves a valid file
    tmp.write_text(json.dumps(_clean(run), indent=1, allow_nan=False) + "\n")
    tmp.replace(path)


def load(path: str | Path) -> dict:
    try:
        run = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read benchmark results {str(path)!r}: {e}") from None
    if not isinstance(run, dict) or run.get("schema") != SCHEMA:
        raise ValueError(f"{str(path)!r} is not an autoglm-fast benchmark run (schema {SCHEMA})")
    return run


def merge(runs: list[dict]) -> dict:
    """One run from several made on the same device (e.g. the suites run as separate, time-boxed steps).
    Rows with the same suite, case, shape and dtype are one row: the last part's (gpu_check.sh's headline
    stage measures ours' decode b1 first, the later e2e stage again beside its baselines)."""
    first = runs[0]
    for other in runs[1:]:
        if other["environment"]["device"] != first["environment"]["device"]:
            raise ValueError(f"cannot merge runs from {first['environment']['device']!r} and "
                             f"{other['environment']['device']!r}")
    rows = {}  # a row measured again in a later part replaces the earlier one, where that one stood
    for r in (r for run in runs for r in run["rows"]):
        rows[_key(r)] = r
    merged = dict(first, rows=list(rows.values()),
                  complete=all(run.get("complete", False) for run in runs),
                  commit=" + ".join(dict.fromkeys(run["commit"] for run in runs)))
    merged["options"] = dict(first["options"], suites=list(dict.fromkeys(s for run in runs
                                                                         for s in run["options"]["suites"])))
    # Each part keeps its own options and ceilings (its rows' % roofline were computed against them).
    merged["parts"] = [p for run in runs for p in run.get("parts") or
                       [{k: run[k] for k in ("date", "commit", "options", "ceilings")}]]
    return merged


def _num(x, spec: str) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def _impls(rows: list[dict]) -> list[str]:
    seen = [i for r in rows for i in list(r["ms"]) + list(r.get("errors", {}))]
    others = [i for i in dict.fromkeys(seen) if i not in ("ours",) + BASELINES]
    return [i for i in BASELINES if i in seen] + others


def _part_lines(part: dict, prefix: str) -> list[str]:
    o, c = part["options"], part["ceilings"]
    peaks = ", ".join(f"{k} {_num(v, '.4g')}" for k, v in c["matmul_tflops"].items())
    return [f"{prefix}shapes `{o['shapes']}` · dtype {o['dtype']} · torch.compile mode "
            f"`{o.get('compile_mode') or 'none'}`",
            f"{prefix}ceilings measured at the start of the run: copy {_num(c['bandwidth_gbs'], '.4g')} GB/s; "
            f"dense matmul {peaks} TFLOP/s"]


def header(run: dict) -> list[str]:
    env, parts = run["environment"], run.get("parts") or [run]
    lines = [f"device **{env['device']}** · {run['date']} · commit `{run['commit']}` · torch {env['torch']} · "
             f"triton {env['triton']} · CUDA {env.get('cuda') or '–'} · Python {env['python']}"]
    for part in parts:
        lines += _part_lines(part, f"{', '.join(part['options']['suites'])}: " if len(parts) > 1 else "")
    return lines + ([] if run.get("complete", True) else ["**incomplete run**: it stopped before its last case"])


def markdown(run: dict) -> str:
    lines = [f"# autoglm-fast benchmarks: {run['environment']['device']}", ""]
    lines += [line + "  " for line in header(run)]
    for suite in dict.fromkeys(r["suite"] for r in run["rows"]):
        rows = [r for r in run["rows"] if r["suite"] == suite]
        impls = _impls(rows)
        checked = any(CHECK in r.get("metrics", {}) for r in rows)
        graphed = any(r.get("graphs") for r in rows)
        head = (["case", "shape", "ours ms (p20–p80)"] + [f"{i} ms" for i in impls] + ["GB/s", "TFLOP/s", "% roofline"]
                + [f"vs {i}" for i in impls] + ["err vs eager"] * checked + ["CUDA graphs"] * graphed + ["timer"])
        lines += ["", f"## {suite}", "", "| " + " | ".join(head) + " |",
                  "|---|---|---:|" + "---:|" * (2 * len(impls) + 3 + checked) + "---|" * graphed + "---|"]
        for r in rows:
            ours = r["ms"].get("ours")
            lo, hi = r.get("quantiles", {}).get("ours") or (None, None)
            spread = f" ({_num(lo, '.4g')}–{_num(hi, '.4g')})" if lo is not None and lo != hi else ""
            ours_cell = f"**{_num(ours, '.4g')}**{spread}" if ours is not None else "error"
            base = [_num(r["ms"].get(i), ".4g") if i in r["ms"] else ("error" if i in r.get("errors", {}) else "–")
                    for i in impls]
            speed = [_num(r.get("speedup", {}).get(i), ".2f") + ("×" if r.get("speedup", {}).get(i) else "")
                     for i in impls]
            cells = ([r["case"], r["shape"], ours_cell] + base
                     + [_num(r.get("gbs"), ".4g"), _num(r.get("tflops"), ".4g"), _num(r.get("roofline_pct"), ".1f")]
                     + speed + [_num(r.get("metrics", {}).get(CHECK), ".1e")] * checked
                     + [_graphs_cell(r)] * graphed + [r["timer"] + (f", {r['l2']}" if r.get("l2") else "")])
            lines.append("| " + " | ".join(cells) + " |")
        notes = [f"- {r['case']} {r['shape']}: {k}: {_num(v, '.4g')}" for r in rows
                 for k, v in r.get("metrics", {}).items() if k != CHECK]
        if suite == "e2e":  # the with/without graphs and reference decode rates against the same roofline
            notes += [f"- {r['case']} {r['shape']}: % roofline by implementation: " +
                      ", ".join(f"{k} {_num(v, '.1f')}" for k, v in r["roofline_pct_by_impl"].items())
                      for r in rows if len(r.get("roofline_pct_by_impl") or {}) > 1 and r.get("roofline_ms")]
        notes += [f"- {r['case']} {r['shape']}: **{k} failed**: {v}" for r in rows for k, v in r.get("errors", {}).items()]
        lines += [""] + notes if notes else []
    lines += ["", "% roofline: the larger of bytes / measured copy bandwidth and FLOPs / measured matmul peak, "
              "over ours. vs X: X's time / ours (above 1 = ours faster). err vs eager: max |ours - eager| / "
              "(1 + |eager|) on the same inputs. CUDA graphs: what the graphed engine got (captured; "
              "fallback = capture failed and it decoded eagerly, not a graphed time; off = no CUDA). "
              "Timer: stream = `do_bench` (L2 flushed before each call: `flush`), graph = CUDA-graph replay "
              "(`rotate N copies`: each call reads the next of N copies of the inputs, together over twice the "
              "L2, so inputs come from HBM as in the model), engine = wall clock through the engine, "
              "call = one call (smoke run)."]
    return "\n".join(lines) + "\n"


def _graphs_cell(r: dict) -> str:
    return ", ".join(f"{k}: {v}" if v in GRAPHED else f"**{k}: {v}**" for k, v in r.get("graphs", {}).items()) or "–"


def graph_fallbacks(run: dict) -> list[str]:
    """"suite case shape: impl status" for every implementation that asked for CUDA graphs and did not
    decode from them ("fallback": capture failed; "pending": never captured). A CPU run's "off" passes."""
    return [f"{r['suite']} {r['case']} {r['shape']}: {impl} {status}" for r in run["rows"]
            for impl, status in (r.get("graphs") or {}).items() if status not in GRAPHED]


def plot(run: dict, directory: str | Path) -> list[Path]:
    """speedup.png (ours vs each baseline) and roofline.png (% of roofline per row). Needs matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rows = run["rows"]
    labels = [f"{r['case']} · {r['shape']}" for r in rows]
    title = f"{run['environment']['device']} · {run['commit']}"
    paths = []
    for name, series, xlabel, line in (
            ("speedup", {i: [r.get("speedup", {}).get(i) for r in rows] for i in _impls(rows)},
             "speedup of ours (× faster than the baseline)", 1.0),
            ("roofline", {"ours": [r.get("roofline_pct") for r in rows]}, "% of the measured roofline", 85.0)):
        fig, ax = plt.subplots(figsize=(9, 0.28 * len(rows) + 1.5))
        width = 0.8 / max(1, len(series))
        for k, (impl, values) in enumerate(series.items()):
            shown = [(i + k * width, v) for i, v in enumerate(values) if v is not None and math.isfinite(v) and v > 0]
            if shown:
                ax.barh(*zip(*shown), height=width, label=f"vs {impl}" if name == "speedup" else impl)
        if name == "speedup":
            ax.set_xscale("log")  # ratios: 2x faster and 2x slower sit equally far from the line at 1
        ax.axvline(line, color="k", linewidth=0.8, linestyle="--")
        ax.set_yticks([i + 0.4 - width / 2 for i in range(len(rows))], labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(xlabel)
        ax.set_title(title, fontsize=9)
        if name == "speedup" and series:
            ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(directory / f"{name}.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def _key(r: dict) -> tuple:
    return r["suite"], r["case"], r["shape"], r["dtype"]


def compare(run: dict, base: dict, threshold: float = 0.05) -> tuple[str, list[dict]]:
    """Per-row speedup of this run's "ours" over the saved run's; rows slower by > threshold are regressions."""
    now = {_key(r): r for r in run["rows"]}
    then = {_key(r): r for r in base["rows"]}
    lines = [f"compared with {base['environment']['device']} @ {base['commit']} ({base['date']})"]
    if base["environment"]["device"] != run["environment"]["device"]:
        lines.append(f"note: different devices ({run['environment']['device']} now): ratios mix hardware and code")
    lines.append(f"{'case':<28} {'shape':<30} {'base ms':>10} {'now ms':>10} {'speedup':>8}")
    regressions = []
    for key, r in now.items():
        old = then.get(key)
        a, b = (old or {}).get("ms", {}).get("ours"), r["ms"].get("ours")
        if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)) or b <= 0:
            lines.append(f"{r['case']:<28} {r['shape']:<30} {_num(a, '.4g'):>10} {_num(b, '.4g'):>10} "
                         f"{'new' if old is None else '–':>8}")
            continue
        flag = ""
        if b > a * (1 + threshold):
            flag = f"  REGRESSION (+{100 * (b / a - 1):.1f} %)"
            regressions.append({"suite": r["suite"], "case": r["case"], "shape": r["shape"], "base_ms": a,
                                "ms": b})
        lines.append(f"{r['case']:<28} {r['shape']:<30} {a:>10.4g} {b:>10.4g} {a / b:>7.2f}x{flag}")
    gone = [k for k in then if k not in now]
    if gone:
        lines.append(f"{len(gone)} row(s) of the base run not in this one: " + "; ".join(f"{c} {s}" for _, c, s, _ in gone))
    lines.append(f"{len(regressions)} regression(s) over {100 * threshold:.0f} %")
    return "\n".join(lines), regressions
