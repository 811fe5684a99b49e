// Adapter page: revision timeline with aliases and provenance, metrics per revision (charts), audit log,
// and the actions: promote through the gate, roll back, pin in the engine's residency, forget the user.
import { api, ApiError, refPath } from "./api.js";
import { confirmAction, fmtBytes, fmtNum, fmtTime, h, short, toast } from "./dom.js";
import { lineChart } from "./charts.js";
import { state } from "./app.js";

const PREFERRED = ["adherence", "eval_loss", "probe_ppl_ratio", "probe_retention"];
const BASELINE = { adherence: "base_adherence", eval_loss: "base_eval_loss" };

function numericKeys(revs) {
  const keys = new Set();
  for (const r of revs) {
    for (const [k, v] of Object.entries(r.provenance.metrics || {})) if (typeof v === "number" && Number.isFinite(v)) keys.add(k);
  }
  const ordered = PREFERRED.filter((k) => keys.has(k));
  const rest = [...keys].filter((k) => !ordered.includes(k) && !Object.values(BASELINE).includes(k)).sort();
  return [...ordered, ...rest].slice(0, 6);
}

function parentChain(rev, byNumber) {
  const chain = [];
  let cur = rev;
  const seen = new Set();
  while (cur && cur.provenance.parent != null && !seen.has(cur.number)) {
    seen.add(cur.number);
    chain.push(`#${cur.provenance.parent}`);
    cur = byNumber.get(cur.provenance.parent);
  }
  return chain.length ? `#${rev.number} ← ${chain.join(" ← ")}` : "none (trained from the base)";
}

const CONDITION_LABELS = {
  base: "base", in_context: "base + in-context", retrieval: "base + retrieval (BM25)",
  adapter: "adapter", adapter_in_context: "adapter + in-context",
};

// The baselines `lorafleet eval` stored on a revision (metrics.baselines): one row per condition, same prompts.
export function baselinesTable(report) {
  const pct = (x) => (x == null ? "–" : `${Math.round(100 * x)}%`);
  const num = (x, d) => (x == null ? "–" : fmtNum(x, d));
  const rows = Object.entries(report.rows || {});
  return h("table", { class: "list", id: "baselines-table" },
    h("thead", {}, h("tr", {}, ["condition", "adherence", "held-out loss", "probe retention", "prompt tokens",
      "tok/s", "TTFT ms"].map((c) => h("th", {}, c)))),
    h("tbody", {}, rows.map(([c, r]) => h("tr", { dataset: { condition: c } },
      h("td", {}, CONDITION_LABELS[c] || c), h("td", {}, pct(r.adherence)), h("td", {}, num(r.eval_loss, 3)),
      h("td", {}, pct(r.probe_retention)), h("td", {}, num(r.prompt_tokens, 0)), h("td", {}, num(r.tok_s, 1)),
      h("td", {}, num(r.ttft_ms, 0))))));
}

function kv(rows) {
  return h("table", { class: "kv" }, rows.map(([k, v]) => h("tr", {}, h("th", {}, k), h("td", {}, v))));
}

export function adapterView(ref) {
  const [tenant, user] = ref.split("/");
  const controller = new AbortController();
  const signal = controller.signal;
  const base = `/v1/adapters/${refPath(ref)}`;
  const uiBase = `/ui/api/adapters/${refPath(ref)}`;
  let capabilities = {};
  const head = h("section", { class: "card", id: "adapter-head" }, h("h2", {}, ref), h("p", { class: "muted" }, "loading…"));
  const charts = h("section", { class: "card" }, h("h3", {}, "evaluation metrics per revision"), h("div", { class: "charts", id: "charts" }));
  const baselines = h("section", { class: "card", id: "baselines", hidden: true });
  const timeline = h("ol", { class: "timeline", id: "timeline" });
  const auditBody = h("tbody", { id: "audit-rows" });
  const el = h("div", { class: "adapter" }, h("p", {}, h("a", { href: `#/?q=${encodeURIComponent(`${tenant}/${user}/`)}` }, `← ${tenant}/${user}`)),
    head, charts, baselines,
    h("div", { class: "two" },
      h("section", { class: "card" }, h("h3", {}, "revisions"), timeline),
      h("section", { class: "card" }, h("h3", {}, "audit log"), h("table", { class: "list" },
        h("thead", {}, h("tr", {}, ["when", "action", "alias", "move", "actor", "reason"].map((c) => h("th", {}, c)))),
        auditBody))));

  async function act(fn, okMessage) {
    try {
      const result = await fn();
      toast(okMessage(result), "ok");
    } catch (e) {
      toast(e instanceof ApiError ? e.message : String(e), "error");
    }
    await load();
  }

  async function rollback(to) {
    const what = to ? `move live to revision #${to}` : "move live back to the previous live revision";
    const c = await confirmAction("Roll back?", `${ref}: ${what}. Requests switch at once.`, { okLabel: "Roll back", danger: true });
    if (!c.ok) return;
    await act(() => api(`${base}/rollback`, { method: "POST", body: { to: to || null, reason: c.reason || "rollback from the dashboard" } }),
      (e) => `live moved #${e.from_number} → #${e.to_number}`);
  }

  async function promote(number, force = false) {
    const c = await confirmAction(force ? "Force promotion?" : "Promote through the gate?",
      force ? `${ref}#${number} goes live WITHOUT the gate (audited as forced).`
        : `${ref}#${number} goes live only if the gate's rule holds (competence kept, better than live); a refusal is audited.`,
      { okLabel: force ? "Force" : "Run the gate", danger: force });
    if (!c.ok) return;
    await act(() => api(`${uiBase}/promote`, { method: "POST", body: { number, force, reason: c.reason } }),
      (d) => `${d.promoted ? "promoted" : "refused"}: ${d.reason}`);
  }

  async function pin(pinned) {
    const c = await confirmAction(pinned ? "Pin the live revision?" : "Unpin?",
      pinned ? `Keep ${ref}'s live revision resident in this server's RAM (not persisted across restarts).`
        : `Let ${ref}'s live revision be evicted again.`, { reason: false, okLabel: pinned ? "Pin" : "Unpin" });
    if (!c.ok) return;
    await act(() => api(`${uiBase}/pin`, { method: "POST", body: { pinned } }),
      (r) => `${pinned ? "pinned" : "unpinned"} #${r.number}`);
  }

  async function forget() {
    const c = await confirmAction(`Forget user ${tenant}/${user}?`,
      `Deletes every adapter, revision and training record of ${tenant}/${user}. This cannot be undone.`,
      { okLabel: "Forget", danger: true, reason: false });
    if (!c.ok) return;
    try {
      const path = capabilities.forget_path.replace("{tenant}", encodeURIComponent(tenant))
        .replace("{user}", encodeURIComponent(user));
      await api(path, { method: "DELETE" });
      toast(`forgot ${tenant}/${user}`, "ok");
      location.hash = `#/?q=${encodeURIComponent(`${tenant}/`)}`;
    } catch (e) {
      toast(e.message, "error");
    }
  }

  function renderHead(info, residency, caps) {
    const live = info.aliases.live;
    const forgetBtn = caps.forget
      ? h("button", { id: "act-forget", class: "danger", onclick: forget }, `forget ${tenant}/${user}`)
      : h("span", { class: "tooltip-wrap", title: "forget: not available in this build" },
        h("button", { id: "act-forget", class: "danger", disabled: true }, `forget ${tenant}/${user}`));
    const tier = residency.tier
      ? h("span", { class: `chip tier-${residency.tier}`, id: "tier" }, `live is ${residency.tier === "slot" ? "in a compute slot" : residency.tier === "ram" ? "in RAM" : residency.tier}${residency.pinned ? " · pinned" : ""}`)
      : null;
    head.replaceChildren(...[
      h("h2", {}, ref, " ", h("span", { id: "aliases" }, Object.entries(info.aliases).sort().map(([a, n]) =>
        h("span", { class: `chip alias-${a}`, dataset: { alias: a, number: n } }, `${a} #${n}`))), " ", tier),
      info.description ? h("p", {}, info.description) : null,
      h("p", { class: "muted" }, `created ${fmtTime(info.created_at)} by ${info.creator || "–"} · ${info.latest || 0} revision(s)`),
      h("div", { class: "actions" },
        h("button", { id: "act-rollback", disabled: live == null, onclick: () => rollback(null) }, "roll back live"),
        h("button", { id: "act-pin", disabled: live == null || !caps.pin, onclick: () => pin(!residency.pinned) },
          residency.pinned ? "unpin live" : "pin live"),
        h("a", { class: "button", href: `#/playground?models=${encodeURIComponent(ref)}` }, "try in playground"),
        forgetBtn)].filter(Boolean));
  }

  function renderCharts(revs) {
    const box = charts.querySelector("#charts");
    const keys = numericKeys(revs);
    const live = revs.find((r) => r.aliases.includes("live"));
    const marks = live ? [{ x: live.number, label: "live" }] : [];
    if (!keys.length) {
      box.replaceChildren(h("p", { class: "muted" }, "no evaluation metrics yet (run `lorafleet eval`)"));
      return;
    }
    const asc = [...revs].sort((a, b) => a.number - b.number);
    box.replaceChildren(...keys.map((k) => {
      const series = [{ name: k, points: asc.map((r) => [r.number, r.provenance.metrics[k]]) }];
      if (BASELINE[k]) series.push({ name: "base", points: asc.map((r) => [r.number, r.provenance.metrics[BASELINE[k]]]), color: "#9ca3af" });
      return lineChart(series, { title: k, xLabel: "revision", integerX: true, marks });
    }));
  }

  function renderBaselines(revs) {
    const rev = revs.find((r) => r.provenance.metrics && r.provenance.metrics.baselines && r.provenance.metrics.baselines.rows);
    if (!rev) {
      baselines.hidden = true;
      baselines.replaceChildren();
      return;
    }
    const report = rev.provenance.metrics.baselines;
    const rows = report.rows;
    const saved = rows.in_context && rows.adapter ? rows.in_context.prompt_tokens - rows.adapter.prompt_tokens : null;
    baselines.hidden = false;
    baselines.replaceChildren(
      h("h3", {}, `revision #${rev.number} against the prompt baselines (same held-out prompts, k=${report.k})`),
      saved != null ? h("p", { class: "muted", id: "baselines-saved" },
        `the adapter saves ${fmtNum(saved, 0)} prompt tokens per request against the in-context profile` +
        (report.token_ratio ? ` (${fmtNum(report.token_ratio, 1)}× fewer)` : "")) : null,
      baselinesTable(report));
  }

  function renderTimeline(info, revs) {
    const byNumber = new Map(revs.map((r) => [r.number, r]));
    const live = info.aliases.live;
    timeline.replaceChildren(...revs.map((r) => {
      const p = r.provenance;
      const m = p.metrics || {};
      const gate = m.gate;
      const details = h("details", {}, h("summary", {}, "provenance"), kv([
        ["digest", h("code", {}, r.digest)],
        ["base fingerprint", h("code", {}, p.base_fingerprint)],
        ["parent chain", parentChain(r, byNumber)],
        ["parent digest", p.parent_digest ? h("code", {}, short(p.parent_digest, 16)) : "–"],
        ["data digest", p.dataset_digest ? h("code", {}, p.dataset_digest) : "–"],
        ["examples", fmtNum(p.example_count)],
        ["method", p.method],
        ["hyperparameters", h("pre", {}, JSON.stringify(p.hyperparams, null, 1))],
        ["code version", p.code_version],
        ["creator", p.creator],
        ["produced", fmtTime(p.created_at)],
        ["metrics", h("pre", {}, JSON.stringify(Object.fromEntries(Object.entries(m).filter(([k]) => k !== "gate")), null, 1))],
      ]));
      return h("li", { class: r.number === live ? "rev live" : "rev", dataset: { number: r.number } },
        h("div", { class: "rev-head" }, h("strong", {}, `#${r.number}`), " ",
          r.aliases.map((a) => h("span", { class: `chip alias-${a}` }, a)), " ",
          h("span", { class: "muted" }, `${fmtTime(r.created_at)} · ${p.method} · ${fmtBytes(r.size)} · ${short(r.digest)}`)),
        h("div", { class: "rev-metrics" },
          m.adherence != null ? `adherence ${fmtNum(m.adherence, 2)} ` : "",
          m.eval_loss != null ? `· loss ${fmtNum(m.eval_loss, 4)} ` : "",
          m.probe_ppl_ratio != null ? `· probe ppl ×${fmtNum(m.probe_ppl_ratio, 3)}` : ""),
        gate ? h("div", { class: `gate gate-${gate.decision}` }, `gate ${gate.decision}: ${gate.reason}`) : null,
        h("div", { class: "rev-actions" },
          r.number !== live ? h("button", { class: "small", dataset: { action: "promote" }, onclick: () => promote(r.number) }, "promote (gate)") : null,
          r.number !== live ? h("button", { class: "small", dataset: { action: "force" }, onclick: () => promote(r.number, true) }, "force") : null,
          r.number !== live && live != null ? h("button", { class: "small", dataset: { action: "rollback" }, onclick: () => rollback(r.number) }, `roll back to #${r.number}`) : null),
        details);
    }));
    if (!revs.length) timeline.replaceChildren(h("li", { class: "muted" }, "no revisions yet"));
  }

  function renderAudit(entries) {
    auditBody.replaceChildren(...entries.map((e) => h("tr", {},
      h("td", { class: "muted" }, fmtTime(e.at)), h("td", {}, e.action), h("td", {}, e.alias || "–"),
      h("td", {}, `${e.from_number == null ? "∅" : `#${e.from_number}`} → ${e.to_number == null ? "∅" : `#${e.to_number}`}`),
      h("td", {}, e.actor), h("td", { class: "reason" }, e.reason))));
    if (!entries.length) auditBody.replaceChildren(h("tr", {}, h("td", { colspan: 6, class: "muted" }, "no entries")));
  }

  async function load() {
    try {
      const [info, revs, audit, residency, [, caps]] = await Promise.all([
        api(base, { signal }), api(`${base}/revisions`, { signal }), api(`${base}/audit?limit=200`, { signal }),
        api(`${uiBase}/residency`, { signal }), state.ready]);
      const newestFirst = [...revs.data].sort((a, b) => b.number - a.number);
      capabilities = caps;
      renderHead(info, residency, caps);
      renderCharts(newestFirst);
      renderBaselines(newestFirst);
      renderTimeline(info, newestFirst);
      renderAudit(audit.data);
      document.body.dataset.adapterLoaded = String(Date.now());
    } catch (e) {
      if (e.name === "AbortError") return;
      head.replaceChildren(h("h2", {}, ref), h("p", { class: "error" }, e.message));
    }
  }

  load();
  return { el, cleanup: () => controller.abort() };
}
