"""Self-contained HTML pages (report.html, study.html, copa compare's view): inline CSS, inline
JavaScript and inline SVG charts, no file or network fetched, so a page opens offline and can
be mailed as one file. Pure functions from data to text; nothing heavy is imported.

A data table (`data_table`) is built in the browser from JSON held in the page: it sorts by any
column (click its header) and filters (a text box; a checkbox for rows marked wrong). Its
starting state can come from the address's #fragment (`#wrong=1&sort=score&desc=1`), which is
also how a test drives it without clicking.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from html import escape
from typing import Any

CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:0;color:#1b1b1b;
background:#fafafa}
main{max-width:1100px;margin:0 auto;padding:16px 24px 48px}
h1{font-size:22px;margin:8px 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid
#ddd;padding-bottom:4px}.note{color:#555;margin:4px 0 10px}
table{border-collapse:collapse;background:#fff;margin:6px 0;font-size:13px}
th,td{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f0f0f0;position:sticky;top:0}td.num,th.num{text-align:right;
font-variant-numeric:tabular-nums}table.sortable th{cursor:pointer;user-select:none}
th[data-dir=asc]::after{content:' \\25B2'}th[data-dir=desc]::after{content:' \\25BC'}
tr.wrong td{background:#fff3f3}.bad{color:#b71c1c;font-weight:600}.good{color:#1b5e20;
font-weight:600}.controls{margin:6px 0}.controls label{margin-right:14px}
pre.msg{white-space:pre-wrap;background:#fff;border:1px solid #ddd;border-left:4px solid #90a4ae;
padding:6px 10px;margin:4px 0 8px;font-size:12.5px}.role{font-weight:600;font-size:12px;
color:#455a64;text-transform:uppercase}svg{background:#fff;border:1px solid #e0e0e0}
.scroll{max-height:520px;overflow:auto;display:inline-block;max-width:100%}
"""

JS = r"""
(function(){
function params(){var out={};location.hash.replace(/^#/,'').split('&').forEach(function(p){
 if(!p)return;var kv=p.split('=');out[decodeURIComponent(kv[0])]=decodeURIComponent(kv[1]||'1');});
 return out;}
function key(cell){var v=cell.getAttribute('data-sort');if(v===null)v=cell.textContent;
 var n=parseFloat(v);return isNaN(n)||!/^\s*[-+]?[\d.]/.test(v)?v.toLowerCase():n;}
function sortBy(table,col,desc){var body=table.tBodies[0];if(!body)return;
 var rows=Array.prototype.slice.call(body.rows);rows.sort(function(a,b){
  var x=key(a.cells[col]),y=key(b.cells[col]);if(typeof x!==typeof y){x=String(x);y=String(y);}
  return (x<y?-1:x>y?1:0)*(desc?-1:1);});rows.forEach(function(r){body.appendChild(r);});
 Array.prototype.forEach.call(table.tHead.rows[0].cells,function(th,i){
  if(i===col)th.setAttribute('data-dir',desc?'desc':'asc');else th.removeAttribute('data-dir');});}
function makeSortable(table){Array.prototype.forEach.call(table.tHead.rows[0].cells,
 function(th,i){th.addEventListener('click',function(){
  sortBy(table,i,th.getAttribute('data-dir')==='asc');});});}
function build(table){var data=JSON.parse(document.getElementById(table.id+'-data').textContent);
 var head=document.createElement('thead'),hr=head.insertRow();
 data.columns.forEach(function(c){var th=document.createElement('th');th.textContent=c.label;
  if(c.num)th.className='num';th.setAttribute('data-key',c.key);hr.appendChild(th);});
 table.appendChild(head);var body=document.createElement('tbody');
 data.rows.forEach(function(row){var tr=body.insertRow();if(row._wrong)tr.className='wrong';
  data.columns.forEach(function(c){var td=tr.insertCell();var v=row[c.key];
   td.textContent=(v===null||v===undefined)?'':String(v);if(c.num)td.className='num';});});
 table.appendChild(body);table.setAttribute('data-rows',String(data.rows.length));}
function filter(table,text,wrongOnly){var shown=0;Array.prototype.forEach.call(
 table.tBodies[0].rows,function(tr){var ok=(!wrongOnly||tr.className==='wrong')&&
  (!text||tr.textContent.toLowerCase().indexOf(text.toLowerCase())>=0);
 tr.hidden=!ok;if(ok)shown++;});table.setAttribute('data-shown',String(shown));
 var count=document.getElementById(table.id+'-count');
 if(count)count.textContent=shown+' of '+table.tBodies[0].rows.length+' rows shown';}
document.addEventListener('DOMContentLoaded',function(){var p=params();
 Array.prototype.forEach.call(document.querySelectorAll('table.data'),function(t){build(t);});
 Array.prototype.forEach.call(document.querySelectorAll('table.sortable'),makeSortable);
 Array.prototype.forEach.call(document.querySelectorAll('table.data'),function(t){
  var box=document.getElementById(t.id+'-wrong'),text=document.getElementById(t.id+'-text');
  function apply(){filter(t,text?text.value:'',box?box.checked:false);}
  if(box){box.checked=p.wrong==='1';box.addEventListener('change',apply);}
  if(text){if(p.q)text.value=p.q;text.addEventListener('input',apply);}
  if(p.sort){var ths=t.tHead.rows[0].cells;for(var i=0;i<ths.length;i++){
   if(ths[i].getAttribute('data-key')===p.sort)sortBy(t,i,p.desc==='1');}}
  apply();});
 document.body.setAttribute('data-ready','1');});
})();
"""


def page(title: str, sections: Sequence[str], subtitle: str = "") -> str:
    """One HTML document: the title, then the sections in order."""
    sub = f'<p class="note">{escape(subtitle)}</p>' if subtitle else ""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
            f"<title>{escape(title)}</title><style>{CSS}</style><script>{JS}</script></head>"
            f"<body><main><h1>{escape(title)}</h1>{sub}" + "".join(sections)
            + "</main></body></html>\n")


def section(title: str, body: str, note: str = "", anchor: str | None = None) -> str:
    ident = f' id="{escape(anchor)}"' if anchor else ""
    shown = f'<p class="note">{escape(note)}</p>' if note else ""
    return f"<section{ident}><h2>{escape(title)}</h2>{shown}{body}</section>"


Cell = str | tuple[str, float | str | None]


def table(headers: Sequence[str], rows: Sequence[Sequence[Cell]], ident: str | None = None,
          numeric: Sequence[int] = (), sortable: bool = True) -> str:
    """A static table; a cell is text, or (text, sort key) when its text does not sort well
    (e.g. '33.8 [22.7, 44.0]' sorts by 33.8). Columns in `numeric` are right-aligned."""
    cls = ' class="sortable"' if sortable else ""
    ident_attr = f' id="{escape(ident)}"' if ident else ""
    head = "".join(f'<th{_num(i, numeric)}>{escape(h)}</th>' for i, h in enumerate(headers))
    body = []
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            text, key = (cell, None) if isinstance(cell, str) else cell
            sort = "" if key is None else f' data-sort="{escape(str(key))}"'
            cells.append(f"<td{_num(i, numeric)}{sort}>{escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f"<table{ident_attr}{cls}><thead><tr>{head}</tr></thead><tbody>"
            + "".join(body) + "</tbody></table>")


def _num(i: int, numeric: Sequence[int]) -> str:
    return ' class="num"' if i in numeric else ""


def json_script(ident: str, data: Any) -> str:
    """Data for the page's script; '</' escaped so no value can end the script element."""
    text = json.dumps(data, ensure_ascii=False, default=str).replace("</", "<\\/")
    return f'<script type="application/json" id="{escape(ident)}">{text}</script>'


def data_table(ident: str, columns: Sequence[Mapping[str, Any]],
               rows: Sequence[Mapping[str, Any]], wrong_filter: bool = True) -> str:
    """A table the page builds from JSON: sortable, a text filter, and (rows with `_wrong`
    true) a 'wrong answers only' checkbox. columns: {key, label, num?}."""
    controls = [f'<input id="{ident}-text" type="search" placeholder="filter rows">']
    if wrong_filter:
        controls.append(f'<label><input id="{ident}-wrong" type="checkbox"> wrong answers '
                        "only</label>")
    controls.append(f'<span id="{ident}-count" class="note"></span>')
    return (f'<div class="controls">{" ".join(controls)}</div>'
            + json_script(f"{ident}-data", {"columns": list(columns), "rows": list(rows)})
            + f'<div class="scroll"><table id="{escape(ident)}" class="data sortable">'
            "</table></div>")


def messages(chat: Sequence[Mapping[str, str]]) -> str:
    """Chat messages as sent: each role, then its text verbatim (whitespace kept)."""
    return "".join(f'<div class="role">{escape(m.get("role", ""))}</div>'
                   f'<pre class="msg">{escape(str(m.get("content", "")))}</pre>' for m in chat)


@dataclass
class Bar:
    """One value with its interval, in the chart's units (percent or points)."""

    label: str
    value: float | None
    lo: float | None = None
    hi: float | None = None
    color: str = "#90a4ae"


def interval_chart(groups: Sequence[tuple[str, Sequence[Bar]]], low: float = 0.0,
                   high: float = 100.0, unit: str = "%", bars: bool = True,
                   width: int = 760, height: int = 300) -> str:
    """Grouped bars (or points, bars=False) with interval whiskers, as inline SVG. A value of
    None is drawn as 'n/a'. A range that crosses 0 gets a zero line."""
    left, right, top, bottom = 52, 12, 14, 58
    inner_w, inner_h = width - left - right, height - top - bottom
    span = (high - low) or 1.0

    def y(v: float) -> float:
        return top + inner_h * (1 - (min(max(v, low), high) - low) / span)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img">']
    for i in range(6):  # grid lines and tick labels
        v = low + span * i / 5
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y(v):.1f}" y2="{y(v):.1f}" '
                     'stroke="#eee"/>'
                     f'<text x="{left - 6}" y="{y(v) + 4:.1f}" font-size="11" '
                     f'text-anchor="end">{v:.0f}{escape(unit)}</text>')
    if low < 0 < high:
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y(0):.1f}" y2="{y(0):.1f}" '
                     'stroke="#333"/>')
    slot = inner_w / max(len(groups), 1)
    for g, (name, entries) in enumerate(groups):
        x0 = left + g * slot
        parts.append(f'<text x="{x0 + slot / 2:.1f}" y="{height - bottom + 16}" font-size="12" '
                     f'text-anchor="middle">{escape(name)}</text>')
        n = max(len(entries), 1)
        each = min(slot * 0.8 / n, 60)
        start = x0 + (slot - each * n) / 2
        for b, bar in enumerate(entries):
            cx = start + each * (b + 0.5)
            if bar.value is None:
                parts.append(f'<text x="{cx:.1f}" y="{y(low) - 4:.1f}" font-size="10" '
                             'text-anchor="middle">n/a</text>')
                continue
            base = 0.0 if low <= 0 <= high else low
            if bars:
                top_y, bot_y = sorted((y(bar.value), y(base)))
                parts.append(f'<rect x="{cx - each * 0.42:.1f}" y="{top_y:.1f}" '
                             f'width="{each * 0.84:.1f}" height="{max(bot_y - top_y, 0.5):.1f}" '
                             f'fill="{bar.color}"><title>{escape(bar.label)}: '
                             f'{bar.value:.1f}</title></rect>')
            else:
                parts.append(f'<circle cx="{cx:.1f}" cy="{y(bar.value):.1f}" r="4.5" '
                             f'fill="{bar.color}"><title>{escape(bar.label)}: '
                             f'{bar.value:+.1f}</title></circle>')
            if bar.lo is not None and bar.hi is not None:
                parts.append(f'<path d="M{cx:.1f},{y(bar.lo):.1f}V{y(bar.hi):.1f}'
                             f'M{cx - 5:.1f},{y(bar.lo):.1f}h10M{cx - 5:.1f},{y(bar.hi):.1f}h10" '
                             'stroke="#222" fill="none"/>')
            shown = f"{bar.value:.1f}" if bars else f"{bar.value:+.1f}"
            label_y = min(y(bar.value), y(bar.hi) if bar.hi is not None else 1e9) - 4
            parts.append(f'<text x="{cx:.1f}" y="{label_y:.1f}" font-size="10" '
                         f'text-anchor="middle">{shown}</text>')
    labels = list(dict.fromkeys((bar.label, bar.color) for _, e in groups for bar in e))
    if any(len(e) > 1 for _, e in groups):  # several bars a group (compare's runs): a legend
        x = left
        for text, color in labels:
            parts.append(f'<rect x="{x}" y="{height - 22}" width="10" height="10" '
                         f'fill="{color}"/><text x="{x + 14}" y="{height - 13}" '
                         f'font-size="11">{escape(text)}</text>')
            x += 24 + 7 * len(text)
    parts.append("</svg>")
    return "".join(parts)


def line_chart(series: Mapping[str, Sequence[tuple[float, float]]], xlabel: str,
               ylabel: str, width: int = 760, height: int = 280) -> str:
    """Lines through (x, y) points as inline SVG (a training loss curve), one color per
    series, with a legend."""
    colors = ["#1e88e5", "#e53935", "#43a047", "#fb8c00", "#8e24aa"]
    points = [p for values in series.values() for p in values]
    left, right, top, bottom = 56, 12, 12, 44
    if not points:
        return '<p class="note">no points to draw</p>'
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x_lo, x_hi = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y_lo, y_hi = min(0.0, min(ys)), max(ys) * 1.05 if max(ys) > 0 else 1.0
    inner_w, inner_h = width - left - right, height - top - bottom

    def px(x: float) -> float:
        return left + inner_w * (x - x_lo) / (x_hi - x_lo)

    def py(v: float) -> float:
        return top + inner_h * (1 - (v - y_lo) / ((y_hi - y_lo) or 1.0))

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img">']
    for i in range(5):
        v = y_lo + (y_hi - y_lo) * i / 4
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{py(v):.1f}" '
                     f'y2="{py(v):.1f}" stroke="#eee"/><text x="{left - 6}" y="{py(v) + 4:.1f}" '
                     f'font-size="11" text-anchor="end">{v:.3g}</text>')
    for i in range(5):
        v = x_lo + (x_hi - x_lo) * i / 4
        parts.append(f'<text x="{px(v):.1f}" y="{height - bottom + 16}" font-size="11" '
                     f'text-anchor="middle">{v:.4g}</text>')
    parts.append(f'<text x="{left + inner_w / 2:.1f}" y="{height - 8}" font-size="12" '
                 f'text-anchor="middle">{escape(xlabel)}</text><text x="14" '
                 f'y="{top + inner_h / 2:.1f}" font-size="12" text-anchor="middle" '
                 f'transform="rotate(-90 14 {top + inner_h / 2:.1f})">{escape(ylabel)}</text>')
    for i, (name, values) in enumerate(series.items()):
        color = colors[i % len(colors)]
        path = " ".join(f"{'M' if j == 0 else 'L'}{px(x):.1f},{py(v):.1f}"
                        for j, (x, v) in enumerate(values))
        parts.append(f'<path d="{path}" stroke="{color}" stroke-width="1.8" fill="none"/>')
        parts.extend(f'<circle cx="{px(x):.1f}" cy="{py(v):.1f}" r="2.2" fill="{color}"/>'
                     for x, v in values)
        parts.append(f'<rect x="{width - right - 150}" y="{top + 4 + 16 * i}" width="10" '
                     f'height="10" fill="{color}"/><text x="{width - right - 136}" '
                     f'y="{top + 13 + 16 * i}" font-size="11">{escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)
