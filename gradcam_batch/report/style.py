"""The page's style sheet, inlined in its <head>: the page fetches nothing."""

CSS = """
:root { --ink: #1d2330; --muted: #5d6575; --line: #dde1e8; --soft: #f4f6f9; --accent: #2952a3; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--ink);
       background: #fff; }
main { max-width: 1200px; margin: 0 auto; padding: 24px 28px 60px; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 18px; margin: 36px 0 8px; padding-bottom: 4px; border-bottom: 2px solid var(--line); }
p.lead, p.note { color: var(--muted); margin: 4px 0 12px; }
p.warn, div.warn { background: #fff6e0; border: 1px solid #f0d58c; padding: 6px 10px; border-radius: 4px;
       margin: 8px 0; }
div.warn p, div.warn ul { margin: 2px 0; }
div.alarm { background: #fdecea; border: 2px solid #c62828; color: #7f1010; padding: 10px 14px; border-radius: 6px;
       margin: 12px 0; font-size: 15px; }
nav { margin: 8px 0 0; font-size: 13px; }
nav a { color: var(--accent); text-decoration: none; margin-right: 14px; }
table { border-collapse: collapse; margin: 6px 0; font-variant-numeric: tabular-nums; }
th, td { border-bottom: 1px solid var(--line); padding: 5px 10px; text-align: left; vertical-align: top; }
thead th { background: var(--soft); font-weight: 600; position: sticky; top: 0; }
table.kv th { width: 190px; background: var(--soft); font-weight: 600; }
td.num, th.num { text-align: right; }
td.msg { max-width: 520px; overflow-wrap: anywhere; color: var(--muted); }
code { font: 12px ui-monospace, SFMono-Regular, Menlo, monospace; background: var(--soft); padding: 1px 4px;
       border-radius: 3px; overflow-wrap: anywhere; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(132px, 1fr)); gap: 12px; }
.grid.means { grid-template-columns: repeat(auto-fill, minmax(112px, 1fr)); gap: 10px; }
figure { margin: 0; border: 1px solid var(--line); border-radius: 6px; overflow: hidden; background: #fff; }
figure img { display: block; width: 100%; height: auto; aspect-ratio: 1 / 1; background: var(--soft); }
figure.missing div.blank { aspect-ratio: 1 / 1; background: var(--soft); display: flex; align-items: center;
       justify-content: center; color: var(--muted); font-size: 12px; padding: 8px; text-align: center; }
figcaption { padding: 6px 8px 8px; font-size: 12px; line-height: 1.35; }
figcaption .id { font-weight: 600; display: block; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
figcaption .id:hover, figcaption .id:focus { white-space: normal; overflow-wrap: anywhere; }
figure.wrong { border: 2px solid #c62828; }
figcaption .wrong { color: #fff; background: #c62828; font-weight: 600; padding: 0 5px; border-radius: 3px;
       display: inline-block; margin-bottom: 2px; }
figcaption .d { display: inline-block; margin-right: 8px; white-space: nowrap; }
figcaption .why { color: #a05a00; display: block; }
.means figure img { image-rendering: auto; }
.legend { display: flex; align-items: center; gap: 8px; color: var(--muted); font-size: 12px; margin: 4px 0 10px; }
.legend img { width: 160px; height: 12px; border-radius: 2px; }
footer { margin-top: 40px; color: var(--muted); font-size: 12px; }
h3 { font-size: 16px; margin: 28px 0 6px; }
h4 { font-size: 13px; margin: 0 0 2px; }
section.strategy { border-top: 1px solid var(--line); margin-top: 18px; }
.strategy-top { display: flex; flex-wrap: wrap; gap: 18px; align-items: flex-start; }
figure.embedding { flex: 0 0 322px; }
figure.embedding svg { display: block; }
.swatch { display: inline-block; width: 10px; height: 10px; border-radius: 50%; margin-right: 4px; }
.key { margin-right: 8px; white-space: nowrap; }
.clusters { display: flex; gap: 14px; overflow-x: auto; padding: 8px 0; }
.cluster { flex: 0 0 250px; }
.cluster figure img.cluster-mean { image-rendering: auto; }
.grid.exemplars { grid-template-columns: repeat(2, 1fr); gap: 8px; margin-top: 8px; }
.grid.pairs { grid-template-columns: repeat(auto-fill, minmax(264px, 1fr)); }
div.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 2px; }
td.low { color: #a02020; font-weight: 600; }
"""
