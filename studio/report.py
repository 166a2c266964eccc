"""`model-studio report`: one self-contained HTML file (tables + PNG plots inlined) to send to a colleague.

Plots are drawn with matplotlib's Agg backend (no Qt in the core): latency per batch size with p95
whiskers, size on disk, quality, and the latency / quality Pareto front.
"""

from __future__ import annotations

import base64
import errno
import html
import io
import os
import time
import uuid
from pathlib import Path
from typing import Any

from studio.variant_rows import batch_sizes, label, latency, pareto_front, quality_score, size_mb, steps_text


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def plots(rows: list[dict[str, Any]]) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    names = [label(r) for r in rows]
    out: dict[str, str] = {}
    batches = batch_sizes(rows)
    if batches:
        fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 3.2), squeeze=False)
        for ax, b in zip(axes[0], batches, strict=True):
            p50 = [latency(r, b) or 0 for r in rows]
            p95 = [latency(r, b, "p95") or 0 for r in rows]
            ax.bar(names, p50, color="#4c72b0", label="p50")
            ax.errorbar(
                names,
                p50,
                yerr=[[0] * len(p50), [max(0, h - m) for h, m in zip(p95, p50, strict=True)]],
                fmt="none",
                ecolor="black",
                capsize=4,
                label="p95",
            )
            ax.set_title(f"latency, batch {b}")
            ax.set_ylabel("ms per batch")
            ax.tick_params(axis="x", rotation=30)
            ax.legend()
        out["latency"] = _png(fig)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar(names, [size_mb(r) or 0 for r in rows], color="#55a868")
    ax.set_title("size on disk")
    ax.set_ylabel("MB")
    ax.tick_params(axis="x", rotation=30)
    out["size"] = _png(fig)
    plt.close(fig)
    scored = [(r, quality_score(r, rows)) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar([label(r) for r, _ in scored], [s or 0 for _, (_, s) in scored], color="#c44e52")
    keys = sorted({k for _, (k, s) in scored if s is not None and k != "reference"})
    ax.set_title("quality against the original")
    ax.set_ylabel(", ".join(keys) or "quality")
    ax.set_ylim(min([s for _, (_, s) in scored if s is not None] + [1.0]) * 0.98, 1.005)
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.tick_params(axis="x", rotation=30)
    out["quality"] = _png(fig)
    plt.close(fig)
    if batches:
        b = batches[0]
        pts, kept = [], []
        for r, (_, s) in scored:
            lat = latency(r, b)
            if lat is not None and s is not None:
                pts.append((lat, s))
                kept.append(r)
        if pts:
            fig, ax = plt.subplots(figsize=(6, 3.6))
            sizes = [max(20, (size_mb(r) or 0) * 3) for r in kept]
            ax.scatter(
                [p[0] for p in pts], [p[1] for p in pts], s=sizes, alpha=0.6, label="variant (area = size)"
            )
            for (x, y), r in zip(pts, kept, strict=True):
                ax.annotate(label(r), (x, y), fontsize=8, xytext=(4, 4), textcoords="offset points")
            front = pareto_front(pts)
            ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "k--", label="Pareto front")
            ax.set_xlabel(f"latency p50 at batch {b} (ms)")
            ax.set_ylabel("quality")
            ax.set_title("latency vs quality")
            ax.ticklabel_format(axis="y", useOffset=False)
            ax.legend(fontsize=8)
            out["pareto"] = _png(fig)
            plt.close(fig)
    return out


def _or_dash(v: float | None) -> Any:
    return "-" if v is None else v


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def render(rows: list[dict[str, Any]], title: str = "Model Studio report") -> str:
    from studio.variants import environment

    batches = batch_sizes(rows)
    head = (
        ["variant", "kind", "steps", "size MB"]
        + [f"b{b} p50 ms" for b in batches]
        + [f"b{b} p95 ms" for b in batches]
        + ["peak MB", "quality"]
    )
    body = []
    for r in rows:
        m = r["metrics"]
        steps = steps_text(r) or "-"
        q = ", ".join(
            f"{k} {_fmt(v)}" for k, v in m.get("quality", {}).items() if isinstance(v, (int, float))
        )
        cells = [label(r), r["kind"], steps, size_mb(r) or 0.0]
        cells += [_or_dash(latency(r, b)) for b in batches] + [
            _or_dash(latency(r, b, "p95")) for b in batches
        ]
        cells += [m.get("peak_memory_mb", "-"), q or "reference"]
        # the full id under the label: what a colleague types to find the variant in the workspace
        first = f"<td>{html.escape(cells[0])}<br><small>{html.escape(r['id'])}</small></td>"
        body.append("<tr>" + first + "".join(f"<td>{_fmt(c)}</td>" for c in cells[1:]) + "</tr>")
    imgs = "".join(
        f'<figure><img alt="{k}" src="data:image/png;base64,{v}"><figcaption>{k}</figcaption></figure>'
        for k, v in plots(rows).items()
    )
    env = environment()
    machine = env["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    disagreements = ""
    for r in rows:
        worst = r["metrics"].get("disagreements") or []
        if worst:
            items = "".join(
                f"<li>{_fmt(w['score'])}: {html.escape(w['text'][:160])} {html.escape(w['detail'])}</li>"
                for w in worst
            )
            disagreements += f"<h3>{html.escape(label(r))}: examples that changed most</h3><ol>{items}</ol>"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:nth-child(-n+3),th{{text-align:left}}
figure{{display:inline-block;margin:1em}}img{{max-width:100%}}</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{time.strftime("%Y-%m-%d %H:%M")} · {html.escape(machine["cpu"])} ({machine["cores"]} cores{
        ", GPU " + html.escape(machine["gpu"]) if machine["gpu"] else ""
    }) · {html.escape(versions)}</p>
<h2>Variants</h2><table><tr>{"".join(f"<th>{h}</th>" for h in head)}</tr>{"".join(body)}</table>
<h2>Plots</h2>{imgs}
<h2>What changed</h2>{disagreements or "<p>No per-example differences recorded.</p>"}
</body></html>
"""


def write_report(rows: list[dict[str, Any]], out: str | Path) -> Path:
    """Write the report atomically (a temporary file beside it, renamed over it), so a failed write never
    leaves a half file or destroys the previous report; an unusable path is a one-line BadInput."""
    from studio.errors import BadInput, disk_full_error
    from studio.safe_files import make_parent_folder

    out = Path(out).expanduser()
    if out.is_dir():
        raise BadInput("is a folder; give the report a file name (e.g. report.html)", path=out)
    make_parent_folder(out)
    text = render(rows)
    tmp = out.with_name(f".{out.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    created = False
    try:
        with tmp.open("x", encoding="utf-8") as fh:
            created = True
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, out)
    except OSError as exc:
        if created:
            tmp.unlink(missing_ok=True)
        full = disk_full_error(exc, "the report")
        if full is not None:
            raise full from exc
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise BadInput(f"cannot write here ({exc.strerror}); choose a writable folder", path=out) from exc
        raise BadInput(f"cannot write the report ({exc.strerror or exc})", path=out) from exc
    return out
