// Small DOM helpers. Data is always inserted as text nodes (never innerHTML): adapter names,
// reasons and model answers are user-controlled.

const SVG_NS = "http://www.w3.org/2000/svg";

function build(el, attrs, children, svg) {
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v == null || v === false) continue;
    if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
    else if (k === "class" && !svg) el.className = v;
    else if (k === "style") Object.assign(el.style, v); // CSSOM: allowed by the page's CSP
    else if (k === "dataset") Object.assign(el.dataset, v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c == null || c === false) continue;
    el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

export const h = (tag, attrs, ...children) => build(document.createElement(tag), attrs, children, false);
export const s = (tag, attrs, ...children) => build(document.createElementNS(SVG_NS, tag), attrs, children, true);
export const $ = (sel, root = document) => root.querySelector(sel);
export const $$ = (sel, root = document) => [...root.querySelectorAll(sel)];

export function fmtNum(x, digits = 0) {
  if (x == null || Number.isNaN(x)) return "–";
  return Number(x).toLocaleString("en-US", { maximumFractionDigits: digits, minimumFractionDigits: digits });
}

export function fmtPct(x, digits = 0) {
  return x == null ? "–" : `${(100 * x).toFixed(digits)}%`;
}

export function fmtBytes(n) {
  if (n == null) return "–";
  const units = ["B", "KB", "MB", "GB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

export function fmtTime(iso) {
  if (!iso) return "–";
  const d = new Date(iso);
  return d.toISOString().replace("T", " ").slice(0, 19) + "Z";
}

export const short = (digest, n = 12) => (digest ? `${digest.slice(0, n)}…` : "–");

export function toast(message, kind = "info") {
  const el = $("#toast");
  el.replaceChildren(h("div", { class: `toast ${kind}` }, message));
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => el.replaceChildren(), kind === "error" ? 10000 : 6000);
}

/** Ask for confirmation in the page's <dialog>; resolves to {ok, reason}. */
export function confirmAction(title, text, { reason = true, okLabel = "Confirm", danger = false } = {}) {
  const dlg = $("#confirm");
  $("#confirm-title").textContent = title;
  $("#confirm-text").textContent = text;
  $("#confirm-reason-label").hidden = !reason;
  $("#confirm-reason").value = "";
  const ok = $("#confirm-ok");
  ok.textContent = okLabel;
  ok.classList.toggle("danger", danger);
  return new Promise((resolve) => {
    dlg.addEventListener("close", () => resolve({ ok: dlg.returnValue === "ok", reason: $("#confirm-reason").value }),
      { once: true });
    dlg.returnValue = "";
    dlg.showModal();
  });
}
