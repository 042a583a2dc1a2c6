"""An experiment, finished or under way, as something to look at over breakfast:
`report.html` (one static page, images embedded, linked to each run's files),
`contact_sheet.png` (results in a grid labelled with their swept values) and a `loss.png`
curve in each run's folder. A clip shows a strip of its frames and links its result.mp4; its
`flicker.png` plots each frame's warping error."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from pipeline import images, runs

THUMB = 192  # pixels, the long side of a result in the sheet and on the page
STRIP = 6  # frames of a clip shown on its card, spread over the frames done


def write_report(exp: Path) -> list[Path]:
    exp = Path(exp)
    rows = runs.experiment_rows(exp)
    keys = sorted({key for row in rows for key in row["swept"]})
    for row in rows:
        trace = row["folder"].read_trace()
        if trace:
            plot_losses(row["folder"], trace, row["run_id"])
        if row["frames_total"]:
            plot_flicker(row["folder"], row["run_id"])
    # Each result decoded and scaled once, for both the sheet and the page; a clip's is the
    # middle one of its frames done.
    thumbs = {row["run_id"]: _fit(picture, THUMB) for row in rows
              if (picture := _picture(row))}
    sheet, sheet_png = exp / "contact_sheet.png", _png_bytes(contact_sheet(rows, keys, thumbs))
    images.atomic_write(sheet, sheet_png)
    page = exp / "report.html"
    images.atomic_write(page, render_html(exp, rows, keys, thumbs, sheet, sheet_png))
    return [page, sheet]


# --------------------------------------------------------------------------- loss curves


def _pyplot():
    """matplotlib's pyplot, drawing into files only (no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    """The figure as a PNG at `path`, written atomically, and closed."""
    plt = _pyplot()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    images.atomic_write(path, buffer.getvalue())
    return path


def plot_losses(folder: runs.RunFolder, trace: list[dict], title: str) -> Path:
    fig, ax = _pyplot().subplots(figsize=(5, 3.2), dpi=100)
    clip = "frame" in trace[0]  # each frame numbers its own iterations: the clip's in a row
    steps = list(range(1, len(trace) + 1)) if clip else [row["iteration"] for row in trace]
    for term in ("total", "content", "style", "tv", "temporal"):
        values = [row.get(term) for row in trace]
        if any(v is not None for v in values) and all(v is None or v > 0 for v in values):
            ax.plot(steps, [float("nan") if v is None else v for v in values], label=term,
                    linewidth=2 if term == "total" else 1)
    ax.set_yscale("log")
    ax.set_xlabel("iteration, frame after frame" if clip else "iteration")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, folder.path / "loss.png")


def plot_flicker(folder: runs.RunFolder, title: str) -> Path | None:
    """A clip's flicker: each frame's warping error against the frame before (metrics.json),
    in grey levels over the pixels the flow can be trusted at."""
    frames = [f for f in (folder.read_metrics() or {}).get("frames", [])
              if f.get("warping_error") is not None]
    if not frames:
        return None
    import matplotlib.ticker

    fig, ax = _pyplot().subplots(figsize=(5, 2.6), dpi=100)
    ax.plot([f["frame"] for f in frames], [f["warping_error"] for f in frames], marker=".")
    ax.set_ylim(bottom=0)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("frame")
    ax.set_ylabel("warping error (grey levels)")
    ax.set_title(f"{title}: flicker", fontsize=9)
    ax.grid(alpha=0.3)
    return _save(fig, folder.path / "flicker.png")


def _frames_done(row: dict) -> list[Path]:
    return row["folder"].saved_frames()[:row["frames_done"]]


def _picture(row: dict):
    """The image that stands for a run: its result.png, or a clip's middle frame done."""
    if row["frames_total"]:
        done = _frames_done(row)
        return done[len(done) // 2] if done else None
    return row["result"] or None


# --------------------------------------------------------------------------- contact sheet


def _value(row: dict, key: str) -> str:
    value = row["swept"].get(key, "")
    return f"{value:g}" if isinstance(value, float) else str(value)


def _leaf(key: str) -> str:
    return key.rpartition(".")[2]


def _axes(rows, keys):
    """Row labels and column labels, in the order the runs were planned: with two or more
    swept keys the first runs down the rows and the others across the columns."""
    def ordered(values):
        return list(dict.fromkeys(values))

    if not keys:
        return [""], ordered(row["run_id"] for row in rows), lambda r: ("", r["run_id"])
    row_keys, col_keys = (keys[:1], keys[1:]) if len(keys) > 1 else ([], keys)

    def label(row, which):
        return ", ".join(f"{_leaf(k)}={_value(row, k)}" for k in which)

    def place(row):
        return label(row, row_keys), label(row, col_keys)

    return ordered(place(r)[0] for r in rows), ordered(place(r)[1] for r in rows), place


def _font(size=13):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow built without FreeType: a fixed bitmap font
        return ImageFont.load_default()


def contact_sheet(rows: list[dict], keys: list[str], thumbs: dict[str, Image.Image]
                  ) -> Image.Image:
    row_labels, col_labels, place = _axes(rows, keys)
    font = _font()
    pad, head, side = 8, 34, (150 if any(row_labels) else 0)
    cell = THUMB + pad
    sheet = Image.new("RGB", (side + cell * len(col_labels) + pad,
                              head + cell * len(row_labels) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for j, label in enumerate(col_labels):
        draw.text((side + pad + j * cell, 10), label, fill="black", font=font)
    for i, label in enumerate(row_labels):
        draw.text((pad, head + i * cell + THUMB // 2), label, fill="black", font=font)
    for row in rows:
        r, c = place(row)
        x, y = side + pad + col_labels.index(c) * cell, head + row_labels.index(r) * cell
        if row["run_id"] in thumbs:
            sheet.paste(thumbs[row["run_id"]], (x, y))
        else:
            draw.rectangle((x, y, x + THUMB, y + THUMB), fill=(225, 225, 225))
            draw.text((x + 10, y + THUMB // 2), row["status"], fill="black", font=font)
    return sheet


def _fit(path, size: int) -> Image.Image:
    """The image scaled, up or down, so that its long side is `size` pixels."""
    with Image.open(path) as image:
        image = image.convert("RGB")
    scale = size / max(image.size)
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                        Image.Resampling.LANCZOS)


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


# --------------------------------------------------------------------------- the page


def _data_uri(png: bytes) -> str:
    return f"data:image/png;base64,{base64.b64encode(png).decode()}"


_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 20px; } h2 { font-size: 16px; margin-top: 28px; }
.grid { display: flex; flex-wrap: wrap; gap: 14px; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 8px; width: 260px; }
.card img { max-width: 100%; display: block; margin-bottom: 6px; }
.failed, .killed { border-color: #d33; }
.pending, .running, .interrupted { border-color: #e9a23b; }
table { border-collapse: collapse; } td { padding: 1px 8px 1px 0; }
.muted { color: #777; } .sheet { max-width: 100%; }
.strip { display: flex; gap: 2px; margin-bottom: 6px; } .strip img { width: 40px; margin: 0; }
"""


def _strip(row: dict, rel: Path) -> str:
    """A clip's frames done, STRIP of them spread evenly, each linked to its file."""
    done = _frames_done(row)
    if not done:
        return ""
    shown = min(STRIP, len(done))
    chosen = [done[round(i * (len(done) - 1) / max(1, shown - 1))] for i in range(shown)]
    cells = "".join(
        f'<a href="{html.escape(str(rel / "frames" / p.name))}" title="{p.stem}">'
        f'<img alt="frame {p.stem}" src="{_data_uri(_png_bytes(_fit(p, THUMB // 2)))}"></a>'
        for p in chosen)
    return f'<div class="strip">{cells}</div>'


def _card(row: dict, keys: list[str], thumb: Image.Image | None) -> str:
    e = html.escape
    rel = Path(row["folder"].path.name)
    clip = bool(row["frames_total"])
    target = rel / ("result.mp4" if clip else "result.png")
    picture = (f'<a href="{e(str(target))}"><img alt="result" '
               f'src="{_data_uri(_png_bytes(thumb))}"></a>' if thumb is not None else "")
    if clip:
        picture += _strip(row, rel)
    values = "".join(f"<tr><td>{e(_leaf(k))}</td><td>{e(_value(row, k))}</td></tr>"
                     for k in keys)
    losses = "".join(f"<tr><td>{term}</td><td>{row[term]:.4g}</td></tr>"
                     for term in ("total", "content", "style", "tv") if row[term] is not None)
    links = " · ".join(f'<a href="{e(str(rel / name))}">{name}</a>'
                       for name in ("result.mp4", "loss.png", "flicker.png", "metrics.json",
                                    "trace.jsonl", "config.yaml")
                       if (row["folder"].path / name).exists())
    seconds = f", {row['seconds']:.0f} s" if row["seconds"] else ""
    if clip:
        flicker = (row["folder"].read_metrics() or {}).get("warping_error")
        seconds += f", frames {row['frames_done']}/{row['frames_total']}" + (
            f", warping error {flicker:.3g}" if flicker is not None else "")
    error = f"<div>{e(row['error'])}</div>" if row["error"] else ""
    return (f'<div class="card {e(row["status"])}">{picture}<table>{values}{losses}</table>'
            f'<div class="muted">{e(row["run_id"])}<br>{e(row["status"])}, '
            f'{row["iterations"]} iterations{seconds}</div>{error}<div>{links}</div></div>')


def render_html(exp: Path, rows: list[dict], keys: list[str], thumbs: dict[str, Image.Image],
                sheet: Path, sheet_png: bytes) -> str:
    e = html.escape
    groups: dict[str, list[dict]] = {}
    for row in rows:  # grouped by the first swept key, the others shown on each card
        title = f"{_leaf(keys[0])} = {_value(row, keys[0])}" if keys else "runs"
        groups.setdefault(title, []).append(row)
    counts = ", ".join(f"{sum(r['status'] == s for r in rows)} {s}"
                       for s in sorted({r["status"] for r in rows}))
    sections = "".join(
        f"<h2>{e(title)}</h2><div class='grid'>"
        + "".join(_card(row, keys[1:] if keys else [], thumbs.get(row["run_id"]))
                  for row in group) + "</div>"
        for title, group in groups.items())
    swept = ", ".join(keys) if keys else "nothing"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{e(exp.name)}: style transfer report</title>
<style>{_STYLE}</style></head><body>
<h1>{e(exp.name)}</h1>
<p>{len(rows)} run(s): {e(counts)}. Swept: {e(swept)}. Table: <a href="runs.csv">runs.csv</a>.
Losses are the unweighted terms; total is the weighted sum.</p>
<a href="{e(sheet.name)}"><img class="sheet" alt="contact sheet" src="{_data_uri(sheet_png)}"></a>
{sections}
</body></html>
"""
