// Fleet overview: totals, live throughput / queue / residency tiers (polled), tenants -> users -> adapters
// (keyset pagination and prefix search on the registry's index; nothing here counts the whole fleet per page).
import { api, query, refPath } from "./api.js";
import { $, fmtNum, fmtPct, fmtTime, h } from "./dom.js";
import { sparkline } from "./charts.js";

const PAGE = 50;
const POLL_MS = 2000;

function aliasChips(aliases) {
  return Object.entries(aliases).sort().map(([name, n]) => h("span", { class: `chip alias-${name}` }, `${name} #${n}`));
}

function stat(id, label) {
  return h("div", { class: "stat" }, h("div", { class: "stat-label" }, label), h("div", { class: "stat-value", id }, "…"));
}

export function overviewView(params) {
  const timers = [];
  const controller = new AbortController();
  const signal = controller.signal;
  let prefix = params.get("q") || "";
  let cursors = [null]; // cursors[i] = the cursor that loads page i
  let page = 0;
  const series = { tokens: [], queue: [] };
  let totals = null;

  const search = h("input", { id: "search", type: "search", placeholder: "search by prefix: tenant/ · tenant/user/ · tenant/user/ad",
    value: prefix, autocomplete: "off", spellcheck: "false" });
  const tbody = h("tbody", { id: "adapter-rows" });
  const pager = h("div", { class: "pager" });
  const status = h("span", { class: "muted", id: "list-status" });
  const tenantsBox = h("ul", { class: "names", id: "tenants" });
  const usersBox = h("ul", { class: "names", id: "users" });
  const usersTitle = h("h3", {}, "users");

  const el = h("div", { class: "overview" },
    h("section", { class: "cards" },
      h("div", { class: "card" }, h("h3", {}, "fleet"), h("div", { class: "stats" },
        stat("t-tenants", "tenants"), stat("t-users", "users"), stat("t-adapters", "adapters"), stat("t-live", "live")),
      h("p", { class: "muted small", id: "t-note" }, "")),
      h("div", { class: "card" }, h("h3", {}, "serving"), h("div", { class: "stats" },
        stat("l-tokens", "tokens/s"), stat("l-requests", "requests/s"), stat("l-queue", "queue depth"),
        stat("l-running", "running")),
      h("div", { class: "sparks" }, h("span", { class: "muted small" }, "tokens/s"), h("span", { id: "spark-tokens" }),
        h("span", { class: "muted small" }, "queue"), h("span", { id: "spark-queue" }))),
      h("div", { class: "card" }, h("h3", {}, "residency"), h("div", { class: "stats" },
        stat("r-slots", "in slots"), stat("r-ram", "in RAM"), stat("r-cold", "cold"), stat("r-pinned", "pinned")),
      h("div", { class: "bars", id: "hit-rates" })),
      h("div", { class: "card" }, h("h3", {}, "training jobs"), h("div", { class: "stats", id: "jobs-by-state" }),
        h("a", { href: "#/jobs" }, "all jobs →"))),
    h("section", { class: "browse" },
      h("aside", { class: "card" }, h("h3", {}, "tenants"), tenantsBox, usersTitle, usersBox),
      h("div", { class: "card grow" },
        h("div", { class: "toolbar" }, search, status),
        h("table", { class: "list" },
          h("thead", {}, h("tr", {}, h("th", {}, "adapter"), h("th", {}, "aliases"), h("th", {}, "latest"),
            h("th", {}, "created"))), tbody),
        pager)));

  // ---- adapters: one keyset page at a time ---------------------------------------------------------------
  let listSeq = 0;
  async function loadPage() {
    const seq = ++listSeq;
    status.textContent = "loading…";
    const t0 = performance.now();
    let data;
    try {
      data = await api(`/v1/adapters${query({ prefix, limit: PAGE, cursor: cursors[page] })}`, { signal });
    } catch (e) {
      if (e.name === "AbortError" || seq !== listSeq) return;
      tbody.replaceChildren(h("tr", {}, h("td", { colspan: 4, class: "error" }, e.message)));
      status.textContent = "";
      return;
    }
    if (seq !== listSeq) return;
    cursors[page + 1] = data.next_cursor;
    tbody.replaceChildren(...data.data.map((a) => h("tr", { dataset: { ref: a.ref } },
      h("td", {}, h("a", { href: `#/adapter/${refPath(a.ref)}` }, a.ref)),
      h("td", {}, aliasChips(a.aliases)), h("td", {}, a.latest ? `#${a.latest}` : "–"),
      h("td", { class: "muted" }, fmtTime(a.created_at)))));
    if (!data.data.length) {
      tbody.replaceChildren(h("tr", {}, h("td", { colspan: 4, class: "muted" }, prefix ? `nothing starts with “${prefix}”` : "no adapters yet")));
    }
    if (!performance.getEntriesByName("lf:rows").length) {
      performance.mark("lf:rows");
      document.body.dataset.rowsRenderedMs = performance.now().toFixed(1);
    }
    status.textContent = `page ${page + 1} · ${data.data.length} rows · ${(performance.now() - t0).toFixed(0)} ms`;
    pager.replaceChildren(
      h("button", { id: "prev", disabled: page === 0, onclick: () => { page--; loadPage(); } }, "← previous"),
      h("button", { id: "next", disabled: !data.next_cursor, onclick: () => { page++; loadPage(); } }, "next →"));
  }

  let debounce = null;
  search.addEventListener("input", () => {
    clearTimeout(debounce);
    debounce = setTimeout(() => setPrefix(search.value.trim(), false), 200);
  });
  function setPrefix(p, updateInput = true) {
    prefix = p;
    if (updateInput) search.value = p;
    cursors = [null];
    page = 0;
    history.replaceState(null, "", p ? `#/?q=${encodeURIComponent(p)}` : "#/");
    loadPage();
  }

  // ---- tenants and users (skip scan) ----------------------------------------------------------------------
  async function loadNames(box, url, onPick, after = null) {
    const data = await api(`${url}${query({ after, limit: 25 })}`, { signal });
    box.querySelector(".more")?.remove();
    if (!after) box.replaceChildren();
    box.append(...data.data.map((name) => h("li", {}, h("button", { class: "link", onclick: () => onPick(name) }, name))));
    if (data.next_after) {
      box.append(h("li", { class: "more" }, h("button", { class: "link muted",
        onclick: () => loadNames(box, url, onPick, data.next_after) }, "more…")));
    }
    if (!data.data.length && !after) box.append(h("li", { class: "muted" }, "none"));
  }
  function pickTenant(t) {
    setPrefix(`${t}/`);
    usersTitle.textContent = `users of ${t}`;
    loadNames(usersBox, `/ui/api/tenants/${encodeURIComponent(t)}/users`, (u) => setPrefix(`${t}/${u}/`)).catch(() => {});
  }

  // ---- live numbers -------------------------------------------------------------------------------------
  async function loadTotals() {
    try {
      totals = await api("/ui/api/summary", { signal });
    } catch { return; }
    for (const k of ["tenants", "users", "adapters", "live"]) $(`#t-${k}`, el).textContent = fmtNum(totals[k]);
    $("#t-note", el).textContent = `counted ${fmtTime(new Date(totals.computed_at * 1000).toISOString())} in ${totals.took_ms} ms (recounted every 30 s)`;
  }
  async function loadLive() {
    let live;
    try {
      live = await api("/ui/api/live", { signal });
    } catch { return; }
    const jobs = $("#jobs-by-state", el);
    jobs.replaceChildren(...Object.entries(live.jobs).map(([st, n]) => h("div", { class: "stat" },
      h("div", { class: "stat-label" }, st), h("div", { class: `stat-value state-${st}` }, fmtNum(n)))));
    if (!live.engine) {
      $("#l-tokens", el).textContent = "no engine";
      return;
    }
    $("#l-tokens", el).textContent = fmtNum(live.tokens_per_s, 1);
    $("#l-requests", el).textContent = fmtNum(live.requests_per_s, 2);
    $("#l-queue", el).textContent = fmtNum(live.queue_depth);
    $("#l-running", el).textContent = fmtNum(live.running);
    series.tokens = [...series.tokens, live.tokens_per_s].slice(-60);
    series.queue = [...series.queue, live.queue_depth].slice(-60);
    $("#spark-tokens", el).replaceChildren(sparkline(series.tokens));
    $("#spark-queue", el).replaceChildren(sparkline(series.queue, { color: "#ea580c" }));
    const t = live.tiers;
    $("#r-slots", el).textContent = `${fmtNum(t.slots)} / ${fmtNum(t.slots_max)}`;
    $("#r-ram", el).textContent = `${fmtNum(t.ram)} / ${fmtNum(t.ram_max)}`;
    $("#r-cold", el).textContent = totals ? fmtNum(Math.max(0, totals.adapters - t.ram)) : "…";
    $("#r-pinned", el).textContent = fmtNum(t.pinned);
    const r = live.hit_rates;
    $("#hit-rates", el).replaceChildren(
      h("div", { class: "muted small" }, `hit rates over ${fmtNum(live.lookups)} adapter lookups`),
      ...[["slot", r.slot], ["RAM", r.ram], ["cold", r.cold]].map(([name, v]) => h("div", { class: "bar-row" },
        h("span", {}, name), h("span", { class: "bar" }, h("i", { style: { width: fmtPct(v || 0, 1) } })),
        h("span", { class: "num" }, fmtPct(v, 1)))));
  }

  loadPage();
  loadTotals().then(loadLive);
  loadNames(tenantsBox, "/ui/api/tenants", pickTenant).catch(() => {});
  timers.push(setInterval(loadLive, POLL_MS), setInterval(loadTotals, 30000));
  return { el, cleanup: () => { timers.forEach(clearInterval); controller.abort(); } };
}
