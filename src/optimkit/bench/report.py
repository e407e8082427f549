"""Reports of a bench run: a summary (dict), Markdown, self-contained HTML and PNG plots.

``write_report(store, out_dir)`` writes ``report.md`` (images next to it in
``figures/``) and ``report.html`` (the same content, images embedded as data
URIs, no external reference). Plots need matplotlib; without it the reports
are written without plots and say so.
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from .protocol import BenchError
from .scoring import R_MAX, median, performance_ratios, profile, score, time_to_target_table
from .store import Store

__all__ = ["summarize", "write_report", "format_summary_table"]

TRACK_TITLES = {"external": "external tuning track", "self": "self-tuning track (defaults)"}


# --------------------------------------------------------------------------- summary
def summarize(store: Store, run_id: int | None = None) -> dict:
    """Everything the report shows, as plain data (also the CLI's ``--json``)."""
    run = store.run(run_id)
    run_id = run["run_id"]
    config = json.loads(run["config"])
    trials = store.trials(run_id)
    table = time_to_target_table(trials)
    workloads = list(config["workloads"])
    optimizers = [o["label"] for o in config["optimizers"]]
    tracks: dict[str, Any] = {}
    for track in config["tracks"]:
        t = table.get(track, {})
        t = {w: t[w] for w in workloads if w in t}
        r_steps, ex_steps = performance_ratios(t, "steps")
        r_secs, ex_secs = performance_ratios(t, "seconds")
        rows = []
        for o in optimizers:
            reached = sum(1 for w in t if o in t[w] and math.isfinite(t[w][o]["steps"]))
            rows.append({"optimizer": o, "score_steps": score(r_steps.get(o, {})),
                         "score_seconds": score(r_secs.get(o, {})), "reached": reached,
                         "workloads": len(t)})
        rows.sort(key=lambda r: (-r["score_steps"], -r["score_seconds"], r["optimizer"]))
        tracks[track] = {"table": t, "ratios_steps": r_steps, "ratios_seconds": r_secs,
                         "excluded_steps": ex_steps, "excluded_seconds": ex_secs, "scores": rows}
    hashes: dict[str, list[str]] = {}
    for tr in trials:
        if tr["data_hash"]:
            hs = hashes.setdefault(tr["workload"], [])
            if tr["data_hash"] not in hs:
                hs.append(tr["data_hash"])
    other = {}
    for r in store.conn.execute(
            "SELECT DISTINCT run_id, workload, data_hash FROM trials WHERE run_id != ? AND data_hash IS NOT NULL",
            (run_id,)):
        if r["workload"] in hashes and r["data_hash"] not in hashes[r["workload"]]:
            other.setdefault(r["workload"], []).append((r["run_id"], r["data_hash"]))
    errors = sorted({f"{t['optimizer']} on {t['workload']}: {t['error']}" for t in trials if t["status"] == "error"})
    counts = {"trials": len(trials), "tune": sum(t["phase"] == "tune" for t in trials),
              "eval": sum(t["phase"] == "eval" for t in trials),
              "diverged": sum(t["status"] == "diverged" for t in trials),
              "errors": sum(t["status"] == "error" for t in trials),
              "train_seconds": sum(t["train_seconds"] or 0.0 for t in trials)}
    return {"run": run, "config": config, "workloads": workloads, "optimizers": optimizers,
            "tracks": tracks, "data_hashes": hashes, "other_run_hashes": other, "errors": errors,
            "counts": counts, "optimizer_info": store.optimizers(run_id), "trials": trials}


def _json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def summary_json(summary: dict) -> dict:
    """The summary without the raw trial rows, JSON-safe (inf becomes null)."""
    s = {k: v for k, v in summary.items() if k not in ("trials",)}
    s["run"] = {k: v for k, v in summary["run"].items() if k != "config"}
    return _json_safe(s)


def format_summary_table(summary: dict) -> str:
    """Plain-text score tables for the terminal."""
    lines = []
    for track, data in summary["tracks"].items():
        lines.append(f"{TRACK_TITLES.get(track, track)}: score = area under the performance "
                     f"profile up to {R_MAX:g}x the fastest (1 = best)")
        header = ("rank", "optimizer", "score(steps)", "score(seconds)", "reached")
        rows = [header] + [(str(i + 1), r["optimizer"], f"{r['score_steps']:.3f}",
                            f"{r['score_seconds']:.3f}", f"{r['reached']}/{r['workloads']}")
                           for i, r in enumerate(data["scores"])]
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        for j, r in enumerate(rows):
            lines.append("  " + "  ".join(c.ljust(widths[i]) if i == 1 else c.rjust(widths[i])
                                          for i, c in enumerate(r)))
            if j == 0:
                lines.append("  " + "  ".join("-" * w for w in widths))
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------- document model
@dataclass
class _Doc:
    blocks: list[tuple] = field(default_factory=list)

    def h(self, level: int, text: str):
        self.blocks.append(("h", level, text))

    def p(self, text: str):
        self.blocks.append(("p", text))

    def ul(self, items: list[str]):
        if items:
            self.blocks.append(("ul", items))

    def table(self, header: list[str], rows: list[list[str]], align: list[str] | None = None):
        self.blocks.append(("table", header, rows, align or ["l"] + ["r"] * (len(header) - 1)))

    def img(self, path: str, alt: str):
        self.blocks.append(("img", path, alt))

    def markdown(self) -> str:
        out = []
        for b in self.blocks:
            if b[0] == "h":
                out.append("#" * b[1] + " " + b[2])
            elif b[0] == "p":
                out.append(b[1])
            elif b[0] == "ul":
                out.append("\n".join(f"- {x}" for x in b[1]))
            elif b[0] == "table":
                _, header, rows, align = b
                esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
                out.append("| " + " | ".join(esc(c) for c in header) + " |")
                out[-1] += "\n|" + "|".join(" ---: " if a == "r" else " --- " for a in align) + "|"
                for r in rows:
                    out[-1] += "\n| " + " | ".join(esc(c) for c in r) + " |"
            elif b[0] == "img":
                out.append(f"![{b[2]}]({b[1]})")
        return "\n\n".join(out) + "\n"

    def html(self, title: str, image_root: str) -> str:
        body = []
        for b in self.blocks:
            if b[0] == "h":
                body.append(f"<h{b[1]}>{_inline(b[2])}</h{b[1]}>")
            elif b[0] == "p":
                body.append(f"<p>{_inline(b[1])}</p>")
            elif b[0] == "ul":
                body.append("<ul>" + "".join(f"<li>{_inline(x)}</li>" for x in b[1]) + "</ul>")
            elif b[0] == "table":
                _, header, rows, align = b
                cls = lambda a: ' class="r"' if a == "r" else ""  # noqa: E731
                t = ["<table><thead><tr>" + "".join(f"<th{cls(a)}>{_inline(c)}</th>"
                                                    for c, a in zip(header, align)) + "</tr></thead><tbody>"]
                for r in rows:
                    t.append("<tr>" + "".join(f"<td{cls(a)}>{_inline(c)}</td>" for c, a in zip(r, align)) + "</tr>")
                body.append("".join(t) + "</tbody></table>")
            elif b[0] == "img":
                with open(os.path.join(image_root, b[1]), "rb") as fh:
                    data = base64.b64encode(fh.read()).decode()
                body.append(f'<figure><img alt="{html.escape(b[2])}" src="data:image/png;base64,{data}">'
                            f"<figcaption>{html.escape(b[2])}</figcaption></figure>")
        return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>\n"
                + "\n".join(body) + "\n</body></html>\n")


_CSS = ("body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1100px;margin:2em auto;"
        "padding:0 1em;color:#222;line-height:1.45}table{border-collapse:collapse;margin:1em 0;"
        "font-size:.9em}th,td{border:1px solid #ccc;padding:.25em .6em}th{background:#f3f3f3}"
        ".r{text-align:right}code{background:#f3f3f3;padding:0 .2em;border-radius:3px}"
        "img{max-width:100%}figure{margin:1em 0}figcaption{color:#666;font-size:.85em}"
        "h1,h2,h3{margin-top:1.4em}")


def _inline(text: str) -> str:
    """Escape, then render `code` and **bold** spans."""
    parts = str(text).split("`")
    out = []
    for i, part in enumerate(parts):
        e = html.escape(part)
        if i % 2:
            out.append(f"<code>{e}</code>")
        else:
            bits = e.split("**")
            out.append("".join(f"<b>{x}</b>" if j % 2 else x for j, x in enumerate(bits)))
    return "".join(out)


# --------------------------------------------------------------------------- formatting
def _fmt_metric(x) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    if x == 0:
        return "0"
    return f"{x:.3g}" if 1e-3 <= abs(x) < 1e4 else f"{x:.2e}"


def _fmt_ttt(cell: dict | None) -> str:
    if cell is None:
        return ""
    if not math.isfinite(cell["steps"]):
        return f"— ({cell['reached']}/{cell['n']})"
    return f"{cell['steps']:g} ({cell['seconds']:.2f}s)" + (
        f" {cell['reached']}/{cell['n']}" if cell["reached"] < cell["n"] else "")


def _when(ts) -> str:
    if ts is None:
        return "?"
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


# --------------------------------------------------------------------------- plots
_STYLES = ["-", "--", "-.", ":"]


def _colors(n: int):
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _plots(summary: dict, store: Store, fig_dir: str) -> dict[str, list[tuple[str, str]]]:
    """Write the PNGs; returns ``{section: [(file name, caption)]}``."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    os.makedirs(fig_dir, exist_ok=True)
    opts = summary["optimizers"]
    colors = dict(zip(opts, _colors(len(opts))))
    styles = {o: _STYLES[(i // 10) % len(_STYLES)] for i, o in enumerate(opts)}
    out: dict[str, list[tuple[str, str]]] = {"profiles": [], "ttt": [], "curves": [], "memory": []}

    def save(fig, name):
        fig.savefig(os.path.join(fig_dir, name), dpi=100)
        plt.close(fig)
        return name

    # performance profiles
    taus = [1 + (R_MAX - 1) * i / 300 for i in range(301)]
    for track, data in summary["tracks"].items():
        if not data["table"]:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
        for ax, measure in zip(axes, ("steps", "seconds")):
            ratios = data[f"ratios_{measure}"]
            for o in opts:
                ax.step(taus, profile(ratios.get(o, {}), taus), where="post", color=colors[o],
                        linestyle=styles[o], label=o, linewidth=1.6)
            ax.set_xlim(1, R_MAX)
            ax.set_ylim(-0.02, 1.02)
            ax.set_xlabel(f"tau (ratio to the fastest, {measure} to target)")
            ax.grid(alpha=0.3)
            ax.set_title(f"time measured in {measure}")
        axes[0].set_ylabel("share of workloads with ratio <= tau")
        axes[1].legend(fontsize=7, loc="lower right", ncol=2 if len(opts) > 10 else 1)
        fig.suptitle(f"Performance profiles, {TRACK_TITLES.get(track, track)}")
        fig.tight_layout()
        out["profiles"].append((save(fig, f"profile_{track}.png"),
                                f"Performance profiles, {TRACK_TITLES.get(track, track)}"))

    # time-to-target bars
    for track, data in summary["tracks"].items():
        table = data["table"]
        if not table:
            continue
        ws = list(table)
        ncol = min(3, len(ws))
        nrow = math.ceil(len(ws) / ncol)
        fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 0.28 * len(opts) * nrow + 1.2 * nrow),
                                 squeeze=False)
        for ax, w in zip(axes.flat, ws):
            cells = table[w]
            names = [o for o in opts if o in cells]
            budget = max(c["budget"] for c in cells.values())
            vals = [cells[o]["steps"] if math.isfinite(cells[o]["steps"]) else budget for o in names]
            bars = ax.barh(range(len(names)), vals, color=[colors[o] for o in names])
            for i, o in enumerate(names):
                if not math.isfinite(cells[o]["steps"]):
                    bars[i].set_hatch("//")
                    bars[i].set_alpha(0.35)
                    ax.text(budget, i, " missed", va="center", fontsize=7)
            ax.set_yticks(range(len(names)))
            ax.set_yticklabels(names, fontsize=7)
            ax.invert_yaxis()
            ax.set_xlim(0, budget * 1.18)
            ax.set_title(w, fontsize=9)
            ax.set_xlabel("steps to target (median)", fontsize=8)
            ax.tick_params(axis="x", labelsize=7)
        for ax in list(axes.flat)[len(ws):]:
            ax.axis("off")
        fig.suptitle(f"Time to target, {TRACK_TITLES.get(track, track)} (hatched: target missed)")
        fig.tight_layout()
        out["ttt"].append((save(fig, f"time_to_target_{track}.png"),
                           f"Steps to target, {TRACK_TITLES.get(track, track)}"))

    # loss curves per workload
    evals = [t for t in summary["trials"] if t["phase"] == "eval"]
    series = store.series([t["trial_id"] for t in evals])
    tracks = [t for t in summary["tracks"] if summary["tracks"][t]["table"]]
    for w in summary["workloads"]:
        rows = [t for t in evals if t["workload"] == w]
        if not rows:
            continue
        fig, axes = plt.subplots(1, len(tracks), figsize=(5.6 * len(tracks), 4.2), squeeze=False)
        target = rows[0]["target"]
        metric = rows[0]["metric"]
        positive = True
        for ax, track in zip(axes[0], tracks):
            for o in opts:
                runs = [series[t["trial_id"]] for t in rows if t["track"] == track and t["optimizer"] == o]
                if not runs:
                    continue
                by_step: dict[int, list[float]] = {}
                for s in runs:
                    for step, _, _, v in s:
                        if v is not None:
                            by_step.setdefault(step, []).append(v)
                steps = sorted(by_step)
                if not steps:
                    continue
                med = [median(by_step[s]) for s in steps]
                lo = [min(by_step[s]) for s in steps]
                hi = [max(by_step[s]) for s in steps]
                positive = positive and min(lo) > 0
                ax.plot(steps, med, color=colors[o], linestyle=styles[o], label=o, linewidth=1.4)
                if len(runs) > 1:
                    ax.fill_between(steps, lo, hi, color=colors[o], alpha=0.12, linewidth=0)
            ax.axhline(target, color="k", linestyle=":", linewidth=1, label=f"target {target:g}")
            ax.set_title(TRACK_TITLES.get(track, track), fontsize=9)
            ax.set_xlabel("step")
            ax.set_ylabel(metric)
            ax.grid(alpha=0.3)
        for ax in axes[0]:
            if positive:
                ax.set_yscale("log")
        axes[0][-1].legend(fontsize=7, ncol=2 if len(opts) > 10 else 1)
        fig.suptitle(f"{w}: validation {metric} (median over held-out seeds, band: min-max)")
        fig.tight_layout()
        out["curves"].append((save(fig, f"curves_{w}.png"), f"{w}: validation {metric}"))

    # state memory
    info = summary["optimizer_info"]
    if info:
        names = [i["optimizer"] for i in info]
        measured = [i["measured_state_bytes"] if i["measured_state_bytes"] is not None else 0.0 for i in info]
        declared = [i["declared_state_bytes"] for i in info]
        fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(names) + 2), 4))
        ax.bar(range(len(names)), measured, color=[colors.get(n, "C0") for n in names], label="measured")
        ax.scatter(range(len(names)), declared, color="k", marker="_", s=300, zorder=3,
                   label="declared (optimkit.info)")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("fp32 state bytes per parameter")
        ax.set_title("Optimizer state memory (measured after one step on a 9.6k-parameter MLP)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        out["memory"].append((save(fig, "state_memory.png"), "Optimizer state bytes per parameter"))
    return out


# --------------------------------------------------------------------------- the report
def write_report(store: Store, out_dir: str, run_id: int | None = None) -> dict:
    """Write report.md, report.html and figures/*.png; returns the paths and the summary."""
    summary = summarize(store, run_id)
    try:
        os.makedirs(out_dir, exist_ok=True)
        fig_dir = os.path.join(out_dir, "figures")
        plots: dict[str, list[tuple[str, str]]] = {}
        plot_note = None
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            plot_note = "Plots were skipped: matplotlib is not installed (pip install 'optimkit[bench]')."
        else:
            plots = _plots(summary, store, fig_dir)
        doc = _build(summary, plots, plot_note)
        md_path = os.path.join(out_dir, "report.md")
        html_path = os.path.join(out_dir, "report.html")
        md = doc.markdown()
        # Markdown references images relative to itself
        with open(md_path, "w", encoding="utf-8") as fh:
            fh.write(md)
        with open(html_path, "w", encoding="utf-8") as fh:
            fh.write(doc.html("optimkit bench report", out_dir))
        with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as fh:
            json.dump(summary_json(summary), fh, indent=1, sort_keys=True)
    except OSError as exc:
        raise BenchError(f"cannot write the report to {out_dir}: {exc.strerror or exc}") from None
    figures = [os.path.join(fig_dir, f) for sec in plots.values() for f, _ in sec]
    return {"markdown": md_path, "html": html_path, "figures": figures, "summary": summary}


def _build(summary: dict, plots: dict, plot_note: str | None) -> _Doc:
    run, cfg = summary["run"], summary["config"]
    doc = _Doc()
    doc.h(1, "optimkit bench report")
    doc.p(f"Run {run['run_id']} · suite `{run['suite']}` · {run['status']} · started {_when(run['created'])}"
          f" · Python {run['python']} · torch {run['torch']} · optimkit {run['optimkit']} · "
          f"backend {run['backend']} · {run['platform']}")
    lo, hi = cfg["lr_range"]
    search = (f"a log-spaced grid of {cfg['n_trials']} learning rates" if cfg["search"] == "grid"
              else f"{cfg['n_trials']} learning rates chosen by Optuna's TPE sampler")
    doc.p(f"{len(summary['optimizers'])} optimizers × {len(summary['workloads'])} workloads. "
          f"External tuning: {search} over [{lo:.3g}×, {hi:.3g}×] each optimizer's default learning rate, "
          f"on tuning seed(s) {', '.join(map(str, cfg['tune_seeds']))}; the learning rate that reaches the "
          f"target in the fewest steps is rerun on held-out seeds {', '.join(map(str, cfg['eval_seeds']))}. "
          f"Self-tuning: defaults only, on the held-out seeds, with {cfg['self_budget_factor']:g}× the step "
          f"budget. Time to target is the median over the held-out seeds (a missed seed counts as "
          f"infinite); training seconds exclude evaluation. The score is the area under the performance "
          f"profile up to {R_MAX:g}× the fastest, normalized: 1 = fastest on every workload, "
          f"0 = never within {R_MAX:g}×.")
    c = summary["counts"]
    doc.p(f"{c['trials']} trials ({c['tune']} tuning, {c['eval']} evaluation), {c['diverged']} diverged, "
          f"{c['errors']} failed; {c['train_seconds']:.1f} s of training in all.")

    for track, data in summary["tracks"].items():
        title = TRACK_TITLES.get(track, track)
        doc.h(2, f"Scores, {title}")
        doc.table(["rank", "optimizer", "score (steps)", "score (seconds)", "targets reached"],
                  [[str(i + 1), f"`{r['optimizer']}`", f"{r['score_steps']:.3f}", f"{r['score_seconds']:.3f}",
                    f"{r['reached']}/{r['workloads']}"] for i, r in enumerate(data["scores"])],
                  ["r", "l", "r", "r", "r"])
        if data["excluded_steps"]:
            doc.p("Left out of the scores (no optimizer reached the target): "
                  + ", ".join(f"`{w}`" for w in data["excluded_steps"]) + ".")
        doc.h(3, f"Time to target, {title}")
        doc.p("Median steps to target over the held-out seeds (training seconds in brackets); "
              "— = missed (seeds that reached it / seeds).")
        ws = list(data["table"])
        doc.table(["optimizer"] + [f"{w} ({cfg['workloads'][w]['metric']} ≤ {cfg['workloads'][w]['target']:g})"
                                   for w in ws],
                  [[f"`{o}`"] + [_fmt_ttt(data["table"][w].get(o)) for w in ws] for o in summary["optimizers"]])
        doc.h(3, f"Final validation metric, {title}")
        doc.table(["optimizer"] + ws,
                  [[f"`{o}`"] + [_fmt_metric(data["table"][w][o]["final"]) if o in data["table"][w] else ""
                                 for w in ws] for o in summary["optimizers"]])
        if track == "external":
            doc.h(3, "Tuned learning rates")
            doc.table(["optimizer"] + ws,
                      [[f"`{o}`"] + [f"{data['table'][w][o]['lr']:.3g}" if o in data["table"][w]
                                     and data["table"][w][o]["lr"] is not None else "" for w in ws]
                       for o in summary["optimizers"]])

    doc.h(2, "Plots")
    if plot_note:
        doc.p(plot_note)
    for section, title in (("profiles", "Performance profiles"), ("ttt", "Time to target"),
                           ("curves", "Validation curves"), ("memory", "State memory per optimizer")):
        if plots.get(section):
            doc.h(3, title)
            for name, caption in plots[section]:
                doc.img(f"figures/{name}", caption)

    doc.h(2, "Workloads")
    trials = summary["trials"]
    rows = []
    for w, spec in cfg["workloads"].items():
        from .workloads import WORKLOADS

        wl = WORKLOADS.get(w)
        hashes = summary["data_hashes"].get(w, [])
        rows.append([f"`{w}`", wl.description if wl else "", spec["metric"], f"{spec['target']:g}",
                     str(spec["steps"]), str(spec["eval_every"]), ", ".join(hashes)])
    doc.table(["workload", "description", "metric", "target", "steps", "eval every", "data hash"], rows,
              ["l", "l", "l", "r", "r", "r", "l"])
    if any(w == "char_lm" for w in cfg["workloads"]):
        from .workloads import CORPUS_FILES

        doc.p("`char_lm` trains on source files of the running Python's standard library ("
              + ", ".join(CORPUS_FILES) + "); its data hash is the corpus hash, which differs between "
              "Python versions.")

    notes = []
    for w, hs in summary["data_hashes"].items():
        if len(hs) > 1:
            notes.append(f"**Warning**: `{w}` results in this run come from {len(hs)} different data sets / "
                         f"corpora (hashes {', '.join(hs)}); they are not comparable.")
    for w, others in summary["other_run_hashes"].items():
        runs = sorted({r for r, _ in others})
        notes.append(f"`{w}`: other runs in this database ({', '.join(map(str, runs))}) used different data "
                     f"(hashes {', '.join(sorted({h for _, h in others}))}); compare across runs with care.")
    if cfg.get("skipped"):
        notes.append("Not registered in this optimkit, so skipped: " + ", ".join(f"`{s}`" for s in cfg["skipped"]) + ".")
    for e in summary["errors"][:20]:
        notes.append(f"Trial failure: {e}")
    if notes:
        doc.h(2, "Notes")
        doc.ul(notes)
    doc.p(f"Results database: run {run['run_id']}, {len(trials)} trials; query it with SQL "
          "(see docs/bench.md for the schema).")
    return doc
