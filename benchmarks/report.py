"""Write the report: the printed tables, JSON, Markdown and PNG charts (the measurements
are :mod:`benchmarks.suite`'s)."""

from __future__ import annotations

import json
import os
from typing import Iterable

from .cases import CASES
from .suite import BPCORE_IMPLS


def below_floor(rows: list[dict]) -> list[str]:
    """Measurements faster than their floor: a bug in the floor (or a broken step), never a
    result to report."""
    return [f"{r['case']}/{r['dtype']}/{r['backend']}/{r['kind']} ({r['impl']}): "
            f"{r['ratio_to_floor']:.2f}x the floor" for r in rows
            if r.get("ratio_to_floor", 1.0) < 1.0]


def _ratio(row: dict, key: str) -> str:
    """A ratio to two decimals, or "-" where its reference was not measured."""
    return f"{row[key]:.2f}" if key in row else "-"


def _spread(row: dict) -> str:
    return f"{row['spread'] * 100:.0f} %" if "spread" in row else "-"


NOISY_SPREAD, NOISY_SHARE = 0.25, 0.2


def noise_warning(rows: list[dict]) -> str:
    """A warning when the machine was too busy for the figures to mean much, else ''.

    Each measurement's spread is (slowest - fastest) / fastest of its timed blocks; when more
    than a fifth of the measurements spread by over 25 %, something else was running.
    """
    spreads = [r["spread"] for r in rows if "spread" in r]
    noisy = [x for x in spreads if x > NOISY_SPREAD]
    if not spreads or len(noisy) <= NOISY_SHARE * len(spreads):
        return ""
    return (f"WARNING: this machine was noisy during the run: {len(noisy)} of {len(spreads)} "
            f"measurements varied by more than {NOISY_SPREAD:.0%} between their repeated "
            f"blocks (median spread {sorted(spreads)[len(spreads) // 2]:.0%}). The fastest "
            "block is reported, but treat the ratios with care and rerun on a quiet machine.")


def markdown_table(rows: list[dict], cases: Iterable[str] | None = None) -> str:
    """Time per step and ratios for bpcore on each backend; one line per case/dtype/kind."""
    lines = ["| case | dtype | backend | kind | path | ms/step | spread | × GEMM floor | "
             "× each peer | memory |", "|---|---|---|---|---|---:|---:|---:|---|---|"]
    for r in rows:
        if r["impl"] not in BPCORE_IMPLS or (cases is not None and
                                             r["case"] not in cases):
            continue
        path = ("Trainer.step" if r["impl"] == "step" else
                "generic step (inplace=False)" if r["impl"] == "generic" else
                "prepared" if r["kind"] in ("sgd", "adam") else
                f"per batch, {r['ratio_to_step']:.2f}x Trainer.step" if "ratio_to_step" in r
                else "-")
        peers = ", ".join(f"{p} {v:.2f}" for p, v in sorted(r.get("ratio_to_peers", {}).items()))
        lines.append(
            f"| {r['case']} | {r['dtype']} | {r['backend']} | {r['kind']} | {path} | "
            f"{r['time_s'] * 1e3:.3f} | {_spread(r)} | {_ratio(r, 'ratio_to_floor')} | "
            f"{peers or '-'} | {_memory(r)} |")
    return "\n".join(lines)


def _memory(r: dict) -> str:
    if "mem_transient_bytes" not in r:
        return "-"
    return (f"{r['mem_transient_bytes'] / 1024:.0f} KiB allocated per step; peak "
            f"{r['mem_peak_ratio']:.2f}x what the step must hold")


def summary_table(rows: list[dict], dtype: str = "float32") -> str:
    """The README table: per case and backend, the SGD and Adam steps with both ratios."""
    by = {(r["case"], r["backend"], r["kind"]): r for r in rows
          if r["impl"] == "step" and r["dtype"] == dtype and "@" not in r["case"]}
    peers = {}
    for r in rows:
        if r["impl"] == "peer" and r["dtype"] == dtype and "@" not in r["case"]:
            peers.setdefault((r["case"], r["kind"]), []).append(
                f"{r['backend']} {r['time_s'] * 1e3:.2f}")
    lines = ["| case | backend | SGD `Trainer.step` ms | × floor | × best peer | Adam "
             "`Trainer.step` ms | × floor | × best peer |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for case, backend in sorted({(c, b) for c, b, _ in by},
                                key=lambda cb: (list(CASES).index(cb[0]), cb[1])):
        cells = []
        for kind in ("sgd", "adam"):
            r = by.get((case, backend, kind))
            cells += (["-"] * 3 if r is None else
                      [f"{r['time_s'] * 1e3:.2f}", _ratio(r, "ratio_to_floor"),
                       _ratio(r, "ratio_to_best_peer")])
        lines.append(f"| {case} | {backend} | " + " | ".join(cells) + " |")
    lines += ["", "Peers (ms per step): " + "; ".join(
        f"{case} {kind}: " + ", ".join(v) for (case, kind), v in sorted(peers.items())
        if kind in ("sgd", "adam"))]
    return "\n".join(lines)


def peers_table(rows: list[dict], cases: Iterable[str] | None = None) -> str:
    lines = ["| case | dtype | peer | kind | ms/step |", "|---|---|---|---|---:|"]
    for r in rows:
        if r["impl"] == "peer" and (cases is None or r["case"] in cases):
            lines.append(f"| {r['case']} | {r['dtype']} | {r['backend']} | {r['kind']} | "
                         f"{r['time_s'] * 1e3:.3f} |")
    lines += ["", "| case | dtype | backend | GEMM floor ms | how | Σ products ms | FLOPs at "
              "best rate ms | best GEMM GFLOP/s | products in sequence ms (× floor) |",
              "|---|---|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        if r["impl"] == "floor" and (cases is None or r["case"] in cases):
            seq = r.get("floor_sequence_s")
            seq = f"{seq * 1e3:.3f} ({seq / r['time_s']:.2f})" if seq else "-"
            lines.append(f"| {r['case']} | {r['dtype']} | {r['backend']} | "
                         f"{r['time_s'] * 1e3:.3f} | {r.get('floor_method', '-')} | "
                         f"{r.get('floor_sum_products_s', 0) * 1e3:.3f} | "
                         f"{r.get('floor_at_peak_s', 0) * 1e3:.3f} | "
                         f"{r.get('best_gemm_gflops', 0):.0f} | {seq} |")
    return "\n".join(lines)


def write_json(result: dict, machine: dict, out: str, name: str = "results.json") -> str:
    """``out/name`` (``results.json``), replaced atomically (a reader never sees half a file)."""
    os.makedirs(out, exist_ok=True)
    p = os.path.join(out, name)
    with open(p + ".tmp", "w") as f:
        json.dump({"machine": machine, **result}, f, indent=1)
    os.replace(p + ".tmp", p)
    return p


def status_section(result: dict) -> str:
    """What a partial or troubled run lacks, in words; empty for a clean, complete run."""
    lines = []
    missing, failed = result.get("missing", []), result.get("failed", {})
    if result.get("status", "complete") != "complete":
        by_case: dict[str, int] = {}
        for key in missing:
            by_case[key.split("/")[0]] = by_case.get(key.split("/")[0], 0) + 1
        lines.append(f"**Partial report ({result['status']})**: {len(missing)} of "
                     f"{result.get('planned', '?')} planned measurements were not taken, by "
                     "case: " + ", ".join(f"{c} {n}" for c, n in by_case.items()) +
                     ". Ratios are given only where both figures were measured.")
        lines += ["", "Not measured: " + ", ".join(f"`{k}`" for k in missing) + "."]
    if failed:
        lines += ["", f"**{len(failed)} measurements failed:**", ""]
        lines += [f"- `{k}`: {v}" for k, v in sorted(failed.items())]
    return "\n".join(lines)


def write_report(result: dict, machine: dict, out: str) -> list[str]:
    rows = result["rows"]
    main_cases = [c for c in ("small", "mnist", "large", "wide")
                  if any(r["case"] == c for r in rows)]
    paths = [write_json(result, machine, out)]
    p = os.path.join(out, "results.md")
    with open(p, "w") as f:
        f.write(f"# bpcore benchmark ({result['profile']} profile"
                f"{', GPU' if result['gpu'] else ''})\n\n")
        if result.get("smoke"):
            f.write("**Smoke run (`--smoke`): every measurement in two short blocks, to "
                    "check that the suite runs. The figures are not for reading.**\n\n")
        status = status_section(result)
        if status:
            f.write(status + "\n\n")
        noise = noise_warning(rows)
        if noise:
            f.write(f"**{noise}**\n\n")
        below = below_floor(rows)
        if below:
            f.write("**Faster than the floor (a floor that is no lower bound, or noise in its "
                    "measurement; do not read these ratios as results):** "
                    + "; ".join(below) + "\n\n")
        f.write(machine_summary(machine) + "\n\n")
        f.write("Ratios are measured in this one run: bpcore's time per step divided by the "
                "same backend's GEMM floor, and by each peer doing the same work. The floor "
                "is a lower bound on any step: on NumPy and PyTorch, which run one operation "
                "per call, the sum of the step's matrix products each timed alone; on JAX, "
                "whose compiled step may overlap products, the step's FLOPs at the best rate "
                "measured on that backend (a 2048-square product or any of the step's own). "
                "Beside the floor (*Peers and floors*), the same products run back to back "
                "with nothing between them: what a step's distance to its floor owes to the "
                "products themselves, not the executor's work. "
                "*Trainer.step* is what a user's loop calls (inputs and integer labels on the "
                "device); *prepared* skips the boundary checks (`Trainer.step_prepared`).\n\n")
        dts = sorted({r["dtype"] for r in rows if r["impl"] == "step"}) or ["float32"]
        f.write("## Summary\n\n" + "\n\n".join(
            (f"### {dt}\n\n" if len(dts) > 1 or dt != "float32" else "") +
            summary_table(rows, dt) for dt in dts) + "\n\n## Every bpcore figure\n\n")
        f.write(markdown_table(rows, main_cases) + "\n\n## Peers and floors\n\n")
        f.write(peers_table(rows, main_cases) + "\n\n## Batch sweep (mnist, sgd step)\n\n")
        f.write(markdown_table([r for r in rows if "@" in r["case"]]) + "\n")
        if result["skipped"]:
            f.write("\n## Not run here\n\n" + "\n".join(
                f"- {k}: {v}" for k, v in sorted(result["skipped"].items())) + "\n")
    paths.append(p)
    paths += charts(rows, out, main_cases)
    return paths


def write_side_report(result: dict, machine: dict, out: str, stem: str, title: str,
                      intro: str, body: str) -> list[str]:
    """``stem.json`` and ``stem.md`` for a report beside the step suite's (``--estimators``,
    ``--scaling``): the title, what is measured, the machine, the tables, what did not run."""
    pj = write_json(result, machine, out, f"{stem}.json")
    pm = os.path.join(out, f"{stem}.md")
    with open(pm, "w") as f:
        noise = noise_warning(result.get("rows", []))
        f.write(f"# {title}\n\n{intro}\n\n{machine_summary(machine)}\n\n"
                + (f"**{noise}**\n\n" if noise else "") + f"{body}\n")
        if result.get("skipped"):
            f.write("\n## Not run here\n\n" + "\n".join(
                f"- {k}: {v}" for k, v in sorted(result["skipped"].items())) + "\n")
    return [pj, pm]


def machine_summary(m: dict) -> str:
    blas = m.get("blas")
    blas_s = ", ".join(f"{d['internal_api']} {d['version']} ({d['num_threads']} threads, "
                       f"{d.get('architecture')})" for d in blas) if isinstance(blas, list) else blas
    env = ", ".join(f"{k}={v}" for k, v in m.get("env", {}).items()) or "none"
    libs = ", ".join(f"{k} {v}" for k, v in m.get("libraries", {}).items())
    prec = m.get("matmul_precision") or {}
    prec_s = ", ".join(f"{k} {v}" for k, v in prec.items()) or "library defaults"
    src = m.get("source") or {}
    clean = {True: "clean tree", False: "tree with uncommitted changes"}.get(
        src.get("tree_clean"), "tree state unknown")
    src_s = f"Code: commit {src.get('commit', '?')} ({clean}). " if src else ""
    kernels = ", ".join(f"{k} {d['kernels']}" for k, d in m.get("backends", {}).items()
                        if "kernels" in d) or "none"
    return (f"{src_s}Machine: {m.get('cpu')} ({m.get('cores')} cores); GPU: {m.get('gpu') or 'none'}. "
            f"BLAS: {blas_s}. Thread/BLAS environment: {env}. torch threads: "
            f"{m.get('torch_threads')}. float32 matrix products: {prec_s}. In-place kernels: "
            f"{kernels} (numba: {m.get('numba', 'not recorded')}). Libraries: {libs}.")


# One colour per implementation, the same in every chart: bpcore on each backend, each peer.
COLOURS = {"bpcore/numpy": "#1f77b4", "bpcore/jax": "#2ca02c", "bpcore/torch": "#d62728",
           "bpcore/cupy": "#9467bd", "bpcore/array_api_strict": "#8c564b",
           "peer/torch": "#ff9896", "peer/jax": "#98df8a", "peer/sklearn": "#c7c7c7"}
PEER_LABELS = {"torch": "PyTorch autograd", "jax": "jax.grad + optax", "sklearn": "scikit-learn"}


def _label(impl: str, backend: str) -> str:
    return f"bpcore / {backend}" if impl == "bpcore" else PEER_LABELS.get(backend, backend)


def charts(rows: list[dict], out: str, cases: list[str]) -> list[str]:
    """``time_per_step.png`` (one panel per kind of step: bars per implementation, the
    backend's GEMM floor drawn as a black line on each bpcore bar, the ratio to it written on
    the bar), ``ratio_to_floor.png`` and ``batch_sweep.png``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    kinds = [k for k in ("sgd", "adam") if any(r["kind"] == k and r["case"] in cases
                                               for r in rows)]
    if not kinds:
        return []
    # float32 where the run has it (the default), else the run's one dtype
    dtype = "float32" if any(r["dtype"] == "float32" for r in rows) else rows[0]["dtype"]
    floor: dict = {}
    for r in rows:
        if r["impl"] == "floor" and r["dtype"] == dtype:
            k = (r["case"], r["backend"])
            floor[k] = min(floor.get(k, float("inf")), r["time_s"] * 1e3)
    paths = []

    def bars(ax, kind, value, note):
        data = {}
        for r in rows:  # bpcore as users call it: Trainer.step (the "step" rows)
            if r["kind"] == kind and r["case"] in cases and r["dtype"] == dtype and \
                    r["impl"] not in ("bpcore", "generic"):
                impl = "bpcore" if r["impl"] == "step" else r["impl"]
                data.setdefault(f"{impl}/{r['backend']}", {})[r["case"]] = r
        keys = sorted((k for k in data if any(value(r) is not None for r in data[k].values())),
                      key=lambda k: (not k.startswith("bpcore"), k))
        width = 0.8 / max(len(keys), 1)
        for j, key in enumerate(keys):
            impl, backend = key.split("/", 1)
            label = _label(impl, backend)  # on the first bar drawn, once per implementation
            for i, case in enumerate(cases):
                r = data[key].get(case)
                if r is None or value(r) is None:
                    continue
                x = i - 0.4 + (j + 0.5) * width
                ax.bar(x, value(r), width * 0.92, color=COLOURS.get(key, "#7f7f7f"),
                       label=label)
                label = None
                note(ax, r, x, width)
        ax.set_xticks(range(len(cases)), cases)
        ax.set_title({"sgd": "SGD step", "adam": "Adam step"}[kind])

    def floor_and_ratio(ax, r, x, width):
        f = floor.get((r["case"], r["backend"]))
        if r["impl"] == "step" and f:
            ax.hlines(f, x - width * 0.46, x + width * 0.46, colors="black", linewidth=2)
            ax.annotate(f"×{r['time_s'] * 1e3 / f:.2f}", (x, r["time_s"] * 1e3), ha="center",
                        va="bottom", fontsize=6, rotation=90, xytext=(0, 2),
                        textcoords="offset points")

    def ratio_text(ax, r, x, width):
        ax.annotate(f"{r['ratio_to_floor']:.2f}", (x, r["ratio_to_floor"]), ha="center",
                    va="bottom", fontsize=6, xytext=(0, 2), textcoords="offset points")

    for name, value, note, ylabel, log in (
            ("time_per_step.png", lambda r: r["time_s"] * 1e3 if r["impl"] != "floor" else None,
             floor_and_ratio, "ms per step (log); black line: GEMM floor", True),
            ("ratio_to_floor.png",
             lambda r: r.get("ratio_to_floor") if r["impl"] == "step" else None,
             ratio_text, "time ÷ the same backend's GEMM floor", False)):
        fig, axes = plt.subplots(1, len(kinds), figsize=(6.5 * len(kinds), 4.8), squeeze=False)
        for ax, kind in zip(axes[0], kinds):
            bars(ax, kind, value, note)
            ax.set_ylabel(ylabel)
            if log:
                ax.set_yscale("log")
            else:
                ax.axhline(1.0, color="black", linewidth=0.8)
                ax.set_ylim(0, ax.get_ylim()[1] * 1.12)
        handles = {}
        for ax in axes[0]:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(lab, h)
        if handles:
            fig.legend(list(handles.values()), list(handles), loc="lower center",
                       ncol=min(len(handles), 5), fontsize=8, frameon=False)
        fig.suptitle(f"bpcore Trainer.step, {dtype}" + (": time, floors, peers" if log else
                                                         ": ratio to the GEMM floor"))
        fig.tight_layout(rect=(0, 0.1, 1, 1))
        p = os.path.join(out, name)
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)

    sweep = {}
    for r in rows:
        if "@" in r["case"] and r["impl"] != "floor":
            key = f"{r['impl']}/{r['backend']}"
            sweep.setdefault(key, []).append((r["batch"], r["time_s"] / r["batch"] * 1e6))
    if sweep:
        fig, ax = plt.subplots(figsize=(7, 4.8))
        for key, pts in sorted(sweep.items()):
            pts.sort()
            ax.plot([b for b, _ in pts], [t for _, t in pts], marker="o",
                    color=COLOURS.get(key, "#7f7f7f"), label=_label(*key.split("/", 1)))
        ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="µs per sample",
               title="mnist 784-256-256-10, SGD step, float32")
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = os.path.join(out, "batch_sweep.png")
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths
