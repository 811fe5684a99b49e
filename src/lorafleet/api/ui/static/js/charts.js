// Hand-drawn SVG charts (no chart library): a line chart with axes, and a sparkline.
import { h, s } from "./dom.js";

export const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2"];

function ticks(lo, hi, n = 4) {
  if (lo === hi) return [lo];
  const raw = (hi - lo) / n;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((st) => st >= raw) || raw;
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(Number(v.toPrecision(12)));
  return out;
}

const label = (v) => (Math.abs(v) >= 1000 ? v.toExponential(1) : String(Number(v.toPrecision(4))));

/**
 * series: [{name, points: [[x, y], ...], color?}]; options: {title, width, height, xLabel, integerX, marks}
 * marks: [{x, label}] vertical markers (e.g. the live revision).
 */
export function lineChart(series, { title = "", width = 360, height = 180, xLabel = "", integerX = false,
  marks = [] } = {}) {
  const pts = series.flatMap((sr) => sr.points).filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y));
  const wrap = h("figure", { class: "chart" }, title ? h("figcaption", {}, title) : null);
  if (!pts.length) {
    wrap.append(h("p", { class: "muted" }, "no data yet"));
    return wrap;
  }
  const m = { l: 48, r: 10, t: 8, b: 28 };
  let [x0, x1] = [Math.min(...pts.map((p) => p[0])), Math.max(...pts.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...pts.map((p) => p[1])), Math.max(...pts.map((p) => p[1]))];
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  if (y0 === y1) { const d = Math.abs(y0) * 0.1 || 1; y0 -= d; y1 += d; }
  const pad = (y1 - y0) * 0.08;
  y0 -= pad; y1 += pad;
  const X = (x) => m.l + ((x - x0) / (x1 - x0)) * (width - m.l - m.r);
  const Y = (y) => height - m.b - ((y - y0) / (y1 - y0)) * (height - m.t - m.b);
  const rightHalf = (x) => X(x) > (m.l + width - m.r) / 2;
  const svg = s("svg", { viewBox: `0 0 ${width} ${height}`, width, height, role: "img", "aria-label": title });
  for (const t of ticks(y0, y1)) {
    svg.append(s("line", { x1: m.l, x2: width - m.r, y1: Y(t), y2: Y(t), class: "grid" }),
      s("text", { x: m.l - 4, y: Y(t) + 3, "text-anchor": "end", class: "tick" }, label(t)));
  }
  const xt = integerX ? ticks(x0, x1, Math.min(6, x1 - x0)).filter((v) => Number.isInteger(v)) : ticks(x0, x1);
  for (const t of xt) {
    svg.append(s("text", { x: X(t), y: height - m.b + 14, "text-anchor": "middle", class: "tick" }, label(t)));
  }
  svg.append(s("line", { x1: m.l, x2: width - m.r, y1: height - m.b, y2: height - m.b, class: "axis" }));
  if (xLabel) svg.append(s("text", { x: width - m.r, y: height - 2, "text-anchor": "end", class: "tick" }, xLabel));
  for (const mk of marks) {
    svg.append(s("line", { x1: X(mk.x), x2: X(mk.x), y1: m.t, y2: height - m.b, class: "mark" }),
      s("text", { x: X(mk.x) + (rightHalf(mk.x) ? -3 : 3), y: m.t + 9, "text-anchor": rightHalf(mk.x) ? "end" : "start",
        class: "tick mark-label" }, mk.label));
  }
  series.forEach((sr, i) => {
    const color = sr.color || COLORS[i % COLORS.length];
    const p = sr.points.filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y));
    if (!p.length) return;
    svg.append(s("polyline", { points: p.map(([x, y]) => `${X(x).toFixed(1)},${Y(y).toFixed(1)}`).join(" "),
      fill: "none", stroke: color, "stroke-width": 2 }));
    if (p.length <= 60) {
      for (const [x, y] of p) {
        svg.append(s("circle", { cx: X(x), cy: Y(y), r: 3, fill: color },
          s("title", {}, `${sr.name}: x=${label(x)} y=${label(y)}`)));
      }
    }
  });
  wrap.append(svg);
  if (series.length > 1) {
    wrap.append(h("div", { class: "legend" }, series.map((sr, i) =>
      h("span", {}, h("i", { style: { background: sr.color || COLORS[i % COLORS.length] } }), sr.name))));
  }
  return wrap;
}

/** A tiny line of the last values (no axes); `values` may contain nulls. */
export function sparkline(values, { width = 160, height = 36, color = COLORS[0] } = {}) {
  const svg = s("svg", { viewBox: `0 0 ${width} ${height}`, width, height, class: "spark" });
  const v = values.map((x) => (Number.isFinite(x) ? x : null));
  const finite = v.filter((x) => x != null);
  if (finite.length < 2) return svg;
  const hi = Math.max(...finite, 1e-9);
  const step = width / Math.max(1, v.length - 1);
  const pts = v.map((x, i) => (x == null ? null : `${(i * step).toFixed(1)},${(height - 2 - (x / hi) * (height - 4)).toFixed(1)}`))
    .filter(Boolean);
  svg.append(s("polyline", { points: pts.join(" "), fill: "none", stroke: color, "stroke-width": 1.5 }));
  return svg;
}
